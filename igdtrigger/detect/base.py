"""The interface every detector implements: it reports what it sees to the engine.

Flow detectors (conntrack, socket table) report each new ``Flow``, then, for the flows the engine
follows (``follows(flow)``, injected like ``wanted``), a ``FlowLive`` when a later look finds
packets or a change of state, and a ``FlowEnded`` when the flow is gone; once their first full
look at the table is reported, a ``FlowsListed`` (restored holds are settled); the process detector
reports a ``ProcessSeen`` snapshot on each poll.

Data flows one way: a detector calls ``sink(flow)`` for each new flow it sees; it never talks to
the engine, the mapper or the router. ``sink`` is cheap and never raises; detectors call it from
the event loop thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from igdtrigger.core.model import Flow, FlowEnded, FlowLive, FlowsListed, ProcessSeen, Proto

__all__ = [
    "Detector", "EitherEnd", "FlowSink", "Observation", "PortWanted", "source_filter",
]

PortWanted = Callable[[Proto, int], bool]
"""A prefilter on one port: ``wanted(proto, port)`` is False for flows nobody cares about."""


class EitherEnd:
    """A detector prefilter on both ends of a flow (issue 14's topology 2).

    Called as every prefilter is, ``wanted(proto, dport)``: the flow's destination port (a
    trigger port, a port a rule opened, a mapped port a flow arrives on). ``source(proto,
    sport)``: a flow refused on its destination port is still kept when its *source* port is
    one of interest: an IGD front client's mapped internal port, from which an app (a game
    server, a torrent client) starts flows of its own. Detectors read it with
    :func:`source_filter`; one on its destination port only keeps working with either.
    """

    __slots__ = ("dest", "source")

    def __init__(self, dest: PortWanted, source: PortWanted) -> None:
        self.dest = dest
        self.source = source

    def __call__(self, proto: Proto, port: int) -> bool:
        """The destination-port half: ``dest(proto, port)``."""
        return self.dest(proto, port)


def source_filter(wanted: PortWanted | None) -> PortWanted | None:
    """The source-port half of ``wanted`` (:class:`EitherEnd`), else ``None``."""
    return wanted.source if isinstance(wanted, EitherEnd) else None

Observation = Flow | FlowLive | FlowEnded | FlowsListed | ProcessSeen
FlowSink = Callable[[Observation], None]


class Detector(Protocol):
    """A source of new-flow events."""

    name: str

    def check(self) -> None:
        """Raise ``DetectionUnavailable`` with a reason a person can act on if this cannot run."""
        ...

    async def run(self, sink: FlowSink) -> None:
        """Report flows to ``sink`` until cancelled. Raise ``DetectionUnavailable`` on failure."""
        ...
