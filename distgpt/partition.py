"""How a vector is split over the ranks: one object, so every part of the program agrees.

The flat parameter vector (and, with the same ranges, the gradients and the AdamW moments) is cut
into `world` contiguous parts whose sizes differ by at most one. Rank r *owns* part r:
- it sums part r of everyone's gradients (ZeRO-1 reduce-scatter, or the shared-memory sum);
- it writes part r into checkpoint shard r, and reads it back on resume (any world size);
- under ZeRO-1 it is the only rank that updates part r; replicated, every rank updates all of it.
The validation set's windows are split the same way (each rank evaluates its own part).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


def even_ranges(n: int, world: int) -> tuple[tuple[int, int], ...]:
    """[start, end) of each of `world` contiguous parts of range(n), sizes differing by at most one."""
    base, extra = divmod(n, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return tuple((starts[r], starts[r + 1]) for r in range(world))


@dataclass(frozen=True)
class Partition:
    """Rank `rank`'s view of an n-element vector split over `world` ranks.

    owned:   [start, end) of this rank's part: summed, checkpointed (and ZeRO-1-updated) here.
    updated: the slice this rank's AdamW updates: `owned` under ZeRO-1, the whole vector replicated.
    ranges:  every rank's owned part, by rank.
    """

    n: int
    world: int
    rank: int
    zero: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world - 1}")

    @cached_property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return even_ranges(self.n, self.world)

    @property
    def owned(self) -> tuple[int, int]:
        return self.ranges[self.rank]

    @property
    def updated(self) -> tuple[int, int]:
        return self.owned if self.zero else (0, self.n)

    @property
    def owned_size(self) -> int:
        start, end = self.owned
        return end - start
