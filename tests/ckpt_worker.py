"""Runs checkpoint saves and loads in a real process (under mpirun, or alone) for tests/test_checkpoint.py.

    ckpt_worker.py save DIR SEED [--step S] [--keep K]   every rank saves its slice of the state of SEED
    ckpt_worker.py load DIR                                resolve "auto", load this rank's slice, compare it
                                                           with the state of the seed recorded in the
                                                           manifest, and write DIR/loaded_w{world}_r{rank}.npy

Exits non-zero (CheckpointError or AssertionError) when something is wrong. Set
DISTGPT_CKPT_CRASH_AT to make a save die at one of the named points.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from distgpt import dist
from distgpt.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from distgpt.model import Layout, ModelConfig
from distgpt.partition import Partition

LAYOUT = Layout(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, vocab_multiple=1))


def make_state(seed: int) -> np.ndarray:
    """The full (3, N) float32 [params, m, v] every test derives from a seed; v >= 0 like AdamW's."""
    rng = np.random.default_rng(seed)
    state = rng.standard_normal((3, LAYOUT.size), dtype=np.float32)
    state[2] = np.abs(state[2])
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("dir")
    ap.add_argument("seed", type=int, nargs="?", default=0)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--keep", type=int, default=3)
    args = ap.parse_args()
    comm = dist.init()
    partition = Partition(LAYOUT.size, comm.size, comm.rank)
    start, end = partition.owned

    if args.mode == "save":
        state = make_state(args.seed)[:, start:end]
        meta = {"seed": args.seed, "tokens_seen": 1000 * args.step, "saved_by": comm.size}
        save_checkpoint(args.dir, args.step, comm, LAYOUT, partition, state[0], state[1], state[2],
                        meta, keep=args.keep)
        return

    path = resolve_resume(args.dir, "auto", comm)
    assert path is not None, f"no checkpoint in {args.dir}"
    params, m, v, manifest = load_checkpoint(path, comm, LAYOUT, partition, verify=True)
    loaded = np.stack([params, m, v])
    np.save(Path(args.dir) / f"loaded_w{comm.size}_r{comm.rank}.npy", loaded)
    expected = make_state(manifest["meta"]["seed"])[:, start:end]
    assert np.array_equal(loaded.view(np.uint32), expected.view(np.uint32)), f"rank {comm.rank}: mismatch"


if __name__ == "__main__":
    main()
