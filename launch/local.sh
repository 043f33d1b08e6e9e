#!/usr/bin/env bash
# Train on this machine with every core busy and none oversubscribed.
#   launch/local.sh configs/X.yaml [key=value ...]
# RANKS and THREADS override the layout; by default one rank per core with one kernel thread each
# (distgpt's own thread pool, distgpt/threads.py; BLAS always runs single-threaded inside it), the
# faster layout here: see the README's performance section.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [key=value ...]}; shift
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
threads=${THREADS:-1}
ranks=${RANKS:-$(( cores / threads > 0 ? cores / threads : 1 ))}
python_bin=${PYTHON:-python}
mpirun_bin=$(command -v mpirun || echo "$(dirname "$(command -v "$python_bin")")/mpirun")
if [ "$ranks" -eq 1 ] || [ ! -x "$mpirun_bin" ]; then
  exec "$python_bin" -m distgpt.train --config "$config" parallel.threads_per_rank="$threads" "$@"
fi
# bind each rank to its own block of cores so the threads of different ranks never share one
exec "$mpirun_bin" -n "$ranks" -bind-to "core:$threads" \
  "$python_bin" -m distgpt.train --config "$config" parallel.threads_per_rank="$threads" "$@"
