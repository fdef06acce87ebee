"""Log lines rate-limited per kind: a flood (of connections, malformed requests, router errors)
must not become a flood of journal lines.

A *kind* is a logger and a message template (``record.msg`` before ``%`` formatting), so "API
connection from %s refused" from a thousand addresses is one kind. Each kind may log ``burst``
lines per ``interval`` seconds; the first line after a quiet spell says how many were held back.
Clock-injected, no I/O.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

__all__ = [
    "PerKindThrottle", "QuietBadRequests",
]


class PerKindThrottle(logging.Filter):
    """A logging filter: at most ``burst`` records of one kind (logger, level, message template)
    per ``interval`` seconds; the first record after a quiet window says how many were held back.
    At most ``max_kinds`` kinds are remembered (the least recent is forgotten first)."""

    def __init__(self, burst: int = 100, interval: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 1024) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.max_kinds = max_kinds
        # kind -> [window start, lines logged in it, lines held back]
        self._kinds: collections.OrderedDict[tuple[str, int, str], list[float]] = (
            collections.OrderedDict())

    def filter(self, record: logging.LogRecord) -> bool:
        """Let ``record`` through unless its kind is over its budget in the current window."""
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        state = self._kinds.get(key)
        if state is None or now - state[0] >= self.interval:
            held = int(state[2]) if state is not None else 0
            self._kinds[key] = [now, 1.0, 0.0]
            self._kinds.move_to_end(key)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
            if held:
                record.msg = (f"{record.msg} [{held} more like this were not logged in the "
                              f"last {self.interval:g}s]")
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


class QuietBadRequests(logging.Filter):
    """For aiohttp's ``aiohttp.server`` logger: a request that is not even HTTP (a bad request
    line, a line past 8 KiB, a negative Content-Length) was answered 400 by aiohttp; log one
    warning line for it instead of an ERROR with a traceback per request, once a minute per
    kind of error (with the count of those not logged). A client that hangs up in the middle
    of its request (half a body, a chunk never ended) is one info line a minute, no
    traceback: that is the client's doing, not a fault of the service."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._once = PerKindThrottle(burst=1, interval=60.0, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite aiohttp's traceback records for bad or abandoned requests into one line,
        throttled per kind; every other record passes untouched."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        # only once a record carries an exception: `run` (standalone) imports this module
        # through the pipeline and must not load aiohttp
        from aiohttp.http_exceptions import HttpProcessingError

        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        if isinstance(exc, ConnectionError):
            record.msg = "client %s went away in the middle of its request (%s)"
            record.args = (peer, type(exc).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return self._once.filter(record)
        if not isinstance(exc, HttpProcessingError):
            return True
        text = " ".join(str(getattr(exc, "message", "") or exc).split())
        record.msg = f"malformed HTTP request ({type(exc).__name__}) from %s answered %d: %s"
        record.args = (peer, getattr(exc, "code", 400) or 400,
                       text if len(text) <= 120 else text[:117] + "...")
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return self._once.filter(record)
