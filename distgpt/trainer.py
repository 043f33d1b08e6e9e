"""One optimizer step on every rank, and the state a run carries from step to step.

    Trainer.step: for each of this rank's micro-batches of the global batch (fixed by seed and step):
        forward + backward, gradients accumulate in the flat buffer (the first one overwrites it)
    sum the gradients across ranks (the reducer: shared memory on one node, MPI buckets reduced
        while the last backward runs, or both, hierarchically); clip by the global norm; AdamW on
        this rank's slice (the whole vector when replicated); ZeRO-1 then gathers the updated
        parameters (on one node they are a single shared copy, and gathering is a barrier).

TrainingState is the run's position (steps done, tokens seen, seconds trained): the one record a
checkpoint saves and a resume restores. AdamW's step count and the loader's position are not kept
apart from it: both are this step.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from distgpt import bf16, dist
from distgpt.config import Config, ConfigError, ModelConfig, user_model_keys
from distgpt.diloco import OuterStats, OuterSync
from distgpt.lora import LoraLayout
from distgpt.model import GPT, Layout, init_params
from distgpt.optim import AdamW, clip_coefficient, lr_at
from distgpt.partition import Partition

if TYPE_CHECKING:
    from distgpt.weights import InitSource


def flops_per_token(mcfg: ModelConfig, seq_len: int, n_params: int) -> int:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) + 12 L T C for attention."""
    return 6 * n_params + 12 * mcfg.n_layer * seq_len * mcfg.n_embd


def initial_params(cfg: Config) -> tuple[Config, np.ndarray]:
    """The starting values of the trainable flat vector (GPT-2 init, or pretrained weights; with
    LoRA the adapters, initialised as peft does from train.seed) and the config they imply. A LoRA
    run's frozen base is the Trainer's to load (open_base): it never passes through here."""
    if cfg.init_from == "scratch":
        layout = Layout(cfg.model)
        params = np.zeros(layout.size, np.float32)
        init_params(layout, params, cfg.train.seed)
        return cfg, params
    from distgpt import weights

    if cfg.lora.rank:
        cfg, _ = open_base(cfg)
        return cfg, initial_adapters(cfg)
    mcfg, params = weights.load_init(cfg.init_from, cfg.model)
    weights.check_shape(user_model_keys(cfg), mcfg, cfg.init_from)
    return cfg.model_copy(update={"model": mcfg}), params


def initial_adapters(cfg: Config) -> np.ndarray:
    """A LoRA run's starting adapters, initialised as peft does from train.seed (cfg's model: the
    base's, as open_base gives it)."""
    lora = lora_layout(cfg)
    adapters = np.zeros(lora.size, np.float32)
    lora.init(adapters, cfg.train.seed)
    return adapters


def open_base(cfg: Config) -> tuple[Config, InitSource]:
    """LoRA: init_from opened (weights.InitSource: its config and tensors, no values read yet) and the
    config with the model it implies."""
    from distgpt import weights

    source = weights.open_init(cfg.init_from, cfg.model)
    weights.check_shape(user_model_keys(cfg), source.cfg, cfg.init_from)
    return cfg.model_copy(update={"model": source.cfg}), source


def lora_layout(cfg: Config) -> LoraLayout | None:
    """The run's LoRA layout (the trainable flat vector's), or None when lora.rank is 0."""
    lo = cfg.lora
    return LoraLayout(cfg.model, lo.rank, lo.alpha, lo.targets, lo.dropout) if lo.rank else None


class BaseLoadError(ValueError):
    """LoRA's frozen base could not be read (a bad or truncated file): raised alike on every rank,
    one line."""


@dataclass
class TrainingState:
    """Where a run stands. `step` optimizer steps are done: AdamW has taken `step` steps and the next
    global batch the loader serves is batch `step`. `elapsed_s` is the training time of the run so
    far, across resumes (metrics.jsonl's time_s continues from it)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> TrainingState:
        """From a checkpoint's meta: its "state", or the separate keys that checkpoints written before
        TrainingState existed hold (their AdamW count, "opt_t", always equalled "step")."""
        state = meta.get("state") or {"step": meta["step"], "tokens_seen": meta["tokens_seen"]}
        return cls(int(state["step"]), int(state["tokens_seen"]), float(state.get("elapsed_s", 0.0)))


@dataclass
class StepResult:
    loss: float              # mean over the global batch
    grad_norm: float         # before clipping
    lr: float
    stop_requested: bool     # some rank was signalled: every rank checkpoints and exits
    interrupted: bool        # ... and one of those signals was Ctrl-C (SIGINT): the job exits 130
    outer: OuterStats | None = None     # DiLoCo: the outer sync that ended this step, if one did


def params_checksum(params: np.ndarray) -> int:
    return zlib.crc32(params.view(np.uint8))


def check_params_agree(comm: dist.Comm, params: np.ndarray, step: int) -> None:
    with comm.watch(dist.Phase.PARAMETER_CHECK, step):
        sums = comm.allgather_obj(params_checksum(params))
    if len(set(sums)) > 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(f"parameters differ across ranks at step {step}: ranks {bad} disagree with rank 0")


class Trainer:
    """One optimizer step on this rank: the rank's micro-batches forward and backward, the gradient
    reduction (overlapped with the last backward where the reducer can), clipping, AdamW on this
    rank's slice, and the ZeRO-1 gather. The training loop and the benchmark both drive it.

    The reducer decides where the flat buffers live (shared memory on one node), so the model is
    built on its buffers; the partition says which slice this rank sums, updates and checkpoints.
    In bf16 the model's Bf16Weights owns the bf16 copy of the weights: the trainer only tells it
    which slice this rank has just updated.

    DiLoCo (parallel.sync = diloco, distgpt/diloco.py): `group` is this host's ranks, and everything
    above happens within it (the partition, the reducer, ZeRO-1); `outer` syncs the hosts every
    inner_steps steps. Otherwise `group` is every rank. The loss, the stop signals and the data
    split stay world-wide either way.

    LoRA (lora.rank > 0): the trainable flat vector (self.params, self.layout) is the adapters, and
    everything above (the partition, the reducer, clipping, AdamW, ZeRO-1, DiLoCo's outer sync,
    checkpoints) works on it unchanged. The frozen base is loaded once per node into shared memory
    (_lora_model); `base` (a weights.InitSource) may be given, else init_from is opened here."""

    def __init__(self, cfg: Config, comm: dist.Comm, params: np.ndarray, base: InitSource | None = None):
        t, par = cfg.train, cfg.parallel
        self.cfg, self.comm = cfg, comm
        self.precision = bf16.resolve(t.precision)        # "auto" -> bf16 where it is fast, else fp32
        # the trainable flat vector's layout: the model's, or with LoRA the adapters'
        self.lora = lora_layout(cfg)
        self.layout = layout = self.lora or Layout(cfg.model)
        diloco = par.sync == "diloco"
        if diloco and not comm.same_ranks_per_node:
            raise ConfigError("parallel.sync = diloco: expected the same number of ranks on every host "
                              f"(this job has {comm.size} ranks on {comm.n_nodes} hosts)")
        self.group = group = comm.node_group() if diloco else comm
        zero = par.zero_for(comm.n_nodes) and group.size > 1
        self.partition = Partition(layout.size, group.size, group.rank, zero)
        # (the adapters have no token table: no gradient of theirs arrives as sparse embedding rows)
        token_table = None if self.lora is not None else (cfg.model.padded_vocab, cfg.model.n_embd)
        self.reducer = dist.make_reducer(group, self.partition, layout.layer_ranges, params,
                                         int(cfg.parallel.bucket_mb * 2**20), cfg.parallel.reduce,
                                         cfg.parallel.grad_wire, cfg.parallel.comm_thread, token_table)
        self.params = self.reducer.params       # what the optimizer steps (the adapters with LoRA)
        # bf16: the copy of the matmul weights (bf16.Bf16Weights). With the parameters shared on one
        # node (ZeRO-1) it is shared too, each rank converting the slice it updates: the node
        # converts it once per step, not once per rank. Otherwise each rank's own, remade by its
        # next pass after a change. (LoRA: the frozen base is held in bf16 itself, no copy.)
        self.weights16 = None
        self.base: dict | None = None           # LoRA: {"source", "sha256"} of the frozen base
        self.base_shared = False                # ... held once per node in shared memory
        self.base_why_private = ""
        self.base_node: dist.Comm | None = None     # ... the ranks that share it
        if self.lora is not None:
            self.model = self._lora_model(cfg, comm, group, base)
        else:
            if self.precision == "bf16":
                shared = None
                if self.reducer.shares_params:
                    bufs, _ = group.shared_buffers(layout.size, np.uint16, per_rank=False)
                    shared = None if bufs is None else bufs[0]
                self.weights16 = bf16.Bf16Weights(self.reducer.params, layout.matmul_weight_ranges(),
                                                  shared=shared, rank_slice=self.partition.updated)
            self.model = GPT(cfg.model, params=self.reducer.params, grads=self.reducer.grads,
                             precision=self.precision, weights16=self.weights16, recompute=t.recompute,
                             recompute_keep=t.recompute_keep)
        lo, hi = self.partition.updated
        self.opt = AdamW(hi - lo, layout.decay_segments(lo, hi), t.beta1, t.beta2, t.eps, t.weight_decay)
        self.hooks = self.reducer.hooks if cfg.parallel.overlap else None
        self.timing = dict.fromkeys(("forward", "backward", "wait", "comm", "optim"), 0.0)
        self.outer = None
        if diloco:      # (collective: every rank builds its column)
            a, b = self.partition.owned
            self.outer = OuterSync(par.diloco, comm, comm.column(), a, b)
            self.outer.reset(self.params, 0)
            self.timing["outer"] = 0.0
        # one slot per worker for its gradient norm's pieces in the step's statistics allreduce
        self.norm_slot = comm.node_index if diloco else 0
        self.norm_slots = comm.n_nodes if diloco else 1

    def _lora_model(self, cfg: Config, comm: dist.Comm, group: dist.Comm, base: InitSource | None) -> GPT:
        """Collective: the frozen base, loaded once per node into one shared-memory buffer (bf16 bits
        for a bf16 run, float32 otherwise) that the node's ranks all read, and the model with the
        adapters (self.params, the reducer's) on it. Only the node's first rank reads the weights,
        tensor by tensor; a single process (or a node whose /dev/shm lacks the room) holds its own."""
        from distgpt import weights

        if base is None:
            _, base = open_base(cfg)
        held = np.uint16 if self.precision == "bf16" else np.float32
        n = Layout(cfg.model).size
        node = group if group.n_nodes == 1 else comm.node_group()      # (collective)
        bufs, why = node.shared_buffers(n, held, per_rank=False)
        self.base_shared = bufs is not None
        self.base_why_private = why
        if bufs is None and node.size > 1 and comm.rank == 0:
            warnings.warn(f"the frozen base is not shared between ranks (each holds its own): {why}",
                          stacklevel=2)
        buf = bufs[0] if bufs is not None else np.empty(n, held)
        err, digest = None, None
        if bufs is None or node.rank == 0:
            try:
                digest = base.fill(buf, digest=comm.rank == 0)
            except (weights.WeightsError, OSError, ValueError) as e:
                err = str(e)
        errors = [e for e in comm.allgather_obj(err) if e]      # every rank stops alike
        if errors:
            raise BaseLoadError(errors[0])
        if bufs is not None:
            node.shared_barrier()           # the base, written by the node's first rank, seen by all
        self.base = {"source": cfg.init_from, "sha256": comm.bcast_obj(digest)}
        self.base_node = node
        common = dict(recompute=cfg.train.recompute, recompute_keep=cfg.train.recompute_keep,
                      lora=self.lora, lora_params=self.reducer.params,
                      lora_grads=self.reducer.grads)
        if held is np.uint16:
            return GPT(cfg.model, precision="bf16", base16=buf, **common)
        return GPT(cfg.model, params=buf, precision=self.precision, **common)

    def step(self, step: int, micro: list[tuple[np.ndarray, np.ndarray, int]],
             stop: Callable[[], tuple[bool, bool]] | None = None) -> StepResult:
        """Train on `micro` (this rank's (x, y, first row) micro-batches of global step `step`).
        `stop()` says whether this rank was asked to stop and whether by Ctrl-C; it is read just
        before the step's small allreduce, so a signal that arrives during this step stops the run
        at its end, on every rank alike."""
        cfg, comm, model, reducer, timing = self.cfg, self.comm, self.model, self.reducer, self.timing
        t = cfg.train
        scale = 1.0 / (len(micro) * self.group.size)    # SUM-reduced gradients then average the batch
        # (the model's dropout and LoRA's each draw their masks from it, when they are on)
        dropout_seed = (t.seed, step) if cfg.model.dropout > 0 or cfg.lora.dropout > 0 else None
        model.zero_grad()
        loss_sum = 0.0
        for i, (x, y, row0) in enumerate(micro):
            last = i == len(micro) - 1              # reduce while the last backward runs
            ta = time.perf_counter()
            fwd = model.forward(x, y, grad_scale=scale, dropout_seed=dropout_seed, row0=row0)
            tb = time.perf_counter()
            model.backward(fwd, hooks=self.hooks if last else None)
            loss_sum += fwd.loss
            timing["forward"] += tb - ta
            timing["backward"] += time.perf_counter() - tb
        tc = time.perf_counter()
        with self.group.watch(dist.Phase.GRADIENT_SUM, step):
            reducer.finish()
        # waiting for the slowest rank to finish backward is load imbalance, not communication
        timing["wait"] += reducer.waited
        timing["comm"] += time.perf_counter() - tc - reducer.waited
        # one small allreduce carries the loss, the norm pieces (per worker) and any rank's stop signal
        requested, interrupted = stop() if stop is not None else (False, False)
        stats = np.zeros(3 + self.norm_slots)
        stats[:3] = loss_sum, float(requested), float(interrupted)
        stats[3 + self.norm_slot] = reducer.norm_sq_contribution()
        with comm.watch(dist.Phase.STEP_STATISTICS, step):
            comm.allreduce_(stats)
        grad_norm = float(np.sqrt(reducer.norm_sq(float(stats[3 + self.norm_slot]))))
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        td = time.perf_counter()
        lo, hi = self.partition.updated
        clip = clip_coefficient(grad_norm, t.grad_clip)
        self.opt.step(self.params[lo:hi], reducer.updated_grads, lr, clip)
        if self.weights16 is not None:
            self.weights16.changed(lo, hi)          # shared: this rank's slice of the copy, now
        if self.partition.zero:
            with self.group.watch(dist.Phase.PARAMETER_GATHER, step):
                reducer.allgather_params()          # (shared: the barrier after which all is converted)
        if self.weights16 is not None:
            self.weights16.current()                # (a private copy: remade by its next pass)
        timing["optim"] += time.perf_counter() - td
        outer = None
        if self.outer is not None and self.outer.due(step + 1, t.max_steps):
            with comm.watch(dist.Phase.OUTER_SYNC, step):
                outer = self.outer.sync(self.params, step + 1)
                self._slice_updated()
            timing["outer"] += outer.seconds
        loss = float(stats[0] * (1.0 / (len(micro) * comm.size)))     # the global batch's mean
        return StepResult(loss, grad_norm, lr, bool(stats[1]), bool(stats[2]), outer)

    def _slice_updated(self) -> None:
        """This rank has written its owned slice of the parameters (an outer sync): the host's
        other ranks see it, and so does the bf16 copy."""
        w16 = self.weights16
        if w16 is not None:
            w16.changed(*self.partition.owned)  # (shared: converts this rank's slice; private: stale)
        self.reducer.allgather_params()         # (one copy on the host: a barrier makes it visible)
        if w16 is not None:
            w16.current()

    def check_params(self, step: int) -> None:
        """The parameter check: every rank agrees; under DiLoCo only the host's ranks do between
        outer syncs (each host has its own parameters then), all of them right after one."""
        everywhere = self.outer is None or self.outer.last_sync == step
        check_params_agree(self.comm if everywhere else self.group, self.params, step)

    def broadcast_params(self) -> None:
        """Rank 0's parameters on every rank (the start of a run)."""
        if self.outer is None:
            self.reducer.broadcast_params()
        else:       # to every host (the group's reducer only reaches its own), then the cycle starts
            a, b = self.partition.owned
            self.outer.column.bcast_(self.params[a:b])  # host 0's slice to every host's rank of it
            self.reducer.allgather_params()
            self.outer.reset(self.params, 0)
        self._weights_updated()

    def _weights_updated(self) -> None:
        """Every parameter changed (a broadcast, a checkpoint load): the bf16 copy follows. A shared
        copy is converted here, a slice per rank, then a barrier; a rank's own copy by its next pass."""
        w16 = self.weights16
        if w16 is None:
            return
        w16.changed_all()
        if w16.shared:
            self.group.shared_barrier()
        w16.current()

    def load_state(self, params: np.ndarray, m: np.ndarray, v: np.ndarray, state: TrainingState,
                   outer: tuple[np.ndarray, np.ndarray, int] | None = None) -> None:
        """This rank's owned slices from a checkpoint -> full parameters, and moments where kept.
        DiLoCo: `outer` is (global parameters, momentum, the step of the last sync) of the slice;
        None starts a cycle at this step from the loaded parameters."""
        a, b = self.partition.owned
        self.params[a:b] = params
        self.reducer.allgather_params()             # (within the host under DiLoCo: its reducer's ranks)
        self._weights_updated()
        if self.outer is not None:
            if outer is None:
                self.outer.reset(self.params, state.step)
            else:
                self.outer.global_[:], self.outer.momentum[:], self.outer.last_sync = outer
        opt = self.opt
        if self.partition.zero:
            opt.m[:], opt.v[:] = m, v
        else:
            opt.m[a:b], opt.v[a:b] = m, v
            self.group.allgatherv_(opt.m, self.partition.ranges)
            self.group.allgatherv_(opt.v, self.partition.ranges)
        opt.t = state.step

    def state_slices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """params, m, v of this rank's owned slice (its checkpoint shard)."""
        a, b = self.partition.owned
        if self.partition.zero:
            return self.params[a:b], self.opt.m, self.opt.v
        return self.params[a:b], self.opt.m[a:b], self.opt.v[a:b]

    def outer_slices(self) -> tuple[np.ndarray, np.ndarray] | None:
        """DiLoCo: the global parameters and outer momentum of this rank's owned slice."""
        return None if self.outer is None else (self.outer.global_, self.outer.momentum)
