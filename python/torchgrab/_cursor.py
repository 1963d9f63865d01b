"""Handing out an epoch's indices at C speed, and counting how many were taken.

A sampler's iterator is asked for one index at a time (torch's ``BatchSampler`` takes ``batch_size`` of
them per batch). A Python ``__next__`` or generator step per index cost a noticeable share of a small
model's training step, so the samplers hand out their order in chunks, each a list iterator chained by
``itertools.chain.from_iterable``: within a chunk no Python code runs. What the sampler must still know,
how many indices its consumer has taken (to match gradient rows to indices first in first out, and for
its state dict), is the chunks before plus what the list iterator's length hint says is gone from the
chunk in hand.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional


class _Chunk:
    __slots__ = ("it", "n")

    def __init__(self, indices: List[int]) -> None:
        self.it = iter(indices)
        self.n = len(indices)

    def taken(self) -> int:
        return self.n - self.it.__length_hint__()

    def cut(self) -> None:
        """Hand out nothing more: a list iterator set to its end stops at the next ``next``."""
        self.it.__setstate__(self.n)


class YieldCursor:
    """The number of indices handed out this epoch, some of them through the chunk in hand."""

    __slots__ = ("_before", "_chunk")

    def __init__(self) -> None:
        self._before = 0
        self._chunk: Optional[_Chunk] = None

    @property
    def value(self) -> int:
        chunk = self._chunk
        return self._before + (chunk.taken() if chunk is not None else 0)

    @property
    def chunk_size(self) -> Optional[int]:
        """The length of the chunk in hand (None: none)."""
        return None if self._chunk is None else self._chunk.n

    def set(self, value: int) -> None:
        """Move the cursor (a new epoch, a loaded state). The chunk in hand stops: an iterator made stale
        by the move hands out nothing more."""
        if self._chunk is not None:
            self._chunk.cut()
            self._chunk = None
        self._before = value

    def hand_out(self, indices: List[int]) -> Iterator[int]:
        """The next chunk, to be chained after the one in hand once that one is all taken."""
        at = self.value
        self.set(at)
        chunk = self._chunk = _Chunk(indices)
        return chunk.it


class Yielded:
    """A sampler's ``_yielded`` attribute: its ``_cursor``'s value (made on first assignment). Assigning
    moves the cursor, so an iterator still handing out the old position stops."""

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self if obj is None else obj._cursor.value

    def __set__(self, obj: Any, value: int) -> None:
        if "_cursor" not in vars(obj):
            obj._cursor = YieldCursor()
        obj._cursor.set(value)
