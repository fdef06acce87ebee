"""NAT-PMP / PCP backends: codecs (incl. real miniupnpd captures and fuzzing), epoch checks, and
the datagram transport + gateways against a small fake server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.core.activation import description_for
from igdtrigger.core.errors import (
    ActionFailed,
    ConfigError,
    GatewayError,
    GatewayUnreachable,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
    TableFull,
)
from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.gateway.base import Gateway
from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway
from igdtrigger.gateway.natpmp.codec import (
    PCP_RESULTS,
    PMP_RESULTS,
    EpochTracker,
    MalformedReply,
    NetworkFailure,
    PcpOption,
    ProtocolUnsupported,
    build_pcp_announce,
    build_pcp_map,
    build_pmp_address_request,
    build_pmp_map_request,
    decode_ip16,
    decode_pcp_reply,
    decode_pmp_reply,
    encode_ip16,
    parse_pcp_reply,
    parse_pmp_reply,
    pcp_error,
    pmp_error,
)
from igdtrigger.gateway.natpmp.transport import DatagramClient
from igdtrigger.runtime.mapper import Mapper, MapState

LOCAL = "127.0.0.1"
NONCE = bytes(range(12))


def spec(port: int, proto: Proto = Proto.UDP, client: str = LOCAL,
         internal_port: int | None = None, desc: str = "test") -> MappingSpec:
    return MappingSpec(proto, port, client, port if internal_port is None else internal_port,
                       desc)


# =============================================================================================
# NAT-PMP codec
# =============================================================================================


def pmp_map_reply(op: int, result: int, epoch: int, iport: int, eport: int,
                  lifetime: int) -> bytes:
    return struct.pack("!BBHIHHI", 0, 128 + op, result, epoch, iport, eport, lifetime)


def test_pmp_requests_are_byte_exact() -> None:
    assert build_pmp_address_request() == b"\x00\x00"
    assert build_pmp_map_request(Proto.UDP, 40000, 40001, 7200) == bytes.fromhex(
        "0001 0000 9c40 9c41 00001c20")
    assert build_pmp_map_request(Proto.TCP, 80, 0, 0) == bytes.fromhex("0002 0000 0050 0000 "
                                                                       "00000000")
    with pytest.raises(ValueError, match="outside"):
        build_pmp_map_request(Proto.TCP, 70000, 0, 0)
    with pytest.raises(ValueError, match="lifetime"):
        build_pmp_map_request(Proto.TCP, 1, 0, -1)


def test_pmp_address_reply_round_trip() -> None:
    r = parse_pmp_reply(bytes.fromhex("0080000000002d9a0b162101"))  # miniupnpd 2.3.1 capture
    assert (r.opcode, r.result, r.epoch, r.external_ip) == (0, 0, 0x2D9A, "11.22.33.1")


@pytest.mark.parametrize("proto", list(Proto))
def test_pmp_map_reply_round_trip(proto: Proto) -> None:
    op = 1 if proto is Proto.UDP else 2
    r = parse_pmp_reply(pmp_map_reply(op, 0, 77, 40000, 40002, 3600))
    assert (r.opcode, r.result, r.epoch, r.internal_port, r.external_port, r.lifetime) == (
        op, 0, 77, 40000, 40002, 3600)
    # extra trailing bytes are ignored
    assert parse_pmp_reply(pmp_map_reply(op, 0, 77, 1, 2, 3) + b"junk").lifetime == 3


def test_miniupnpd_map_capture() -> None:
    r = parse_pmp_reply(bytes.fromhex("0081000000002d9a9c409c400000001e"))
    assert (r.internal_port, r.external_port, r.lifetime) == (40000, 40000, 30)


@pytest.mark.parametrize(("result", "cls", "words"), [
    (1, ProtocolUnsupported, "version 0"),
    (2, NotAuthorized, "permission"),
    (3, NetworkFailure, "double NAT"),
    (4, TableFull, "full"),
    (5, ProtocolUnsupported, "opcode"),
    (99, ActionFailed, "unknown"),
])
def test_every_pmp_result_code_has_an_error(result: int, cls: type[GatewayError],
                                            words: str) -> None:
    err = pmp_error("NAT-PMP map udp/1", result)
    assert type(err) is cls
    assert words in str(err)
    if isinstance(err, ActionFailed):
        assert err.code == result
    assert result in PMP_RESULTS or result == 99


def test_eight_byte_error_replies_parse() -> None:
    # miniupnpd: unsupported opcode 9 -> 8 bytes, result 5 (captured in the lab)
    r = parse_pmp_reply(bytes.fromhex("0089000500002d9b"))
    assert (r.opcode, r.result, r.epoch, r.external_port) == (9, 5, 0x2D9B, None)
    r = parse_pmp_reply(bytes.fromhex("0081000200001234"))  # refused, 8 bytes
    assert (r.opcode, r.result, r.internal_port) == (1, 2, None)


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\x00\x81\x00",  # too short
    bytes.fromhex("0081000000002d9a9c40"),  # FRITZ!Box-style short success
    bytes.fromhex("0080000000002d9a0b16"),  # short address reply
    bytes.fromhex("0001000000000000"),  # a request, not a reply
    bytes.fromhex("0187000000000000"),  # version 1
    bytes.fromhex("00ff0000000000000000000000000000"),  # success for unknown opcode
])
def test_bad_pmp_replies_raise_malformed(data: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_pmp_reply(data)


def test_pcp_server_answering_natpmp_means_unsupported() -> None:
    reply = bytes.fromhex("028000010000000000002d9b") + bytes(12)
    with pytest.raises(ProtocolUnsupported) as e:
        parse_pmp_reply(reply)
    assert e.value.server_version == 2


# =============================================================================================
# PCP codec
# =============================================================================================

# Captured from miniupnpd 2.3.1 in the lab (requests from 192.168.77.10, WAN 11.22.33.1).
PCP_MAP_OK = bytes.fromhex(
    "028100000000007800002d9b000000000000000000000000"
    "4eff16357d6c18169ccf3b54060000009c419c4100000000000000000000ffff0b162101")
PCP_THIRD_PARTY_OK = bytes.fromhex(
    "028100000000007800002d9c000000000000000000000000"
    "92fbad41a8aefe33f8d24212060000009c429c4200000000000000000000ffff0b162101"
    "0100001000000000000000000000ffffc0a84d0b")
PCP_ADDRESS_MISMATCH = bytes.fromhex(
    "0281000c0000000000002d9b000000000000000000000000"
    "4eff16357d6c18169ccf3b54060000009c419c4100000000000000000000ffff00000000")
PCP_ANNOUNCE_OK = bytes.fromhex("028000000000000000002d9b000000000000000000000000")


def test_pcp_map_request_layout() -> None:
    req = build_pcp_map(NONCE, Proto.TCP, 40001, 40002, 30, "192.168.77.10")
    assert len(req) == 60
    assert req[:8] == struct.pack("!BBHI", 2, 1, 0, 30)
    assert decode_ip16(req[8:24]) == "192.168.77.10"
    assert req[24:36] == NONCE
    assert req[36] == 6
    assert struct.unpack("!HH", req[40:44]) == (40001, 40002)
    assert decode_ip16(req[44:60]) == "0.0.0.0"
    tp = build_pcp_map(NONCE, Proto.UDP, 1, 1, 60, "192.168.77.10", third_party="192.168.77.11",
                       prefer_failure=True)
    assert tp[60:64] == bytes([PcpOption.THIRD_PARTY, 0, 0, 16])
    assert decode_ip16(tp[64:80]) == "192.168.77.11"
    assert tp[80:84] == bytes([PcpOption.PREFER_FAILURE, 0, 0, 0])
    assert len(tp) % 4 == 0
    with pytest.raises(ValueError, match="nonce"):
        build_pcp_map(b"short", Proto.UDP, 1, 1, 1, LOCAL)
    assert build_pcp_announce("192.168.77.10") == struct.pack("!BBHI", 2, 0, 0, 0) + encode_ip16(
        "192.168.77.10")


def test_pcp_reply_round_trip_from_miniupnpd() -> None:
    r = parse_pcp_reply(PCP_MAP_OK)
    assert (r.version, r.opcode, r.result, r.lifetime, r.epoch) == (2, 1, 0, 120, 0x2D9B)
    assert r.nonce == bytes.fromhex("4eff16357d6c18169ccf3b54")
    assert (r.protocol, r.internal_port, r.external_port, r.external_ip) == (
        6, 40001, 40001, "11.22.33.1")
    r = parse_pcp_reply(PCP_THIRD_PARTY_OK)
    tp = r.option(PcpOption.THIRD_PARTY)
    assert tp is not None
    assert decode_ip16(tp) == "192.168.77.11"
    r = parse_pcp_reply(PCP_ADDRESS_MISMATCH)
    assert (r.result, r.lifetime, r.result_text) == (12, 0, "ADDRESS_MISMATCH")
    r = parse_pcp_reply(PCP_ANNOUNCE_OK)
    assert (r.opcode, r.result, r.epoch) == (0, 0, 0x2D9B)


def test_ip16_round_trip() -> None:
    for addr in ("0.0.0.0", "192.168.1.2", "2001:db8::1", "::"):
        assert decode_ip16(encode_ip16(addr)) == addr
    assert decode_ip16(b"\x00") == ""


@pytest.mark.parametrize("data", [
    bytes.fromhex("0080000100002d9b"),  # TP-Link Archer A7 / miniupnpd: 8 bytes
    bytes.fromhex("0081000100002d9b00000000"),  # RFC 6887 §9: 12 bytes
])
def test_unsupported_version_replies(data: bytes) -> None:
    with pytest.raises(ProtocolUnsupported):
        parse_pcp_reply(data)


@pytest.mark.parametrize("data", [
    b"", b"\x02\x81",
    bytes.fromhex("0201000000000000"),  # a request (R bit clear)
    bytes.fromhex("02810000000000780000"),  # short success
    PCP_MAP_OK[:40],  # MAP success cut inside the payload
    bytes.fromhex("008000000000000000000000"),  # NAT-PMP address success: not PCP
])
def test_bad_pcp_replies_raise_malformed(data: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_pcp_reply(data)


def test_pcp_options_are_parsed_defensively() -> None:
    truncated = PCP_MAP_OK + bytes([1, 0, 0, 16]) + bytes(4)  # says 16, has 4
    assert parse_pcp_reply(truncated).options == ()
    many = PCP_MAP_OK + bytes([2, 0, 0, 0]) * 300
    assert len(parse_pcp_reply(many).options) <= 64
    padded = PCP_MAP_OK + bytes([9, 0, 0, 1, 7, 0, 0, 0]) + bytes([2, 0, 0, 0])
    assert parse_pcp_reply(padded).options == ((9, b"\x07"), (2, b""))


PCP_EXPECTED: dict[int, type[GatewayError]] = {
    1: ProtocolUnsupported, 2: NotAuthorized, 3: ActionFailed, 4: ProtocolUnsupported,
    5: ActionFailed, 6: ActionFailed, 7: NetworkFailure, 8: TableFull, 9: ActionFailed,
    10: TableFull, 11: MappingConflict, 12: NotAuthorized, 13: ActionFailed, 200: ActionFailed,
}


@pytest.mark.parametrize(("code", "cls"), sorted(PCP_EXPECTED.items()))
def test_every_pcp_result_code_has_an_error(code: int, cls: type[GatewayError]) -> None:
    err = pcp_error("PCP MAP udp/1", code, client_ip="192.168.77.10")
    assert type(err) is cls
    assert code in PCP_RESULTS or code == 200
    if isinstance(err, ActionFailed):
        assert err.code == code


def test_pcp_errors_are_actionable() -> None:
    tp = pcp_error("PCP MAP tcp/1", 5, third_party="192.168.77.11")
    assert isinstance(tp, NotAuthorized)
    assert "pcp_allow_thirdparty" in str(tp)
    mismatch = pcp_error("PCP MAP tcp/1", 12, client_ip="10.0.0.5")
    assert "10.0.0.5" in str(mismatch)
    assert "another NAT" in str(mismatch)
    assert "double NAT" in str(pcp_error("PCP MAP tcp/1", 7))


# --- fuzzing: the parsers never raise anything but our errors ---------------------------------

OUR_ERRORS = (MalformedReply, ProtocolUnsupported)


def _prefixed() -> st.SearchStrategy[bytes]:
    heads = st.sampled_from([b"", b"\x00\x80", b"\x00\x81", b"\x00\x82", b"\x02\x81", b"\x02\x80",
                             b"\x00\x81\x00\x00", b"\x02\x81\x00\x00", b"\x01\x81"])
    return st.tuples(heads, st.binary(max_size=1300)).map(lambda t: t[0] + t[1])


@settings(max_examples=400, deadline=None)
@given(_prefixed())
def test_fuzz_pmp_parser(data: bytes) -> None:
    decode_pmp_reply(data)  # never raises
    try:
        r = parse_pmp_reply(data)
    except OUR_ERRORS:
        return
    assert r.version == 0
    assert 0 <= r.result <= 0xFFFF


@settings(max_examples=400, deadline=None)
@given(_prefixed())
def test_fuzz_pcp_parser(data: bytes) -> None:
    decode_pcp_reply(data)
    try:
        r = parse_pcp_reply(data)
    except OUR_ERRORS:
        return
    assert r.version == 2
    assert len(r.options) <= 64


@settings(max_examples=300, deadline=None)
@given(_prefixed(), st.booleans())
def test_fuzz_reply_matchers(data: bytes, deleting: bool) -> None:
    pmp = NatPmpGateway._match_map("a", 1, 40000, deleting)
    pcp = PcpGateway._match_map("a", NONCE, Proto.TCP, 40000, deleting)
    for match in (pmp, pcp):
        with contextlib.suppress(GatewayError):
            match(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Proto)), st.integers(1, 65535), st.integers(0, 65535),
       st.integers(0, 2**32 - 1))
def test_pmp_request_reply_round_trip(proto: Proto, iport: int, eport: int, life: int) -> None:
    req = build_pmp_map_request(proto, iport, eport, life)
    _, op, _, i, e, lifetime = struct.unpack("!BBHHHI", req)
    r = parse_pmp_reply(pmp_map_reply(op, 0, 5, i, e, lifetime))
    assert (r.internal_port, r.external_port, r.lifetime) == (iport, eport, life)


# =============================================================================================
# epoch checks
# =============================================================================================


def test_natpmp_epoch_rule() -> None:
    t = EpochTracker("nat-pmp")
    assert not t.observe(1000, 0.0)  # first reply: just recorded
    assert not t.observe(1010, 10.0)
    assert not t.observe(1009, 10.5)  # slightly behind: within 2 s
    assert not t.observe(1100, 100.0)  # 7/8 of 89.5 s = 78 s expected at least
    assert t.observe(5, 101.0)  # rebooted
    assert not t.observe(6, 102.0)
    # A server whose clock stands still loses state by the RFC's definition.
    assert t.observe(6, 120.0)


def test_pcp_epoch_rule() -> None:
    t = EpochTracker("pcp")
    assert not t.observe(500, 0.0)
    assert not t.observe(499, 0.1)  # back by one second is tolerated
    assert t.observe(497, 0.2)  # back by more
    assert not t.observe(560, 60.0)  # consistent deltas
    assert t.observe(1560, 61.0)  # server jumped far ahead of client time
    assert t.observe(1561, 400.0)  # client time ran far ahead of the server's
    t.reset()
    assert not t.observe(0, 401.0)


# =============================================================================================
# fake server on 127.0.0.1
# =============================================================================================


class FakeRouter(asyncio.DatagramProtocol):
    """A small NAT-PMP + PCP server; knobs for loss, delay, epoch and bad replies."""

    def __init__(self, mode: str = "both") -> None:
        self.mode = mode  # "both", "pmp" (NAT-PMP only) or "pcp" (PCP only)
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: list[tuple[float, bytes]] = []
        self.drop = 0  # drop this many requests
        self.delay = 0.0
        self.t0 = time.monotonic()
        self.epoch_base = 5000
        self.external_ip = "11.22.33.1"
        self.allow_third_party = False
        self.min_lifetime = 0
        self.taken: set[tuple[int, int]] = set()  # (ipproto, port) held by someone else
        self.mappings: dict[tuple[int, int], tuple[int, int]] = {}  # (proto, iport) -> eport,life
        self.refuse: int | None = None  # result code for every map request
        self.override: Callable[[bytes], list[bytes]] | None = None
        self.outstanding = 0
        self.max_outstanding = 0
        # --- router-truth quirks (issue 11) --------------------------------------------------
        self.clock: Callable[[], float] = time.monotonic  # epoch time (share a fake clock)
        self.fixed_lifetime: int | None = None  # VPN gateways: 60 s whatever is asked
        self.own_ports = False  # VPN gateways: ignore the suggested port, pick one per mapping
        self.delete_by_internal_port = False  # miniupnp#186: PCP delete looks up the newest
        # entry by internal port only and refuses (NOT_AUTHORIZED) when its nonce differs
        self.nonces: dict[tuple[int, int], bytes] = {}
        # RFC 6887 §11.3 and miniupnpd's IPv6 firewall mode (pcpserver.c CreatePCPMap_FW): a MAP
        # for an existing mapping with another nonce is refused (2.3.1's NAT44 replaces it)
        self.refresh_needs_nonce = False
        self.created: dict[tuple[int, int], int] = {}
        self.refused_deletes = 0
        self._rng = random.Random(7)
        self._seq = itertools.count(1)

    def epoch(self) -> int:
        return self.epoch_base + int(self.clock() - self.t0)

    def grant(self, proto: int, iport: int, eport: int, life: int) -> tuple[int, int]:
        """(external port, lifetime) for a map request, with the quirks."""
        if self.own_ports:
            got = self.mappings.get((proto, iport), (0, 0))[0] or self._rng.randint(20000, 60000)
        else:
            got = self.assign(proto, eport or iport)
        self.mappings[(proto, iport)] = (got, life)
        self.created.setdefault((proto, iport), next(self._seq))
        return got, self.fixed_lifetime or max(life, self.min_lifetime)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.requests.append((time.monotonic(), data))
        if self.drop > 0:
            self.drop -= 1
            return
        replies = self.override(data) if self.override else [r for r in [self.answer(data)] if r]
        for reply in replies:
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            asyncio.get_running_loop().call_later(self.delay, self._send, reply, addr)

    def _send(self, reply: bytes, addr: tuple[str, int]) -> None:
        self.outstanding -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def assign(self, proto: int, port: int) -> int:
        while (proto, port) in self.taken:
            port += 1
        return port

    def answer(self, data: bytes) -> bytes | None:
        if len(data) < 2:
            return None
        if data[0] == 0:
            if self.mode == "pcp":
                return struct.pack("!BBBB", 2, data[1] | 0x80, 0, 1) + struct.pack(
                    "!II", 0, self.epoch()) + bytes(12)
            return self.answer_pmp(data)
        if self.mode == "pmp":
            return struct.pack("!BBHI", 0, data[1] | 0x80, 1, self.epoch())  # 8 bytes
        return self.answer_pcp(data)

    def answer_pmp(self, data: bytes) -> bytes | None:
        op = data[1]
        if op == 0:
            return struct.pack("!BBHI", 0, 128, 0, self.epoch()) + socket.inet_aton(
                self.external_ip)
        if op not in (1, 2) or len(data) < 12:
            return struct.pack("!BBHI", 0, 128 + op, 5, self.epoch())
        _, _, _, iport, eport, life = struct.unpack("!BBHHHI", data[:12])
        proto = 17 if op == 1 else 6
        if self.refuse is not None:
            return struct.pack("!BBHI", 0, 128 + op, self.refuse, self.epoch())
        if life == 0:
            self.mappings.pop((proto, iport), None)
            self.created.pop((proto, iport), None)
            self.nonces.pop((proto, iport), None)
            return pmp_map_reply(op, 0, self.epoch(), iport, 0, 0)
        got, granted = self.grant(proto, iport, eport, life)
        return pmp_map_reply(op, 0, self.epoch(), iport, got, granted)

    def answer_pcp(self, data: bytes) -> bytes | None:
        if len(data) < 24:
            return None
        op, life = data[1], struct.unpack("!I", data[4:8])[0]
        result = 0
        body = bytearray(data)
        if decode_ip16(data[8:24]) != LOCAL:
            result = 12
        if op == 1 and len(data) >= 60:
            proto, iport, eport = data[36], *struct.unpack("!HH", data[40:44])
            opts = decode_pcp_reply(bytes([2, 0x81]) + data[2:])
            third = opts.option(PcpOption.THIRD_PARTY) if opts else None
            if result == 0 and third is not None and not self.allow_third_party:
                result = 5
            if result == 0 and self.refuse is not None:
                result = self.refuse
            if result == 0:
                if life == 0:
                    key = (proto, iport)
                    if self.delete_by_internal_port:
                        same = sorted((k for k in self.mappings if k[1] == iport),
                                      key=lambda k: -self.created.get(k, 0))
                        if same and self.nonces.get(same[0]) != bytes(data[24:36]):
                            result = 2
                            self.refused_deletes += 1
                    if result == 0 and key not in self.mappings:
                        result = 8  # like miniupnpd
                    if result == 0 and key in self.nonces \
                            and self.nonces[key] != bytes(data[24:36]):
                        result = 2  # miniupnpd 2.3.1: "nonce does not match"
                        self.refused_deletes += 1
                    if result == 0:
                        self.mappings.pop(key, None)
                        self.created.pop(key, None)
                        self.nonces.pop(key, None)
                elif self.refresh_needs_nonce and self.nonces.get(
                        (proto, iport), bytes(data[24:36])) != bytes(data[24:36]):
                    result = 2
                else:
                    got, life = self.grant(proto, iport, eport, life)
                    self.nonces[(proto, iport)] = bytes(data[24:36])
                    body[42:44] = struct.pack("!H", got)
                    body[44:60] = encode_ip16(self.external_ip)
        if result:
            life = 0
        body[1] = op | 0x80
        body[2], body[3] = 0, result
        body[4:24] = struct.pack("!II", life, self.epoch()) + bytes(12)
        return bytes(body)


Factory = Callable[..., Any]


@pytest.fixture
async def gateways(router: FakeRouter) -> AsyncIterator[Factory]:
    made: list[NatPmpGateway | PcpGateway] = []

    def make(cls: type[NatPmpGateway] | type[PcpGateway] = NatPmpGateway,
             **kw: Any) -> Any:
        kw.setdefault("port", router.port)
        kw.setdefault("initial_timeout", 0.05)
        kw.setdefault("total_timeout", 0.4)
        gw = cls(LOCAL, **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


# =============================================================================================
# transport
# =============================================================================================


async def test_retries_back_off_doubling(router: FakeRouter) -> None:
    router.drop = 3
    client = DatagramClient(LOCAL, router.port, initial_timeout=0.05, total_timeout=2.0)
    try:
        reply = await client.request("probe", b"\x00\x00", lambda d: d if d[1] == 128 else None)
    finally:
        client.close()
    assert reply[1] == 128
    times = [t for t, _ in router.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 4
    for gap, expect in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert expect * 0.8 <= gap <= expect + 0.08, gaps


async def test_no_answer_is_unreachable_within_the_bound(router: FakeRouter) -> None:
    router.drop = 100
    client = DatagramClient(LOCAL, router.port, initial_timeout=0.05, total_timeout=0.4)
    t0 = time.monotonic()
    with pytest.raises(GatewayUnreachable, match="no answer to probe"):
        await client.request("probe", b"\x00\x00", lambda d: d)
    client.close()
    assert 0.38 <= time.monotonic() - t0 < 0.6
    assert len(router.requests) == 4  # 0, .05, .15, .35


async def test_port_unreachable_fails_fast() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        port = s.getsockname()[1]
    client = DatagramClient(LOCAL, port, initial_timeout=0.05, total_timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(GatewayUnreachable, match="not enabled"):
        await client.request("probe", b"\x00\x00", lambda d: d)
    client.close()
    assert time.monotonic() - t0 < 1.0


async def test_reply_from_wrong_source_is_ignored(router: FakeRouter) -> None:
    impostor = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    impostor.bind((LOCAL, 0))

    def answer(data: bytes) -> list[bytes]:
        return []

    router.override = answer
    client = DatagramClient(LOCAL, router.port, initial_timeout=0.05, total_timeout=1.0)
    await client.open()
    task = asyncio.create_task(client.request("probe", b"\x00\x00",
                                              lambda d: d if d[:2] == b"\x00\x80" else None))
    await asyncio.sleep(0.02)
    fake = struct.pack("!BBHI", 0, 128, 0, 1) + socket.inet_aton("6.6.6.6")
    impostor.sendto(fake, (LOCAL, client.local_port))
    await asyncio.sleep(0.05)
    assert not task.done()  # the kernel (connected socket) dropped it
    real = struct.pack("!BBHI", 0, 128, 0, 1) + socket.inet_aton("11.22.33.1")
    assert router.transport is not None
    router.transport.sendto(real, (LOCAL, client.local_port))
    assert await task == real
    impostor.close()
    # and our own check, for unconnected paths
    client._received(fake, ("10.9.9.9", router.port))
    client._received(fake, (LOCAL, router.port + 1))
    assert client.ignored >= 2
    client.close()


async def test_unmatched_replies_are_ignored_and_counted(router: FakeRouter) -> None:
    def answer(data: bytes) -> list[bytes]:
        return [b"\x07", pmp_map_reply(1, 0, 1, 999, 999, 60),
                pmp_map_reply(1, 0, 1, 40000, 40000, 60)]

    router.override = answer
    client = DatagramClient(LOCAL, router.port, initial_timeout=0.2, total_timeout=1.0)
    match = NatPmpGateway._match_map("a", 1, 40000, False)
    reply = await client.request("a", build_pmp_map_request(Proto.UDP, 40000, 40000, 60), match)
    client.close()
    assert reply.internal_port == 40000
    assert client.ignored == 2


# =============================================================================================
# NAT-PMP gateway
# =============================================================================================


async def test_natpmp_connect_add_get_list_delete(gateways: Factory, router: FakeRouter) -> None:
    gw: NatPmpGateway = gateways()
    assert isinstance(gw, Gateway)
    assert gw.info is None
    info = await gw.connect()
    assert (info.protocol, info.location, info.local_address, info.external_address) == (
        "nat-pmp", f"{LOCAL}:{router.port}", LOCAL, "11.22.33.1")
    assert await gw.connect() is info  # cheap when connected
    granted = await gw.add(spec(40000), 600)
    assert granted.external_port == 40000
    assert granted.lease == 600
    got = await gw.get(Proto.UDP, 40000)
    assert got is not None
    assert (got.internal_client, got.internal_port, got.description) == (LOCAL, 40000, "test")
    assert got.lease_remaining is not None
    assert 599 <= got.lease_remaining <= 600
    assert [m.key for m in await gw.list()] == [MappingKey(Proto.UDP, 40000)]
    assert await gw.get(Proto.TCP, 40000) is None
    await gw.delete(Proto.UDP, 40000)
    last = router.requests[-1][1]
    assert last == build_pmp_map_request(Proto.UDP, 40000, 0, 0)  # suggested port 0, lifetime 0
    assert await gw.list() == []
    with pytest.raises(NoSuchMapping):
        await gw.delete(Proto.UDP, 40000)


async def test_lease_zero_is_sent_as_a_long_lifetime(gateways: Factory,
                                                     router: FakeRouter) -> None:
    gw: NatPmpGateway = gateways(permanent_lifetime=3600)
    granted = await gw.add(spec(40000, Proto.TCP), 0)
    assert granted.lease == 3600
    assert struct.unpack("!I", router.requests[-1][1][8:12])[0] == 3600
    with pytest.raises(ConfigError):
        NatPmpGateway(LOCAL, permanent_lifetime=0)


async def test_granted_lifetime_is_reported(gateways: Factory, router: FakeRouter) -> None:
    router.min_lifetime = 120
    gw: NatPmpGateway = gateways()
    assert (await gw.add(spec(40000), 30)).lease == 120


async def test_natpmp_cannot_map_for_another_host(gateways: Factory, router: FakeRouter) -> None:
    gw: NatPmpGateway = gateways()
    await gw.connect()
    sent = len(router.requests)
    with pytest.raises(NotAuthorized, match="only map ports to the host that asks"):
        await gw.add(spec(40000, client="192.168.1.50"), 60)
    assert len(router.requests) == sent


@pytest.mark.parametrize(("code", "cls"), [(2, NotAuthorized), (3, NetworkFailure),
                                           (4, ActionFailed), (5, ProtocolUnsupported)])
async def test_natpmp_result_codes_raise(gateways: Factory, router: FakeRouter, code: int,
                                         cls: type[GatewayError]) -> None:
    gw: NatPmpGateway = gateways()
    await gw.connect()
    router.refuse = code
    with pytest.raises(cls):
        await gw.add(spec(40000), 60)
    assert await gw.list() == []


async def test_natpmp_taken_port_is_a_conflict_and_undone(gateways: Factory,
                                                           router: FakeRouter) -> None:
    router.taken.add((17, 40000))
    gw: NatPmpGateway = gateways()
    with pytest.raises(MappingConflict, match="offered 40001"):
        await gw.add(spec(40000), 60)
    assert router.mappings == {}  # the mapping on 40001 was deleted again
    assert await gw.list() == []
    loose: NatPmpGateway = gateways(exact_port=False)
    assert (await loose.add(spec(40000), 60)).external_port == 40001
    assert await loose.get(Proto.UDP, 40001) is not None


async def test_truncated_port_bug_is_detected(gateways: Factory, router: FakeRouter) -> None:
    def answer(data: bytes) -> list[bytes]:
        if data[1] == 0:
            return [router.answer(data) or b""]
        iport = struct.unpack("!H", data[4:6])[0]
        return [pmp_map_reply(1, 0, router.epoch(), iport & 0xFF, iport & 0xFF, 60)]

    router.override = answer
    gw: NatPmpGateway = gateways()
    with pytest.raises(MalformedReply, match="8 bits"):
        await gw.add(spec(22002), 60)


async def test_short_success_reply_is_malformed(gateways: Factory, router: FakeRouter) -> None:
    def answer(data: bytes) -> list[bytes]:
        if data[1] == 0:
            return [router.answer(data) or b""]
        return [pmp_map_reply(1, 0, router.epoch(), 40000, 40000, 60)[:12]]

    router.override = answer
    gw: NatPmpGateway = gateways()
    with pytest.raises(MalformedReply, match="short"):
        await gw.add(spec(40000), 60)


async def test_natpmp_against_pcp_only_router(gateways: Factory, router: FakeRouter) -> None:
    router.mode = "pcp"
    gw: NatPmpGateway = gateways()
    with pytest.raises(ProtocolUnsupported, match="use PCP"):
        await gw.connect()


async def test_unreachable_gateway_forces_a_new_probe(gateways: Factory,
                                                      router: FakeRouter) -> None:
    gw: NatPmpGateway = gateways()
    await gw.connect()
    router.drop = 100
    with pytest.raises(GatewayUnreachable):
        await gw.add(spec(40000), 60)
    assert gw.info is None
    router.drop = 0
    assert (await gw.connect()).external_address == "11.22.33.1"


async def test_epoch_reset_fires_callback_and_empties_table(gateways: Factory,
                                                            router: FakeRouter) -> None:
    reasons: list[str] = []
    gw: NatPmpGateway = gateways(on_lost_state=reasons.append)
    await gw.add(spec(40000), 600)
    await gw.add(spec(40001), 600)
    assert gw.epoch_resets == 0
    router.epoch_base = 0  # the router rebooted
    router.mappings.clear()
    await gw.add(spec(40002), 600)
    assert gw.epoch_resets == 1
    assert gw.lost_state
    assert len(reasons) == 1
    assert "epoch went from 500" in reasons[0]
    # what was held before is no longer reported (the mapper re-applies it), the new one is
    assert [m.external_port for m in await gw.list()] == [40002]
    # ... but can still be deleted (the router may hold it after all)
    await gw.delete(Proto.UDP, 40000)
    await gw.add(spec(40003), 600)
    assert gw.epoch_resets == 1


async def test_pipelined_adds_are_in_flight_together(gateways: Factory,
                                                     router: FakeRouter) -> None:
    router.delay = 0.1
    gw: NatPmpGateway = gateways(total_timeout=3.0, initial_timeout=1.0, max_in_flight=200)
    await gw.connect()
    t0 = time.monotonic()
    granted = await asyncio.gather(*(gw.add(spec(41000 + i, proto), 60)
                                     for i in range(50) for proto in Proto))
    elapsed = time.monotonic() - t0
    assert [g.external_port for g in granted] == [41000 + i for i in range(50) for _ in Proto]
    assert elapsed < 1.0  # sequentially this would take 100 x 0.1 s
    assert router.max_outstanding > 50
    assert len(await gw.list()) == 100


async def test_in_flight_limit(gateways: Factory, router: FakeRouter) -> None:
    router.delay = 0.05
    gw: NatPmpGateway = gateways(max_in_flight=4, total_timeout=3.0, initial_timeout=1.0)
    await asyncio.gather(*(gw.add(spec(41000 + i), 60) for i in range(20)))
    assert router.max_outstanding <= 4


async def test_same_internal_port_is_serialised(gateways: Factory, router: FakeRouter) -> None:
    router.delay = 0.05
    gw: NatPmpGateway = gateways(total_timeout=3.0, initial_timeout=1.0)
    await asyncio.gather(*(gw.add(spec(41000), 60) for _ in range(5)))
    assert router.max_outstanding == 1


async def test_on_call_metrics(gateways: Factory, router: FakeRouter) -> None:
    calls: list[tuple[str, bool]] = []
    gw: NatPmpGateway = gateways(on_call=lambda a, s, ok: calls.append((a, ok)))
    await gw.add(spec(40000), 60)
    router.refuse = 2
    with pytest.raises(NotAuthorized):
        await gw.add(spec(40001), 60)
    assert calls == [("connect", True), ("NAT-PMP map udp/40000", True),
                     ("NAT-PMP map udp/40001", False)]


async def test_expired_entries_disappear(gateways: Factory, router: FakeRouter) -> None:
    now = [100.0]
    gw: NatPmpGateway = gateways(clock=lambda: now[0])
    await gw.add(spec(40000), 60)
    now[0] += 59.5
    got = await gw.get(Proto.UDP, 40000)
    assert got is not None
    assert got.lease_remaining == 1
    now[0] += 1
    assert await gw.get(Proto.UDP, 40000) is None
    assert await gw.list() == []


async def test_announcement_listener(gateways: Factory, router: FakeRouter) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        aport = s.getsockname()[1]
    reasons: list[str] = []
    gw: NatPmpGateway = gateways(listen_announcements=True, announce_group=LOCAL,
                                 announce_port=aport, on_lost_state=reasons.append)
    await gw.add(spec(40000), 600)
    assert router.transport is not None
    # a stranger's announcement is ignored ...
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.2", 0))
        other.sendto(PCP_ANNOUNCE_OK, (LOCAL, aport))
    await asyncio.sleep(0.05)
    assert gw.announcements == 0
    # ... the router's is not: the epoch is fine, but it announced a restart
    ann = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, router.epoch()) + bytes(12)
    router.transport.sendto(ann, (LOCAL, aport))
    await asyncio.sleep(0.05)
    assert gw.announcements == 1
    assert gw.epoch_resets == 0
    assert len(reasons) == 1
    assert "announced" in reasons[0]
    assert await gw.list() == []
    # the RFC's repeats of the same announcement (gaps 0.25 s, 0.5 s, ...) re-apply nothing
    await gw.add(spec(40000), 600)
    router.transport.sendto(ann, (LOCAL, aport))
    await asyncio.sleep(0.05)
    assert gw.announcements == 2
    assert len(reasons) == 1
    assert len(await gw.list()) == 1
    # a NAT-PMP address announcement with a reset epoch, and a new address
    router.transport.sendto(struct.pack("!BBHI", 0, 128, 0, 1) + socket.inet_aton("11.22.33.9"),
                            (LOCAL, aport))
    await asyncio.sleep(0.05)
    assert gw.epoch_resets == 1
    assert len(reasons) == 2
    assert gw.info is not None
    assert gw.info.external_address == "11.22.33.9"


async def test_mapper_drives_natpmp(gateways: Factory, router: FakeRouter) -> None:
    gw: NatPmpGateway = gateways()
    now = [0.0]
    mapper = Mapper(gw, clock=lambda: now[0], tag="t1", lease=600)
    s = MappingSpec(Proto.UDP, 40000, LOCAL, 40000, description_for("game", "t1"))
    await mapper.reconcile({s.key: s})
    assert mapper.applied[s.key].state is MapState.ACTIVE
    assert (17, 40000) in router.mappings
    await mapper.reconcile({})
    assert router.mappings == {}
    assert await gw.list() == []


# =============================================================================================
# PCP gateway
# =============================================================================================


async def test_pcp_connect_add_refresh_delete(gateways: Factory, router: FakeRouter) -> None:
    router.min_lifetime = 120
    gw: PcpGateway = gateways(PcpGateway)
    info = await gw.connect()
    assert (info.protocol, info.local_address, info.external_address) == (
        "pcp", LOCAL, "11.22.33.1")
    assert router.requests[0][1] == build_pcp_announce(LOCAL)
    granted = await gw.add(spec(40001, Proto.TCP), 30)
    assert (granted.external_port, granted.lease) == (40001, 120)
    first = parse_pcp_request(router.requests[-1][1])
    await gw.add(spec(40001, Proto.TCP), 30)  # refresh: same nonce
    second = parse_pcp_request(router.requests[-1][1])
    assert first["nonce"] == second["nonce"]
    await gw.delete(Proto.TCP, 40001)
    deleted = parse_pcp_request(router.requests[-1][1])
    assert (deleted["nonce"], deleted["lifetime"]) == (first["nonce"], 0)
    assert router.mappings == {}
    with pytest.raises(NoSuchMapping):
        await gw.delete(Proto.TCP, 40001)


def parse_pcp_request(data: bytes) -> dict[str, Any]:
    return {"lifetime": struct.unpack("!I", data[4:8])[0], "client": decode_ip16(data[8:24]),
            "nonce": data[24:36], "options": decode_pcp_reply(bytes([2, 0x81]) + data[2:])}


async def test_pcp_third_party(gateways: Factory, router: FakeRouter) -> None:
    gw: PcpGateway = gateways(PcpGateway)
    with pytest.raises(NotAuthorized, match="pcp_allow_thirdparty"):
        await gw.add(spec(40002, Proto.TCP, client="192.168.77.11"), 60)
    req = parse_pcp_request(router.requests[-1][1])
    assert req["client"] == LOCAL
    tp = req["options"].option(PcpOption.THIRD_PARTY)
    assert decode_ip16(tp) == "192.168.77.11"
    router.allow_third_party = True
    assert (await gw.add(spec(40002, Proto.TCP, client="192.168.77.11"), 60)).lease == 60
    got = await gw.get(Proto.TCP, 40002)
    assert got is not None
    assert got.internal_client == "192.168.77.11"
    await gw.delete(Proto.TCP, 40002)


async def test_pcp_address_mismatch(gateways: Factory, router: FakeRouter) -> None:
    gw: PcpGateway = gateways(PcpGateway, client_ip="10.1.2.3")
    with pytest.raises(NotAuthorized, match="another NAT"):
        await gw.connect()


async def test_pcp_against_natpmp_only_router_falls_back(gateways: Factory,
                                                         router: FakeRouter) -> None:
    router.mode = "pmp"
    gw: PcpGateway = gateways(PcpGateway)
    with pytest.raises(ProtocolUnsupported, match="use NAT-PMP"):
        await gw.connect()
    pmp: NatPmpGateway = gateways()
    assert (await pmp.connect()).protocol == "nat-pmp"


async def test_pcp_only_router_has_no_address_probe(gateways: Factory,
                                                    router: FakeRouter) -> None:
    router.mode = "pcp"
    gw: PcpGateway = gateways(PcpGateway)
    info = await gw.connect()
    assert info.external_address == ""
    await gw.add(spec(40000), 60)
    assert gw.info is not None
    assert gw.info.external_address == "11.22.33.1"  # learned from the MAP reply


async def test_pcp_conflict_is_undone(gateways: Factory, router: FakeRouter) -> None:
    router.taken.add((6, 40000))
    gw: PcpGateway = gateways(PcpGateway)
    with pytest.raises(MappingConflict):
        await gw.add(spec(40000, Proto.TCP), 60)
    assert router.mappings == {}


async def test_pcp_ignores_replies_for_other_nonces(gateways: Factory,
                                                    router: FakeRouter) -> None:
    def answer(data: bytes) -> list[bytes]:
        good = router.answer(data)
        assert good is not None
        if data[1] != 1:
            return [good]
        wrong = bytearray(good)
        wrong[24] ^= 0xFF  # another nonce
        wrong[42:44] = b"\x00\x01"
        return [bytes(wrong), good]

    router.override = answer
    gw: PcpGateway = gateways(PcpGateway)
    assert (await gw.add(spec(40000), 60)).external_port == 40000


@pytest.mark.parametrize(("code", "cls"), [(2, NotAuthorized), (7, NetworkFailure),
                                           (8, ActionFailed), (11, MappingConflict)])
async def test_pcp_result_codes_raise(gateways: Factory, router: FakeRouter, code: int,
                                      cls: type[GatewayError]) -> None:
    gw: PcpGateway = gateways(PcpGateway)
    await gw.connect()
    router.refuse = code
    with pytest.raises(cls):
        await gw.add(spec(40000), 60)


async def test_pcp_epoch_reset(gateways: Factory, router: FakeRouter) -> None:
    reasons: list[str] = []
    gw: PcpGateway = gateways(PcpGateway, on_lost_state=reasons.append)
    await gw.add(spec(40000), 600)
    router.epoch_base = 3
    router.mappings.clear()
    await gw.add(spec(40001), 600)
    assert gw.epoch_resets == 1
    assert reasons
    assert [m.external_port for m in await gw.list()] == [40001]
    # the lost mapping is re-applied with its old nonce; the router accepts it
    await gw.add(spec(40000), 600)
    assert {m.external_port for m in await gw.list()} == {40000, 40001}


async def test_pcp_pipelined(gateways: Factory, router: FakeRouter) -> None:
    router.delay = 0.1
    gw: PcpGateway = gateways(PcpGateway, total_timeout=3.0, initial_timeout=1.0,
                              max_in_flight=200)
    await gw.connect()
    t0 = time.monotonic()
    await asyncio.gather(*(gw.add(spec(42000 + i, proto), 60)
                           for i in range(50) for proto in Proto))
    assert time.monotonic() - t0 < 1.0
    assert len(await gw.list()) == 100
    await asyncio.gather(*(gw.delete(proto, 42000 + i) for i in range(50) for proto in Proto))
    assert router.mappings == {}


def test_late_duplicates_of_the_other_operation_are_not_taken() -> None:
    add_reply = pmp_map_reply(1, 0, 9, 40000, 40000, 600)
    del_reply = pmp_map_reply(1, 0, 9, 40000, 0, 0)
    deleting = NatPmpGateway._match_map("d", 1, 40000, True)
    adding = NatPmpGateway._match_map("a", 1, 40000, False)
    assert deleting(add_reply) is None
    assert deleting(del_reply) is not None
    assert adding(del_reply) is None
    assert adding(add_reply) is not None
    assert adding(pmp_map_reply(2, 0, 9, 40000, 40000, 600)) is None  # TCP reply, UDP request
    ok = bytearray(PCP_MAP_OK)
    nonce, iport = bytes(ok[24:36]), 40001
    pcp_add = PcpGateway._match_map("a", nonce, Proto.TCP, iport, False)
    pcp_del = PcpGateway._match_map("d", nonce, Proto.TCP, iport, True)
    assert pcp_add(bytes(ok)) is not None
    assert pcp_del(bytes(ok)) is None
    assert PcpGateway._match_map("a", nonce, Proto.UDP, iport, False)(bytes(ok)) is None
    assert PcpGateway._match_map("a", NONCE, Proto.TCP, iport, False)(bytes(ok)) is None


async def test_pcp_nonce_from_a_key_is_the_same_in_the_next_run(gateways: Factory,
                                                               router: FakeRouter) -> None:
    """With the journal's key, a later run (a new gateway) maps and deletes with the nonce
    the first one used; without a key nonces are random."""
    first = gateways(PcpGateway, nonce_key=b"k" * 16)
    await first.add(spec(40001, Proto.TCP), 30)
    made = router.nonces[(6, 40001)]
    assert made == first.mapping_nonce(spec(40001, Proto.TCP)) != first.mapping_nonce(
        spec(40001, Proto.UDP))
    await first.close()
    later = gateways(PcpGateway, nonce_key=b"k" * 16)
    await later.connect()
    with pytest.raises(NoSuchMapping):  # not ours in this run, not adopted: nothing asked
        await later.delete(Proto.TCP, 40001)
    assert later.adopt(spec(40001, Proto.TCP), later.mapping_nonce(spec(40001, Proto.TCP)))
    await later.delete(Proto.TCP, 40001)
    assert (6, 40001) not in router.mappings and router.refused_deletes == 0
    keyless = gateways(PcpGateway)
    assert keyless.mapping_nonce(spec(40001, Proto.TCP)) == b""
    assert not keyless.adopt(spec(40002, Proto.TCP))  # no nonce: PCP cannot delete it


async def test_pcp_delete_with_another_nonce_is_refused_like_miniupnpd(
        gateways: Factory, router: FakeRouter) -> None:
    await gateways(PcpGateway, nonce_key=b"a" * 16).add(spec(40001, Proto.TCP), 30)
    other = gateways(PcpGateway, nonce_key=b"b" * 16)
    await other.connect()
    assert other.adopt(spec(40001, Proto.TCP), other.mapping_nonce(spec(40001, Proto.TCP)))
    with pytest.raises(NotAuthorized):
        await other.delete(Proto.TCP, 40001)
    assert (6, 40001) in router.mappings
