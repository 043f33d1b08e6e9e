"""Run under mpirun by test_hierarchical.py with MPICH's MPIR_CVAR_NUM_CLIQUES, which splits one
machine's ranks into that many "nodes" (MPI_COMM_TYPE_SHARED answers per clique), so the
hierarchical reducer runs its node sums and its column collectives without a second host: against
sums computed locally from every rank's data, in both modes, for two steps on the same buffers."""

import sys

import numpy as np

from distgpt import dist
from distgpt.partition import Partition

comm = dist.init()
n = 101                                  # uneven slices for any of the worlds the test runs
layers = [(40, 60), (60, 90)]


def data(r: int, step: int) -> np.ndarray:
    return np.random.default_rng([r, step]).standard_normal(n).astype(np.float32)


def fail(msg: str) -> None:
    print(f"rank {comm.rank}: {msg}", file=sys.stderr, flush=True)
    comm.abort(1)     # not sys.exit: the other ranks may be waiting in a collective


for zero in (True, False):
    part = Partition(n, comm.size, comm.rank, zero=zero)
    red = dist.make_reducer(comm, part, layers, data(comm.rank, 0), 1, "auto")
    where = f"{comm.n_nodes} nodes x {comm.local_size} zero={zero}"
    if type(red) is not dist.HierarchicalReducer:
        fail(f"{where}: got {type(red).__name__} (does this MPI split ranks into cliques?)")
    if red.hooks is not None or red.shares_params:
        fail(f"{where}: hooks {red.hooks}, shares_params {red.shares_params}")
    if f"each of {comm.n_nodes} nodes" not in red.describe():
        fail(f"{where}: {red.describe()}")
    s, e = part.updated
    for step in range(2):               # the buffers are reusable: a second step sums again
        expected = sum(data(r, step).astype(np.float64) for r in range(comm.size))
        red.grads[:] = data(comm.rank, step)
        red.finish()
        if not np.allclose(red.updated_grads, expected[s:e], rtol=1e-5, atol=1e-5):
            fail(f"{where} step {step}: {red.updated_grads} != {expected[s:e]}")
    if not zero and len(set(comm.allgather_obj(red.grads.tobytes()))) != 1:
        fail(f"{where}: the ranks' sums differ")     # replicated: the same bits on every rank
    stats = np.array([0.0, red.norm_sq_contribution(), 0.0])
    comm.allreduce_(stats)
    norm_sq = red.norm_sq(float(stats[1]))
    if not np.isclose(norm_sq, np.dot(expected, expected), rtol=1e-5):
        fail(f"{where}: squared norm {norm_sq} != {np.dot(expected, expected)}")
    if zero:   # each rank updated its own slice; afterwards every rank holds all of them
        red.params[s:e] = np.arange(s, e)
        red.allgather_params()
        if not np.array_equal(red.params, np.arange(n, dtype=np.float32)):
            fail(f"{where}: allgathered params {red.params}")
    else:
        red.params[:] = comm.rank
        red.broadcast_params()
        if np.any(red.params != 0):
            fail(f"{where}: broadcast params {red.params}")
print(f"rank {comm.rank} ok")
