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

from igdtrigger.core.model import Flow, FlowEnded, FlowLive, FlowsListed, ProcessSeen

__all__ = [
    "Detector", "FlowSink", "Observation",
]

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
