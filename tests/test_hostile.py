"""A hostile LAN host cannot take the service down, or in (issue 13).

Each test is one attack: malformed requests, clients outside the LAN, floods of activations,
forged trigger traffic, the event-stream pool, port sharing across rules, ad-hoc ports past a
rule's hosts list. The server sees a client address through the test-only ``X-Test-Remote``
middleware of test_api_auth.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api import access as access_mod
from igdtrigger.api import app as api_mod
from igdtrigger.api.access import Caller
from igdtrigger.api.app import make_app
from igdtrigger.config import parse_config
from igdtrigger.core.engine import MAX_HOSTS_PER_ORIGIN, MAX_UNKNOWN_HOSTS, Engine
from igdtrigger.core.model import Flow, Proto
from igdtrigger.runtime.events import MAX_SUBSCRIBERS
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway
from .test_api_auth import LAN, THIS_HOST, fake_remote

PUBLIC = "203.0.113.9"  # a public (documentation) address: outside the LAN
CONFIG: dict[str, Any] = {
    "api": {"allow": ["192.168.1.0/24"], "max_per_host": 3, "allow_adhoc": True},
    "rules": [
        {"name": "demo", "open": ["udp/40000-40001"]},
        {"name": "other", "open": ["tcp/5000"]},
        {"name": "third", "open": ["tcp/5001"]},
        {"name": "fourth", "open": ["tcp/5002"]},
        {"name": "box", "open": ["udp/25000"], "hosts": ["192.168.1.50"]},
    ],
}


async def _service(tmp_path: Path, clock: FakeClock, config: dict[str, Any]) -> Service:
    svc = Service(parse_config(config), FakeGateway(clock, local_address=THIS_HOST),
                  clock=clock, state_dir=tmp_path)
    await svc.start()
    return svc


@pytest.fixture
async def svc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Service]:
    service = await _service(tmp_path, clock, CONFIG)
    yield service
    await service.stop()


@pytest.fixture
async def client(svc: Service) -> AsyncIterator[ApiClient]:
    c: ApiClient = TestClient(TestServer(make_app(svc, middlewares=[fake_remote]),
                                      host="127.0.0.1"))
    await c.start_server()
    yield c
    await c.close()


def remote(addr: str, **extra: str) -> dict[str, str]:
    return {"X-Test-Remote": addr, **extra}


def admin(svc: Service, addr: str = LAN) -> dict[str, str]:
    assert svc.api_token
    return remote(addr, Authorization=f"Bearer {svc.api_token}")


async def raw_request(client: ApiClient, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes aiohttp's client would refuse to (non-UTF-8 header values)."""
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


# --- malformed requests: 4xx, rate limited, logged once ----------------------------------------


async def test_bearer_that_is_not_utf8_is_401_not_500(client: ApiClient) -> None:
    status, body = await raw_request(
        client, b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Test-Remote: " +
        LAN.encode() + b"\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    assert status == 401
    assert json.loads(body)["error"]["status"] == 401


@pytest.mark.parametrize("digits", [401, 4301])
async def test_ttl_with_hundreds_of_digits_is_400(client: ApiClient, digits: int) -> None:
    body = b'{"rule": "demo", "ttl": ' + b"9" * digits + b"}"
    status, reply = await raw_request(
        client, b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n", body)
    assert status == 400, reply
    message = json.loads(reply)["error"]["message"]
    assert len(message) < 300  # the number is not echoed back whole


async def test_deeply_nested_json_is_400(client: ApiClient) -> None:
    r = await client.post("/api/v1/activations", data="[" * 10000,
                          headers={"Content-Type": "application/json"})
    assert r.status == 400


async def test_malformed_requests_count_against_the_rate_limit_and_log_once(
        client: ApiClient, svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    access_mod._REFUSED_LOG._buckets.clear()
    caplog.set_level(logging.WARNING, "igdtrigger.api.app")
    statuses = []
    for _ in range(70):  # the burst is 60
        r = await client.post("/api/v1/activations", data="{bad",
                              headers=remote(LAN, **{"Content-Type": "application/json"}))
        statuses.append(r.status)
    assert set(statuses[:60]) == {400}
    assert statuses[-1] == 429
    malformed = [r for r in caplog.records if "malformed request" in r.getMessage()]
    limited = [r for r in caplog.records if "too many requests" in r.getMessage()]
    assert len(malformed) == 1 and len(limited) == 1


# --- admission: only the LAN acts without the token --------------------------------------------


async def test_public_address_cannot_activate_or_read(client: ApiClient, svc: Service) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "demo"}, headers=remote(PUBLIC))
    assert r.status == 403
    assert "outside this service's LAN" in (await r.json())["error"]["message"]
    assert svc.pipeline.engine.activations == {}
    assert svc.gateway.ports() == {}  # type: ignore[attr-defined]
    r = await client.get("/api/v1/activations", headers=remote(PUBLIC))
    assert r.status == 403
    r = await client.get("/healthz", headers=remote(PUBLIC))  # public stays public
    assert r.status == 200
    r = await client.post("/api/v1/activations", json={"rule": "demo"}, headers=admin(svc, PUBLIC))
    assert r.status == 201  # the token may act from anywhere


async def test_public_read_means_the_lan_not_the_world(svc: Service) -> None:
    c: ApiClient = TestClient(TestServer(make_app(svc, middlewares=[fake_remote], public_read=True),
                                      host="127.0.0.1"))
    async with c:
        assert (await c.get("/api/v1/status", headers=remote(LAN))).status == 200
        assert (await c.get("/api/v1/status", headers=remote(PUBLIC))).status == 403
        assert (await c.get("/metrics", headers=remote(PUBLIC))).status == 403


async def test_default_lan_is_the_listening_interfaces_networks(
        tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def networks(host: str) -> tuple[ipaddress.IPv4Network, ...]:
        seen.append(host)
        return (ipaddress.IPv4Network("10.9.8.0/24"),)

    monkeypatch.setattr(api_mod, "interface_networks", networks)
    svc = await _service(tmp_path, clock, {"api": {"listen": "0.0.0.0:8731"},
                                           "rules": CONFIG["rules"]})
    try:
        async with TestClient(TestServer(make_app(svc, middlewares=[fake_remote]),
                                         host="127.0.0.1")) as c:
            r = await c.post("/api/v1/activations", json={"rule": "demo"},
                             headers=remote("10.9.8.7"))
            assert r.status == 201
            r = await c.post("/api/v1/activations", json={"rule": "demo"},
                             headers=remote("192.168.1.20"))  # private, but not this LAN
            assert r.status == 403
        assert seen == ["0.0.0.0"]
    finally:
        await svc.stop()


def test_every_loopback_address_is_one_client() -> None:
    a = Caller("127.0.0.1", True, False, True)
    b = Caller("127.0.0.16", True, False, True)
    assert a.key() == b.key() == "loopback"


# --- unbounded activations ---------------------------------------------------------------------


async def test_tokenless_activation_is_refreshed_not_duplicated(
        client: ApiClient, svc: Service, clock: FakeClock) -> None:
    first = await (await client.post("/api/v1/activations", json={"rule": "demo", "ttl": "7d"},
                                     headers=remote(LAN))).json()
    clock.advance(100)
    for _ in range(20):
        r = await client.post("/api/v1/activations", json={"rule": "demo", "ttl": "7d"},
                              headers=remote(LAN))
        assert r.status == 201
        assert (await r.json())["id"] == first["id"]
    assert len(svc.pipeline.engine.activations) == 1
    assert svc.pipeline.engine.get(first["id"]).expires == pytest.approx(clock() + 7 * 86400)


async def test_tokenless_activations_per_host_are_capped(client: ApiClient, svc: Service) -> None:
    for rule in ("demo", "other", "third"):
        r = await client.post("/api/v1/activations", json={"rule": rule}, headers=remote(LAN))
        assert r.status == 201
    r = await client.post("/api/v1/activations", json={"rule": "fourth"}, headers=remote(LAN))
    assert r.status == 429
    assert "max_per_host" in (await r.json())["error"]["message"]
    r = await client.post("/api/v1/activations", json={"rule": "fourth"},
                          headers=remote("192.168.1.21"))
    assert r.status == 201  # another host is not held back
    r = await client.post("/api/v1/activations", json={"rule": "fourth", "host": LAN},
                          headers=admin(svc))
    assert r.status == 201  # nor is the admin
    status = await (await client.get("/api/v1/status")).json()
    assert status["counts"]["activations_refused"] == {"per_host": 1}
    metrics = await (await client.get("/metrics")).text()
    assert 'igdtrigger_activations_refused_total{bound="per_host"} 1' in metrics


async def test_activations_are_paged_and_status_stays_small(
        client: ApiClient, svc: Service) -> None:
    for i in range(25):
        svc.pipeline.engine.activate("demo", f"192.168.1.{100 + i}", ttl=600)
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        q = f"?limit=10{'&cursor=' + cursor if cursor else ''}"
        page = await (await client.get("/api/v1/activations" + q)).json()
        pages += 1
        assert page["total"] == 25
        assert len(page["activations"]) <= 10
        seen += [a["host"] for a in page["activations"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert pages == 3
    assert seen == [f"192.168.1.{100 + i}" for i in range(25)]
    r = await client.get("/api/v1/activations?limit=0")
    assert r.status == 400
    r = await client.get("/api/v1/activations?cursor=x")
    assert r.status == 400
    small = svc.status(max_activations=5)
    assert len(small["activations"]) == 5
    assert small["counts"]["activations"] == 25
    assert any("page through" in w for w in small["warnings"])


def test_the_engine_bounds_live_activations(clock: FakeClock) -> None:
    cfg = parse_config({"rules": [{"name": "demo", "open": ["udp/40000"]}]})
    engine = Engine(cfg.rules, clock=clock, tag="t")
    engine.max_activations = 10
    for i in range(10):
        engine.activate("demo", f"192.168.1.{i + 1}", ttl=60)
    with pytest.raises(Exception, match="limit"):
        engine.activate("demo", "192.168.1.200", ttl=60)
    assert len(engine.activations) == 10
    assert engine.refused["total"] == 1


# --- forged trigger traffic --------------------------------------------------------------------


def _flood(engine: Engine, count: int, origin: str | None, dport: int = 27015) -> None:
    dst = ipaddress.IPv4Address("1.1.1.1")
    engine.origin_of = lambda _a: origin
    for i in range(count):
        src = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.0")) + i + 1)
        engine.on_flow(Flow(Proto.UDP, src, dst, 50000 + i % 10000, dport))


GAME_RULES = parse_config({"rules": [
    {"name": f"game{i}", "trigger": [f"udp/{27015 + i}"], "open": [f"udp/{40000 + i}"]}
    for i in range(20)]}).rules


def test_forged_sources_from_one_host_create_a_bounded_number(clock: FakeClock) -> None:
    engine = Engine(GAME_RULES, clock=clock, tag="t")
    _flood(engine, 150_000, None)  # sources the neighbour table does not know
    assert len(engine.activations) == MAX_UNKNOWN_HOSTS
    assert engine.refused["detected_per_origin"] == 150_000 - MAX_UNKNOWN_HOSTS
    engine2 = Engine(GAME_RULES, clock=clock, tag="t")
    _flood(engine2, 5000, "aa:bb:cc:dd:ee:ff")  # one MAC, many addresses
    assert len(engine2.activations) == MAX_HOSTS_PER_ORIGIN
    # a real host still gets its activations, one per rule it triggers (20 > the host bound)
    engine2.origin_of = lambda _a: "11:22:33:44:55:66"
    for i in range(20):
        engine2.on_flow(Flow(Proto.UDP, ipaddress.IPv4Address("192.168.1.30"),
                             ipaddress.IPv4Address("1.1.1.1"), 5, 27015 + i))
    assert sum(a.host == "192.168.1.30" for a in engine2.activations.values()) == 20


def test_detected_activations_are_bounded_in_total(clock: FakeClock) -> None:
    engine = Engine(GAME_RULES[:1], clock=clock, tag="t")
    engine.max_detected = 300
    dst = ipaddress.IPv4Address("1.1.1.1")
    engine.origin_of = lambda a: f"mac-{a}"
    for i in range(800):
        src = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.0")) + i + 1)
        engine.on_flow(Flow(Proto.UDP, src, dst, 1, 27015))
    assert len(engine.activations) == 300
    assert engine.refused["detected_total"] == 500
    clock.advance(10_000)
    engine.expire()  # lapsed: room again
    assert engine.activations == {}
    engine.on_flow(Flow(Proto.UDP, ipaddress.IPv4Address("10.0.0.1"), dst, 2, 27015))
    assert len(engine.activations) == 1


# --- event-stream pool -------------------------------------------------------------------------


async def test_full_event_stream_pool_leaves_room_for_the_admin(
        client: ApiClient, svc: Service) -> None:
    for i in range(MAX_SUBSCRIBERS):
        svc.hub.subscribe(f"192.168.1.{i}")
    r = await client.get("/api/v1/events")  # loopback, without the token
    assert r.status == 429
    r = await client.get("/api/v1/events", headers=admin(svc))
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    r.close()


# --- port sharing across rules, ad-hoc ports and hosts lists -----------------------------------


def test_share_latest_does_not_take_another_rules_ports(clock: FakeClock) -> None:
    cfg = parse_config({"rules": [
        {"name": "keep", "open": ["udp/5000"], "share": "first"},
        {"name": "grab", "open": ["udp/5000", "udp/5001"], "share": "latest"},
    ]})
    engine = Engine(cfg.rules, clock=clock, tag="t")
    engine.activate("keep", "192.168.1.2", ttl=60)
    clock.advance(1)
    engine.activate("grab", "192.168.1.3", ttl=60)
    desired = engine.desired()
    assert {str(k): s.internal_client for k, s in desired.items()} == {
        "udp/5000": "192.168.1.2", "udp/5001": "192.168.1.3"}
    clock.advance(1)
    engine.activate("grab", "192.168.1.4", ttl=60)  # latest still wins within its own rule
    desired = engine.desired()
    assert {str(k): s.internal_client for k, s in desired.items()} == {
        "udp/5000": "192.168.1.2", "udp/5001": "192.168.1.4"}


async def test_adhoc_ports_obey_a_rules_hosts_list(client: ApiClient, svc: Service) -> None:
    r = await client.post("/api/v1/activations", json={"open": ["udp/25000"]},
                          headers=remote(LAN))
    assert r.status == 403
    assert "box" in (await r.json())["error"]["message"]
    r = await client.post("/api/v1/activations", json={"open": ["udp/25000"]},
                          headers=remote("192.168.1.50"))
    assert r.status == 201
    r = await client.post("/api/v1/activations", json={"open": ["udp/25001"]},
                          headers=remote(LAN))
    assert r.status == 201


# --- smaller -----------------------------------------------------------------------------------


def test_serve_listen_keeps_the_rest_of_the_api_section(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from igdtrigger.cli import main as cli
    from igdtrigger.cli import serve as daemon

    cfg = tmp_path / "config.toml"
    cfg.write_text('[api]\nlisten = "127.0.0.1:8731"\nzeroconf = false\nallow_adhoc = true\n'
                   'allow = ["10.1.0.0/16"]\n')
    seen: list[Any] = []

    async def fake_serve(config: Any, **kw: Any) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(daemon, "serve", fake_serve)
    monkeypatch.setattr(daemon, "setup_logging", lambda *a, **k: None)
    assert cli.main(["serve", "--config", str(cfg), "--listen", "0.0.0.0:9999"]) == 0
    api = seen[0].api
    assert (api.host, api.port) == ("0.0.0.0", 9999)
    assert api.zeroconf == "off" and api.adhoc.enabled
    assert [str(n) for n in api.allow] == ["10.1.0.0/16"]


def test_openapi_documents_the_paging_parameters() -> None:
    from igdtrigger.api.openapi import build_openapi

    op = build_openapi("x")["paths"]["/api/v1/activations"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"limit", "cursor"}
    assert "next_cursor" in op["responses"]["200"]["content"]["application/json"]["schema"][
        "properties"]


@pytest.mark.parametrize(("api", "message"), [
    ({"allow": ["192.168.1.0/33"]}, "api.allow[0]"),
    ({"allow": "nonsense"}, "api.allow[0]"),
    ({"max_per_host": 0}, "api.max_per_host"),
    ({"max_per_host": True}, "api.max_per_host"),
])
def test_new_api_keys_are_validated(api: dict[str, Any], message: str) -> None:
    from igdtrigger.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"api": api})


async def test_ipv6_addresses_of_one_prefix_share_the_per_host_limit(
        tmp_path: Path, clock: FakeClock) -> None:
    config = {**CONFIG, "api": {**CONFIG["api"], "allow": ["192.168.1.0/24", "fd00:1::/48"]}}
    svc = await _service(tmp_path, clock, config)
    try:
        async with TestClient(TestServer(make_app(svc, middlewares=[fake_remote]),
                                         host="127.0.0.1")) as c:
            codes = []
            for i, rule in enumerate(["demo", "other", "third", "fourth"]):
                r = await c.post("/api/v1/activations", json={"rule": rule},
                                 headers=remote(f"fd00:1::{i + 1:x}"))  # rotating addresses
                codes.append(r.status)
            assert codes == [201, 201, 201, 429]
            r = await c.post("/api/v1/activations", json={"rule": "fourth"},
                             headers=remote("fd00:1:0:2::1"))  # another /64: another host
            assert r.status == 201
    finally:
        await svc.stop()


async def test_a_body_that_never_comes_is_408(client: ApiClient,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_mod, "BODY_TIMEOUT", 0.5)
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"rule": ')
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        rest = await asyncio.wait_for(reader.read(600), 10)
        assert status_line.split()[1] == b"408", rest
    finally:
        writer.close()


async def _post_in_one_write(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send a POST /api/v1/activations with ``head`` (extra header lines) and ``body`` in one
    write, as our client and curl do; its (status, rest of the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n" + head +
                     b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest


async def test_a_body_sent_with_its_headers_is_read_whole(client: ApiClient) -> None:
    # already all there when the handler starts: read at once (the fast path), plain or chunked
    port = client.server.port
    assert port is not None
    body = b'{"rule": "demo", "ttl": 60}'
    status, rest = await _post_in_one_write(
        port, b"Content-Length: " + str(len(body)).encode() + b"\r\n", body)
    assert status == 201, rest
    chunked = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    status, rest = await _post_in_one_write(port, b"Transfer-Encoding: chunked\r\n", chunked)
    assert status == 201, rest


async def test_an_oversized_chunked_body_sent_at_once_is_refused(client: ApiClient) -> None:
    port = client.server.port
    assert port is not None
    body = b'{"rule": "demo", "pad": "' + b"x" * (access_mod.MAX_BODY + 10) + b'"}'
    chunked = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    status, rest = await _post_in_one_write(port, b"Transfer-Encoding: chunked\r\n", chunked)
    assert status in (400, 413), rest
    assert b"larger than" in rest or status == 413


async def test_an_empty_body_sent_at_once_is_a_clear_400(client: ApiClient) -> None:
    port = client.server.port
    assert port is not None
    status, rest = await _post_in_one_write(port, b"Content-Length: 0\r\n", b"")
    assert status == 400 and b"rule" in rest, rest


async def test_a_body_in_two_pieces_is_read_whole(client: ApiClient) -> None:
    port = client.server.port
    assert port is not None
    body = b'{"rule": "demo", "ttl": 60}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body[:9])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body[9:])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.split()[1] == b"201"
    finally:
        writer.close()
