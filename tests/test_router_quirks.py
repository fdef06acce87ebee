"""The gateway backends (miniupnpc, our SOAP client, the automatic fallback) against the
simulated router told to behave like real ones (router-facts.md). One test per quirk, each run
against every backend (``kind``): one that cannot speak to that router must refuse it with a
typed error, never map on the wrong service (see also tests/test_backend_contract.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from igdtrigger.core.activation import description_for
from igdtrigger.core.errors import GatewayError, GatewayNotFound, GatewayTimeout, GatewayUnreachable
from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.gateway.base import Gateway
from igdtrigger.gateway.select import FallbackGateway, build_gateway
from igdtrigger.gateway.upnp.miniupnpc import MiniupnpcGateway
from igdtrigger.gateway.upnp.soap import SoapGateway
from igdtrigger.runtime.mapper import Mapper, MapState
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer

TAG = "q1q2q3"


def other_host_holds(router: SimulatedRouter, port: int, host: str = "192.168.1.99") -> None:
    """Another LAN host (a console) maps UDP ``port`` to itself, permanently."""
    assert router.call("AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": "UDP",
        "NewInternalPort": str(port), "NewInternalClient": host, "NewEnabled": "1",
        "NewPortMappingDescription": "console", "NewLeaseDuration": "0"},
        requester=host) == {}


def spec(port: int, client: str = "127.0.0.1") -> MappingSpec:
    return MappingSpec(Proto.UDP, port, client, port, description_for("quirk", TAG))


BACKENDS = ["auto", "miniupnpc", "soap"]


def backend(kind: str, url: str, *, timeout: float = 3.0) -> Gateway:
    if kind == "miniupnpc":
        return MiniupnpcGateway(url, timeout=timeout)
    if kind == "soap":
        return SoapGateway(url, timeout=timeout)
    return build_gateway(url)


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedIgdServer]:
    server = SimulatedIgdServer(SimulatedRouter())
    await server.start()
    yield server
    await server.close()


def layout(services: str, *, root_ns: str = "urn:schemas-upnp-org:device-1-0",
           prefix: str = "urn:schemas-upnp-org", head: str = "", tail: str = "") -> bytes:
    return f"""<?xml version="1.0"?>
<root xmlns="{root_ns}">{head}<specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>{prefix}:device:InternetGatewayDevice:1</deviceType>
<friendlyName>quirky</friendlyName><UDN>uuid:q</UDN>
<deviceList><device><deviceType>{prefix}:device:WANDevice:1</deviceType><UDN>uuid:w</UDN>
<deviceList><device><deviceType>{prefix}:device:WANConnectionDevice:1</deviceType>
<UDN>uuid:c</UDN><serviceList>{services}</serviceList></device></deviceList>
</device></deviceList></device>{tail}</root>""".encode()


def svc(stype: str, ctl: str = "/ctl/IPConn") -> str:
    return (f"<service><serviceType>{stype}</serviceType><serviceId>urn:upnp-org:serviceId:x"
            f"</serviceId><SCPDURL>/x.xml</SCPDURL><controlURL>{ctl}</controlURL>"
            "<eventSubURL>/evt/x</eventSubURL></service>")


async def roundtrip(gw: object, sim: SimulatedIgdServer) -> None:
    """Open, verify, renew and close one mapping through the mapper; the router agrees."""
    m = Mapper(gw, clock=lambda: 0.0, tag=TAG, lease=600)  # type: ignore[arg-type]
    want = {MappingKey(Proto.UDP, 40000): spec(40000)}
    await m.reconcile(want)
    assert m.applied[MappingKey(Proto.UDP, 40000)].state is MapState.ACTIVE, m.snapshot()
    assert [(x.external_port, x.internal_client) for x in sim.router.mappings()] == \
        [(40000, "127.0.0.1")]
    await m.reconcile({})
    assert sim.router.mappings() == []


async def test_standard_miniupnpd_layout_uses_miniupnpc(sim: SimulatedIgdServer) -> None:
    gw = build_gateway(sim.url)
    assert isinstance(gw, FallbackGateway)
    await roundtrip(gw, sim)
    assert gw.current_name == "upnp-igd/miniupnpc"
    await gw.close()


async def test_standard_layout_on_every_backend(sim: SimulatedIgdServer, kind: str) -> None:
    gw = backend(kind, sim.url)
    await roundtrip(gw, sim)
    info = gw.info
    assert info is not None
    assert info.service_type == "urn:schemas-upnp-org:service:WANIPConnection:2"
    assert info.external_address == "203.0.113.4"


async def test_legacy_dslforum_only_huawei_falls_back_to_our_client(
        sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.description_override = layout(
        svc("urn:dslforum-org:service:WANPPPConnection:1", "/ctl/WANPPPConnection_1"),
        prefix="urn:dslforum-org")
    gw = backend(kind, sim.url)
    if kind == "miniupnpc":  # miniupnpc knows no dslforum services: refused, not faked
        with pytest.raises(GatewayNotFound):
            await gw.connect()
        return
    await roundtrip(gw, sim)
    if isinstance(gw, FallbackGateway):
        assert gw.current_name == "upnp-igd/soap"
        assert "failed" not in gw.probe_results["upnp-igd/soap"]


async def test_wanpppconnection2_livebox(sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.description_override = layout(
        svc("urn:schemas-upnp-org:service:WANPPPConnection:2", "/ctl/87895a19/WANPPPConn1"))
    await roundtrip(backend(kind, sim.url), sim)


async def test_whitespace_wrapped_service_type_dlink(sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.description_override = layout(
        svc("\n  urn:schemas-upnp-org:service:WANIPConnection:1\n", " /ctl/IPConn "))
    gw = backend(kind, sim.url)
    if kind == "miniupnpc":  # miniupnpc's parser does not trim: refused, never mis-mapped
        with pytest.raises(GatewayNotFound, match="no usable WAN connection service"):
            await gw.connect()
        return
    await roundtrip(gw, sim)


async def test_urlbase_with_trailing_slash_sky(sim: SimulatedIgdServer, kind: str) -> None:
    base = sim.url.rsplit("/", 1)[0] + "/"
    sim.router.description_override = layout(
        svc("urn:schemas-upnp-org:service:WANPPPConnection:1", "/ctl/uuid:c03e/WANPPPConnection:1"),
        head=f"<URLBase>{base}</URLBase>")
    await roundtrip(backend(kind, sim.url), sim)


async def test_disconnected_first_service_connected_second(
        sim: SimulatedIgdServer, kind: str) -> None:
    """MikroTik multi-WAN: choose the service that is connected, not the first listed. The
    miniupnpc backend, which can only use the first, refuses (``auto`` then uses SOAP)."""
    sim.router.description_override = layout(
        svc("urn:schemas-upnp-org:service:WANPPPConnection:1", "/gone/ppp")
        + svc("urn:schemas-upnp-org:service:WANIPConnection:1", "/ctl/IPConn"))
    gw = backend(kind, sim.url)
    if kind == "miniupnpc":
        with pytest.raises(GatewayNotFound, match="usable WAN service"):
            await gw.connect()
        return
    await roundtrip(gw, sim)
    assert gw.info is not None
    assert gw.info.control_url.endswith("/ctl/IPConn")


async def test_only_permanent_leases_mikrotik_725(sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.lease_mode = "permanent_only_725"
    sim.router.fault_style = "mikrotik"
    m = Mapper(backend(kind, sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    await m.reconcile({MappingKey(Proto.UDP, 40000): spec(40000)})
    assert m.permanent_only
    assert m.applied[MappingKey(Proto.UDP, 40000)].lease == 0
    await m.reconcile({})
    assert sim.router.mappings() == []


async def test_timed_lease_402_arris(sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.lease_mode = "permanent_only_402"
    m = Mapper(backend(kind, sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    await m.reconcile({MappingKey(Proto.UDP, 40000): spec(40000)})
    assert m.permanent_only
    assert [x.lease_remaining for x in sim.router.mappings()] == [0]


async def test_router_drops_timed_mapping_ddwrt_found_by_verification(
        sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.lease_mode = "drops_timed"
    now = [0.0]
    m = Mapper(backend(kind, sim.url), clock=lambda: now[0], tag=TAG, lease=600,
               verify_interval=10)
    want = {MappingKey(Proto.UDP, 40000): spec(40000)}
    await m.reconcile(want)
    now[0] = 11
    await m.reconcile(want)  # verification sees it gone and re-applies
    assert m.ops["add"] + m.ops["renew"] >= 2


@pytest.mark.parametrize("kind", ["miniupnpc", "soap"])
async def test_router_restart_on_new_port_is_found_again(
        sim: SimulatedIgdServer, kind: str) -> None:
    """miniupnpd's http_port=0: a new port after a restart; connection refused on the old."""
    gw = backend(kind, sim.url)
    await gw.connect()
    old = sim.url
    await sim.restart(new_port=True)
    assert sim.url != old
    with pytest.raises(GatewayUnreachable):
        await gw.add(spec(40000), 600)
    assert gw.info is None  # forgets the IGD: the next connect rediscovers


async def test_router_down_is_unreachable_not_a_crash(sim: SimulatedIgdServer, kind: str) -> None:
    gw = backend(kind, sim.url, timeout=2.0)
    await gw.connect()
    await sim.down()
    with pytest.raises(GatewayUnreachable, match=r"router connection failed|did not answer"):
        await gw.get(Proto.UDP, 40000)
    await sim.up()
    assert await gw.get(Proto.UDP, 40000) is None


async def test_conflict_with_another_host_is_reported(sim: SimulatedIgdServer, kind: str) -> None:
    other_host_holds(sim.router, 40000)
    m = Mapper(backend(kind, sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    await m.reconcile({MappingKey(Proto.UDP, 40000): spec(40000)})
    app = m.applied[MappingKey(Proto.UDP, 40000)]
    assert app.state is MapState.CONFLICT
    assert "192.168.1.99" in app.error
    await m.remove_all()
    assert [x.internal_client for x in sim.router.mappings()] == ["192.168.1.99"]


@pytest.mark.parametrize("kind", ["miniupnpc", "soap"])
async def test_slow_router_is_bounded(sim: SimulatedIgdServer, kind: str) -> None:
    gw = backend(kind, sim.url, timeout=0.3)
    await gw.connect()
    sim.router.latency = 1.0
    with pytest.raises(GatewayTimeout, match=r"within 0\.3s"):  # a timeout of its own
        await gw.add(spec(40000), 600)
    assert gw.info is None  # reconnects next time


async def test_hostile_description_is_refused(sim: SimulatedIgdServer, kind: str) -> None:
    sim.router.description_override = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "'
                                       + b"x" * 100 + b'">]><root>&a;</root>')
    gw = backend(kind, sim.url)
    with pytest.raises(GatewayError):
        await gw.connect()


async def test_external_any_uses_addanyportmapping_on_igdv2(
        sim: SimulatedIgdServer, kind: str) -> None:
    other_host_holds(sim.router, 40000)
    m = Mapper(backend(kind, sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    s = MappingSpec(Proto.UDP, 40000, "127.0.0.1", 40000, description_for("quirk", TAG),
                    external_any=True)
    await m.reconcile({s.key: s})
    app = m.applied[s.key]
    assert app.state is MapState.ACTIVE
    assert app.external_port != 40000
    assert sim.router.calls["AddAnyPortMapping"] == 1
    got = {(x.external_port, x.internal_client) for x in sim.router.mappings()}
    assert got == {(40000, "192.168.1.99"), (app.external_port, "127.0.0.1")}
