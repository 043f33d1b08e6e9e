"""The communicator: one interface (`Comm`), for a single process (every collective the identity)
and over MPI through mpi4py (`MPIComm`, when launched by mpirun/srun). Every method exists on both,
so a caller never asks which one it holds."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from distgpt import switches
from distgpt.dist.watchdog import NOT_WATCHED, Phase, Watchdog

_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID",
                  "HYDI_CONTROL_FD")

Request = Any       # an MPI request (mpi4py.MPI.Request); None where nothing is left to wait for


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (so initialising MPI is worth it) and
    DISTGPT_NO_MPI does not ask for a single process."""
    if switches.get("DISTGPT_NO_MPI") == "1":
        return False
    return any(v in os.environ for v in _LAUNCHER_VARS)


def launch_rank() -> int:
    """This process's rank as its launcher numbered it (0 when none did), readable before MPI starts:
    for a message that only one rank of a job should print."""
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


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


class Column:
    """A column (Comm.column): the ranks with one local rank, one per node, in world-rank order.
    This one is a single process's, where the column is the process itself: the identity."""

    def __init__(self, members: list[int]):
        self.members = members          # their world ranks
        self.rank = 0                   # this rank's index in members
        self.size = len(members)

    def reduce_scatter_(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> None:
        """recv = the column's sum of send[part rank], send cut into parts of counts in member order."""
        recv[...] = send

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Member i contributes buf[ranges[i]]; afterwards every member holds all of them."""

    def allreduce_(self, buf: np.ndarray) -> None:
        """buf = the column's sum of buf, in place."""

    def bcast_(self, buf: np.ndarray) -> None:
        """buf = member 0's buf, in place."""

    def alltoall_(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> None:
        """Part i of send (send cut into parts of counts, in member order) goes to member i; recv
        gets every member's part for this one, in member order: (size, counts[rank]) values."""
        recv.reshape(-1)[...] = send


class _MPIColumn(Column):
    def __init__(self, MPI, col, members: list[int]):
        super().__init__(members)
        self._MPI, self._col = MPI, col
        self.rank = col.Get_rank()

    def reduce_scatter_(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> None:
        self._col.Reduce_scatter(send, recv, counts, op=self._MPI.SUM)

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        counts, displs = [e - s for s, e in ranges], [s for s, _ in ranges]
        self._col.Allgatherv(self._MPI.IN_PLACE, [buf, counts, displs, self._MPI._typedict[buf.dtype.char]])

    def allreduce_(self, buf: np.ndarray) -> None:
        self._col.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def bcast_(self, buf: np.ndarray) -> None:
        self._col.Bcast(buf, root=0)

    def alltoall_(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> None:
        mine = counts[self.rank]
        displs = np.cumsum([0, *counts[:-1]]).tolist()
        kind = self._MPI._typedict[send.dtype.char]
        self._col.Alltoallv([send, counts, displs, kind],
                            [recv, [mine] * self.size, [i * mine for i in range(self.size)], kind])


class Comm:
    """The communicator's interface, implemented for a single process: every collective is the
    identity, there is no one to share memory with, and nothing is ever waited for. MPIComm
    implements each over MPI but watch, which both share (tests/test_comm.py checks that the two
    have the same members)."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    n_nodes = 1
    node_index = 0                      # this node's place among the nodes (by their lowest rank)
    same_ranks_per_node = True          # (the same on every node: HierarchicalReducer needs that)
    library = "none (single process)"
    is_mpi = False
    # whether a thread other than the main one may make the calls (GradReducer's comm thread)
    threads_ok = True
    _parent: Comm | None = None         # a node group's world (node_group): its watchdog, its abort
    _dog: Watchdog | None = None

    @property
    def watchdog(self) -> Watchdog | None:
        """The rank's watchdog: a node group watches with its world's."""
        return self._parent.watchdog if self._parent is not None else self._dog

    @watchdog.setter
    def watchdog(self, dog: Watchdog | None) -> None:
        self._dog = dog

    # -- the watchdog

    def watch(self, phase: str, step: int | None) -> contextlib.AbstractContextManager:
        """Mark a blocking collective for the watchdog (see Watchdog): `with comm.watch(...)`."""
        dog = self.watchdog
        return NOT_WATCHED if dog is None else dog.watch(phase, step)

    def start_watchdog(self, timeout_s: float, board: Path | None = None,
                       prefix: str = "distgpt.train") -> None:
        """A single process never waits for anyone: nothing to watch."""

    # -- blocking collectives

    def barrier(self) -> None:
        pass

    def shared_barrier(self) -> None:
        """A barrier after which every rank sees what the others wrote to shared buffers."""

    def node_barrier(self) -> None:
        """shared_barrier among this node's ranks only."""

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
        return buf

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather_obj(self, obj: Any) -> list:
        return [obj]

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        return buf

    def allgather_(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv[r] = rank r's send, for every rank."""
        recv[0] = send

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Every rank contributes buf[ranges[rank]]; afterwards all ranks hold all of buf."""

    # -- memory shared between ranks

    def shared_buffers(self, n: int, dtype: np.dtype, per_rank: bool = True
                       ) -> tuple[list[np.ndarray] | None, str]:
        """Arrays of n elements in one segment every rank maps, or (None, why not)."""
        return None, "a single process has no one to share with"

    def node_buffers(self, n: int, dtype: np.dtype) -> tuple[list[np.ndarray] | None, str]:
        """n elements per rank in a shared segment on each node, or (None, why not)."""
        return None, "a single process has no one to share with"

    def column(self) -> Column:
        """Collective: the ranks with this rank's local rank, one per node (HierarchicalReducer)."""
        return Column([self.rank])

    def node_group(self) -> Comm:
        """Collective: this node's ranks as a communicator of their own (a DiLoCo worker), sharing
        this one's watchdog; a single process where the node has one rank."""
        return self

    # -- non-blocking: requests to test and wait for (None: complete already)

    def start_allreduce(self, buf: np.ndarray) -> Request:
        return None

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> Request:
        recv[...] = send
        return None

    def start_exchange(self, sends: list[tuple[int, np.ndarray]], recvs: list[tuple[int, np.ndarray]],
                       tag: int) -> list[Request]:
        """Non-blocking point-to-point: each (rank, buffer) of sends to that rank, of recvs from it
        (a single process has no other rank to name)."""
        if sends or recvs:
            raise ValueError(f"a single process cannot exchange with ranks "
                             f"{sorted({q for q, _ in sends + recvs})}")
        return []

    def test_all(self, requests: list[Request]) -> bool:
        return True

    def wait_all(self, requests: list[Request]) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        if self._parent is not None:
            self._parent.abort(code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class MPIComm(Comm):
    is_mpi = True

    def __init__(self, comm=None, parent: MPIComm | None = None):
        from mpi4py import MPI

        self._MPI = MPI
        self._world = MPI.COMM_WORLD if comm is None else comm
        self._parent = parent
        self.rank = self._world.Get_rank()
        self.size = self._world.Get_size()
        self._node = self._world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._node.Get_rank()
        self.local_size = self._node.Get_size()
        places = self._world.allgather((self.local_rank, self.local_size))
        self.n_nodes = sum(local == 0 for local, _ in places)
        leaders = [r for r, (local, _) in enumerate(places) if local == 0]
        first = self._node.bcast(self.rank, root=0)
        self.node_index = leaders.index(first) if first in leaders else 0
        self.same_ranks_per_node = len({size for _, size in places}) == 1
        self._windows: list = []
        self.library = " ".join(MPI.Get_library_version().splitlines()[0].split())
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        # GradReducer's comm thread calls MPI while the main thread computes (never both at once)
        self.threads_ok = MPI.Query_thread() >= MPI.THREAD_SERIALIZED

    def start_watchdog(self, timeout_s: float, board: Path | None = None,
                       prefix: str = "distgpt.train") -> None:
        """Collective (agrees on a run id): from now on, a watched collective that lasts longer
        than timeout_s ends this rank (Watchdog)."""
        run_id = self._world.bcast(uuid.uuid4().hex if self.rank == 0 else None, root=0)
        if self.watchdog is not None:
            self.watchdog.stop()
        self.watchdog = Watchdog(self.rank, self.size, timeout_s, board, run_id, abort_fn=self._world.Abort,
                                 prefix=prefix)

    def barrier(self) -> None:
        self._world.Barrier()

    def shared_barrier(self) -> None:
        """A barrier after which every rank sees what the others wrote to shared windows before it
        (MPI's rule for shared memory: Win_sync, process synchronisation, Win_sync; the syncs are
        memory barriers, free on x86, required on weakly ordered CPUs)."""
        for win in self._windows:
            win.Sync()
        self._world.Barrier()
        for win in self._windows:
            win.Sync()

    def node_barrier(self) -> None:
        """shared_barrier among this node's ranks only: nothing crosses the network."""
        for win in self._windows:
            win.Sync()
        self._node.Barrier()
        for win in self._windows:
            win.Sync()

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
        self._world.Allreduce(self._MPI.IN_PLACE, buf, op=self._ops[op])
        return buf

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        return self._world.bcast(obj, root=root)

    def allgather_obj(self, obj: Any) -> list:
        return self._world.allgather(obj)

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        self._world.Bcast(buf, root=root)
        return buf

    def allgather_(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv[r] = rank r's send, for every rank."""
        self._world.Allgather(send, recv)

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Every rank contributes buf[ranges[rank]]; afterwards all ranks hold all of buf."""
        counts = [e - s for s, e in ranges]
        displs = [s for s, _ in ranges]
        self._world.Allgatherv(self._MPI.IN_PLACE, [buf, counts, displs, self._MPI._typedict[buf.dtype.char]])

    def shared_buffers(self, n: int, dtype: np.dtype, per_rank: bool = True
                       ) -> tuple[list[np.ndarray] | None, str]:
        """Arrays of n elements in one shared-memory segment that every rank maps: one per rank
        (index r is rank r's), or with per_rank=False a single one for all. Or (None, why not)
        when the ranks span several nodes or the node's /dev/shm is too small (Docker's default
        is 64 MB: touching a segment beyond it would kill the job with SIGBUS, not raise)."""
        dtype = np.dtype(dtype)
        if self.n_nodes != 1:
            return None, f"the ranks span {self.n_nodes} nodes"
        need = (self.size if per_rank else 1) * n * dtype.itemsize
        # MPICH backs shared windows with files in /dev/shm; elsewhere there is nothing to check
        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else math.inf
        enough = self._node.allreduce(int(free >= need * 1.05), op=self._MPI.MIN)   # one answer for all
        if not enough:
            return None, f"/dev/shm has {free / 2**20:.0f} MiB free, {need / 2**20:.0f} MiB are needed"
        mine = n if per_rank or self.rank == 0 else 0
        win = self._MPI.Win.Allocate_shared(mine * dtype.itemsize, dtype.itemsize, comm=self._node)
        win.Lock_all(self._MPI.MODE_NOCHECK)   # a passive epoch for the job's life: see shared_barrier
        self._windows.append(win)   # the memory lives as long as the window
        owners = range(self.size) if per_rank else [0]
        arrays = [np.frombuffer(win.Shared_query(r)[0], dtype, n) for r in owners]
        if per_rank:
            arrays[self.rank][:] = 0
        elif self.rank == 0:
            arrays[0][:] = 0
        self.shared_barrier()
        return arrays, ""

    def node_buffers(self, n: int, dtype: np.dtype) -> tuple[list[np.ndarray] | None, str]:
        """Collective over all ranks: n elements per rank in a shared segment on each node (index
        l is local rank l's), on every node or on none: (None, why) when some node's /dev/shm
        lacks the room. Unlike shared_buffers, for any number of nodes."""
        dtype = np.dtype(dtype)
        need = self.local_size * n * dtype.itemsize
        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else math.inf
        # one answer for the whole job: a node that chose otherwise would wait in other collectives
        if not self._world.allreduce(int(free >= need * 1.05), op=self._MPI.MIN):
            return None, f"/dev/shm lacks {need / 2**20:.0f} MiB on some node"
        win = self._MPI.Win.Allocate_shared(n * dtype.itemsize, dtype.itemsize, comm=self._node)
        win.Lock_all(self._MPI.MODE_NOCHECK)
        self._windows.append(win)
        arrays = [np.frombuffer(win.Shared_query(q)[0], dtype, n) for q in range(self.local_size)]
        arrays[self.local_rank][:] = 0
        self.node_barrier()
        return arrays, ""

    def column(self) -> Column:
        """Collective: the ranks with this rank's local rank, one per node, in world-rank order."""
        col = self._world.Split(color=self.local_rank, key=self.rank)
        return _MPIColumn(self._MPI, col, col.allgather(self.rank))

    def node_group(self) -> Comm:
        if self.local_size == 1:
            solo = Comm()
            solo._parent = self
            return solo
        return MPIComm(self._node.Dup(), parent=self)


    def start_allreduce(self, buf: np.ndarray) -> Request:
        return self._world.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray, counts: list[int]) -> Request:
        return self._world.Ireduce_scatter(send, recv, counts, op=self._MPI.SUM)

    def start_exchange(self, sends: list[tuple[int, np.ndarray]], recvs: list[tuple[int, np.ndarray]],
                       tag: int) -> list[Request]:
        """Non-blocking point-to-point: each (rank, buffer) of sends to that rank, of recvs from it."""
        return ([self._world.Irecv(buf, source=q, tag=tag) for q, buf in recvs]
                + [self._world.Isend(buf, dest=q, tag=tag) for q, buf in sends])

    def test_all(self, requests: list[Request]) -> bool:
        return self._MPI.Request.Testall(requests)

    def wait_all(self, requests: list[Request]) -> None:
        self._MPI.Request.Waitall(requests)

    def abort(self, code: int = 1) -> None:
        if self._parent is not None:
            self._parent.abort(code)
        sys.stdout.flush()
        sys.stderr.flush()
        dog = self.watchdog
        # MPI_Abort has to reach the other hosts' launchers and can hang when the network is down
        with dog.watch(Phase.ABORT, dog.step) if dog else NOT_WATCHED:
            self._world.Abort(code)
