#!/usr/bin/env bash
# Several machines with ssh between them and the same path/venv on each (MPICH hydra):
#   HOSTFILE=launch/hostfile.example RANKS=4 THREADS=16 launch/multinode.sh configs/cluster.yaml
# threads_per_rank=auto instead divides each node's cores among the ranks MPI placed on it.
set -euo pipefail
config=${1:?usage: launch/multinode.sh CONFIG [key=value ...]}; shift
: "${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}"
: "${RANKS:?set RANKS, the total number of ranks}"
threads=${THREADS:-auto}
bind=()
[ "$threads" != auto ] && bind=(-bind-to "core:$threads")
exec mpirun -f "$HOSTFILE" -n "$RANKS" "${bind[@]}" \
  python -m distgpt.train --config "$config" parallel.threads_per_rank="$threads" "$@"
