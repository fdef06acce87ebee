"""Bounding detected traffic by where it comes from: live detected activations counted per
origin (the source's link-layer address when the neighbour table knows it) and source address,
so forged source addresses cannot grow the activation table. Pure."""

from __future__ import annotations

import collections

__all__ = ["LOCAL_ORIGIN", "UNKNOWN_ORIGIN", "OriginCounts"]

UNKNOWN_ORIGIN = "unknown"  # a source the neighbour table does not know
LOCAL_ORIGIN = "local"  # this machine: never bounded here


class OriginCounts:
    """Live detected activations: ``detected`` in all, and per origin per source address."""

    def __init__(self) -> None:
        self.detected = 0  # live activations with an origin other than this machine
        # origin -> source address -> its live detected activations
        self._origins: dict[str, collections.Counter[str]] = {}

    def refusal(self, origin: str, host: str, *, max_detected: int, max_per_origin: int,
                max_unknown: int) -> str | None:
        """Why a new detected activation for ``host`` behind ``origin`` is refused
        (``"detected_total"``, ``"detected_per_origin"``), or None when it fits. A host already
        counted behind its origin is never refused for the per-origin bound."""
        if origin == LOCAL_ORIGIN:
            return None
        if self.detected >= max_detected:
            return "detected_total"
        hosts = self._origins.get(origin)
        limit = max_unknown if origin == UNKNOWN_ORIGIN else max_per_origin
        if hosts is not None and host not in hosts and len(hosts) >= limit:
            return "detected_per_origin"
        return None

    def add(self, origin: str, host: str) -> None:
        """A detected activation went live (an empty or local origin is not counted)."""
        if origin and origin != LOCAL_ORIGIN:
            self.detected += 1
            self._origins.setdefault(origin, collections.Counter())[host] += 1

    def remove(self, origin: str, host: str) -> None:
        """A detected activation ended."""
        hosts = self._origins.get(origin) if origin != LOCAL_ORIGIN else None
        if hosts is None:
            return
        self.detected -= 1
        hosts[host] -= 1
        if hosts[host] <= 0:
            del hosts[host]
            if not hosts:
                del self._origins[origin]
