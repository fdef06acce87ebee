"""Tests of the conntrack detector: the ctnetlink parser, the run loop, and the real kernel.

The parser tests build messages with the tiny encoder below and also use datagrams captured from
a real kernel. The ``lab`` tests need root and ``ip netns``: they run the detector inside a
throwaway network namespace and send traffic that never leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import random
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import Flow, IPAddress, Proto
from igdtrigger.detect.base import Observation
from igdtrigger.detect.conntrack import ConntrackDetector
from igdtrigger.detect.ctnetlink import NF_NETLINK_CONNTRACK_NEW, ConntrackParser, parse_messages

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
REPO = Path(__file__).resolve().parent.parent

# --- a tiny ctnetlink encoder ------------------------------------------------------------------

NLA_F_NESTED = 0x8000
CT_NEW = 0x0100  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
CT_DELETE = 0x0102
NLM_F_CREATE_EXCL = 0x0600  # what the kernel sets on NEW events


def nla(atype: int, payload: bytes = b"", *, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    flag = NLA_F_NESTED if nested else 0
    return struct.pack("=HH", length, atype | flag) + payload + bytes(-length % 4)


def nlmsg(mtype: int, body: bytes, *, flags: int = NLM_F_CREATE_EXCL, seq: int = 0) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, mtype, flags, seq, 0) + body + bytes(-length % 4)


def encode_tuple(
    proto_num: int,
    src: IPAddress,
    dst: IPAddress,
    sport: int,
    dport: int,
    *,
    nested: bool = True,
    reverse_ip: bool = False,
    reverse_ports: bool = False,
    zone: bool = False,
) -> bytes:
    """The payload of a CTA_TUPLE_ORIG/REPLY attribute."""
    base = 1 if src.version == 4 else 3
    ips = [nla(base, src.packed), nla(base + 1, dst.packed)]
    ports = [nla(2, struct.pack("!H", sport)), nla(3, struct.pack("!H", dport))]
    if reverse_ip:
        ips.reverse()
    if reverse_ports:
        ports.reverse()
    inner = nla(1, b"".join(ips), nested=nested)
    inner += nla(2, nla(1, bytes([proto_num])) + b"".join(ports), nested=nested)
    if zone:
        inner += nla(3, struct.pack("!H", 7))  # CTA_TUPLE_ZONE
    return inner


def encode_new(
    proto_num: int,
    src: IPAddress,
    dst: IPAddress,
    sport: int,
    dport: int,
    *,
    nested: bool = True,
    reply: bool = True,
    leading_attr: bool = False,
    **tuple_opts: bool,
) -> bytes:
    """A whole IPCTNL_MSG_CT_NEW message, laid out as the kernel does unless told otherwise."""
    family = 2 if src.version == 4 else 10
    attrs = b""
    if leading_attr:
        attrs += nla(3, struct.pack("!I", 8))  # CTA_STATUS before the tuple
    orig = encode_tuple(proto_num, src, dst, sport, dport, nested=nested, **tuple_opts)
    attrs += nla(1, orig, nested=nested)
    if reply:
        back = encode_tuple(proto_num, dst, src, dport, sport, nested=nested)
        attrs += nla(2, back, nested=nested)
    attrs += nla(12, struct.pack("!I", 0x1234)) + nla(3, struct.pack("!I", 8))  # CTA_ID, STATUS
    return nlmsg(CT_NEW, struct.pack("!BBH", family, 0, 0) + attrs)


def encode_flow(flow: Flow, **opts: bool) -> bytes:
    return encode_new(flow.proto.number, flow.src, flow.dst, flow.sport, flow.dport, **opts)


def udp4(sport: int = 40000, dport: int = 27015) -> Flow:
    return Flow(Proto.UDP, IPv4("192.168.1.23"), IPv4("203.0.113.9"), sport, dport)


# --- real datagrams ----------------------------------------------------------------------------
# Captured once from the kernel (Linux 6.18, x86-64, so nlmsghdr/nlattr headers are little-endian)
# with a NETLINK_NETFILTER socket bound to NF_NETLINK_CONNTRACK_NEW inside a throwaway netns that
# had an `nft ... hook output ... ct state new counter` rule, while sending the traffic named.

REAL = {
    # UDP 127.0.0.1:33744 -> 127.0.0.1:27015
    "udp4_lo": (
        "94000000000100060000000000000000020000003400018014000180080001007f00000108000200"
        "7f0000011c00028005000100110000000600020083d0000006000300698700003400028014000180"
        "080001007f000001080002007f0000011c0002800500010011000000060002006987000006000300"
        "83d0000008000c0057f5c5b80800030000000008080007000000001e"
    ),
    # UDP 10.99.0.1:40000 -> 10.99.0.2:27015 (veth addresses inside the namespace)
    "udp4_veth": (
        "94000000000100060000000000000000020000003400018014000180080001000a63000108000200"
        "0a6300021c0002800500010011000000060002009c40000006000300698700003400028014000180"
        "080001000a630002080002000a6300011c0002800500010011000000060002006987000006000300"
        "9c40000008000c007bcac1ce0800030000000008080007000000001e"
    ),
    # UDP [::1]:41627 -> [::1]:27015
    "udp6": (
        "c40000000001000600000000000000000a0000004c0001802c000180140003000000000000000000"
        "000000000000000114000400000000000000000000000000000000011c0002800500010011000000"
        "06000200a29b000006000300698700004c0002802c00018014000300000000000000000000000000"
        "0000000114000400000000000000000000000000000000011c000280050001001100000006000200"
        "6987000006000300a29b000008000c0025fa5c5a0800030000000008080007000000001e"
    ),
    # TCP 127.0.0.1:42542 -> 127.0.0.1:50607 (SYN; carries CTA_PROTOINFO)
    "tcp4": (
        "c4000000000100060000000000000000020000003400018014000180080001007f00000108000200"
        "7f0000011c000280050001000600000006000200a62e000006000300c5af00003400028014000180"
        "080001007f000001080002007f0000011c000280050001000600000006000200c5af000006000300"
        "a62e000008000c00af4d4ea208000300000000080800070000000078300004802c00018005000100"
        "01000000050002000a000000050003000000000006000400030000000600050000000000"
    ),
    # TCP [::1]:36794 -> [::1]:51071
    "tcp6": (
        "f40000000001000600000000000000000a0000004c0001802c000180140003000000000000000000"
        "000000000000000114000400000000000000000000000000000000011c0002800500010006000000"
        "060002008fba000006000300c77f00004c0002802c00018014000300000000000000000000000000"
        "0000000114000400000000000000000000000000000000011c000280050001000600000006000200"
        "c77f0000060003008fba000008000c00d058c8570800030000000008080007000000007830000480"
        "2c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
        "00000000"
    ),
    # ICMP echo 127.0.0.1 -> 127.0.0.1 id 7: tracked, but not a flow for us
    "icmp4": (
        "a4000000000100060000000000000000020000003c00018014000180080001007f00000108000200"
        "7f000001240002800500010001000000060004000007000005000500080000000500060000000000"
        "3c00028014000180080001007f000001080002007f00000124000280050001000100000006000400"
        "000700000500050000000000050006000000000008000c007126c949080003000000000808000700"
        "0000001e"
    ),
}
REAL_BYTES = {name: bytes.fromhex(text) for name, text in REAL.items()}
REAL_FLOWS = {
    "udp4_lo": Flow(Proto.UDP, IPv4("127.0.0.1"), IPv4("127.0.0.1"), 33744, 27015),
    "udp4_veth": Flow(Proto.UDP, IPv4("10.99.0.1"), IPv4("10.99.0.2"), 40000, 27015),
    "udp6": Flow(Proto.UDP, IPv6("::1"), IPv6("::1"), 41627, 27015),
    "tcp4": Flow(Proto.TCP, IPv4("127.0.0.1"), IPv4("127.0.0.1"), 42542, 50607),
    "tcp6": Flow(Proto.TCP, IPv6("::1"), IPv6("::1"), 36794, 51071),
}
little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="captured on a little-endian host (netlink headers)"
)


# --- parser: real datagrams --------------------------------------------------------------------


@little_endian_only
@pytest.mark.parametrize("name", sorted(REAL_FLOWS))
def test_real_datagram(name: str) -> None:
    parser = ConntrackParser()
    assert parser.feed(REAL_BYTES[name]) == [REAL_FLOWS[name]]
    assert parser.events_seen == 1
    assert parser.flows_reported == 1
    assert parser.malformed == 0


@little_endian_only
def test_real_icmp_is_ignored() -> None:
    parser = ConntrackParser()
    assert parser.feed(REAL_BYTES["icmp4"]) == []
    assert (parser.events_seen, parser.ignored, parser.malformed) == (1, 1, 0)


@little_endian_only
def test_real_datagrams_concatenated() -> None:
    data = b"".join(REAL_BYTES[n] for n in ("udp4_lo", "icmp4", "tcp6", "udp4_veth"))
    assert parse_messages(data) == [
        REAL_FLOWS["udp4_lo"],
        REAL_FLOWS["tcp6"],
        REAL_FLOWS["udp4_veth"],
    ]


@little_endian_only
@pytest.mark.parametrize("name", sorted(REAL_BYTES))
def test_real_datagram_every_truncation(name: str) -> None:
    data = REAL_BYTES[name]
    for cut in range(1, len(data)):
        parser = ConntrackParser()
        assert parser.feed(data[:cut]) == []
        assert parser.malformed == 1, cut
        assert parser.events_seen == 0


# --- parser: encoded messages ------------------------------------------------------------------


def test_ipv4_udp() -> None:
    assert parse_messages(encode_flow(udp4())) == [udp4()]


def test_ipv4_tcp() -> None:
    flow = Flow(Proto.TCP, IPv4("10.0.0.5"), IPv4("198.51.100.7"), 51000, 443)
    assert parse_messages(encode_flow(flow)) == [flow]


def test_ipv6_udp_and_tcp() -> None:
    flows = [
        Flow(Proto.UDP, IPv6("fd00::23"), IPv6("2001:db8::9"), 50000, 3478),
        Flow(Proto.TCP, IPv6("2001:db8:1::2"), IPv6("2001:db8:ffff::1"), 1, 65535),
    ]
    assert parse_messages(b"".join(encode_flow(f) for f in flows)) == flows


@pytest.mark.parametrize("proto_num", [1, 58, 132, 47, 0, 255])
def test_other_protocols_ignored(proto_num: int) -> None:
    parser = ConntrackParser()
    data = encode_new(proto_num, IPv4("10.0.0.1"), IPv4("10.0.0.2"), 0, 0)
    assert parser.feed(data) == []
    assert (parser.events_seen, parser.ignored, parser.malformed) == (1, 1, 0)


def test_icmp_message_without_ports_ignored() -> None:
    orig = nla(1, nla(1, IPv4("10.0.0.1").packed) + nla(2, IPv4("10.0.0.2").packed), nested=True)
    orig += nla(2, nla(1, b"\x01") + nla(4, b"\x00\x07") + nla(5, b"\x08"), nested=True)
    msg = nlmsg(CT_NEW, b"\x02\x00\x00\x00" + nla(1, orig, nested=True))
    parser = ConntrackParser()
    assert parser.feed(msg) == []
    assert (parser.ignored, parser.malformed) == (1, 0)


@pytest.mark.parametrize(
    "opts",
    [
        {"nested": False},  # kernels before 5.2 did not flag nests
        {"reply": False},
        {"leading_attr": True},
        {"reverse_ip": True},
        {"reverse_ports": True},
        {"zone": True},
        {"nested": False, "reverse_ip": True, "zone": True, "leading_attr": True},
    ],
    ids=str,
)
@pytest.mark.parametrize("v6", [False, True])
def test_layout_variants_take_the_generic_path(opts: dict[str, bool], v6: bool) -> None:
    flow = udp4() if not v6 else Flow(Proto.TCP, IPv6("fd00::1"), IPv6("2001:db8::1"), 5, 6)
    assert parse_messages(encode_flow(flow, **opts)) == [flow]


def test_multiple_messages_and_control_messages_in_one_datagram() -> None:
    f1, f2 = udp4(1, 2), Flow(Proto.TCP, IPv6("fd00::5"), IPv6("2001:db8::5"), 3, 4)
    ack = nlmsg(2, struct.pack("=i", 0) + bytes(16), flags=0)
    error = nlmsg(2, struct.pack("=i", -errno.EPERM) + bytes(16), flags=0)
    data = b"".join(
        [
            nlmsg(1, b"", flags=0),  # NLMSG_NOOP
            encode_flow(f1),
            ack,
            nlmsg(CT_DELETE, b"\x02\x00\x00\x00" + encode_flow(f1)[20:]),  # a DESTROY event
            nlmsg(0x0200, b"\x02\x00\x00\x00"),  # another subsystem (expectations)
            error,
            nlmsg(4, b"", flags=0),  # NLMSG_OVERRUN
            encode_flow(f2),
            nlmsg(3, struct.pack("=i", 0), flags=2),  # NLMSG_DONE
        ]
    )
    parser = ConntrackParser()
    assert parser.feed(data) == [f1, f2]
    assert parser.counters() == {
        "datagrams": 1,
        "errors": 1,
        "events_seen": 2,
        "flows_filtered": 0,
        "flows_reported": 2,
        "ignored": 0,
        "malformed": 0,
        "other": 5,
        "overruns": 1,
    }


def test_bad_message_is_skipped_and_the_next_one_read() -> None:
    bad_attr = nlmsg(CT_NEW, b"\x02\x00\x00\x00" + struct.pack("=HH", 2, 1) + bytes(8))
    no_tuple = nlmsg(CT_NEW, b"\x02\x00\x00\x00" + nla(3, bytes(4)))
    short = nlmsg(CT_NEW, b"\x02\x00")  # shorter than nfgenmsg
    overlong_attr = nlmsg(CT_NEW, b"\x02\x00\x00\x00" + struct.pack("=HH", 200, 0x8001))
    no_proto = nlmsg(
        CT_NEW,
        b"\x02\x00\x00\x00" + nla(1, nla(1, nla(1, bytes(4)) + nla(2, bytes(4)), nested=True)),
    )
    mixed_families = nlmsg(
        CT_NEW,
        b"\x02\x00\x00\x00"
        + nla(
            1,
            nla(1, nla(1, bytes(4)) + nla(4, bytes(16)), nested=True)
            + nla(2, nla(1, b"\x11") + nla(2, b"\0\1") + nla(3, b"\0\2"), nested=True),
            nested=True,
        ),
    )
    short_port = nlmsg(
        CT_NEW,
        b"\x02\x00\x00\x00"
        + nla(
            1,
            nla(1, nla(1, bytes(4)) + nla(2, bytes(4)), nested=True)
            + nla(2, nla(1, b"\x11") + nla(2, b"\0") + nla(3, b"\0\2"), nested=True),
            nested=True,
        ),
    )
    bads = [bad_attr, no_tuple, short, overlong_attr, no_proto, mixed_families, short_port]
    parser = ConntrackParser()
    assert parser.feed(b"".join([*bads, encode_flow(udp4())])) == [udp4()]
    assert parser.malformed == len(bads)
    assert parser.events_seen == len(bads) + 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        bytes(15),
        bytes(16),  # nlmsg_len 0: must not loop forever
        struct.pack("=IHHII", 15, CT_NEW, 0, 0, 0),
        struct.pack("=IHHII", 0xFFFFFFFF, CT_NEW, 0, 0, 0) + bytes(64),
        struct.pack("=IHHII", 16, 2, 0, 0, 0),  # NLMSG_ERROR without its errno
        b"\xff" * 300,
        random.Random(1).randbytes(4096),
    ],
)
def test_garbage(data: bytes) -> None:
    parser = ConntrackParser()
    assert parser.feed(data) == []
    assert parser.datagrams == 1


def test_trailing_bytes_counted() -> None:
    parser = ConntrackParser()
    assert parser.feed(encode_flow(udp4()) + b"\x01\x02\x03") == [udp4()]
    assert parser.malformed == 1


def test_size_argument_and_buffer_types() -> None:
    msg = encode_flow(udp4())
    buf = bytearray(msg + b"\xee" * 100)
    parser = ConntrackParser()
    assert parser.feed(buf, len(msg)) == [udp4()]
    assert parser.feed(memoryview(buf)[: len(msg)]) == [udp4()]
    assert parser.feed(buf, len(msg) - 1) == []
    assert parser.malformed == 1


def test_wanted_prefilter() -> None:
    seen: list[tuple[Proto, int]] = []

    def wanted(proto: Proto, dport: int) -> bool:
        seen.append((proto, dport))
        return proto is Proto.UDP and dport == 27015

    tcp = Flow(Proto.TCP, IPv4("10.0.0.1"), IPv4("10.0.0.2"), 1, 27015)
    v6 = Flow(Proto.UDP, IPv6("fd00::1"), IPv6("2001:db8::2"), 1, 27015)
    data = b"".join(
        [
            encode_flow(udp4(dport=80)),
            encode_flow(tcp),
            encode_flow(udp4()),
            encode_flow(v6, nested=False),
            encode_new(1, IPv4("10.0.0.1"), IPv4("10.0.0.2"), 0, 0),
        ]
    )
    parser = ConntrackParser(wanted)
    assert parser.feed(data) == [udp4(), v6]
    assert seen == [(Proto.UDP, 80), (Proto.TCP, 27015), (Proto.UDP, 27015), (Proto.UDP, 27015)]
    assert (parser.flows_filtered, parser.flows_reported, parser.ignored) == (2, 2, 1)


# --- parser: properties ------------------------------------------------------------------------


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    addresses = draw(st.sampled_from([st.ip_addresses(v=4), st.ip_addresses(v=6)]))
    return Flow(
        draw(st.sampled_from(list(Proto))),
        draw(addresses),
        draw(addresses),
        draw(st.integers(0, 65535)),
        draw(st.integers(0, 65535)),
    )


encode_options = st.fixed_dictionaries(
    {
        "nested": st.booleans(),
        "reply": st.booleans(),
        "leading_attr": st.booleans(),
        "reverse_ip": st.booleans(),
        "reverse_ports": st.booleans(),
        "zone": st.booleans(),
    }
)


@given(st.lists(st.tuples(flows(), encode_options), max_size=8))
def test_encoded_flows_round_trip(items: list[tuple[Flow, dict[str, bool]]]) -> None:
    data = b"".join(encode_flow(flow, **opts) for flow, opts in items)
    parser = ConntrackParser()
    assert parser.feed(data) == [flow for flow, _ in items]
    assert parser.malformed == 0
    assert parser.events_seen == len(items)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    parser = ConntrackParser(lambda proto, port: port % 2 == 0)
    result = parser.feed(data)
    assert all(isinstance(f, Flow) for f in result)
    assert parser.flows_reported + parser.flows_filtered + parser.ignored <= parser.events_seen


@settings(max_examples=500)
@given(
    st.lists(flows(), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 10_000),
)
def test_mutated_messages_never_raise(
    items: list[Flow], edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(b"".join(encode_flow(f) for f in items))
    for pos, value in edits:
        data[pos % len(data)] = value
    parser = ConntrackParser()
    result = parser.feed(bytes(data[: max(1, cut % (len(data) + 1))]))
    assert len(result) <= len(items)


# --- the detector without a kernel -------------------------------------------------------------


class FlakySocket(socket.socket):
    """A datagram socket whose recv_into fails with chosen errors first."""

    def __init__(self, fileno: int, failures: list[int]) -> None:
        super().__init__(fileno=fileno)
        self.failures = failures

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        return super().recv_into(buffer, nbytes, flags)


class SocketPairDetector(ConntrackDetector):
    """The real run loop, fed from a socketpair instead of the kernel."""

    def __init__(self, sock: socket.socket, **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sock = sock

    def _open(self, probe_timeout: float | None = None) -> socket.socket:
        return self.sock


@contextlib.contextmanager
def socketpair_detector(
    failures: list[int] | None = None, **kwargs: float
) -> Iterator[tuple[SocketPairDetector, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    flaky = FlakySocket(ours.detach(), failures or [])
    try:
        yield SocketPairDetector(flaky, **kwargs), theirs
    finally:
        theirs.close()
        flaky.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_detector_name_and_feed() -> None:
    det = ConntrackDetector()
    assert det.name == "conntrack"
    assert det.feed(encode_flow(udp4()) + encode_new(1, IPv4("1.1.1.1"), IPv4("2.2.2.2"), 0, 0))
    assert (det.events_seen, det.flows_reported, det.ignored, det.malformed) == (2, 1, 1, 0)
    det.wanted = lambda proto, port: False
    assert det.feed(encode_flow(udp4())) == []
    assert det.flows_filtered == 1
    assert det.counters()["events_seen"] == 3
    assert NF_NETLINK_CONNTRACK_NEW == 1


def test_check_refuses_other_platforms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(DetectionUnavailable, match="needs Linux"):
        ConntrackDetector().check()


async def test_run_reports_flows_and_survives_enobufs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with socketpair_detector([errno.ENOBUFS, errno.ENOBUFS]) as (det, peer):
        got: list[Observation] = []
        task = asyncio.create_task(det.run(got.append))
        await asyncio.sleep(0)
        peer.send(encode_flow(udp4(1)))
        await wait_until(lambda: len(got) == 1)
        peer.send(encode_flow(udp4(2)) + encode_flow(udp4(3)))
        peer.send(b"\x00" * 7)
        await wait_until(lambda: len(got) == 3)
        assert got == [udp4(1), udp4(2), udp4(3)]
        assert not task.done()
        assert (det.enobufs, det.overruns, det.malformed, det.datagrams) == (2, 2, 1, 3)
        warnings = [r for r in caplog.records if "fell behind" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited
        assert "ENOBUFS x1, 1 in total" in warnings[0].getMessage()
        await stop(task)
        assert det.sock.fileno() == -1  # closed on the way out


async def test_run_sink_exception_does_not_stop_it(caplog: pytest.LogCaptureFixture) -> None:
    with socketpair_detector() as (det, peer):
        got: list[Flow] = []

        def sink(flow: Observation) -> None:
            assert isinstance(flow, Flow)
            if flow.sport == 1:
                raise RuntimeError("boom")
            got.append(flow)

        task = asyncio.create_task(det.run(sink))
        await asyncio.sleep(0)
        peer.send(encode_flow(udp4(1)) + encode_flow(udp4(2)))
        await wait_until(lambda: len(got) == 1)
        assert "sink raised" in caplog.text
        await stop(task)


async def test_run_fails_on_socket_error() -> None:
    with socketpair_detector([errno.EBADF]) as (det, peer):
        task = asyncio.create_task(det.run(lambda flow: None))
        await asyncio.sleep(0)
        peer.send(b"x")
        with pytest.raises(DetectionUnavailable, match="socket failed"):
            await asyncio.wait_for(task, 5)


async def test_quiet_hint_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with socketpair_detector(quiet_hint_after=0.01) as (det, _peer):
        task = asyncio.create_task(det.run(lambda flow: None))
        await wait_until(lambda: "no event in" in caplog.text)
        assert "track_flows" in caplog.text
        await stop(task)


# --- the real kernel ---------------------------------------------------------------------------

NFT_RULESET = """
table inet igdtrigger_test {
    chain out {
        type filter hook output priority 0; policy accept;
        ct state new counter
    }
}
"""

DETECTOR_SCRIPT = """
import asyncio, json, sys
from igdtrigger.detect.conntrack import ConntrackDetector

async def main():
    det = ConntrackDetector(quiet_hint_after=None)
    det.check()
    def sink(f):
        print(json.dumps({"proto": f.proto.value, "src": str(f.src), "dst": str(f.dst),
                          "sport": f.sport, "dport": f.dport}), flush=True)
    task = asyncio.create_task(det.run(sink))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    if task.done():
        task.result()
    print(json.dumps({"ready": det.rcvbuf_actual}), flush=True)
    await task

asyncio.run(main())
"""

SENDER_SCRIPT = """
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "udp":
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", (host, port))
else:
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=5):
            print(listener.getsockname()[1], flush=True)
"""

OVERRUN_SCRIPT = """
import asyncio, json, socket, time
from igdtrigger.detect.conntrack import ConntrackDetector

async def main():
    det = ConntrackDetector(rcvbuf=1024, quiet_hint_after=None)
    seen = set()
    task = asyncio.create_task(det.run(lambda f: seen.add(f.dport)))
    await asyncio.sleep(0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for port in range(20000, 22000):  # the loop is blocked: the kernel must drop events
            s.sendto(b"x", ("127.0.0.1", port))
    await asyncio.sleep(0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", 40999))
    deadline = time.monotonic() + 5
    while 40999 not in seen and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    result = {"marker": 40999 in seen, "running": not task.done(), "rcvbuf": det.rcvbuf_actual}
    print(json.dumps({**result, **det.counters()}), flush=True)
    task.cancel()

asyncio.run(main())
"""


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace with conntrack active (an nft `ct state new` rule)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("conntrack is Linux only")
    if os.geteuid() != 0:
        pytest.skip("needs root (ip netns, nft, CAP_NET_ADMIN)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool!r} command")
    name = f"igdt-ct-{os.getpid()}-{secrets.token_hex(3)}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up").check_returncode()
        # 10.99.0.2 on a dummy link when the kernel has the driver, else on lo: local either way
        if _run("ip", "-n", name, "link", "add", "ct0", "type", "dummy").returncode == 0:
            _run("ip", "-n", name, "addr", "add", "10.99.0.2/24", "dev", "ct0").check_returncode()
            _run("ip", "-n", name, "link", "set", "ct0", "up").check_returncode()
        else:
            _run("ip", "-n", name, "addr", "add", "10.99.0.2/32", "dev", "lo").check_returncode()
        nft = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "-f", "-"],
            input=NFT_RULESET,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if nft.returncode != 0:
            pytest.skip(f"cannot add an nftables ct rule: {nft.stderr.strip()}")
        yield name
    finally:
        _run("ip", "netns", "del", name)


class LineReader:
    """Read JSON lines from a child's stdout with a deadline (no blocking forever)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.pending = b""

    def next(self, timeout: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line from the detector within {timeout}s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise AssertionError(f"detector exited: {err}")
                self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        parsed: dict[str, object] = json.loads(line)
        return parsed

    def wait_for(self, match: Callable[[dict[str, object]], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, object]] = []
        while True:
            left = deadline - time.monotonic()
            try:
                item = self.next(max(left, 0.0))
            except AssertionError as exc:
                raise AssertionError(f"{exc}; flows seen: {seen}") from None
            if match(item):
                return
            seen.append(item)


@contextlib.contextmanager
def detector_in(ns: str) -> Iterator[LineReader]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", DETECTOR_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
    )
    try:
        reader = LineReader(proc)
        assert "ready" in reader.next(timeout=10)
        yield reader
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def send_in(ns: str, kind: str, host: str, port: int = 0) -> str:
    done = _run(
        "ip", "netns", "exec", ns, sys.executable, "-c", SENDER_SCRIPT, kind, host, str(port)
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.lab
def test_kernel_reports_udp_tcp_and_ipv6_flows(netns: str) -> None:
    with detector_in(netns) as flows:
        send_in(netns, "udp", "10.99.0.2", 27015)
        flows.wait_for(
            lambda f: (
                f.get("proto") == "UDP" and f.get("dport") == 27015 and f["dst"] == "10.99.0.2"
            )
        )
        tcp_port = int(send_in(netns, "tcp", "127.0.0.1"))
        flows.wait_for(lambda f: f.get("proto") == "TCP" and f.get("dport") == tcp_port)
        send_in(netns, "udp", "::1", 27016)
        flows.wait_for(
            lambda f: f.get("proto") == "UDP" and f.get("dport") == 27016 and f["src"] == "::1"
        )


@pytest.mark.lab
def test_kernel_overrun_is_survived(netns: str) -> None:
    done = _run("ip", "netns", "exec", netns, sys.executable, "-c", OVERRUN_SCRIPT, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["enobufs"] >= 1, result
    assert result["overruns"] >= result["enobufs"]
    assert result["running"], result
    assert result["marker"], result
    assert "fell behind" in done.stderr


@pytest.mark.lab
def test_kernel_check_without_cap_net_admin(netns: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop capabilities")
    script = (
        "from igdtrigger.detect.conntrack import ConntrackDetector\n"
        "from igdtrigger.core.errors import DetectionUnavailable\n"
        "try:\n    ConntrackDetector().check()\n"
        "except DetectionUnavailable as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [
            *("ip", "netns", "exec", netns),
            *("setpriv", "--inh-caps=-all", "--bounding-set=-all"),
            *(sys.executable, "-c", script),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=_child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "CAP_NET_ADMIN" in done.stdout
    assert "AmbientCapabilities=CAP_NET_ADMIN" in done.stdout


@pytest.mark.lab
def test_kernel_check_passes_in_namespace(netns: str) -> None:
    script = (
        "from igdtrigger.detect.conntrack import ConntrackDetector; ConntrackDetector().check()"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        env=_child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
