"""cProfile of GPT-2 124M training steps (forward, backward, AdamW) in one process, top functions by
own time. For before/after comparisons across commits: --checkout points at another work tree, e.g.

    git worktree add /tmp/before b6017e4
    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_step.py --checkout /tmp/before
    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_step.py

No MPI, no data loader: the same random tokens every step, so only the model and optimizer are
measured. Set OPENBLAS_NUM_THREADS (and --threads, for code that splits work itself) before the run.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="distgpt work tree to import (default: this one)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps, after one untimed")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads, where the code has them")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="the model's train.precision (bf16 needs a fast bf16 gemm, as train says)")
    args = ap.parse_args()

    sys.path.insert(0, str(args.checkout))
    from distgpt import ops
    from distgpt.model import GPT, ModelConfig, init_params
    from distgpt.optim import AdamW

    try:
        from distgpt.threads import set_threads
    except ImportError:                       # checkouts before distgpt/threads.py
        set_threads = getattr(ops, "set_threads", None)
    if set_threads is not None:
        set_threads(args.threads)
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    model = GPT(cfg, precision=args.precision) if args.precision != "fp32" else GPT(cfg)
    init_params(model.layout, model.params, 1337)
    opt = AdamW(model.layout.size, model.layout.decay_segments(), 0.9, 0.95, 1e-8, 0.1)
    rng = np.random.default_rng(0)
    idx, targets = (rng.integers(0, cfg.vocab_size, (args.batch, args.seq)) for _ in range(2))

    def step() -> float:
        model.zero_grad()
        fwd = model.forward(idx, targets, grad_scale=1.0)
        if isinstance(fwd, float):            # checkouts whose forward returned the loss
            model.backward()
            loss = fwd
        else:
            model.backward(fwd)
            loss = fwd.loss
        opt.step(model.params, model.grads, 6e-4)
        if args.precision != "fp32":
            model.weights_changed()           # the bf16 copies are remade in the next forward
        return float(loss)

    step()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        loss = step()
    prof.disable()
    per_step = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    print(f"{args.checkout}: {per_step:.2f} s/step with the profiler, {tokens / per_step:.0f} tokens/s, "
          f"last loss {loss:.3f}")
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[: args.top]
    print(f"{'s/step':>7}  {'share':>5}  function (own time)")
    for (file, line, name), (_, _, own, _, _) in rows:
        print(f"{own / args.steps:7.3f}  {100 * own / args.steps / per_step:4.1f}%  "
              f"{Path(file).name}:{line}({name})")


if __name__ == "__main__":
    main()
