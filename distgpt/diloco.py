"""DiLoCo's outer loop (Douillard et al. 2023, arXiv 2311.08105): hosts that train alone and agree
every few hundred steps, so that a slow network between them stops mattering.

A worker is a host (an MPI node). Its ranks step together exactly as in synchronous training (the
shared-memory gradient sum, ZeRO-1 inside the host), but no gradient leaves the host. Every
`inner_steps` steps, and at train.max_steps, the hosts sync:

    delta_k  = global - params_k               the pseudo-gradient of worker k (global: the
                                               parameters every worker started the cycle from)
    delta    = mean over the workers of delta_k
    buf      = momentum * buf + delta           SGD with Nesterov momentum on the global parameters,
    global  -= lr * (delta + momentum * buf)    as torch.optim.SGD(nesterov=True, dampening=0) does
                                               (without Nesterov: global -= lr * buf)
    params_k = global                          every worker starts the next cycle from it

The sign matters: delta is a gradient-like direction (where the worker went, reversed), so the
outer step with lr 1 and no momentum lands exactly on the workers' mean. Each worker keeps its own
AdamW moments; the inner learning-rate schedule runs on the global step and never re-warms.

The outer state (global parameters, momentum, both fp32) is sliced like the parameters: local rank
l of every host holds, and syncs, slice l of the host's partition, with local rank l of the other
hosts (Comm.column), so the host's traffic is spread over its ranks and no rank holds more than its
slice. The mean is a reduce-scatter (each part summed by its owner) then an allgather, 2 (W-1)/W of
the slice sent per rank; on the wire (parallel.diloco.wire) the pseudo-gradient is fp32, or bf16:
the parts rounded to bf16, summed in fp32 in host order by the owner, the means rounded to bf16
again for the allgather, so every host applies the same numbers and half the bytes cross.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from distgpt import bf16
from distgpt.config import DilocoConfig
from distgpt.dist import Comm
from distgpt.partition import even_ranges
from distgpt.threads import parallel_for

CHUNK = 1 << 16      # elements per pass of the outer update: its three arrays and a scratch stay in L2


def outer_update(global_: np.ndarray, momentum: np.ndarray, delta: np.ndarray, lr: float, mu: float,
                 nesterov: bool) -> None:
    """One outer SGD step on the global parameters, in place (the module docstring's formulas):
    cache-sized chunks split over the rank's threads, no temporaries of the slice's size (whole-array
    expressions made three of them, each a fresh allocation whose first touch cost more than the
    arithmetic: 4.5 s for GPT-2's 124M values, one rank)."""
    mu32, lr32 = np.float32(mu), np.float32(lr)

    def work(first: int, last: int) -> None:
        scratch = np.empty(CHUNK, np.float32)
        for lo in range(first * CHUNK, min(last * CHUNK, global_.size), CHUNK):
            hi = min(lo + CHUNK, global_.size)
            g, m, d, step = global_[lo:hi], momentum[lo:hi], delta[lo:hi], scratch[:hi - lo]
            m *= mu32                           # buf = mu buf + delta
            m += d
            if nesterov:                        # step = delta + mu buf
                np.multiply(m, mu32, out=step)
                step += d
            else:
                step[:] = m
            step *= lr32                        # global -= lr step
            g -= step

    parallel_for(-(-global_.size // CHUNK), work)


def sync_steps(step_done: int, inner_steps: int, max_steps: int) -> bool:
    """Whether the hosts sync after `step_done` steps: every inner_steps steps, and at the end."""
    return step_done % inner_steps == 0 or step_done == max_steps


def wire_bytes(n: int, workers: int, wire: str) -> int:
    """Bytes one rank sends to sync n values with `workers` hosts: a reduce-scatter then an
    allgather, each sending (W - 1) / W of the values (what a ring allreduce sends too)."""
    width = 4 if wire == "fp32" else 2
    return 2 * (workers - 1) * n * width // workers if workers > 1 else 0


def _touched(n: int, dtype: type) -> np.ndarray:
    a = np.empty(n, dtype)
    a.fill(0)
    return a


@dataclass
class OuterStats:
    """One outer sync, as metrics.jsonl records it."""

    seconds: float      # the sync's time on this rank, pseudo-gradient to new parameters
    bytes: int          # what this rank sent to the other hosts (wire_bytes)
    norm: float         # the norm of the averaged pseudo-gradient (all of it, every slice)


class OuterSync:
    """The outer state of this rank's slice [lo, hi) and the sync that updates it.

    `column` holds the ranks with this local rank, one per host; `world` is every rank (for the
    norm's sum). reset() starts a cycle from the parameters as they are (the start of a run)."""

    def __init__(self, cfg: DilocoConfig, world: Comm, column, lo: int, hi: int):
        self.cfg, self.world, self.column = cfg, world, column
        self.lo, self.hi = lo, hi
        self.workers = column.size
        n = hi - lo
        # zero-filled now, not lazily by the kernel (np.zeros): the first sync would pay the page faults
        self.global_, self.momentum, self.delta = (_touched(n, np.float32) for _ in range(3))
        self.last_sync = 0          # the step the global parameters were last set at
        self.outer_steps = 0
        # bf16 wire: this rank's part of the slice, and the others', for the reduce-scatter
        self.parts = even_ranges(n, self.workers)
        self.counts = [b - a for a, b in self.parts]
        mine = self.counts[column.rank]
        if cfg.wire == "bf16" and self.workers > 1:
            self.send16 = _touched(n, np.uint16)
            self.recv16 = _touched(self.workers * mine, np.uint16)
            self.sum32 = _touched(mine, np.float32)
        elif self.workers > 1:
            self.part32 = _touched(mine, np.float32)

    def reset(self, params: np.ndarray, step: int) -> None:
        """Start a cycle at `step` from these parameters (a run's start: no momentum yet)."""
        self.global_[:] = params[self.lo:self.hi]
        self.momentum[:] = 0.0
        self.last_sync = step

    def due(self, step_done: int, max_steps: int) -> bool:
        return sync_steps(step_done, self.cfg.inner_steps, max_steps)

    def sync(self, params: np.ndarray, step_done: int) -> OuterStats:
        """The outer step on this rank's slice of `params` (which it overwrites with the new global
        parameters). The caller makes the rest of the host see them (a barrier or an allgather)."""
        t0 = time.perf_counter()
        cfg, delta = self.cfg, self.delta
        np.subtract(self.global_, params[self.lo:self.hi], out=delta)
        if self.workers > 1:
            if cfg.wire == "bf16":
                self._mean_bf16(delta)
            else:
                self._mean_fp32(delta)
        norm_sq = np.array([float(np.dot(delta, delta))])
        outer_update(self.global_, self.momentum, delta, cfg.outer_lr, cfg.outer_momentum, cfg.nesterov)
        params[self.lo:self.hi] = self.global_
        self.last_sync = step_done
        self.outer_steps += 1
        # every host holds the same delta: the world's sum counts each slice once per host
        self.world.allreduce_(norm_sq)
        norm = float(np.sqrt(norm_sq[0] / self.workers))
        return OuterStats(time.perf_counter() - t0, wire_bytes(delta.size, self.workers, cfg.wire), norm)

    def _mean_fp32(self, delta: np.ndarray) -> None:
        """delta = the hosts' mean of delta: a reduce-scatter (each part summed once, by its owner),
        then an allgather. Not MPI's allreduce: at 3 hosts MPICH's folds the odd host in and out
        with whole buffers, 1.5x the bytes from one host (measured on tests/hosts.py's hosts)."""
        a, b = self.parts[self.column.rank]
        self.column.reduce_scatter_(delta, self.part32, self.counts)
        self.part32 *= np.float32(1.0 / self.workers)
        delta[a:b] = self.part32
        self.column.allgatherv_(delta, list(self.parts))

    def _mean_bf16(self, delta: np.ndarray) -> None:
        """delta = the hosts' mean of delta, through bf16 on the wire (the module docstring)."""
        me, w = self.column.rank, self.workers
        bf16.to_bf16(delta, out=self.send16)
        self.column.alltoall_(self.send16, self.recv16, self.counts)
        acc = bf16.sum_bf16(self.recv16.reshape(w, -1), self.sum32)    # in host order, in fp32
        acc *= np.float32(1.0 / w)
        a, b = self.parts[me]
        bf16.to_bf16(acc, out=self.send16[a:b])
        self.column.allgatherv_(self.send16, list(self.parts))
        bf16.to_float32(self.send16, out=delta)
