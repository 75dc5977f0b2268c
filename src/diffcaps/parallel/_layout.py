"""How a sequence of any length is cut into one shard per rank, and how a rank learns its peers' lengths.

Shards are uneven when the length does not divide by the number of ranks: the first
``length % ranks`` ranks hold one token more (``torch.tensor_split``'s rule). The attention
sequences inside the model are concatenations of whole split streams (Flux attends over
``[text shard; image shard]``), so a rank's peers' lengths are a sum of the streams' shard
lengths, known to every rank without communication. When two such sums cannot be told apart
from one rank's own length, every rank exchanges lengths instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations
from typing import Final, final

__all__ = ["Layout", "shard_sizes"]

_MAX_PARTS: Final = 6  # above this many streams, exchange lengths rather than enumerate their sums


def shard_sizes(length: int, ranks: int) -> tuple[int, ...]:
    """The shard length of each of ``ranks`` ranks for a sequence of ``length``."""
    base, extra = divmod(length, ranks)
    return tuple(base + (1 if index < extra else 0) for index in range(ranks))


def _sum(vectors: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sum(parts) for parts in zip(*vectors, strict=True))


@final
class Layout:
    """The shard lengths of one forward call's split inputs, as seen from one rank (``position``)."""

    __slots__ = ("ambiguous", "candidates", "position")

    def __init__(self, position: int, ranks: int, streams: Iterable[int]) -> None:
        """``streams``: the length of each split token stream of the call (text, image, …)."""
        self.position = position
        parts = [shard_sizes(length, ranks) for length in streams]
        candidates: set[tuple[int, ...]] = set()
        if len(parts) <= _MAX_PARTS:
            for count in range(1, len(parts) + 1):
                candidates.update(_sum(chosen) for chosen in combinations(parts, count))
        self.candidates = frozenset(candidates)
        # The same on every rank: whether some rank's own length fits two different sums.
        self.ambiguous = not candidates or any(
            a[index] == b[index] for a, b in combinations(candidates, 2) for index in range(ranks)
        )

    def lengths(self, local: int) -> tuple[int, ...] | None:
        """Every rank's length of the sequence this rank holds ``local`` tokens of.

        ``None`` means the lengths must be exchanged (every rank gets ``None`` for every call
        in that case). Raises ``LookupError`` if ``local`` is not a sum of split shard lengths.
        """
        if self.ambiguous:
            return None
        for candidate in self.candidates:
            if candidate[self.position] == local:
                return candidate
        raise LookupError(local)
