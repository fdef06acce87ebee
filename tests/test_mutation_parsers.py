"""The config file parser and the conntrack message parser: what a user would notice, each case
found by a mutant that survived every other test (issue 19: `python -m bench.mutation config
conntrack`)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from pathlib import Path

import pytest

from igdtrigger.config import default_config_paths, load_config, parse_config
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import Flow, PortRange, Proto, parse_port_spec
from igdtrigger.detect.ctfilter import attach_filter, build_filter
from igdtrigger.detect.ctnetlink import CT_GET, CT_GET_STATS, ConntrackParser
from igdtrigger.detect.ctquery import (
    CtEntry,
    decode_entries,
    decode_stats_reply,
    encode_get,
    encode_stats_request,
)

from .test_conntrack import CT_NEW, encode_flow, nla, nlmsg, udp4
from .test_conntrack_follow import ESTABLISHED, entry_msg, tcp4

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

RULE = {"name": "game", "open": ["udp/27015"]}


# --- config: where it is looked for ------------------------------------------------------------


def test_without_xdg_the_user_config_is_under_home_dot_config_then_etc(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("IGDTRIGGER_CONFIG", "XDG_CONFIG_HOME", "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_config_paths() == [tmp_path / ".config" / "igdtrigger" / "config.toml",
                                      Path("/etc/igdtrigger/config.toml")]


# --- config: what is not a config file says what it is ------------------------------------------


def test_a_device_given_as_the_config_is_named_a_device() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("/dev/null")
    assert "not a regular file (a device)" in str(e.value)
    assert e.value.source == "/dev/null"


def test_a_socket_given_as_the_config_is_named_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        with pytest.raises(ConfigError) as e:
            load_config(path)
    assert "not a regular file (a socket)" in str(e.value)


def test_a_directory_given_as_the_config_reads_as_such_and_nothing_more(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == f"{tmp_path}: cannot read: {os.strerror(21)}"  # EISDIR


# --- config: values at their limits -------------------------------------------------------------


def test_api_max_per_host_is_at_most_1000() -> None:
    assert parse_config({"api": {"max_per_host": 1000}}).api.max_per_host == 1000
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"max_per_host": 1001}})
    assert e.value.field == "api.max_per_host"


def test_a_launcher_id_is_everything_after_the_launchers_name() -> None:
    cfg = parse_config({"rules": [RULE], "launchers": {"heroic:legendary:Fortnite": "game"}})
    assert cfg.launchers == (("heroic:legendary:Fortnite", "game"),)


def test_an_error_in_config_data_without_a_file_names_its_source_as_config() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"max_per_host": 0}})
    assert e.value.source == "<config>"
    assert str(e.value).startswith("<config>: api.max_per_host: ")


# --- conntrack: messages and counters ------------------------------------------------------------

def _tuple_without_source(flow: Flow) -> bytes:
    """An original tuple naming the destination, ports and protocol but no source address."""
    ips = nla(2, flow.dst.packed)  # CTA_IP_V4_DST only
    ports = nla(1, bytes([flow.proto.number])) + nla(2, struct.pack("!H", flow.sport)) \
        + nla(3, struct.pack("!H", flow.dport))
    return nla(1, nla(1, ips, nested=True) + nla(2, ports, nested=True), nested=True)


def test_a_tuple_without_its_source_address_is_malformed_not_a_flow() -> None:
    flow = udp4()
    body = struct.pack("=BBH", 2, 0, 0) + _tuple_without_source(flow)
    parser = ConntrackParser()
    assert parser.feed(nlmsg(CT_NEW, body)) == []
    assert parser.counters()["malformed"] == 1
    assert decode_entries(nlmsg(CT_NEW, body, flags=0)) == []


def test_a_receive_of_zero_bytes_decodes_nothing_left_in_the_buffer() -> None:
    """recv_into reuses one buffer: a zero-byte receive must not decode the last datagram's
    bytes again."""
    buf = bytearray(encode_flow(udp4()))
    parser = ConntrackParser()
    assert parser.feed(buf, len(buf)) == [udp4()]
    assert parser.feed(buf, 0) == []
    assert parser.counters()["flows_reported"] == 1


def test_every_unwanted_ipv6_flow_in_a_datagram_is_counted() -> None:
    flows = [Flow(Proto.UDP, IPv6("fd00::2"), IPv6("2a00::1"), 5000 + i, 3074) for i in range(3)]
    parser = ConntrackParser(lambda proto, port: port == 27015)
    assert parser.feed(b"".join(encode_flow(f) for f in flows)) == []
    assert parser.counters()["flows_filtered"] == 3


def test_only_conntrack_entries_are_decoded_not_other_message_types() -> None:
    """A GET request (our own, echoed) carries the same tuple: it is not an entry."""
    get = entry_msg(udp4(), mtype=CT_GET)
    assert decode_entries(get) == []
    assert [e.flow for e in decode_entries(get + entry_msg(tcp4()))] == [tcp4()]


def test_an_entry_without_status_bits_reads_as_none_set() -> None:
    body = encode_flow(udp4())[16:]
    # encode_flow ends with CTA_ID and CTA_STATUS: keep the tuples only
    orig_len = struct.unpack_from("=H", body, 4)[0]
    reply_len = struct.unpack_from("=H", body, 4 + orig_len)[0]
    bare = nlmsg(CT_NEW, body[:4 + orig_len + reply_len] + nla(7, struct.pack("!I", 30)),
                 flags=0)
    assert decode_entries(bare) == [CtEntry(udp4(), 30, 0, None)]


def test_a_tcp_entrys_state_is_read_from_protoinfo_only() -> None:
    """Attributes after the protoinfo (the kernel adds CTA_ID, CTA_USE, CTA_MARK...) do not
    overwrite the connection's state."""
    msg = entry_msg(tcp4(), tcp_state=ESTABLISHED)
    msg = nlmsg(CT_NEW, msg[16:] + nla(12, struct.pack("!I", 0xDEAD)) + nla(8, bytes(4)),
                flags=0)
    (e,) = decode_entries(msg)
    assert e.established


def test_the_get_request_header_is_what_ctnetlink_expects() -> None:
    """nfgenmsg version NFNETLINK_V0 and res_id 0; nlmsg_pid 0 (the kernel's port)."""
    for flow in (udp4(), None):
        req = encode_get(flow, 5)
        _, _, _, seq, pid = struct.unpack_from("=IHHII", req)
        _family, version, res_id = struct.unpack_from("=BBH", req, 16)
        assert (seq, pid, version, res_id) == (5, 0, 0, 0)


# --- conntrack: the kernel-side prefilter --------------------------------------------------------


def test_many_adjacent_single_ports_still_get_a_kernel_filter() -> None:
    """Rules listing 2,000 neighbouring ports one by one: merged into one range, the filter
    fits (instead of every event reaching user space)."""
    prog = build_filter([PortRange(Proto.UDP, p, p) for p in range(20000, 22000)])
    assert prog is not None
    assert prog == build_filter([PortRange(Proto.UDP, 20000, 21999)])


def test_the_filter_attached_to_a_socket_drops_unwanted_events_in_the_kernel() -> None:
    """SO_ATTACH_FILTER needs no privilege: on a Unix datagram socket pair the kernel runs the
    same program over each datagram as it would over a ctnetlink event."""
    prog = build_filter([*parse_port_spec("udp/27015"), *parse_port_spec("tcp/40000-40010")])
    assert prog is not None
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        attach_filter(rx, prog)
        rx.setblocking(False)
        wanted = [udp4(), tcp4(dport=40005)]
        for f in (udp4(dport=27016), *wanted, tcp4(dport=27015)):
            tx.send(encode_flow(f))
        got: list[Flow] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got += ConntrackParser().feed(rx.recv(65536))
    assert got == wanted


# --- conntrack: the table-size query (doctor, the no-tracking hint) ----------------------------


def test_the_table_size_request_is_a_ct_get_stats_for_every_family() -> None:
    req = encode_stats_request(41)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, mtype, flags, seq, pid) == (20, CT_GET_STATS, 0x1, 41, 0)
    assert struct.unpack_from("=BBH", req, 16) == (0, 0, 0)  # AF_UNSPEC, NFNETLINK_V0, res_id 0
    assert len(req) == 20


def stats_reply(seq: int, entries: int) -> bytes:
    return nlmsg(CT_GET_STATS, struct.pack("=BBH", 0, 0, 0) + nla(1, struct.pack("!I", entries)),
                 flags=0, seq=seq)


def test_the_table_size_reply_is_matched_to_its_request() -> None:
    other = stats_reply(6, 99)
    assert decode_stats_reply(other + stats_reply(7, 1234), 7) == (True, 1234)
    assert decode_stats_reply(other, 7) == (False, None)
    assert decode_stats_reply(b"", 7) == (False, None)
    assert decode_stats_reply(stats_reply(7, 5)[:19], 7) == (False, None)  # cut short
    ack = nlmsg(2, struct.pack("=i", 0), flags=0, seq=7)
    assert decode_stats_reply(other + ack, 7) == (True, None)  # an ACK without a count
    assert decode_stats_reply(nlmsg(3, b"", flags=0, seq=7) + stats_reply(7, 8), 7) == (True, 8)


def test_a_refused_table_size_query_raises_the_kernels_errno() -> None:
    refused = nlmsg(2, struct.pack("=i", -1), flags=0, seq=7)  # EPERM
    with pytest.raises(OSError, match=os.strerror(1)) as e:
        decode_stats_reply(stats_reply(6, 3) + refused, 7)
    assert e.value.errno == 1 and e.value.strerror == os.strerror(1)
    assert decode_stats_reply(refused[:19], 7) == (False, None)  # cut short
    assert decode_stats_reply(nlmsg(2, b"", flags=0, seq=7), 7) == (False, None)  # no errno


def test_a_fifo_given_as_the_config_is_named_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as e:
        load_config(fifo)
    assert "not a regular file (a FIFO)" in str(e.value)


def test_an_empty_config_path_says_so() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("")
    assert str(e.value) == "'': an empty path names no config file"
