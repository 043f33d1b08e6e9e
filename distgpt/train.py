"""Training entry point: `[mpirun -n N] python -m distgpt.train --config configs/X.yaml [key=value ...]`.

run() reads top to bottom: check everything that can be checked (config, switches, data, out_dir),
build the trainer (distgpt/trainer.py: one optimizer step on every rank), resume or broadcast the
starting parameters, then loop: step, log (rank 0), evaluate, checkpoint, and stop cleanly at a step
boundary when any rank was signalled: SIGTERM/SIGUSR1 (a scheduler's preemption warning) or Ctrl-C
write a checkpoint first; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distgpt import bf16, blas, diloco, dist, fileio, jit, switches
from distgpt import threads as kernel_threads
from distgpt.checkpoint import (
    METRICS,
    Checkpointer,
    ResumeRefused,
    RunComplete,
    existing_run,
    plan_resume,
    remove_run,
    resume_source,
)
from distgpt.cli import add_version, prog_name
from distgpt.config import (
    Config,
    ConfigError,
    TrainConfig,
    check_batch_layout,
    describe_keys,
    load_config,
)
from distgpt.model import GPT, Layout, activation_bytes, dropout_mask_bytes, workspace_bytes
from distgpt.optim import lr_at
from distgpt.progress import Progress
from distgpt.trainer import (
    BaseLoadError,
    StepResult,
    Trainer,
    TrainingState,
    flops_per_token,
    initial_adapters,
    initial_params,
    lora_layout,
    open_base,
)

TOOL = "distgpt.train"
INTERRUPTED_EXIT = dist.INTERRUPT_EXIT      # 130: as a shell reports a Ctrl-C'd command


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input or machine (a full disk): one line, exit code 2."""
    from distgpt.checkpoint import CheckpointError
    from distgpt.data import DataError
    from distgpt.weights import WeightsError

    return (ConfigError, DataError, CheckpointError, WeightsError, blas.BlasError, fileio.DiskFullError,
            switches.SwitchError, OutDirError, BaseLoadError)


class OutDirError(ValueError):
    """out_dir cannot take this run (not a folder, not writable, holds another run)."""


# ----------------------------------------------------------------------------- summary

# What a rank's process holds before its model: the interpreter, NumPy, MPI, the BLAS and bf16
# libraries and the compiled kernels (measured: 160-175 MiB resident on Linux x86-64, about 100 of
# them shared library pages). Counted whole per rank: a little high for several ranks on a node.
RUNTIME_BYTES = 160 * 2**20


def recompute_note(t: TrainConfig, n_layer: int) -> str:
    """How the header's activations are kept: "", " (recompute block)", or with the kept blocks."""
    if t.recompute == "none":
        return ""
    kept = min(t.recompute_keep, n_layer - 1)
    return f" (recompute {t.recompute}" + (f", the last {kept} blocks kept)" if kept else ")")


def summary(cfg: Config, world: int, accum: int, precision: str = "fp32", n_nodes: int = 1) -> list[str]:
    m, t = cfg.model, cfg.train
    layout = Layout(m)
    n = layout.n_params()
    diloco_run = cfg.parallel.sync == "diloco"
    group = world // n_nodes if diloco_run else world       # the ranks that share the optimizer state
    zero = cfg.parallel.zero_for(n_nodes) and group > 1
    lora = lora_layout(cfg)
    trained = layout.size if lora is None else lora.size    # the trainable flat vector
    shard = (trained + group - 1) // group
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    moments = 2 * 4 * (shard if zero else trained)
    outer = 3 * 4 * shard if diloco_run else 0     # DiLoCo: global parameters, momentum, pseudo-gradient
    low = precision == "bf16"
    lora_kw = {} if lora is None else {"lora_rank": lora.rank, "lora_dropout": lora.dropout > 0}
    acts = activation_bytes(m, t.micro_batch_size, t.seq_len, precision=precision, recompute=t.recompute,
                            recompute_keep=t.recompute_keep,
                            **lora_kw)
    masks = dropout_mask_bytes(m, t.micro_batch_size, t.seq_len)
    scratch = workspace_bytes(m, t.micro_batch_size, t.seq_len, precision)
    lines = [
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
        f"vocab {m.vocab_size} (padded {m.padded_vocab}), attention {m.attention}, dropout {m.dropout}",
        f"parameters: {n:,} ({layout.size:,} in the flat buffer with padding)"]
    if lora is None:
        lines.append(f"FLOPs per token: {flops_per_token(m, t.seq_len, n):,} (6N + 12LTC)")
    else:
        lines += [
            f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g}), dropout {lora.dropout:g} "
            f"on {', '.join(lora.targets)}: {lora.size:,} trainable parameters ({lora.size / n:.2%} of "
            f"{n:,}); the frozen base from {cfg.init_from}",
            # the frozen base: forward and input gradients (4N), no weight gradients; the adapters 6 x theirs
            f"FLOPs per token: {4 * n + 6 * lora.size + 12 * m.n_layer * t.seq_len * m.n_embd:,} "
            "(4N for the frozen base + 6 x the adapters + 12LTC)"]
    lines += [
        f"batch: {t.batch_size} sequences x {t.seq_len} tokens = {t.batch_size * t.seq_len:,} tokens/step; "
        f"{world} ranks x {t.micro_batch_size} micro-batch x {accum} accumulation steps",
        f"optimizer: AdamW ({'compiled, numba' if jit.enabled() else 'NumPy ufuncs'}) "
        f"{'on the adapters, ' if lora is not None else ''}"
        f"lr {t.lr} -> {t.min_lr}, warmup {t.warmup_steps}, {t.max_steps} steps, "
        f"wd {t.weight_decay}, clip {t.grad_clip}"
        + ("" if group == 1 else ", ZeRO-1" if zero else ", replicated")
        + (" within each host" if diloco_run and group > 1 else ""),
        f"matmuls: {blas.describe()}"]
    if lora is None:        # bf16: the copy of the matmul weights
        held, extra = ("params", layout.size), ("bf16 weights", 2 * layout.size if low else 0)
    else:                   # a base held in bf16 keeps float32 copies of what no matmul reads
        held = ("adapters", lora.size)
        extra = ("float32 LayerNorms/biases/wpe", 4 * layout.float32_small_size() if low else 0)
    shown = [f"{held[0]} {mb(4 * held[1])}", f"grads {mb(4 * held[1])}", f"AdamW moments {mb(moments)}",
             f"activations {mb(acts)}" + recompute_note(t, m.n_layer)]
    optional = (("bf16 kernel scratch", scratch), ("dropout masks", masks), extra,
                ("DiLoCo outer state", outer), ("runtime", RUNTIME_BYTES))
    shown += [f"{name} {mb(b)}" for name, b in optional if b]
    total = 2 * 4 * held[1] + moments + acts + scratch + masks + extra[1] + outer + RUNTIME_BYTES
    line = f"memory per rank (estimate): {', '.join(shown)}; total {mb(total)}"
    if lora is not None:
        per_node = world // n_nodes
        base = (2 if low else 4) * layout.size                  # one copy per node, shared by its ranks
        line += (f"; the frozen base {mb(base)} per node ({'bf16' if low else 'fp32'}, one copy shared by "
                 f"the node's ranks); per node with {per_node} rank(s): {mb(base + per_node * total)}")
    lines.append(line)
    return lines


# ----------------------------------------------------------------------------- pieces of the run

class StopFlag:
    """Signals that stop the run at the next step boundary with a checkpoint: the stop signals
    (SIGTERM/SIGUSR1: a scheduler's preemption warning) and Ctrl-C (SIGINT). A second Ctrl-C exits
    at once without a traceback: nothing half-written is ever read (checkpoints are published by a
    rename), and resume takes the newest complete checkpoint. mpirun forwards a Ctrl-C to every rank."""

    def __init__(self, rank0: bool):
        self.signum = 0
        self.interrupted = False
        self.rank0 = rank0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (*dist.STOP_SIGNALS, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler that lands inside a print to the same stream would make
        # Python's buffered writer raise instead of exiting
        if signum == signal.SIGINT:
            if self.interrupted:
                if self.rank0:
                    os.write(2, f"{TOOL}: interrupted again: exiting now without a checkpoint\n".encode())
                os._exit(INTERRUPTED_EXIT)
            self.interrupted = True
            if self.rank0:
                os.write(2, f"{TOOL}: interrupted: stopping at the end of this step with a checkpoint "
                            "(Ctrl-C again to exit at once)\n".encode())
        self.signum = signum

    def pending(self) -> tuple[bool, bool]:
        """(asked to stop, by Ctrl-C): what this rank brings to the step's allreduce."""
        return self.signum != 0, self.interrupted

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
        self.path = out_dir / METRICS
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


def evaluate(model: GPT, val, comm: dist.Comm, micro_batch_size: int, step: int = 0,
             group: dist.Comm | None = None) -> float:
    """Mean loss over the fixed val set: token-loss sums and counts are summed over ranks, so the
    number is the same whatever the number of ranks. With `group` (a DiLoCo host), each host's ranks
    split the whole set among them and the sums run over every host: the mean of the hosts' models'
    losses (one model's right after an outer sync, when they all hold the same parameters)."""
    acc = np.zeros(2, np.float64)
    split = group or comm
    for x, y in val.rank_windows(split.rank, split.size, micro_batch_size):
        acc[0] += model.loss(x, y) * x.size
        acc[1] += x.size
    with comm.watch(dist.Phase.EVALUATION, step):
        comm.allreduce_(acc)
    return float(acc[0] / acc[1])


def sample_text(model: GPT, tokenizer, cfg: Config, step: int) -> str:
    from distgpt.sample import generate

    rng = np.random.default_rng([cfg.train.seed, step, 7])
    ids = generate(model, [tokenizer.eot], cfg.train.sample_tokens, temperature=0.8, top_k=50, rng=rng,
                   vocab_limit=tokenizer.vocab_size, eot=tokenizer.eot)
    text = tokenizer.decode(ids).replace("\n", "\n  | ")
    return f"sample at step {step}:\n  | {text}"


def with_injected_faults(step_fn: Callable[..., StepResult], rank: int) -> Callable[..., StepResult]:
    """Test hook: DISTGPT_FAIL_AT="RANK:STEP" makes that rank raise when it starts that step, and
    "RANK:STEP:9" SIGKILLs it there. Without the variable, step_fn itself."""
    spec = switches.get("DISTGPT_FAIL_AT")
    if not spec:
        return step_fn
    fail_rank, fail_step, *how = (int(v) for v in spec.split(":"))

    def step_or_fail(step: int, *args, **kwargs) -> StepResult:
        if (rank, step) == (fail_rank, fail_step):
            if how == [9]:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure (DISTGPT_FAIL_AT) at step {step}")
        return step_fn(step, *args, **kwargs)
    return step_or_fail


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


def check_out_dir(cfg: Config) -> None:
    """Everything about out_dir that can be known before training (raises OutDirError): it is, or
    can become, a writable folder; its checkpoint folder and metrics file are not something else;
    and the run does not land on another history's files unless overwrite_out_dir asks to start
    over: a fresh run (or one resumed from a checkpoint elsewhere) into an out_dir holding a run, or
    a run resumed from an older checkpoint of its own while newer ones exist. Creates nothing."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out_dir {out}: exists and is not a folder")
    ckpt = out / "ckpt"
    if ckpt.is_symlink() and not ckpt.exists():
        raise OutDirError(f"out_dir {out}: {ckpt} is a broken link, where the checkpoint folder goes")
    if ckpt.exists() and not ckpt.is_dir():
        raise OutDirError(f"out_dir {out}: {ckpt} is a file, where the checkpoint folder goes")
    if (out / METRICS).is_dir():
        raise OutDirError(f"out_dir {out}: {out / METRICS} is a folder, where the metrics file goes")
    parent = out
    while not parent.exists():
        parent = parent.parent
    what = "out_dir" if parent == out else f"out_dir {out} cannot be created:"
    if not parent.is_dir():
        raise OutDirError(f"{what} {parent} is not a folder")
    for folder in (parent, ckpt) if ckpt.is_dir() else (parent,):
        try:    # a real write: as root, os.access says yes to /proc and to read-only mounts
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            where = what if folder == parent else f"out_dir {out}:"
            raise OutDirError(f"{where} {folder} is not a writable folder ({e.strerror or e})") from None
    if cfg.overwrite_out_dir and cfg.resume == "auto":
        raise OutDirError("--overwrite (overwrite_out_dir) starts over and --resume auto continues the run "
                          f"in {out}: choose one")
    source, rewind = resume_source(out, cfg.resume)
    if cfg.overwrite_out_dir or (source in ("none", "own") and cfg.resume):
        return                      # starting over, or continuing out_dir's own newest checkpoint
    if source == "rewind":
        newer = existing_run(out, after_step=rewind)
        if newer:
            raise OutDirError(
                f"out_dir {out} holds {newer} after the resumed step {rewind}: resuming there would leave "
                "them as a second history that resume=auto would later pick up; resume the newest "
                "(--resume auto), choose another out_dir, or --overwrite to remove the newer ones")
        return
    found = existing_run(out)
    if found:
        how = "a run resumed from elsewhere" if cfg.resume else "a fresh run"
        raise OutDirError(
            f"out_dir {out} holds another run ({found}), where {how} would overwrite it: continue it with "
            "--resume auto, choose another out_dir, or start over with --overwrite (removes that run's "
            "checkpoints and metrics)")


def make_out_dir(cfg: Config) -> bool:
    """Rank 0: create out_dir (True when this run created it), and with overwrite_out_dir remove
    what check_out_dir would have refused: the earlier run's files, or the checkpoints newer than
    the resumed one. (check_out_dir has made sure that it can.)"""
    out = Path(cfg.out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutDirError(f"out_dir {out}: cannot write there: {e.strerror or e}") from None
    if cfg.overwrite_out_dir:
        source, rewind = resume_source(out, cfg.resume)
        if source == "rewind":          # never the resumed checkpoint itself: only the newer ones
            remove_run(out, after_step=rewind)
        elif source in ("none", "elsewhere"):
            remove_run(out)
    return created


def header(cfg: Config, comm: dist.Comm, trainer: Trainer, accum: int, threads) -> list[str]:
    lines = summary(cfg, comm.size, accum, trainer.precision, comm.n_nodes) + [
        f"ranks: {comm.size} on {comm.n_nodes} node(s), {comm.local_size} per node; "
        f"threads per rank: {threads.threads}; BLAS: {threads.blas}; MPI: {comm.library}",
        bf16.describe(trainer.precision)
        + ("; bf16 weights: one copy per node, each rank converting its slice"
           if trainer.weights16 is not None and trainer.weights16.shared else "")]
    if trainer.base is not None:
        held = "bf16" if trainer.precision == "bf16" else "fp32"
        size = Layout(cfg.model).size * (2 if held == "bf16" else 4)
        where = (f"one copy per node in shared memory, read by the node's {trainer.base_node.size} ranks"
                 if trainer.base_shared else
                 "held by this process" if trainer.base_node.size == 1 else
                 f"held by each rank (not shared: {trainer.base_why_private})")
        lines.append(f"frozen base: {trainer.base['source']} ({held}, {size / 2**20:,.1f} MiB, sha256 "
                     f"{trainer.base['sha256'][:16]}): {where}")
    if trainer.outer is not None:
        d, workers = cfg.parallel.diloco, comm.n_nodes
        sent = diloco.wire_bytes(trainer.layout.size, workers, d.wire)
        lines.append(f"sync: diloco, {workers} worker(s) (one per host), an outer sync every {d.inner_steps} "
                     f"steps (outer SGD lr {d.outer_lr}, momentum {d.outer_momentum}"
                     f"{', Nesterov' if d.nesterov else ''}), pseudo-gradients as {d.wire}: each host sends "
                     f"{sent / 2**20:,.1f} MiB per sync, {sent / d.inner_steps / 2**20:,.2f} MiB per step")
    else:
        lines.append("sync: step (every step's gradients summed over all ranks)"
                     + (f"; each host sends about {step_bytes(cfg, trainer, comm) / 2**20:,.1f} MiB per step"
                        if comm.n_nodes > 1 else ""))
    if trainer.group.size > 1:
        lines.append(f"gradient sum{' within each host' if trainer.outer is not None else ''}: "
                     f"{trainer.reducer.describe()}"
                     f"{', overlapped with backward' if trainer.hooks is not None else ''}")
    if threads.oversubscribed:
        lines.append(f"warning: {comm.local_size} ranks x {threads.threads} threads exceed this node's "
                     f"{os.cpu_count()} cores: expect slowdowns (set parallel.threads_per_rank)")
    if switches.active():
        lines.append("environment switches: " + ", ".join(switches.active()))
    t = cfg.train
    if t.warmup_steps > t.max_steps:    # legal (a quick look at a long config), but rarely meant
        peak = lr_at(t.max_steps - 1, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        lines.append(f"warning: train.warmup_steps ({t.warmup_steps}) > train.max_steps ({t.max_steps}): "
                     f"the learning rate stops at {peak:.2e}, below train.lr ({t.lr:g}), and never decays")
    return lines


def step_bytes(cfg: Config, trainer: Trainer, comm: dist.Comm) -> int:
    """What each host sends per synchronous step: the gradient as parallel.grad_wire, (N-1)/N of it,
    for the sums' reduce-scatter, then (N-1)/N of the summed gradients back (replicated) or of the
    fp32 parameters (ZeRO-1's gather), N hosts."""
    n, hosts = trainer.layout.size, comm.n_nodes
    width = 4 if cfg.parallel.grad_wire == "fp32" else 2
    back = 4 if trainer.partition.zero else width
    return (hosts - 1) * n * (width + back) // hosts


def agree(comm: dist.Comm, fn: Callable[[], object]) -> object:
    """fn() on rank 0 (a look at the file system), its result or its error on every rank."""
    answer: tuple[str, object] = ("ok", None)
    if comm.rank == 0:
        try:
            answer = ("ok", fn())
        except Exception as e:  # re-raised on every rank below, so that all of them stop alike
            answer = ("error", e)
    status, value = comm.bcast_obj(answer)
    if status == "error":
        raise value
    return value


# ----------------------------------------------------------------------------- the run

def run(cfg: Config, comm: dist.Comm, dry_run: bool = False) -> int:
    """Train (or, with dry_run, check and describe); the exit code: 0, or 130 after a Ctrl-C."""
    t = cfg.train
    log = Log(comm.rank == 0)

    # check what can be checked before any work: the switches, the batch layout, the data, out_dir,
    # the checkpoint to resume (from its manifest)
    switches.check()
    threads = kernel_threads.setup(comm.local_size, cfg.parallel.threads_per_rank)
    blas.configure()                   # the fp32 gemm, chosen once from DISTGPT_BLAS (every rank alike)
    accum = check_batch_layout(cfg, comm.size)
    if cfg.parallel.sync == "diloco" and not comm.same_ranks_per_node:
        raise ConfigError("parallel.sync = diloco: expected the same number of ranks on every host "
                          f"(this job has {comm.size} ranks on {comm.n_nodes} hosts)")
    if dry_run:    # the plan first, then the same checks a real run makes before its first step
        if cfg.lora.rank:       # the model is the base's: its config (no weights are read)
            cfg, _ = open_base(cfg)
        log(*summary(cfg, comm.size, accum, bf16.resolve(t.precision), comm.n_nodes),
            json.dumps(cfg.to_dict(), indent=2))
        checked = ["out_dir"]
        if cfg.data.train is None:
            log("data: data.train is not set (a real run needs it): not checked")
        else:
            loader, _, tokenizer_name = open_data(cfg, comm)
            checked.insert(0, "data")
            # (pretrained weights set the model: known here for LoRA, whose base was opened above)
            if cfg.resume and (cfg.init_from == "scratch" or cfg.lora.rank):
                plan_resume(cfg, comm, lora_layout(cfg) or Layout(cfg.model), loader, tokenizer_name)
                checked.append("the checkpoint to resume")
        agree(comm, lambda: check_out_dir(cfg))
        log(f"checks passed: {', '.join(checked)} ({cfg.out_dir})")
        return 0
    loader, val, tokenizer_name = open_data(cfg, comm)
    agree(comm, lambda: check_out_dir(cfg))

    # set up: weights, the checkpoint to resume, the trainer on this rank's buffers, out_dir
    base = None                 # LoRA: the frozen base, opened once here, filled by the Trainer
    if cfg.lora.rank:
        cfg, base = open_base(cfg)
        params = initial_adapters(cfg)
    else:
        cfg, params = initial_params(cfg)
    plan = plan_resume(cfg, comm, lora_layout(cfg) or Layout(cfg.model), loader, tokenizer_name)
    trainer = Trainer(cfg, comm, params, base)
    del params
    out_dir = Path(cfg.out_dir)
    created = agree(comm, lambda: make_out_dir(cfg))
    try:
        return _train(cfg, comm, trainer, plan, loader, val, tokenizer_name, log, accum, threads)
    finally:
        # a run that failed before writing anything leaves no empty folder behind
        if comm.rank == 0 and created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _train(cfg: Config, comm: dist.Comm, trainer: Trainer, plan, loader, val, tokenizer_name: str | None,
           log: Log, accum: int, threads) -> int:
    log(*header(cfg, comm, trainer, accum, threads))
    # from here to the final checkpoint a stop signal or Ctrl-C stops at a step boundary, with a
    # checkpoint (a signal during the final save lets it finish)
    stop = StopFlag(comm.rank == 0)
    try:
        code = _loop(cfg, comm, trainer, plan, loader, val, tokenizer_name, log, stop)
    finally:
        stop.restore()
    return code


def _loop(cfg: Config, comm: dist.Comm, trainer: Trainer, plan, loader, val, tokenizer_name: str | None,
          log: Log, stop: StopFlag) -> int:
    t, model, out_dir = cfg.train, trainer.model, Path(cfg.out_dir)

    # resume, or start every rank from rank 0's parameters
    checkpoints = Checkpointer(cfg, comm, trainer, loader, tokenizer_name, log)
    comm.start_watchdog(cfg.parallel.timeout_s, out_dir / ".watchdog", prefix=TOOL)   # from here on
    with comm.watch(dist.Phase.CHECKPOINT_LOAD, None):
        resumed = checkpoints.resume(plan)
    state = resumed or TrainingState()
    if resumed is None:
        with comm.watch(dist.Phase.PARAMETER_BROADCAST, 0):
            trainer.broadcast_params()
    trainer.check_params(state.step)
    metrics = Metrics(out_dir, state.step if resumed else None) if comm.rank == 0 else None
    sampler = None
    if t.sample_every and tokenizer_name and comm.rank == 0:
        from distgpt.data import get_tokenizer
        sampler = get_tokenizer(tokenizer_name)
    train_step = with_injected_faults(trainer.step, comm.rank)
    tokens_per_step = t.batch_size * t.seq_len

    # the loop: curves start at the initial loss (step 0), as in nanoGPT and llm.c
    if val is not None and state.step == 0:
        val_loss = evaluate(model, val, comm, t.micro_batch_size)
        log(f"step {0:6d} | val loss {val_loss:.4f}")
        if metrics is not None:
            metrics.write({"step": 0, "val_loss": val_loss, "tokens": 0, "time_s": 0.0})
    log.start_bar(t.max_steps, state.step)
    t_run, elapsed0, first_step = time.perf_counter(), state.elapsed_s, state.step
    w16 = trainer.weights16
    converted0 = w16.converted if w16 is not None else 0
    while state.step < t.max_steps:
        t0 = time.perf_counter()
        result = train_step(state.step, loader.micro_batches(state.step), stop.pending)
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.elapsed_s = elapsed0 + time.perf_counter() - t_run
        step, dt = state.step, time.perf_counter() - t0
        if not np.isfinite(result.loss):
            raise FloatingPointError(f"loss is {result.loss} at step {step}: "
                                     "lower train.lr or check the data")

        record = {"step": step, "train_loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": tokens_per_step / dt, "ms_per_step": dt * 1000,
                  "tokens": state.tokens_seen, "time_s": state.elapsed_s}
        if result.outer is not None:
            o = result.outer
            record.update(outer_s=o.seconds, outer_bytes=o.bytes, pseudo_grad_norm=o.norm)
        logged = step % t.log_every == 0 or step == t.max_steps or step == 1
        if logged:
            log(f"step {step:6d}/{t.max_steps} | loss {result.loss:.4f} | lr {result.lr:.2e} | "
                f"grad norm {result.grad_norm:.3f} | {dt * 1000:8.1f} ms/step | "
                f"{tokens_per_step / dt:9.0f} tok/s")
        if result.outer is not None and (logged or step % (t.log_every * 10) == 0):
            o = result.outer
            log(f"step {step:6d} | outer sync {o.seconds * 1000:.0f} ms, {o.bytes / 2**20:,.1f} MiB sent "
                f"per rank, pseudo-gradient norm {o.norm:.4f}")
        evaluated = val is not None and (step == t.max_steps
                                         or (t.eval_every > 0 and step % t.eval_every == 0))
        if evaluated:
            # DiLoCo: each host evaluates its own model, but right after a sync there is one model
            apart = trainer.outer is not None and trainer.outer.last_sync != step
            record["val_loss"] = evaluate(model, val, comm, t.micro_batch_size, step,
                                          trainer.group if apart else None)
            log(f"step {step:6d} | val loss {record['val_loss']:.4f}")
        log.advance(result.loss, tokens_per_step / dt)
        if (logged or evaluated or result.outer is not None) and metrics is not None:
            metrics.write(record)
        if sampler is not None and step % t.sample_every == 0:
            log(sample_text(model, sampler, cfg, step))
        if cfg.parallel.check_every and step % cfg.parallel.check_every == 0:
            trainer.check_params(step)
        if result.stop_requested:
            log.close()
            why = "interrupted (Ctrl-C)" if result.interrupted else "stop signal received"
            log(f"{why}: checkpointing at step {step} and exiting; continue with --resume auto")
            checkpoints.save(state)
            return INTERRUPTED_EXIT if result.interrupted else 0
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            checkpoints.save(state)
    log.close()
    if checkpoints.saved_step != state.step:
        checkpoints.save(state)
    if stop.interrupted:    # after the last step (or during the final save, which went on)
        log(f"interrupted (Ctrl-C) at the end of the run: the final checkpoint (step {state.step}) is in")
    if w16 is not None and state.step > first_step:
        per_step = (w16.converted - converted0) / (state.step - first_step)
        log(f"bf16 weight copy: rank 0 converted {per_step:,.0f} elements per step, the copy holds "
            f"{w16.elements():,}" + (" (one copy per node, a slice per rank)" if w16.shared else ""))
    total = sum(trainer.timing.values())
    if total > 0:
        log("time split: " + ", ".join(f"{k} {v / total:.1%}" for k, v in trainer.timing.items()))
    return INTERRUPTED_EXIT if stop.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("train"), description=__doc__.splitlines()[0],
                                     epilog="Config keys: --help-config lists them with their defaults.")
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, data and out_dir, print the plan and estimates, then exit")
    parser.add_argument("--resume", help="auto | path of a checkpoint (same as resume=...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir holding another run (same as overwrite_out_dir=true)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and its default")
    add_version(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    args = parser.parse_intermixed_args(argv)
    if args.help_config:
        print("\n".join(describe_keys()))
        return 0
    overrides = (list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
                 + (["overwrite_out_dir=true"] if args.overwrite else []))

    try:        # before MPI starts: DISTGPT_NO_MPI decides whether it does
        switches.check()
    except switches.SwitchError as exc:
        if dist.launch_rank() == 0:
            print(f"{TOOL}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    comm = dist.init()
    try:
        return run(load_config(args.config, overrides), comm, args.dry_run)
    except RunComplete as done:   # resume=auto on a finished run (a requeued job): nothing to do
        if comm.rank == 0:
            print(f"{TOOL}: {done}", flush=True)
        return 0
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop's stop handling: during set-up, before anything is trained
        if comm.rank == 0:
            print(f"{TOOL}: interrupted during set-up: nothing trained, nothing saved", file=sys.stderr,
                  flush=True)
        if comm.size > 1:
            comm.abort(INTERRUPTED_EXIT)
        return INTERRUPTED_EXIT
    except Exception as exc:  # every failure ends the whole job, never leaves ranks waiting
        user = isinstance(exc, _user_errors())
        where = f"rank {comm.rank}: " if comm.size > 1 else ""
        # decided alike on every rank (rank 0's verdict is broadcast where files are read): one line
        same_everywhere = isinstance(exc, (ConfigError, switches.SwitchError, OutDirError, ResumeRefused,
                                           BaseLoadError))
        if same_everywhere:
            if comm.rank == 0:
                print(f"{TOOL}: error: {exc}", file=sys.stderr, flush=True)
        elif user:
            print(f"{TOOL}: error: {where}{exc}", file=sys.stderr, flush=True)
        else:
            print(f"{TOOL}: {where}failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            traceback.print_exc()
        code = 2 if user else 1
        # a config error happens identically on every rank before any rank-specific work, so all
        # of them return; anything else may be one rank's alone and must take the others down
        if comm.size > 1 and not same_everywhere:
            comm.abort(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
