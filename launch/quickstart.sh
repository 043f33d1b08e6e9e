#!/usr/bin/env bash
# The whole offline pipeline on a fresh machine: install, prepare the built-in corpus (the Python
# standard library's source, no download), train on every core, sample, plot.
#   bash launch/quickstart.sh [key=value ...]      (e.g. train.max_steps=200 for a quick look)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q -e ".[plot]"
[ -f data/builtin/manifest.json ] || python -m distgpt.prepare --source builtin --tokenizer bytes --out data/builtin
bash launch/local.sh configs/quickstart.yaml "$@"
python -m distgpt.sample --ckpt out/quickstart --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40
python -m distgpt.plot out/quickstart --out out/quickstart/loss.png
echo "loss plot: out/quickstart/loss.png"
