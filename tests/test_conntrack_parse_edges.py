"""The ctnetlink parser at its edges (sans I/O), each case found by a mutant that no other test
killed: attribute padding and lengths at their minimum, the flag bits in attribute types, the
conntrack table-size reply, and the fast path's layout checks against the generic walker."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from igdtrigger.core.model import Flow, Proto
from igdtrigger.detect.ctnetlink import ConntrackParser, parse_messages
from igdtrigger.detect.ctquery import _stats_entries

from .test_conntrack import CT_NEW, encode_flow, encode_new, nla, nlmsg

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


def stats(*attrs: bytes) -> bytes:
    return b"".join(attrs)


def test_table_size_reply() -> None:
    entries = nla(1, struct.pack("!I", 1234))
    assert _stats_entries(entries, 0, len(entries)) == 1234
    other = nla(2, b"\x01")  # 5 bytes, padded to 8
    data = other + entries
    assert _stats_entries(data, 0, len(data)) == 1234
    nested_flag = struct.pack("=HH", 8, 1 | 0x4000) + struct.pack("!I", 7)
    assert _stats_entries(nested_flag, 0, 8) == 7
    short = struct.pack("=HH", 7, 1) + b"\x00\x00\x01" + b"\x00"
    assert _stats_entries(short + entries, 0, 8 + len(entries)) == 1234  # too short: skipped
    assert _stats_entries(struct.pack("=HH", 3, 1) + entries, 0, 4 + len(entries)) is None
    assert _stats_entries(struct.pack("=HH", 40, 1) + bytes(4), 0, 8) is None  # overruns end
    assert _stats_entries(entries, 0, 7) is None
    assert _stats_entries(b"", 0, 0) is None
    assert _stats_entries(bytes(4) + entries, 4, 4 + len(entries)) == 1234  # from an offset


@pytest.mark.parametrize("flow", [
    Flow(Proto.UDP, IPv4("192.168.1.2"), IPv4("81.2.69.160"), 1, 65535),
    Flow(Proto.TCP, IPv4("192.168.1.2"), IPv4("81.2.69.160"), 65535, 1),
    Flow(Proto.TCP, IPv6("fd00::2"), IPv6("2a00:1450::1"), 0, 0),
    Flow(Proto.UDP, IPv6("fe80::1"), IPv6("ff02::fb"), 5353, 5353),
])
@pytest.mark.parametrize("opts", [{}, {"nested": False}, {"reverse_ports": True},
                                  {"reply": False}, {"leading_attr": True}])
def test_fast_and_generic_paths_agree(flow: Flow, opts: dict[str, bool]) -> None:
    parser = ConntrackParser()
    assert parser.feed(encode_flow(flow, **opts)) == [flow]
    assert parser.counters() == {"datagrams": 1, "errors": 0, "events_seen": 1,
                                 "flows_filtered": 0, "flows_reported": 1, "ignored": 0,
                                 "malformed": 0, "other": 0, "overruns": 0}


@pytest.mark.parametrize("v6", [False, True])
def test_other_protocol_on_each_path_is_ignored_not_malformed(v6: bool) -> None:
    src, dst = (IPv6("fd00::2"), IPv6("2a00::1")) if v6 else (IPv4("10.0.0.2"),
                                                                IPv4("81.2.69.160"))
    for opts in ({}, {"nested": False}):
        parser = ConntrackParser()
        assert parser.feed(encode_new(132, src, dst, 1, 2, **opts)) == []  # SCTP
        assert (parser.ignored, parser.malformed, parser.events_seen) == (1, 0, 1)


@pytest.mark.parametrize("v6", [False, True])
def test_wanted_filter_on_each_path(v6: bool) -> None:
    src, dst = (IPv6("fd00::2"), IPv6("2a00::1")) if v6 else (IPv4("10.0.0.2"),
                                                                IPv4("81.2.69.160"))
    flow = Flow(Proto.UDP, src, dst, 1, 27015)
    for opts in ({}, {"nested": False}):
        parser = ConntrackParser(lambda p, port: port != 27015)
        assert parser.feed(encode_flow(flow, **opts)) == []
        assert (parser.flows_filtered, parser.flows_reported) == (1, 0)
        keep = ConntrackParser(lambda p, port: p is Proto.UDP and port == 27015)
        assert keep.feed(encode_flow(flow, **opts)) == [flow]


def test_counters_accumulate_over_datagrams() -> None:
    parser = ConntrackParser()
    flow = Flow(Proto.UDP, IPv4("10.0.0.2"), IPv4("81.2.69.160"), 1, 2)
    for _ in range(3):
        parser.feed(encode_flow(flow) + nlmsg(1, b"", flags=0) + nlmsg(4, b"", flags=0)
                    + b"\x00")
    assert parser.counters() == {"datagrams": 3, "errors": 0, "events_seen": 3,
                                 "flows_filtered": 0, "flows_reported": 3, "ignored": 0,
                                 "malformed": 3, "other": 3, "overruns": 3}


def test_message_of_exactly_the_header_and_nfgenmsg() -> None:
    parser = ConntrackParser()
    assert parser.feed(nlmsg(CT_NEW, b"\x02\x00\x00\x00")) == []
    assert (parser.events_seen, parser.malformed) == (1, 1)
    parser = ConntrackParser()
    assert parser.feed(nlmsg(CT_NEW, b"\x02\x00")) == []  # 18 bytes: no room for nfgenmsg
    assert parser.malformed == 1
    err = nlmsg(2, struct.pack("=i", -1), flags=0)  # exactly header + errno
    parser = ConntrackParser()
    parser.feed(err)
    assert (parser.errors, parser.malformed) == (1, 0)


def test_attribute_of_exactly_minimum_sizes() -> None:
    # a tuple whose IPv4 address attributes are 8 bytes and ports 6: the smallest allowed
    tup = (nla(1, nla(1, bytes([10, 0, 0, 2])) + nla(2, bytes([81, 2, 69, 160])), nested=True)
           + nla(2, nla(1, b"\x11") + nla(2, b"\x00\x05") + nla(3, b"\x00\x06"), nested=True))
    msg = nlmsg(CT_NEW, b"\x02\x00\x00\x00" + nla(9, b"") + nla(1, tup, nested=True))
    assert parse_messages(msg) == [Flow(Proto.UDP, IPv4("10.0.0.2"), IPv4("81.2.69.160"), 5, 6)]
    # an empty attribute (length 4) before the tuple is skipped, not taken as malformed
    v4_short = (nla(1, nla(1, bytes(3)) + nla(2, bytes(4)), nested=True)
                + nla(2, nla(1, b"\x11") + nla(2, b"\x00\x05") + nla(3, b"\x00\x06"),
                      nested=True))
    parser = ConntrackParser()
    assert parser.feed(nlmsg(CT_NEW, b"\x02\x00\x00\x00" + nla(1, v4_short, nested=True))) == []
    assert parser.malformed == 1


def test_table_size_reply_after_other_attributes_from_an_offset() -> None:
    entries = nla(1, struct.pack("!I", 99))
    empty = nla(5, b"")  # a 4-byte attribute: valid, skipped
    aligned = nla(2, bytes(4))  # 8 bytes
    data = bytes(4) + empty + aligned + empty + entries
    assert _stats_entries(data, 4, len(data)) == 99
    assert _stats_entries(data, 4, len(data) - 1) is None  # entries cut off by end


def _ip4() -> bytes:
    return nla(1, nla(1, bytes([10, 0, 0, 2])) + nla(2, bytes([81, 2, 69, 160])), nested=True)


def _ports(num: int = 17) -> bytes:
    return nla(2, nla(1, bytes([num])) + nla(2, b"\x00\x05") + nla(3, b"\x00\x06"), nested=True)


def _msg(orig_inner: bytes) -> bytes:
    return nlmsg(CT_NEW, b"\x02\x00\x00\x00" + nla(1, orig_inner, nested=True))


FLOW4 = Flow(Proto.UDP, IPv4("10.0.0.2"), IPv4("81.2.69.160"), 5, 6)


def test_generic_walker_skips_empty_attributes_at_both_levels() -> None:
    empty = nla(9, b"")
    assert parse_messages(_msg(empty + _ip4() + _ports())) == [FLOW4]
    inner_empty = nla(1, empty + nla(1, bytes([10, 0, 0, 2])) + nla(2, bytes([81, 2, 69, 160])),
                      nested=True)
    assert parse_messages(_msg(inner_empty + _ports())) == [FLOW4]


@pytest.mark.parametrize("alen", [0, 1, 2, 3])
def test_generic_walker_refuses_attribute_lengths_below_the_header(alen: int) -> None:
    lie = struct.pack("=HH", alen, 9) + bytes(4)
    for data in (_msg(lie + _ip4() + _ports()),
                 _msg(nla(1, lie + nla(1, bytes([10, 0, 0, 2])) + nla(2, bytes(4)),
                          nested=True) + _ports())):
        parser = ConntrackParser()
        assert parser.feed(data) == []
        assert parser.malformed == 1


def test_generic_walker_refuses_attributes_running_past_their_parent() -> None:
    overlong = struct.pack("=HH", 64, 9) + bytes(4)
    inner_overlong = nla(1, nla(1, bytes([10, 0, 0, 2])) + struct.pack("=HH", 64, 2)
                         + bytes(4), nested=True)
    for data in (_msg(_ip4() + _ports() + overlong), _msg(inner_overlong + _ports())):
        parser = ConntrackParser()
        assert parser.feed(data + encode_flow(FLOW4)) == [FLOW4]
        assert parser.malformed == 1


def test_mixed_families_in_either_order_are_malformed() -> None:
    v6_then_v4 = nla(1, nla(3, bytes(16)) + nla(2, bytes([81, 2, 69, 160])), nested=True)
    v4_then_v6 = nla(1, nla(1, bytes(4)) + nla(4, bytes(16)), nested=True)
    for ips in (v6_then_v4, v4_then_v6):
        parser = ConntrackParser()
        assert parser.feed(_msg(ips + _ports())) == []
        assert parser.malformed == 1


def test_parse_messages_applies_the_filter() -> None:
    data = encode_flow(FLOW4)
    assert parse_messages(data, lambda p, port: False) == []
    assert parse_messages(data, lambda p, port: port == 6) == [FLOW4]


def test_every_malformed_piece_of_one_datagram_is_counted() -> None:
    parser = ConntrackParser()
    data = (nlmsg(CT_NEW, b"\x02\x00\x00\x00")  # no room for a tuple
            + nlmsg(2, b"", flags=0)  # an error message without its errno
            + b"\x00")  # a tail too short for a header
    assert parser.feed(data) == []
    assert (parser.events_seen, parser.malformed, parser.errors) == (1, 3, 0)
