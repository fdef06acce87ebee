"""The simulated IGD, driven by the real miniupnpc binding and by hand-written HTTP/SOAP.

miniupnpc's calls block, so they run in a worker thread (``asyncio.to_thread``) while the server
runs on the test's event loop. Everything listens on 127.0.0.1 only. Leases expire through an
injected fake clock, never through sleeping.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import miniupnpc
import pytest

from igdtrigger.core.model import Proto
from igdtrigger.gateway.upnp.codec import UpnpFault as UPnPFault
from igdtrigger.gateway.upnp.codec import parse_soap_action, parse_soap_arguments, render_soap_fault
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer, run_in_thread
from igdtrigger.sim.table import MAX_LEASE_V2

LAN = "127.0.0.1"  # what miniupnpc reports as lanaddr when it talks to the sim over loopback
OTHER = "192.168.1.50"  # another LAN host (only ever written into the table, never contacted)
IPCONN2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
IPCONN1 = "urn:schemas-upnp-org:service:WANIPConnection:1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StartSim = Callable[..., Awaitable[SimulatedIgdServer]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    servers: list[SimulatedIgdServer] = []

    async def start(request_timeout: float = 10.0, **options: Any) -> SimulatedIgdServer:
        server = SimulatedIgdServer(SimulatedRouter(**options), request_timeout=request_timeout)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


class Upnpc:
    """The miniupnpc binding, each blocking call in a worker thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.u = miniupnpc.UPnP()

    async def select(self) -> str:
        return str(await asyncio.to_thread(self.u.selectigd, self.url))

    async def __call__(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.u, method), *args)

    async def error(self, method: str, *args: Any) -> str:
        """The text of the plain ``Exception`` miniupnpc raises (fails if it does not raise)."""
        with pytest.raises(Exception) as caught:  # noqa: PT011 - miniupnpc raises bare Exception
            await self(method, *args)
        assert type(caught.value) is Exception
        return str(caught.value)


async def client(server: SimulatedIgdServer) -> Upnpc:
    c = Upnpc(server.url)
    await c.select()
    return c


# --- raw HTTP/SOAP helpers ------------------------------------------------------------------------


async def http(server: SimulatedIgdServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    return split_response(raw)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def envelope(action: str, args: dict[str, str], urn: str = IPCONN2) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in args.items())
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action} xmlns:u="{urn}">{inner}</u:{action}></s:Body></s:Envelope>\r\n'
    ).encode()


def post(body: bytes, soapaction: str | None, path: str = "/ctl/IPConn", extra: str = "") -> bytes:
    header = f"SOAPAction: {soapaction}\r\n" if soapaction is not None else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}"
        f'Content-Type: text/xml; charset="utf-8"\r\nContent-Length: {len(body)}\r\n'
        f"{extra}Connection: close\r\n\r\n"
    ).encode() + body


async def soap(
    server: SimulatedIgdServer, action: str, args: dict[str, str] | None = None, urn: str = IPCONN2
) -> tuple[int, bytes]:
    status, _, body = await http(
        server, post(envelope(action, args or {}, urn), f'"{urn}#{action}"')
    )
    return status, body


def error_code(body: bytes) -> int | None:
    m = re.search(rb"<errorCode>\s*(\d+)\s*</errorCode>", body)
    return int(m.group(1)) if m else None


def out_args(body: bytes) -> dict[str, str]:
    root = ET.fromstring(body)
    response = next(iter(next(iter(root))))
    return {child.tag: child.text or "" for child in response}


def add_args(port: int, client: str = LAN, lease: int = 3600, proto: str = "UDP") -> dict[str, str]:
    return {
        "NewRemoteHost": "",
        "NewExternalPort": str(port),
        "NewProtocol": proto,
        "NewInternalPort": str(port),
        "NewInternalClient": client,
        "NewEnabled": "1",
        "NewPortMappingDescription": "test",
        "NewLeaseDuration": str(lease),
    }


# --- miniupnpc end to end -------------------------------------------------------------------------


async def test_selectigd_by_url_fetches_only_the_root_description(start_sim: StartSim) -> None:
    server = await start_sim()
    control_url = await Upnpc(server.url).select()
    assert control_url == server.control_url
    assert dict(server.router.http_requests) == {"GET /rootDesc.xml": 1}
    assert not server.router.calls  # no SOAP: no GetStatusInfo, no GetExternalIPAddress


async def test_read_only_calls(start_sim: StartSim) -> None:
    clock = FakeClock()
    server = await start_sim(clock=clock, external_ip="203.0.113.9")
    c = await client(server)
    clock.advance(42)
    assert await c("externalipaddress") == "203.0.113.9"
    assert await c("statusinfo") == ("Connected", 42, "ERROR_NONE")
    assert await c("connectiontype") == "IP_Routed"
    assert await c("totalbytesent") == 0
    assert await c("totalpacketreceived") == 0
    assert server.router.calls["GetTotalBytesSent"] == 1
    assert server.router.http_requests["POST /ctl/CmnIfCfg"] == 2


async def test_add_get_delete_round_trip(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    assert await c("addportmapping", 40000, "UDP", LAN, 40010, "game", "", 3600) is True
    assert await c("getspecificportmapping", 40000, "UDP") == (LAN, 40010, "game", True, 3600)
    assert await c("getgenericportmapping", 0) == (
        40000,
        "UDP",
        (LAN, 40010),
        "game",
        "1",
        "",
        3600,
    )
    assert await c("getportmappingnumberofentries") == 1
    [mapping] = server.router.mappings()
    assert (mapping.proto, mapping.external_port, mapping.internal_client) == (
        Proto.UDP,
        40000,
        LAN,
    )
    assert await c("getspecificportmapping", 40000, "TCP") is None  # other protocol
    assert await c("deleteportmapping", 40000, "UDP") is True
    assert await c("getspecificportmapping", 40000, "UDP") is None
    assert server.router.mappings() == []
    assert await c.error("deleteportmapping", 40000, "UDP") == "NoSuchEntryInArray"
    assert server.router.calls["AddPortMapping"] == 1
    assert server.router.calls["DeletePortMapping"] == 2
    assert server.router.errors[714] == 3  # two lookups that missed, one delete


async def test_other_client_gets_718_same_client_refreshes(start_sim: StartSim) -> None:
    clock = FakeClock()
    server = await start_sim(clock=clock)
    c = await client(server)
    await c("addportmapping", 40000, "TCP", LAN, 40000, "mine", "", 600)
    assert await c.error("addportmapping", 40000, "TCP", OTHER, 40000, "theirs", "", 600) == (
        "ConflictInMappingEntry"
    )
    assert (await c("getspecificportmapping", 40000, "TCP"))[0] == LAN
    clock.advance(500)
    assert (await c("getspecificportmapping", 40000, "TCP"))[4] == 100
    # the same client again: updated in place, lease refreshed, no duplicate
    await c("addportmapping", 40000, "TCP", LAN, 40001, "renamed", "", 600)
    assert await c("getspecificportmapping", 40000, "TCP") == (LAN, 40001, "renamed", True, 600)
    assert len(server.router.mappings()) == 1
    # a different remote host is a conflict too (miniupnpd)
    status, body = await soap(
        server, "AddPortMapping", {**add_args(40000, proto="TCP"), "NewRemoteHost": "198.51.100.7"}
    )
    assert (status, error_code(body)) == (500, 718)


async def test_external_port_zero_or_wildcard_is_716(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    assert await c.error("addportmapping", 0, "UDP", LAN, 40000, "x", "", 60) == (
        "WildCardNotPermittedInExtPort"
    )
    status, body = await soap(server, "AddPortMapping", {**add_args(1), "NewExternalPort": "*"})
    assert (status, error_code(body)) == (500, 716)
    assert server.router.mappings() == []


async def test_lease_expires_by_the_injected_clock(start_sim: StartSim) -> None:
    clock = FakeClock()
    server = await start_sim(clock=clock)
    c = await client(server)
    await c("addportmapping", 40000, "UDP", LAN, 40000, "short", "", 120)
    await c("addportmapping", 40001, "UDP", LAN, 40001, "long", "", 1000)
    clock.advance(30)
    assert (await c("getspecificportmapping", 40000, "UDP"))[4] == 90  # counts down
    clock.advance(89.5)
    assert (await c("getspecificportmapping", 40000, "UDP"))[4] == 1
    clock.advance(0.5)
    assert await c("getspecificportmapping", 40000, "UDP") is None  # gone at its lease end
    assert (await c("getgenericportmapping", 0))[0] == 40001  # only the long one is left
    assert await c("getgenericportmapping", 1) is None
    assert [m.external_port for m in server.router.mappings()] == [40001]


@pytest.mark.parametrize(
    ("version", "requested", "granted"),
    [
        (2, 0, MAX_LEASE_V2),  # IGDv2: 0 means "the maximum", never permanent
        (2, 700000, MAX_LEASE_V2),  # over a week: clamped
        (2, 3600, 3600),
        (1, 0, 0),  # IGDv1: 0 is permanent
        (1, 700000, 700000),  # IGDv1: anything goes
    ],
)
async def test_lease_clamping_v1_vs_v2(
    start_sim: StartSim, version: int, requested: int, granted: int
) -> None:
    clock = FakeClock()
    server = await start_sim(clock=clock, igd_version=version)
    c = await client(server)
    await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", requested)
    assert (await c("getspecificportmapping", 40000, "UDP"))[4] == granted
    clock.advance(10 * 365 * 86400)
    still_there = await c("getspecificportmapping", 40000, "UDP") is not None
    assert still_there is (granted == 0)


async def test_description_and_scpds_v1_v2(start_sim: StartSim) -> None:
    for version in (1, 2):
        server = await start_sim(igd_version=version)
        status, headers, body = await http(
            server, b"GET /rootDesc.xml HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert status == 200
        assert headers["content-type"] == 'text/xml; charset="utf-8"'
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(body)
        ns = {"d": "urn:schemas-upnp-org:device-1-0"}
        root = ET.fromstring(body)
        assert root.find("d:URLBase", ns) is None
        device_types = [e.text for e in root.iterfind(".//d:deviceType", ns)]
        assert device_types == [
            f"urn:schemas-upnp-org:device:{kind}:{version}"
            for kind in ("InternetGatewayDevice", "WANDevice", "WANConnectionDevice")
        ]
        services = {
            s.findtext("d:serviceType", namespaces=ns): s for s in root.iterfind(".//d:service", ns)
        }
        ipconn = services[f"urn:schemas-upnp-org:service:WANIPConnection:{version}"]
        assert ipconn.findtext("d:controlURL", namespaces=ns) == "/ctl/IPConn"
        assert ipconn.findtext("d:serviceId", namespaces=ns) == "urn:upnp-org:serviceId:WANIPConn1"
        cif = services["urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"]
        assert cif.findtext("d:controlURL", namespaces=ns) == "/ctl/CmnIfCfg"
        for svc, must_have in ((ipconn, "AddPortMapping"), (cif, "GetCommonLinkProperties")):
            scpd_url = svc.findtext("d:SCPDURL", namespaces=ns)
            status, _, scpd = await http(server, f"GET {scpd_url} HTTP/1.0\r\n\r\n".encode())
            assert status == 200
            names = {
                e.text
                for e in ET.fromstring(scpd).iterfind(
                    ".//s:action/s:name", {"s": "urn:schemas-upnp-org:service-1-0"}
                )
            }
            assert must_have in names
            if svc is ipconn:
                assert ("AddAnyPortMapping" in names) is (version == 2)


async def test_add_any_port_mapping(start_sim: StartSim) -> None:
    server = await start_sim(seed=7)
    c = await client(server)
    await c("addportmapping", 40000, "UDP", OTHER, 40000, "theirs", "", 60)
    # wanted port held by another host: the next free one (miniupnpd searches +1, -1, +2 ...)
    assert await c("addanyportmapping", 40000, "UDP", LAN, 40000, "mine", "") == 40001
    entry = await c("getspecificportmapping", 40001, "UDP")
    assert entry == (LAN, 40000, "mine", True, MAX_LEASE_V2)  # the binding sends lease "0"
    # the port is free: granted as asked
    assert await c("addanyportmapping", 50000, "TCP", LAN, 50000, "free", "") == 50000
    # wildcard external port: some permitted port is chosen and reported
    status, body = await soap(
        server, "AddAnyPortMapping", {**add_args(0, lease=60), "NewInternalPort": "5000"}
    )
    assert status == 200
    reserved = int(out_args(body)["NewReservedPort"])
    assert 1024 <= reserved <= 65535
    assert (await c("getspecificportmapping", reserved, "UDP"))[0] == LAN
    # unlike AddPortMapping, a missing NewInternalClient is 402
    args = add_args(41000)
    del args["NewInternalClient"]
    assert error_code((await soap(server, "AddAnyPortMapping", args))[1]) == 402


async def test_v2_only_actions_are_invalid_on_v1(start_sim: StartSim) -> None:
    server = await start_sim(igd_version=1)
    c = await client(server)
    assert await c.error("addanyportmapping", 40000, "UDP", LAN, 40000, "x", "") == "Invalid Action"
    assert await c.error("deleteportmappingrange", 1, 2, "UDP", 1) == "Invalid Action"
    status, body = await soap(server, "GetListOfPortMappings", urn=IPCONN1)
    assert (status, error_code(body)) == (500, 401)


async def test_generic_entry_past_the_end_is_713(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    status, body = await soap(server, "GetGenericPortMappingEntry", {"NewPortMappingIndex": "0"})
    assert (status, error_code(body)) == (500, 713)  # empty table
    await c("addportmapping", 40000, "UDP", LAN, 40000, "a", "", 60)
    await c("addportmapping", 40001, "TCP", LAN, 40001, "b", "", 60)
    status, body = await soap(server, "GetGenericPortMappingEntry", {"NewPortMappingIndex": "1"})
    assert status == 200
    assert out_args(body)["NewExternalPort"] == "40001"
    assert out_args(body)["NewProtocol"] == "TCP"
    status, body = await soap(server, "GetGenericPortMappingEntry", {"NewPortMappingIndex": "2"})
    assert (status, error_code(body)) == (500, 713)
    status, body = await soap(server, "GetGenericPortMappingEntry", {"NewPortMappingIndex": "x"})
    assert (status, error_code(body)) == (500, 402)
    # miniupnpc turns the 713 into None, exactly like any other failure
    assert await c("getgenericportmapping", 2) is None


async def test_list_of_port_mappings_and_delete_range(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    for port in (40000, 40005, 40010):
        # raw SOAP, escaped: miniupnpc would put the "<" on the wire unescaped (see below)
        args = {**add_args(port, lease=600), "NewPortMappingDescription": f"d&lt;{port}>]]&gt;"}
        assert (await soap(server, "AddPortMapping", args))[0] == 200
    await c("addportmapping", 40001, "TCP", LAN, 40001, "tcp", "", 600)
    range_args = {
        "NewStartPort": "40000",
        "NewEndPort": "40006",
        "NewProtocol": "UDP",
        "NewManage": "1",
        "NewNumberOfPorts": "0",
    }
    status, body = await soap(server, "GetListOfPortMappings", range_args)
    assert status == 200
    assert b"<![CDATA[" in body
    listing = ET.fromstring(out_args(body)["NewPortListing"])  # CDATA is unwrapped by the parser
    p = "{urn:schemas-upnp-org:gw:WANIPConnection}"
    entries = [
        (e.findtext(f"{p}NewExternalPort"), e.findtext(f"{p}NewDescription"))
        for e in listing.iter(f"{p}PortMappingEntry")
    ]
    assert entries == [("40000", "d<40000>]]>"), ("40005", "d<40005>]]>")]
    bad = {**range_args, "NewStartPort": "50000"}
    assert error_code((await soap(server, "GetListOfPortMappings", bad))[1]) == 733
    empty = {**range_args, "NewStartPort": "1", "NewEndPort": "2"}
    assert error_code((await soap(server, "GetListOfPortMappings", empty))[1]) == 730

    assert await c("deleteportmappingrange", 40000, 40006, "UDP", 1) is True
    assert sorted(m.external_port for m in server.router.mappings()) == [40001, 40010]
    assert await c.error("deleteportmappingrange", 40000, 40006, "UDP", 1) == "PortMappingNotFound"


async def test_miniupnpc_does_not_escape_arguments(start_sim: StartSim) -> None:
    """miniupnpc writes argument values into the SOAP body verbatim, so "&" or "<" in a
    description makes malformed XML. The sim parses strictly (like routers built on a real XML
    parser) and answers 402; callers must keep descriptions free of XML metacharacters."""
    server = await start_sim()
    c = await client(server)
    for description in ("Tom & Jerry", "a<b"):
        assert await c.error("addportmapping", 40000, "UDP", LAN, 40000, description, "", 60) == (
            "Invalid Args"
        )
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "Tom and Jérôme", "", 60) is True
    assert (await c("getspecificportmapping", 40000, "UDP"))[2] == "Tom and Jérôme"
    # and descriptions come back cut to 79 bytes (a fixed buffer in the binding)
    await c("addportmapping", 40001, "UDP", LAN, 40001, "d" * 200, "", 60)
    assert (await c("getspecificportmapping", 40001, "UDP"))[2] == "d" * 79
    assert server.router.mappings()[-1].description == "d" * 200


async def test_protocol_is_case_insensitive_and_checked(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    await c("addportmapping", 40000, "udp", LAN, 40000, "lower", "", 60)
    assert (await c("getspecificportmapping", 40000, "UDP"))[2] == "lower"
    assert await c.error("addportmapping", 40001, "SCTP", LAN, 40001, "x", "", 60) == "Invalid Args"


async def test_secure_mode(start_sim: StartSim) -> None:
    v2 = await start_sim(secure_mode=True)
    c2 = await client(v2)
    assert await c2.error("addportmapping", 40000, "UDP", OTHER, 40000, "x", "", 60) == (
        "Action not authorized"
    )
    assert await c2("addportmapping", 40000, "UDP", LAN, 40000, "own", "", 60) is True
    v2.router.call("AddPortMapping", add_args(40001, OTHER), requester=OTHER)
    assert await c2.error("deleteportmapping", 40001, "UDP") == "Action not authorized"
    v1 = await start_sim(secure_mode=True, igd_version=1)
    c1 = await client(v1)
    assert await c1.error("addportmapping", 40000, "UDP", OTHER, 40000, "x", "", 60) == (
        "ConflictInMappingEntry"
    )
    v1.router.call("AddPortMapping", add_args(40001, OTHER), requester=OTHER)
    assert await c1.error("deleteportmapping", 40001, "UDP") == "NoSuchEntryInArray"
    # secure mode off (the default): any internal client is accepted
    open_sim = await start_sim()
    assert await (await client(open_sim))("addportmapping", 40000, "UDP", OTHER, 40000, "x", "", 60)


async def test_low_ports_need_permission(start_sim: StartSim) -> None:
    v2 = await start_sim()
    c = await client(v2)
    assert await c.error("addportmapping", 80, "TCP", LAN, 8080, "x", "", 60) == (
        "Action not authorized"
    )
    assert await c.error("addportmapping", 8080, "TCP", LAN, 80, "x", "", 60) == (
        "Action not authorized"
    )
    v1 = await start_sim(igd_version=1)
    assert await (await client(v1)).error("addportmapping", 80, "TCP", LAN, 80, "x", "", 60) == (
        "ConflictInMappingEntry"
    )
    allowed = await start_sim(allow_low_ports=True)
    assert await (await client(allowed))("addportmapping", 80, "TCP", LAN, 80, "x", "", 60)


@pytest.mark.parametrize(("version", "text"), [(2, "NoPortMapsAvailable"), (1, "Action Failed")])
async def test_table_size_limit(start_sim: StartSim, version: int, text: str) -> None:
    server = await start_sim(max_mappings=2, igd_version=version)
    c = await client(server)
    await c("addportmapping", 40000, "UDP", LAN, 40000, "a", "", 60)
    await c("addportmapping", 40001, "UDP", LAN, 40001, "b", "", 60)
    assert await c.error("addportmapping", 40002, "UDP", LAN, 40002, "c", "", 60) == text
    assert await c("addportmapping", 40001, "UDP", LAN, 40001, "refresh", "", 60) is True


async def test_double_nat_external_addresses(start_sim: StartSim) -> None:
    reported = await start_sim(external_ip="192.168.1.2")
    c = await client(reported)
    assert await c("externalipaddress") == "192.168.1.2"
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 60) is True
    unknown = await start_sim(external_ip="")
    assert await (await client(unknown))("externalipaddress") == ""
    strict = await start_sim(external_ip="100.64.1.2", refuse_private_wan=True)
    c = await client(strict)
    assert await c("externalipaddress") == ""
    assert await c.error("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 60) == "Action Failed"
    down = await start_sim(connection_status="Disconnected")
    assert (await (await client(down))("statusinfo"))[0] == "Disconnected"


# --- quirk knobs ----------------------------------------------------------------------------------


async def test_mikrotik_permanent_only_725_with_its_fault_spelling(start_sim: StartSim) -> None:
    clock = FakeClock()
    server = await start_sim(
        igd_version=1, lease_mode="permanent_only_725", fault_style="mikrotik", clock=clock
    )
    status, body = await soap(server, "AddPortMapping", add_args(40000, lease=3600), urn=IPCONN1)
    assert status == 500
    assert error_code(body) == 725
    assert b"<faultCode>s:Client</faultCode>" in body
    assert b"<faultString>UPnPError</faultString>" in body
    assert b"<faultcode>" not in body
    assert not body.startswith(b"<?xml")
    c = await client(server)
    assert await c.error("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 3600) == (
        "OnlyPermanentLeasesSupported"
    )
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 0) is True
    clock.advance(10 * 86400)
    assert await c("getspecificportmapping", 40000, "UDP") == (LAN, 40000, "x", True, 0)


async def test_arris_permanent_only_402(start_sim: StartSim) -> None:
    server = await start_sim(igd_version=1, lease_mode="permanent_only_402")
    c = await client(server)
    assert await c.error("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 3600) == (
        "Invalid Args"
    )
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 0) is True
    assert server.router.errors == {402: 1}


async def test_dd_wrt_drops_timed_leases(start_sim: StartSim) -> None:
    server = await start_sim(igd_version=1, lease_mode="drops_timed")
    c = await client(server)
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "timed", "", 3600) is True
    assert await c("getspecificportmapping", 40000, "UDP") is None  # "accepted", then gone
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "forever", "", 0) is True
    assert await c("getspecificportmapping", 40000, "UDP") == (LAN, 40000, "forever", True, 0)


async def test_standard_fault_shape_and_namespace_echo(start_sim: StartSim) -> None:
    server = await start_sim()
    status, body = await soap(server, "DeletePortMapping", add_args(40000))
    assert status == 500
    assert body.startswith(b"<s:Envelope")  # no XML declaration on faults, like miniupnpd
    assert b"<faultcode>s:Client</faultcode>" in body
    assert b"<errorDescription>NoSuchEntryInArray</errorDescription>" in body
    status, body = await soap(server, "GetExternalIPAddress", urn=IPCONN1)  # v1 URN on a v2 box
    assert status == 200
    assert body.startswith(b'<?xml version="1.0"?>\r\n')
    assert f'xmlns:u="{IPCONN1}"'.encode() in body  # echoed verbatim
    assert out_args(body) == {"NewExternalIPAddress": "203.0.113.4"}
    status, body = await soap(server, "AddPortMapping", add_args(40000))
    assert (status, body.count(b"<u:AddPortMappingResponse")) == (200, 1)
    assert b"/>" in body  # self-closing, no out arguments
    for header in (f"{IPCONN2}#GetExternalIPAddress", f"'{IPCONN2}#GetExternalIPAddress'"):
        status, _, _ = await http(server, post(envelope("GetExternalIPAddress", {}), header))
        assert status == 200  # unquoted and single-quoted SOAPAction accepted
    status, _, body = await http(server, post(envelope("Reboot", {}), f'"{IPCONN2}#Reboot"'))
    assert (status, error_code(body)) == (500, 401)


async def test_latency_knob(start_sim: StartSim) -> None:
    server = await start_sim(latency=0.3)
    started = time.perf_counter()
    status, _ = await soap(server, "GetExternalIPAddress")
    assert status == 200
    assert time.perf_counter() - started >= 0.3
    server.router.latency = 0.0
    started = time.perf_counter()
    await soap(server, "GetExternalIPAddress")
    assert time.perf_counter() - started < 0.3


async def test_fail_next_and_hook(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    server.router.fail_next(501, 2, action="AddPortMapping")
    assert await c("externalipaddress") == "203.0.113.4"  # other actions unaffected
    for _ in range(2):
        assert await c.error("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 60) == (
            "Action Failed"
        )
    assert await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 60) is True
    server.router.fail_next(729)  # any action
    assert await c.error("externalipaddress") == "ConflictWithOtherMechanisms"
    assert await c("externalipaddress") == "203.0.113.4"

    seen: list[str] = []

    def hook(action: str, args: Any) -> UPnPFault | None:
        seen.append(action)
        return UPnPFault.of(718, "Mapping conflicts") if args.get("NewExternalPort") else None

    server.router.action_hook = hook
    status, body = await soap(server, "AddPortMapping", add_args(40001))
    assert (status, error_code(body)) == (500, 718)

    def broken_hook(action: str, args: Any) -> UPnPFault | None:
        raise RuntimeError("bug in a test hook")

    server.router.action_hook = broken_hook
    assert (await soap(server, "GetStatusInfo"))[0] == 500  # answered, not a dropped connection
    server.router.action_hook = hook
    assert b"Mapping conflicts" in body
    assert await c("statusinfo")
    assert seen == ["AddPortMapping", "GetStatusInfo"]
    record = server.router.log[-2]
    assert (record.action, record.error_code, record.args["NewExternalPort"]) == (
        "AddPortMapping",
        718,
        "40001",
    )


async def test_restart_moves_port_and_clears_table(start_sim: StartSim) -> None:
    clock = FakeClock()
    server = await start_sim(clock=clock)
    c = await client(server)
    await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 600)
    clock.advance(100)
    old_url, old_port = server.url, server.port
    await server.restart()
    assert server.port != old_port
    assert server.url != old_url
    # the cached control URL now points at a closed port
    assert await c.error("addportmapping", 40001, "UDP", LAN, 40001, "x", "", 60) == (
        "Miniupnpc HTTP error"
    )
    assert await c("getspecificportmapping", 40000, "UDP") is None
    fresh = await client(server)
    assert await fresh("getspecificportmapping", 40000, "UDP") is None  # the table is gone
    assert (await fresh("statusinfo"))[1] == 0  # uptime restarted
    assert server.router.boot_count == 2
    await server.restart(new_port=False)
    assert await fresh("externalipaddress") == "203.0.113.4"  # same port keeps working


async def test_down_refuses_connections_and_up_resumes(start_sim: StartSim) -> None:
    server = await start_sim()
    c = await client(server)
    await c("addportmapping", 40000, "UDP", LAN, 40000, "x", "", 600)
    await server.down()
    assert not server.is_up
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(server.host, server.port)
    assert await c.error("externalipaddress") == "Miniupnpc HTTP error"
    await server.up()
    assert await c("getspecificportmapping", 40000, "UDP") == (LAN, 40000, "x", True, 600)


# --- hostile and malformed input ------------------------------------------------------------------


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">
<NewRemoteHost></NewRemoteHost><NewExternalPort>40000</NewExternalPort>
<NewProtocol>UDP</NewProtocol><NewInternalPort>40000</NewInternalPort>
<NewInternalClient>127.0.0.1</NewInternalClient><NewEnabled>1</NewEnabled>
<NewPortMappingDescription>&lol9;</NewPortMappingDescription>
<NewLeaseDuration>60</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">
<NewExternalPort>40000</NewExternalPort><NewProtocol>UDP</NewProtocol>
<NewInternalPort>40000</NewInternalPort><NewInternalClient>127.0.0.1</NewInternalClient>
<NewPortMappingDescription>&xxe;</NewPortMappingDescription>
<NewLeaseDuration>60</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>
"""


@pytest.mark.parametrize(
    "payload",
    [BILLION_LAUGHS, EXTERNAL_ENTITY, b"<not xml", b"<a><b/></a>", b"\xff\xfe garbage"],
    ids=["billion-laughs", "external-entity", "truncated", "not-soap", "binary"],
)
async def test_hostile_or_broken_xml_gets_a_fault_and_no_mapping(
    start_sim: StartSim, payload: bytes
) -> None:
    server = await start_sim()
    started = time.perf_counter()
    status, _, body = await http(server, post(payload, f'"{IPCONN2}#AddPortMapping"'))
    assert time.perf_counter() - started < 2
    assert (status, error_code(body)) == (500, 402)
    assert b"root:" not in body
    assert server.router.mappings() == []
    assert server.router.errors[402] == 1
    status, _ = await soap(server, "AddPortMapping", add_args(40000))
    assert status == 200  # still serving


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (
            b'POST /ctl/IPConn HTTP/1.1\r\nSOAPAction: "x#y"\r\nContent-Length: 10000000\r\n\r\n',
            413,
        ),
        (b"GET /rootDesc.xml HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 400),
        (b"GET /rootDesc.xml HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /rootDesc.xml HTTP/2.0\r\n\r\n", 505),
        (b"GET /rootDesc.xml HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b'POST /ctl/IPConn HTTP/1.1\r\nSOAPAction: "x#y"\r\nContent-Length: -5\r\n\r\n', 400),
        (b'POST /ctl/IPConn HTTP/1.1\r\nSOAPAction: "x#y"\r\n\r\n', 411),
        (b"POST /ctl/IPConn HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400),  # no SOAPAction
        (b"GET /ctl/IPConn HTTP/1.1\r\n\r\n", 405),
        (b"GET /nope.xml HTTP/1.1\r\n\r\n", 404),
    ],
    ids=[
        "body-too-big",
        "header-too-big",
        "too-many-headers",
        "garbage",
        "http2",
        "bad-header",
        "negative-length",
        "no-length",
        "no-soapaction",
        "get-control",
        "unknown-path",
    ],
)
async def test_malformed_http_gets_4xx_and_server_keeps_serving(
    start_sim: StartSim, request_bytes: bytes, expected: int
) -> None:
    server = await start_sim()
    status, headers, body = await http(server, request_bytes)
    assert status == expected
    assert int(headers["content-length"]) == len(body)
    if expected == 405:
        assert headers["allow"] == "POST"
    c = await client(server)
    assert await c("externalipaddress") == "203.0.113.4"


async def test_slow_client_times_out_without_hanging(start_sim: StartSim) -> None:
    server = await start_sim(request_timeout=0.2)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b'POST /ctl/IPConn HTTP/1.1\r\nSOAPAction: "x#y"\r\nContent-Length: 100\r\n\r\nab')
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    await writer.wait_closed()
    assert split_response(raw)[0] == 408


async def test_expect_continue_and_http10_echo(start_sim: StartSim) -> None:
    server = await start_sim()
    body = envelope("GetExternalIPAddress", {})
    raw_request = post(body, f'"{IPCONN2}#GetExternalIPAddress"', extra="Expect: 100-continue\r\n")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head, _, payload = raw_request.partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    await writer.drain()
    assert (
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3) == b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(payload)
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    await writer.wait_closed()
    assert split_response(raw)[0] == 200
    raw10 = await http(server, b"GET /rootDesc.xml HTTP/1.0\r\n\r\n")
    assert raw10[0] == 200
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"HEAD /rootDesc.xml HTTP/1.0\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\n")  # HEAD: headers only


# --- sans-I/O pieces, lifecycle, helpers ----------------------------------------------------------


def test_router_without_io() -> None:
    clock = FakeClock()
    router = SimulatedRouter(clock=clock)
    assert router.call("AddPortMapping", add_args(40000, lease=100)) == {}
    fault = router.call("AddPortMapping", add_args(40000, OTHER), requester=OTHER)
    assert fault == UPnPFault(718, "ConflictInMappingEntry")
    clock.advance(40)
    entry = router.call("GetSpecificPortMappingEntry", add_args(40000))
    assert isinstance(entry, dict)
    assert entry["NewLeaseDuration"] == "60"
    assert router.call("Nonsense", {}) == UPnPFault(401, "Invalid Action")
    assert router.calls == {"AddPortMapping": 2, "GetSpecificPortMappingEntry": 1, "Nonsense": 1}
    assert [r.error_code for r in router.log] == [None, 718, None, 401]
    response = router.handle_http("GET", "/rootDesc.xml", {}, b"", requester=LAN)
    assert response.status == 200
    assert b"WANIPConnection:2" in response.body
    router.restart()
    assert router.mappings() == []
    with pytest.raises(ValueError, match="lease_mode"):
        SimulatedRouter(lease_mode="sometimes")  # type: ignore[arg-type]


def test_soap_helpers() -> None:
    assert parse_soap_action(f'"{IPCONN2}#AddPortMapping"') == (IPCONN2, "AddPortMapping")
    assert parse_soap_action(f"{IPCONN2}#AddPortMapping") == (IPCONN2, "AddPortMapping")
    assert parse_soap_action("no-hash") is None
    assert parse_soap_action('"urn:x#<evil>"') is None  # never echoed into an element name
    args = parse_soap_arguments(envelope("AddPortMapping", add_args(40000)))
    assert args["NewExternalPort"] == "40000"
    assert parse_soap_arguments(b"") == {}
    with pytest.raises(ValueError, match="unacceptable XML"):
        parse_soap_arguments(BILLION_LAUGHS)
    # SOAP never needs a DTD: even a harmless one is refused (the stdlib parser would take both)
    plain = envelope("GetExternalIPAddress", {})
    for dtd in (b"<!DOCTYPE Envelope>", b'<!DOCTYPE Envelope [<!ENTITY a "b">]>'):
        with pytest.raises(ValueError, match="unacceptable XML"):
            parse_soap_arguments(plain.replace(b"\r\n", b"\r\n" + dtd + b"\r\n", 1))
    fault = render_soap_fault(UPnPFault.of(606), "standard")
    assert error_code(fault) == 606
    assert b"Action not authorized" in fault


def test_run_in_thread_for_synchronous_users() -> None:
    with run_in_thread(SimulatedRouter()) as handle:
        u = miniupnpc.UPnP()
        u.selectigd(handle.url)
        assert u.addportmapping(40000, "TCP", u.lanaddr, 40000, "sync", "", 60) is True
        assert handle.call(lambda: [m.external_port for m in handle.router.mappings()]) == [40000]
        handle.run(handle.server.restart())
        assert handle.call(handle.router.mappings) == []
        port = handle.server.port
    with pytest.raises(ConnectionRefusedError), socket.create_connection((LAN, port), timeout=2):
        pass


async def test_refuses_to_listen_beyond_loopback() -> None:
    for host in ("0.0.0.0", "192.168.1.1", "localhost"):
        with pytest.raises(ValueError, match="loopback"):
            await SimulatedIgdServer().start(host=host)


async def test_ipv6_loopback(start_sim: StartSim) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = SimulatedIgdServer()
    try:
        await server.start(host="::1")
    except OSError:
        pytest.skip("::1 is not available here")
    try:
        assert server.url == f"http://[::1]:{server.port}/rootDesc.xml"
        status, _, body = await http(server, b"GET /rootDesc.xml HTTP/1.1\r\n\r\n")
        assert status == 200
        assert b"InternetGatewayDevice" in body
    finally:
        await server.close()


async def test_context_manager_closes() -> None:
    async with SimulatedIgdServer() as server:
        port = server.port
        assert (await http(server, b"GET /rootDesc.xml HTTP/1.1\r\n\r\n"))[0] == 200
    assert not server.is_up
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(LAN, port)
