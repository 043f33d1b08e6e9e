"""Training entry point: `[mpirun -n N] python -m distgpt.train --config configs/X.yaml [key=value ...]`.

One optimizer step, on every rank:
  for each of this rank's micro-batches of the global batch (fixed by seed and step):
      forward + backward, gradients accumulate in the flat buffer (the first one overwrites it)
  sum the gradients across ranks: through shared memory on one node, else MPI buckets reduced
      while the last backward goes on; clip by the global norm; AdamW on this rank's slice (the
      whole vector when replicated); ZeRO-1 then gathers the updated parameters (on one node
      they are a single shared copy, and gathering is a barrier)
  log (rank 0), evaluate, checkpoint, and stop cleanly if any rank was signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distgpt import bf16, blas, dist, fileio, jit
from distgpt import threads as kernel_threads
from distgpt.config import Config, ConfigError, ModelConfig, check_batch_layout, load_config, user_model_keys
from distgpt.model import GPT, Layout, activation_bytes, init_params
from distgpt.optim import AdamW, clip_coefficient, lr_at
from distgpt.partition import Partition
from distgpt.progress import Progress


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input or machine (a full disk): one line, exit code 2."""
    from distgpt.checkpoint import CheckpointError
    from distgpt.data import DataError
    from distgpt.weights import WeightsError

    return (ConfigError, DataError, CheckpointError, WeightsError, blas.BlasError, fileio.DiskFullError)


# ----------------------------------------------------------------------------- summary

def flops_per_token(mcfg: ModelConfig, seq_len: int, n_params: int) -> int:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) + 12 L T C for attention."""
    return 6 * n_params + 12 * mcfg.n_layer * seq_len * mcfg.n_embd


def summary(cfg: Config, world: int, accum: int, precision: str = "fp32") -> list[str]:
    m, t = cfg.model, cfg.train
    layout = Layout(m)
    n = layout.n_params()
    shard = (layout.size + world - 1) // world
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    moments = 2 * 4 * (shard if cfg.parallel.zero else layout.size)
    low = precision == "bf16"
    acts = activation_bytes(m, t.micro_batch_size, t.seq_len, low=low)
    copy16 = 2 * layout.size if low else 0                 # the bf16 copy of the weights
    total = 2 * 4 * layout.size + moments + acts + copy16
    return [
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
        f"vocab {m.vocab_size} (padded {m.padded_vocab}), attention {m.attention}, dropout {m.dropout}",
        f"parameters: {n:,} ({layout.size:,} in the flat buffer with padding)",
        f"FLOPs per token: {flops_per_token(m, t.seq_len, n):,} (6N + 12LTC)",
        f"batch: {t.batch_size} sequences x {t.seq_len} tokens = {t.batch_size * t.seq_len:,} tokens/step; "
        f"{world} ranks x {t.micro_batch_size} micro-batch x {accum} accumulation steps",
        f"optimizer: AdamW ({'compiled, numba' if jit.enabled() else 'NumPy ufuncs'}) "
        f"lr {t.lr} -> {t.min_lr}, warmup {t.warmup_steps}, {t.max_steps} steps, "
        f"wd {t.weight_decay}, clip {t.grad_clip}"
        + ("" if world == 1 else ", ZeRO-1" if cfg.parallel.zero else ", replicated"),
        f"matmuls: {blas.describe()}",
        f"memory per rank (estimate): params {mb(4 * layout.size)}, grads {mb(4 * layout.size)}, "
        f"AdamW moments {mb(moments)}, activations {mb(acts)}"
        + (f", bf16 weights {mb(copy16)}" if low else "") + f"; total {mb(total)}",
    ]


# ----------------------------------------------------------------------------- pieces of the run

class StopFlag:
    """Set by SIGTERM/SIGUSR1 (a scheduler's preemption warning); acted on at a step boundary."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def params_checksum(params: np.ndarray) -> int:
    return zlib.crc32(params.view(np.uint8))


def check_params_agree(comm: dist.Comm, params: np.ndarray, step: int) -> None:
    with comm.watch("parameter check", step):
        sums = comm.allgather_obj(params_checksum(params))
    if len(set(sums)) > 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"parameters differ across ranks at step {step}: ranks {bad} disagree with rank 0")


class Log:
    """Rank 0's output: log lines on stdout and, on a terminal, a live progress bar below them.
    Every other rank stays quiet."""

    def __init__(self, rank0: bool):
        self.rank0 = rank0
        self.bar: Progress | None = None

    def __call__(self, *lines: str) -> None:
        for line in lines if self.rank0 else ():
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def start_bar(self, total: int, initial: int) -> None:
        if self.rank0 and sys.stdout.isatty():
            self.bar = Progress(total, "train", unit="step", stream=sys.stdout, interval=None, live=True,
                                initial=initial, scale_units=False)

    def advance(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close(summary=False)
            self.bar = None


class Metrics:
    """metrics.jsonl on rank 0: one JSON object per logged step (floats round-trip exactly). A write
    that fails (a full disk) is one line naming the file, and leaves no half record behind."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is None:
            fileio.write_text_atomic(self.path, "")
        elif self.path.exists():
            # drop records past the checkpoint we resume from: they will be produced again
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            fileio.write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        fileio.append_line(self.file, json.dumps(record), self.path)


def evaluate(model: GPT, val, comm: dist.Comm, micro_batch_size: int, step: int = 0) -> float:
    """Mean loss over the fixed val set: token-loss sums and counts are summed over ranks, so the
    number is the same whatever the number of ranks."""
    acc = np.zeros(2, np.float64)
    for x, y in val.rank_windows(comm.rank, comm.size, micro_batch_size):
        acc[0] += model.loss(x, y) * x.size
        acc[1] += x.size
    with comm.watch("evaluation", step):
        comm.allreduce_(acc)
    return float(acc[0] / acc[1])


def initial_params(cfg: Config) -> tuple[Config, np.ndarray]:
    """The starting parameters (GPT-2 init, or pretrained weights) and the config they imply."""
    if cfg.init_from == "scratch":
        layout = Layout(cfg.model)
        params = np.zeros(layout.size, np.float32)
        init_params(layout, params, cfg.train.seed)
        return cfg, params
    from distgpt import weights

    mcfg, params = weights.load_init(cfg.init_from, cfg.model)
    weights.check_shape(user_model_keys(cfg), mcfg, cfg.init_from)
    return cfg.model_copy(update={"model": mcfg}), params


def sample_text(model: GPT, tokenizer, cfg: Config, step: int) -> str:
    from distgpt.sample import generate

    rng = np.random.default_rng([cfg.train.seed, step, 7])
    ids = generate(model, [tokenizer.eot], cfg.train.sample_tokens, temperature=0.8, top_k=50, rng=rng,
                   vocab_limit=tokenizer.vocab_size, eot=tokenizer.eot)
    text = tokenizer.decode(ids).replace("\n", "\n  | ")
    return f"sample at step {step}:\n  | {text}"


def with_injected_faults(step_fn: Callable, rank: int) -> Callable:
    """Test hook: DISTGPT_FAIL_AT="RANK:STEP" makes that rank raise when it starts that step, and
    "RANK:STEP:9" SIGKILLs it there. Without the variable, step_fn itself."""
    spec = os.environ.get("DISTGPT_FAIL_AT")
    if not spec:
        return step_fn
    fail_rank, fail_step, *how = (int(v) for v in spec.split(":"))

    def step_or_fail(step: int, *args):
        if (rank, step) == (fail_rank, fail_step):
            if how == [9]:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure (DISTGPT_FAIL_AT) at step {step}")
        return step_fn(step, *args)
    return step_or_fail


# ----------------------------------------------------------------------------- one optimizer step

@dataclass
class StepResult:
    loss: float              # mean over the global batch
    grad_norm: float         # before clipping
    lr: float
    stop_requested: bool     # some rank was signalled: every rank checkpoints and exits


class Trainer:
    """One optimizer step on this rank: the rank's micro-batches forward and backward, the gradient
    reduction (overlapped with the last backward), clipping, AdamW on this rank's slice, and the
    ZeRO-1 allgather. The training loop and the benchmark both drive it.

    The reducer decides where the flat buffers live (shared memory on one node), so the model is
    built on its buffers; the partition says which slice this rank sums, updates and checkpoints."""

    def __init__(self, cfg: Config, comm: dist.Comm, params: np.ndarray):
        t, layout = cfg.train, Layout(cfg.model)
        self.cfg, self.comm = cfg, comm
        self.precision = bf16.resolve(t.precision)        # "auto" -> bf16 where it is fast, else fp32
        zero = cfg.parallel.zero and comm.size > 1
        self.partition = Partition(layout.size, comm.size, comm.rank, zero)
        self.reducer = dist.make_reducer(comm, self.partition, layout.layer_ranges, params,
                                         int(cfg.parallel.bucket_mb * 2**20), cfg.parallel.reduce,
                                         cfg.parallel.grad_wire, cfg.parallel.comm_thread,
                                         (cfg.model.padded_vocab, cfg.model.n_embd))
        # bf16 with the parameters shared on one node (ZeRO-1): one shared bf16 copy of the
        # weights too, each rank converting the slice it updates (a node's ranks convert it once,
        # not once each)
        self.shared16 = None
        if self.precision == "bf16" and getattr(self.reducer, "shares_params", False):
            bufs, _ = comm.shared_buffers(layout.size, np.uint16, per_rank=False)
            self.shared16 = None if bufs is None else bufs[0]
        self.model = GPT(cfg.model, params=self.reducer.params, grads=self.reducer.grads,
                         precision=self.precision, params16=self.shared16)
        lo, hi = self.partition.updated
        self.opt = AdamW(hi - lo, layout.decay_segments(lo, hi), t.beta1, t.beta2, t.eps, t.weight_decay)
        self.overlap = (cfg.parallel.overlap and comm.size > 1
                        and isinstance(self.reducer, dist.GradReducer))
        self.timing = dict.fromkeys(("forward", "backward", "wait", "comm", "optim"), 0.0)

    def step(self, step: int, micro: list[tuple[np.ndarray, np.ndarray, int]], stop: int = 0) -> StepResult:
        """Train on `micro` (this rank's (x, y, first row) micro-batches of global step `step`);
        `stop` is this rank's stop signal (0: none), shared with the others in the step's allreduce."""
        cfg, comm, model, reducer, timing = self.cfg, self.comm, self.model, self.reducer, self.timing
        t = cfg.train
        scale = 1.0 / (len(micro) * comm.size)      # SUM-reduced gradients then average the batch
        dropout_seed = (t.seed, step) if cfg.model.dropout > 0 else None
        model.zero_grad()
        loss_sum = 0.0
        for i, (x, y, row0) in enumerate(micro):
            last = self.overlap and i == len(micro) - 1    # reduce while the last backward runs
            ta = time.perf_counter()
            fwd = model.forward(x, y, grad_scale=scale, dropout_seed=dropout_seed, row0=row0)
            tb = time.perf_counter()
            model.backward(fwd, hooks=reducer if last else None)
            loss_sum += fwd.loss
            timing["forward"] += tb - ta
            timing["backward"] += time.perf_counter() - tb
        tc = time.perf_counter()
        with comm.watch("gradient sum", step):      # phase names: what the watchdog reports
            reducer.finish()
        # waiting for the slowest rank to finish backward is load imbalance, not communication
        timing["wait"] += reducer.waited
        timing["comm"] += time.perf_counter() - tc - reducer.waited
        # one small allreduce carries the loss, the ZeRO norm pieces and any rank's stop signal
        partial = reducer.norm_is_partial
        stats = np.array([loss_sum, reducer.grad_sq_sum() if partial else 0.0, float(stop)])
        with comm.watch("step statistics", step):
            comm.allreduce_(stats)
        grad_norm = float(np.sqrt(stats[1] if partial else reducer.grad_sq_sum()))
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        td = time.perf_counter()
        lo, hi = self.partition.updated
        clip = clip_coefficient(grad_norm, t.grad_clip)
        self.opt.step(model.params[lo:hi], reducer.updated_grads, lr, clip)
        if self.shared16 is not None:               # bf16, shared: this rank's slice of the copy
            model.convert_weights16(lo, hi)
        if self.partition.zero:
            with comm.watch("parameter gather", step):
                reducer.allgather_params()          # (shared: the barrier after which all is converted)
        self._weights_updated(converted=True)
        timing["optim"] += time.perf_counter() - td
        return StepResult(float(stats[0] * scale), grad_norm, lr, bool(stats[2]))

    def broadcast_params(self) -> None:
        """Rank 0's parameters on every rank (the start of a run)."""
        self.reducer.broadcast_params()
        self._weights_updated()

    def _weights_updated(self, converted: bool = False) -> None:
        """The parameters changed: the bf16 copies are remade. A shared copy is converted here, a
        slice per rank (unless the caller has `converted` its slice), then a barrier; a rank's own
        copy on its next pass."""
        if self.shared16 is None:
            self.model.weights_changed()
            return
        if not converted:
            self.model.convert_weights16(*self.partition.updated)
            self.comm.shared_barrier()
        self.model.weights16_current()

    def load_state(self, params: np.ndarray, m: np.ndarray, v: np.ndarray, opt_t: int) -> None:
        """This rank's owned slices from a checkpoint -> full parameters, and moments where kept."""
        a, b = self.partition.owned
        self.model.params[a:b] = params
        self.reducer.allgather_params()
        self._weights_updated()
        opt = self.opt
        if self.partition.zero:
            opt.m[:], opt.v[:] = m, v
        else:
            opt.m[a:b], opt.v[a:b] = m, v
            self.comm.allgatherv_(opt.m, self.partition.ranges)
            self.comm.allgatherv_(opt.v, self.partition.ranges)
        opt.t = opt_t

    def state_slices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """params, m, v of this rank's owned slice (its checkpoint shard)."""
        a, b = self.partition.owned
        if self.partition.zero:
            return self.model.params[a:b], self.opt.m, self.opt.v
        return self.model.params[a:b], self.opt.m[a:b], self.opt.v[a:b]


class Checkpoints:
    """Saving and resuming the whole training state: parameters and moments (the trainer's shards),
    the step, tokens seen and the loader's position."""

    def __init__(self, cfg: Config, comm: dist.Comm, trainer: Trainer, loader, tokenizer: str | None,
                 log: Log):
        self.cfg, self.comm, self.trainer, self.loader, self.tokenizer, self.log = (
            cfg, comm, trainer, loader, tokenizer, log)
        self.out_dir = Path(cfg.out_dir)
        self.last_step = -1          # the step of the newest checkpoint this run wrote or resumed

    def resume(self) -> tuple[int, int] | None:
        """Load the checkpoint `resume` names (if any): (step, tokens seen), or None to start fresh."""
        from distgpt import checkpoint

        if not self.cfg.resume:
            return None
        path = checkpoint.resolve_resume(self.out_dir, self.cfg.resume, self.comm)
        if path is None:
            return None
        layout = self.trainer.model.layout
        params, m, v, manifest = checkpoint.load_checkpoint(path, self.comm, layout, self.trainer.partition)
        meta = manifest["meta"]
        saved_tok = meta.get("tokenizer")
        if saved_tok and self.tokenizer and saved_tok != self.tokenizer:
            raise checkpoint.CheckpointError(
                f"{path}: saved with tokenizer {saved_tok}, the data uses {self.tokenizer}")
        self.trainer.load_state(params, m, v, meta["opt_t"])
        self.loader.load_state_dict(meta["loader"])
        self.last_step = meta["step"]
        self.log(f"resumed from {path} at step {meta['step']}")
        return meta["step"], meta["tokens_seen"]

    def save(self, step: int, tokens_seen: int) -> None:
        from distgpt import checkpoint

        t = self.cfg.train
        meta = {"config": self.cfg.to_dict(), "step": step, "tokens_seen": tokens_seen,
                "opt_t": self.trainer.opt.t, "loader": self.loader.state_dict(), "tokenizer": self.tokenizer,
                "precision": self.trainer.precision,
                "rng": {"kind": "counter-based: dropout masks from (seed, step, global row)", "seed": t.seed}}
        with self.comm.watch("checkpoint save", step):
            path = checkpoint.save_checkpoint(self.out_dir, step, self.comm, self.trainer.model.layout,
                                              self.trainer.partition, *self.trainer.state_slices(), meta,
                                              self.cfg.checkpoint.keep)
        self.last_step = step
        self.log(f"checkpoint: {path}")


def open_data(cfg: Config, comm: dist.Comm):
    """(train loader, val set or None, tokenizer name) for this rank."""
    from distgpt import data

    t = cfg.train
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: expected a glob of token shard files (see distgpt.prepare)")
    shards = data.open_shards(cfg.data.train, cfg.model.vocab_size, cfg.data.tokenizer, what="data.train")
    loader = data.TrainLoader(shards, t.seq_len, t.batch_size, t.micro_batch_size, comm.rank, comm.size,
                              t.seed)
    val = None
    if cfg.data.val:
        val_shards = data.open_shards(cfg.data.val, cfg.model.vocab_size, cfg.data.tokenizer, what="data.val")
        val = data.ValSet(val_shards, t.seq_len, t.eval_steps * t.batch_size)
    return loader, val, cfg.data.tokenizer or shards.tokenizer


def header(cfg: Config, comm: dist.Comm, trainer: Trainer, accum: int, threads) -> list[str]:
    lines = summary(cfg, comm.size, accum, trainer.precision) + [
        f"ranks: {comm.size} on {comm.n_nodes} node(s), {comm.local_size} per node; "
        f"threads per rank: {threads.threads}; BLAS: {threads.blas}; MPI: {comm.library}",
        bf16.describe(trainer.precision)
        + ("; bf16 weights: one copy per node, each rank converting its slice" if trainer.shared16 is not None
           else "")]
    if comm.size > 1:
        lines.append(f"gradient sum: {trainer.reducer.describe()}"
                     f"{', overlapped with backward' if trainer.overlap else ''}")
    if threads.oversubscribed:
        lines.append(f"warning: {comm.local_size} ranks x {threads.threads} threads exceed this node's "
                     f"{os.cpu_count()} cores: expect slowdowns (set parallel.threads_per_rank)")
    return lines


# ----------------------------------------------------------------------------- the run

def run(cfg: Config, comm: dist.Comm, dry_run: bool = False) -> None:
    t = cfg.train
    log = Log(comm.rank == 0)
    threads = kernel_threads.setup(comm.local_size, cfg.parallel.threads_per_rank)
    blas.describe()                    # a bad DISTGPT_BLAS fails here, on every rank alike
    accum = check_batch_layout(cfg, comm.size)
    if dry_run:
        log(*summary(cfg, comm.size, accum), json.dumps(cfg.to_dict(), indent=2))
        return

    # set up: weights, data, the trainer on this rank's buffers
    cfg, params = initial_params(cfg)
    loader, val, tokenizer_name = open_data(cfg, comm)
    trainer = Trainer(cfg, comm, params)
    model = trainer.model
    del params
    out_dir = Path(cfg.out_dir)
    if comm.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    log(*header(cfg, comm, trainer, accum, threads))

    # resume, or start every rank from rank 0's parameters
    checkpoints = Checkpoints(cfg, comm, trainer, loader, tokenizer_name, log)
    comm.start_watchdog(cfg.parallel.timeout_s, out_dir / ".watchdog")   # collectives from here on
    with comm.watch("checkpoint load", None):
        resumed = checkpoints.resume()
    step, tokens_seen = resumed or (0, 0)
    if resumed is None:
        with comm.watch("parameter broadcast", 0):
            trainer.broadcast_params()
    check_params_agree(comm, model.params, step)
    metrics = Metrics(out_dir, step if resumed else None) if comm.rank == 0 else None
    sampler = None
    if t.sample_every and tokenizer_name and comm.rank == 0:
        from distgpt.data import get_tokenizer
        sampler = get_tokenizer(tokenizer_name)
    stop = StopFlag()
    train_step = with_injected_faults(trainer.step, comm.rank)
    tokens_per_step = t.batch_size * t.seq_len

    # the loop: curves start at the initial loss (step 0), as in nanoGPT and llm.c
    if val is not None and step == 0:
        val_loss = evaluate(model, val, comm, t.micro_batch_size)
        log(f"step {0:6d} | val loss {val_loss:.4f}")
        if metrics is not None:
            metrics.write({"step": 0, "val_loss": val_loss, "tokens": 0, "time_s": 0.0})
    log.start_bar(t.max_steps, step)
    t_run = time.perf_counter()
    while step < t.max_steps:
        t0 = time.perf_counter()
        result = train_step(step, loader.micro_batches(step), stop.signum)
        step += 1
        loader.step = step
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        if not np.isfinite(result.loss):
            raise FloatingPointError(f"loss is {result.loss} at step {step}: "
                                     "lower train.lr or check the data")

        record = {"step": step, "train_loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": tokens_per_step / dt, "ms_per_step": dt * 1000, "tokens": tokens_seen,
                  "time_s": time.perf_counter() - t_run}
        logged = step % t.log_every == 0 or step == t.max_steps or step == 1
        if logged:
            log(f"step {step:6d}/{t.max_steps} | loss {result.loss:.4f} | lr {result.lr:.2e} | "
                f"grad norm {result.grad_norm:.3f} | {dt * 1000:8.1f} ms/step | "
                f"{tokens_per_step / dt:9.0f} tok/s")
        evaluated = val is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps)
        if evaluated:
            record["val_loss"] = evaluate(model, val, comm, t.micro_batch_size, step)
            log(f"step {step:6d} | val loss {record['val_loss']:.4f}")
        log.advance(result.loss, tokens_per_step / dt)
        if (logged or evaluated) and metrics is not None:
            metrics.write(record)
        if sampler is not None and step % t.sample_every == 0:
            log(sample_text(model, sampler, cfg, step))
        if cfg.parallel.check_every and step % cfg.parallel.check_every == 0:
            check_params_agree(comm, model.params, step)
        if result.stop_requested:
            log.close()
            log(f"signal received: checkpointing at step {step} and exiting")
            checkpoints.save(step, tokens_seen)
            return
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            checkpoints.save(step, tokens_seen)
    log.close()
    if checkpoints.last_step != step:
        checkpoints.save(step, tokens_seen)
    total = sum(trainer.timing.values())
    if total > 0:
        log("time split: " + ", ".join(f"{k} {v / total:.1%}" for k, v in trainer.timing.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distgpt.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and estimates, then exit")
    parser.add_argument("--resume", help="auto | path of a checkpoint (same as resume=...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])

    comm = dist.init()
    try:
        run(load_config(args.config, overrides), comm, args.dry_run)
        return 0
    except Exception as exc:  # every failure ends the whole job, never leaves ranks waiting
        user = isinstance(exc, _user_errors())
        where = f"rank {comm.rank}: " if comm.size > 1 else ""
        if isinstance(exc, ConfigError):
            if comm.rank == 0:
                print(f"distgpt.train: error: {exc}", file=sys.stderr, flush=True)
        elif user:
            print(f"distgpt.train: error: {where}{exc}", file=sys.stderr, flush=True)
        else:
            print(f"distgpt.train: {where}failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            traceback.print_exc()
        code = 2 if user else 1
        # a config error happens identically on every rank before any rank-specific work, so all
        # of them return; anything else may be one rank's alone and must take the others down
        if comm.size > 1 and not isinstance(exc, ConfigError):
            comm.abort(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
