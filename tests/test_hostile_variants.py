"""Variants of issue 13's attacks (a hostile LAN host tries the same kinds again): ad-hoc
activations from rotating IPv6 addresses, meta that grows with every refresh, the rate limit
dodged by rotating addresses, an event stream that never reads, a token handed to an impostor
on ``localhost``'s other address, a planted symlink at the admin socket.

The server sees a client address through test_api_auth's ``X-Test-Remote`` middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.access import ApiSettings
from igdtrigger.api.app import make_app
from igdtrigger.api.httpguard import ConnectionGuard, ConnectionLimits, _peer_key, admin_socket
from igdtrigger.cli import client as client_mod
from igdtrigger.config import parse_config
from igdtrigger.core.errors import ConfigError
from igdtrigger.runtime.service import Service

from . import test_hostile
from .fakes import ApiClient, FakeClock
from .test_api_auth import fake_remote
from .test_conntrack import wait_until
from .test_hostile import CONFIG, _service, remote
from .test_httpguard import quiet_server_log

V6 = {**CONFIG, "api": {**CONFIG["api"], "allow": ["192.168.1.0/24", "fd00:1::/48"],
                         "rate_limit": 1000, "rate_burst": 1000}}
client = test_hostile.client  # test_hostile's fixture: its client serves our svc


@pytest.fixture
async def svc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Service]:
    """test_hostile's service with IPv6 in the LAN (its ``client`` serves this one)."""
    service = await _service(tmp_path, clock, V6)
    yield service
    await service.stop()


async def test_adhoc_activations_from_rotating_ipv6_addresses_are_bounded(
        client: ApiClient, svc: Service) -> None:
    codes = []
    for i in range(12):  # privacy addresses of one /64, each asking for ad-hoc ports
        r = await client.post("/api/v1/activations", json={"open": [f"udp/{20000 + i}"]},
                              headers=remote(f"fd00:1::{i + 1:x}"))
        codes.append(r.status)
    assert codes.count(201) <= V6["api"]["max_per_host"], codes
    assert len(svc.pipeline.engine.activations) <= V6["api"]["max_per_host"]


async def test_refreshing_with_new_meta_does_not_grow_the_activation(
        client: ApiClient, svc: Service) -> None:
    for n in range(50):
        meta = {f"k{n}-{i}": "x" * 256 for i in range(16)}
        r = await client.post("/api/v1/activations", json={"rule": "demo", "meta": meta},
                              headers=remote("192.168.1.20"))
        assert r.status == 201
    (act,) = svc.pipeline.engine.activations.values()
    assert len(act.meta) <= 16
    assert len(json.dumps(act.meta)) <= 16 * (64 + 256 + 8)


async def test_rotating_ipv6_addresses_share_one_rate_limit_and_stream_quota(
        tmp_path: Path, clock: FakeClock) -> None:
    config = {**V6, "api": {**V6["api"], "rate_limit": 1, "rate_burst": 5}}
    svc = await _service(tmp_path, clock, config)
    try:
        async with TestClient(TestServer(make_app(svc, middlewares=[fake_remote]),
                                         host="127.0.0.1")) as c:
            codes = []
            for i in range(20):  # a new address of the same /64 for each request
                r = await c.get("/api/v1/rules", headers=remote(f"fd00:1::{i + 1:x}"))
                codes.append(r.status)
            assert codes.count(200) == 5 and codes[-1] == 429
            r = await c.get("/api/v1/rules", headers=remote("fd00:1:0:2::1"))
            assert r.status == 200  # another /64 is another host
    finally:
        await svc.stop()


def test_connection_caps_count_an_ipv6_prefix_as_one_client() -> None:
    guard = ConnectionGuard(ConnectionLimits(per_client=2, total=100, local=2))
    verdicts = []
    for i in range(5):
        key, local = _peer_key(socket.AF_INET6, (f"fd00:1::{i + 1:x}", 1234, 0, 0))
        verdicts.append(guard.admit(key, local))
    assert verdicts == [None, None, "per_client", "per_client", "per_client"]
    key, local = _peer_key(socket.AF_INET6, ("::ffff:192.168.1.5", 1, 0, 0))
    assert (key, local) == ("192.168.1.5", False)
    assert _peer_key(socket.AF_INET6, ("::1", 1, 0, 0))[1]


_IMPOSTOR = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.bind(("::1", int(sys.argv[1])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(5)
seen = b""
while b"\\r\\n\\r\\n" not in seen:
    chunk = c.recv(4096)
    if not chunk:
        break
    seen += chunk
c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 2\\r\\n"
          b"Connection: close\\r\\n\\r\\n{}")
print(seen.decode(errors="replace"), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to run the impostor as another user")
async def test_token_is_not_sent_to_another_users_listener_on_localhosts_other_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The service (this user) listens on 127.0.0.1:P; an impostor (nobody) on [::1]:P; the
    CLI names ``localhost``, which resolves to ::1 first on most desktops."""
    with socket.socket() as service_side:
        service_side.bind(("127.0.0.1", 0))
        service_side.listen(1)
        port = service_side.getsockname()[1]
        impostor = None
        for python in ("/usr/bin/python3", sys.executable):  # one that nobody may run
            with contextlib.suppress(OSError):
                impostor = await asyncio.create_subprocess_exec(
                    python, "-c", _IMPOSTOR, str(port), user=65534, cwd="/",
                    stdout=asyncio.subprocess.PIPE)
                break
        if impostor is None:
            pytest.skip("no Python here that user nobody may run")
        assert impostor.stdout is not None
        assert (await asyncio.wait_for(impostor.stdout.readline(), 10)).strip() == b"ready"
        real = socket.getaddrinfo

        def v6_first(host: Any, *args: Any, **kw: Any) -> Any:
            if host == "localhost":
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return real(host, *args, **kw)

        monkeypatch.setattr(socket, "getaddrinfo", v6_first)
        c = client_mod.Client(f"http://localhost:{port}", token="s3cret",
                              token_uid=os.getuid())
        await asyncio.to_thread(c.request, "GET", "/api/v1/status")
        seen, _ = await asyncio.wait_for(impostor.communicate(), 10)
        assert b"GET /api/v1/status" in seen
        assert b"s3cret" not in seen


async def test_an_event_stream_that_never_reads_is_closed(svc: Service) -> None:
    """Its buffers stay small (the kernel would grow the send buffer to megabytes) and, full
    for ``sse_write_timeout``, the stream is closed and its place in the pool freed."""
    app = make_app(svc, sse_write_timeout=0.5)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        port = c.server.port
        assert port is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        try:  # a reader (loopback) that asks for the stream and never reads a byte
            sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await wait_until(lambda: bool(svc.hub.subscribers), 30)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            pad = "x" * 1000
            sent = 0
            while svc.hub.subscribers and loop.time() < deadline:
                for _ in range(10):
                    svc.hub.publish({"event": "flood", "pad": pad})
                sent += 10 * len(pad)
                await asyncio.sleep(0.02)
            assert not svc.hub.subscribers  # dropped: its place in the pool is free again
            assert sent < 1_500_000  # it was not fed megabytes first
        finally:
            sock.close()


def test_a_symlink_planted_at_the_admin_socket_is_replaced_not_followed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "api.sock"
    path.symlink_to(victim)
    sock = admin_socket(path)  # it refused to bind before (the name was taken)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.read_text() == "keep"
        assert "written by other users" not in caplog.text
    finally:
        sock.close()
    path.unlink()
    state.chmod(0o777)  # anyone may swap the socket: said at start
    with caplog.at_level(logging.WARNING, logger="igdtrigger.api.app"):
        admin_socket(path).close()
    assert "can be written by other users" in caplog.text


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0", "::ffff:0:0/96", "::/1"])
def test_an_allow_of_every_address_is_refused(net: str) -> None:
    with pytest.raises(ConfigError, match="every address"):
        parse_config({"api": {"allow": ["192.168.1.0/24", net]}})


def test_ipv4_mapped_addresses_are_judged_as_ipv4() -> None:
    lan = ApiSettings(allow=(ipaddress.ip_network("192.168.1.0/24"),))
    assert lan.is_lan("::ffff:192.168.1.5")
    assert not lan.is_lan("::ffff:8.8.8.8")
    assert not ApiSettings().is_lan("::ffff:8.8.8.8")  # Python calls ::ffff:0:0/96 private
    assert not lan.is_lan("fe80::1%eth0")  # a zone id does not make it LAN


async def test_clients_that_hang_up_mid_body_log_one_line_without_traceback(
        client: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "aiohttp.server")
    port = client.server.port
    assert port is not None
    with quiet_server_log():
        for i in range(20):  # half a body, a chunk never ended: then the client hangs up
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n" +
                         (b"Content-Length: 50\r\n\r\n{" if i % 2 else
                          b"Transfer-Encoding: chunked\r\n\r\n40\r\n{"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
        await wait_until(lambda: any(r.name == "aiohttp.server" for r in caplog.records), 10)
        await asyncio.sleep(0.2)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and "went away" in records[0].getMessage()
