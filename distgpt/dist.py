"""The communicator: MPI through mpi4py when launched by mpirun/srun, a single process otherwise.

Gradients are summed by one of two reducers with the same interface (make_reducer picks):

- SharedMemoryReducer, when every rank is on one node: the ranks' gradient buffers are parts of
  one shared-memory segment, and rank r sums slice r of all of them directly after backward.
- HierarchicalReducer, on several nodes with several ranks on each: shared memory within each
  node, then MPI between nodes for 1/(ranks per node) of the gradient per rank.
- GradReducer, otherwise: buckets of whole layers go to non-blocking MPI calls as backward
  finishes them (the token table first, then the last layer first), so the reductions run while
  earlier layers still compute. MPICH only advances transfers inside MPI calls, so a thread of
  each rank makes those calls and tests them every millisecond (parallel.comm_thread); gradients
  may travel as bf16 (parallel.grad_wire).

Replicated mode leaves the whole sum on every rank; ZeRO-1 only rank r's slice on rank r (the
partition, distgpt/partition.py, says which slice that is). The reducer also decides where the
flat parameter and gradient buffers live, since shared memory has to be allocated through MPI.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distgpt import bf16
from distgpt.partition import Partition
from distgpt.threads import parallel_for

_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID",
                  "HYDI_CONTROL_FD")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (so initialising MPI is worth it)."""
    if os.environ.get("DISTGPT_NO_MPI") == "1":
        return False
    return any(v in os.environ for v in _LAUNCHER_VARS)


class Comm:
    """A single process: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    n_nodes = 1
    library = "none (single process)"
    is_mpi = False
    watchdog: Watchdog | None = None

    def watch(self, phase: str, step: int | None) -> contextlib.AbstractContextManager:
        """Mark a blocking collective for the watchdog (see Watchdog): `with comm.watch(...)`."""
        dog = self.watchdog
        return _NOT_WATCHED if dog is None else dog.watch(phase, step)

    def start_watchdog(self, timeout_s: float, board: Path | None = None) -> None:
        """A single process never waits for anyone: nothing to watch."""

    def barrier(self) -> None:
        pass

    def shared_barrier(self) -> None:
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

    def allgather_(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv[r] = rank r's send, for every rank."""
        recv[0] = send

    def shared_buffers(self, n: int, dtype: np.dtype, per_rank: bool = True
                       ) -> tuple[list[np.ndarray] | None, str]:
        return None, "a single process has no one to share with"

    def start_allreduce(self, buf: np.ndarray):
        return None

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray, counts: list[int]):
        recv[...] = send
        return None

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
        self.node = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.node.Get_rank()
        self.local_size = self.node.Get_size()
        places = self.world.allgather((self.local_rank, self.local_size))
        self.n_nodes = sum(local == 0 for local, _ in places)
        self.same_ranks_per_node = len({size for _, size in places}) == 1
        self._windows: list = []
        self.library = " ".join(MPI.Get_library_version().splitlines()[0].split())
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        # GradReducer's comm thread calls MPI while the main thread computes (never both at once)
        self.threads_ok = MPI.Query_thread() >= MPI.THREAD_SERIALIZED

    def barrier(self) -> None:
        self.world.Barrier()

    def shared_barrier(self) -> None:
        """A barrier after which every rank sees what the others wrote to shared windows before it
        (MPI's rule for shared memory: Win_sync, process synchronisation, Win_sync; the syncs are
        memory barriers, free on x86, required on weakly ordered CPUs)."""
        for win in self._windows:
            win.Sync()
        self.world.Barrier()
        for win in self._windows:
            win.Sync()

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

    def allgather_(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv[r] = rank r's send, for every rank."""
        self.world.Allgather(send, recv)

    def allgatherv_(self, buf: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Every rank contributes buf[ranges[rank]]; afterwards all ranks hold all of buf."""
        counts = [e - s for s, e in ranges]
        displs = [s for s, _ in ranges]
        self.world.Allgatherv(self.MPI.IN_PLACE, [buf, counts, displs, self.MPI._typedict[buf.dtype.char]])

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
        enough = self.node.allreduce(int(free >= need * 1.05), op=self.MPI.MIN)   # one answer for all
        if not enough:
            return None, f"/dev/shm has {free / 2**20:.0f} MiB free, {need / 2**20:.0f} MiB are needed"
        mine = n if per_rank or self.rank == 0 else 0
        win = self.MPI.Win.Allocate_shared(mine * dtype.itemsize, dtype.itemsize, comm=self.node)
        win.Lock_all(self.MPI.MODE_NOCHECK)   # a passive epoch for the job's life: see shared_barrier
        self._windows.append(win)   # the memory lives as long as the window
        owners = range(self.size) if per_rank else [0]
        arrays = [np.frombuffer(win.Shared_query(r)[0], dtype, n) for r in owners]
        if per_rank:
            arrays[self.rank][:] = 0
        elif self.rank == 0:
            arrays[0][:] = 0
        self.shared_barrier()
        return arrays, ""

    def node_barrier(self) -> None:
        """shared_barrier among this node's ranks only: nothing crosses the network."""
        for win in self._windows:
            win.Sync()
        self.node.Barrier()
        for win in self._windows:
            win.Sync()

    def node_buffers(self, n: int, dtype: np.dtype) -> tuple[list[np.ndarray] | None, str]:
        """Collective over all ranks: n elements per rank in a shared segment on each node (index
        l is local rank l's), on every node or on none: (None, why) when some node's /dev/shm
        lacks the room. Unlike shared_buffers, for any number of nodes."""
        dtype = np.dtype(dtype)
        need = self.local_size * n * dtype.itemsize
        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else math.inf
        # one answer for the whole job: a node that chose otherwise would wait in other collectives
        if not self.world.allreduce(int(free >= need * 1.05), op=self.MPI.MIN):
            return None, f"/dev/shm lacks {need / 2**20:.0f} MiB on some node"
        win = self.MPI.Win.Allocate_shared(n * dtype.itemsize, dtype.itemsize, comm=self.node)
        win.Lock_all(self.MPI.MODE_NOCHECK)
        self._windows.append(win)
        arrays = [np.frombuffer(win.Shared_query(q)[0], dtype, n) for q in range(self.local_size)]
        arrays[self.local_rank][:] = 0
        self.node_barrier()
        return arrays, ""

    def column(self):
        """Collective: the communicator of the ranks with this rank's local rank, one per node,
        in world-rank order, and their world ranks."""
        col = self.world.Split(color=self.local_rank, key=self.rank)
        return col, col.allgather(self.rank)

    def start_allreduce(self, buf: np.ndarray):
        return self.world.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray, counts: list[int]):
        return self.world.Ireduce_scatter(send, recv, counts, op=self.MPI.SUM)

    def start_exchange(self, sends: list[tuple[int, np.ndarray]], recvs: list[tuple[int, np.ndarray]],
                       tag: int) -> list:
        """Non-blocking point-to-point: each (rank, buffer) of sends to that rank, of recvs from it."""
        return ([self.world.Irecv(buf, source=q, tag=tag) for q, buf in recvs]
                + [self.world.Isend(buf, dest=q, tag=tag) for q, buf in sends])

    def test_all(self, requests: list) -> bool:
        return self.MPI.Request.Testall(requests)

    def wait_all(self, requests: list) -> None:
        self.MPI.Request.Waitall(requests)

    def start_watchdog(self, timeout_s: float, board: Path | None = None) -> None:
        """Collective (agrees on a run id): from now on, a watched collective that lasts longer
        than timeout_s ends this rank (Watchdog)."""
        run_id = self.world.bcast(uuid.uuid4().hex if self.rank == 0 else None, root=0)
        if self.watchdog is not None:
            self.watchdog.stop()
        self.watchdog = Watchdog(self.rank, self.size, timeout_s, board, run_id, abort_fn=self.world.Abort)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        dog = self.watchdog
        # MPI_Abort has to reach the other hosts' launchers and can hang when the network is down
        with dog.watch("abort", dog.step) if dog else _NOT_WATCHED:
            self.world.Abort(code)


# ----------------------------------------------------------------------------- the watchdog

_NOT_WATCHED = contextlib.nullcontext()
TIMEOUT_EXIT = 3        # the exit code of a rank that timed out in a collective
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)     # train.StopFlag's: "checkpoint and exit"


class Watchdog:
    """Ends this rank when a blocking collective does not complete in timeout_s seconds.

    A dead peer normally ends the job through the launcher, but a host that vanishes from the
    network (a pulled cable, a hung kernel) leaves the others blocked in MPI forever: TCP only
    retransmits. The training loop marks each blocking collective with `watch(phase, step)`; that
    costs a few attribute writes (about a microsecond) and no communication per collective. A
    thread checks a few times a second: at timeout/4 it prints one warning, at timeout one error
    line naming the step, the phase and, when it can tell, the ranks that never arrived, then calls
    MPI_Abort (without it, mpirun would wait for the unreachable host's launcher forever) and
    hard-exits if that has not ended the process within 5 s: MPI_Abort can hang with the network down.

    A stop signal (SIGTERM/SIGUSR1) is normally acted on at the next step boundary, which a rank
    stuck in a collective never reaches (Python runs signal handlers only between bytecodes, not
    inside MPI_Wait). The thread hears the signal through signal.set_wakeup_fd, and if the rank is
    (still) in a collective `grace` seconds later it exits at once, without a checkpoint (one
    cannot be written collectively): the newest complete checkpoint is then the one to resume.

    Which ranks are missing: a rank that has waited timeout/4 writes `rank_R.json` (run id, index
    of the collective) into `board`, the output directory shared by all nodes; at timeout it reads
    the others'. File I/O runs in helper threads with a deadline, as a shared file system can hang
    with the network that took the job down.
    """

    def __init__(self, rank: int, size: int, timeout_s: float, board: Path | None = None,
                 run_id: str = "", abort_fn=None, stream=None, exit_fn=os._exit):
        self.rank, self.size, self.timeout, self.board, self.run_id = rank, size, timeout_s, board, run_id
        self.abort_fn, self.stream, self.exit_fn = abort_fn, stream, exit_fn
        self.grace = min(10.0, timeout_s / 4)
        self.tick = min(0.5, timeout_s / 20)
        # the state the hot path writes: which collective (phase; None outside), since when, at
        # which step, and how many collectives were entered so far (the same count on every rank)
        self.phase: str | None = None
        self.step: int | None = None
        self.since = 0.0
        self.entered = 0
        self._stopped = False
        self._wake_r, wake_w = socket.socketpair()
        self._wake_w = wake_w
        wake_w.setblocking(False)
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="distgpt-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, phase: str, step: int | None) -> Iterator[None]:
        """Inside: this rank is blocked in collective `phase` of step `step` (None: no step yet)."""
        self.step, self.since = step, time.monotonic()
        self.entered += 1
        self.phase = phase              # last: the thread reads phase first
        try:
            yield
        finally:
            self.phase = None

    def stop(self) -> None:
        self._stopped = True
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)

    # the thread's side

    def _run(self) -> None:
        warned = -1                         # the collective (its `entered`) already warned about
        signalled: float | None = None      # when a stop signal arrived
        while not self._stopped:
            ready, _, _ = select.select([self._wake_r], [], [], self.tick)
            if ready and any(b in STOP_SIGNALS for b in self._wake_r.recv(64)) and signalled is None:
                signalled = time.monotonic()
            phase, entered, since, step = self.phase, self.entered, self.since, self.step
            if phase is None:
                continue
            now = time.monotonic()
            waited = now - since
            if waited >= self.timeout:
                self._give_up(step, entered, f"timed out after {waited:.0f} s in {phase}")
                return
            stuck = signalled is not None and now - max(since, signalled) >= self.grace
            if stuck and phase != "checkpoint save":   # the save is what the signal asks for
                self._give_up(step, entered, f"stop signal while stuck for {waited:.0f} s in {phase}",
                              code=143, then="exiting without a checkpoint (resume takes the newest one)")
                return
            if waited >= self.timeout / 4 and warned != entered:
                warned = entered
                self._say(f"distgpt.train: warning: {self._where(step)}waiting for {waited:.0f} s in {phase} "
                          f"(parallel.timeout_s = {self.timeout:g})")
                self._with_deadline(self._publish, entered)

    def _where(self, step: int | None) -> str:
        return f"rank {self.rank}: " + ("" if step is None else f"step {step}: ")

    def _give_up(self, step: int | None, entered: int, what: str, code: int = TIMEOUT_EXIT,
                 then: str = "") -> None:
        who = self._with_deadline(self._missing, entered) or "the other ranks"
        self._say(f"distgpt.train: error: {self._where(step)}{what} waiting for {who}"
                  + (f": {then}" if then else ""))
        self._stopped = True
        if self.abort_fn is not None:
            sys.stdout.flush()
            time.sleep(0.5)     # the launcher relays our output; an abort can outrun the line above
            self._with_deadline(self.abort_fn, code, seconds=5.0)
        self.exit_fn(code)

    def _say(self, line: str) -> None:
        stream = self.stream or sys.stderr
        print(line, file=stream, flush=True)

    @staticmethod
    def _with_deadline(fn, *args, seconds: float = 2.0):
        """fn(*args) in a helper thread: its result, or None if it has not returned in time."""
        box: list = []
        helper = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
        helper.start()
        helper.join(seconds)
        return box[0] if box else None

    def _publish(self, entered: int) -> None:
        if self.board is None:
            return
        with contextlib.suppress(OSError):
            self.board.mkdir(parents=True, exist_ok=True)
            tmp = self.board / f".rank_{self.rank:05d}.tmp"
            tmp.write_text(json.dumps({"run": self.run_id, "entered": entered}))
            os.replace(tmp, self.board / f"rank_{self.rank:05d}.json")

    def _missing(self, entered: int) -> str | None:
        """`ranks [..]`: the ranks that have not published reaching collective `entered` (None:
        cannot tell). A rank past it (a broadcast's root) has reached it."""
        if self.board is None:
            return None
        self._publish(entered)
        arrived = {self.rank}
        for r in range(self.size):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                rec = json.loads((self.board / f"rank_{r:05d}.json").read_text())
                if rec["run"] == self.run_id and rec["entered"] >= entered:
                    arrived.add(r)
        missing = [r for r in range(self.size) if r not in arrived]
        return (f"ranks {missing}" if missing
                else "the other ranks, which have all reached it (the network or MPI is stuck)")


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


# ----------------------------------------------------------------------------- gradient reduction

@dataclass
class _Bucket:
    """A run of whole layers' gradients [lo, hi) and where its sum goes."""

    index: int                 # in GradReducer.buckets (the order every rank starts them in); tags
    lo: int
    hi: int
    counts: list[int]          # elements of the bucket in each rank's owned slice
    displs: list[int]          # where each rank's part starts, relative to lo
    own: tuple[int, int]       # this rank's part of it, absolute [a, b) within [lo, hi)
    target: np.ndarray         # where this rank's part of the sum goes (updated_grads or grads)
    recv: np.ndarray | None = None      # bf16 wire: every rank's copy of this rank's part, (ranks, b - a)
    stage: int = 0             # collectives finished so far
    requests: list = field(default_factory=list)     # MPI requests of the open stage


class GradReducer:
    """Sums the flat gradient buffer across ranks with MPI, bucket by bucket.

    After finish(): `updated_grads` (the gradients of partition.updated) holds the sum over ranks;
    under ZeRO-1 that is this rank's own slice in a buffer of its own and the rest of `grads` is stale.
    Every rank keeps its own copy of the parameters (`params`).

    Buckets of whole layers go out as backward completes them (last layer first); the top one also
    holds ln_f, the last one the embeddings, which are done only when backward ends. With the comm
    thread (parallel.comm_thread), a thread of this rank makes every MPI call of the sum, testing
    the open requests every millisecond, so the transfers keep moving while the main thread
    computes (MPICH advances non-blocking collectives only inside MPI calls); without it, each
    finished layer tests them once.

    On the wire (parallel.grad_wire), fp32 is MPI's own reduce-scatter (ZeRO-1) or allreduce. bf16
    rounds each rank's gradients to bf16 and sends rank q its part of them, point to point (the
    reduce-scatter's traffic in half the bytes); the owner widens the parts back to fp32 and adds
    them in rank order, which makes the sum the same whatever MPI's algorithms. Replicated, it then
    gathers the sums, rounded to bf16 again, to every rank, and every rank (the owner too) uses
    those rounded sums, so that all ranks apply the same update. As PyTorch DDP's bf16 compression
    hook, except that DDP adds in bf16.

    The token table (wte, a third of GPT-2's parameters) goes first: the forward's fused head has
    already computed its gradient when backward starts, all but the rows of this micro-batch's
    tokens, which backward hands over (token_rows) and finish() adds, every rank's, after the sum.
    Otherwise the table's transfer would start only when backward ends, with nothing to hide it.
    """

    POLL_S = 0.001           # the comm thread's test interval: 125 kB at 1 Gbit/s

    def __init__(self, comm: Comm, partition: Partition, layer_ranges: list[tuple[int, int]],
                 params: np.ndarray, bucket_bytes: int, wire: str = "fp32", comm_thread: bool = True,
                 token_table: tuple[int, int] | None = None):
        self.comm, self.partition, self.params = comm, partition, params
        n, zero = partition.n, partition.zero
        networked = comm.is_mpi and comm.size > 1
        self.wire = wire if networked else "fp32"      # one process: nothing crosses a wire
        self.grads = np.zeros(n, params.dtype)
        self.updated_grads = np.zeros(partition.owned_size, params.dtype) if zero else self.grads
        self.shares_params = False
        self.norm_is_partial = zero     # grad_sq_sum covers only this rank's slice
        self.waited = 0.0               # (not separable from the transfer in an MPI collective)
        self.wire16 = np.zeros(n, np.uint16) if self.wire == "bf16" else None
        recv16 = np.zeros(comm.size * partition.owned_size, np.uint16) if self.wire == "bf16" else None
        self.buckets: list[_Bucket] = []
        self.bucket_of_layer: dict[int, int] = {}
        # the token table (wte, at the start of the vector) first when backward reports it done at
        # its start (head_done); then whole layers, last first; then what precedes the layers
        self.token_table = token_table
        bounds = [(0, token_table[0] * token_table[1])] if token_table else []
        hi = n
        for layer in reversed(range(len(layer_ranges))):
            lo = layer_ranges[layer][0]
            if (hi - lo) * self.grads.itemsize >= bucket_bytes or layer == 0:
                self.bucket_of_layer[layer] = len(bounds)
                bounds.append((lo, hi))
                hi = lo
        bounds.append((bounds[0][1] if token_table else 0, layer_ranges[0][0] if layer_ranges else n))
        self.rows: tuple[np.ndarray, np.ndarray] | None = None     # token_rows() of this step
        start, end = partition.owned
        used = 0
        for lo, hi in bounds:
            counts = [max(0, min(hi, e) - max(lo, s)) for s, e in partition.ranges]
            displs = [max(0, min(hi, s) - lo) for s, _ in partition.ranges]
            a, b = min(max(lo, start), hi), max(min(hi, end), min(max(lo, start), hi))  # within [lo, hi)
            target = self.updated_grads[max(0, a - start):max(0, b - start)] if zero else self.grads[a:b]
            bucket = _Bucket(len(self.buckets), lo, hi, counts, displs, (a, b), target)
            if recv16 is not None:
                bucket.recv = recv16[used:used + comm.size * (b - a)].reshape(comm.size, b - a)
                used += comm.size * (b - a)
            self.buckets.append(bucket)
        self.started = 0
        self.active: list[_Bucket] = []
        self.thread = (_CommThread(self) if comm_thread and networked and getattr(comm, "threads_ok", False)
                       else None)

    # -- called by the main thread: model.BackwardHooks, then finish()

    def head_done(self) -> None:
        """Backward hook: start the token table's bucket (its token rows come later, sparse)."""
        if self.token_table is None:
            raise RuntimeError("head_done: this reducer was made without the token table's shape")
        self._start(0)

    def token_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Backward hook: this rank's token-embedding gradient rows, added to the sum in finish()."""
        self.rows = (ids, rows)

    def block_done(self, layer: int) -> None:
        """Backward hook: start the bucket that `layer` completes; push pending ones along."""
        bucket = self.bucket_of_layer.get(layer)
        self._start(self.started - 1 if bucket is None else bucket)

    def _start(self, last: int) -> None:
        """Start the buckets not started yet up to index `last`: in index order, on every rank
        alike, none left out."""
        new, self.started = self.buckets[self.started:last + 1], max(self.started, last + 1)
        for bucket in new:
            if self.thread is not None:
                self.thread.submit(bucket)
            else:
                self._post(bucket)
        if self.thread is None:
            self._progress(block=False)

    def finish(self) -> None:
        """Start whatever did not start during backward, then wait for everything."""
        self._start(len(self.buckets) - 1)
        self.started = 0
        if self.thread is not None:
            self.thread.drain()
        while self.active:                           # (the thread leaves none)
            self._progress(block=True)
        if self.rows is not None:
            self._add_token_rows(*self.rows)
            self.rows = None

    def _add_token_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Every rank's token rows (each rank has as many), added in rank order to the summed
        token table, where this rank holds it (its owned slice under ZeRO-1, all of it
        replicated). In fp32 whatever the wire: a few rows per token, little to send."""
        size, width = self.comm.size, rows.shape[1]
        all_ids = np.empty((size, ids.size), np.int64)
        all_rows = np.empty((size, *rows.shape), rows.dtype)
        self.comm.allgather_(np.ascontiguousarray(ids, np.int64), all_ids)
        self.comm.allgather_(np.ascontiguousarray(rows), all_rows)
        # the flat elements of every row, kept where this rank holds them (its owned slice under
        # ZeRO-1 can cut a row); np.add.at adds repeats, in rank order then row order
        start = self.partition.owned[0] if self.partition.zero else 0
        flat = all_ids.reshape(-1, 1) * width + np.arange(width)
        held = (flat >= start) & (flat < start + self.updated_grads.size)
        np.add.at(self.updated_grads, flat[held] - start, all_rows.reshape(-1, width)[held])

    # -- the collectives (the comm thread's, when there is one)

    def _post(self, bucket: _Bucket) -> bool:
        """Start the bucket's first collective; False when there was nothing to wait for."""
        lo, hi, comm = bucket.lo, bucket.hi, self.comm
        bucket.stage = 0
        if self.wire == "bf16":
            a, b = bucket.own
            bf16.to_bf16(self.grads[lo:a], out=self.wire16[lo:a])       # the parts for the others
            bf16.to_bf16(self.grads[b:hi], out=self.wire16[b:hi])
            bf16.to_bf16(self.grads[a:b], out=bucket.recv[comm.rank])   # my own, straight to the sum
            # point to point, not MPI_Ialltoallv: MPICH's advanced only a few kB per test (8 MB
            # took 2 s at 1 ms tests, against 5 ms for the same bytes as Isend/Irecv; its
            # Iallgatherv was as slow at 76 MB, so the gather below is point to point too)
            sends = [(q, self._part(bucket, q)) for q in range(comm.size) if q != comm.rank]
            recvs = [(q, bucket.recv[q]) for q in range(comm.size) if q != comm.rank]
            bucket.requests = comm.start_exchange(sends, recvs, tag=2 * bucket.index)
        elif self.partition.zero:
            bucket.requests = [comm.start_reduce_scatter(self.grads[lo:hi], bucket.target, bucket.counts)]
        else:
            bucket.requests = [comm.start_allreduce(self.grads[lo:hi])]
        if None in bucket.requests:
            return False
        self.active.append(bucket)
        return True

    def _part(self, bucket: _Bucket, q: int) -> np.ndarray:
        """Rank q's part of the bucket in the bf16 wire buffer."""
        start = bucket.lo + bucket.displs[q]
        return self.wire16[start:start + bucket.counts[q]]

    def _advance(self, bucket: _Bucket) -> bool:
        """The bucket's collective finished: start the next one, or say it is done (True)."""
        bucket.stage += 1
        if self.wire == "fp32":
            return True
        if bucket.stage == 1:                          # every rank's part of mine has arrived
            bf16.sum_bf16(bucket.recv, bucket.target)
            if self.partition.zero:
                return True
            a, b = bucket.own
            bf16.to_bf16(bucket.target, out=self.wire16[a:b])
            mine = self.wire16[a:b]
            parts = [(q, self._part(bucket, q)) for q in range(self.comm.size) if q != self.comm.rank]
            bucket.requests = self.comm.start_exchange([(q, mine) for q, _ in parts], parts,
                                                       tag=2 * bucket.index + 1)
            return False
        np.left_shift(self.wire16[bucket.lo:bucket.hi], 16,     # everyone's rounded sums, widened
                      out=self.grads[bucket.lo:bucket.hi].view(np.uint32), dtype=np.uint32)
        return True

    def _progress(self, block: bool) -> None:
        """Test the open requests (with block, first wait for the oldest bucket's) and move the
        buckets whose requests all completed on."""
        if block and self.active:
            self.comm.wait_all(self.active[0].requests)
        for bucket in list(self.active):
            if self.comm.test_all(bucket.requests) and self._advance(bucket):
                self.active.remove(bucket)

    # -- after the sum

    def grad_sq_sum(self) -> float:
        """Sum of squared gradients of updated_grads."""
        g = self.updated_grads
        return float(np.dot(g, g))

    def describe(self) -> str:
        what = "reduce-scatter" if self.partition.zero else "allreduce"
        if self.wire == "bf16":
            what = "bf16 on the wire, point to point, fp32 sums"
        return (f"MPI {what}, {len(self.buckets)} buckets"
                + (", comm thread" if self.thread is not None else ""))

    def allgather_params(self) -> None:
        """Every rank updated (or loaded) its own slice of the parameters; give everyone all of them."""
        self.comm.allgatherv_(self.params, self.partition.ranges)

    def broadcast_params(self) -> None:
        """Rank 0's parameters everywhere."""
        self.comm.bcast_(self.params)


class _CommThread:
    """A thread that makes all of a GradReducer's MPI calls during backward: the main thread hands
    it buckets (submit) and, at the end, waits until it has finished them all (drain). Only this
    thread calls MPI from the first submit to the end of drain."""

    def __init__(self, reducer: GradReducer):
        self.reducer = reducer
        self.todo: list[_Bucket] = []
        self.busy = 0                  # buckets submitted and not yet finished
        self.error: BaseException | None = None
        self.cv = threading.Condition()
        threading.Thread(target=self._run, name="distgpt-comm", daemon=True).start()

    def submit(self, bucket: _Bucket) -> None:
        with self.cv:
            self.todo.append(bucket)
            self.busy += 1
            self.cv.notify_all()

    def drain(self) -> None:
        with self.cv:
            while self.busy and self.error is None:
                self.cv.wait(0.1)      # short waits: signal handlers run in the main thread between
            if self.error is not None:
                raise RuntimeError("the gradient sum failed in the communication thread") from self.error

    def _run(self) -> None:
        red = self.reducer
        try:
            while True:
                with self.cv:
                    while not self.todo and not red.active:
                        self.cv.wait()
                    new, self.todo = self.todo, []
                finished = sum(not red._post(bucket) for bucket in new)    # (none open: done)
                before = len(red.active)
                red._progress(block=False)
                finished += before - len(red.active)
                if finished:
                    with self.cv:
                        self.busy -= finished
                        self.cv.notify_all()
                if red.active:
                    time.sleep(red.POLL_S)
        except BaseException as e:     # handed to the main thread, which raises it in drain()
            with self.cv:
                self.error = e
                self.cv.notify_all()


class SharedMemoryReducer:
    """The gradient sum for ranks that share one machine, through memory they all map.

    Every rank's gradient buffer is its part of one shared-memory segment. When backward is done
    (a barrier), rank r adds up slice r of all the buffers in rank order, block by block, and
    writes the sum into slice r of its own buffer; in replicated mode it then copies the other
    slices' sums from their owners. ZeRO-1 stops after the first half, and the node keeps one
    shared copy of the parameters (each rank updates its slice in place; a barrier replaces the
    allgather) when /dev/shm has room for it.

    Why not MPI: MPICH's shared-memory allreduce of GPT-2's 500 MB moves every byte through small
    copy cells and measured 1.8 GB/s on the 2-core machine (~280 ms a step), with no overlap since
    MPICH progresses only inside MPI calls. Reading the peers' buffers directly costs one pass of
    additions plus one copy: ~70 ms. Backward does not overlap with it: with one busy thread per
    core there is no idle core to overlap on, and the whole reduction is ~1% of a step.

    The same interface as GradReducer; only for ranks on one node (MPIComm.shared_buffers).
    """

    BLOCK = 1 << 17    # elements per block: the additions of one block stay in cache

    def __init__(self, comm: Comm, partition: Partition, buffers: list[np.ndarray], params: np.ndarray,
                 shares_params: bool):
        self.comm, self.partition, self.buffers = comm, partition, buffers
        self.params, self.shares_params = params, shares_params
        self.grads = buffers[comm.rank]
        start, end = partition.owned
        self.updated_grads = self.grads[start:end] if partition.zero else self.grads
        self.norm_is_partial = True
        self._sq = 0.0
        self.waited = 0.0   # seconds the last finish() waited for the slowest rank's backward

    def block_done(self, layer: int) -> None:
        pass

    def describe(self) -> str:
        mode = ", replicated"
        if self.partition.zero:
            mode = ", ZeRO-1, " + ("one shared copy of the parameters" if self.shares_params
                                  else "parameters gathered through the gradient buffers")
        return f"shared memory ({self.comm.size} ranks on one node{mode})"

    def _blocks(self, lo: int, hi: int) -> list[slice]:
        return [slice(b, min(hi, b + self.BLOCK)) for b in range(lo, hi, self.BLOCK)]

    def finish(self) -> None:
        bufs, rank, mine = self.buffers, self.comm.rank, self.grads
        blocks = self._blocks(*self.partition.owned)
        sq = np.zeros(len(blocks))
        t0 = time.perf_counter()
        self.comm.shared_barrier()                # every rank's gradients are complete
        self.waited = time.perf_counter() - t0

        def reduce(first: int, last: int) -> None:
            tmp = np.empty(self.BLOCK, mine.dtype)
            for i in range(first, last):
                blk = blocks[i]
                # ranks 0 and 1 may sum straight into their own block: element by element it is
                # read before it is written. Any other rank sums into a scratch block.
                acc = mine[blk] if rank < 2 else tmp[: blk.stop - blk.start]
                np.add(bufs[0][blk], bufs[1][blk], out=acc)
                for q in range(2, len(bufs)):
                    acc += bufs[q][blk]
                if rank >= 2:
                    mine[blk] = acc
                sq[i] = np.dot(acc, acc)          # the norm's piece while the block is in cache
        parallel_for(len(blocks), reduce)
        self._sq = float(sq.sum())
        self.comm.shared_barrier()                # every slice holds its sum
        if not self.partition.zero:
            self._copy_from_owners(mine)

    def _copy_from_owners(self, dest: np.ndarray) -> None:
        """dest[slice q] = rank q's buffer[slice q] for every other rank q, then a barrier so that
        no owner overwrites its buffer before everyone has read it."""
        parts = [(q, blk) for q, (lo, hi) in enumerate(self.partition.ranges) if q != self.comm.rank
                 for blk in self._blocks(lo, hi)]

        def copy(first: int, last: int) -> None:
            for q, blk in parts[first:last]:
                dest[blk] = self.buffers[q][blk]
        parallel_for(len(parts), copy)
        self.comm.shared_barrier()

    def grad_sq_sum(self) -> float:
        """Sum of squared gradients of this rank's slice, computed during finish()."""
        return self._sq

    def allgather_params(self) -> None:
        """Each rank updated (or loaded) its slice of the parameters; give everyone all of them.
        Parameters in shared memory are already everyone's: a barrier is all it takes. Otherwise
        the gradient buffers, spent for this step, carry the slices: each rank puts its own in,
        then reads everyone else's."""
        if self.shares_params:
            self.comm.shared_barrier()
            return
        a, b = self.partition.owned
        self.grads[a:b] = self.params[a:b]
        self.comm.shared_barrier()
        self._copy_from_owners(self.params)

    def broadcast_params(self) -> None:
        """Rank 0's parameters everywhere (shared ones are rank 0's already)."""
        if self.shares_params:
            self.comm.shared_barrier()
        else:
            self.comm.bcast_(self.params)


class HierarchicalReducer:
    """The gradient sum for several nodes with several ranks on each: first through shared memory
    on each node, then across nodes, so that only 1/(ranks per node) of every rank's gradient
    crosses the network (GradReducer sends all of it).

    The ranks with local rank l, one per node, form column l. Rank l of a node adds up, over the
    node's gradient buffers (one shared segment, as in SharedMemoryReducer), the slices that the
    members of column l own, packed in column order; a reduce-scatter within the column then
    leaves each member the sum of its own slice over all nodes. ZeRO-1 stops there. Replicated,
    an allgather within the column gives each member all of the column's slice sums, and the
    other slices are copied from the node's other ranks, whose columns hold them: only the column
    traffic crosses the network, twice (as an allreduce would). No overlap with backward (the node
    sum needs every local backward done); the parameters stay private to each rank and, under
    ZeRO-1, are gathered over the world as GradReducer does. Needs the same number of ranks on
    every node, else some slices would have no one to sum them on a node.
    """

    def __init__(self, comm: MPIComm, partition: Partition, buffers: list[np.ndarray], params: np.ndarray):
        self.comm, self.partition, self.buffers, self.params = comm, partition, buffers, params
        self.grads = buffers[comm.local_rank]
        zero = partition.zero
        self.updated_grads = np.zeros(partition.owned_size, params.dtype) if zero else self.grads
        self.shares_params = False
        self.norm_is_partial = zero
        self.waited = 0.0
        self.col, members = comm.column()
        self.col_ranges = [partition.ranges[r] for r in members]
        self.counts = [e - s for s, e in self.col_ranges]
        self.send = np.empty(sum(self.counts), params.dtype)
        self.mine = np.zeros(partition.owned_size, params.dtype) if not zero else self.updated_grads
        # replicated: which local rank's buffer holds each slice that is not this column's
        local_of = comm.allgather_obj(comm.local_rank)
        self.from_peers = [(local_of[q], lo, hi) for q, (lo, hi) in enumerate(partition.ranges)
                           if local_of[q] != comm.local_rank]

    def block_done(self, layer: int) -> None:
        pass

    def describe(self) -> str:
        c = self.comm
        return (f"hierarchical (shared memory on each of {c.n_nodes} nodes, then MPI between nodes, "
                f"1/{c.local_size} of the gradient per rank), "
                + ("ZeRO-1" if self.partition.zero else "replicated"))

    def finish(self) -> None:
        t0 = time.perf_counter()
        self.comm.node_barrier()                  # every local rank's gradients are complete
        self.waited = time.perf_counter() - t0
        bufs, off = self.buffers, 0
        for s, e in self.col_ranges:              # this column's slices, summed in local-rank order
            acc = self.send[off:off + e - s]
            np.add(bufs[0][s:e], bufs[1][s:e], out=acc)
            for q in range(2, len(bufs)):
                acc += bufs[q][s:e]
            off += e - s
        self.comm.node_barrier()                  # all read: the next backward may overwrite them
        MPI = self.comm.MPI
        self.col.Reduce_scatter(self.send, self.mine, self.counts, op=MPI.SUM)
        if self.partition.zero:
            return
        a, b = self.partition.owned
        self.grads[a:b] = self.mine
        displs = [s for s, _ in self.col_ranges]
        self.col.Allgatherv(MPI.IN_PLACE, [self.grads, self.counts, displs, MPI.FLOAT])
        self.comm.node_barrier()                  # every column's sums are in its members' buffers
        for local, lo, hi in self.from_peers:
            self.grads[lo:hi] = bufs[local][lo:hi]
        self.comm.node_barrier()                  # all copied: the next backward may overwrite them

    def grad_sq_sum(self) -> float:
        g = self.updated_grads
        return float(np.dot(g, g))

    def allgather_params(self) -> None:
        self.comm.allgatherv_(self.params, self.partition.ranges)

    def broadcast_params(self) -> None:
        self.comm.bcast_(self.params)


def make_reducer(comm: Comm, partition: Partition, layer_ranges: list[tuple[int, int]], params: np.ndarray,
                 bucket_bytes: int, method: str, wire: str = "fp32", comm_thread: bool = True,
                 token_table: tuple[int, int] | None = None
                 ) -> GradReducer | SharedMemoryReducer | HierarchicalReducer:
    """The gradient reducer for `method` (parallel.reduce), holding the flat buffers: auto picks
    shared memory when every rank is on one node and there is more than one rank; on several
    nodes with several ranks each, shared memory within nodes and MPI between them
    (HierarchicalReducer); MPI collectives otherwise. `params` is this rank's initial parameter
    vector; under ZeRO-1 on one node it is copied (rank 0's) into one shared buffer, otherwise it
    is used as it is."""
    if method in ("auto", "shared_memory") and comm.size > 1:
        buffers, why_not = comm.shared_buffers(params.size, params.dtype)
        if buffers is not None:
            shared = None
            if partition.zero:
                # ZeRO-1: each rank updates only its slice, so one copy of the parameters can serve
                # the whole node, and the allgather after the update is just a barrier
                shared, why_not = comm.shared_buffers(params.size, params.dtype, per_rank=False)
                if shared is None and comm.rank == 0:
                    warnings.warn(f"parameters not shared between ranks: {why_not}", stacklevel=2)
            if shared is None:
                return SharedMemoryReducer(comm, partition, buffers, params, shares_params=False)
            if comm.rank == 0:
                shared[0][:] = params
            comm.shared_barrier()
            return SharedMemoryReducer(comm, partition, buffers, shared[0], shares_params=True)
        if method == "shared_memory":
            raise RuntimeError(f"parallel.reduce = shared_memory is not possible: {why_not} "
                               f"(use auto or mpi)")
        if comm.n_nodes == 1 and comm.rank == 0:
            warnings.warn(f"gradient sum through MPI, not shared memory: {why_not}", stacklevel=2)
    # several nodes with several ranks each (the same on every node, a fact all ranks agree on)
    if method == "auto" and comm.n_nodes > 1 and comm.local_size > 1 and comm.same_ranks_per_node:
        buffers, why_not = comm.node_buffers(params.size, params.dtype)
        if buffers is not None:
            return HierarchicalReducer(comm, partition, buffers, params)
        if comm.rank == 0:
            warnings.warn(f"gradient sum through MPI only, not shared memory first: {why_not}", stacklevel=2)
    return GradReducer(comm, partition, layer_ranges, params, bucket_bytes, wire, comm_thread, token_table)
