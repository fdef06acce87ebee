"""The gateway backends (miniupnpc, our SOAP client, the automatic fallback) against the
simulated router told to behave like real ones (router-facts.md). One test per quirk."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from igdtrigger.engine import description_for
from igdtrigger.errors import GatewayError, GatewayUnreachable
from igdtrigger.gateway.select import FallbackGateway, build_gateway
from igdtrigger.gateway.simulated import SimulatedIgdServer, SimulatedRouter
from igdtrigger.gateway.soap import SoapGateway
from igdtrigger.mapper import Mapper, MapState
from igdtrigger.model import MappingKey, MappingSpec, Proto

TAG = "q1q2q3"


def spec(port: int, client: str = "127.0.0.1") -> MappingSpec:
    return MappingSpec(Proto.UDP, port, client, port, description_for("quirk", TAG))


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


async def test_soap_backend_on_standard_layout(sim: SimulatedIgdServer) -> None:
    gw = SoapGateway(sim.url)
    await roundtrip(gw, sim)
    info = gw.info
    assert info is not None
    assert info.service_type == "urn:schemas-upnp-org:service:WANIPConnection:2"
    assert info.external_address == "203.0.113.4"


async def test_legacy_dslforum_only_huawei_falls_back_to_our_client(
        sim: SimulatedIgdServer) -> None:
    sim.router.description_override = layout(
        svc("urn:dslforum-org:service:WANPPPConnection:1", "/ctl/WANPPPConnection_1"),
        prefix="urn:dslforum-org")
    gw = build_gateway(sim.url)
    assert isinstance(gw, FallbackGateway)
    await roundtrip(gw, sim)
    assert gw.current_name == "upnp-igd/soap"
    assert "failed" not in gw.probe_results["upnp-igd/soap"]


async def test_wanpppconnection2_livebox(sim: SimulatedIgdServer) -> None:
    sim.router.description_override = layout(
        svc("urn:schemas-upnp-org:service:WANPPPConnection:2", "/ctl/87895a19/WANPPPConn1"))
    await roundtrip(build_gateway(sim.url), sim)


async def test_whitespace_wrapped_service_type_dlink(sim: SimulatedIgdServer) -> None:
    sim.router.description_override = layout(
        svc("\n  urn:schemas-upnp-org:service:WANIPConnection:1\n", " /ctl/IPConn "))
    await roundtrip(build_gateway(sim.url), sim)


async def test_urlbase_with_trailing_slash_sky(sim: SimulatedIgdServer) -> None:
    base = sim.url.rsplit("/", 1)[0] + "/"
    sim.router.description_override = layout(
        svc("urn:schemas-upnp-org:service:WANPPPConnection:1", "/ctl/uuid:c03e/WANPPPConnection:1"),
        head=f"<URLBase>{base}</URLBase>")
    await roundtrip(SoapGateway(sim.url), sim)


async def test_disconnected_first_service_connected_second(sim: SimulatedIgdServer) -> None:
    """MikroTik multi-WAN: choose the service that is connected, not the first listed."""
    sim.router.description_override = layout(
        svc("urn:schemas-upnp-org:service:WANPPPConnection:1", "/gone/ppp")
        + svc("urn:schemas-upnp-org:service:WANIPConnection:1", "/ctl/IPConn"))
    gw = SoapGateway(sim.url)
    await roundtrip(gw, sim)
    assert gw.service is not None
    assert gw.service.control_url.endswith("/ctl/IPConn")


async def test_only_permanent_leases_mikrotik_725(sim: SimulatedIgdServer) -> None:
    sim.router.lease_mode = "permanent_only_725"
    sim.router.fault_style = "mikrotik"
    for gw in (build_gateway(sim.url, backend="miniupnpc"), SoapGateway(sim.url)):
        m = Mapper(gw, clock=lambda: 0.0, tag=TAG, lease=600)
        await m.reconcile({MappingKey(Proto.UDP, 40000): spec(40000)})
        assert m.permanent_only
        assert m.applied[MappingKey(Proto.UDP, 40000)].lease == 0
        await m.reconcile({})
        assert sim.router.mappings() == []


async def test_timed_lease_402_arris(sim: SimulatedIgdServer) -> None:
    sim.router.lease_mode = "permanent_only_402"
    m = Mapper(SoapGateway(sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    await m.reconcile({MappingKey(Proto.UDP, 40000): spec(40000)})
    assert m.permanent_only
    assert [x.lease_remaining for x in sim.router.mappings()] == [0]


async def test_router_drops_timed_mapping_ddwrt_found_by_verification(
        sim: SimulatedIgdServer) -> None:
    sim.router.lease_mode = "drops_timed"
    now = [0.0]
    m = Mapper(SoapGateway(sim.url), clock=lambda: now[0], tag=TAG, lease=600,
               verify_interval=10)
    want = {MappingKey(Proto.UDP, 40000): spec(40000)}
    await m.reconcile(want)
    now[0] = 11
    await m.reconcile(want)  # verification sees it gone and re-applies
    assert m.ops["add"] + m.ops["renew"] >= 2


async def test_router_restart_on_new_port_is_found_again(sim: SimulatedIgdServer) -> None:
    """miniupnpd's http_port=0: a new port after a restart; connection refused on the old."""
    gw = SoapGateway(sim.url)
    await gw.connect()
    old = sim.url
    await sim.restart(new_port=True)
    assert sim.url != old
    with pytest.raises(GatewayUnreachable):
        await gw.add(spec(40000), 600)
    assert gw.info is None  # forgets the IGD: the next connect rediscovers


async def test_router_down_is_unreachable_not_a_crash(sim: SimulatedIgdServer) -> None:
    gw = SoapGateway(sim.url, timeout=0.5)
    await gw.connect()
    await sim.down()
    with pytest.raises(GatewayUnreachable, match=r"router connection failed|did not answer"):
        await gw.get(Proto.UDP, 40000)
    await sim.up()
    assert await gw.get(Proto.UDP, 40000) is None


async def test_conflict_with_another_host_is_reported(sim: SimulatedIgdServer) -> None:
    sim.router.call("AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": "40000", "NewProtocol": "UDP",
        "NewInternalPort": "40000", "NewInternalClient": "192.168.1.99", "NewEnabled": "1",
        "NewPortMappingDescription": "console", "NewLeaseDuration": "0"},
        requester="192.168.1.99")
    m = Mapper(SoapGateway(sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    await m.reconcile({MappingKey(Proto.UDP, 40000): spec(40000)})
    app = m.applied[MappingKey(Proto.UDP, 40000)]
    assert app.state is MapState.CONFLICT
    assert "192.168.1.99" in app.error
    await m.remove_all()
    assert [x.internal_client for x in sim.router.mappings()] == ["192.168.1.99"]


async def test_slow_router_is_bounded(sim: SimulatedIgdServer) -> None:
    gw = SoapGateway(sim.url, timeout=0.3)
    await gw.connect()
    sim.router.latency = 1.0
    with pytest.raises(GatewayError, match=r"within 0\.3s"):
        await gw.add(spec(40000), 600)


async def test_hostile_description_is_refused(sim: SimulatedIgdServer) -> None:
    sim.router.description_override = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "'
                                       + b"x" * 100 + b'">]><root>&a;</root>')
    gw = build_gateway(sim.url)
    with pytest.raises(GatewayError):
        await gw.connect()


async def test_external_any_uses_addanyportmapping_on_igdv2(sim: SimulatedIgdServer) -> None:
    sim.router.call("AddPortMapping", {
        "NewRemoteHost": "", "NewExternalPort": "40000", "NewProtocol": "UDP",
        "NewInternalPort": "40000", "NewInternalClient": "192.168.1.99", "NewEnabled": "1",
        "NewPortMappingDescription": "console", "NewLeaseDuration": "0"},
        requester="192.168.1.99")
    m = Mapper(SoapGateway(sim.url), clock=lambda: 0.0, tag=TAG, lease=600)
    s = MappingSpec(Proto.UDP, 40000, "127.0.0.1", 40000, description_for("quirk", TAG),
                    external_any=True)
    await m.reconcile({s.key: s})
    app = m.applied[s.key]
    assert app.state is MapState.ACTIVE
    assert app.external_port != 40000
    assert sim.router.calls["AddAnyPortMapping"] == 1
    got = {(x.external_port, x.internal_client) for x in sim.router.mappings()}
    assert got == {(40000, "192.168.1.99"), (app.external_port, "127.0.0.1")}
