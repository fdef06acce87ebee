"""Topology 2 of the IGD front (issue 14): "in use" is a flow to OR from a client's mapped
internal port. An app that only sends out from its mapped port (a game server, a torrent client
talking first) starts flows whose *source* port is the mapped one; every place a detector
drops flows early (the kernel's BPF filter, the NEW-event parser, the start-up dump, the socket
table) must keep those too, not only flows to a port of interest."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path

from igdtrigger.config import parse_config
from igdtrigger.core.model import Flow, PortRange, Proto
from igdtrigger.detect.base import EitherEnd, source_filter
from igdtrigger.detect.ctfilter import build_filter
from igdtrigger.detect.ctnetlink import ConntrackParser
from igdtrigger.detect.ctquery import decode_entries
from igdtrigger.detect.nfttrack import KernelTracking, _count, ruleset
from igdtrigger.detect.sockets import SocketTableDetector
from igdtrigger.front.serving import build_front
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway
from .test_conntrack import IPv4, IPv6, encode_flow
from .test_conntrack_follow import entry_msg, run_bpf
from .test_front_manager import A, make, req
from .test_nfttrack import FakeDetector, FakeNft

MAPPED = 40007  # a client's mapped internal port
PEER = IPv4("203.0.113.9")


def out_from(port: int, dport: int = 9, proto: Proto = Proto.UDP) -> Flow:
    """A flow the app starts from ``port`` to a WAN peer's ``dport``."""
    return Flow(proto, IPv4("192.168.77.10"), PEER, port, dport)


def test_the_kernel_filter_keeps_an_event_whose_source_port_is_mapped() -> None:
    trigger = [PortRange(Proto.UDP, 27015, 27015)]
    mapped = [PortRange(Proto.UDP, MAPPED, MAPPED), PortRange(Proto.TCP, 6881, 6889)]
    prog = build_filter(trigger, mapped)
    assert prog is not None
    v6 = Flow(Proto.UDP, IPv6("fd00::23"), IPv6("2001:db8::9"), MAPPED, 3478)
    kept = [out_from(MAPPED), out_from(MAPPED, dport=53), out_from(6881, proto=Proto.TCP),
            out_from(6889, dport=443, proto=Proto.TCP), v6,
            out_from(50000, dport=27015)]  # the rules' destination ports still pass
    dropped = [out_from(MAPPED - 1), out_from(MAPPED + 1), out_from(MAPPED, proto=Proto.TCP),
               out_from(6890, proto=Proto.TCP), out_from(6881),  # 6881 is mapped for TCP only
               Flow(Proto.UDP, v6.src, v6.dst, 5000, 3478),
               out_from(50000, dport=MAPPED + 1)]
    for f in kept:
        assert run_bpf(prog, encode_flow(f)) != 0, f
    for f in dropped:
        assert run_bpf(prog, encode_flow(f)) == 0, f
    # the kind before this: on the destination port only, an outbound-only app is dropped
    dest_only = build_filter(trigger)
    assert dest_only is not None and run_bpf(dest_only, encode_flow(out_from(MAPPED))) == 0
    assert build_filter(trigger, ()) == dest_only  # no source ports: the same program


def test_the_kernel_filter_counts_source_ranges_against_its_size() -> None:
    many = [PortRange(Proto.UDP, p, p) for p in range(1, 3000, 2)]
    assert build_filter([], many) is None  # too big: the caller filters in Python instead


def _front_filter() -> EitherEnd:
    """A prefilter as the front wires it: the rules' port 27015 on the destination side, the
    client's mapped port on both."""
    def mapped(proto: Proto, port: int) -> bool:
        return proto is Proto.UDP and port == MAPPED

    return EitherEnd(lambda proto, port: port == 27015 or mapped(proto, port), mapped)


def test_the_event_parser_keeps_a_flow_from_a_mapped_port_on_both_paths() -> None:
    data = b"".join(encode_flow(f) for f in (out_from(MAPPED), out_from(5000), out_from(5001)))
    zoned = encode_flow(out_from(MAPPED), zone=True)  # another layout: the generic walk
    parser = ConntrackParser(_front_filter())
    assert parser.feed(data) == [out_from(MAPPED)]
    assert parser.feed(zoned) == [out_from(MAPPED)]
    assert parser.flows_filtered == 2
    assert ConntrackParser(lambda proto, port: port == 27015).feed(data) == []  # before


def test_the_start_up_dump_keeps_a_live_flow_from_a_mapped_port() -> None:
    data = entry_msg(out_from(MAPPED)) + entry_msg(out_from(5000))
    assert [e.flow for e in decode_entries(data, _front_filter())] == [out_from(MAPPED)]
    assert decode_entries(data, lambda proto, port: port == 27015) == []


def test_the_socket_table_keeps_a_connected_socket_on_a_mapped_local_port() -> None:
    conns = [(Proto.UDP, "192.168.77.10", MAPPED, str(PEER), 9),
             (Proto.UDP, "192.168.77.10", 5000, str(PEER), 9)]
    det = SocketTableDetector(reader=lambda: conns, wanted=_front_filter())
    assert det.poll() == [out_from(MAPPED)]
    det = SocketTableDetector(reader=lambda: conns, wanted=lambda proto, port: port == 27015)
    assert det.poll() == []


class _Detector:
    def __init__(self) -> None:
        self.wanted: Callable[[Proto, int], bool] = lambda proto, port: port == 27015
        self.follows: Callable[[Flow], bool] = lambda flow: False


async def test_the_front_wires_its_mapped_internal_ports_as_source_ports(
        tmp_path: Path) -> None:
    """Topology 2: the upstream mapping points at the client; the app only sends out from
    its mapped port. The detector's prefilter keeps that flow, the manager follows it, and
    it is use of the mapping."""
    clock = FakeClock()
    svc = make(tmp_path, FakeGateway(clock, local_address="192.168.1.10",
                                     external_address="100.64.0.7"), clock)
    det = _Detector()
    runner = build_front(svc, [det])
    await svc.start()
    try:
        source = source_filter(det.wanted)
        assert source is not None and not source(Proto.UDP, MAPPED)
        await runner.manager.add(req(port=MAPPED))
        flow = Flow(Proto.UDP, ipaddress.ip_address(A), PEER, MAPPED, 9)
        assert source(Proto.UDP, MAPPED) and not det.wanted(Proto.UDP, 9)
        assert ConntrackParser(det.wanted).feed(encode_flow(flow)) == [flow]
        svc.observe(flow)  # reported, then asked about (conntrack.py's on_readable)
        assert det.follows(flow)  # its later packets are looked at (ctquery follow-up)
        other = Flow(Proto.UDP, ipaddress.ip_address("192.168.1.99"), PEER, MAPPED, 9)
        svc.observe(other)
        assert not det.follows(other)  # another host's flow from that port is not use
        (m,) = runner.manager.mappings()
        clock.advance(300)
        svc.observe(flow)
        assert m.last_use == clock.now
    finally:
        await runner.stop()
        await svc.stop()



async def _tracking_run(tmp_path: Path, cfg: dict[str, object]) -> tuple[FakeNft, bool, bool]:
    """(nft calls, table loaded while running, conntrack reported active) for ``cfg``."""
    clock = FakeClock()
    nft = FakeNft()
    tracking = KernelTracking(nft="/usr/sbin/nft", runner=nft, probe=lambda t, w: False,
                              netlink=False)
    svc = Service(parse_config(cfg), FakeGateway(clock), clock=clock, state_dir=tmp_path,
                  detectors=[FakeDetector("conntrack")], tracking=tracking)
    await svc.start()
    try:
        (st,) = [d for d in svc.status()["detectors"] if d["name"] == "conntrack"]
        loaded = nft.table
    finally:
        await svc.stop()
    assert not nft.table  # removed at stop either way
    if loaded:  # status says what the table does, not "trigger flows" there are none of
        assert "the kernel tracks every flow, for the IGD front" in st["detail"], st
    return nft, loaded, st["active"]


async def test_with_the_front_and_no_rule_the_kernel_is_made_to_track(tmp_path: Path) -> None:
    """A plain desktop (no firewall rule: the kernel tracks nothing) running only the front:
    its clients' ports are not known in advance, so igdtrigger's own table makes the kernel
    track every flow; without the front and with no trigger port it loads no table."""
    nft, loaded, active = await _tracking_run(tmp_path, {"front": {"enabled": True}})
    assert loaded and active
    assert "chain all_flows" in nft.calls[0][1]
    nft, loaded, active = await _tracking_run(tmp_path / "b", {})
    assert not loaded and not active
    assert "all_flows" not in "".join(s for _a, s in nft.calls)


def test_the_all_flows_chain_is_not_counted_as_trigger_flows() -> None:
    trigger = [PortRange(Proto.UDP, 27015, 27015)]
    text = ruleset(trigger, [], track_all=True)
    assert text.count("ct state new counter") == 3  # out, forward, and all_flows
    assert ruleset(trigger, []) == text.replace(
        "    chain all_flows {\n        type filter hook output priority 0; policy accept;\n"
        "        ct state new counter\n    }\n", "")
    listing = {"nftables": [
        {"rule": {"chain": "trigger_out", "expr": [{"counter": {"packets": 3}}]}},
        {"rule": {"chain": "all_flows", "expr": [{"counter": {"packets": 900}}]}}]}
    assert _count(json.dumps(listing)) == 3  # every flow of the host is no trigger flow
