#!/usr/bin/env bash
# The whole offline pipeline on a fresh machine: install, prepare the built-in corpus (the Python
# standard library's source, no download), train on every core, sample, plot.
#   bash launch/quickstart.sh [key=value ...]      (e.g. train.max_steps=200 for a quick look)
# QUICKSTART_DIR puts data/ and out/ elsewhere than the repository; DISTGPT_SKIP_INSTALL=1 uses the
# active Python as it is.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "${DISTGPT_SKIP_INSTALL:-0}" != 1 ]; then
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
    . "$root/.venv/bin/activate"
  fi
  python -m pip install -q -e "$root[plot]"
fi
cd "${QUICKSTART_DIR:-$root}"
start=$(date +%s)
[ -f data/builtin/manifest.json ] || python -m distgpt.prepare --source builtin --tokenizer bytes --out data/builtin
# overwrite_out_dir: running the quickstart again starts its run over (a resumed run could only
# say that it is already done)
bash "$root/launch/local.sh" "$root/configs/quickstart.yaml" overwrite_out_dir=true "$@"
echo "--- a sample from the trained model:"
python -m distgpt.sample --ckpt out/quickstart --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40
echo
python -m distgpt.plot out/quickstart --out out/quickstart/loss.png
echo "quickstart: done in $(( $(date +%s) - start ))s; loss plot in $(pwd)/out/quickstart/loss.png"
