"""Training throughput of distgpt on this machine, per layout of ranks x threads, optionally against PyTorch.

    python benchmarks/bench_train.py --config small [--steps N] [--warmup W] [--vs-torch]
        [--precision fp32,bf16] [--torch-modes eager-fp32,...] [--layouts 1x2,2x1] [--no-zero]
        [--reduce M] [--no-overlap] [--profile] [--batch B] [--wait-idle S] [--json PATH]
        [--vs-llmc BUILD_DIR] [--set KEY=VALUE ...]

The driver (this script run without mpirun) starts one worker per layout RxT: R MPI ranks with T
threads each (`mpirun -n R -bind-to core:T`; R = 1 runs the worker directly). The worker
builds the model, AdamW and gradient reducer as distgpt.train does, trains on random tokens for
`warmup` untimed and `steps` timed steps, measures the machine's sgemm peak with the same threads,
and hands rank 0's JSON result back through a file; each layout runs once per --precision. With
--vs-torch the PyTorch reference (torch_reference.py: one process on all the layouts' cores) runs
after them on the same shape and data, once per --torch-modes entry: eager or torch.compile,
fp32 or bf16 autocast (a compiled model's first step compiles it: its time is reported, not timed).
MFU is against the 4096^3 gemm peak of the row's own precision: sgemm for fp32, the bf16 gemm
distgpt uses for bf16 (torch's bf16 rows against the same bf16 peak).
--set applies distgpt config overrides (as distgpt.train's command line) to distgpt's workers, e.g.
`--set parallel.sync=diloco --set parallel.diloco.inner_steps=50`. Under DiLoCo a step that ends a
cycle also syncs the hosts, so --steps must be whole cycles (a multiple of inner_steps; any such window
holds one sync per cycle, wherever the warmup ends it):
the result's mean step (mean_ms_per_step) is then the cost per step of whole cycles, beside the
median (ms_per_step, a step without a sync).
See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from distgpt import bf16, blas, dist, fileio, ops
from distgpt.config import (
    Config,
    ConfigError,
    ParallelConfig,
    TrainConfig,
    check_batch_layout,
    parse_override,
)
from distgpt.model import Layout, ModelConfig
from distgpt.optim import lr_at
from distgpt.threads import ThreadSetup, n_threads, set_threads
from distgpt.threads import setup as setup_threads
from distgpt.trainer import Trainer, flops_per_token, initial_params

SEED = 1337
TORCH_MODES = ("eager-fp32", "eager-bf16", "compile-fp32", "compile-bf16")
SGEMM_N = 4096
SGEMM_REPEATS = 3


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    batch: int  # global sequences per step
    steps: int  # default timed steps
    warmup: int  # default untimed steps
    vocab_size: int = 50257


CONFIGS = {
    "small": Shape(n_layer=4, n_head=4, n_embd=256, seq_len=256, batch=8, steps=5, warmup=1),
    "medium": Shape(n_layer=6, n_head=6, n_embd=384, seq_len=256, batch=8, steps=4, warmup=1),
    "gpt2-t256": Shape(n_layer=12, n_head=12, n_embd=768, seq_len=256, batch=4, steps=5, warmup=1),
    "gpt2-t1024": Shape(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch=1, steps=3, warmup=1),
    # llm.c's CPU trainer was measured at B4 T64 (and T256): the same shape, for the comparison
    "gpt2-t64": Shape(n_layer=12, n_head=12, n_embd=768, seq_len=64, batch=4, steps=5, warmup=1),
}


# ----------------------------------------------------------------------------- shared by the workers

def model_config(shape: Shape) -> ModelConfig:
    return ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                       block_size=shape.seq_len, vocab_size=shape.vocab_size)


def random_tokens(shape: Shape, n_steps: int, batch: int) -> np.ndarray:
    """(n_steps, batch, T + 1) int64 tokens, the same for distgpt and torch: inputs [:-1], targets [1:]."""
    rng = np.random.default_rng(SEED)
    return rng.integers(0, shape.vocab_size, (n_steps, batch, shape.seq_len + 1), dtype=np.int64)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _best_time(comm, fn, repeats: int = SGEMM_REPEATS) -> float:
    """The shortest of `repeats` calls of fn, all ranks starting each at the same moment."""
    best = float("inf")
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _row_split_time(comm, threads: int, a: np.ndarray, b: np.ndarray, c: np.ndarray, repeats: int,
                    matmul=ops.matmul) -> float:
    """_best_time of distgpt's own row-split matmul (ops.matmul, or ops.matmul_bf16) over `threads`
    threads."""
    before = n_threads()
    set_threads(threads)
    try:
        return _best_time(comm, lambda: matmul(a, b, c), repeats)
    finally:
        set_threads(before)


def bf16_gemm_flops(comm, threads: int) -> float:
    """Best-of-3 FLOP/s of a 4096^3 bf16 product through distgpt's bf16 gemm and row split."""
    rng = np.random.default_rng(0)
    a = bf16.to_bf16(rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32))
    b = bf16.to_bf16(rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32))
    c = np.empty((SGEMM_N, SGEMM_N), np.float32)
    ops.matmul_bf16(a, b, c)                                # the first call warms the library up
    return 2 * SGEMM_N**3 / _row_split_time(comm, threads, a, b, c, SGEMM_REPEATS, ops.matmul_bf16)


def gemm_peak(comm, threads: int, precision: str) -> float:
    """The MFU denominator of a row: the sgemm peak, or for bf16 the bf16 gemm's."""
    return bf16_gemm_flops(comm, threads) if precision.startswith("bf16") else sgemm_flops(comm, threads)


def sgemm_flops(comm, threads: int) -> float:
    """Best-of-3 FLOP/s of a 4096x4096 float32 np.matmul on `threads` BLAS threads (whatever limit
    the code being measured set for itself), and, when distgpt runs its matmuls through MKL
    (distgpt/blas.py), of the same product through distgpt's own row split over `threads` threads:
    the faster of the two is the peak. All ranks run each repetition at the same moment, so
    together they measure what the machine gives them."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    b = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(limits=threads, user_api="blas"):
        best = _best_time(comm, lambda: np.matmul(a, b, out=c))
    if blas.using_mkl():
        best = min(best, _row_split_time(comm, threads, a, b, c, SGEMM_REPEATS))
    return 2 * SGEMM_N**3 / best


def throughput(tokens_per_step: int, step_times: list[float], flops_per_token: int, peak: float) -> dict:
    """The speed fields every result carries, from the timed steps' wall times."""
    step_s = statistics.median(step_times)
    tok_s = tokens_per_step / step_s
    return {"flops_per_token": flops_per_token, "tokens_per_s": tok_s, "ms_per_step": 1000 * step_s,
            "mean_ms_per_step": 1000 * statistics.fmean(step_times),
            "step_ms": [1000 * v for v in step_times], "peak_flops": peak,
            "mfu": tok_s * flops_per_token / peak}


def split_summary(phases: list[dict[str, float]], step_times: list[float]) -> dict[str, float]:
    """Each phase's share of the timed wall time (the rest, 'other', is zero_grad, the loss allreduce...)."""
    total = sum(step_times)
    return {k: sum(p[k] for p in phases) / total for k in phases[0]}


def top_functions(profiler: cProfile.Profile, n: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


def write_result(path: str, result: dict) -> None:
    fileio.write_json_atomic(path, result, indent=None)


# ----------------------------------------------------------------------------- distgpt worker

def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """cfg with `section.key=value` overrides (distgpt.train's command-line syntax) applied and
    validated again; a bad one is a ConfigError naming it."""
    if not overrides:
        return cfg
    tree = cfg.to_dict()
    for text in overrides:
        key, value = parse_override(text)
        node, *path, last = [tree, *key.split(".")]
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {text!r}: no config section {part!r}")
            node = node[part]
        if last not in node:
            raise ConfigError(f"override {text!r}: no config key {key!r}")
        node[last] = value
    try:
        return Config.model_validate(tree)
    except ValueError as e:       # pydantic's ValidationError: the first problem, on one line
        first = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ConfigError(f"overrides {' '.join(overrides)}: {first}") from None


def whole_cycles_problem(cfg: Config, warmup: int, steps: int) -> str | None:
    """Why the timed steps are not whole DiLoCo cycles' worth; None when they are. Any k x H
    consecutive steps hold exactly k outer syncs (one every H steps), wherever they start, so only
    --steps must be a multiple of H, and the window must not end on train.max_steps, whose sync
    ends a partial cycle, unless that is a multiple of H too."""
    if cfg.parallel.sync != "diloco":
        return None
    h = cfg.parallel.diloco.inner_steps
    if steps % h:
        return f"--steps {steps}: expected a multiple of parallel.diloco.inner_steps ({h}) under diloco"
    end = warmup + steps
    if end > cfg.train.max_steps or (end == cfg.train.max_steps and end % h):
        return (f"--warmup + --steps {end}: expected below train.max_steps ({cfg.train.max_steps}), "
                "whose sync would end a partial cycle")
    return None


def distgpt_worker(args: argparse.Namespace) -> None:
    comm = dist.init()
    try:
        threads = setup_threads(comm.local_size, args.threads)
        shape = CONFIGS[args.config]
        cfg = Config(
            model=model_config(shape),
            train=TrainConfig(batch_size=args.batch,
                              micro_batch_size=args.batch // (comm.size * args.micro_batches),
                              seq_len=shape.seq_len, seed=SEED, precision=args.precision),
            parallel=ParallelConfig(zero=args.zero, threads_per_rank=args.threads,
                                    overlap=not args.no_overlap, reduce=args.reduce,
                                    grad_wire=args.grad_wire, comm_thread=args.comm_thread),
        )
        cfg = with_overrides(cfg, args.set)
        problem = whole_cycles_problem(cfg, args.warmup, args.steps)
        if problem:
            raise ValueError(problem)
        if check_batch_layout(cfg, comm.size) != args.micro_batches:
            raise ValueError(f"batch {args.batch} does not split evenly into {args.micro_batches} "
                             f"micro-batches on each of {comm.size} ranks")
        result = train_distgpt(args, cfg, comm, threads)
        if comm.rank == 0:
            write_result(args.out, result)
    except Exception:
        traceback.print_exc()
        comm.abort(1)  # exits; with MPI it also ends the other ranks instead of leaving them waiting


def train_distgpt(args: argparse.Namespace, cfg: Config, comm: dist.Comm, threads: ThreadSetup) -> dict:
    t, mb = cfg.train, cfg.train.micro_batch_size
    _, params = initial_params(cfg)
    trainer = Trainer(cfg, comm, params)       # the very step distgpt.train runs
    trainer.broadcast_params()
    model = trainer.model
    tokens = random_tokens(CONFIGS[args.config], args.warmup + args.steps, t.batch_size)
    # micro-batch k of rank r: rows (k * ranks + r) * mb onwards of the step's global batch
    firsts = [(k * comm.size + comm.rank) * mb for k in range(args.micro_batches)]

    step_times, phases, losses, outer = [], [], [], []
    profiler = cProfile.Profile() if args.profile and comm.rank == 0 else None
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        if step == args.warmup:
            comm.barrier()
            if profiler is not None:
                profiler.enable()
        micro = [(np.ascontiguousarray(tokens[step, r:r + mb, :-1]),
                  np.ascontiguousarray(tokens[step, r:r + mb, 1:]), r) for r in firsts]
        before = dict(trainer.timing)
        t0 = time.perf_counter()
        res = trainer.step(step, micro)
        dt = time.perf_counter() - t0
        losses.append(res.loss)
        if timed:
            step_times.append(dt)
            phases.append({k: trainer.timing[k] - before[k] for k in before})
            if getattr(res, "outer", None) is not None:     # a DiLoCo step that synced the hosts
                outer.append(res.outer)
    if profiler is not None:
        profiler.disable()

    rss = peak_rss_mib()  # before the sgemm's three 64 MiB matrices
    flops = gemm_peak(comm, threads.threads, trainer.precision)
    per_rank = comm.allgather_obj({"rss_mib": rss, "sgemm_flops": flops,
                                   "split": split_summary(phases, step_times)})
    n_params = model.layout.n_params()
    fpt = flops_per_token(cfg.model, t.seq_len, n_params)
    peak = sum(r["sgemm_flops"] for r in per_rank)
    sync = getattr(cfg.parallel, "sync", "step")
    diloco = {} if sync == "step" else {
        "inner_steps": cfg.parallel.diloco.inner_steps, "diloco_wire": cfg.parallel.diloco.wire,
        "outer_syncs": len(outer), "outer_ms": [1000 * o.seconds for o in outer],
        "outer_bytes": [o.bytes for o in outer]}       # rank 0's, each sync
    return {
        "impl": "distgpt",
        "sync": sync,
        **diloco,
        "ranks": comm.size,
        "threads": threads.threads,
        "batch": t.batch_size,
        "zero": trainer.partition.zero,
        "overlap": trainer.hooks is not None,
        "reduce": type(trainer.reducer).__name__,
        "precision": trainer.precision,
        "n_params": n_params,
        **throughput(t.batch_size * t.seq_len, step_times, fpt, peak),
        "split": per_rank[0]["split"],
        "split_per_rank": [r["split"] for r in per_rank],
        "rss_mib": [r["rss_mib"] for r in per_rank],
        "losses": losses,
        "blas": threads.blas,
        "matmuls": blas.describe(),
        "mpi": comm.library,
        "profile": top_functions(profiler) if profiler is not None else None,
    }


# ----------------------------------------------------------------------------- torch worker

def torch_worker(args: argparse.Namespace) -> None:
    import torch
    from torch_reference import GPT, TorchGPTConfig, Trainer, make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    shape = CONFIGS[args.config]
    t = TrainConfig()
    model = GPT(TorchGPTConfig(shape.n_layer, shape.n_head, shape.n_embd, shape.seq_len, shape.vocab_size))
    n_params = model.n_params()  # vocabulary 50257, unpadded: the same N as distgpt's
    optimizer = make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    how, precision = args.torch_mode.split("-")
    autocast = precision == "bf16"
    trainer = Trainer(torch.compile(model) if how == "compile" else model, optimizer, t.grad_clip,
                      autocast=autocast)
    tokens = torch.from_numpy(random_tokens(shape, args.warmup + args.steps, args.batch))

    step_times, phases, losses, first_step_s = [], [], [], None
    for step in range(args.warmup + args.steps):
        x, y = tokens[step, :, :-1].contiguous(), tokens[step, :, 1:].contiguous()
        t0 = time.perf_counter()
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        losses.append(trainer.step(x, y, lr, time.perf_counter))
        if step == 0:
            first_step_s = time.perf_counter() - t0         # with torch.compile: mostly compiling
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            phases.append(trainer.last)

    rss = peak_rss_mib()
    peak = gemm_peak(dist.Comm(), args.threads, precision)
    fpt = flops_per_token(model_config(shape), shape.seq_len, n_params)
    write_result(args.out, {
        "impl": "torch",
        "ranks": 1,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "n_params": n_params,
        **throughput(args.batch * shape.seq_len, step_times, fpt, peak),
        "split": split_summary(phases, step_times),
        "rss_mib": [rss],
        "losses": losses,
        "torch": torch.__version__,
        "precision": "bf16 autocast" if autocast else "fp32",
        "mode": args.torch_mode,
        "first_step_s": first_step_s,
    })


# ----------------------------------------------------------------------------- llm.c (run by the driver)

LLMC_MIN_WARMUP = 2  # llm.c's first steps are slow: they allocate activations, gradients, AdamW state
LLMC_STEP_LINE = re.compile(r"^step (\d+): train loss (\S+) \(took (\S+) ms\)$", re.MULTILINE)
GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257}
LLMC_MAX_T = 1024  # the checkpoint build_llmc.sh writes has 1024 positions


def llmc_skip_reason(shape: Shape) -> str | None:
    """Why llm.c cannot run this config (build_llmc.sh's checkpoint is GPT-2 124M), or None."""
    if any(getattr(shape, k) != v for k, v in GPT2_124M.items()):
        return "not GPT-2 124M"
    if shape.seq_len > LLMC_MAX_T:
        return f"T {shape.seq_len} > {LLMC_MAX_T}"
    return None


def run_llmc(build: str, shape: Shape, batch: int, threads: int, steps: int, warmup: int) -> dict:
    """Run build_llmc.sh's train_gpt2 for warmup + steps steps (B, T of the config, `threads` OpenMP
    threads) and time it by its own 'step N: ... (took X ms)' lines; then measure the sgemm peak
    here, with as many BLAS threads, as the torch worker does. Its result, or {'error': ...}."""
    build = os.path.abspath(build)
    exe = os.path.join(build, "train_gpt2")
    if not os.access(exe, os.X_OK):
        return {"error": f"{exe} not found: run benchmarks/build_llmc.sh {build}"}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLMC_B": str(batch),
           "LLMC_T": str(shape.seq_len), "LLMC_STEPS": str(warmup + steps)}
    load = OtherLoad()
    load.start()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([exe], cwd=build, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: peak RSS of this child alone
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    info = {"wall_s": time.perf_counter() - load.t0, "other_load": load.cores()}
    found = LLMC_STEP_LINE.findall(text)
    if proc.returncode != 0 or len(found) != warmup + steps:
        tail = "\n".join(text.strip().splitlines()[-15:])
        return {"error": f"exit code {proc.returncode}, {len(found)} of {warmup + steps} step lines\n{tail}",
                **info}
    step_ms = [float(ms) for _, _, ms in found]
    mcfg = model_config(shape)
    n_params = Layout(mcfg).n_params()  # the N of the distgpt rows, so the MFUs compare
    peak = sgemm_flops(dist.Comm(), threads)
    return {
        "impl": "llm.c",
        "ranks": 1,
        "threads": threads,
        "batch": batch,
        "n_params": n_params,
        **throughput(batch * shape.seq_len, [v / 1000 for v in step_ms[warmup:]],
                     flops_per_token(mcfg, shape.seq_len, n_params), peak),
        "steps": steps,
        "warmup": warmup,
        "warmup_ms": step_ms[:warmup],
        "split": {},
        "rss_mib": [usage.ru_maxrss / 1024],
        "losses": [float(v) for _, v, _ in found],
        "build": build,
        **info,
    }


# ----------------------------------------------------------------------------- driver

def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        try:
            r, t = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--layouts: {item!r} is not RANKSxTHREADS, e.g. 2x1") from None
        if r < 1 or t < 1:
            raise SystemExit(f"--layouts: {item!r}: ranks and threads must be >= 1")
        layouts.append((r, t))
    return layouts


def mpirun_path() -> str | None:
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else shutil.which("mpirun")


class OtherLoad:
    """How many cores, on average, were busy with anything but this driver and its workers (other
    users' jobs, the hypervisor's steal time) between start() and cores(): /proc/stat's busy time
    minus our own CPU time. Anything well above 0 means the numbers of that run are disturbed."""

    def start(self) -> None:
        self.t0, self.busy0, self.ours0 = self._sample()

    def cores(self) -> float | None:
        if self.busy0 is None:
            return None
        t1, busy1, ours1 = self._sample()
        return max(0.0, (busy1 - self.busy0) - (ours1 - self.ours0)) / (t1 - self.t0)

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        ours = sum(u.ru_utime + u.ru_stime for u in usage)
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
            busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = None
        return time.perf_counter(), busy, ours


def wait_idle(timeout: float, quiet_s: float = 5.0, threshold: float = 0.2) -> None:
    """Wait until other processes have used under `threshold` cores for `quiet_s` seconds in a row,
    or `timeout` seconds have passed (then go ahead: the other load column will tell)."""
    deadline, quiet, said = time.monotonic() + timeout, 0.0, False
    load = OtherLoad()
    while time.monotonic() < deadline and quiet < quiet_s:
        load.start()
        time.sleep(1.0)
        busy = load.cores()
        if busy is None:
            return
        quiet = quiet + 1.0 if busy < threshold else 0.0
        if quiet == 0.0 and not said:
            print("(waiting for the machine to go idle)", end=" ", flush=True)
            said = True


def run_worker(impl: str, config: str, ranks: int, threads: int, batch: int, variant: str, args,
               tmp: str) -> dict:
    """Run one worker to completion: its result, or {'error': ...}. `variant`: distgpt's precision,
    or the torch mode."""
    out = os.path.join(tmp, f"{impl}-{config}-{ranks}x{threads}-{variant}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--config", config,
           "--threads", str(threads), "--batch", str(batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--out", out, "--micro-batches", str(args.micro_batches)]
    if impl == "distgpt":
        cmd += ["--reduce", args.reduce, "--zero" if args.zero else "--no-zero"]
        cmd += ["--precision", variant]
        cmd += ["--no-overlap"] * args.no_overlap + ["--profile"] * args.profile
        cmd += ["--grad-wire", args.grad_wire, "--comm-thread" if args.comm_thread else "--no-comm-thread"]
        cmd += [f"--set={kv}" for kv in args.set]
    env = dict(os.environ)
    if impl == "torch":
        cmd += ["--torch-mode", variant]
        env["OMP_NUM_THREADS"] = str(threads)
    if ranks > 1:
        mpirun = mpirun_path()
        if mpirun is None:
            return {"error": "mpirun not found (pip install mpich, or put it on PATH)"}
        cmd = [mpirun, "-n", str(ranks), "-bind-to", f"core:{threads}"] + cmd
    load = OtherLoad()
    load.start()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    info = {"wall_s": time.perf_counter() - load.t0, "other_load": load.cores()}
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"error": f"exit code {proc.returncode}\n{tail}", **info}
    with open(out) as f:
        return {**json.load(f), **info}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}"


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned first column, the others right-aligned; a rule under the header row."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]

    def line(row):
        cells = zip(row, widths, strict=True)
        return "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(cells))

    return [line(rows[0]), line(tuple("-" * w for w in widths)), *map(line, rows[1:])]


def best_vs_llmc(runs: list[dict]) -> dict | None:
    """The fastest distgpt row against the llm.c row, if both ran."""
    ok = [r for r in runs if "error" not in r]
    llmc = next((r for r in ok if r["impl"] == "llm.c"), None)
    dist_rows = [r for r in ok if r["impl"] == "distgpt"]
    if llmc is None or not dist_rows:
        return None
    best = max(dist_rows, key=lambda r: r["tokens_per_s"])
    return {"distgpt": best["label"], "llmc": llmc["label"],
            "ratio": best["tokens_per_s"] / llmc["tokens_per_s"]}


def config_table(name: str, shape: Shape, runs: list[dict], steps: int, warmup: int) -> str:
    ok = [r for r in runs if "error" not in r]
    head = f"== {name}: L{shape.n_layer} C{shape.n_embd} H{shape.n_head} T{shape.seq_len} B{shape.batch}"
    if ok:
        head += f", {ok[0]['n_params'] / 1e6:.1f}M params, {ok[0]['flops_per_token'] / 1e6:.0f} MFLOP/token"
    head += f"; median of {steps} steps after {warmup} warmup"
    llmc = next((r for r in runs if r["impl"] == "llm.c"), None)
    if llmc is not None and "error" not in llmc and (llmc["steps"], llmc["warmup"]) != (steps, warmup):
        head += f" (llm.c: {llmc['steps']} after {llmc['warmup']})"
    rows = [("layout", "tok/s", "ms/step", "MFU", "peak GF/s", "fwd%", "bwd%", "wait%", "comm%", "opt%",
             "RSS MiB", "other load", "vs best torch", "vs fp32")
            + (("vs llm.c",) if llmc is not None else ())]
    torch_ok = [r for r in ok if r["impl"] == "torch"]
    best_torch = max(torch_ok, key=lambda r: r["tokens_per_s"]) if torch_ok else None
    for r in runs:
        if "error" in r:
            rows.append((r["label"], "failed: " + r["error"].splitlines()[0], *[""] * (len(rows[0]) - 2)))
            continue
        ratio = ""
        if r["impl"] == "distgpt" and best_torch is not None:
            ratio = f"{r['tokens_per_s'] / best_torch['tokens_per_s']:.2f}x"
        fp32 = next((q for q in ok if q["impl"] == "distgpt" and q.get("precision") == "fp32"
                     and (q["ranks"], q["threads"]) == (r["ranks"], r["threads"])), None)
        vs_fp32 = ""
        if r["impl"] == "distgpt" and r.get("precision") == "bf16" and fp32 is not None:
            vs_fp32 = f"{r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x"
        vs_llmc = ()
        if llmc is not None:
            good = r["impl"] == "distgpt" and "error" not in llmc
            vs_llmc = (f"{r['tokens_per_s'] / llmc['tokens_per_s']:.2f}x" if good else "",)
        load = r.get("other_load")
        split = r["split"]
        rows.append((
            r["label"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['ms_per_step']:,.0f}",
            f"{100 * r['mfu']:.1f}%",
            f"{r['peak_flops'] / 1e9:.0f}",
            pct(split.get("forward")),
            pct(split.get("backward")),
            pct(split.get("wait")),
            pct(split.get("comm")),
            pct(split.get("optim")),
            "/".join(f"{v:,.0f}" for v in r["rss_mib"]),
            "?" if load is None else f"{load:.2f}" + (" !" if load > 0.2 else ""),
            ratio,
            vs_fp32,
            *vs_llmc,
        ))
    lines = [head, *format_table(rows)]
    for r in ok:
        if r.get("sync") == "diloco":     # the median leaves the syncs out; whole cycles' mean does not
            syncs, cycles = r["outer_ms"], len(r["step_ms"]) // r["inner_steps"]
            lines.append(f"{r['label']}: DiLoCo H={r['inner_steps']}, outer wire {r['diloco_wire']}: "
                         f"{r['mean_ms_per_step']:,.0f} ms/step mean over {cycles} whole cycle(s), "
                         f"{len(syncs)} sync(s) of {sum(syncs) / max(1, len(syncs)):,.0f} ms")
    if best_torch is not None:
        lines.append(f"fastest torch mode: {best_torch['label']}")
    compiled = [r for r in torch_ok if r.get("mode", "").startswith("compile")]
    if compiled:
        lines.append("torch.compile's first step (compiling, untimed): "
                     + ", ".join(f"{r['mode']} {r['first_step_s']:.0f} s" for r in compiled))
    best = best_vs_llmc(runs)
    if best is not None:
        lines.append(f"fastest distgpt row ({best['distgpt']}) / {best['llmc']}: {best['ratio']:.2f}x")
    return "\n".join(lines)


def run_job(config: str, impl: str, label: str, wait: float, run) -> dict:
    """Announce a run, wait for the machine to go idle (--wait-idle), run it, print its speed."""
    print(f"[{config}] {impl} {label} ...", end=" ", flush=True)
    if wait:
        wait_idle(wait)
    res = {"impl": impl, "label": label, **run()}
    if "error" in res:
        print(f"FAILED ({res['error']})", flush=True)
    else:
        print(f"{res['tokens_per_s']:,.0f} tok/s, loss {res['losses'][0]:.3f} -> "
              f"{res['losses'][-1]:.3f} ({res['wall_s']:.0f} s)", flush=True)
    return res


def drive(args) -> int:
    configs = args.config.split(",")
    for name in configs:
        if name not in CONFIGS:
            raise SystemExit(f"--config: unknown {name!r}; choose from {', '.join(CONFIGS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    layouts = parse_layouts(args.layouts or (f"1x{cores},{cores}x1" if cores > 1 else "1x1"))
    precisions = args.precision.split(",")
    for item in precisions + (args.torch_modes.split(",") if args.vs_torch else []):
        if item not in ("fp32", "bf16", "auto", *TORCH_MODES):
            raise SystemExit(f"--precision/--torch-modes: unknown {item!r}")
    results, tables, notes, raised_batch = {}, [], [], False
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for name in configs:
            shape = CONFIGS[name]
            cargs = argparse.Namespace(**vars(args))
            cargs.steps = shape.steps if args.steps is None else args.steps
            cargs.warmup = shape.warmup if args.warmup is None else args.warmup
            runs = []
            for ranks, threads in layouts:
                batch = args.batch or shape.batch
                if batch % ranks:  # e.g. B1 over 2 ranks: every rank gets one sequence instead
                    batch = ranks * -(-batch // ranks)
                    raised_batch = True
                suffix = f" B{batch}*" if batch != shape.batch else ""
                if ranks * threads > cores:
                    print(f"warning: layout {ranks}x{threads} oversubscribes {cores} cores", flush=True)
                for precision in precisions:
                    label = f"{ranks}x{threads} {precision}{suffix}"
                    runs.append(run_job(name, "distgpt", label, args.wait_idle,
                                        partial(run_worker, "distgpt", name, ranks, threads, batch,
                                                precision, cargs, tmp)))
            if args.vs_torch:
                threads = max(r * t for r, t in layouts)
                batch = args.batch or shape.batch
                for mode in args.torch_modes.split(","):
                    runs.append(run_job(name, "torch", f"torch {threads}t {mode}", args.wait_idle,
                                        partial(run_worker, "torch", name, 1, threads, batch, mode,
                                                cargs, tmp)))
            results[name] = {"shape": asdict(shape), "steps": cargs.steps, "warmup": cargs.warmup,
                             "runs": runs}
            if args.vs_llmc:
                skip = llmc_skip_reason(shape)
                if skip is not None:
                    notes.append(f"llm.c: skipped {name} ({skip})")
                    results[name]["llmc_skipped"] = skip
                else:
                    batch = args.batch or shape.batch
                    threads = max(r * t for r, t in layouts)  # the cores the layouts used
                    suffix = f" B{batch}*" if batch != shape.batch else ""
                    run = partial(run_llmc, args.vs_llmc, shape, batch, threads, cargs.steps,
                                  max(cargs.warmup, LLMC_MIN_WARMUP))
                    runs.append(run_job(name, "llm.c", f"llm.c {threads}t{suffix}", args.wait_idle, run))
                    results[name]["vs_llmc"] = best_vs_llmc(runs)
            tables.append(config_table(name, shape, runs, cargs.steps, cargs.warmup))

    all_runs = [r for c in results.values() for r in c["runs"] if "error" not in r]
    if raised_batch:
        notes.append("* global batch raised to a multiple of the ranks: the config's batch does not split")
    if any((r.get("other_load") or 0) > 0.2 for r in all_runs):
        notes.append("! other processes kept cores busy during this run: its numbers are disturbed")
    if args.profile:
        notes.append("distgpt timings include cProfile overhead on rank 0 (--profile)")
    dist_runs = [r for r in all_runs if r["impl"] == "distgpt"]
    if dist_runs:
        mpi = next((r["mpi"] for r in dist_runs if r["ranks"] > 1), None)
        notes.append(f"BLAS: {dist_runs[0]['blas']}; distgpt's matmuls: {dist_runs[0].get('matmuls', '?')}"
                     + (f"; MPI: {' '.join(mpi.split())}" if mpi else ""))
    torch_runs = [r for r in all_runs if r["impl"] == "torch"]
    if torch_runs:
        notes.append(f"torch {torch_runs[0]['torch']}")
    llmc_runs = [r for r in all_runs if r["impl"] == "llm.c"]
    if llmc_runs:
        notes.append(f"llm.c: {llmc_runs[0]['build']}/train_gpt2 on tiny shakespeare, ms/step from its own "
                     f"per-step timer, at least {LLMC_MIN_WARMUP} warmup steps")
    print()
    print("\n\n".join(tables))
    print("\n".join(notes))
    for name, res in results.items():
        for r in res["runs"]:
            if r.get("profile"):
                print(f"\n-- profile: {name} {r['label']} (rank 0, timed steps, top 25 by tottime)")
                print(r["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "configs": results}, indent=1))
        print(f"results saved to {args.json}")
    return 0 if all("error" not in r for c in results.values() for r in c["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small",
                        help=f"shape(s), comma-separated: {', '.join(CONFIGS)} (default small)")
    parser.add_argument("--steps", type=int, help="timed steps (default: per config, see CONFIGS)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: per config)")
    parser.add_argument("--layouts", help="RANKSxTHREADS,... (default 1xCORES,CORESx1)")
    parser.add_argument("--batch", type=int, help="override the config's global batch (sequences per step)")
    parser.add_argument("--micro-batches", type=int, default=1, metavar="K",
                        help="distgpt: gradient accumulation, K micro-batches per rank and step (default 1)")
    parser.add_argument("--vs-torch", action="store_true", help="run the PyTorch reference after each layout")
    parser.add_argument("--vs-llmc", metavar="BUILD_DIR",
                        help="after the layouts of a GPT-2 124M config, run llm.c's CPU trainer built by "
                             "benchmarks/build_llmc.sh in BUILD_DIR")
    parser.add_argument("--zero", action=argparse.BooleanOptionalAction, default=True,
                        help="ZeRO-1: shard AdamW state and update across ranks (default on, as in "
                             "distgpt.train; --no-zero: replicated)")
    parser.add_argument("--reduce", choices=("auto", "shared_memory", "mpi"), default="auto",
                        help="gradient sum across ranks (parallel.reduce; default auto: shared memory "
                             "on one node)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="mpi reduce: reduce gradients after backward, not during it")
    parser.add_argument("--grad-wire", choices=("fp32", "bf16"), default="fp32",
                        help="mpi reduce: parallel.grad_wire, gradients on the network in fp32 or bf16")
    parser.add_argument("--comm-thread", action=argparse.BooleanOptionalAction, default=True,
                        help="mpi reduce: parallel.comm_thread (default on)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile rank 0's timed steps, print the top 25 functions")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for other processes to leave the cores")
    parser.add_argument("--json", help="save every result to this file")
    parser.add_argument("--precision", default="fp32",
                        help="distgpt's train.precision, or several (fp32,bf16): each layout runs in each")
    parser.add_argument("--torch-modes", default=",".join(TORCH_MODES),
                        help=f"PyTorch modes for --vs-torch (default all: {','.join(TORCH_MODES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="distgpt: a config override, as distgpt.train takes them (repeatable), e.g. "
                             "parallel.sync=diloco; with diloco, --warmup and --steps must be whole cycles")
    parser.add_argument("--torch-mode", choices=TORCH_MODES, help=argparse.SUPPRESS)
    # worker mode (started by the driver)
    parser.add_argument("--worker", choices=("distgpt", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "batch", "micro_batches"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} {value}: too small")
    if args.set and args.worker is None:         # the workers' configs: checked once, here, on one line
        try:
            cfg = with_overrides(Config(), args.set)
        except ConfigError as e:
            parser.error(str(e))
        for name in args.config.split(","):
            shape = CONFIGS.get(name)
            steps = shape.steps if shape and args.steps is None else args.steps
            warmup = shape.warmup if shape and args.warmup is None else args.warmup
            problem = shape and whole_cycles_problem(cfg, warmup, steps)
            if problem:
                parser.error(f"--config {name}: {problem}")
    if args.vs_llmc and not os.access(os.path.join(args.vs_llmc, "train_gpt2"), os.X_OK):
        parser.error(f"--vs-llmc {args.vs_llmc}: no train_gpt2 there; build it with "
                     f"benchmarks/build_llmc.sh {args.vs_llmc}")
    if args.worker == "distgpt":
        distgpt_worker(args)
        return 0
    if args.worker == "torch":
        torch_worker(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
