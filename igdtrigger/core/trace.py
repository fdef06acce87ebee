"""Latency trace of the way from a trigger to the router call and back (issue 17).

Off unless ``enable()`` was called (the pipeline calls it when the environment variable
``IGDTRIGGER_TRACE`` names a file): every call site guards with ``if trace.ON``, so a stamp
costs one global lookup when off. When on, ``mark(what, first=True)`` notes where an event
came in (a conntrack datagram read, an API request) before anyone knows whether it matters;
``begin(what)`` starts a trace from those marks once the engine acted on it; ``stamp(what)``
marks a step (from any thread: ``list.append`` is atomic); ``end()`` hands back the steps as
``(what, perf_counter_ns)`` pairs, which the mapper writes as one JSON line per traced add.

Steps, in order: ``recv`` (datagram read) or ``api`` (request handler entered), ``parsed``
(netlink decoded), ``engine`` (activation made, scheduler woken), ``round`` (the scheduler's
round began), then per miniupnpc job ``queued`` (handed to its worker thread), per router
request in it ``call`` (the worker began it) and ``reply`` (the router answered, on the
worker), ``resumed`` (the event loop has the answer); ``checked`` (the pre-add check's lookup
decided: between the lookup's ``reply`` and the add's ``call`` when both are one job,
``gateway.base.add_if_free``), ``journal`` (a row written on the journal thread, where it
trails the add).
Pure: no I/O, a perf counter only.
"""

from __future__ import annotations

import time
from typing import TypeVar

__all__ = ["ON", "begin", "enable", "end", "mark", "marked", "stamp"]

T = TypeVar("T")

ON = False
_marks: list[tuple[str, int]] = []
_steps: list[tuple[str, int]] = []


def enable() -> None:
    """Start recording (a debug switch: ``IGDTRIGGER_TRACE``)."""
    global ON
    ON = True


def mark(what: str, *, first: bool = False) -> None:
    """Note a step of an event that may start a trace; ``first``: the event's first step."""
    if first:
        _marks.clear()
    _marks.append((what, time.perf_counter_ns()))


def marked(what: str, value: T) -> T:
    """``mark(what)`` and return ``value``: a mark after an expression, inline."""
    mark(what)
    return value


def begin(what: str) -> None:
    """The engine acted on the event marked: forget any unfinished trace, start this one."""
    _steps[:] = [*_marks, (what, time.perf_counter_ns())]
    _marks.clear()


def stamp(what: str) -> None:
    """Mark a step of the trace in progress (ignored when none is)."""
    if _steps:
        _steps.append((what, time.perf_counter_ns()))


def end() -> list[tuple[str, int]]:
    """The trace in progress, ended (empty when none was)."""
    steps = list(_steps)
    _steps.clear()
    return steps
