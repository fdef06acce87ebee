"""The backend contract: every UPnP backend (miniupnpc, our SOAP client, and ``auto``, the
default: miniupnpc with SOAP as fallback) meets the same router the same way (issue 11).

Each test runs against every backend that can speak to that router, so a quirk handled on one
path and not the other fails here: one fault taxonomy (the same router answer is the same error
type on every path), one service choice, one lease fallback, the same capabilities, the same
gateway info. The simulated router's own table decides what happened.

The mapper-level router-truth inputs (1, 2, 5-8) run over the same backends in
``tests/test_router_truth.py``; the layout quirks in ``tests/test_router_quirks.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest

from igdtrigger.core.activation import description_for
from igdtrigger.core.errors import (
    DEVICE_DENIED_HINT,
    SECURE_MODE_HINT,
    ActionFailed,
    GatewayError,
    GatewayNotFound,
    InvalidArgs,
    LeaseRefused,
    MalformedReply,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
    TableFull,
    UnsupportedAction,
)
from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.gateway.base import Capability, Granted, add_with_lease_fallback
from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway
from igdtrigger.gateway.natpmp.codec import pcp_error, pmp_error
from igdtrigger.gateway.select import FallbackGateway
from igdtrigger.gateway.upnp.codec import UpnpFault, fault_error
from igdtrigger.gateway.upnp.codec import UpnpFault as UPnPFault
from igdtrigger.gateway.upnp.miniupnpc import miniupnpc_code
from igdtrigger.gateway.upnp.soap import SoapGateway
from igdtrigger.runtime.mapper import Mapper, MapState
from igdtrigger.sim.describe import FIRST_WAN_CONTROL_PATH
from igdtrigger.sim.device import HttpResponse, SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer

from .fakes import FakeClock
from .test_pmp_pcp import LOCAL, FakeRouter
from .test_router_quirks import BACKENDS, backend, other_host_holds
from .test_router_truth import HOST, Rig

TAG = "c0c1c2"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedIgdServer]:
    async with SimulatedIgdServer(SimulatedRouter()) as server:
        yield server


def spec(port: int = 40000, client: str = HOST, *, any_port: bool = False) -> MappingSpec:
    return MappingSpec(Proto.UDP, port, client, port, description_for("contract", TAG),
                       external_any=any_port)


def answer(router: SimulatedRouter, action: str, fault: UPnPFault) -> None:
    """Make the router answer ``action`` with ``fault`` from now on."""
    def hook(name: str, args: Mapping[str, str]) -> UPnPFault | None:
        return fault if name == action else None
    router.action_hook = hook


def ours(router: SimulatedRouter) -> list[int]:
    return [m.external_port for m in router.mappings() if m.internal_client == HOST]


# --- one fault taxonomy ------------------------------------------------------------------------

# A fault the router answers -> the error type every backend raises, with the same code.
FAULTS: list[tuple[int, type[GatewayError]]] = [
    (401, UnsupportedAction), (402, InvalidArgs), (501, ActionFailed), (602, UnsupportedAction),
    (606, NotAuthorized), (714, NoSuchMapping), (718, MappingConflict), (725, LeaseRefused),
    (728, TableFull), (729, MappingConflict), (730, NoSuchMapping),
]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize(("code", "cls"), FAULTS)
async def test_same_fault_same_error_type_on_every_backend(
        sim: SimulatedIgdServer, kind: str, code: int, cls: type[GatewayError]) -> None:
    gw = backend(kind, sim.url)
    await gw.connect()
    answer(sim.router, "DeletePortMapping", UPnPFault.of(code))
    with pytest.raises(cls) as caught:
        await gw.delete(Proto.UDP, 40000)
    assert type(caught.value) is cls
    assert isinstance(caught.value, ActionFailed)
    assert caught.value.code == code
    await gw.close()


def test_every_miniupnpc_text_maps_to_its_code() -> None:
    """The text miniupnpc's strupnperror() gives is turned back into the code, once."""
    assert miniupnpc_code("ConflictInMappingEntry") == 718
    assert miniupnpc_code("Action not authorized") == 606
    assert miniupnpc_code("Invalid Args") == 402
    assert miniupnpc_code(" OnlyPermanentLeasesSupported ") == 725
    assert miniupnpc_code("Miniupnpc HTTP error") == -3
    assert miniupnpc_code("UnknownError") is None
    assert miniupnpc_code("something else entirely") is None


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fault_the_table_does_not_name_is_still_typed(
        sim: SimulatedIgdServer, kind: str) -> None:
    gw = backend(kind, sim.url)
    await gw.connect()
    answer(sim.router, "DeletePortMapping", UPnPFault(899, "Vendor Specific"))
    with pytest.raises(ActionFailed) as caught:
        await gw.delete(Proto.UDP, 40000)
    assert type(caught.value) is ActionFailed  # nothing more specific is claimed
    await gw.close()


FAULT_WITHOUT_CODE = (
    b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
    b"<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
    b'<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorDescription>no'
    b"</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>")


@pytest.mark.parametrize("body", [FAULT_WITHOUT_CODE, b""], ids=["fault-without-code", "empty"])
@pytest.mark.parametrize("status", [400, 500])
async def test_soap_error_without_code_is_a_typed_error(
        sim: SimulatedIgdServer, status: int, body: bytes) -> None:
    """A fault with no errorCode (once a StopIteration) or a bare HTTP 400/500: ActionFailed
    without a code, from the one codec."""
    gw = SoapGateway(sim.url)
    await gw.connect()
    sim.router.http_hook = lambda action: HttpResponse(status, body) \
        if action == "AddPortMapping" else None
    with pytest.raises(ActionFailed) as caught:
        await gw.add(spec(), 600)
    assert caught.value.code is None
    assert ours(sim.router) == []


@pytest.mark.parametrize(("status", "body"), [(400, b"<html>Bad Request</html>"),
                                           (500, FAULT_WITHOUT_CODE)],
                         ids=["bare-400", "fault-without-code"])
async def test_miniupnpc_takes_an_error_without_code_for_success_and_status_says_unverified(
        sim: SimulatedIgdServer, tmp_path: Path, status: int, body: bytes) -> None:
    """miniupnpc cannot see HTTP status codes and needs an errorCode: it reports a bare 400,
    or a fault without a code, to AddPortMapping as success (our SOAP client raises, above).
    The mapper's read-back then finds nothing, so status never claims a verified mapping the
    router does not hold."""
    sim.router.http_hook = lambda action: HttpResponse(status, body) \
        if action == "AddPortMapping" else None
    rig = Rig(sim, FakeClock(), tmp_path, "miniupnpc")
    svc = await rig.start()
    try:
        await rig.activate()
        assert ours(sim.router) == []
        assert [m["verified"] for m in svc.status()["mappings"]] == [False]
    finally:
        await svc.stop()
    assert ours(sim.router) == []


async def test_garbage_reply_is_malformed_not_success(sim: SimulatedIgdServer) -> None:
    gw = SoapGateway(sim.url)
    await gw.connect()
    sim.router.http_hook = lambda action: HttpResponse(
        200, b"<?xml version='1.0'?><nothing/>") if action == "AddPortMapping" else None
    with pytest.raises(MalformedReply, match="no AddPortMappingResponse"):
        await gw.add(spec(), 600)


# --- one lease fallback ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("mode", ["permanent_only_725", "permanent_only_402"])
async def test_refused_timed_lease_becomes_lease_0_on_every_backend(
        sim: SimulatedIgdServer, kind: str, mode: str) -> None:
    """MikroTik (725) and ARRIS (402, tailscale#15223; input 2) on every path: retried with
    lease 0 in the gateway layer, reported as such."""
    sim.router.lease_mode = mode  # type: ignore[assignment]
    gw = backend(kind, sim.url)
    granted = await gw.add(spec(), 600)
    assert granted.lease == 0
    assert granted.requested == 600
    assert granted.timed_lease_refused is not None
    assert granted.timed_lease_refused.code == (725 if mode.endswith("725") else 402)
    assert [(m.external_port, m.lease_remaining) for m in sim.router.mappings()] == [(40000, 0)]
    assert sim.router.calls["AddPortMapping"] == 2  # one refused, one lease 0: no more
    await gw.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_402_from_a_full_table_is_not_a_lease_refusal(
        sim: SimulatedIgdServer, kind: str) -> None:
    """Input 1 at the gateway: the lease-0 retry fails too, so nothing is concluded about leases
    and the router's own error comes out."""
    gw = backend(kind, sim.url)
    await gw.connect()
    answer(sim.router, "AddPortMapping", UPnPFault.of(402))
    with pytest.raises(InvalidArgs):
        await gw.add(spec(), 600)
    assert sim.router.calls["AddPortMapping"] == 2
    sim.router.action_hook = None
    granted = await gw.add(spec(), 600)
    assert (granted.lease, granted.timed_lease_refused) == (600, None)
    await gw.close()


async def test_lease_fallback_is_one_retry_and_only_for_lease_refusals() -> None:
    asked: list[int] = []

    def router(refusal: ActionFailed, *, refuse_zero: bool = False
               ) -> Callable[[int], Awaitable[Granted]]:
        async def once(lease: int) -> Granted:
            asked.append(lease)
            if lease or refuse_zero:
                raise refusal
            return Granted(40000, 0)
        return once

    lease_725 = LeaseRefused("AddPortMapping", 725, "OnlyPermanentLeasesSupported")
    granted = await add_with_lease_fallback(router(lease_725), 600)
    assert asked == [600, 0]
    assert (granted.lease, granted.requested, granted.timed_lease_refused) == (0, 600, lease_725)

    asked.clear()
    granted = await add_with_lease_fallback(router(lease_725), 0)  # lease 0 asked: no retry
    assert asked == [0] and granted.timed_lease_refused is None

    asked.clear()
    with pytest.raises(MappingConflict):
        await add_with_lease_fallback(router(MappingConflict(
            "AddPortMapping", 718, "ConflictInMappingEntry")), 600)
    assert asked == [600]  # a conflict is no lease question

    asked.clear()
    full = InvalidArgs("AddPortMapping", 402, "Invalid Args")
    with pytest.raises(InvalidArgs):
        await add_with_lease_fallback(router(full, refuse_zero=True), 600)
    assert asked == [600, 0]  # one retry, then the router's own answer


# --- one service choice ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_dead_first_wan_is_never_mapped_on(sim: SimulatedIgdServer, kind: str) -> None:
    """Input 3: two WANDevices, the first ``Disconnected`` with no external address but still
    accepting adds (tailscale#8364). Every path either maps on the connected second service or
    refuses; the default backend maps on the second."""
    dead = sim.router.add_first_wan()
    gw = backend(kind, sim.url)
    if kind == "miniupnpc":
        # miniupnpc always uses the first service listed: refused, with the reason
        with pytest.raises(GatewayNotFound, match="usable WAN service"):
            await gw.connect()
    else:
        info = await gw.connect()
        assert info.control_url.endswith("/ctl/IPConn")
        assert info.external_address == "203.0.113.4"
        m = Mapper(gw, clock=lambda: 0.0, tag=TAG, lease=600)
        await m.reconcile({MappingKey(Proto.UDP, 40000): spec()})
        assert m.applied[MappingKey(Proto.UDP, 40000)].state is MapState.ACTIVE
        assert ours(sim.router) == [40000]
        await m.remove_all()
        assert ours(sim.router) == []
    if kind == "auto":
        assert isinstance(gw, FallbackGateway)
        assert gw.current_name == "upnp-igd/soap"
        assert "usable WAN service" in gw.probe_results["upnp-igd/miniupnpc"]
    assert dead.mappings() == []  # nothing ever landed on the dead WAN
    assert dead.calls["AddPortMapping"] == 0
    await gw.close()


async def test_dead_first_wan_on_the_default_service(sim: SimulatedIgdServer,
                                                     tmp_path: Path) -> None:
    """Input 3 end to end: ``serve`` with the default backend; status agrees with the router."""
    dead = sim.router.add_first_wan()
    rig = Rig(sim, FakeClock(), tmp_path, "auto")
    svc = await rig.start()
    await rig.activate()
    assert ours(sim.router) == [40000]
    assert dead.mappings() == []
    rig.agrees()
    gw = svc.status()["gateway"]
    assert (gw["backend"], gw["control_url"], gw["external_address"]) == (
        "soap", sim.control_url, "203.0.113.4")
    assert await svc.stop() == 1
    assert ours(sim.router) == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_connected_first_wan_is_used_by_every_backend(
        sim: SimulatedIgdServer, kind: str) -> None:
    """Both WANs connected, the first with a public address: every backend uses the first,
    miniupnpc included (its own choice agrees, so it is kept)."""
    first = sim.router.add_first_wan(connection_status="Connected", external_ip="22.33.44.55")
    gw = backend(kind, sim.url)
    info = await gw.connect()
    assert info.control_url.endswith(FIRST_WAN_CONTROL_PATH)
    assert info.external_address == "22.33.44.55"
    await gw.add(spec(), 600)
    assert [m.external_port for m in first.mappings()] == [40000]
    assert sim.router.mappings() == []
    if kind == "auto":
        assert isinstance(gw, FallbackGateway) and gw.current_name == "upnp-igd/miniupnpc"
    await gw.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_gateway_info_is_the_same_on_every_backend(
        sim: SimulatedIgdServer, kind: str) -> None:
    """What ``status --json`` and ``gateway`` show comes from one service choice."""
    info = await backend(kind, sim.url).connect()
    assert (info.protocol, info.location, info.service_type, info.external_address,
            info.local_address) == ("upnp-igd", sim.url,
                                    "urn:schemas-upnp-org:service:WANIPConnection:2",
                                    "203.0.113.4", "127.0.0.1")
    assert info.control_url == sim.control_url
    assert info.root_uuid == sim.router.udn.lower()
    assert info.backend == ("soap" if kind == "soap" else "miniupnpc")


# --- capabilities ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("version", [1, 2])
async def test_capabilities_are_named_and_add_any_is_used_by_default(
        sim: SimulatedIgdServer, kind: str, version: int) -> None:
    sim.router.igd_version = version
    gw = backend(kind, sim.url)
    assert gw.capabilities == frozenset()  # nothing is known before connecting
    await gw.connect()
    assert Capability.LIST in gw.capabilities
    assert (Capability.ADD_ANY in gw.capabilities) is (version == 2)
    # another host holds 40000: AddAnyPortMapping on IGDv2 (the default wrapper passes it on)
    other_host_holds(sim.router, 40000)
    if version == 2:
        granted = await gw.add_any(spec(any_port=True), 600)
        assert granted.external_port != 40000
        assert sim.router.calls["AddAnyPortMapping"] == 1
        assert ours(sim.router) == [granted.external_port]
    else:
        with pytest.raises(UnsupportedAction):
            await gw.add_any(spec(any_port=True), 600)
        assert sim.router.calls["AddAnyPortMapping"] == 0
    await gw.close()


# --- hints that fit: 606/718 for the requester itself (input 4) ------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fritzbox_606_for_the_requester_itself_says_allow_this_device(
        sim: SimulatedIgdServer, kind: str) -> None:
    """Input 4: a FRITZ!Box with "permit independent port sharing" off answers 606 to every
    AddPortMapping, even for the host asking (lontivero/Open.NAT#80). Not secure mode."""
    answer(sim.router, "AddPortMapping", UPnPFault.of(606))
    gw = backend(kind, sim.url)
    m = Mapper(gw, clock=lambda: 0.0, tag=TAG, lease=600)
    key = MappingKey(Proto.UDP, 40000)
    await m.reconcile({key: spec()})
    app = m.applied[key]
    assert app.state is MapState.FAILED
    assert DEVICE_DENIED_HINT in app.error
    assert SECURE_MODE_HINT not in app.error
    assert "FRITZ!Box" in app.error
    assert ours(sim.router) == []
    await gw.close()


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("code", [606, 718])
async def test_denial_for_another_host_keeps_the_secure_mode_hint(
        sim: SimulatedIgdServer, kind: str, code: int) -> None:
    sim.router.igd_version = 2 if code == 606 else 1
    sim.router.secure_mode = True
    gw = backend(kind, sim.url)
    m = Mapper(gw, clock=lambda: 0.0, tag=TAG, lease=600)
    other = spec(client="192.168.1.50")
    await m.reconcile({other.key: other})
    app = m.applied[other.key]
    assert app.state is MapState.FAILED
    assert SECURE_MODE_HINT in app.error
    assert DEVICE_DENIED_HINT not in app.error
    await gw.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_718_for_the_requester_on_a_free_port_is_a_device_denial(
        sim: SimulatedIgdServer, kind: str) -> None:
    """IGDv1 FRITZ-like: 718 although nothing holds the port and the mapping is for us."""
    sim.router.igd_version = 1
    answer(sim.router, "AddPortMapping", UPnPFault.of(718))
    gw = backend(kind, sim.url)
    m = Mapper(gw, clock=lambda: 0.0, tag=TAG, lease=600)
    await m.reconcile({spec().key: spec()})
    app = m.applied[spec().key]
    assert app.state is MapState.FAILED
    assert DEVICE_DENIED_HINT in app.error
    await gw.close()


# --- NAT-PMP and PCP: the same taxonomy and capabilities ------------------------------------

# The same condition is the same error type whichever protocol the router speaks.
SAME_CONDITION: list[tuple[str, GatewayError, GatewayError, GatewayError | None]] = [
    ("not authorized", fault_error("AddPortMapping", UpnpFault(606, "x"), for_self=False),
     pmp_error("NAT-PMP map udp/1", 2), pcp_error("PCP MAP udp/1", 2)),
    ("table full", fault_error("AddPortMapping", UpnpFault(728, "x")),
     pmp_error("NAT-PMP map udp/1", 4), pcp_error("PCP MAP udp/1", 8)),
    ("port taken", fault_error("AddPortMapping", UpnpFault(718, "x")),
     pcp_error("PCP MAP udp/1", 11), None),
]


@pytest.mark.parametrize(("what", "upnp", "one", "other"), SAME_CONDITION,
                         ids=[c[0] for c in SAME_CONDITION])
def test_same_condition_same_type_on_every_protocol(
        what: str, upnp: GatewayError, one: GatewayError, other: GatewayError | None) -> None:
    assert type(one) is type(upnp), what
    if other is not None:
        assert type(other) is type(upnp), what


@pytest.mark.parametrize("cls", [NatPmpGateway, PcpGateway])
async def test_router_picked_port_add_any_keeps_it_add_refuses_it(
        cls: type[NatPmpGateway] | type[PcpGateway]) -> None:
    """A VPN gateway that ignores the suggested port (input 5, gateway side): ``add_any`` keeps
    and reports the port it assigned; an exact ``add`` is a conflict, undone on the router."""
    transport, pmp_router = await asyncio.get_running_loop().create_datagram_endpoint(
        FakeRouter, local_addr=(LOCAL, 0))
    pmp_router.own_ports = True
    gw = cls(LOCAL, port=pmp_router.port, initial_timeout=0.05, total_timeout=0.4)
    try:
        assert gw.capabilities == frozenset()
        await gw.connect()
        assert gw.capabilities == frozenset({Capability.ADD_ANY})  # no table to list
        exact = MappingSpec(Proto.UDP, 40000, LOCAL, 40000, "x")
        with pytest.raises(MappingConflict):
            await gw.add(exact, 600)
        assert pmp_router.mappings.get((17, 40000), (0, 0))[1] == 0  # undone (lifetime 0)
        granted = await gw.add_any(MappingSpec(Proto.UDP, 40001, LOCAL, 40001, "x"), 600)
        assert granted.external_port != 40001
        assert pmp_router.mappings[(17, 40001)][0] == granted.external_port
        assert [m.external_port for m in await gw.list()] == [granted.external_port]
    finally:
        await gw.close()
        transport.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fritzbox_606_in_status_on_every_backend(sim: SimulatedIgdServer, kind: str,
                                                      tmp_path: Path) -> None:
    """Input 4 end to end: ``status --json`` says the mapping failed, and why, in the words
    that fit; the router's table holds nothing; stop has nothing to remove."""
    answer(sim.router, "AddPortMapping", UPnPFault.of(606))
    rig = Rig(sim, FakeClock(), tmp_path, kind)
    svc = await rig.start()
    await rig.activate()
    [m] = svc.status()["mappings"]
    assert m["state"] == "failed"
    assert "independent port sharing" in m["error"]
    assert "secure_mode" not in m["error"]
    rig.agrees()
    assert await svc.stop() == 0
    assert ours(sim.router) == []
