#!/usr/bin/env bash
# The test command: a fresh venv in .venv, the package with its test extra (torch 2.13 CPU and
# transformers as independent references), ruff, then pytest. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -e ".[test]"
ruff check distgpt tests benchmarks
python -m pytest -q "$@"
