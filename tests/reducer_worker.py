"""Run under mpirun by test_dist.py: both gradient reducers against sums computed locally from
every rank's data.

A 100-element vector with two layers and small buckets, so with 3 ranks the ZeRO slice boundaries
(34, 67) cut through buckets. The shared-memory reducer uses tiny blocks so that slices span
several of them."""

import sys

import numpy as np

from distgpt import dist

comm = dist.init()
n = 100
layers = [(40, 60), (60, 90)]          # [0, 40) embeddings, [90, 100) a final norm
dist.SharedMemoryReducer.BLOCK = 7


def rank_data(r: int) -> np.ndarray:
    return np.random.default_rng(r).standard_normal(n).astype(np.float32)


def fail(msg: str) -> None:
    print(f"rank {comm.rank}: {msg}", file=sys.stderr)
    sys.exit(1)


expected = sum(rank_data(r).astype(np.float64) for r in range(comm.size))
for method in ("mpi", "shared_memory"):
    for zero in (False, True):
        where = f"{method} zero={zero}"
        red = dist.make_reducer(comm, layers, rank_data(comm.rank), zero, 1, method)
        if type(red).__name__ != {"mpi": "GradReducer", "shared_memory": "SharedMemoryReducer"}[method]:
            fail(f"{where}: got {type(red).__name__}")
        red.grads[:] = rank_data(comm.rank)
        for layer in (1, 0):
            red.layer_done(layer)
        red.finish()
        s, e = red.ranges[comm.rank] if zero else (0, n)
        if not np.allclose(red.shard_grads, expected[s:e], rtol=1e-5, atol=1e-5):
            fail(f"{where}: {red.shard_grads} != {expected[s:e]}")
        sq = np.array([red.grad_sq_sum()])
        if red.sharded_norm:
            comm.allreduce_(sq)
        if not np.isclose(sq[0], np.dot(expected, expected), rtol=1e-5):
            fail(f"{where}: squared norm {sq[0]} != {np.dot(expected, expected)}")
        if zero:   # each rank owns its slice of the parameters; afterwards all ranks hold all of them
            params = np.full(n, -1.0, np.float32)
            params[s:e] = np.arange(s, e)
            red.allgather_params(params)
            if not np.array_equal(params, np.arange(n, dtype=np.float32)):
                fail(f"{where}: allgathered params {params}")
print(f"rank {comm.rank} ok")
