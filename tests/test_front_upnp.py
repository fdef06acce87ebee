"""The IGD front's UPnP server over loopback: real SSDP and SOAP bytes, and Debian's upnpc
when installed (issue 14)."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from igdtrigger.config import parse_config
from igdtrigger.core.errors import ConfigError
from igdtrigger.front import igdxml as X
from igdtrigger.front.manager import FrontManager
from igdtrigger.front.serving import FrontRunner
from igdtrigger.front.upnp import ServedAddress, UpnpFront, served_addresses
from igdtrigger.gateway.upnp.codec import build_soap, parse_description, parse_soap_response
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway

LO = ServedAddress("lo", "127.0.0.1", ipaddress.IPv4Network("127.0.0.0/8"))
FRONT = {"enabled": True, "allow": ["allow 1024-49151 127.0.0.0/8 1024-65535",
                                    "deny 0-65535 0.0.0.0/0 0-65535"]}
V2 = X.WANIP_SERVICE
V1 = "urn:schemas-upnp-org:service:WANIPConnection:1"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Env:
    def __init__(self, svc: Service, gw: FakeGateway, front: UpnpFront,
                 notify_sock: socket.socket) -> None:
        self.svc, self.gw, self.front, self.notify_sock = svc, gw, front, notify_sock

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.front.ports['127.0.0.1']}{X.CONTROL_PATH}"

    async def soap(self, action: str, args: list[tuple[str, str]] | None = None,
                   service: str = V2, body: bytes | None = None,
                   source: str | None = None) -> tuple[int, Any]:
        data = body if body is not None else build_soap(service, action, args or [])
        connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
        async with aiohttp.ClientSession(connector=connector) as http, http.post(
                self.control, data=data,
                headers={"SOAPACTION": f'"{service}#{action}"',
                         "Content-Type": 'text/xml; charset="utf-8"'}) as resp:
            raw = await resp.read()
            return resp.status, parse_soap_response(resp.status, raw, action)


def mapping(port: int, client: str = "127.0.0.1", *, lease: int = 0,
            external: int | None = None, proto: str = "UDP") -> list[tuple[str, str]]:
    return [("NewRemoteHost", ""), ("NewExternalPort", str(port if external is None
                                                          else external)),
            ("NewProtocol", proto), ("NewInternalPort", str(port)),
            ("NewInternalClient", client), ("NewEnabled", "1"),
            ("NewPortMappingDescription", "my game"), ("NewLeaseDuration", str(lease))]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="127.0.0.1", external_address="100.64.0.7")
    svc = Service(parse_config({"front": FRONT}), gw, clock=clock, state_dir=tmp_path)
    await svc.start()
    mgr = FrontManager(svc, svc.config.front)
    notify_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    notify_sock.bind(("127.0.0.1", 0))
    notify_sock.settimeout(5)
    front = UpnpFront(mgr, [LO], tag="test", ssdp_port=free_udp_port(),
                      notify_to=notify_sock.getsockname())
    await front.start()
    try:
        yield Env(svc, gw, front, notify_sock)
    finally:
        await front.stop()
        await svc.stop()
        notify_sock.close()


async def search(env: Env, st: str, source: str = "127.0.0.1") -> list[dict[str, str]]:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.setblocking(False)
        msg = (f'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\n'
               f"MX: 1\r\nST: {st}\r\n\r\n").encode()
        await loop.sock_sendto(s, msg, ("127.0.0.1", env.front.ssdp_port))
        out: list[dict[str, str]] = []
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 4096), 1.0)
            except TimeoutError:
                return out
            lines = data.decode().split("\r\n")
            assert lines[0] == "HTTP/1.1 200 OK"
            out.append({k.strip().upper(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:] if line)})


async def test_msearch_for_v1_and_v2_finds_the_description(env: Env) -> None:
    (v1,) = await search(env, "urn:schemas-upnp-org:device:InternetGatewayDevice:1")
    assert v1["ST"] == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
    assert v1["USN"].endswith("::urn:schemas-upnp-org:device:InternetGatewayDevice:1")
    assert v1["BOOTID.UPNP.ORG"].isdecimal() and v1["CONFIGID.UPNP.ORG"] == "1"
    (v2,) = await search(env, V2)
    assert v2["LOCATION"] == v1["LOCATION"]
    assert len(await search(env, "ssdp:all")) == len(X.search_targets(env.front.udn))
    assert await search(env, "urn:schemas-upnp-org:device:MediaServer:1") == []
    async with aiohttp.ClientSession() as http, http.get(v2["LOCATION"]) as resp:
        desc = parse_description(await resp.read(), v2["LOCATION"])
    assert desc.device_type == X.IGD_DEVICE
    svc = desc.miniupnpc_service()
    assert svc is not None and svc.service_type == V2 and svc.control_url == env.control


async def test_notify_alive_at_start_and_byebye_at_stop(env: Env) -> None:
    loop = asyncio.get_running_loop()
    first = (await loop.run_in_executor(None, env.notify_sock.recv, 4096)).decode()
    assert first.startswith("NOTIFY * HTTP/1.1") and "NTS: ssdp:alive" in first
    assert f"BOOTID.UPNP.ORG: {env.front.boot_id}" in first and "CONFIGID.UPNP.ORG: 1" in first
    for _ in range(len(X.search_targets(env.front.udn)) - 1):
        await loop.run_in_executor(None, env.notify_sock.recv, 4096)
    await env.front.stop()
    bye = (await loop.run_in_executor(None, env.notify_sock.recv, 4096)).decode()
    assert "NTS: ssdp:byebye" in bye and "LOCATION" not in bye


async def test_add_get_list_delete_over_soap(env: Env) -> None:
    status, out = await env.soap("AddPortMapping", mapping(40000, lease=3600))
    assert (status, out) == (200, {})
    assert env.gw.ports() == {"udp/40000": "127.0.0.1"}
    key = [("NewRemoteHost", ""), ("NewExternalPort", "40000"), ("NewProtocol", "UDP")]
    status, entry = await env.soap("GetSpecificPortMappingEntry", key)
    assert entry["NewInternalClient"] == "127.0.0.1" and entry["NewInternalPort"] == "40000"
    assert entry["NewPortMappingDescription"] == "my game"
    # a 1 h lease, unused: it ends after idle_timeout (10 min) unless used or renewed
    assert 590 <= int(entry["NewLeaseDuration"]) <= 600
    status, generic = await env.soap("GetGenericPortMappingEntry",
                                     [("NewPortMappingIndex", "0")])
    assert generic["NewExternalPort"] == "40000" and generic["NewProtocol"] == "UDP"
    status, past = await env.soap("GetGenericPortMappingEntry", [("NewPortMappingIndex", "1")])
    assert status == 500 and past.code == 713  # upnpc -l stops there
    status, listing = await env.soap("GetListOfPortMappings", [
        ("NewStartPort", "1"), ("NewEndPort", "65535"), ("NewProtocol", "UDP"),
        ("NewManage", "1"), ("NewNumberOfPorts", "10")])
    assert "<p:NewExternalPort>40000</p:NewExternalPort>" in listing["NewPortListing"]
    assert "<p:NewDescription>my game</p:NewDescription>" in listing["NewPortListing"]
    status, ext = await env.soap("GetExternalIPAddress")
    assert ext == {"NewExternalIPAddress": "100.64.0.7"}  # the upstream's, even when private
    status, out = await env.soap("DeletePortMapping", key)
    assert status == 200 and env.gw.ports() == {}
    status, gone = await env.soap("DeletePortMapping", key)
    assert status == 500 and gone.code == 714


async def test_v1_clients_are_answered_in_their_namespace(env: Env) -> None:
    status, _ = await env.soap("AddPortMapping", mapping(40010), service=V1)
    assert status == 200 and env.gw.ports() == {"udp/40010": "127.0.0.1"}
    status, info = await env.soap("GetStatusInfo", service=V1)
    assert info["NewConnectionStatus"] == "Connected"
    status, kind = await env.soap("GetConnectionTypeInfo", service=V1)
    assert kind["NewConnectionType"] == "IP_Routed"


@pytest.mark.parametrize(("args", "code"), [
    (mapping(50000), 606),  # the allow lines stop at 49151
    (mapping(40000, "127.0.0.2"), 718),  # another client's address: secure mode
    (mapping(40000, external=0), 716),  # wildcard external port
    (mapping(40000, "router.lan"), 402),  # a name: never looked up
    (mapping(40000, proto="SCTP"), 402),
    (mapping(40000, lease=604801), 402),
])
async def test_refusals_are_standard_faults_and_map_nothing(
        env: Env, args: list[tuple[str, str]], code: int) -> None:
    status, fault = await env.soap("AddPortMapping", args)
    assert status == 500 and fault.code == code
    assert env.gw.ports() == {} and not env.svc.pipeline.engine.activations


async def test_a_clash_is_718_and_add_any_gets_another_port(env: Env) -> None:
    await env.soap("AddPortMapping", mapping(40000))
    # another client wants the same port (secure mode off, so its address is allowed)
    env.front.manager.settings = parse_config({"front": {**FRONT, "secure_mode": False}}).front
    status, clash = await env.soap("AddPortMapping", mapping(40000, "127.0.0.3"))
    assert status == 500 and clash.code == 718
    status, anyport = await env.soap("AddAnyPortMapping", mapping(40000, "127.0.0.3"))
    assert status == 200 and anyport["NewReservedPort"] != "40000"
    assert env.gw.ports()["udp/40000"] == "127.0.0.1"
    assert env.gw.ports()[f"udp/{anyport['NewReservedPort']}"] == "127.0.0.3"


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
    b"<not-xml",
    b"<s:Envelope xmlns:s='http://schemas.xmlsoap.org/soap/envelope/'>" + b" " * 20000
    + b"</s:Envelope>",
])
async def test_hostile_bodies_are_402(env: Env, body: bytes) -> None:
    status, fault = await env.soap("GetExternalIPAddress", body=body)
    assert status == 500 and fault.code == 402


def _with(args: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k == name else v) for k, v in args]


@pytest.mark.parametrize(("name", "value"), [
    ("NewExternalPort", "4" * 5000),  # int() of over 4300 digits raises: was a bare 500
    ("NewInternalPort", "4" * 5000),
    ("NewLeaseDuration", "9" * 5000),
    ("NewExternalPort", "\uff14\uff10\uff10\uff10\uff10"),  # fullwidth "40000": isdecimal()
])
async def test_numbers_of_thousands_of_digits_or_other_scripts_are_402(
        env: Env, name: str, value: str) -> None:
    status, fault = await env.soap("AddPortMapping", _with(mapping(40000), name, value))
    assert status == 500 and fault.code == 402
    assert env.gw.ports() == {} and not env.svc.pipeline.engine.activations


@pytest.mark.parametrize(("index", "code"), [
    ("9" * 5000, 713), ("4294967296", 713), ("1", 713), ("-1", 402), ("x", 402),
    ("\uff10", 402), ("", 402)])
async def test_a_generic_entry_index_past_the_end_is_713_and_garbage_402(
        env: Env, index: str, code: int) -> None:
    await env.soap("AddPortMapping", mapping(40000))
    status, fault = await env.soap("GetGenericPortMappingEntry",
                                   [("NewPortMappingIndex", index)])
    assert status == 500 and fault.code == code
    status, entry = await env.soap("GetGenericPortMappingEntry", [("NewPortMappingIndex", "0")])
    assert status == 200 and entry["NewExternalPort"] == "40000"


async def test_a_bare_ampersand_as_libminiupnpc_sends_it_is_text(env: Env) -> None:
    """``upnpc -e "Tom & Jerry"`` writes the description unescaped (strace of Debian's
    miniupnpc 2.2.4: ``<NewPortMappingDescription>Tom & Jerry<``); miniupnpd takes it as
    text, and so must we (it was 402). An undeclared entity stays 402."""
    built = build_soap(V2, "AddPortMapping", _with(mapping(40000), "NewPortMappingDescription",
                                                   "Tom & Jerry"))
    raw = built.replace(b"Tom &amp; Jerry", b"Tom & Jerry &amp; &#38; co")
    assert b"Tom & Jerry" in raw
    status, _ = await env.soap("AddPortMapping", body=raw)
    assert status == 200 and env.gw.ports() == {"udp/40000": "127.0.0.1"}
    (m,) = env.front.manager.mappings()
    assert m.request.description == "Tom & Jerry & & co"
    bad = raw.replace(b"Tom & Jerry", b"Tom &jerry; x")
    assert bad != raw
    status, fault = await env.soap("AddPortMapping", body=bad)
    assert status == 500 and fault.code == 402


async def test_an_unknown_action_is_401(env: Env) -> None:
    status, fault = await env.soap("SetConnectionType", [("NewConnectionType", "IP_Routed")])
    assert status == 500 and fault.code == 401


@pytest.mark.skipif(shutil.which("upnpc") is None, reason="Debian's miniupnpc is not installed")
async def test_debian_upnpc_adds_lists_and_deletes(env: Env) -> None:
    url = env.front.locations()[0]

    async def upnpc(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "upnpc", "-u", url, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return out.decode(errors="replace")

    added = await upnpc("-e", "upnpc test", "-a", "127.0.0.1", "40000", "40000", "UDP")
    assert "is redirected to internal 127.0.0.1:40000" in added, added
    assert env.gw.ports() == {"udp/40000": "127.0.0.1"}
    status = await upnpc("-s")
    assert "ExternalIPAddress = 100.64.0.7" in status, status
    listed = await upnpc("-l")
    assert "40000->127.0.0.1:40000" in listed and "upnpc test" in listed, listed
    v2_listed = await upnpc("-L")  # GetListOfPortMappings, parsed by miniupnpc itself
    assert "40000->127.0.0.1:40000" in v2_listed and "upnpc test" in v2_listed, v2_listed
    denied = await upnpc("-a", "127.0.0.1", "50000", "50000", "UDP")
    assert "606" in denied, denied
    deleted = await upnpc("-d", "40000", "UDP")
    assert "UPNP_DeletePortMapping() returned : 0" in deleted, deleted
    assert env.gw.ports() == {}


async def test_ssdp_answers_are_rate_limited_per_sender(env: Env) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        msg = (b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"'
               b"\r\nMX: 1\r\nST: upnp:rootdevice\r\n\r\n")
        for _ in range(30):
            await loop.sock_sendto(s, msg, ("127.0.0.1", env.front.ssdp_port))
        answers = 0
        while True:
            try:
                await asyncio.wait_for(loop.sock_recv(s, 4096), 1.0)
            except TimeoutError:
                break
            answers += 1
    assert 1 <= answers <= 10


async def test_a_description_is_kept_printable_and_bounded(env: Env) -> None:
    args = mapping(40000)
    args[6] = ("NewPortMappingDescription", "game\u202e\u200b " + "x" * 500)  # bidi, ZWSP
    status, _ = await env.soap("AddPortMapping", args)
    assert status == 200
    (m,) = env.front.manager.mappings()
    assert m.request.description.startswith("game xxx") and len(m.request.description) == 128


async def test_async_upnp_client_strictly_reads_the_device_and_maps(env: Env) -> None:
    """Home Assistant's UPnP library, in strict mode, reads our description and service
    descriptions and calls the actions with their declared arguments."""
    client = pytest.importorskip("async_upnp_client.client_factory")
    requester = pytest.importorskip("async_upnp_client.aiohttp")
    factory = client.UpnpFactory(requester.AiohttpRequester(), non_strict=False)
    device = await factory.async_create_device(env.front.locations()[0])
    assert device.device_type == X.IGD_DEVICE
    wanip = next(s for s in device.all_services if s.service_type == V2)
    result = await wanip.action("AddAnyPortMapping").async_call(
        NewRemoteHost="", NewExternalPort=40000, NewProtocol="TCP", NewInternalPort=40000,
        NewInternalClient="127.0.0.1", NewEnabled=True, NewPortMappingDescription="ha",
        NewLeaseDuration=600)
    assert result == {"NewReservedPort": 40000}
    assert env.gw.ports() == {"tcp/40000": "127.0.0.1"}
    ext = await wanip.action("GetExternalIPAddress").async_call()
    assert ext == {"NewExternalIPAddress": "100.64.0.7"}
    entry = await wanip.action("GetGenericPortMappingEntry").async_call(NewPortMappingIndex=0)
    assert entry["NewExternalPort"] == 40000 and entry["NewEnabled"] is True


async def test_list_and_delete_a_range_touch_only_the_requesters_mappings(env: Env) -> None:
    mgr = env.front.manager
    mgr.settings = parse_config({"front": {**FRONT, "secure_mode": False}}).front
    for port, client in ((40000, "127.0.0.1"), (40001, "127.0.0.1"), (40002, "127.0.0.9")):
        status, _ = await env.soap("AddPortMapping", mapping(port, client))
        assert status == 200
    rng = [("NewStartPort", "40000"), ("NewEndPort", "40010"), ("NewProtocol", "UDP")]
    _, mine = await env.soap("GetListOfPortMappings",
                             [*rng, ("NewManage", "0"), ("NewNumberOfPorts", "0")])
    assert mine["NewPortListing"].count("<p:PortMappingEntry>") == 2
    status, backwards = await env.soap("DeletePortMappingRange", [
        ("NewStartPort", "40010"), ("NewEndPort", "40000"), ("NewProtocol", "UDP"),
        ("NewManage", "0")])
    assert status == 500 and backwards.code == 733
    status, _ = await env.soap("DeletePortMappingRange", [*rng, ("NewManage", "0")])
    assert status == 200 and env.gw.ports() == {"udp/40002": "127.0.0.9"}
    status, none = await env.soap("DeletePortMappingRange", [
        ("NewStartPort", "1"), ("NewEndPort", "2"), ("NewProtocol", "UDP"), ("NewManage", "0")])
    assert status == 500 and none.code == 730


def test_served_addresses_name_what_is_missing() -> None:
    assert [a.address for a in served_addresses(("lo",))] == ["127.0.0.1"]
    with pytest.raises(OSError, match="no interface 'nosuch0'"):
        served_addresses(("nosuch0",))


async def test_a_missing_interface_stops_the_front_with_a_config_error(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = parse_config({"front": {**FRONT, "interfaces": ["nosuch0"]}})
    svc = Service(cfg, FakeGateway(clock), clock=clock, state_dir=tmp_path)
    runner = FrontRunner(svc)
    try:
        with pytest.raises(ConfigError, match=r"front\.interfaces: .*nosuch0"):
            await runner.start()
        assert svc.front_serving is False  # /readyz stays 503
    finally:
        await runner.stop()
        svc.pipeline.journal.close()


async def test_igd_version_1_describes_and_announces_v1_only(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="127.0.0.1")
    cfg = parse_config({"front": {**FRONT, "igd_version": 1}})
    svc = Service(cfg, gw, clock=clock, state_dir=tmp_path)
    await svc.start()
    front = UpnpFront(FrontManager(svc, cfg.front), [LO], tag="v1", ssdp_port=free_udp_port(),
                      notify_to=("127.0.0.1", free_udp_port()), version=1)
    await front.start()
    env = Env(svc, gw, front, socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        assert await search(env, V2) == []  # a v2 search finds no v1 device
        (found,) = await search(env, V1)
        async with aiohttp.ClientSession() as http, http.get(found["LOCATION"]) as resp:
            desc = parse_description(await resp.read(), found["LOCATION"])
        assert desc.device_type == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
        svc_ = desc.miniupnpc_service()
        assert svc_ is not None and svc_.service_type == V1
        status, _ = await env.soap("AddPortMapping", mapping(40000), service=V1)
        assert status == 200 and gw.ports() == {"udp/40000": "127.0.0.1"}
        status, fault = await env.soap("AddAnyPortMapping", mapping(40001), service=V1)
        assert status == 500 and fault.code == 401
    finally:
        env.notify_sock.close()
        await front.stop()
        await svc.stop()


async def test_gena_subscription_gets_the_initial_event_and_each_change(env: Env) -> None:
    got: asyncio.Queue[tuple[dict[str, str], str]] = asyncio.Queue()

    async def on_notify(request: web.Request) -> web.Response:
        await got.put((dict(request.headers), (await request.read()).decode()))
        return web.Response()

    app = web.Application()
    app.router.add_route("NOTIFY", "/evt", on_notify)
    async with TestServer(app, host="127.0.0.1") as cb:
        evt = env.control + "/evt"
        async with aiohttp.ClientSession() as http:
            async with http.request("SUBSCRIBE", evt, headers={
                    "CALLBACK": f"<http://127.0.0.1:{cb.port}/evt>", "NT": "upnp:event",
                    "TIMEOUT": "Second-300"}) as resp:
                assert resp.status == 200 and resp.headers["TIMEOUT"] == "Second-300"
                sid = resp.headers["SID"]
            headers, body = await asyncio.wait_for(got.get(), 10)
            assert headers["SID"] == sid and headers["SEQ"] == "0"
            assert "<PortMappingNumberOfEntries>0</PortMappingNumberOfEntries>" in body
            assert "<ExternalIPAddress>100.64.0.7</ExternalIPAddress>" in body
            await env.soap("AddPortMapping", mapping(40000))
            headers, body = await asyncio.wait_for(got.get(), 10)
            assert headers["SEQ"] == "1"
            assert "<PortMappingNumberOfEntries>1</PortMappingNumberOfEntries>" in body
            assert "ExternalIPAddress" not in body  # only what changed
            async with http.request("SUBSCRIBE", evt, headers={
                    "CALLBACK": "<http://192.0.2.50:80/steal>", "NT": "upnp:event"}) as resp:
                assert resp.status == 412  # a callback elsewhere than the subscriber: refused
            for forged in (f"<http://127.0.0.1:{cb.port}@127.0.0.2:80/steal>",
                           "<http://127.0.0.1:80@127.0.0.2/steal>",
                           "<http://127.0.0.1@127.0.0.2/steal>"):
                async with http.request("SUBSCRIBE", evt, headers={
                        "CALLBACK": forged, "NT": "upnp:event"}) as resp:
                    assert resp.status == 412, forged  # the NOTIFY would go to 127.0.0.2
            async with http.request("UNSUBSCRIBE", evt, headers={"SID": sid}) as resp:
                assert resp.status == 200
            assert env.front.events.subs == {}


async def test_requests_from_outside_the_served_networks_are_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="127.0.0.1")
    svc = Service(parse_config({"front": FRONT}), gw, clock=clock, state_dir=tmp_path)
    await svc.start()
    lan = ServedAddress("lo", "127.0.0.1", ipaddress.IPv4Network("127.0.0.1/32"))
    front = UpnpFront(FrontManager(svc, svc.config.front), [lan], tag="w",
                      ssdp_port=free_udp_port(), notify_to=("127.0.0.1", free_udp_port()))
    await front.start()
    env = Env(svc, gw, front, socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        # 127.0.0.2 is not on the served network (127.0.0.1/32): as a host beyond the router
        status, fault = await env.soap("AddPortMapping", mapping(40000, "127.0.0.2"),
                                       source="127.0.0.2")
        assert status == 500 and fault.code == 606 and gw.ports() == {}
        assert await search(env, "ssdp:all", source="127.0.0.2") == []  # nor found by SSDP
        assert await search(env, "ssdp:all")  # from the served network: found
    finally:
        env.notify_sock.close()
        await front.stop()
        await svc.stop()


def test_served_by_default_never_includes_the_upstream_side(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import netifaces

    table = {"lan0": "192.168.8.1", "wan0": "10.0.0.2", "lo": "127.0.0.1"}
    monkeypatch.setattr(netifaces, "interfaces", lambda: list(table))
    monkeypatch.setattr(netifaces, "ifaddresses", lambda name: {
        netifaces.AF_INET: [{"addr": table[name], "netmask": "255.255.255.0"}]})
    monkeypatch.setattr("igdtrigger.front.upnp.default_gateway", lambda: "10.0.0.1")
    assert [a.interface for a in served_addresses(())] == ["lan0"]  # double NAT: wan0 private
    assert [a.interface for a in served_addresses(("wan0",))] == ["wan0"]  # named: served


def test_a_listing_goes_in_cdata_and_survives_a_description_that_closes_it() -> None:
    listing = X.port_listing([{"NewExternalPort": "1", "NewDescription": "a]]>b<c"}])
    body = X.response_body(X.SoapRequest(V2, "GetListOfPortMappings", {}),
                           [("NewPortListing", listing)])
    assert b"<NewPortListing><![CDATA[<?xml" in body
    parsed = parse_soap_response(200, body, "GetListOfPortMappings")
    assert isinstance(parsed, dict)
    assert "<p:NewDescription>a]]&gt;b&lt;c</p:NewDescription>" in parsed["NewPortListing"]
