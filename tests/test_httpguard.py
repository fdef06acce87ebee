"""The API's sockets under a connection flood (issue 13): caps per client and in total, a pool
kept for this machine, a header-read timeout, the local admin socket, dual-stack ``[::]``, the
file-descriptor limit, and router I/O that a descriptor shortage does not make "gateway down".

Real sockets on loopback (and a Unix socket in a temporary directory); the lab test
(tests/lab/test_lab_hostile.py) floods from a second LAN namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from igdtrigger.api.app import make_app
from igdtrigger.api.httpguard import (
    Acceptor,
    ConnectionGuard,
    ConnectionLimits,
    _GuardedProtocol,
    accepted_ns,
    admin_socket,
    listen_socket,
    raise_fd_limit,
    start_servers,
)
from igdtrigger.cli import client as client_mod
from igdtrigger.config import parse_config
from igdtrigger.core import trace
from igdtrigger.core.activation import Source
from igdtrigger.core.errors import GatewayUnreachable, LocalResourceError, socket_fault
from igdtrigger.core.model import MappingSpec
from igdtrigger.runtime.logthrottle import PerKindThrottle
from igdtrigger.runtime.mapper import TRACE_ENV
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway
from .test_conntrack import wait_until


def test_admit_caps_per_client_and_total_and_keeps_local_apart() -> None:
    guard = ConnectionGuard(ConnectionLimits(per_client=2, total=3, local=2))
    assert guard.admit("192.168.1.5", False) is None
    assert guard.admit("192.168.1.5", False) is None
    assert guard.admit("192.168.1.5", False) == "per_client"
    assert guard.admit("192.168.1.6", False) is None
    assert guard.admit("192.168.1.7", False) == "total"
    # this machine still gets in while the network side is full
    assert guard.admit("127.0.0.1", True) is None
    assert guard.admit("unix", True) is None
    assert guard.admit("127.0.0.1", True) == "local"
    guard.release("192.168.1.5", False)
    assert guard.admit("192.168.1.7", False) is None
    assert dict(guard.per_client) == {"192.168.1.5": 1, "192.168.1.6": 1, "192.168.1.7": 1}


def test_limits_stay_well_under_the_descriptor_limit() -> None:
    lim = ConnectionLimits().within_fd_limit(1024)
    assert lim.total + lim.local <= (1024 - 128) // 2
    assert lim.local >= 4 and lim.total >= 4
    assert ConnectionLimits().within_fd_limit(1 << 20) == ConnectionLimits()


def test_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        got = raise_fd_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == now
        assert now == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    clock = FakeClock()
    service = Service(parse_config({"rules": [{"name": "demo", "open": ["udp/40000"]}]}),
                      FakeGateway(clock), clock=clock, state_dir=tmp_path)
    await service.start()
    yield service
    await service.stop()


async def _serve(svc: Service, guard: ConnectionGuard,
                 socks: list[socket.socket]) -> tuple[web.AppRunner, list[Acceptor]]:
    runner = web.AppRunner(make_app(svc, guard=guard), access_log=None,
                           keepalive_timeout=guard.limits.header_timeout)
    await runner.setup()
    assert runner.server is not None
    return runner, await start_servers(runner.server, guard, socks)


async def _stop(runner: web.AppRunner, servers: list[Acceptor]) -> None:
    for s in servers:
        s.close()
    await runner.cleanup()


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Did the server close the connection within ``timeout`` seconds?"""
    try:
        data = await asyncio.wait_for(reader.read(1024), timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 4")


async def test_half_sent_requests_are_closed_and_past_the_cap_refused(svc: Service) -> None:
    guard = ConnectionGuard(ConnectionLimits(header_timeout=1.0, local=4))
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    runner, servers = await _serve(svc, guard, [sock])
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(4):  # slowloris: half a request line each
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /hea")
            conns.append((reader, writer))
        for _ in range(50):
            if guard.local == 4:
                break
            await asyncio.sleep(0.05)
        assert guard.local == 4
        try:  # the fifth is reset at once (maybe before the client saw it connect)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _closed(reader, 5.0)
            writer.close()
        except ConnectionError:
            pass
        assert guard.refused["local"] == 1
        # the half-sent ones are closed after the header timeout, trickle or not
        conns[0][1].write(b"l")
        results = await asyncio.gather(*(_closed(r, 15.0) for r, _ in conns))
        assert all(results)
        for _ in range(100):
            if guard.local == 0:
                break
            await asyncio.sleep(0.05)
        assert guard.local == 0
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/healthz") as r:  # the API answers again
            assert r.status == 200
    finally:
        for _, w in conns:
            w.close()
        await _stop(runner, servers)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
async def test_admin_socket_is_private_and_carries_the_admin_role(
        svc: Service, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("stale")
    path.unlink()
    guard = ConnectionGuard()
    runner, servers = await _serve(svc, guard, [admin_socket(path)])
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as http:
            async with http.post("http://localhost/api/v1/activations",
                                 json={"rule": "demo", "host": "192.168.1.99"}) as r:
                assert r.status == 201, await r.text()  # another host: admin only
            async with http.get("http://localhost/api/v1/status") as r:
                assert r.status == 200
                assert (await r.json())["api_connections"]["open_local"] == 1
            async with http.get("http://localhost/metrics") as r:
                text = await r.text()
                assert 'igdtrigger_api_connections{origin="local"} 1' in text
                assert 'igdtrigger_api_connections_refused_total{limit="per_client"} 0' in text
    finally:
        await _stop(runner, servers)


async def test_wildcard_ipv6_listens_dual_stack(svc: Service) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sock = listen_socket("::", 0)
    except OSError as exc:
        pytest.skip(f"cannot listen on [::] here: {exc}")
    port = sock.getsockname()[1]
    runner, servers = await _serve(svc, ConnectionGuard(), [sock])
    try:
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "[::1]"):
                with contextlib.suppress(aiohttp.ClientConnectorError):
                    async with http.get(f"http://{host}:{port}/healthz") as r:
                        assert r.status == 200
                        continue
                pytest.fail(f"{host} cannot reach a [::] listener")
    finally:
        await _stop(runner, servers)


def test_listen_address_for_ipv6_wildcard_is_found_by_the_cli() -> None:
    cfg = parse_config({"api": {"listen": "[::]:8731"}})
    assert cfg.api.url == "http://[::1]:8731"


def test_out_of_descriptors_is_not_a_router_fault() -> None:
    fault = socket_fault(OSError(errno.EMFILE, "Too many open files"), "connect")
    assert isinstance(fault, LocalResourceError)
    assert not isinstance(fault, GatewayUnreachable)
    assert isinstance(socket_fault(OSError(errno.ECONNREFUSED, "refused"), "c"),
                      GatewayUnreachable)


async def test_descriptor_shortage_leaves_the_gateway_up_and_mappings_in_place(
        tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    svc = Service(parse_config({"rules": [{"name": "demo", "open": ["udp/40000"]},
                                          {"name": "more", "open": ["udp/41000"]}]}),
                  gw, clock=clock, state_dir=tmp_path)
    await svc.start()
    try:
        await svc.activate("demo", "192.168.1.10", ttl=600, source=Source.API)
        assert gw.ports() == {"udp/40000": "192.168.1.10"}
        real_add = gw.add

        async def emfile(spec: MappingSpec, lease: int) -> Any:
            raise socket_fault(OSError(errno.EMFILE, "Too many open files"), "connect")

        gw.add = emfile  # type: ignore[method-assign]
        await svc.activate("more", "192.168.1.10", ttl=600, source=Source.API, wait=2)
        assert svc.pipeline.mapper.gateway_up  # not "gateway down": nothing to re-apply
        assert svc.pipeline.mapper.gateway_error in ("", None)
        assert gw.ports() == {"udp/40000": "192.168.1.10"}
        gw.add = real_add  # type: ignore[method-assign]
        clock.advance(10)
        svc.wake()
        for _ in range(100):
            if "udp/41000" in gw.ports():
                break
            await asyncio.sleep(0.02)
        assert gw.ports() == {"udp/40000": "192.168.1.10", "udp/41000": "192.168.1.10"}
    finally:
        await svc.stop()


# --- the local CLI never hands the token to an impostor ----------------------------------------


def test_connected_peer_uid_is_read_from_the_kernel() -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp here")
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        with socket.create_connection(lsn.getsockname()) as sock:
            assert client_mod.connected_peer_uid(sock) == os.getuid()


def test_connected_peer_uid_matches_this_connection_only(tmp_path: Path) -> None:
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    (tmp_path / "tcp").write_text(
        head + "   0: 0100007F:2223 00000000:0000 0A 00000000:00000000 00:00000000 00000000  "
        "1001 0 1 1\n"
        "   1: 0100007F:2223 0100007F:9998 01 00000000:00000000 00:00000000 00000000  "
        "1002 0 2 1\n"
        "   2: 0100007F:2223 0100007F:9999 01 00000000:00000000 00:00000000 00000000  "
        "1003 0 3 1\n")
    (tmp_path / "tcp6").write_text(  # a dual-stack listener's side: ::ffff:127.0.0.1
        head + "   0: 0000000000000000FFFF00000100007F:2224 "
        "0000000000000000FFFF00000100007F:9999 01 00000000:00000000 00:00000000 00000000  "
        "1004 0 4 1\n")

    class Conn:
        def __init__(self, port: int) -> None:
            self.port = port

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", 0x9999)

        def getpeername(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    def uid(port: int) -> int | None:
        return client_mod.connected_peer_uid(Conn(port), tmp_path)  # type: ignore[arg-type]

    assert uid(0x2223) == 1003  # the accepted side of this connection, not the listener
    assert uid(0x2224) == 1004
    assert client_mod.connected_peer_uid(Conn(0x2225), tmp_path / "none") is None  # type: ignore[arg-type]


class _Recorder:
    """A loopback HTTP listener that records what it is sent (an impostor on the port)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.seen = b""

    def serve_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            while b"\r\n\r\n" not in self.seen:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.seen += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")


@pytest.mark.parametrize("same_user", [True, False])
async def test_token_goes_only_to_a_listener_run_by_the_services_user(
        monkeypatch: pytest.MonkeyPatch, same_user: bool) -> None:
    rec = _Recorder()
    try:
        monkeypatch.setattr(client_mod, "connected_peer_uid",
                            lambda sock: 4242 if not same_user else os.getuid())
        c = client_mod.Client(f"http://127.0.0.1:{rec.port}", token="s3cret",
                              token_uid=os.getuid())
        server = asyncio.get_running_loop().run_in_executor(None, rec.serve_one)
        await asyncio.to_thread(c.request, "GET", "/api/v1/status")
        await server
        assert (b"s3cret" in rec.seen) is same_user
    finally:
        rec.sock.close()


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
async def test_cli_client_uses_the_admin_socket_without_a_token(
        svc: Service, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    runner, servers = await _serve(svc, ConnectionGuard(), [admin_socket(path)])
    try:
        where = client_mod.Resolved("http://127.0.0.1:8731", "local")
        sock, _uid = client_mod.local_access(where, tmp_path)
        assert sock == path
        assert client_mod.local_access(client_mod.Resolved("http://127.0.0.1:9", "argument"),
                                       tmp_path)[0] is None
        c = client_mod.Client(where.url, admin_socket=sock)
        data = await asyncio.to_thread(c.request, "POST", "/api/v1/activations",
                                       {"rule": "demo", "host": "192.168.1.99"})
        assert data["host"] == "192.168.1.99"  # another host's: the admin role, no token
    finally:
        await _stop(runner, servers)


def test_log_lines_are_rate_limited_per_kind() -> None:
    now = [0.0]
    throttle = PerKindThrottle(burst=3, interval=60, clock=lambda: now[0])
    logger = logging.getLogger("test.throttle")

    def rec(msg: str, *args: object) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, None)

    passed = [throttle.filter(rec("refused %s", f"10.0.0.{i}")) for i in range(1000)]
    assert sum(passed) == 3  # one kind, whatever the arguments
    assert throttle.filter(rec("another kind"))
    now[0] = 61
    again = rec("refused %s", "10.0.0.1")
    assert throttle.filter(again)
    assert "997 more like this" in again.getMessage()


def test_miniupnpc_socket_error_while_out_of_descriptors_is_local() -> None:
    resource = pytest.importorskip("resource")
    from igdtrigger.gateway.upnp.miniupnpc import miniupnpc_error

    assert isinstance(miniupnpc_error("AddPortMapping", Exception("Miniupnpc Socket error")),
                      GatewayUnreachable)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        fault = miniupnpc_error("AddPortMapping", Exception("Miniupnpc Socket error"))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert isinstance(fault, LocalResourceError)


@contextlib.contextmanager
def quiet_server_log() -> Iterator[None]:
    """aiohttp's server log with the service's filter (as ``serve`` sets it up)."""
    from igdtrigger.runtime.logthrottle import QuietBadRequests

    quiet = QuietBadRequests()
    server_log = logging.getLogger("aiohttp.server")
    server_log.addFilter(quiet)
    try:
        yield
    finally:
        server_log.removeFilter(quiet)


async def test_requests_that_are_not_http_are_400_and_logged_once_without_traceback(
        svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "aiohttp.server")
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    runner, servers = await _serve(svc, ConnectionGuard(), [sock])
    try:
        with quiet_server_log():
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
                status_line = await asyncio.wait_for(reader.readline(), 10)
                assert status_line.split()[1] == b"400"
                writer.close()
    finally:
        await _stop(runner, servers)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "LineTooLong" in records[0].getMessage()


def test_fd_limit_is_left_to_the_unit_under_a_seccomp_filter(tmp_path: Path) -> None:
    from igdtrigger.api.httpguard import _seccomp_filtered

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nSeccomp:\t2\nSeccomp_filters:\t1\n")
    assert _seccomp_filtered(status)
    status.write_text("Name:\tpython\nSeccomp:\t0\n")
    assert not _seccomp_filtered(status)
    assert not _seccomp_filtered(tmp_path / "missing")


async def test_a_traced_api_activation_starts_at_the_connections_accept(
        svc: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # IGDTRIGGER_TRACE: the API path's trace begins when our acceptor took the connection
    # (issue 17: the time before the handler is part of the path), once per connection
    out = tmp_path / "trace.jsonl"
    monkeypatch.setattr(trace, "ON", True)
    monkeypatch.setenv(TRACE_ENV, str(out))
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    runner, servers = await _serve(svc, ConnectionGuard(), [sock])
    try:
        body = b'{"rule": "demo", "ttl": 60}'
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body)
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status_line.split()[1] == b"201"
        await wait_until(lambda: out.exists() and out.read_text().strip() != "", 10)
    finally:
        await _stop(runner, servers)
    steps = json.loads(out.read_text().splitlines()[0])["steps"]
    assert [s[0] for s in steps[:3]] == ["accept", "api", "engine"]
    assert steps[0][1] == 0.0 and steps[1][1] >= 0.0


def test_the_accept_time_is_given_to_the_first_request_only() -> None:
    guard = ConnectionGuard()
    assert guard.admit("127.0.0.1", True) is None
    proto = _GuardedProtocol(guard, asyncio.Protocol, "127.0.0.1", True, 12345)

    class Transport(asyncio.Transport):
        def get_protocol(self) -> asyncio.BaseProtocol:
            return proto

    assert accepted_ns(Transport()) == 12345
    assert accepted_ns(Transport()) == 0  # a later request on the same connection
    assert accepted_ns(None) == 0
