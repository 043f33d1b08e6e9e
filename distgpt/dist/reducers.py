"""The gradient reducers: three ways to sum the flat gradient buffer over the ranks, behind one
protocol (Reducer), so that the trainer never asks which one it holds.

- SharedMemoryReducer: every rank on one node; the ranks' gradient buffers are parts of one
  shared-memory segment, and rank r sums slice r of all of them directly after backward.
- HierarchicalReducer: several nodes with several ranks on each; shared memory within each node,
  then MPI between nodes (within a column) for 1/(ranks per node) of the gradient per rank.
- GradReducer: otherwise; buckets of whole layers (distgpt/dist/buckets.py) go to non-blocking MPI
  calls (collectives at 2 ranks, point to point at 3 or more) as backward finishes them, the only
  one of the three that overlaps with backward.

Replicated mode leaves the whole sum on every rank; ZeRO-1 only rank r's slice on rank r (the
partition, distgpt/partition.py, says which slice that is). The reducer also owns the flat
parameter and gradient buffers, since shared memory has to be allocated through MPI.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from distgpt import bf16
from distgpt.dist import buckets
from distgpt.dist.comm import Column, Comm, Request
from distgpt.partition import Partition
from distgpt.threads import parallel_for

if TYPE_CHECKING:
    from distgpt.model import BackwardHooks


class Reducer(Protocol):
    """What the trainer uses of a gradient reducer.

    Per step: backward writes `grads` (the last micro-batch's backward tells `hooks`, when there
    are any, as it goes); finish() sums them over the ranks into `updated_grads` (the gradients of
    partition.updated: this rank's slice under ZeRO-1, all of them replicated); the optimizer
    updates params[partition.updated]; under ZeRO-1 allgather_params() then gives every rank all
    of the parameters.

    The gradient norm takes one number per rank into the step's statistics allreduce (a sum over
    ranks): norm_sq_contribution() before it, norm_sq(that sum) after it, which is the squared
    norm of the summed gradients whichever rank holds which part of them.
    """

    comm: Comm
    partition: Partition
    params: np.ndarray          # the flat parameters (one shared copy per node where shares_params)
    grads: np.ndarray           # the flat gradient buffer backward writes
    updated_grads: np.ndarray   # after finish(): the summed gradients of partition.updated
    shares_params: bool         # params is one copy in memory shared by the node's ranks
    waited: float               # seconds the last finish() waited for the slowest rank's backward
    hooks: BackwardHooks | None     # for the last micro-batch's backward; None: no overlap with it

    def finish(self) -> None:
        """Sum the gradients over the ranks (the blocking part of the sum)."""

    def norm_sq_contribution(self) -> float:
        """This rank's term of the squared gradient norm's sum over ranks (0.0 where every rank
        holds all the summed gradients and norm_sq computes it alone)."""

    def norm_sq(self, summed: float) -> float:
        """The squared norm of the summed gradients, given the sum over ranks of norm_sq_contribution()."""

    def allgather_params(self) -> None:
        """Every rank updated (or loaded) its own slice of the parameters; give everyone all of them."""

    def broadcast_params(self) -> None:
        """Rank 0's parameters everywhere."""

    def describe(self) -> str:
        """One line for the run header."""


class _SquaredNorm:
    """The gradient-norm members of Reducer from two facts of a reducer: whether updated_grads is
    a slice (`_partial`: the norm sums the ranks' pieces) and this rank's squared sum (`_local_sq`)."""

    _partial: bool

    def _local_sq(self) -> float:
        raise NotImplementedError

    def norm_sq_contribution(self) -> float:
        return self._local_sq() if self._partial else 0.0

    def norm_sq(self, summed: float) -> float:
        return summed if self._partial else self._local_sq()


# ----------------------------------------------------------------------------- MPI, bucketed

@dataclass
class _Bucket:
    """A bucket (buckets.BucketSpan) in flight: where its sum goes and its open collective."""

    index: int                 # in GradReducer.buckets (the order every rank starts them in); tags
    lo: int
    hi: int
    counts: list[int]          # elements of the bucket in each rank's owned slice
    displs: list[int]          # where each rank's part starts, relative to lo
    own: tuple[int, int]       # this rank's part of it, absolute [a, b) within [lo, hi)
    target: np.ndarray         # where this rank's part of the sum goes (updated_grads or grads)
    # the exchange (_post): every rank's copy of this rank's part; bf16 (ranks, b - a), this rank's
    # row included; fp32 (ranks - 1, b - a), the other ranks' rows in rank order (its own is in grads)
    recv: np.ndarray | None = None
    stage: int = 0             # collectives finished so far
    requests: list[Request] = field(default_factory=list)     # requests of the open stage


class GradReducer(_SquaredNorm):
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

    The exchange: each rank sends rank q its part of the bucket (q's owned slice), point to point;
    the owner adds the parts in rank order, so each sum is made once, by its owner, in an order that
    does not depend on MPI's algorithms; replicated, the owner then sends its sums to every rank.
    That is the reduce-scatter's traffic and then the allgather's: 2 (N - 1) / N of the gradient
    sent per rank and step, the least a sum can cost. On the wire (parallel.grad_wire):
    - bf16 always uses the exchange: each rank's gradients are rounded to bf16 (half the bytes);
      the owner widens the parts back to fp32 and adds them. Replicated, the sums go out rounded to
      bf16 again, and every rank (the owner too) uses those rounded sums, so that all ranks apply
      the same update. As PyTorch DDP's bf16 compression hook, except that DDP adds in bf16.
    - fp32 uses the exchange from EXCHANGE_MIN_RANKS ranks, and MPI's own reduce-scatter (ZeRO-1) or
      allreduce below that. At 2 ranks MPICH's collectives are already optimal (each rank sends
      half, receives half, sends back its half of the sums: the exchange's own traffic), need no
      receive buffer of ours, and give both ranks the same bits (a + b == b + a). At a number of
      ranks that is not a power of two, MPICH's allreduce first folds the extra ranks into their
      neighbours and unfolds them at the end, whole buffers both ways: at 3 ranks host 1 sent 1.5x
      the 2 (N - 1) / N (tests/test_multihost_wire.py measures both). At 4, 8, ... the bytes are
      the same either way; the exchange still fixes the order of the additions. Its cost: a
      receive buffer of (N - 1) / N of the gradient per rank (330 MB for GPT-2 124M at 3 ranks).

    The token table (wte, a third of GPT-2's parameters) goes first: the forward's fused head has
    already computed its gradient when backward starts, all but the rows of this micro-batch's
    tokens, which backward hands over (token_rows) and finish() adds, every rank's, after the sum.
    Otherwise the table's transfer would start only when backward ends, with nothing to hide it.

    Its own backward hooks (model.BackwardHooks: head_done, block_done, token_rows) when there is
    more than one rank; a single process has nothing to overlap.
    """

    POLL_S = 0.001           # the comm thread's test interval: 125 kB at 1 Gbit/s
    EXCHANGE_MIN_RANKS = 3   # fp32 goes point to point from this many ranks (a test sets it higher
                             # to measure MPI's collectives; read when a reducer is made)

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
        self._partial = zero            # updated_grads is only this rank's slice
        self.waited = 0.0               # (not separable from the transfer in an MPI collective)
        self.hooks: BackwardHooks | None = self if comm.size > 1 else None
        self.exchange = self.wire == "bf16" or (networked and comm.size >= self.EXCHANGE_MIN_RANKS)
        self.wire16 = np.zeros(n, np.uint16) if self.wire == "bf16" else None
        rows = comm.size if self.wire == "bf16" else comm.size - 1    # fp32: its own part stays in grads
        recv = (np.zeros(rows * partition.owned_size, np.uint16 if self.wire == "bf16" else params.dtype)
                if self.exchange else None)
        self.token_table = token_table
        spans, self.bucket_of_layer = buckets.plan(n, layer_ranges, bucket_bytes, self.grads.itemsize,
                                                   partition.ranges, comm.rank, token_table)
        self.rows: tuple[np.ndarray, np.ndarray] | None = None     # token_rows() of this step
        start = partition.owned[0]
        self.buckets: list[_Bucket] = []
        used = 0
        for span in spans:
            a, b = span.own
            target = self.updated_grads[max(0, a - start):max(0, b - start)] if zero else self.grads[a:b]
            bucket = _Bucket(len(self.buckets), span.lo, span.hi, span.counts, span.displs, span.own, target)
            if recv is not None:
                bucket.recv = recv[used:used + rows * (b - a)].reshape(rows, b - a)
                used += rows * (b - a)
            self.buckets.append(bucket)
        self.started = 0
        self.active: list[_Bucket] = []
        self.thread = _CommThread(self) if comm_thread and networked and comm.threads_ok else None

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
        elif self.exchange:
            sends = [(q, self._part(bucket, q)) for q in range(comm.size) if q != comm.rank]
            recvs = [(q, bucket.recv[q - (q > comm.rank)]) for q in range(comm.size) if q != comm.rank]
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
        """Rank q's part of the bucket: in the bf16 wire buffer, or in grads for fp32."""
        start = bucket.lo + bucket.displs[q]
        return (self.wire16 if self.wire == "bf16" else self.grads)[start:start + bucket.counts[q]]

    def _advance(self, bucket: _Bucket) -> bool:
        """The bucket's collective finished: start the next one, or say it is done (True)."""
        bucket.stage += 1
        if not self.exchange:
            return True
        if self.wire == "fp32":
            return self._advance_fp32(bucket)
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

    def _advance_fp32(self, bucket: _Bucket) -> bool:
        """_advance of the fp32 exchange: sum my part, then (replicated) send the sums out."""
        rank, size = self.comm.rank, self.comm.size
        if bucket.stage == 2:                          # every owner's sums are in grads
            return True
        a, b = bucket.own
        rows = [self.grads[a:b] if q == rank else bucket.recv[q - (q > rank)] for q in range(size)]
        # in rank order, on ranks 0 and 1 straight into the target; replicated, on a rank r >= 2
        # the target is rows[r] (its own part in grads), read after the first additions, so the
        # sum goes through rows[0], a received copy that is ours to overwrite
        acc = rows[0] if rank >= 2 and not self.partition.zero else bucket.target
        np.add(rows[0], rows[1], out=acc)
        for row in rows[2:]:
            acc += row
        if acc is not bucket.target:
            bucket.target[...] = acc
        if self.partition.zero:
            return True
        parts = [(q, self._part(bucket, q)) for q in range(size) if q != rank]
        bucket.requests = self.comm.start_exchange([(q, bucket.target) for q, _ in parts], parts,
                                                   tag=2 * bucket.index + 1)
        return False

    def _progress(self, block: bool) -> None:
        """Test the open requests (with block, first wait for the oldest bucket's) and move the
        buckets whose requests all completed on."""
        if block and self.active:
            self.comm.wait_all(self.active[0].requests)
        for bucket in list(self.active):
            if self.comm.test_all(bucket.requests) and self._advance(bucket):
                self.active.remove(bucket)

    # -- after the sum

    def _local_sq(self) -> float:
        g = self.updated_grads
        return float(np.dot(g, g))

    def describe(self) -> str:
        what = "reduce-scatter" if self.partition.zero else "allreduce"
        if self.wire == "bf16":
            what = "bf16 on the wire, point to point, fp32 sums"
        elif self.exchange:
            what = "fp32 point to point, sums in rank order"
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


# ----------------------------------------------------------------------------- shared memory

class SharedMemoryReducer(_SquaredNorm):
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

    Only for ranks on one node (Comm.shared_buffers).
    """

    BLOCK = 1 << 17    # elements per block: the additions of one block stay in cache

    def __init__(self, comm: Comm, partition: Partition, buffers: list[np.ndarray], params: np.ndarray,
                 shares_params: bool):
        self.comm, self.partition, self.buffers = comm, partition, buffers
        self.params, self.shares_params = params, shares_params
        self.grads = buffers[comm.rank]
        start, end = partition.owned
        self.updated_grads = self.grads[start:end] if partition.zero else self.grads
        self.hooks: BackwardHooks | None = None
        # the norm's pieces come from each rank's own slice, summed during finish(), in both modes
        self._partial = True
        self._sq = 0.0
        self.waited = 0.0   # seconds the last finish() waited for the slowest rank's backward

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

    def _local_sq(self) -> float:
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


# ----------------------------------------------------------------------------- shared memory, then MPI

class HierarchicalReducer(_SquaredNorm):
    """The gradient sum for several nodes with several ranks on each: first through shared memory
    on each node, then across nodes, so that only 1/(ranks per node) of every rank's gradient
    crosses the network (GradReducer sends all of it).

    The ranks with local rank l, one per node, form column l (Comm.column). Rank l of a node adds
    up, over the node's gradient buffers (one shared segment, as in SharedMemoryReducer), the
    slices that the members of column l own, packed in column order; a reduce-scatter within the
    column then leaves each member the sum of its own slice over all nodes. ZeRO-1 stops there.
    Replicated, an allgather within the column gives each member all of the column's slice sums,
    and the other slices are copied from the node's other ranks, whose columns hold them: only the
    column traffic crosses the network, twice (as an allreduce would). No overlap with backward
    (the node sum needs every local backward done); the parameters stay private to each rank and,
    under ZeRO-1, are gathered over the world as GradReducer does. Needs the same number of ranks
    on every node, else some slices would have no one to sum them on a node.
    """

    def __init__(self, comm: Comm, partition: Partition, buffers: list[np.ndarray], params: np.ndarray):
        self.comm, self.partition, self.buffers, self.params = comm, partition, buffers, params
        self.grads = buffers[comm.local_rank]
        zero = partition.zero
        self.updated_grads = np.zeros(partition.owned_size, params.dtype) if zero else self.grads
        self.shares_params = False
        self.hooks: BackwardHooks | None = None
        self._partial = zero
        self.waited = 0.0
        self.column: Column = comm.column()
        self.col_ranges = [partition.ranges[r] for r in self.column.members]
        self.counts = [e - s for s, e in self.col_ranges]
        self.send = np.empty(sum(self.counts), params.dtype)
        self.mine = np.zeros(partition.owned_size, params.dtype) if not zero else self.updated_grads
        # replicated: which local rank's buffer holds each slice that is not this column's
        local_of = comm.allgather_obj(comm.local_rank)
        self.from_peers = [(local_of[q], lo, hi) for q, (lo, hi) in enumerate(partition.ranges)
                           if local_of[q] != comm.local_rank]

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
        self.column.reduce_scatter_(self.send, self.mine, self.counts)
        if self.partition.zero:
            return
        a, b = self.partition.owned
        self.grads[a:b] = self.mine
        self.column.allgatherv_(self.grads, self.col_ranges)
        self.comm.node_barrier()                  # every column's sums are in its members' buffers
        for local, lo, hi in self.from_peers:
            self.grads[lo:hi] = bufs[local][lo:hi]
        self.comm.node_barrier()                  # all copied: the next backward may overwrite them

    def _local_sq(self) -> float:
        g = self.updated_grads
        return float(np.dot(g, g))

    def allgather_params(self) -> None:
        self.comm.allgatherv_(self.params, self.partition.ranges)

    def broadcast_params(self) -> None:
        self.comm.bcast_(self.params)
