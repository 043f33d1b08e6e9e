"""GradReducer's bucket arithmetic (distgpt/dist/buckets.py) without mpirun: which runs of the flat
gradient vector travel together, in which order, and which part of each bucket every rank sums.
A slip here sums a slice twice or never, which the mpirun tests would only catch for the few
layouts they run; these check every layout below exhaustively."""

from __future__ import annotations

import numpy as np
import pytest

from distgpt import dist
from distgpt.config import ModelConfig
from distgpt.dist.buckets import bucket_bounds, bucket_parts, plan
from distgpt.model import Layout
from distgpt.partition import Partition

TINY = Layout(ModelConfig(n_layer=3, n_head=2, n_embd=8, block_size=16, vocab_size=50, vocab_multiple=16))
# (n, layer ranges, token table): the mpirun worker's vector (tests/reducer_worker.py), whose ZeRO
# cuts at 34 and 67 (3 ranks) fall inside buckets and inside token row 4; and a real GPT layout
LAYOUTS = [(100, [(40, 60), (60, 90)], (5, 8)),
           (TINY.size, TINY.layer_ranges, (TINY.cfg.padded_vocab, TINY.cfg.n_embd))]
BUCKET_BYTES = [1, 4 * 25, 4 * 1000, 1 << 30]        # one layer a bucket ... everything in one


def _cases():
    for n, layers, table in LAYOUTS:
        for token_table in (table, None):
            for bucket_bytes in BUCKET_BYTES:
                yield n, layers, token_table, bucket_bytes


@pytest.mark.parametrize("n, layers, token_table, bucket_bytes", list(_cases()))
def test_buckets_cover_every_element_exactly_once(n, layers, token_table, bucket_bytes):
    bounds, _ = bucket_bounds(n, layers, bucket_bytes, 4, token_table)
    covered = np.zeros(n, np.int64)
    for lo, hi in bounds[:-1]:
        assert 0 <= lo < hi <= n, (lo, hi)
        covered[lo:hi] += 1
    lo, hi = bounds[-1]             # what precedes the layers: empty when that is the token table
    assert 0 <= lo <= hi <= n and (hi > lo or (token_table and hi == token_table[0] * token_table[1]))
    covered[lo:hi] += 1
    assert covered.min() == covered.max() == 1


@pytest.mark.parametrize("n, layers, token_table, bucket_bytes", list(_cases()))
def test_buckets_start_with_the_token_table_then_go_down_the_layers(n, layers, token_table, bucket_bytes):
    bounds, bucket_of_layer = bucket_bounds(n, layers, bucket_bytes, 4, token_table)
    rest = bounds
    if token_table is not None:
        assert bounds[0] == (0, token_table[0] * token_table[1])
        rest = bounds[1:]
    # after the table: whole layers, last first (the top one up to the end of the vector), then
    # what precedes the layers
    assert rest[0][1] == n
    assert all(a[0] == b[1] for a, b in zip(rest, rest[1:], strict=False))
    assert rest[-1][1] == layers[0][0]
    # every layer lies inside one bucket, and the bucket a layer completes starts at that layer
    starts = {lo for lo, _ in bounds}
    for lo, hi in layers:
        assert lo in starts or any(blo < lo and hi <= bhi for blo, bhi in bounds)
    for layer, index in bucket_of_layer.items():
        assert bounds[index][0] == layers[layer][0]
    assert 0 in bucket_of_layer                       # the lowest layer always closes a bucket
    # merged until big enough: only the bucket closed by layer 0 may be smaller than asked
    for layer, index in bucket_of_layer.items():
        lo, hi = bounds[index]
        assert layer == 0 or (hi - lo) * 4 >= bucket_bytes
        if layer + 1 in bucket_of_layer or layer == len(layers) - 1:
            continue
        # a bucket that holds several layers held too few bytes without its lowest one
        assert (hi - layers[layer + 1][0]) * 4 < bucket_bytes


def test_one_layer_per_bucket_when_any_layer_is_enough():
    bounds, bucket_of_layer = bucket_bounds(100, [(40, 60), (60, 90)], 1, 4, (5, 8))
    assert bounds == [(0, 40), (60, 100), (40, 60), (40, 40)]
    assert bucket_of_layer == {1: 1, 0: 2}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n, layers, token_table, bucket_bytes", list(_cases()))
def test_each_ranks_part_of_a_bucket_is_the_bucket_cut_to_its_owned_slice(n, layers, token_table,
                                                                          bucket_bytes, world):
    ranges = Partition(n, world, 0).ranges
    owner = np.empty(n, np.int64)
    for q, (s, e) in enumerate(ranges):
        owner[s:e] = q
    for rank in range(world):
        spans, _ = plan(n, layers, bucket_bytes, 4, ranges, rank, token_table)
        for span in spans:
            assert sum(span.counts) == span.hi - span.lo
            for q in range(world):
                part = np.arange(span.lo + span.displs[q], span.lo + span.displs[q] + span.counts[q])
                assert np.array_equal(part, span.lo + np.flatnonzero(owner[span.lo:span.hi] == q))
            a, b = span.own
            assert (a, b) == (span.lo + span.displs[rank], span.lo + span.displs[rank] + span.counts[rank])
            start, end = ranges[rank]
            assert span.lo <= a <= b <= span.hi
            assert a == b or start <= a < b <= end      # a part of the rank's own, or nothing


def test_three_uneven_ranks_split_the_token_table_inside_a_row():
    ranges = Partition(100, 3, 0).ranges                  # (0, 34), (34, 67), (67, 100)
    table = bucket_parts(0, 40, ranges, 1)
    assert (table.counts, table.displs, table.own) == ([34, 6, 0], [0, 34, 40], (34, 40))
    top = bucket_parts(60, 100, ranges, 2)
    assert (top.counts, top.displs, top.own) == ([0, 7, 33], [0, 0, 7], (67, 100))
    assert bucket_parts(60, 100, ranges, 0).own == (60, 60)   # rank 0 owns none of it


class _RankOf(dist.Comm):
    """Rank `rank` of `size`, without MPI: all a GradReducer's constructor asks of its comm."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n, layers, token_table, bucket_bytes", list(_cases()))
def test_bucket_targets_tile_what_the_rank_updates(n, layers, token_table, bucket_bytes, world, zero):
    """The sums land in the rank's owned slice once each: under ZeRO-1 in updated_grads (a buffer
    of the slice's size), replicated in the owned slice of grads itself."""
    for rank in range(world):
        part = Partition(n, world, rank, zero)
        red = dist.GradReducer(_RankOf(rank, world), part, layers, np.zeros(n, np.float32), bucket_bytes,
                               token_table=token_table)
        start, end = part.owned
        assert red.updated_grads.size == (end - start if zero else n)
        hits = np.zeros(n, np.int64)
        base = red.updated_grads.__array_interface__["data"][0]
        for bucket in red.buckets:
            assert np.shares_memory(bucket.target, red.updated_grads) or bucket.target.size == 0
            first = (bucket.target.__array_interface__["data"][0] - base) // 4 + (start if zero else 0)
            assert bucket.target.size == bucket.own[1] - bucket.own[0]
            if bucket.target.size:
                assert first == bucket.own[0]
            hits[first:first + bucket.target.size] += 1
        assert hits[start:end].min() == hits[start:end].max() == 1
        assert hits.sum() == end - start
