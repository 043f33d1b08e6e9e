"""Run under mpirun by test_dist.py: both gradient reducers (MPI with fp32 and bf16 on the wire,
with and without the comm thread) against sums computed locally from every rank's data.

A 100-element vector with two layers and small buckets, so with 3 ranks the ZeRO slice boundaries
(34, 67) cut through buckets. The shared-memory reducer uses tiny blocks so that slices span
several of them."""

import shutil
import sys
import time
import warnings

import numpy as np

from distgpt import bf16, dist
from distgpt.partition import Partition
from distgpt.threads import set_threads

comm = dist.init()
n = 100
layers = [(40, 60), (60, 90)]          # [0, 40) embeddings, [90, 100) a final norm
dist.SharedMemoryReducer.BLOCK = 7


def rank_data(r: int) -> np.ndarray:
    return np.random.default_rng(r).standard_normal(n).astype(np.float32)


def fail(msg: str) -> None:
    print(f"rank {comm.rank}: {msg}", file=sys.stderr, flush=True)
    comm.abort(1)     # not sys.exit: the other ranks may be waiting in a collective


expected = sum(rank_data(r).astype(np.float64) for r in range(comm.size))
# bf16 on the wire: each rank's gradients rounded to bf16, added in fp32 in rank order by the owner
wired = np.zeros(n, np.float32)
for r in range(comm.size):
    wired += bf16.round_bf16(rank_data(r))
TABLE = (5, 8)     # the MPI reducer's token table: 5 rows of 8, [0, 40); 3 ranks cut row 4 at 34


def token_rows(r: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank r's sparse token-embedding gradient: 6 rows for random table rows, repeats included."""
    rng = np.random.default_rng(100 + r)
    return rng.integers(0, TABLE[0], 6), rng.standard_normal((6, TABLE[1])).astype(np.float32)


def with_rows(total: np.ndarray) -> np.ndarray:
    """total plus every rank's token rows, in rank order."""
    out = total.astype(np.float64)
    table = out[: TABLE[0] * TABLE[1]].reshape(TABLE)
    for r in range(comm.size):
        np.add.at(table, *token_rows(r))
    return out


def check_norm(red, where: str, wire: str, rows: bool) -> None:
    """The squared norm through the step's statistics allreduce (norm_sq_contribution, then
    norm_sq): the summed gradients' own."""
    stats = np.array([1.0, red.norm_sq_contribution(), 0.0])
    comm.allreduce_(stats)
    norm_sq = red.norm_sq(float(stats[1]))
    total = expected if wire == "fp32" else wired if red.partition.zero else bf16.round_bf16(wired)
    total = with_rows(total) if rows else total     # the last round had token rows
    if not np.isclose(norm_sq, np.dot(total, total), rtol=1e-5):
        fail(f"{where}: squared norm {norm_sq} != {np.dot(total, total)}")


CASES = [("shared_memory", "fp32", False)] + [("mpi", wire, thread) for wire in ("fp32", "bf16")
                                              for thread in (True, False)]
for method, wire, thread in CASES:
    for zero in (False, True):
        where = f"{method} zero={zero} grad_wire={wire} comm_thread={thread}"
        red = dist.make_reducer(comm, Partition(n, comm.size, comm.rank, zero), layers,
                                rank_data(comm.rank), 1, method, wire, thread, TABLE)
        if type(red).__name__ != {"mpi": "GradReducer", "shared_memory": "SharedMemoryReducer"}[method]:
            fail(f"{where}: got {type(red).__name__}")
        if method == "mpi" and (red.thread is not None) != thread:
            fail(f"{where}: comm thread {red.thread}")
        if (red.hooks is not None) != (method == "mpi"):     # only the MPI reducer overlaps backward
            fail(f"{where}: hooks {red.hooks}")
        s, e = red.partition.updated
        # the same reducer for several steps, as in training: with backward's hooks (the token
        # table first, its rows sparse at the end), then without them (backward before the last
        # micro-batch, or no overlap: everything in finish), then only the blocks reported
        for rnd, calls in enumerate(("all", "none", "blocks", "all")):
            hooks = red.hooks if calls != "none" else None
            hooked = hooks is not None and calls == "all"      # token rows travel apart from grads
            red.grads[:] = rank_data(comm.rank)
            if hooked:
                hooks.head_done()
            for layer in (1, 0):
                if hooks is not None:
                    hooks.block_done(layer)
            if hooked:
                hooks.token_rows(*token_rows(comm.rank))
            red.finish()
            if wire == "bf16":
                # ZeRO keeps the fp32 sums of the owner's slice; replicated, every rank takes the
                # sums rounded to bf16, the owner's own slice too; the token rows are added after
                want = wired if zero else bf16.round_bf16(wired)
                want = with_rows(want) if hooked else want.astype(np.float64)
                if not np.allclose(red.updated_grads, want[s:e], rtol=1e-6, atol=1e-6):
                    fail(f"{where} round {rnd} ({calls}): {red.updated_grads} != {want[s:e]}")
                if not zero and len(set(comm.allgather_obj(red.grads.tobytes()))) != 1:
                    fail(f"{where}: the ranks' sums differ")
            else:
                want = with_rows(expected) if hooked else expected
                if not np.allclose(red.updated_grads, want[s:e], rtol=1e-5, atol=1e-5):
                    fail(f"{where} round {rnd} ({calls}): {red.updated_grads} != {want[s:e]}")
        check_norm(red, where, wire, hooked)
        if red.shares_params != (method == "shared_memory" and zero):
            fail(f"{where}: shared parameters {red.shares_params}")
        if zero:   # each rank owns its slice of the parameters; afterwards all ranks hold all of them
            red.params[s:e] = np.arange(s, e)
            red.allgather_params()
            if not np.array_equal(red.params, np.arange(n, dtype=np.float32)):
                fail(f"{where}: allgathered params {red.params}")
            red.comm.barrier()

# many rounds, as in training: new gradients are written straight after finish() (the next step's
# backward), one rank is late each round, two threads sum. Any missing barrier lets a rank read a
# peer's buffer after the peer has overwritten it. The sum must equal (b0 + b1) + b2 ... exactly,
# and in replicated mode be bitwise the same on every rank.
set_threads(2)
for zero in (False, True):
    red = dist.make_reducer(comm, Partition(n, comm.size, comm.rank, zero), layers, rank_data(comm.rank),
                            1, "shared_memory")
    s, e = red.partition.updated
    for rnd in range(30):
        data = [np.random.default_rng(1000 * rnd + r).standard_normal(n).astype(np.float32)
                for r in range(comm.size)]
        exact = data[0] + data[1]
        for r in range(2, comm.size):
            exact += data[r]
        if rnd % comm.size == comm.rank:
            time.sleep(0.02)
        red.grads[:] = data[comm.rank]
        red.finish()
        got = red.updated_grads.copy()
        red.grads[:] = np.nan                     # the next step starts writing at once
        if not np.array_equal(got, exact[s:e]):
            fail(f"round {rnd} zero={zero}: {got} != {exact[s:e]}")
        if not zero:
            everyone = comm.allgather_obj(got.tobytes())
            if len(set(everyone)) != 1:
                fail(f"round {rnd}: the ranks' sums differ")
set_threads(1)

# a /dev/shm too small for the buffers (Docker's 64 MB default): auto falls back to MPI, and an
# explicit shared_memory request fails with the reason
shutil.disk_usage = lambda path: type("Usage", (), {"free": 10})()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    red = dist.make_reducer(comm, Partition(n, comm.size, comm.rank), layers, rank_data(comm.rank), 1, "auto")
if type(red).__name__ != "GradReducer":
    fail(f"small /dev/shm: auto gave {type(red).__name__}")
if comm.rank == 0 and not any("/dev/shm has 0 MiB free" in str(w.message) for w in caught):
    fail(f"small /dev/shm: no warning, got {[str(w.message) for w in caught]}")
try:
    dist.make_reducer(comm, Partition(n, comm.size, comm.rank), layers, rank_data(comm.rank), 1,
                      "shared_memory")
    fail("small /dev/shm: shared_memory did not raise")
except RuntimeError as e:
    if "/dev/shm" not in str(e):
        fail(f"small /dev/shm: {e}")
print(f"rank {comm.rank} ok")
