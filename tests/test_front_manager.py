"""The IGD front's manager: policy, leases, idle, conflicts, crash restore (issue 14)."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from igdtrigger.api.metrics import Metrics
from igdtrigger.config import parse_config
from igdtrigger.core.activation import Source
from igdtrigger.core.model import Flow, FlowLive, MappingKey, PortRange, Proto
from igdtrigger.front.manager import (
    ClientRequest,
    FrontManager,
    FrontProtocol,
    Grant,
    Refusal,
    RefusalKind,
)
from igdtrigger.front.serving import build_front, drop_front, front_checks
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway

A = "192.168.1.20"
B = "192.168.1.30"
FRONT = {"enabled": True, "max_lease": "1h", "idle_timeout": "10m",
         "allow": ["allow 1024-49151 192.168.1.0/24 1024-65535",
                   "deny 0-65535 0.0.0.0/0 0-65535"]}


def make(tmp_path: Path, gw: FakeGateway, clock: FakeClock, **front: object) -> Service:
    cfg = parse_config({"front": {**FRONT, **front}})
    return Service(cfg, gw, clock=clock, wall=lambda: clock.now + 1.7e9, state_dir=tmp_path)


def req(client: str = A, port: int = 40000, *, internal: str | None = None, lease: float = 0,
        alt: bool = False, proto: Proto = Proto.UDP, iport: int | None = None,
        protocol: FrontProtocol = FrontProtocol.UPNP) -> ClientRequest:
    return ClientRequest(protocol=protocol, client=client, internal_client=internal or client,
                         internal_port=iport or port or 40000, external_port=port, proto=proto,
                         lease=lease, description="test app", allow_alternative=alt)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gw(clock: FakeClock) -> FakeGateway:
    return FakeGateway(clock, local_address="192.168.1.10", external_address="100.64.0.7")


@pytest.fixture
async def front(tmp_path: Path, gw: FakeGateway, clock: FakeClock,
                ) -> AsyncIterator[FrontManager]:
    svc = make(tmp_path, gw, clock)
    await svc.start()
    mgr = FrontManager(svc, svc.config.front, wall=lambda: clock.now + 1.7e9)
    svc.front_observer = mgr.observe
    mgr.attach()
    yield mgr
    await svc.stop()


async def test_a_grant_is_an_activation_mapped_upstream_to_the_client(
        front: FrontManager, gw: FakeGateway) -> None:
    got = await front.add(req(lease=0))
    assert got == Grant(external_port=40000, lease=3600.0, external_address="100.64.0.7")
    assert gw.ports() == {"udp/40000": A}
    (act,) = front.service.pipeline.engine.activations.values()
    assert act.source is Source.UPNP and act.host == A
    assert act.meta["front_description"] == "test app"
    (m,) = front.mappings()
    assert front.lookup(40000, Proto.UDP) is m and m.request.client == A
    assert "double NAT" in (front.double_nat() or "")  # 100.64/10 is CGNAT: said, and given
    assert await front.external_address() == "100.64.0.7"


async def test_policy_refusals_map_nothing(front: FrontManager, gw: FakeGateway) -> None:
    denied = await front.add(req(port=50000))  # the ISP router would take it; allow does not
    assert isinstance(denied, Refusal) and denied.kind is RefusalKind.NOT_AUTHORIZED
    assert "50000" in denied.reason
    other = await front.add(req(client=A, internal=B))  # for another client: secure mode
    assert isinstance(other, Refusal) and other.kind is RefusalKind.OTHER_CLIENT
    assert gw.ports() == {} and not front.service.pipeline.engine.activations
    assert front.refused == {"not_authorized": 1, "other_client": 1}


async def test_secure_mode_off_lets_a_client_map_for_another(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    svc = make(tmp_path, gw, clock, secure_mode=False)
    await svc.start()
    try:
        mgr = FrontManager(svc, svc.config.front)
        assert isinstance(await mgr.add(req(client=A, internal=B)), Grant)
        assert gw.ports() == {"udp/40000": B}
    finally:
        await svc.stop()


async def test_two_clients_one_port_the_second_gets_718_or_another_port(
        front: FrontManager, gw: FakeGateway) -> None:
    assert isinstance(await front.add(req(A)), Grant)
    clash = await front.add(req(B))
    assert isinstance(clash, Refusal) and clash.kind is RefusalKind.CONFLICT
    alt = await front.add(req(B, alt=True))
    assert isinstance(alt, Grant) and alt.external_port != 40000
    assert 1024 <= alt.external_port <= 49151  # only a port the allow lines permit
    assert gw.ports()["udp/40000"] == A and gw.ports()[f"udp/{alt.external_port}"] == B


async def test_a_renewal_keeps_the_mapping_and_a_delete_removes_it_upstream(
        front: FrontManager, gw: FakeGateway) -> None:
    await front.add(req(lease=120))
    act_id = front.mappings()[0].activation_id
    again = await front.add(req(lease=300))
    assert isinstance(again, Grant) and again.lease == 300
    assert front.mappings()[0].activation_id == act_id  # the same activation, renewed
    wrong = await front.delete(FrontProtocol.UPNP, B, 40000, Proto.UDP)
    assert isinstance(wrong, Refusal) and wrong.kind is RefusalKind.OTHER_CLIENT
    assert await front.delete(FrontProtocol.UPNP, A, 40000, Proto.UDP) is None
    assert gw.ports() == {} and front.mappings() == []
    gone = await front.delete(FrontProtocol.UPNP, A, 40000, Proto.UDP)
    assert isinstance(gone, Refusal) and gone.kind is RefusalKind.NO_SUCH


async def test_lease_is_clamped_and_an_idle_lease_0_mapping_is_removed(
        front: FrontManager, gw: FakeGateway, clock: FakeClock) -> None:
    long = await front.add(req(port=40001, lease=7 * 86400))
    assert isinstance(long, Grant) and long.lease == 3600.0
    await front.add(req(port=40000, lease=0))
    clock.advance(601)  # no traffic, no renewal for idle_timeout
    front.service.wake()
    await front.service._wait_applied(front.service.pipeline.engine.generation + 1, 2)
    assert front.lookup(40000, Proto.UDP) is None and front.lookup(40001, Proto.UDP) is None
    assert gw.ports() == {}


async def test_a_mapping_in_use_stays_past_the_idle_timeout(
        front: FrontManager, gw: FakeGateway, clock: FakeClock) -> None:
    await front.add(req(port=40000, lease=0))
    peer = ipaddress.ip_address("198.51.100.9")
    out = Flow(Proto.UDP, ipaddress.ip_address(A), peer, 40000, 6881)  # from the mapped port
    for _ in range(4):
        clock.advance(300)
        front.service.observe(FlowLive(out, connected=False, idle=0.5))
        front.service.wake()
        await front.service._wait_applied(front.service.pipeline.engine.generation, 1)
    assert front.lookup(40000, Proto.UDP) is not None  # 20 minutes, twice idle_timeout
    assert gw.ports() == {"udp/40000": A}
    assert front.wants(Proto.UDP, 40000)


async def test_a_timed_lease_ends_even_in_use(front: FrontManager, clock: FakeClock) -> None:
    await front.add(req(lease=60))
    clock.advance(59)
    front.service.observe(Flow(Proto.UDP, ipaddress.ip_address("198.51.100.9"),
                               ipaddress.ip_address(A), 5000, 40000))
    clock.advance(2)
    front.service.pipeline.engine.expire()
    assert front.lookup(40000, Proto.UDP) is None


async def test_kill_9_and_restart_restores_the_mapping_listed_then_a_stop_removes_it(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    s1 = make(tmp_path, gw, clock)
    await s1.start()
    m1 = FrontManager(s1, s1.config.front)
    await m1.add(req(lease=0, protocol=FrontProtocol.NATPMP))
    s1.pipeline._journal_new()
    s1.pipeline._journal_activations()
    for task in [*s1._tasks, *s1.pipeline.tasks]:  # kill -9: nothing more runs
        task.cancel()
    s1.pipeline.journal.close()
    s2 = make(tmp_path, gw, clock)
    m2 = FrontManager(s2, s2.config.front)
    assert m2.attach() == 1
    (m,) = m2.mappings()
    assert (m.request.protocol, m.request.client, m.grant.external_port) == (
        FrontProtocol.NATPMP, A, 40000)
    await s2.start()
    assert gw.ports() == {"udp/40000": A}
    await s2.stop()
    assert gw.ports() == {}


async def test_a_restored_mapping_the_policy_no_longer_allows_is_removed(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    s1 = make(tmp_path, gw, clock)
    await s1.start()
    await FrontManager(s1, s1.config.front).add(req())
    s1.pipeline._journal_new()
    for task in [*s1._tasks, *s1.pipeline.tasks]:
        task.cancel()
    s1.pipeline.journal.close()
    s2 = make(tmp_path, gw, clock, allow=["deny 0-65535 0.0.0.0/0 0-65535"])
    m2 = FrontManager(s2, s2.config.front)
    assert m2.attach() == 0 and not s2.pipeline.engine.activations
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 2)
    assert gw.ports() == {}  # removed upstream, not half-restored
    await s2.stop()


async def test_upstream_refusal_is_an_upstream_refusal_and_leaves_nothing(
        front: FrontManager, gw: FakeGateway) -> None:
    gw.foreign(Proto.UDP, 40000, "192.168.1.99")  # mapped on the ISP router by another host
    got = await front.add(req())
    assert isinstance(got, Refusal) and got.kind in (RefusalKind.CONFLICT, RefusalKind.UPSTREAM)
    assert not front.service.pipeline.engine.activations and front.mappings() == []
    alt = await front.add(req(alt=True))
    assert isinstance(alt, Grant) and alt.external_port != 40000


class _Detector:
    """Stands in for a flow detector: the prefilter and the follow test serve injects."""

    def __init__(self) -> None:
        self.wanted: Callable[[Proto, int], bool] | None = lambda proto, port: port == 27015
        self.follows: Callable[[Flow], bool] | None = lambda flow: False


async def test_detectors_pass_and_follow_the_front_flows(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    svc = make(tmp_path, gw, clock)
    det = _Detector()
    runner = build_front(svc, [det])
    await svc.start()
    try:
        assert det.wanted is not None and det.follows is not None
        inbound = Flow(Proto.UDP, ipaddress.ip_address("198.51.100.9"),
                       ipaddress.ip_address("100.64.0.7"), 6881, 40000)
        assert not det.wanted(Proto.UDP, 40000) and not det.follows(inbound)
        assert det.wanted(Proto.TCP, 27015)  # the rules' own prefilter still holds
        await runner.manager.add(req())
        assert det.wanted(Proto.UDP, 40000)
        svc.observe(inbound)  # a detector reports a flow, then asks whether to follow it
        assert det.follows(inbound)
        assert svc.status()["front"]["mappings"][0]["external_port"] == 40000
        (line, warn) = front_checks(svc.status()["front"])[:2]
        assert line[0] == "FAIL"  # mapped, but the UPnP server was never started here
        assert warn[0] == "warn" and "100.64.0.7" in warn[2]  # double NAT, said
    finally:
        await runner.stop()
        await svc.stop()


def test_drop_front_ends_restored_client_mappings_when_the_front_is_off(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    svc = make(tmp_path, gw, clock)
    svc.pipeline.engine.activate_adhoc((PortRange(Proto.UDP, 40000, 40000),), A, ttl=60,
                              source=Source.PCP, meta={})
    svc.pipeline.engine.activate_adhoc((PortRange(Proto.UDP, 40001, 40001),), A, ttl=60,
                              source=Source.API, meta={})
    assert drop_front(svc) == 1
    assert [a.source for a in svc.pipeline.engine.activations.values()] == [Source.API]
    svc.pipeline.journal.close()


async def test_metrics_count_grants_and_refusals_by_why(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    svc = make(tmp_path, gw, clock)
    runner = build_front(svc, [])
    await svc.start()
    try:
        await runner.manager.add(req())
        await runner.manager.add(req(port=50000))
        text = Metrics().render(svc)
        assert 'igdtrigger_front_requests_total{result="granted"} 1' in text
        assert 'igdtrigger_front_requests_total{result="not_authorized"} 1' in text
        assert 'igdtrigger_activations{source="upnp"} 1' in text
    finally:
        await svc.stop()


async def test_lease_0_in_use_outlives_max_lease_and_renewals_count_as_use(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    svc = make(tmp_path, gw, clock, max_lease="15m", idle_timeout="5m")
    await svc.start()
    try:
        mgr = FrontManager(svc, svc.config.front)
        svc.front_observer = mgr.observe
        await mgr.add(req(port=40000, lease=0))
        await mgr.add(req(port=40001, lease=600))
        inbound = Flow(Proto.UDP, ipaddress.ip_address("198.51.100.9"),
                       ipaddress.ip_address(A), 6881, 40000)
        for _ in range(12):  # 48 minutes: over three times max_lease
            clock.advance(240)
            svc.observe(FlowLive(inbound, connected=False, idle=1.0))
            if clock.now < 1000 + 600 - 240:
                assert isinstance(await mgr.add(req(port=40001, lease=600)), Grant)  # renewal
            svc.wake()
            await svc._wait_applied(svc.pipeline.engine.generation, 1)
        assert mgr.lookup(40000, Proto.UDP) is not None  # lease 0, in use: held
        assert mgr.lookup(40001, Proto.UDP) is None  # its renewals stopped: idle, gone
        assert gw.ports() == {"udp/40000": A}
    finally:
        await svc.stop()


async def test_a_later_look_dates_use_at_its_last_packet(
        front: FrontManager, clock: FakeClock) -> None:
    await front.add(req(port=40000, lease=0))
    inbound = Flow(Proto.UDP, ipaddress.ip_address("198.51.100.9"),
                   ipaddress.ip_address(A), 6881, 40000)
    clock.advance(400)
    front.service.observe(FlowLive(inbound, connected=False, idle=300.0))  # last packet at 100s
    (act,) = front.service.pipeline.engine.activations.values()
    assert act.expires == clock.now - 300 + 600  # idle_timeout after that packet, not now


async def test_a_wake_right_before_stop_does_not_delay_the_stop(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    """A client's use wakes the scheduler; a stop in the same instant lost its cancel inside
    Python 3.11's wait_for (gh-86296) and waited for the next deadline (here 10 minutes)."""
    svc = make(tmp_path, gw, clock)
    await svc.start()
    mgr = FrontManager(svc, svc.config.front)
    await mgr.add(req())
    await asyncio.sleep(0.05)  # the scheduler is asleep until the next deadline
    svc.wake()
    stopping = asyncio.ensure_future(svc.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)  # generous: it takes milliseconds
    if not done:
        for task in [*svc._tasks, *svc.pipeline.tasks]:
            task.cancel()
        await stopping
    assert done, "stop() waited for the scheduler's next deadline"
    assert gw.ports() == {}


async def test_the_same_client_may_retarget_its_port_and_a_foreign_nonce_may_not(
        front: FrontManager, gw: FakeGateway) -> None:
    await front.add(req(port=40000, iport=40000))
    moved = await front.add(req(port=40000, iport=41000))
    assert isinstance(moved, Grant) and moved.external_port == 40000
    (m,) = front.mappings()
    assert m.request.internal_port == 41000
    assert gw.table[MappingKey(Proto.UDP, 40000)][0].internal_port == 41000
    pcp = replace(req(port=40002, protocol=FrontProtocol.PCP), nonce=b"a" * 12)
    assert isinstance(await front.add(pcp), Grant)
    other = await front.add(replace(pcp, nonce=b"b" * 12))
    assert isinstance(other, Refusal) and other.kind is RefusalKind.NOT_AUTHORIZED
    gone = await front.delete(FrontProtocol.PCP, A, 40002, Proto.UDP, nonce=b"b" * 12)
    assert isinstance(gone, Refusal) and gone.kind is RefusalKind.NOT_AUTHORIZED
    assert await front.delete(FrontProtocol.PCP, A, 40002, Proto.UDP, nonce=b"a" * 12) is None


@pytest.mark.parametrize("protocol", [FrontProtocol.NATPMP, FrontProtocol.PCP])
async def test_an_alternative_allowed_request_for_another_internal_port_never_ends_a_mapping(
        front: FrontManager, gw: FakeGateway, protocol: FrontProtocol) -> None:
    """NAT-PMP/PCP suggesting the external port of the same host's mapping of another internal
    port get another port (as miniupnpd's natpmp.c moves on to the next port); it used to end
    the UPnP mapping ("replaced by its client") and, picked as an alternative, orphan it."""
    assert isinstance(await front.add(req(port=40000, iport=40000)), Grant)
    assert isinstance(await front.add(req(port=40001, iport=40001)), Grant)
    ask = replace(req(port=40000, iport=5000, alt=True, protocol=protocol),
                  nonce=b"n" * 12 if protocol is FrontProtocol.PCP else None)
    got = await front.add(ask)
    assert isinstance(got, Grant) and got.external_port not in (40000, 40001)
    assert gw.table[MappingKey(Proto.UDP, 40000)][0].internal_port == 40000
    assert gw.table[MappingKey(Proto.UDP, 40001)][0].internal_port == 40001
    assert gw.table[MappingKey(Proto.UDP, got.external_port)][0].internal_port == 5000
    assert sorted(m.grant.external_port for m in front.mappings()) == \
        sorted([40000, 40001, got.external_port])
    assert len(front.service.pipeline.engine.activations) == 3


@pytest.mark.parametrize("protocol", [FrontProtocol.NATPMP, FrontProtocol.PCP])
async def test_a_natpmp_or_pcp_client_renewing_at_half_its_lifetime_outlives_idle_timeout(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock, protocol: FrontProtocol) -> None:
    """No traffic, only renewals at half the lifetime we answered (RFC 6886 §3.3): a live
    client keeps its mapping. The lifetime answered was max_lease (1h) while idle_timeout (5m)
    removed the mapping long before the client's first renewal at 30m."""
    svc = make(tmp_path, gw, clock, max_lease="1h", idle_timeout="5m")
    await svc.start()
    try:
        mgr = FrontManager(svc, svc.config.front)
        ask = replace(req(port=40000, lease=3600, alt=True, protocol=protocol),
                      nonce=b"n" * 12 if protocol is FrontProtocol.PCP else None)
        got = await mgr.add(ask)
        assert isinstance(got, Grant) and got.lease <= 300
        for _ in range(8):  # 8 renewals at half the lifetime told: past idle_timeout many times
            clock.advance(got.lease / 2)
            svc.wake()
            await svc._wait_applied(svc.pipeline.engine.generation, 1)
            assert mgr.lookup(40000, Proto.UDP) is not None, f"gone at {clock.now}"
            got = await mgr.add(ask)
            assert isinstance(got, Grant) and got.external_port == 40000
        assert gw.ports() == {"udp/40000": A}
        clock.advance(got.lease + 1)  # the client stops renewing: gone within its lifetime
        svc.wake()
        await svc._wait_applied(svc.pipeline.engine.generation, 1)
        assert mgr.lookup(40000, Proto.UDP) is None and gw.ports() == {}
    finally:
        await svc.stop()


async def test_mappings_the_engine_ended_do_not_count_against_max_per_client(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    """A client whose mappings went idle (ended by the engine, nobody listed them since) may
    map again: they counted against max_per_client until something looked them up."""
    svc = make(tmp_path, gw, clock, max_per_client=2, idle_timeout="5m")
    await svc.start()
    try:
        mgr = FrontManager(svc, svc.config.front)
        for port in (40000, 40001):
            assert isinstance(await mgr.add(req(port=port)), Grant)
        full = await mgr.add(req(port=40002))
        assert isinstance(full, Refusal) and full.kind is RefusalKind.NO_RESOURCES
        clock.advance(301)
        svc.wake()
        await svc._wait_applied(svc.pipeline.engine.generation, 1)
        assert not svc.pipeline.engine.activations and gw.ports() == {}
        again = await mgr.add(req(port=40002))
        assert isinstance(again, Grant), again
    finally:
        await svc.stop()


async def test_traffic_on_an_internal_port_mapped_twice_keeps_both_mappings_in_use(
        front: FrontManager, gw: FakeGateway, clock: FakeClock) -> None:
    """A host may map one internal port on two external ports (UPnP, then NAT-PMP): its
    traffic is use of both, so neither lapses at idle_timeout while the traffic goes on."""
    assert isinstance(await front.add(req(port=40000, iport=40000)), Grant)
    assert isinstance(await front.add(req(port=40001, iport=40000,
                                          protocol=FrontProtocol.NATPMP)), Grant)
    out = Flow(Proto.UDP, ipaddress.ip_address(A), ipaddress.ip_address("198.51.100.9"),
               40000, 6881)  # from the mapped internal port
    for _ in range(4):
        clock.advance(300)
        front.service.observe(FlowLive(out, connected=False, idle=0.5))
        front.service.wake()
        await front.service._wait_applied(front.service.pipeline.engine.generation, 1)
    assert {m.grant.external_port for m in front.mappings()} == {40000, 40001}
    assert gw.ports() == {"udp/40000": A, "udp/40001": A}


class _Forwarder:
    """Topology 1's inner DNAT, in memory: notes whether the upstream router held the port
    when the rule went in."""

    def __init__(self, gw: FakeGateway, *, fail: bool = False) -> None:
        self.gw = gw
        self.fail = fail
        self.rules: dict[tuple[Proto, int], tuple[str, int]] = {}
        self.upstream_held_at_add: list[bool] = []

    def upstream_address(self) -> str | None:
        return "192.168.1.10"

    async def add(self, proto: Proto, external_port: int, client: str,
                  internal_port: int) -> None:
        self.upstream_held_at_add.append(str(MappingKey(proto, external_port)) in self.gw.ports())
        if self.fail:
            raise OSError("inner DNAT not loaded: nft failed: Error: no such table")
        self.rules[(proto, external_port)] = (client, internal_port)

    async def remove(self, proto: Proto, external_port: int) -> None:
        self.rules.pop((proto, external_port), None)


async def _gateway_front(tmp_path: Path, gw: FakeGateway, clock: FakeClock,
                         fwd: _Forwarder) -> FrontManager:
    svc = make(tmp_path, gw, clock)
    await svc.start()
    mgr = FrontManager(svc, svc.config.front, forwarder=fwd, wall=lambda: clock.now + 1.7e9)
    mgr.attach()
    return mgr


async def test_the_inner_dnat_goes_in_before_the_upstream_mapping_and_out_on_a_refusal(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    fwd = _Forwarder(gw)
    front = await _gateway_front(tmp_path, gw, clock, fwd)
    try:
        got = await front.add(req())
        assert isinstance(got, Grant) and fwd.rules == {(Proto.UDP, 40000): (A, 40000)}
        assert fwd.upstream_held_at_add == [False]  # in before the upstream mapping exists
        assert gw.ports()[str(MappingKey(Proto.UDP, 40000))] == "192.168.1.10"
        gw.foreign(Proto.UDP, 40001, "192.168.1.99")  # the upstream router refuses this one
        refused = await front.add(req(port=40001))
        assert isinstance(refused, Refusal) and (Proto.UDP, 40001) not in fwd.rules
        assert list(fwd.rules) == [(Proto.UDP, 40000)]  # the granted one keeps its rule
    finally:
        await front.service.stop()


async def test_a_failed_inner_dnat_refuses_and_maps_nothing_upstream(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    front = await _gateway_front(tmp_path, gw, clock, _Forwarder(gw, fail=True))
    try:
        got = await front.add(req())
        assert isinstance(got, Refusal) and got.kind is RefusalKind.UPSTREAM
        assert "inner DNAT was not added" in got.reason and "no such table" in got.reason
        assert front.mappings() == [] and not front.service.pipeline.engine.activations
        assert gw.ports() == {}  # never left open upstream
    finally:
        await front.service.stop()


def test_serve_with_the_front_off_ends_a_crashs_client_mappings_and_loads_no_front(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    """``[front]`` off: a client mapping restored from the journal is ended; with none, the
    front's modules are not even loaded (an idle service's RSS, issue 17)."""
    from igdtrigger.cli.serve import front_for  # the edge under test, imported here only

    svc = make(tmp_path, gw, clock)
    svc.pipeline.engine.activate_adhoc((PortRange(Proto.UDP, 40000, 40000),), A, ttl=60,
                                       source=Source.PCP, meta={})
    off = replace(svc.config, front=replace(svc.config.front, enabled=False))
    assert front_for(off, svc, []) is None
    assert svc.sorted_activations() == []
    svc.pipeline.journal.close()
    code = ("import sys\nfrom pathlib import Path\nfrom igdtrigger.cli.serve import front_for\n"
            "from igdtrigger.config import parse_config\n"
            "from igdtrigger.runtime.service import Service\n"
            "from tests.fakes import FakeClock, FakeGateway\n"
            "c = FakeClock()\n"
            "svc = Service(parse_config({}), FakeGateway(c), clock=c, "
            f"state_dir=Path({str(tmp_path / 'b')!r}))\n"
            "assert front_for(svc.config, svc, []) is None\n"
            "print(sorted(m for m in sys.modules if m.startswith('igdtrigger.front')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
