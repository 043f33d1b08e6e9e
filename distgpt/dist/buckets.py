"""The bucket arithmetic of GradReducer, as plain functions: which runs of the flat gradient vector
travel together (buckets), and how each bucket splits between the ranks that own its parts.

The vector is [token table | other embeddings | layer 0 | ... | layer L-1 | final norm]; buckets are
whole layers, so backward finishes one before the sum of it starts. The order is the order every
rank starts them in: the token table first (its gradient is ready when backward starts), then whole
layers from the last one down (the top bucket also holding what follows the layers), merged until a
bucket holds at least bucket_bytes, then what precedes the layers (the embeddings but the table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpan:
    """A bucket [lo, hi) of the flat vector and its parts: rank q owns lo + displs[q] for counts[q]
    elements (its owned slice cut to the bucket; empty where they do not meet)."""

    lo: int
    hi: int
    counts: list[int]          # elements of the bucket in each rank's owned slice
    displs: list[int]          # where each rank's part starts, relative to lo
    own: tuple[int, int]       # this rank's part, absolute [a, b) within [lo, hi)


def bucket_bounds(n: int, layer_ranges: list[tuple[int, int]], bucket_bytes: int, itemsize: int,
                  token_table: tuple[int, int] | None = None
                  ) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """The buckets' [lo, hi) in the order they start, and for each layer that completes a bucket
    (its lowest layer) that bucket's index. token_table: (rows, width) at the start of the vector,
    a bucket of its own, first."""
    bounds = [(0, token_table[0] * token_table[1])] if token_table else []
    bucket_of_layer: dict[int, int] = {}
    hi = n
    for layer in reversed(range(len(layer_ranges))):
        lo = layer_ranges[layer][0]
        if (hi - lo) * itemsize >= bucket_bytes or layer == 0:
            bucket_of_layer[layer] = len(bounds)
            bounds.append((lo, hi))
            hi = lo
    bounds.append((bounds[0][1] if token_table else 0, layer_ranges[0][0] if layer_ranges else n))
    return bounds, bucket_of_layer


def bucket_parts(lo: int, hi: int, ranges: Sequence[tuple[int, int]], rank: int) -> BucketSpan:
    """How bucket [lo, hi) splits between the ranks' owned slices `ranges` (a partition of the
    vector, in rank order), and `rank`'s part of it."""
    counts = [max(0, min(hi, e) - max(lo, s)) for s, e in ranges]
    displs = [max(0, min(hi, s) - lo) for s, _ in ranges]
    a = lo + displs[rank]
    return BucketSpan(lo, hi, counts, displs, (a, a + counts[rank]))


def plan(n: int, layer_ranges: list[tuple[int, int]], bucket_bytes: int, itemsize: int,
         ranges: Sequence[tuple[int, int]], rank: int, token_table: tuple[int, int] | None = None
         ) -> tuple[list[BucketSpan], dict[int, int]]:
    """Every bucket with its parts (bucket_bounds, then bucket_parts), and the layer -> bucket map."""
    bounds, bucket_of_layer = bucket_bounds(n, layer_ranges, bucket_bytes, itemsize, token_table)
    return [bucket_parts(lo, hi, ranges, rank) for lo, hi in bounds], bucket_of_layer
