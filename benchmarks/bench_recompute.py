"""Activation recompute: step time and peak memory with train.recompute none vs block, one rank.

    python benchmarks/bench_recompute.py [--config small] [--seq-len 1024] [--batch 1] [--threads 2]
        [--precision fp32,bf16] [--modes none,block] [--steps 2] [--warmup 1] [--json PATH]

Each (precision, mode) runs in its own process (peak RSS only grows), which builds the step
distgpt.train runs (Trainer: model, gradients, AdamW, reducer) on GPT-2's shapes with GPT-2's
random init, trains `warmup` untimed and `steps` timed steps on random tokens, and reports: the
fastest step's time and tokens/s (the least disturbed by whatever else runs; the JSON has the
median too), the peak RSS, the RSS reached before the first step (parameters, gradients, moments,
bf16 copy: the same in both modes), their difference (what the steps added: the activations, the
head's chunk, the kernels' scratch, transient temporaries) and model.activation_bytes's estimate
of the activation buffers. The modes must give bit-identical losses; the script says so, or stops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = {  # GPT-2's published sizes: (n_layer, n_head, n_embd)
    "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (36, 20, 1280), "xl": (48, 25, 1600)}


def vm_hwm_mib() -> float:
    """The process's peak resident set so far (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    from distgpt import dist
    from distgpt.config import Config, ModelConfig, ParallelConfig, TrainConfig
    from distgpt.model import activation_bytes
    from distgpt.threads import setup
    from distgpt.trainer import Trainer, initial_params

    L, nh, C = SHAPES[args.config]
    cfg = Config(model=ModelConfig(n_layer=L, n_head=nh, n_embd=C, block_size=max(1024, args.seq_len)),
                 train=TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, seq_len=args.seq_len,
                                   precision=args.precision, recompute=args.mode, warmup_steps=1),
                 parallel=ParallelConfig(threads_per_rank=args.threads))
    comm = dist.init()
    setup(1, args.threads)
    _, params = initial_params(cfg)
    trainer = Trainer(cfg, comm, params)
    trainer.broadcast_params()
    del params
    # the gradients and AdamW's moments are zeros not yet touched: touch them, so that "before"
    # holds all of the run's state and what the steps add is theirs alone
    for buf in (trainer.model.grads, trainer.opt.m, trainer.opt.v):
        buf.fill(0.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (args.warmup + args.steps, args.batch, args.seq_len + 1))
    before = vm_hwm_mib()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        x, y = np.ascontiguousarray(tokens[step, :, :-1]), np.ascontiguousarray(tokens[step, :, 1:])
        t0 = time.perf_counter()
        losses.append(trainer.step(step, [(x, y, 0)]).loss)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = vm_hwm_mib()
    est = activation_bytes(cfg.model, args.batch, args.seq_len, precision=trainer.precision,
                           recompute=args.mode) / 2**20
    # the fastest step: the least disturbed by whatever else the machine runs
    return {"mode": args.mode, "precision": trainer.precision, "step_s": min(times),
            "step_median_s": statistics.median(times), "tokens_per_s": args.batch * args.seq_len / min(times),
            "peak_rss_mib": peak,
            "before_steps_mib": before, "steps_added_mib": peak - before, "activation_bytes_mib": est,
            "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=SHAPES, default="small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--modes", default="none,block", help="comma-separated train.recompute values")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="save the results to this file")
    p.add_argument("--mode", help=argparse.SUPPRESS)            # set for the worker processes
    args = p.parse_args()
    if args.mode is not None:
        print(json.dumps(worker(args)))
        return

    results = []
    print(f"GPT-2 {args.config}, T {args.seq_len}, B {args.batch}, 1 rank x {args.threads} threads")
    print(f"{'precision':9s} {'recompute':9s} {'step s':>7s} {'tok/s':>7s} {'peak MiB':>9s} "
          f"{'before':>7s} {'added':>7s} {'est. acts':>9s}")
    for precision in args.precision.split(","):
        rows = []
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, "--precision", precision,
                   "--config", args.config, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                   "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{precision} {mode} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{r['precision']:9s} {mode:9s} {r['step_s']:7.2f} {r['tokens_per_s']:7.0f} "
                  f"{r['peak_rss_mib']:9.0f} {r['before_steps_mib']:7.0f} {r['steps_added_mib']:7.0f} "
                  f"{r['activation_bytes_mib']:9.0f}")
        if any(r["losses"] != rows[0]["losses"] for r in rows):
            sys.exit(f"{precision}: the modes' losses differ: {[r['losses'] for r in rows]}")
        if len(rows) > 1:
            base = rows[0]
            for r in rows[1:]:
                print(f"  {precision} {r['mode']} vs {base['mode']}: losses bit-identical, "
                      f"step time x{r['step_s'] / base['step_s']:.2f}, "
                      f"peak RSS {r['peak_rss_mib'] - base['peak_rss_mib']:+.0f} MiB, "
                      f"added by the steps {r['steps_added_mib'] - base['steps_added_mib']:+.0f} MiB")
        results += rows
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
