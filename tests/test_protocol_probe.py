"""`protocol = "auto"` probes UPnP, PCP and NAT-PMP at once and prefers them in that order:
the choice is made as soon as it is known, never held for a protocol the router drops silently
(a standalone `run` or a starting service waited 3 s for it; issue 17)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from igdtrigger.core.errors import GatewayNotFound, GatewayUnreachable
from igdtrigger.gateway.select import FallbackGateway


class Probe:
    """A candidate that answers (``info``) or fails once ``go`` is set, or never."""

    def __init__(self, info: str | None, *, answers: bool = True) -> None:
        self.info = info
        self.go = asyncio.Event()
        self.answers = answers
        if answers:
            self.go.set()
        self.closed = False

    async def connect(self) -> Any:
        await self.go.wait()
        if self.info is None:
            raise GatewayUnreachable("refused")
        return self.info

    async def close(self) -> None:
        self.closed = True


async def chosen(connect: Any) -> Any:
    """What ``connect`` (a coroutine or task) chose, within a deadline (never 30 s)."""
    return await asyncio.wait_for(connect, 10)


def gateway(*probes: tuple[str, Probe]) -> FallbackGateway:
    return FallbackGateway(list(probes), parallel=True, probe_timeout=30)  # type: ignore[arg-type]


async def test_an_answered_upnp_is_not_held_for_a_silent_nat_pmp() -> None:
    gw = gateway(("upnp-igd", Probe("upnp")), ("pcp", Probe("x", answers=False)),
                 ("nat-pmp", Probe("y", answers=False)))
    assert await chosen(gw.connect()) == "upnp"
    assert gw.current_name == "upnp-igd"
    assert gw.probe_results == {"upnp-igd": "ok",
                                "pcp": "not waited for (upnp-igd answered first)",
                                "nat-pmp": "not waited for (upnp-igd answered first)"}


async def test_a_preferred_protocol_still_probing_is_waited_for() -> None:
    slow_upnp = Probe("upnp", answers=False)
    gw = gateway(("upnp-igd", slow_upnp), ("pcp", Probe("pcp")))
    connect = asyncio.create_task(gw.connect())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not connect.done()  # PCP answered, but UPnP comes first if it answers
    slow_upnp.go.set()
    assert await chosen(connect) == "upnp"
    assert gw.probe_results == {"upnp-igd": "ok", "pcp": "ok"}


async def test_the_next_protocol_wins_as_soon_as_the_preferred_ones_failed() -> None:
    gw = gateway(("upnp-igd", Probe(None)), ("pcp", Probe("pcp")),
                 ("nat-pmp", Probe("y", answers=False)))
    assert await chosen(gw.connect()) == "pcp"
    assert gw.probe_results["upnp-igd"] == "refused"
    assert gw.probe_results["nat-pmp"] == "not waited for (pcp answered first)"


async def test_none_answering_names_each() -> None:
    gw = gateway(("upnp-igd", Probe(None)), ("pcp", Probe(None)))
    with pytest.raises(GatewayNotFound, match="upnp-igd: refused; pcp: refused"):
        await asyncio.wait_for(gw.connect(), 10)
