"""Run under mpirun by test_dist.py: GradReducer against sums computed locally from every rank's data.

A 100-element vector with two layers and small buckets, so with 3 ranks the ZeRO slice boundaries
(34, 67) cut through buckets."""

import sys

import numpy as np

from distgpt import dist

comm = dist.init()
n = 100
layers = [(40, 60), (60, 90)]          # [0, 40) embeddings, [90, 100) a final norm


def rank_data(r: int):
    return np.random.default_rng(r).standard_normal(n).astype(np.float32)


expected = sum(rank_data(r).astype(np.float64) for r in range(comm.size))
for zero in (False, True):
    red = dist.GradReducer(comm, layers, n, rank_data(comm.rank), zero, bucket_bytes=1)
    for layer in (1, 0):
        red.layer_done(layer)
    red.finish()
    s, e = red.ranges[comm.rank] if zero else (0, n)
    got = red.shard_grads
    if not np.allclose(got, expected[s:e], rtol=1e-5, atol=1e-5):
        print(f"rank {comm.rank} zero={zero}: {got} != {expected[s:e]}", file=sys.stderr)
        sys.exit(1)
print(f"rank {comm.rank} ok")
