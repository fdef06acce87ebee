"""The check before an add and the add as one job (``gateway.base.add_if_free``, issue 17).

Every backend gives the one outcome for the same router: a free port is added; a port the
router maps already comes back as that entry with nothing added (the mapper judges whose it
is); a router that cannot look mappings up says so with nothing added; and a lookup that fails
raises, with nothing added: a failed check never lets the add through (never clobber another
host's mapping). The miniupnpc backend runs both requests back to back on its worker thread,
the others ``get`` then ``add``; these tests hold them to the same behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from igdtrigger.core.activation import description_for
from igdtrigger.core.errors import GatewayError, GatewayUnreachable, MalformedReply
from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.gateway.base import Gateway, add_if_free
from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway
from igdtrigger.gateway.upnp.codec import UpnpFault
from igdtrigger.runtime.mapper import Mapper, MapState
from igdtrigger.sim.device import HttpResponse, SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer

from .fakes import FakeClock
from .test_pmp_pcp import LOCAL, FakeRouter
from .test_router_quirks import BACKENDS, backend, other_host_holds
from .test_router_truth import HOST

TAG = "d0d1d2"
CONSOLE = "192.168.1.99"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedIgdServer]:
    async with SimulatedIgdServer(SimulatedRouter()) as server:
        yield server


@pytest.fixture(params=BACKENDS)
async def gw(request: pytest.FixtureRequest, sim: SimulatedIgdServer) -> AsyncIterator[Gateway]:
    """Each UPnP backend, connected to the simulated router."""
    gateway = backend(str(request.param), sim.url)
    await gateway.connect()
    yield gateway
    await gateway.close()


def spec(port: int, client: str = HOST) -> MappingSpec:
    return MappingSpec(Proto.UDP, port, client, port, description_for("check", TAG))


def holder(router: SimulatedRouter, port: int) -> str | None:
    entry = next((m for m in router.mappings() if m.external_port == port), None)
    return None if entry is None else entry.internal_client


def record_actions(router: SimulatedRouter, fault_for: Mapping[str, UpnpFault] | None = None
                   ) -> list[str]:
    """Every action the router is asked, in order; ``fault_for``: actions answered with a
    fault instead."""
    seen: list[str] = []

    def hook(name: str, args: Mapping[str, str]) -> UpnpFault | None:
        seen.append(name)
        return (fault_for or {}).get(name)

    router.action_hook = hook
    return seen


async def test_a_free_port_is_added_and_a_held_one_comes_back_untouched(
        sim: SimulatedIgdServer, gw: Gateway) -> None:
    free = await add_if_free(gw, spec(40000), 600)
    assert free.granted is not None and free.granted.external_port == 40000
    assert free.held is None and free.unchecked is None
    assert holder(sim.router, 40000) == HOST

    other_host_holds(sim.router, 40001, CONSOLE)
    seen = record_actions(sim.router)
    taken = await add_if_free(gw, spec(40001), 600)
    assert taken.granted is None
    assert taken.held is not None and taken.held.internal_client == CONSOLE
    assert "AddPortMapping" not in seen
    assert holder(sim.router, 40001) == CONSOLE

    mine = await add_if_free(gw, spec(40000), 600)  # our own entry: the caller judges it
    assert mine.granted is None
    assert mine.held is not None and mine.held.internal_client == HOST


FAILED_LOOKUPS: dict[str, Any] = {
    "fault-501": UpnpFault(501, "ActionFailed"),
    "fault-without-code": UpnpFault(None, "UPnPError"),
    "garbage": HttpResponse(200, b"<?xml version='1.0'?><nothing/>"),
    "control-url-gone": HttpResponse(404, b""),
}


@pytest.mark.parametrize("failure", list(FAILED_LOOKUPS))
async def test_a_failed_check_raises_and_nothing_is_added_on_every_backend(
        sim: SimulatedIgdServer, gw: Gateway, failure: str) -> None:
    how = FAILED_LOOKUPS[failure]
    if isinstance(how, UpnpFault):
        seen = record_actions(sim.router, {"GetSpecificPortMappingEntry": how})
    else:
        seen = record_actions(sim.router)
        sim.router.http_hook = (
            lambda action: how if action == "GetSpecificPortMappingEntry" else None)
    with pytest.raises(GatewayError) as raised:
        await add_if_free(gw, spec(40002), 600)
    assert "AddPortMapping" not in seen
    assert holder(sim.router, 40002) is None
    if failure == "garbage":
        assert isinstance(raised.value, MalformedReply)
    if failure == "control-url-gone":
        assert isinstance(raised.value, GatewayUnreachable)


@pytest.mark.parametrize("code", [401, 602])
async def test_a_router_that_cannot_look_up_says_so_and_nothing_is_added(
        sim: SimulatedIgdServer, gw: Gateway, code: int) -> None:
    seen = record_actions(sim.router, {"GetSpecificPortMappingEntry": UpnpFault.of(code)})
    out = await add_if_free(gw, spec(40003), 600)
    assert out.unchecked is not None and out.unchecked.code == code
    assert out.granted is None and out.held is None
    assert "AddPortMapping" not in seen


async def test_a_refused_timed_lease_after_the_check_is_added_with_lease_0(
        sim: SimulatedIgdServer, gw: Gateway) -> None:
    sim.router.lease_mode = "permanent_only_725"
    out = await add_if_free(gw, spec(40004), 600)
    assert out.granted is not None and out.granted.lease == 0
    assert out.granted.timed_lease_refused is not None
    assert holder(sim.router, 40004) == HOST


@pytest.mark.parametrize("cls", [NatPmpGateway, PcpGateway], ids=["nat-pmp", "pcp"])
async def test_nat_pmp_and_pcp_add_a_free_port_and_show_their_own_entry(
        router: FakeRouter, cls: type[NatPmpGateway] | type[PcpGateway]) -> None:
    gw = cls(LOCAL, port=router.port, initial_timeout=0.05, total_timeout=0.4)
    try:
        info = await gw.connect()
        mine = spec(40005, info.local_address)
        out = await add_if_free(gw, mine, 600)
        assert out.granted is not None and out.held is None
        assert router.mappings  # the router holds it
        again = await add_if_free(gw, mine, 600)  # the protocols show only our own entries
        assert again.granted is None
        assert again.held is not None and again.held.internal_client == info.local_address
    finally:
        await gw.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_the_mapper_never_clobbers_through_a_failed_check_on_any_upnp_backend(
        sim: SimulatedIgdServer, kind: str) -> None:
    clock = FakeClock()
    gw = backend(kind, sim.url)
    m = Mapper(gw, clock=clock, tag=TAG, lease=600, verify_interval=60)
    try:
        await m.reconcile({spec(40010).key: spec(40010)})  # the router's lookups worked once
        assert m.traits.reports_mappings is not False
        other_host_holds(sim.router, 40011, CONSOLE)
        seen = record_actions(sim.router, {"GetSpecificPortMappingEntry": UpnpFault(501, "x")})
        wanted = {s.key: s for s in (spec(40010), spec(40011))}
        await m.reconcile(wanted)
        assert holder(sim.router, 40011) == CONSOLE
        assert "AddPortMapping" not in seen
        assert m.applied[MappingKey(Proto.UDP, 40011)].state is not MapState.ACTIVE
        sim.router.action_hook = None  # the lookup works again: still never taken
        clock.advance(120)
        await m.reconcile(wanted)
        assert holder(sim.router, 40011) == CONSOLE
        assert m.applied[MappingKey(Proto.UDP, 40011)].state is MapState.CONFLICT
    finally:
        await gw.close()
