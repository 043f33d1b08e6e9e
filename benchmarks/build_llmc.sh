#!/usr/bin/env bash
# Build llm.c's CPU trainer (train_gpt2.c) for `bench_train.py --vs-llmc BUILD_DIR`.
#
#   benchmarks/build_llmc.sh [--src LLMC_CHECKOUT] [BUILD_DIR]      (BUILD_DIR default benchmarks/llmc-build)
#
# Without --src, clones https://github.com/karpathy/llm.c ($LLMC_REPO overrides the URL) into
# BUILD_DIR/llm.c at the pinned commit below. With --src, uses an existing checkout (train_gpt2.c and
# llmc/*.h); if its train_gpt2.c was modified and the untouched file sits beside it as
# train_gpt2.orig.c (what `patch -b` leaves), that one is used.
#
# The copy in BUILD_DIR/src is edited with sed, one statement per edit (each must match exactly once,
# or the script stops): B, T and the number of steps come from LLMC_B, LLMC_T, LLMC_STEPS (defaults:
# llm.c's own 4, 64, 41), and the periodic val loss and text generation are off. Compiled like llm.c's
# Makefile does for the CPU with OpenMP ($CC, default gcc).
#
# Then the inputs, written with this checkout's distgpt ($PYTHON, default: the first of python, python3,
# .venv/bin/python, venv/bin/python that has numpy and tiktoken):
#   BUILD_DIR/gpt2_124M.bin                       random-init GPT-2 124M (distgpt's init, seed 1337),
#                                                 llm.c v3 fp32 checkpoint
#   BUILD_DIR/data/tinyshakespeare/               python -m distgpt.prepare --source tinyshakespeare
#   BUILD_DIR/dev/data/tinyshakespeare/*.bin      symlinks where train_gpt2.c looks for them
# prepare sees your environment (DISTGPT_TINYSHAKESPEARE, DISTGPT_CACHE, TIKTOKEN_CACHE_DIR, ...).
# Both are kept when already there: running the script again only rebuilds the binary.
#
# Run: cd BUILD_DIR && OMP_NUM_THREADS=2 LLMC_B=4 LLMC_T=64 LLMC_STEPS=10 ./train_gpt2
set -euo pipefail

LLMC_COMMIT=db2454f88f1cdf0568c76d4c4bf2b1e0ed508cf0
# sha256 of train_gpt2.c at LLMC_COMMIT: a --src checkout that differs gets a warning
LLMC_TRAIN_SHA256=b9c5de3aa21bc7997e4038f84e43a551c38ff4834e044621e0ee7fb9db5a0c4d
LLMC_REPO=${LLMC_REPO:-https://github.com/karpathy/llm.c}
CC=${CC:-gcc}
CFLAGS=(-Ofast -Wno-unused-result -Wno-ignored-pragmas -Wno-unknown-attributes -march=native
        -fopenmp -DOMP -fgnu89-inline)
LDLIBS=(-lm -lgomp)

die() { echo "build_llmc.sh: $*" >&2; exit 1; }
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src="" build=""
while [ $# -gt 0 ]; do
  case "$1" in
    --src) [ $# -ge 2 ] || die "--src needs a directory"; src=$2; shift 2 ;;
    --src=*) src=${1#--src=}; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "build_llmc.sh: unknown option $1" >&2; usage 2 ;;
    *) [ -z "$build" ] || die "more than one BUILD_DIR"; build=$1; shift ;;
  esac
done
build=${build:-$here/llmc-build}
mkdir -p "$build"
build=$(cd "$build" && pwd)

# this checkout's distgpt, whatever is installed; the python needs its dependencies (numpy, tiktoken)
repo=$(cd "$here/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
probe='import distgpt.prepare, distgpt.weights, tiktoken'
if [ -z "${PYTHON:-}" ]; then
  for p in python python3 "$repo/.venv/bin/python" "$repo/venv/bin/python"; do
    if command -v "$p" >/dev/null && "$p" -c "$probe" 2>/dev/null; then PYTHON=$p; break; fi
  done
  [ -n "${PYTHON:-}" ] || die "no python found with distgpt's dependencies; set PYTHON=/path/to/venv/bin/python"
fi
"$PYTHON" -c "$probe" || die "$PYTHON cannot import distgpt and its dependencies"

# ------------------------------------------------------------------ llm.c source at the pinned commit
if [ -z "$src" ]; then
  src=$build/llm.c
  if [ ! -d "$src/.git" ]; then
    echo "cloning $LLMC_REPO into $src"
    git clone --quiet "$LLMC_REPO" "$src" || die "git clone $LLMC_REPO failed"
  fi
  if ! git -C "$src" cat-file -e "$LLMC_COMMIT^{commit}" 2>/dev/null; then
    git -C "$src" fetch --quiet origin || die "git fetch in $src failed"
  fi
  git -C "$src" -c advice.detachedHead=false checkout --quiet "$LLMC_COMMIT" \
    || die "cannot check out $LLMC_COMMIT in $src"
fi
[ -d "$src" ] || die "--src $src: no such directory"
src=$(cd "$src" && pwd)
orig=$src/train_gpt2.c
[ -f "$orig" ] || die "$orig not found (expected an llm.c checkout)"
sha() { sha256sum "$1" | cut -d' ' -f1; }
if [ "$(sha "$orig")" != "$LLMC_TRAIN_SHA256" ]; then
  if [ -f "$src/train_gpt2.orig.c" ] && [ "$(sha "$src/train_gpt2.orig.c")" = "$LLMC_TRAIN_SHA256" ]; then
    echo "$orig is modified; using the original beside it, train_gpt2.orig.c"
    orig=$src/train_gpt2.orig.c
  else
    echo "warning: $orig is not llm.c commit ${LLMC_COMMIT:0:8}'s train_gpt2.c; trying anyway" >&2
  fi
fi
for h in utils tokenizer dataloader rand; do
  [ -f "$src/llmc/$h.h" ] || die "$src/llmc/$h.h not found"
done

# ------------------------------------------------------------------ the edits (always from a fresh copy)
mkdir -p "$build/src/llmc"
cp "$src"/llmc/*.h "$build/src/llmc/"
c=$build/src/train_gpt2.c
cp "$orig" "$c.tmp"

# edit OLD NEW: replace the text OLD (taken literally) by NEW on the one line of the file that has it
edit() {
  local old=$1 new=$2 n old_re new_re
  n=$(grep -cF -- "$old" "$c.tmp" || true)
  [ "$n" = 1 ] || die "train_gpt2.c: '$old' found on $n lines, expected 1 (not llm.c ${LLMC_COMMIT:0:8}?)"
  old_re=$(printf '%s' "$old" | sed 's/[]\[\\.*^$|]/\\&/g')
  new_re=$(printf '%s' "$new" | sed 's/[\\&|]/\\&/g')
  sed -i "s|$old_re|$new_re|" "$c.tmp"
  grep -qF -- "$new" "$c.tmp" && ! grep -qF -- "$old" "$c.tmp" \
    || die "train_gpt2.c: the edit of '$old' did not apply"
}
env_int() { printf 'getenv("%s") ? atoi(getenv("%s")) : %s' "$1" "$1" "$2"; }
edit 'int B = 4;' "int B = $(env_int LLMC_B 4);"
edit 'int T = 64;' "int T = $(env_int LLMC_T 64);"
edit 'step <= 40;' "step < ($(env_int LLMC_STEPS 41));"
edit 'if (step % 10 == 0) {' 'if (0) { // val loss: off (build_llmc.sh)'
edit 'if (step > 0 && step % 20 == 0) {' 'if (0) { // generation: off (build_llmc.sh)'
sed -i "1i // edited by distgpt benchmarks/build_llmc.sh from llm.c ${LLMC_COMMIT} (see there)" "$c.tmp"
mv "$c.tmp" "$c"

echo "compiling $c"
(cd "$build/src" && "$CC" "${CFLAGS[@]}" train_gpt2.c "${LDLIBS[@]}" -o "$build/train_gpt2.tmp") \
  || die "compilation failed"
mv "$build/train_gpt2.tmp" "$build/train_gpt2"

# ------------------------------------------------------------------ inputs, written by distgpt
"$PYTHON" - "$build/gpt2_124M.bin" <<'EOF'
import os
import sys

import numpy as np

from distgpt.model import Layout, ModelConfig, init_params
from distgpt.weights import save_llmc

path = sys.argv[1]
cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
layout = Layout(cfg)
size = 256 * 4 + 4 * layout.n_params(count_padding=True)  # llm.c v3: 256 int32 header, fp32 tensors
if os.path.exists(path) and os.path.getsize(path) == size:
    print(f"{path}: already there")
else:
    params = np.zeros(layout.size, dtype=np.float32)
    init_params(layout, params, seed=1337)
    save_llmc(path, cfg, params)
    if os.path.getsize(path) != size:
        sys.exit(f"{path}: {os.path.getsize(path)} bytes, expected {size}")
    print(f"{path}: random-init GPT-2 124M, {layout.n_params() / 1e6:.1f}M parameters")
EOF

data=$build/data/tinyshakespeare
if [ ! -f "$data/manifest.json" ]; then
  "$PYTHON" -m distgpt.prepare --source tinyshakespeare --tokenizer gpt2 --out "$data" \
    || die "python -m distgpt.prepare failed"
else
  echo "$data: already there"
fi
for split in train val; do
  shard=$data/${split}_000000.bin
  [ -f "$shard" ] || die "$shard not found"
  [ ! -e "$data/${split}_000001.bin" ] || die "$data: more than one $split shard; train_gpt2.c reads one file"
done
mkdir -p "$build/dev/data/tinyshakespeare"
ln -sfn ../../../data/tinyshakespeare/train_000000.bin "$build/dev/data/tinyshakespeare/tiny_shakespeare_train.bin"
ln -sfn ../../../data/tinyshakespeare/val_000000.bin "$build/dev/data/tinyshakespeare/tiny_shakespeare_val.bin"

echo "llm.c ${LLMC_COMMIT:0:8} built in $build"
echo "run: cd $build && OMP_NUM_THREADS=2 LLMC_B=4 LLMC_T=64 LLMC_STEPS=10 ./train_gpt2"
