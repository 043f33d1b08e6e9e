"""The communicator: MPI through mpi4py when launched by mpirun/srun, a single process otherwise.

Gradient reduction works on the flat gradient buffer in buckets of whole layers. The backward
pass finishes layers last-to-first, so each bucket is handed to a non-blocking collective as soon
as its lowest layer is done, and the reductions run while the earlier layers are still computing.
MPICH only advances non-blocking collectives inside MPI calls, so every finished layer also tests
the pending requests.

Replicated mode allreduces every bucket; ZeRO-1 reduce-scatters it, each rank receiving the sums
of only the part of the bucket that falls in its own slice of the flat vector.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID",
                  "HYDI_CONTROL_FD")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (so initialising MPI is worth it)."""
    if os.environ.get("DISTGPT_NO_MPI") == "1":
        return False
    return any(v in os.environ for v in _LAUNCHER_VARS)


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's slice [start, end) of an n-element vector split as evenly as possible."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Comm:
    """A single process: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    n_nodes = 1
    library = "none (single process)"
    is_mpi = False

    def barrier(self) -> None:
        pass

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
        return buf

    def bcast_obj(self, obj, root: int = 0):
        return obj

    def allgather_obj(self, obj) -> list:
        return [obj]

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        return buf

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        pass

    def start_allreduce(self, buf: np.ndarray):
        return None

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray, counts: list[int]):
        recv[...] = send
        return None

    def test(self, requests: list) -> None:
        pass

    def wait(self, requests: list) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class MPIComm(Comm):
    is_mpi = True

    def __init__(self):
        from mpi4py import MPI

        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        leaders = self.world.allgather(self.local_rank == 0)
        self.n_nodes = sum(leaders)
        node.Free()
        self.library = MPI.Get_library_version().splitlines()[0].strip()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def barrier(self) -> None:
        self.world.Barrier()

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
        self.world.Allreduce(self.MPI.IN_PLACE, buf, op=self._ops[op])
        return buf

    def bcast_obj(self, obj, root: int = 0):
        return self.world.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        return self.world.allgather(obj)

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        self.world.Bcast(buf, root=root)
        return buf

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Every rank contributes buf[ranges[rank]]; afterwards all ranks hold all of buf."""
        counts = [e - s for s, e in ranges]
        displs = [s for s, _ in ranges]
        self.world.Allgatherv(self.MPI.IN_PLACE, [buf, counts, displs, self.MPI._typedict[buf.dtype.char]])

    def start_allreduce(self, buf: np.ndarray):
        return self.world.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray, counts: list[int]):
        return self.world.Ireduce_scatter(send, recv, counts, op=self.MPI.SUM)

    def test(self, requests: list) -> None:
        if requests:
            self.MPI.Request.Testall(requests)

    def wait(self, requests: list) -> None:
        if requests:
            self.MPI.Request.Waitall(requests)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.world.Abort(code)


def init() -> Comm:
    """MPI when launched by an MPI launcher and mpi4py imports; otherwise a single process."""
    if not launched_by_mpi():
        return Comm()
    try:
        return MPIComm()
    except ImportError:
        warnings.warn("launched by an MPI launcher but mpi4py is not installed: running single-process",
                      stacklevel=2)
        return Comm()


# ----------------------------------------------------------------------------- threads per rank

@dataclass
class ThreadSetup:
    threads: int
    blas: str
    oversubscribed: bool
    limiter: object      # keeps the threadpoolctl limit alive


def setup_threads(comm: Comm, threads_per_rank: int | str) -> ThreadSetup:
    """Give each rank its share of its own node's cores (ranks per node come from MPI).

    The rank's threads are distgpt's own kernel threads (ops.set_threads); BLAS is held to one
    thread inside them, so each core runs exactly one busy thread."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from distgpt import ops

    cores = os.cpu_count() or 1
    bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if threads_per_rank == "auto":
        # a launcher that bound this rank to some cores has already chosen for us
        threads = bound if bound < cores else max(1, cores // comm.local_size)
    else:
        threads = int(threads_per_rank)
    oversubscribed = threads * comm.local_size > cores
    limiter = threadpool_limits(limits=1)
    os.environ["OMP_NUM_THREADS"] = "1"
    ops.set_threads(threads)
    infos = threadpool_info()
    blas = ", ".join(sorted({f"{i.get('internal_api')} {i.get('version') or ''}".strip()
                             for i in infos if i.get("user_api") == "blas"})) or "unknown"
    return ThreadSetup(threads, blas, oversubscribed, limiter)


# ----------------------------------------------------------------------------- gradient reduction

class GradReducer:
    """Sums the flat gradient buffer across ranks, bucket by bucket.

    After finish(): replicated mode -> `grads` holds the sum everywhere; ZeRO-1 -> `shard_grads`
    (this rank's slice [start, end)) holds the sum, and the rest of `grads` is stale.
    """

    def __init__(self, comm: Comm, layer_ranges: list[tuple[int, int]], n: int, grads: np.ndarray,
                 zero: bool, bucket_bytes: int):
        self.comm, self.grads, self.zero, self.n = comm, grads, zero, n
        self.ranges = [shard_range(n, r, comm.size) for r in range(comm.size)]
        self.start, self.end = self.ranges[comm.rank]
        self.shard_grads = np.zeros(self.end - self.start, grads.dtype) if zero else grads
        # buckets of whole layers, last layer first; the top bucket also holds ln_f (after the layers)
        # and the final one the embeddings (before them), which are only done when backward ends
        self.buckets: list[tuple[int, int]] = []
        self.bucket_of_layer: dict[int, int] = {}
        hi, lo = n, n
        for layer in reversed(range(len(layer_ranges))):
            lo = layer_ranges[layer][0]
            if (hi - lo) * grads.itemsize >= bucket_bytes or layer == 0:
                self.bucket_of_layer[layer] = len(self.buckets)
                self.buckets.append((lo, hi))
                hi = lo
        self.buckets.append((0, layer_ranges[0][0] if layer_ranges else n))
        self.pending: list = []
        self.started = 0

    def _start(self, bucket: int) -> None:
        lo, hi = self.buckets[bucket]
        if self.zero:
            counts = [max(0, min(hi, e) - max(lo, s)) for s, e in self.ranges]
            a, b = max(lo, self.start), min(hi, self.end)
            recv = self.shard_grads[max(0, a - self.start):max(0, b - self.start)]
            req = self.comm.start_reduce_scatter(self.grads[lo:hi], recv, counts)
        else:
            req = self.comm.start_allreduce(self.grads[lo:hi])
        if req is not None:
            self.pending.append(req)
        self.started = bucket + 1

    def layer_done(self, layer: int) -> None:
        """Backward hook: start the bucket that `layer` completes; push pending ones along."""
        bucket = self.bucket_of_layer.get(layer)
        if bucket is not None:
            self._start(bucket)
        self.comm.test(self.pending)

    def finish(self) -> None:
        """Start whatever did not start during backward, then wait for everything."""
        for bucket in range(self.started, len(self.buckets)):
            self._start(bucket)
        self.comm.wait(self.pending)
        self.pending = []
        self.started = 0

    def grad_sq_sum(self) -> float:
        """Sum of squared gradients of this rank's part (the whole vector when replicated)."""
        g = self.shard_grads
        return float(np.dot(g, g))
