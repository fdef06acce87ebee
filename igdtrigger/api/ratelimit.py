"""Per-client token buckets for the HTTP API (clock-injected, no I/O)."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

__all__ = [
    "RateLimiter",
]


class RateLimiter:
    """``rate`` requests per second per client, bursts up to ``burst``.

    ``take(client)`` returns 0.0 when the request may proceed, else the seconds until one token is
    available (the ``Retry-After``). At most ``max_clients`` buckets are kept; the least recently
    seen client is forgotten first (a forgotten client starts with a full bucket).
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 4096) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict())
        self.rejected = 0

    def take(self, client: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``client``'s bucket: 0.0 when the request may go, else the
        seconds until it could (its ``Retry-After``; counted in ``rejected``, nothing spent)."""
        now = self.clock()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / self.rate
            self.rejected += 1
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        """``Retry-After`` is whole seconds: round up, at least 1."""
        return str(max(1, math.ceil(wait)))
