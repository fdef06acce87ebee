"""The front's NAT-PMP/PCP server: the codec (strict parsing, result codes) and the server over
loopback with real datagrams, against a fake front manager; Debian's ``natpmpc`` when present."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess

import pytest

from igdtrigger.core.model import Proto
from igdtrigger.front.manager import (
    ClientRequest,
    FrontMapping,
    FrontProtocol,
    Grant,
    Refusal,
    RefusalKind,
)
from igdtrigger.front.pcp import (
    PcpMapRequest,
    PcpResult,
    PmpMapRequest,
    PmpResult,
    Rejected,
    parse_request,
)
from igdtrigger.front.pcpserver import PcpServer, PortMapService
from igdtrigger.gateway.natpmp.codec import (
    PCP_RESULTS,
    PMP_RESULTS,
    build_pcp_announce,
    build_pcp_map,
    build_pmp_address_request,
    build_pmp_map_request,
    decode_pcp_reply,
    decode_pmp_reply,
)

CLIENT = "127.0.0.1"
OTHER = "127.0.0.9"
EXT = "11.22.33.1"
NONCE = bytes(range(12))


class FakeFront:
    """The manager's contract over a dict: secure mode, an allow range, conflicts, alternatives."""

    def __init__(self, *, allow: tuple[int, int] = (1024, 49151), ext: str | None = EXT,
                 max_lease: float = 3600.0) -> None:
        self.allow = allow
        self.ext = ext
        self.max_lease = max_lease
        self.table: dict[tuple[int, Proto], FrontMapping] = {}
        self.adds: list[ClientRequest] = []
        self.deletes: list[tuple[FrontProtocol, str, int, Proto, bytes | None]] = []
        self.delay = 0.0

    async def add(self, req: ClientRequest) -> Grant | Refusal:
        self.adds.append(req)
        await asyncio.sleep(self.delay)
        if req.internal_client != req.client:
            return Refusal(RefusalKind.OTHER_CLIENT, "secure mode")
        port = req.external_port or req.internal_port
        if not self.allow[0] <= port <= self.allow[1]:
            return Refusal(RefusalKind.NOT_AUTHORIZED, f"port {port} not allowed")
        held = self.table.get((port, req.proto))
        if held is not None and (held.request.internal_client != req.internal_client
                                 or held.request.internal_port != req.internal_port):
            if not req.allow_alternative:
                return Refusal(RefusalKind.CONFLICT, "taken")
            port = next(p for p in range(port + 1, 65536) if (p, req.proto) not in self.table)
        lease = min(req.lease or self.max_lease, self.max_lease)
        grant = Grant(port, lease, self.ext or "")
        self.table[(port, req.proto)] = FrontMapping(req, grant, 0.0, 0.0, lease)
        return grant

    async def delete(self, protocol: FrontProtocol, client: str, external_port: int,
                     proto: Proto, nonce: bytes | None = None) -> Refusal | None:
        self.deletes.append((protocol, client, external_port, proto, nonce))
        if self.table.pop((external_port, proto), None) is None:
            return Refusal(RefusalKind.NO_SUCH, "no such mapping")
        return None

    def mappings(self) -> list[FrontMapping]:
        return list(self.table.values())

    async def external_address(self) -> str | None:
        return self.ext

    def epoch(self) -> int:
        return 77


# --- codec ---------------------------------------------------------------------------------------


def test_result_codes_match_the_client_codec() -> None:
    assert {r.value: r.name for r in PcpResult} == PCP_RESULTS
    assert set(PMP_RESULTS) == {r.value for r in PmpResult}


def test_client_codec_requests_parse_back() -> None:
    pmp = parse_request(build_pmp_map_request(Proto.TCP, 4000, 4001, 60), CLIENT, 1)
    assert pmp == PmpMapRequest(Proto.TCP, 4000, 4001, 60)
    pcp = parse_request(build_pcp_map(NONCE, Proto.UDP, 5000, 5001, 120, CLIENT,
                                      third_party=OTHER, prefer_failure=True), CLIENT, 1)
    assert isinstance(pcp, PcpMapRequest)
    assert (pcp.nonce, pcp.proto, pcp.internal_port, pcp.external_port, pcp.lifetime) == \
        (NONCE, Proto.UDP, 5000, 5001, 120)
    assert pcp.prefer_failure and pcp.third_party == OTHER and pcp.internal_client == OTHER
    assert pcp.external_ip == ""


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def _pcp_result(rej: object) -> int:
    assert isinstance(rej, Rejected) and rej.response is not None
    reply = decode_pcp_reply(rej.response)
    assert reply is not None and reply.version == 2
    return reply.result


@pytest.mark.parametrize(("data", "code"), [
    (bytes([1, 1]) + bytes(58), PcpResult.UNSUPP_VERSION),
    (bytes([3, 1]) + bytes(58), PcpResult.UNSUPP_VERSION),
    (bytes([2, 2]) + bytes(58), PcpResult.UNSUPP_OPCODE),  # PEER
    (bytes([2, 9]) + bytes(58), PcpResult.UNSUPP_OPCODE),
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT)[:56], PcpResult.MALFORMED_REQUEST),
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT) + b"\0\0",
     PcpResult.MALFORMED_REQUEST),
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT) + bytes(1100),
     PcpResult.MALFORMED_REQUEST),
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, OTHER), PcpResult.ADDRESS_MISMATCH),
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT) + struct.pack("!BBH", 3, 0, 20)
     + bytes(20), PcpResult.UNSUPP_OPTION),  # FILTER
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT) + struct.pack("!BBH", 99, 0, 0),
     PcpResult.UNSUPP_OPTION),
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT) + struct.pack("!BBH", 1, 0, 4)
     + bytes(4), PcpResult.MALFORMED_OPTION),  # THIRD_PARTY of 4 bytes
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT, prefer_failure=True)
     + struct.pack("!BBH", 2, 0, 0), PcpResult.MALFORMED_OPTION),  # repeated
    (build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT) + struct.pack("!BBH", 1, 0, 16),
     PcpResult.MALFORMED_OPTION),  # runs past the end
    (build_pcp_announce(CLIENT) + struct.pack("!BBH", 2, 0, 0), PcpResult.MALFORMED_OPTION),
    (_patched(build_pcp_map(NONCE, Proto.UDP, 5000, 0, 60, CLIENT), 40, b"\0\0"),
     PcpResult.UNSUPP_PROTOCOL),  # internal port 0: all ports
    (_patched(build_pcp_map(NONCE, Proto.UDP, 5000, 0, 60, CLIENT), 36, b"\x84"),
     PcpResult.UNSUPP_PROTOCOL),  # SCTP
    (_patched(build_pcp_map(NONCE, Proto.UDP, 5000, 0, 60, CLIENT), 36, b"\0"),
     PcpResult.UNSUPP_PROTOCOL),  # all protocols, not a delete
])
def test_pcp_bad_requests_get_their_result_code(data: bytes, code: PcpResult) -> None:
    rej = parse_request(data, CLIENT, 5)
    assert _pcp_result(rej) == code
    assert isinstance(rej, Rejected) and rej.reason
    reply = decode_pcp_reply(rej.response or b"")
    assert reply is not None and reply.epoch == 5 and reply.lifetime > 0


def test_pcp_error_copies_the_map_payload_and_optional_options_are_skipped() -> None:
    req = build_pcp_map(NONCE, Proto.TCP, 5000, 5001, 60, CLIENT)
    rej = parse_request(req, OTHER, 3)
    assert isinstance(rej, Rejected) and rej.response is not None
    assert rej.response[24:60] == req[24:60]
    optional = req + struct.pack("!BBH", 200, 0, 3) + b"abc\0"
    assert isinstance(parse_request(optional, CLIENT, 3), PcpMapRequest)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x80", bytes([2, 0x81]) + bytes(58),
                                  b"\x00\x01\x00\x00"])
def test_runts_and_responses_are_dropped_silently(data: bytes) -> None:
    rej = parse_request(data, CLIENT, 1)
    assert isinstance(rej, Rejected) and rej.response is None and rej.reason


def test_pmp_unsupported_opcode_and_port_zero() -> None:
    rej = parse_request(b"\x00\x07", CLIENT, 9)
    assert isinstance(rej, Rejected) and rej.response is not None
    reply = decode_pmp_reply(rej.response)
    assert reply is not None and (reply.opcode, reply.result, reply.epoch) == (7, 5, 9)
    rej = parse_request(build_pmp_map_request(Proto.UDP, 0, 0, 60), CLIENT, 9)
    assert isinstance(rej, Rejected) and rej.result == PmpResult.NOT_AUTHORIZED
    assert parse_request(build_pmp_map_request(Proto.UDP, 0, 0, 0), CLIENT, 9) == \
        PmpMapRequest(Proto.UDP, 0, 0, 0)


def test_fuzzed_datagrams_never_raise() -> None:
    import random

    rng = random.Random(14)
    seeds = [build_pcp_map(NONCE, Proto.UDP, 5000, 5000, 60, CLIENT, third_party=OTHER),
             build_pmp_map_request(Proto.TCP, 1, 2, 3), build_pcp_announce(CLIENT)]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            if data and rng.random() < 0.7:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data = data[:rng.randrange(len(data) + 1)]
        out = parse_request(bytes(data), CLIENT, 1)
        if isinstance(out, Rejected) and out.response is not None:
            assert len(out.response) % 4 == 0 and len(out.response) <= 1100


# --- the service (no socket) ---------------------------------------------------------------------


def _pmp(data: bytes | None) -> tuple[int, int, int, int]:
    reply = decode_pmp_reply(data or b"")
    assert reply is not None
    return reply.result, reply.internal_port or 0, reply.external_port or 0, reply.lifetime or 0


async def test_pmp_map_renew_and_delete() -> None:
    front = FakeFront()
    svc = PortMapService(front)
    assert _pmp(await svc.handle(build_pmp_map_request(Proto.UDP, 40002, 40002, 60), CLIENT)) \
        == (0, 40002, 40002, 60)
    # the same client asking again renews the mapping it has, whatever port it suggests now
    assert _pmp(await svc.handle(build_pmp_map_request(Proto.UDP, 40002, 0, 90), CLIENT))[2] \
        == 40002
    assert front.adds[-1].external_port == 40002 and front.adds[-1].allow_alternative
    assert _pmp(await svc.handle(build_pmp_map_request(Proto.UDP, 40002, 0, 0), CLIENT)) \
        == (0, 40002, 0, 0)
    assert not front.table
    # deleting what does not exist succeeds (RFC 6886 §3.4)
    assert _pmp(await svc.handle(build_pmp_map_request(Proto.UDP, 40002, 0, 0), CLIENT))[0] == 0


async def test_pmp_delete_all_and_address() -> None:
    front = FakeFront()
    svc = PortMapService(front)
    for port in (40001, 40002):
        await svc.handle(build_pmp_map_request(Proto.TCP, port, port, 60), CLIENT)
    await svc.handle(build_pmp_map_request(Proto.UDP, 40003, 40003, 60), CLIENT)
    assert _pmp(await svc.handle(build_pmp_map_request(Proto.TCP, 0, 0, 0), CLIENT))[0] == 0
    assert [k for k in front.table] == [(40003, Proto.UDP)]
    reply = decode_pmp_reply(await svc.handle(build_pmp_address_request(), CLIENT) or b"")
    assert reply is not None and (reply.result, reply.external_ip, reply.epoch) == (0, EXT, 77)
    front.ext = None
    reply = decode_pmp_reply(await svc.handle(build_pmp_address_request(), CLIENT) or b"")
    assert reply is not None and reply.result == PmpResult.NETWORK_FAILURE


async def test_pmp_refusals_map_to_codes() -> None:
    svc = PortMapService(FakeFront())
    assert _pmp(await svc.handle(build_pmp_map_request(Proto.UDP, 50000, 50000, 60),
                                 CLIENT))[0] == PmpResult.NOT_AUTHORIZED
    assert svc.counters["refused"] == 1
    svc = PortMapService(FakeFront(ext=None))
    assert (await svc.handle(build_pmp_map_request(Proto.UDP, 40000, 40000, 60), CLIENT))


def _pcp(data: bytes | None) -> tuple[int, int, int, str, int]:
    reply = decode_pcp_reply(data or b"")
    assert reply is not None and reply.version == 2
    return (reply.result, reply.external_port or 0, reply.lifetime, reply.external_ip or "",
            reply.epoch or 0)


async def test_pcp_map_alternative_prefer_failure_and_nonce() -> None:
    front = FakeFront()
    svc = PortMapService(front)
    first = build_pcp_map(NONCE, Proto.UDP, 40000, 40000, 120, CLIENT)
    assert _pcp(await svc.handle(first, CLIENT)) == (0, 40000, 120, EXT, 77)
    # another host wanting the same external port: an alternative, or CANNOT_PROVIDE_EXTERNAL
    other = build_pcp_map(b"x" * 12, Proto.UDP, 40000, 40000, 120, OTHER)
    assert _pcp(await svc.handle(other, OTHER))[:2] == (0, 40001)
    fail = build_pcp_map(b"y" * 12, Proto.UDP, 40005, 40000, 120, OTHER, prefer_failure=True)
    assert _pcp(await svc.handle(fail, OTHER))[0] == PcpResult.CANNOT_PROVIDE_EXTERNAL
    # the mapping belongs to its nonce: another one may neither renew nor delete it
    thief = build_pcp_map(b"z" * 12, Proto.UDP, 40000, 0, 0, CLIENT)
    assert _pcp(await svc.handle(thief, CLIENT))[0] == PcpResult.NOT_AUTHORIZED
    assert (40000, Proto.UDP) in front.table
    # a suggested external address that cannot be given, with PREFER_FAILURE
    wrong = build_pcp_map(NONCE, Proto.UDP, 40000, 40000, 120, CLIENT, external_ip="1.2.3.4",
                          prefer_failure=True)
    assert _pcp(await svc.handle(wrong, CLIENT))[0] == PcpResult.CANNOT_PROVIDE_EXTERNAL
    # the owner deletes (lifetime 0) with its nonce
    done = _pcp(await svc.handle(build_pcp_map(NONCE, Proto.UDP, 40000, 0, 0, CLIENT), CLIENT))
    assert done[:3] == (0, 40000, 0)
    assert front.deletes[-1] == (FrontProtocol.PCP, CLIENT, 40000, Proto.UDP, NONCE)
    assert (40000, Proto.UDP) not in front.table


async def test_pcp_third_party_is_the_policy_s_call_and_announce() -> None:
    svc = PortMapService(FakeFront())
    req = build_pcp_map(NONCE, Proto.TCP, 40000, 40000, 60, CLIENT, third_party=OTHER)
    assert _pcp(await svc.handle(req, CLIENT))[0] == PcpResult.NOT_AUTHORIZED
    assert _pcp(await svc.handle(build_pcp_announce(CLIENT), CLIENT))[:3] == (0, 0, 0)
    denied = build_pcp_map(NONCE, Proto.TCP, 50000, 50000, 60, CLIENT)
    assert _pcp(await svc.handle(denied, CLIENT))[0] == PcpResult.NOT_AUTHORIZED


async def test_per_host_rate_and_retransmissions_are_bounded() -> None:
    front = FakeFront()
    front.delay = 0.05
    svc = PortMapService(front, rate=1000, burst=5, per_host=2)
    req = build_pmp_map_request(Proto.UDP, 40000, 40000, 60)
    answers = await asyncio.gather(*(svc.handle(req, CLIENT) for _ in range(3)))
    assert sum(a is not None for a in answers) == 1  # two retransmissions of one request
    assert svc.counters["duplicate"] == 2
    many = [build_pmp_map_request(Proto.UDP, 41000 + i, 0, 60) for i in range(4)]
    answers = await asyncio.gather(*(svc.handle(r, CLIENT) for r in many))
    assert sum(a is not None for a in answers) == 2 and svc.counters["busy"] == 2
    # past the burst the host is dropped; another host is not
    for i in range(5):
        await svc.handle(build_pmp_address_request() + bytes([i]), CLIENT)
    assert await svc.handle(build_pmp_address_request(), CLIENT) is None
    assert svc.counters["rate_limited"] >= 1
    assert await svc.handle(build_pmp_address_request(), OTHER) is not None


# --- over loopback -------------------------------------------------------------------------------


async def _exchange(server: PcpServer, payload: bytes, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind((CLIENT, 0))
        await loop.sock_sendto(sock, payload, server.bound[0])
        return await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
    finally:
        sock.close()


async def test_server_over_loopback() -> None:
    front = FakeFront()
    server = PcpServer(PortMapService(front), ["127.0.0.1"], port=0, announce_count=0)
    await server.start()
    try:
        assert _pmp(await _exchange(server, build_pmp_map_request(Proto.TCP, 40010, 40010,
                                                                  60))) == (0, 40010, 40010, 60)
        pcp = _pcp(await _exchange(server, build_pcp_map(NONCE, Proto.UDP, 40011, 40011, 60,
                                                         CLIENT)))
        assert pcp == (0, 40011, 60, EXT, 77)
        bad = _pcp(await _exchange(server, bytes([7, 1]) + bytes(58)))
        assert bad[0] == PcpResult.UNSUPP_VERSION
    finally:
        await server.close()
    assert not server.bound


async def test_announcements_reach_the_multicast_group_port() -> None:
    """start() sends the NAT-PMP address reply and the PCP ANNOUNCE response; here to a
    loopback listener standing in for 224.0.0.1:5350."""
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    server = PcpServer(PortMapService(FakeFront()), ["127.0.0.1"], port=0,
                       announce_group="127.0.0.1", announce_port=listener.getsockname()[1],
                       announce_count=2, announce_first=0.01)
    await server.start()
    try:
        got = [await asyncio.wait_for(loop.sock_recv(listener, 2048), 2.0) for _ in range(4)]
    finally:
        await server.close()
        listener.close()
    pmp = [decode_pmp_reply(g) for g in got if g[0] == 0]
    pcp = [decode_pcp_reply(g) for g in got if g[0] == 2]
    assert len(pmp) == 2 and len(pcp) == 2
    assert all(r is not None and r.external_ip == EXT and r.epoch == 77 for r in pmp)
    assert all(r is not None and r.opcode == 0 and r.result == 0 for r in pcp)


async def test_a_new_external_address_is_announced_again() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    front = FakeFront()
    server = PcpServer(PortMapService(front), ["127.0.0.1"], port=0,
                       announce_group="127.0.0.1", announce_port=listener.getsockname()[1],
                       announce_count=1, address_interval=0.02)
    await server.start()
    try:
        first = [await asyncio.wait_for(loop.sock_recv(listener, 2048), 2.0) for _ in range(2)]
        front.ext = "11.22.33.99"
        again = [await asyncio.wait_for(loop.sock_recv(listener, 2048), 2.0) for _ in range(2)]
    finally:
        await server.close()
        listener.close()
    ips = [decode_pmp_reply(d) for d in (*first, *again) if d[0] == 0]
    assert [r.external_ip for r in ips if r is not None] == [EXT, "11.22.33.99"]


async def test_bind_failure_names_the_address() -> None:
    server = PcpServer(PortMapService(FakeFront()), ["192.0.2.1"], port=0, announce_count=0)
    with pytest.raises(OSError, match=r"192\.0\.2\.1"):
        await server.start()


NATPMPC = shutil.which("natpmpc")


@pytest.mark.skipif(NATPMPC is None, reason="natpmpc (Debian package natpmpc) not installed")
async def test_natpmpc_against_the_server() -> None:
    """Debian's natpmpc (libnatpmp) always talks to port 5351: a loopback address of its own
    so nothing else on the machine is in the way."""
    addr = "127.51.0.1"
    front = FakeFront()
    server = PcpServer(PortMapService(front), [addr], announce_count=0)
    try:
        await server.start()
    except OSError as exc:
        if os.environ.get("IGDTRIGGER_REQUIRE_LAB") == "1":
            raise
        pytest.skip(f"cannot bind {addr}:5351: {exc}")

    async def natpmpc(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, [str(NATPMPC), "-g", addr, *args],
                                       capture_output=True, text=True, timeout=30)

    try:
        p = await natpmpc("-a", "40002", "40002", "udp", "60")
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"Public IP address : {EXT}" in p.stdout
        assert "Mapped public port 40002 protocol UDP to local port 40002" in p.stdout
        assert [(k, m.request.protocol) for k, m in front.table.items()] == \
            [((40002, Proto.UDP), FrontProtocol.NATPMP)]
        p = await natpmpc("-a", "40002", "40002", "udp", "0")
        assert p.returncode == 0, p.stdout + p.stderr
        assert not front.table
        p = await natpmpc("-a", "50000", "50000", "tcp", "60")
        assert p.returncode != 0 and not front.table
    finally:
        await server.close()

