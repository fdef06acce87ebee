"""Following live flows in conntrack (issue 18): entry decoding (GET replies, dumps, DESTROY
events, CTA_TIMEOUT/STATUS/PROTOINFO), what a look means, and the real kernel."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest

from igdtrigger.core.model import Flow, FlowEnded, FlowLive, Proto
from igdtrigger.detect.conntrack import ConntrackDetector
from igdtrigger.detect.ctnetlink import CT_GET
from igdtrigger.detect.ctquery import CtEntry, decode_entries, encode_get, first_look_idle, udp_idle

from .test_conntrack import (
    CT_DELETE,
    CT_NEW,
    IPv4,
    IPv6,
    _child_env,
    _run,
    encode_flow,
    netns,  # noqa: F401  (a fixture)
    nla,
    nlmsg,
    udp4,
)

ESTABLISHED, TIME_WAIT, SYN_SENT = 3, 7, 1
FIN_WAIT, CLOSE_WAIT, LAST_ACK = 4, 5, 6


def tcp4(sport: int = 40001, dport: int = 27015) -> Flow:
    return Flow(Proto.TCP, IPv4("192.168.1.23"), IPv4("203.0.113.9"), sport, dport)


def entry_msg(flow: Flow, *, timeout: int | None = 29, status: int = 0x8,
              tcp_state: int | None = None, mtype: int = CT_NEW) -> bytes:
    """A CT_NEW (or CT_DELETE) message as a GET reply or dump carries it: tuples, then status,
    timeout, protoinfo, id."""
    base = encode_flow(flow)  # header + nfgenmsg + ORIG + REPLY + ID + STATUS
    extra = b""
    if timeout is not None:
        extra += nla(7, struct.pack("!I", timeout))
    if tcp_state is not None:
        tcp = nla(1, bytes([tcp_state])) + nla(2, b"\x07") + nla(3, b"\x07")
        extra += nla(4, nla(1, tcp, nested=True), nested=True)
    extra += nla(3, struct.pack("!I", status))
    body = base[16:] + extra
    return nlmsg(mtype, body, flags=0)


def test_decode_entries_reads_timeout_status_and_tcp_state() -> None:
    data = (entry_msg(udp4(), timeout=117, status=0xE)
            + entry_msg(tcp4(), timeout=431999, tcp_state=ESTABLISHED))
    (u, t) = decode_entries(data)
    assert u == CtEntry(udp4(), 117, 0xE, None)
    assert t.flow == tcp4() and t.timeout == 431999 and t.established and not t.closed
    assert decode_entries(entry_msg(tcp4(), tcp_state=TIME_WAIT))[0].closed


def test_decode_entries_destroy_events_ipv6_and_the_prefilter() -> None:
    v6 = Flow(Proto.UDP, IPv6("fd00::23"), IPv6("2001:db8::9"), 5000, 3074)
    data = entry_msg(udp4(), mtype=CT_DELETE) + entry_msg(v6, timeout=None)
    got = decode_entries(data)
    assert [e.destroyed for e in got] == [True, False]
    assert got[1].flow == v6 and got[1].timeout is None
    assert decode_entries(data, lambda proto, port: port == 3074) == [got[1]]


@pytest.mark.parametrize("cut", [0, 5, 17, 40, 80])
def test_decode_entries_never_raises_on_truncated_bytes(cut: int) -> None:
    data = entry_msg(tcp4(), tcp_state=ESTABLISHED)
    decode_entries(data[:cut])  # no exception; what is whole is decoded
    assert decode_entries(data + b"\x01\x02") == decode_entries(data)


def test_encode_get_names_the_original_tuple_and_a_dump_asks_for_all() -> None:
    for flow in (udp4(), tcp4(), Flow(Proto.UDP, IPv6("fd00::1"), IPv6("2001:db8::2"), 1, 2)):
        req = encode_get(flow, 7)
        length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
        assert (length, mtype, flags, seq) == (len(req), CT_GET, 0x1, 7)
        # the request's attributes are the reply's original tuple: decode them as an entry
        as_reply = struct.pack("=IHHII", length, CT_NEW, 0, 0, 0) + req[16:]
        assert decode_entries(as_reply)[0].flow == flow
    dump = encode_get(None, 1)
    assert struct.unpack_from("=IHHII", dump)[1:3] == (CT_GET, 0x301)


def test_udp_idle_from_the_remaining_timeout() -> None:
    assert udp_idle(29, 30, 120) == 0.0  # a packet under a second ago
    assert udp_idle(20, 30, 120) == 9.0
    assert udp_idle(100, 30, 120) == 19.0  # only a stream entry has more than 30 s left
    assert udp_idle(25, 30, 120) == 4.0  # ambiguous: the smaller idleness is taken
    assert first_look_idle(CtEntry(tcp4(), 100, 0, ESTABLISHED), 30, 120) is None


def test_a_packet_is_seen_only_when_the_deadline_moves_beyond_rounding() -> None:
    det = ConntrackDetector()
    f = udp4()
    det.follow(f, 0.0)
    assert det.look(f, CtEntry(f, 29, 0, None), 0.5) is None  # first look: the reference
    assert det.look(f, CtEntry(f, 28, 0, None), 1.5) is None  # silent: the deadline stays
    assert det.look(f, CtEntry(f, 27, 0, None), 2.5) is None
    assert det.look(f, CtEntry(f, 29, 0, None), 3.5) == FlowLive(f, False, 0.0)  # reset
    assert det.look(f, CtEntry(f, 20, 0, None), 12.5) is None
    assert det.look(f, None, 13.5) == FlowEnded(f, closed=False)
    assert f not in det.followed


@pytest.mark.parametrize("timeout", [10, 60, 300], ids=["lowered", "raised", "ct-policy"])
def test_a_packet_is_never_dated_before_the_previous_look(timeout: int) -> None:
    """The UDP timeout is not what the detector read at start (the sysctl changed since, or an
    nft ct timeout policy applies to this flow): a packet each second must still refresh the
    activation. The estimate is capped by the time since the previous look, when the packet
    certainly was not there yet. (Before: with the sysctl lowered to 10 s, a fresh packet was
    dated 20 s back and the ports closed while the game was sending.)"""
    det = ConntrackDetector()
    det.udp_timeouts = (30, 120)  # as read at start
    f = udp4()
    det.follow(f, 0.0)
    assert det.look(f, CtEntry(f, timeout - 1, 0, None), 1.0) is None
    news = det.look(f, CtEntry(f, timeout - 1, 0, None), 3.0)  # a packet since: reset
    assert isinstance(news, FlowLive) and news.idle is not None
    assert news.idle <= 2.0


def test_a_tcp_connection_holds_then_ends_when_it_closes() -> None:
    det = ConntrackDetector()
    f = tcp4()
    det.follow(f, 0.0)
    assert det.look(f, CtEntry(f, 431999, 0, ESTABLISHED), 1.0) == FlowLive(f, True, None)
    assert det.look(f, CtEntry(f, 431998, 0, ESTABLISHED), 2.0) is None  # silent: no news
    assert det.look(f, CtEntry(f, 119, 0, TIME_WAIT), 3.0) == FlowEnded(f, closed=True)


def test_a_half_closed_connection_stops_holding_but_its_packets_still_refresh() -> None:
    """The game client shut down its sending side (FIN: conntrack FIN_WAIT) while the server
    still streams to it: the connection no longer holds, but every packet still refreshes the
    activation until it is closed both ways. (Before: FIN_WAIT ended the flow at once and the
    ports closed one timeout later while data still flowed.)"""
    det = ConntrackDetector()
    f = tcp4()
    det.follow(f, 0.0)
    assert det.look(f, CtEntry(f, 431999, 0, ESTABLISHED), 1.0) == FlowLive(f, True, None)
    assert det.look(f, CtEntry(f, 119, 0, FIN_WAIT), 2.0) == FlowLive(f, False, None)
    assert det.look(f, CtEntry(f, 118, 0, FIN_WAIT), 3.0) is None  # silent
    assert det.look(f, CtEntry(f, 119, 0, FIN_WAIT), 4.0) == FlowLive(f, False, 0.0)  # data
    assert det.look(f, CtEntry(f, 59, 0, CLOSE_WAIT), 5.0) is None  # shorter state timeout
    assert det.look(f, CtEntry(f, 59, 0, CLOSE_WAIT), 7.0) == FlowLive(f, False, 0.0)
    assert det.look(f, CtEntry(f, 29, 0, LAST_ACK), 8.0) == FlowEnded(f, closed=True)


def test_the_start_dump_reports_live_flows_with_their_idleness() -> None:
    det = ConntrackDetector()
    looks = det._first_looks([CtEntry(udp4(), 25, 0, None),
                              CtEntry(tcp4(), 400000, 0, ESTABLISHED),
                              CtEntry(tcp4(2), 100, 0, TIME_WAIT),
                              CtEntry(tcp4(3), 100, 0, SYN_SENT),
                              CtEntry(tcp4(4), 110, 0, FIN_WAIT)])
    # a half-closed connection from before still carries data one way: followed, dated by
    # its state's timeout (FIN_WAIT 120 s), without holding
    assert looks == [FlowLive(udp4(), False, 4.0), FlowLive(tcp4(), True, None),
                     FlowLive(tcp4(4), False, 9.0)]


# --- the real kernel ---------------------------------------------------------------------------

FOLLOW_SCRIPT = """
import asyncio, json, sys, time
from igdtrigger.detect.conntrack import ConntrackDetector
from igdtrigger.core.model import Flow, FlowLive, FlowEnded

PORTS = {int(p) for p in sys.argv[1].split(",")}

async def main():
    det = ConntrackDetector(quiet_hint_after=None, poll_interval=0.2)
    det.wanted = lambda proto, port: port in PORTS
    det.follows = lambda f: f.dport in PORTS
    def sink(o):
        if not isinstance(o, (Flow, FlowLive, FlowEnded)):
            return  # FlowsListed
        f = o if isinstance(o, Flow) else o.flow
        out = {"kind": type(o).__name__, "proto": f.proto.value, "dport": f.dport}
        if isinstance(o, FlowLive):
            out.update(connected=o.connected, idle=o.idle)
        if isinstance(o, FlowEnded):
            out.update(closed=o.closed)
        print(json.dumps(out), flush=True)
    task = asyncio.create_task(det.run(sink))
    await asyncio.sleep(0.5)
    print(json.dumps({"ready": 1}), flush=True)
    await task

asyncio.run(main())
"""

SEND = """
import socket, sys, time
port, count, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.99.0.2", 0))
for _ in range(count):
    s.sendto(b"x", ("10.99.0.2", port))
    time.sleep(gap)
"""


@pytest.mark.lab
def test_kernel_follows_a_long_udp_flow_a_tcp_connection_and_one_from_before(
        netns: str) -> None:  # noqa: F811
    def in_ns(*argv: str) -> list[str]:
        return ["ip", "netns", "exec", netns, *argv]

    before = subprocess.Popen(in_ns(sys.executable, "-c", SEND, "27022", "10", "0.5"))
    time.sleep(1.0)  # this flow began before the detector: the start-up dump finds it
    proc = subprocess.Popen(in_ns(sys.executable, "-c", FOLLOW_SCRIPT, "27020,27021,27022"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
    try:
        time.sleep(1.5)
        assert _run(*in_ns(sys.executable, "-c", SEND, "27020", "10", "0.5")).returncode == 0
        tcp = ("import socket, time\n"
               "l = socket.socket(); l.bind(('10.99.0.2', 27021)); l.listen()\n"
               "c = socket.create_connection(('10.99.0.2', 27021)); a, _ = l.accept()\n"
               "time.sleep(2.5); c.close(); a.close(); time.sleep(1.5)\n")
        assert _run(*in_ns(sys.executable, "-c", tcp)).returncode == 0
    finally:
        before.wait(10)
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    seen = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert {"ready": 1} in seen, err.decode()

    def at(port: int) -> list[tuple[object, ...]]:
        return [(s["kind"], s.get("connected"), s.get("closed")) for s in seen
                if s.get("dport") == port]

    # the flow from before: found by the dump, then its packets keep showing
    assert at(27022)[0] == ("FlowLive", False, None)
    assert len(at(27022)) >= 2
    # the long UDP flow: one NEW, then packets seen again and again on the same flow
    assert at(27020)[0] == ("Flow", None, None)
    assert at(27020)[1:].count(("FlowLive", False, None)) >= 2
    # the TCP connection: new, established (holds), closed
    assert at(27021) == [("Flow", None, None), ("FlowLive", True, None),
                         ("FlowEnded", None, True)]


# --- the kernel-side prefilter -----------------------------------------------------------------

def run_bpf(prog: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    """A classic BPF interpreter for the instructions build_filter uses (0 = dropped)."""
    a, mem, pc = 0, [0] * 16, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code in (0x20, 0x28, 0x30):  # ld W/H/B [k], big-endian; out of bounds: drop
            size = {0x20: 4, 0x28: 2, 0x30: 1}[code]
            if k + size > len(pkt):
                return 0
            a = int.from_bytes(pkt[k:k + size], "big")
        elif code == 0x60:
            a = mem[k]
        elif code == 0x02:
            mem[k] = a
        elif code == 0x05:
            pc += k
        elif code in (0x15, 0x25, 0x35):
            hit = a == k if code == 0x15 else (a > k if code == 0x25 else a >= k)
            pc += jt if hit else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def test_the_kernel_filter_keeps_wanted_ports_and_what_it_cannot_read() -> None:
    from igdtrigger.core.model import parse_port_spec
    from igdtrigger.detect.ctfilter import build_filter

    prog = build_filter([*parse_port_spec("udp/27015"), *parse_port_spec("tcp/40000-40010"),
                         *parse_port_spec("udp/27016")])
    assert prog is not None
    v6 = Flow(Proto.UDP, IPv6("fd00::23"), IPv6("2001:db8::9"), 5000, 27015)
    kept = [udp4(), udp4(dport=27016), tcp4(dport=40000), tcp4(dport=40010),
            Flow(Proto.UDP, v6.src, v6.dst, 5000, 27016)]
    dropped = [udp4(dport=27014), udp4(dport=27017), udp4(dport=40000), tcp4(dport=27015),
               tcp4(dport=40011), Flow(Proto.UDP, v6.src, v6.dst, 5000, 3074)]
    for f in kept:
        assert run_bpf(prog, encode_flow(f)) != 0, f
    for f in dropped:
        assert run_bpf(prog, encode_flow(f)) == 0, f
    icmp = encode_flow(udp4())
    icmp = icmp[:52] + bytes([1]) + icmp[53:]  # CTA_PROTO_NUM = ICMP
    assert run_bpf(prog, icmp) == 0
    # the parser's slow path: another layout, another message type -> let through
    assert run_bpf(prog, encode_flow(udp4(dport=1), zone=True)) != 0
    assert run_bpf(prog, entry_msg(udp4(dport=1), mtype=CT_DELETE)) != 0
    assert run_bpf(prog, nlmsg(3, b"\0\0\0\0")) != 0  # NLMSG_DONE


def test_the_kernel_filter_gives_up_on_too_many_ranges() -> None:
    from igdtrigger.core.model import PortRange
    from igdtrigger.detect.ctfilter import build_filter

    assert build_filter([PortRange(Proto.UDP, p, p) for p in range(1, 3000, 2)]) is None
    assert build_filter([]) is not None  # nothing wanted: everything canonical is dropped


KERNEL_FILTER_SCRIPT = """
import asyncio, json, socket
from igdtrigger.detect.conntrack import ConntrackDetector
from igdtrigger.core.model import parse_port_spec

async def main():
    det = ConntrackDetector(quiet_hint_after=None)
    det.ports = list(parse_port_spec("udp/27015"))
    det.wanted = lambda proto, port: port == 27015
    seen = []
    task = asyncio.create_task(det.run(lambda f: seen.append(f.dport)))
    await asyncio.sleep(0.3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for port in range(30000, 30200):
            s.sendto(b"x", ("127.0.0.1", port))
        s.sendto(b"x", ("127.0.0.1", 27015))
    await asyncio.sleep(0.5)
    print(json.dumps({"seen": seen, "filter": det.kernel_filter, **det.counters()}), flush=True)
    task.cancel()

asyncio.run(main())
"""


@pytest.mark.lab
def test_kernel_drops_unwanted_events_before_they_reach_us(netns: str) -> None:  # noqa: F811
    done = _run("ip", "netns", "exec", netns, sys.executable, "-c", KERNEL_FILTER_SCRIPT,
                timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["filter"] is True, result
    assert result["seen"] == [27015], result
    assert result["events_seen"] == 1 and result["flows_filtered"] == 0, result


HINT_SCRIPT = """
import asyncio, logging, socket
from igdtrigger.detect.conntrack import ConntrackDetector
from igdtrigger.core.model import parse_port_spec

logging.basicConfig(level=logging.WARNING, format="%(message)s")

async def main():
    det = ConntrackDetector(quiet_hint_after=0.5)
    det.ports = list(parse_port_spec("udp/27015"))
    task = asyncio.create_task(det.run(lambda f: None))
    await asyncio.sleep(0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", 30001))  # tracked, but filtered out in the kernel
    await asyncio.sleep(1.0)
    print("filter", det.kernel_filter, "datagrams", det.datagrams, flush=True)
    task.cancel()

asyncio.run(main())
"""


@pytest.mark.lab
def test_kernel_filter_does_not_fake_the_no_tracking_hint(netns: str) -> None:  # noqa: F811
    done = _run("ip", "netns", "exec", netns, sys.executable, "-c", HINT_SCRIPT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "filter True datagrams 0" in done.stdout
    assert "conntrack only tracks" not in done.stderr  # tracking is on: no hint


def test_decode_entries_prefilter_sees_the_protocol_and_reads_every_message() -> None:
    """A dump of three entries of three lengths (UDP, TCP with its state, IPv6): each is read
    at its own offset, and the prefilter is asked with each entry's protocol."""
    v6 = Flow(Proto.UDP, IPv6("fd00::23"), IPv6("2001:db8::9"), 5000, 3074)
    data = (entry_msg(udp4(), timeout=117) + entry_msg(tcp4(), tcp_state=ESTABLISHED)
            + entry_msg(v6, timeout=None))
    assert [e.flow for e in decode_entries(data)] == [udp4(), tcp4(), v6]
    asked: list[tuple[Proto, int]] = []

    def wanted(proto: Proto, port: int) -> bool:
        asked.append((proto, port))
        return proto is Proto.TCP

    kept = decode_entries(data, wanted)
    assert [e.flow for e in kept] == [tcp4()]
    assert asked == [(Proto.UDP, udp4().dport), (Proto.TCP, 27015), (Proto.UDP, 3074)]


def test_the_kernel_filter_merges_overlapping_ranges() -> None:
    from igdtrigger.core.model import parse_port_spec
    from igdtrigger.detect.ctfilter import build_filter

    prog = build_filter([*parse_port_spec("udp/100-200"), *parse_port_spec("udp/150-300"),
                         *parse_port_spec("udp/301-310")])
    assert prog is not None
    for port in (100, 120, 199, 250, 300, 305, 310):
        assert run_bpf(prog, encode_flow(udp4(dport=port))) != 0, port
    for port in (99, 311):
        assert run_bpf(prog, encode_flow(udp4(dport=port))) == 0, port


def test_a_get_reply_is_matched_to_its_request_and_a_dump_ends_where_the_kernel_says() -> None:
    """The socket side's two readers of a reply: which errno answers request ``seq`` (the
    kernel's NLMSG_ERROR carries -errno, 0 = ACK), and whether a dump's datagram holds its end."""
    from igdtrigger.detect.ctquery import _has_done, _reply_errno

    def error(seq: int, errno: int) -> bytes:
        return nlmsg(2, struct.pack("=i", -errno), flags=0, seq=seq)

    entry = entry_msg(udp4())
    data = entry + error(9, 2) + error(7, 1)
    assert _reply_errno(data, 7) == 1  # EPERM for request 7, past another request's ENOENT
    assert _reply_errno(data, 9) == 2
    assert _reply_errno(data, 8) is None
    assert _reply_errno(entry + error(3, 0), 3) == 0  # an ACK
    assert _reply_errno(error(7, 1)[:19], 7) is None  # no room for the errno
    assert not _has_done(entry + entry)
    assert _has_done(entry + nlmsg(3, b"", flags=0))  # NLMSG_DONE: a bare header, last
    assert _has_done(entry + error(1, 0))
    assert not _has_done(b"")


def tcp_with_protoinfo(protoinfo: bytes) -> bytes:
    body = encode_flow(tcp4())[16:] + nla(7, struct.pack("!I", 300)) + nla(4, protoinfo,
                                                                          nested=True)
    return nlmsg(CT_NEW, body + nla(3, struct.pack("!I", 0x8)), flags=0)


def test_tcp_state_is_found_past_other_attributes_and_not_read_from_a_lying_length() -> None:
    """A connection counts as established (held) only when its state says so: found behind
    other protoinfo attributes (DCCP/SCTP slots, window scales), never read out of an attribute
    whose length runs past its container."""
    state = nla(1, bytes([ESTABLISHED]))
    ok = tcp_with_protoinfo(nla(2, bytes(4)) + nla(1, nla(2, b"\x07") + state, nested=True))
    (e,) = decode_entries(ok)
    assert e.established and e.timeout == 300
    inner_lies = nla(1, struct.pack("=HH", 40, 1) + bytes([ESTABLISHED, 0, 0, 0]), nested=True)
    outer_lies = struct.pack("=HH", 4 + 8 + 40, 1 | 0x8000) + state
    for protoinfo in (inner_lies, outer_lies):
        (e,) = decode_entries(tcp_with_protoinfo(protoinfo))
        assert e.tcp_state is None and not e.established and e.flow == tcp4()
