"""Run under mpirun by test_dist.py: GradReducer against sums computed locally from every rank's data.

Token embedding of 7 rows x 5 columns at offset 0 in a 100-element vector, so with 3 ranks the ZeRO
slice boundaries (34, 67) cut through embedding rows and layers alike."""

import sys

import numpy as np

from distgpt import dist

comm = dist.init()
n, rows, cols = 100, 7, 5
layers = [(40, 60), (60, 90)]          # [35, 40) is a position embedding, [90, 100) a final norm


def rank_data(r: int):
    rng = np.random.default_rng(r)
    return (rng.standard_normal(n).astype(np.float32), rng.integers(0, rows, 6),
            rng.standard_normal((6, cols)).astype(np.float32))


expected = np.zeros(n, np.float64)
for r in range(comm.size):
    g, ids, lookup = rank_data(r)
    expected += g
    np.add.at(expected[:rows * cols].reshape(rows, cols), ids, lookup)
for zero in (False, True):
    g, ids, lookup = rank_data(comm.rank)
    red = dist.GradReducer(comm, layers, n, g.copy(), zero, bucket_bytes=1, embed=(0, rows, cols))
    red.start_embedding()
    for layer in (1, 0):
        red.layer_done(layer)
    red.finish((ids, lookup))
    s, e = red.ranges[comm.rank] if zero else (0, n)
    got = red.shard_grads
    if not np.allclose(got, expected[s:e], rtol=1e-5, atol=1e-5):
        print(f"rank {comm.rank} zero={zero}: {got} != {expected[s:e]}", file=sys.stderr)
        sys.exit(1)
print(f"rank {comm.rank} ok")
