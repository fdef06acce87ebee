"""The conntrack parser's edges a user would notice (issue 19, survivors of `python -m
bench.mutation conntrack`): a TCP state misread keeps a closed connection's ports open or lets a
live one lapse; a wrong jump in the kernel prefilter drops a matching event (the game's ports
never open) or lets every event through."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable

import pytest

from igdtrigger.core.model import Flow, PortRange, Proto, parse_port_spec
from igdtrigger.detect.ctfilter import attach_filter, build_filter
from igdtrigger.detect.ctnetlink import ConntrackParser
from igdtrigger.detect.ctquery import decode_entries

from .test_conntrack import CT_DELETE, CT_NEW, IPv4, IPv6, encode_flow, encode_new, nla, nlmsg
from .test_conntrack_follow import ESTABLISHED, TIME_WAIT, entry_msg, tcp4

CTA_PROTOINFO, CTA_PROTOINFO_TCP = 4, 1
STATE, WSCALE_ORIG, WSCALE_REPLY, FLAGS_ORIG = 1, 2, 3, 4


def with_protoinfo(flow: Flow, protoinfo: bytes) -> bytes:
    """A GET reply for ``flow`` whose CTA_PROTOINFO holds ``protoinfo`` (then a status)."""
    body = entry_msg(flow, tcp_state=None)[16:]
    return nlmsg(CT_NEW, body + nla(CTA_PROTOINFO, protoinfo, nested=True), flags=0)


def tcp_nest(*attrs: bytes) -> bytes:
    return nla(CTA_PROTOINFO_TCP, b"".join(attrs), nested=True)


def state_of(protoinfo: bytes) -> int | None:
    (entry,) = decode_entries(with_protoinfo(tcp4(), protoinfo))
    assert entry.flow == tcp4()  # a bad protoinfo never costs the entry itself
    return entry.tcp_state


def test_the_tcp_state_is_found_after_other_tcp_attributes_of_any_length() -> None:
    """Netlink attributes come in any order: the state after the window scales and the 2-byte
    flags (padded to 4) is still read, so an established connection keeps its ports."""
    flags = nla(FLAGS_ORIG, b"\x07\x00")  # 6 bytes long, padded to 8
    assert state_of(tcp_nest(nla(WSCALE_ORIG, b"\x07"), flags, nla(STATE, bytes([TIME_WAIT])))
                    ) == TIME_WAIT
    assert state_of(tcp_nest(flags, nla(WSCALE_REPLY, b"\x07"),
                             nla(STATE, bytes([ESTABLISHED])))) == ESTABLISHED


def test_the_tcp_nest_is_found_after_other_protoinfo_attributes() -> None:
    other = nla(2, nla(1, b"\x05\x00\x00"), nested=True)  # CTA_PROTOINFO_DCCP, 7-byte inner
    assert state_of(other + tcp_nest(nla(STATE, bytes([ESTABLISHED])))) == ESTABLISHED
    # a state-numbered attribute outside the TCP nest is not the TCP state
    assert state_of(nla(STATE, bytes([ESTABLISHED]))) is None


@pytest.mark.parametrize("protoinfo", [
    tcp_nest(struct.pack("=HH", 2, STATE)),  # an attribute shorter than its header
    tcp_nest(struct.pack("=HH", 0, STATE)),  # a zero length (a walker must not stall on it)
    tcp_nest(struct.pack("=HH", 12, STATE) + bytes([ESTABLISHED, 0, 0, 0])),  # past its nest
    tcp_nest(nla(STATE)),  # a state without its byte
    struct.pack("=HH", 2, CTA_PROTOINFO_TCP | 0x8000),  # a TCP nest shorter than its header
    struct.pack("=HH", 40, CTA_PROTOINFO_TCP | 0x8000) + nla(STATE, bytes([ESTABLISHED])),
])
def test_a_malformed_protoinfo_reads_as_no_state_never_as_a_wrong_one(protoinfo: bytes) -> None:
    assert state_of(protoinfo) is None


def test_a_udp_entry_never_takes_a_tcp_state() -> None:
    udp = Flow(Proto.UDP, IPv4("192.168.1.23"), IPv4("203.0.113.9"), 40000, 27015)
    (entry,) = decode_entries(with_protoinfo(udp, tcp_nest(nla(STATE, bytes([TIME_WAIT])))))
    assert entry.tcp_state is None and not entry.closed


def test_entries_after_one_with_an_odd_length_are_all_read() -> None:
    """Each message starts at a 4-byte boundary: the one after a message whose length is not a
    multiple of 4 is found (a dump lists every followed flow)."""
    first = entry_msg(tcp4(), tcp_state=ESTABLISHED)
    odd = struct.pack("=I", len(first) - 2) + first[4:len(first) - 2] + b"\x00\x00"
    flows = [tcp4(dport=p) for p in (1, 2)]
    data = odd + b"".join(entry_msg(f, tcp_state=TIME_WAIT, mtype=CT_DELETE) for f in flows)
    got = decode_entries(data)
    assert [e.flow for e in got][-2:] == flows
    assert all(e.destroyed and e.closed for e in got[-2:])


# --- the kernel prefilter, run by the kernel over a Unix datagram socket pair -----------------


def kernel_passes(ports: list[PortRange], messages: list[bytes]) -> list[bool]:
    prog = build_filter(ports)
    assert prog is not None
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        attach_filter(rx, prog)
        rx.setblocking(False)
        for i, msg in enumerate(messages):  # each tagged by its sequence number
            tx.send(msg[:12] + struct.pack("=I", 0x1000 + i) + msg[16:])
        seen: set[int] = set()
        with contextlib.suppress(BlockingIOError):
            while True:
                seen.add(struct.unpack_from("=I", rx.recv(65536), 12)[0] - 0x1000)
    return [i in seen for i in range(len(messages))]


def v4(proto: Proto, dport: int) -> Flow:
    return Flow(proto, IPv4("192.168.1.23"), IPv4("203.0.113.9"), 40000, dport)


def v6(proto: Proto, dport: int) -> Flow:
    return Flow(proto, IPv6("fd00::23"), IPv6("2001:db8::9"), 40000, dport)


PORTS = [*parse_port_spec("udp/27015-27020"), *parse_port_spec("udp/3074"),
         *parse_port_spec("tcp/40000-40010"), *parse_port_spec("tcp/50000")]
EDGES = [(Proto.UDP, p) for p in (3073, 3074, 3075, 27014, 27015, 27016, 27019, 27020, 27021,
                                  40000, 50000)] + [
    (Proto.TCP, p) for p in (3074, 27015, 39999, 40000, 40001, 40009, 40010, 40011, 49999, 50000,
                             50001)]
WANTED = {(Proto.UDP, p) for p in (3074, 27015, 27016, 27019, 27020)} | {
    (Proto.TCP, p) for p in (40000, 40001, 40009, 40010, 50000)}


@pytest.mark.parametrize("make", [v4, v6], ids=["ipv4", "ipv6"])
def test_the_kernel_keeps_exactly_the_events_of_wanted_ports_at_every_range_edge(
        make: Callable[[Proto, int], Flow]) -> None:
    flows = [make(proto, port) for proto, port in EDGES]
    passed = kernel_passes(PORTS, [encode_flow(f) for f in flows])
    assert {(f.proto, f.dport) for f, p in zip(flows, passed, strict=True) if p} == WANTED
    # and what passes is what the parser then reports
    assert all(ConntrackParser().feed(encode_flow(f)) == [f]
               for f, p in zip(flows, passed, strict=True) if p)


def test_the_kernel_drops_other_protocols_and_a_protocol_no_rule_names() -> None:
    icmp = encode_new(1, IPv4("192.168.1.23"), IPv4("203.0.113.9"), 0, 27015)
    sctp6 = encode_new(132, IPv6("fd00::23"), IPv6("2001:db8::9"), 1, 27015)
    only_udp = [PortRange(Proto.UDP, 27015, 27015)]
    assert kernel_passes(only_udp, [icmp, sctp6, encode_flow(v4(Proto.TCP, 27015)),
                                    encode_flow(v6(Proto.TCP, 27015)),
                                    encode_flow(v4(Proto.UDP, 27015))]) == [
        False, False, False, False, True]


def test_the_kernel_lets_through_what_it_cannot_read_with_certainty() -> None:
    """Not a NEW event, another family, another layout: passed on, the parser decides."""
    wanted_not = v4(Proto.UDP, 9)
    msgs = [
        nlmsg(CT_DELETE, encode_flow(wanted_not)[16:]),  # a DESTROY event
        encode_flow(wanted_not)[:16] + b"\x07" + encode_flow(wanted_not)[17:],  # family 7
        encode_flow(wanted_not, leading_attr=True),  # status before the tuple
        encode_flow(wanted_not, reverse_ports=True),  # ports in the other order
        encode_flow(v6(Proto.UDP, 9), reverse_ip=True),
        encode_flow(wanted_not),  # the canonical layout: dropped
        encode_flow(v6(Proto.UDP, 9)),
    ]
    assert kernel_passes([PortRange(Proto.UDP, 27015, 27015)], msgs) == [
        True, True, True, True, True, False, False]


def test_the_state_is_read_after_empty_and_word_sized_tcp_attributes() -> None:
    """An attribute with no payload (4 bytes) or a 4-byte one (8, no padding) before the state:
    each is stepped over by exactly its length."""
    assert state_of(tcp_nest(nla(FLAGS_ORIG), nla(STATE, bytes([ESTABLISHED])))) == ESTABLISHED
    assert state_of(tcp_nest(nla(FLAGS_ORIG, b"\x07\x00\x07\x00"), nla(FLAGS_ORIG + 1, b"\x01"),
                             nla(STATE, bytes([TIME_WAIT])))) == TIME_WAIT


def test_an_empty_attribute_does_not_hide_the_timeout_and_status_after_it() -> None:
    body = entry_msg(tcp4(), timeout=None, tcp_state=ESTABLISHED)[16:]
    msg = nlmsg(CT_NEW, body + nla(8) + nla(7, struct.pack("!I", 300))
                + nla(3, struct.pack("!I", 0)), flags=0)
    (entry,) = decode_entries(msg)
    assert (entry.timeout, entry.status, entry.established) == (300, 0, True)


def test_a_header_only_message_does_not_end_the_datagram() -> None:
    """NLMSG_NOOP (type 1) with no payload, then the entries: all read."""
    flows = [tcp4(dport=1), tcp4(dport=2)]
    data = nlmsg(1, b"", flags=0) + b"".join(entry_msg(f, tcp_state=ESTABLISHED) for f in flows)
    assert [e.flow for e in decode_entries(data)] == flows


def test_a_message_whose_length_cuts_its_tuple_short_is_not_read_past_its_end() -> None:
    """The tuple's bytes are all in the datagram, but the message says it ends inside them:
    malformed (never a flow read from bytes that belong to no message)."""
    whole = encode_flow(udp4_flow())
    cut = struct.pack("=I", 16 + 4 + 12) + whole[4:]  # header, nfgenmsg, 12 bytes of the ORIG
    parser = ConntrackParser()
    assert parser.feed(cut) == [] and parser.counters()["malformed"] >= 1
    assert decode_entries(cut[:4] + struct.pack("=H", CT_NEW) + b"\x00\x00" + cut[8:]) == []


def test_a_tuple_without_its_destination_address_is_malformed_not_a_flow() -> None:
    flow = udp4_flow()
    ips = nla(1, flow.src.packed)  # CTA_IP_V4_SRC only
    ports = nla(1, bytes([17])) + nla(2, struct.pack("!H", flow.sport)) \
        + nla(3, struct.pack("!H", flow.dport))
    orig = nla(1, nla(1, ips, nested=True) + nla(2, ports, nested=True), nested=True)
    body = struct.pack("=BBH", 2, 0, 0) + orig
    parser = ConntrackParser()
    assert parser.feed(nlmsg(CT_NEW, body)) == []
    assert parser.counters()["malformed"] == 1
    assert decode_entries(nlmsg(CT_NEW, body, flags=0)) == []


def test_a_short_ipv6_event_at_the_end_of_a_datagram_is_counted_not_raised() -> None:
    v6flow = v6(Proto.UDP, 27015)
    whole = encode_flow(v6flow)
    short = struct.pack("=I", 16 + 4 + 60) + whole[4:16 + 4 + 60]  # less than the v6 layout
    parser = ConntrackParser()
    assert parser.feed(encode_flow(udp4_flow()) + short) == [udp4_flow()]
    assert parser.counters()["malformed"] == 1


def udp4_flow() -> Flow:
    return Flow(Proto.UDP, IPv4("192.168.1.23"), IPv4("203.0.113.9"), 40000, 27015)


@pytest.mark.parametrize("leading_attr", [False, True], ids=["kernel-layout", "other-layout"])
@pytest.mark.parametrize("number", [0, 1, 132])
def test_an_event_of_another_protocol_is_counted_as_such_not_as_malformed(
        number: int, leading_attr: bool) -> None:
    """The metrics tell a protocol we do not map (ICMP, SCTP, even number 0) from broken bytes."""
    parser = ConntrackParser()
    assert parser.feed(encode_new(number, IPv4("192.168.1.23"), IPv4("203.0.113.9"), 1, 2,
                                  leading_attr=leading_attr)) == []
    assert (parser.counters()["ignored"], parser.counters()["malformed"]) == (1, 0)


def test_the_counters_add_up_every_event_of_every_datagram() -> None:
    """The metrics count each event: two of each kind per datagram, two datagrams, four each."""
    icmp = encode_new(1, IPv4("192.168.1.23"), IPv4("203.0.113.9"), 0, 0)
    parser = ConntrackParser(wanted=lambda proto, port: port == 27015)
    for _ in range(2):
        data = (icmp + icmp + encode_flow(v4(Proto.UDP, 9)) + encode_flow(v6(Proto.TCP, 9))
                + encode_flow(v4(Proto.UDP, 27015)) + encode_flow(v6(Proto.UDP, 27015)))
        assert parser.feed(data) == [v4(Proto.UDP, 27015), v6(Proto.UDP, 27015)]
    counters = parser.counters()
    assert (counters["ignored"], counters["flows_filtered"], counters["flows_reported"],
            counters["events_seen"], counters["datagrams"]) == (4, 4, 4, 12, 2)
