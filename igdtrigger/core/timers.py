"""When activations lapse: a heap of (expiry, seq, id) entries, lazily invalidated (an entry
whose activation is gone or whose expiry moved is stale and skipped). Pure."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping

from igdtrigger.core.activation import Activation

__all__ = ["ExpiryHeap"]


class ExpiryHeap:
    """Expiries of the activations in ``live`` (the engine's table, by id)."""

    def __init__(self, live: Mapping[str, Activation]) -> None:
        self._live = live
        self._heap: list[tuple[float, int, str]] = []

    def __len__(self) -> int:
        """Entries held, stale ones included (bounded: see :meth:`push`)."""
        return len(self._heap)

    def push(self, act: Activation) -> None:
        """Schedule ``act`` at ``act.expires`` (held ones, ``inf``, are not scheduled). Old entries
        stay as stale ones; the heap is rebuilt when they outnumber the live ones 4 to 1."""
        if act.expires == math.inf:
            return
        heapq.heappush(self._heap, (act.expires, act.seq, act.id))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._live):
            self._heap = [(a.expires, a.seq, a.id) for a in self._live.values()
                          if a.expires != math.inf]
            heapq.heapify(self._heap)

    def due(self, now: float) -> Iterator[Activation]:
        """Pop and yield each live activation whose expiry is at or before ``now`` (seconds)."""
        while self._heap and self._heap[0][0] <= now:
            _, _, act_id = heapq.heappop(self._heap)
            act = self._live.get(act_id)
            if act is not None and act.expires <= now:
                yield act

    def next(self) -> float | None:
        """The earliest live expiry, or None when nothing is scheduled."""
        while self._heap:
            when, _, act_id = self._heap[0]
            act = self._live.get(act_id)
            if act is not None and act.expires == when:
                return when
            heapq.heappop(self._heap)  # stale entry from a refresh or removal
        return None
