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
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

from distgpt import blas, dist, jit
from distgpt import threads as kernel_threads
from distgpt.config import Config, ConfigError, check_batch_layout, load_config
from distgpt.model import GPT, Layout, ModelConfig, activation_bytes, init_params
from distgpt.optim import AdamW, clip_coefficient, lr_at


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: reported as one line, exit code 2."""
    from distgpt.checkpoint import CheckpointError
    from distgpt.data import DataError
    from distgpt.weights import WeightsError

    return (ConfigError, DataError, CheckpointError, WeightsError, blas.BlasError)


# ----------------------------------------------------------------------------- summary

def flops_per_token(mcfg: ModelConfig, seq_len: int, n_params: int) -> int:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) + 12 L T C for attention."""
    return 6 * n_params + 12 * mcfg.n_layer * seq_len * mcfg.n_embd


def summary(cfg: Config, world: int, accum: int) -> list[str]:
    m, t = cfg.model, cfg.train
    layout = Layout(m)
    n = layout.n_params()
    shard = (layout.size + world - 1) // world
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    moments = 2 * 4 * (shard if cfg.parallel.zero else layout.size)
    acts = activation_bytes(m, t.micro_batch_size, t.seq_len)
    total = 2 * 4 * layout.size + moments + acts
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
        f"AdamW moments {mb(moments)}, activations {mb(acts)}; total {mb(total)}",
    ]


# ----------------------------------------------------------------------------- helpers

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
    sums = comm.allgather_obj(params_checksum(params))
    if len(set(sums)) > 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"parameters differ across ranks at step {step}: ranks {bad} disagree with rank 0")


class Metrics:
    """metrics.jsonl on rank 0: one JSON object per logged step (floats round-trip exactly)."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # drop records past the checkpoint we resume from: they will be produced again
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def evaluate(model: GPT, val, comm: dist.Comm, micro_batch_size: int) -> float:
    """Mean loss over the fixed val set: token-loss sums and counts are summed over ranks, so the
    number is the same whatever the number of ranks."""
    acc = np.zeros(2, np.float64)
    for x, y in val.rank_windows(comm.rank, comm.size, micro_batch_size):
        acc[0] += model.forward(x, y) * x.size
        acc[1] += x.size
    comm.allreduce_(acc)
    return float(acc[0] / acc[1])


def build_model(cfg: Config, explicit_model_keys: dict[str, int]) -> tuple[Config, GPT]:
    if cfg.init_from == "scratch":
        model = GPT(cfg.model)
        init_params(model.layout, model.params, cfg.train.seed)
        return cfg, model
    from distgpt import weights

    mcfg, params = weights.load_init(cfg.init_from, cfg.model)
    weights.check_shape(explicit_model_keys, mcfg, cfg.init_from)
    cfg = dataclasses.replace(cfg, model=mcfg)
    return cfg, GPT(mcfg, params=params)


def sample_text(model: GPT, tokenizer, cfg: Config, step: int) -> str:
    from distgpt.sample import generate

    rng = np.random.default_rng([cfg.train.seed, step, 7])
    ids = generate(model, [tokenizer.eot], cfg.train.sample_tokens, temperature=0.8, top_k=50, rng=rng,
                   vocab_limit=tokenizer.vocab_size,
                   eot=tokenizer.eot)
    text = tokenizer.decode(ids).replace("\n", "\n  | ")
    return f"sample at step {step}:\n  | {text}"


# ----------------------------------------------------------------------------- the run

class Trainer:
    """One optimizer step on this rank: the rank's micro-batches forward and backward, the gradient
    reduction (overlapped with the last backward), clipping, AdamW on this rank's slice, and the
    ZeRO-1 allgather. The training loop and the benchmark both drive it."""

    def __init__(self, cfg: Config, comm: dist.Comm, model: GPT):
        t, layout = cfg.train, model.layout
        self.cfg, self.comm, self.model, self.n = cfg, comm, model, layout.size
        self.zero = cfg.parallel.zero and comm.size > 1
        self.shard = dist.shard_range(self.n, comm.rank, comm.size)   # this rank's checkpoint slice
        self.s, self.e = self.shard if self.zero else (0, self.n)      # the slice AdamW updates
        self.opt = AdamW(self.e - self.s, layout.decay_segments(self.s, self.e), t.beta1, t.beta2, t.eps,
                         t.weight_decay)
        self.reducer = dist.make_reducer(comm, layout.layer_ranges, model.grads, self.zero,
                                         int(cfg.parallel.bucket_mb * 2**20), cfg.parallel.reduce)
        if self.reducer.grads is not model.grads:
            model.use_grad_buffer(self.reducer.grads)
        shared = self.reducer.shared_params
        if shared is not None:          # one copy for the node, rank 0's values
            if comm.rank == 0:
                shared[:] = model.params
            comm.shared_barrier()
            model.use_param_buffer(shared)
        self.overlap = (cfg.parallel.overlap and comm.size > 1
                        and isinstance(self.reducer, dist.GradReducer))
        self.timing = dict.fromkeys(("forward", "backward", "wait", "comm", "optim"), 0.0)

    def step(self, step: int, micro: list[tuple[np.ndarray, np.ndarray, int]], stop: int = 0
             ) -> tuple[float, float, float, bool]:
        """Train on `micro` (this rank's (x, y, first row) micro-batches of global step `step`).
        Returns (mean loss over the global batch, gradient norm, lr, whether any rank asked to stop)."""
        cfg, comm, model, reducer, timing = self.cfg, self.comm, self.model, self.reducer, self.timing
        t = cfg.train
        scale = 1.0 / (len(micro) * comm.size)      # SUM-reduced gradients then average the batch
        model.zero_grad()
        loss_sum = 0.0
        for i, (x, y, row0) in enumerate(micro):
            last = self.overlap and i == len(micro) - 1    # reduce while the last backward runs
            model.layer_done_hook = reducer.layer_done if last else None
            ta = time.perf_counter()
            dropout_seed = (t.seed, step) if cfg.model.dropout > 0 else None
            loss_sum += model.forward(x, y, grad_scale=scale, dropout_seed=dropout_seed, row0=row0)
            tb = time.perf_counter()
            model.backward()
            timing["forward"] += tb - ta
            timing["backward"] += time.perf_counter() - tb
        tc = time.perf_counter()
        reducer.finish()
        # waiting for the slowest rank to finish backward is load imbalance, not communication
        timing["wait"] += reducer.waited
        timing["comm"] += time.perf_counter() - tc - reducer.waited
        # one small allreduce carries the loss, the ZeRO norm pieces and any rank's stop signal
        sharded = reducer.sharded_norm
        stats = np.array([loss_sum, reducer.grad_sq_sum() if sharded else 0.0, float(stop)])
        comm.allreduce_(stats)
        grad_norm = float(np.sqrt(stats[1] if sharded else reducer.grad_sq_sum()))
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        td = time.perf_counter()
        self.opt.step(model.params[self.s:self.e], reducer.shard_grads, lr,
                      clip_coefficient(grad_norm, t.grad_clip))
        if self.zero:
            reducer.allgather_params(model.params)
        timing["optim"] += time.perf_counter() - td
        return float(stats[0] * scale), grad_norm, lr, bool(stats[2])

    def broadcast_params(self) -> None:
        """Rank 0's parameters everywhere (parameters in shared memory already are rank 0's)."""
        if self.model.params is self.reducer.shared_params:
            self.comm.shared_barrier()
        else:
            self.comm.bcast_(self.model.params)

    def load_state(self, params: np.ndarray, m: np.ndarray, v: np.ndarray, opt_t: int) -> None:
        """This rank's checkpoint slices (self.shard) -> full parameters, and moments where kept."""
        a, b = self.shard
        ranges, model, opt, comm = self.reducer.ranges, self.model, self.opt, self.comm
        model.params[a:b] = params
        self.reducer.allgather_params(model.params)
        if self.zero:
            opt.m[:], opt.v[:] = m, v
        else:
            opt.m[a:b], opt.v[a:b] = m, v
            comm.allgatherv_(opt.m, ranges)
            comm.allgatherv_(opt.v, ranges)
        opt.t = opt_t

    def state_slices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """params, m, v of this rank's checkpoint slice."""
        a, b = self.shard
        if self.zero:
            return self.model.params[a:b], self.opt.m, self.opt.v
        return self.model.params[a:b], self.opt.m[a:b], self.opt.v[a:b]


def run(cfg: Config, comm: dist.Comm, explicit_model_keys: dict[str, int], dry_run: bool) -> None:
    from distgpt import checkpoint, data

    t = cfg.train
    rank0 = comm.rank == 0
    log = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    bar = None  # the live progress bar, on rank 0 when stdout is a terminal
    threads = kernel_threads.setup(comm.local_size, cfg.parallel.threads_per_rank)
    blas.describe()                    # a bad DISTGPT_BLAS fails here, on every rank alike
    accum = check_batch_layout(cfg, comm.size)

    if dry_run:
        log("\n".join(summary(cfg, comm.size, accum)))
        log(json.dumps(cfg.to_dict(), indent=2))
        return

    if cfg.data.train is None:
        raise ConfigError("data.train is not set: expected a glob of token shard files (see distgpt.prepare)")
    cfg, model = build_model(cfg, explicit_model_keys)
    shards = data.open_shards(cfg.data.train, cfg.model.vocab_size, cfg.data.tokenizer, what="data.train")
    loader = data.TrainLoader(shards, t.seq_len, t.batch_size, t.micro_batch_size, comm.rank, comm.size,
                              t.seed)
    val = None
    if cfg.data.val:
        val_shards = data.open_shards(cfg.data.val, cfg.model.vocab_size, cfg.data.tokenizer, what="data.val")
        val = data.ValSet(val_shards, t.seq_len, t.eval_steps * t.batch_size)
    tokenizer_name = cfg.data.tokenizer or shards.tokenizer

    trainer = Trainer(cfg, comm, model)
    layout = model.layout

    out_dir = Path(cfg.out_dir)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    step, tokens_seen = 0, 0
    resume_from = checkpoint.resolve_resume(out_dir, cfg.resume, comm) if cfg.resume else None
    if resume_from is not None:
        p_sh, m_sh, v_sh, manifest = checkpoint.load_checkpoint(resume_from, comm, layout, trainer.shard)
        meta = manifest["meta"]
        saved_tok = meta.get("tokenizer")
        if saved_tok and tokenizer_name and saved_tok != tokenizer_name:
            raise checkpoint.CheckpointError(
                f"{resume_from}: saved with tokenizer {saved_tok}, the data uses {tokenizer_name}")
        trainer.load_state(p_sh, m_sh, v_sh, meta["opt_t"])
        loader.load_state_dict(meta["loader"])
        step, tokens_seen = meta["step"], meta["tokens_seen"]
    elif comm.size > 1:
        trainer.broadcast_params()           # identical starting point, whatever each rank computed
    check_params_agree(comm, model.params, step)

    log("\n".join(summary(cfg, comm.size, accum)))
    log(f"ranks: {comm.size} on {comm.n_nodes} node(s), {comm.local_size} per node; "
        f"threads per rank: {threads.threads}; BLAS: {threads.blas}; MPI: {comm.library}")
    if comm.size > 1:
        log(f"gradient sum: {trainer.reducer.describe()}"
            f"{', overlapped with backward' if trainer.overlap else ''}")
    if threads.oversubscribed:
        log(f"warning: {comm.local_size} ranks x {threads.threads} threads exceed this node's "
            f"{os.cpu_count()} cores: expect slowdowns (set parallel.threads_per_rank)")
    if resume_from is not None:
        log(f"resumed from {resume_from} at step {step}")

    metrics = Metrics(out_dir, step if resume_from is not None else None) if rank0 else None
    stop = StopFlag()
    tokenizer = data.get_tokenizer(tokenizer_name) if (t.sample_every and tokenizer_name and rank0) else None
    tokens_per_step = t.batch_size * t.seq_len
    last_ckpt_step = step if resume_from is not None else -1

    def save(at_step: int) -> None:
        nonlocal last_ckpt_step
        meta = {"config": cfg.to_dict(), "step": at_step, "tokens_seen": tokens_seen, "opt_t": trainer.opt.t,
                "loader": loader.state_dict(), "tokenizer": tokenizer_name,
                "rng": {"kind": "counter-based: dropout masks from (seed, step, global row)",
                        "seed": t.seed}}
        path = checkpoint.save_checkpoint(out_dir, at_step, comm, layout, trainer.shard,
                                          *trainer.state_slices(), meta, cfg.checkpoint.keep)
        last_ckpt_step = at_step
        log(f"checkpoint: {path}")

    # test hook: DISTGPT_FAIL_AT="RANK:STEP" raises on that rank at that step, "RANK:STEP:9" SIGKILLs it
    fail_at = tuple(int(v) for v in os.environ["DISTGPT_FAIL_AT"].split(":")) \
        if os.environ.get("DISTGPT_FAIL_AT") else None
    if rank0 and sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout)
        log = lambda *a: bar.write(" ".join(str(x) for x in a))  # noqa: E731 (lines above the bar)
    t_run = time.perf_counter()
    while step < t.max_steps:
        if fail_at is not None and fail_at[:2] == (comm.rank, step):
            if fail_at[2:] == (9,):
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure (DISTGPT_FAIL_AT) at step {step}")
        t0 = time.perf_counter()
        train_loss, grad_norm, lr, stopping = trainer.step(step, loader.micro_batches(step), stop.signum)
        loader.step = step + 1
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"loss is {train_loss} at step {step}: lower train.lr or check the data")

        logged = step % t.log_every == 0 or step == t.max_steps or step == 1
        evaluated = val is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps)
        record = {"step": step, "train_loss": float(train_loss), "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_step / dt, "ms_per_step": dt * 1000, "tokens": tokens_seen,
                  "time_s": time.perf_counter() - t_run}
        if logged:
            log(f"step {step:6d}/{t.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                f"grad norm {grad_norm:.3f} | {dt * 1000:8.1f} ms/step | {tokens_per_step / dt:9.0f} tok/s")
        if evaluated:
            record["val_loss"] = evaluate(model, val, comm, t.micro_batch_size)
            log(f"step {step:6d} | val loss {record['val_loss']:.4f}")
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_step / dt:.0f}", refresh=False)
            bar.update(1)
        if (logged or evaluated) and metrics is not None:
            metrics.write(record)
        if tokenizer is not None and step % t.sample_every == 0:
            log(sample_text(model, tokenizer, cfg, step))
        if cfg.parallel.check_every and step % cfg.parallel.check_every == 0:
            check_params_agree(comm, model.params, step)
        if stopping:
            if bar is not None:
                bar.close()
            log(f"signal received: checkpointing at step {step} and exiting")
            save(step)
            return
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save(step)
    if bar is not None:
        bar.close()
    if last_ckpt_step != step:
        save(step)
    total = sum(trainer.timing.values())
    if total > 0:
        log("time split: " + ", ".join(f"{k} {v / total:.1%}" for k, v in trainer.timing.items()))


def explicit_keys(config_path: str | None, overrides: list[str]) -> dict[str, int]:
    """Model shape keys the user set on purpose (file or command line): checked against pretrained weights."""
    import yaml

    from distgpt.config import parse_override

    tree = {}
    if config_path:
        tree = (yaml.safe_load(Path(config_path).read_text()) or {}).get("model", {}) or {}
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("model."):
            tree[key.split(".", 1)[1]] = value
    return {k: v for k, v in tree.items() if k in ("n_layer", "n_head", "n_embd", "vocab_size")}


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
        cfg = load_config(args.config, overrides)
        run(cfg, comm, explicit_keys(args.config, overrides), args.dry_run)
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
