"""IPv6 triggers open the same machine's IPv4 ports (detect/hostmap.py), without sockets."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.config import parse_config
from igdtrigger.core.model import Flow, Proto
from igdtrigger.detect.hostmap import (
    NDA_DST,
    NDA_LLADDR,
    NLMSG_DONE,
    NUD_FAILED,
    RTM_NEWNEIGH,
    HostMap,
    Neighbor,
    parse_neighbors,
    read_neighbors,
)
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway

V6 = ipaddress.IPv6Address
V4 = ipaddress.IPv4Address
MAC_A = bytes.fromhex("020000000a0a")
MAC_B = bytes.fromhex("020000000b0b")


def neigh_msg(addr: str, mac: bytes | None, state: int = 0x02) -> bytes:
    ip = ipaddress.ip_address(addr)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    attrs = struct.pack("=HH", 4 + len(ip.packed), NDA_DST) + ip.packed
    if mac is not None:
        attrs += struct.pack("=HH", 4 + len(mac), NDA_LLADDR) + mac + b"\0" * (-len(mac) % 4)
    body = struct.pack("=BxxxiHBB", family, 2, state, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWNEIGH, 2, 1, 0) + body


DONE = struct.pack("=IHHII", 20, NLMSG_DONE, 2, 1, 0) + b"\0\0\0\0"


def test_parse_a_neighbour_dump() -> None:
    data = (neigh_msg("192.168.1.20", MAC_A) + neigh_msg("2a0c::20", MAC_A)
            + neigh_msg("192.168.1.30", MAC_B, state=NUD_FAILED)  # no longer there
            + neigh_msg("fe80::1", None) + DONE)
    found, done = parse_neighbors(data)
    assert done
    assert found == [(V4("192.168.1.20"), MAC_A), (V6("2a0c::20"), MAC_A)]


def test_truncated_dump_is_not_done_and_keeps_what_parsed() -> None:
    data = neigh_msg("192.168.1.20", MAC_A) + neigh_msg("2a0c::20", MAC_A)[:-7]
    found, done = parse_neighbors(data)
    assert (found, done) == ([(V4("192.168.1.20"), MAC_A)], False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_without_error(data: bytes) -> None:
    found, _ = parse_neighbors(data)
    assert all(len(mac) > 0 for _, mac in found)


def test_this_hosts_neighbour_table_reads() -> None:
    """The real netlink dump (Linux) returns well-formed entries, no error."""
    for addr, mac in read_neighbors():
        assert isinstance(addr, V4 | V6)
        assert mac


class Readers:
    def __init__(self) -> None:
        self.table: list[Neighbor] = []
        self.own: set[V6] = {V6("2a0c::10")}
        self.reads = 0

    def neighbors(self) -> list[Neighbor]:
        self.reads += 1
        return list(self.table)

    def own_v6(self) -> set[V6]:
        return set(self.own)


def make_map(clock: FakeClock, r: Readers) -> HostMap:
    return HostMap(lambda: "192.168.1.10", clock=clock, neighbors=r.neighbors,
                   own_ipv6=r.own_v6, refresh_every=5.0)


def test_own_addresses_map_to_our_ipv4() -> None:
    clock, r = FakeClock(), Readers()
    assert make_map(clock, r).ipv4_for(V6("2a0c::10")) == "192.168.1.10"


def test_other_hosts_map_by_mac_and_unknown_ones_do_not() -> None:
    clock, r = FakeClock(), Readers()
    r.table = [(V4("192.168.1.20"), MAC_A), (V6("2a0c::20"), MAC_A), (V6("2a0c::30"), MAC_B)]
    hm = make_map(clock, r)
    assert hm.ipv4_for(V6("2a0c::20")) == "192.168.1.20"
    assert hm.ipv4_for(V6("2a0c::30")) is None  # no IPv4 neighbour with that MAC
    assert hm.unresolved == 1
    assert hm.ipv4_for(V6("::ffff:192.168.1.40")) == "192.168.1.40"


def test_table_is_reread_on_a_miss_at_most_every_few_seconds() -> None:
    clock, r = FakeClock(), Readers()
    hm = make_map(clock, r)
    assert hm.ipv4_for(V6("2a0c::20")) is None
    assert hm.ipv4_for(V6("2a0c::20")) is None
    assert r.reads == 1  # a burst of unknown sources costs one dump
    r.table = [(V4("192.168.1.20"), MAC_A), (V6("2a0c::20"), MAC_A)]
    clock.advance(5)
    assert hm.ipv4_for(V6("2a0c::20")) == "192.168.1.20"
    assert hm.ipv4_for(V6("2a0c::20")) == "192.168.1.20"
    assert r.reads == 2


async def test_service_turns_an_ipv6_trigger_into_ipv4_mappings(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = parse_config({"rules": [{"name": "g", "trigger": ["udp/27015"],
                                   "open": ["udp/40000"]}]})
    svc = Service(cfg, FakeGateway(clock, local_address="192.168.1.10"), clock=clock,
                  state_dir=tmp_path)
    r = Readers()
    r.table = [(V4("192.168.1.20"), MAC_A), (V6("2a0c::20"), MAC_A)]
    svc.hostmap = make_map(clock, r)
    server = V6("2a0c:5bc1::2")
    svc.observe(Flow(Proto.UDP, V6("2a0c::20"), server, 5000, 27015))
    svc.observe(Flow(Proto.UDP, V6("2a0c::99"), server, 5000, 27015))  # unknown: nothing
    svc.observe(Flow(Proto.UDP, V6("2a0c::20"), server, 5000, 9999))  # not a trigger port
    assert [a.host for a in svc.pipeline.engine.activations.values()] == ["192.168.1.20"]
    assert r.reads == 1
    svc.pipeline.journal.close()
