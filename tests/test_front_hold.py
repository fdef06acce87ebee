"""The IGD front's flow hold (issue 14): a client mapping is in use while a connection through
it lives, however silent, as a rule's activation is held in the engine; it lapses idle_timeout
after the connection ends; the flows followed are bounded; the detectors' prefilter is O(1)."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import random
from pathlib import Path

from igdtrigger.config import parse_config
from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import Flow, FlowEnded, FlowLive, MappingKey, Proto
from igdtrigger.detect.base import FlowSink
from igdtrigger.front.contract import ClientRequest, FrontMapping, Grant
from igdtrigger.front.holds import FlowHolds
from igdtrigger.front.manager import FrontManager, FrontProtocol
from igdtrigger.front.serving import build_front
from igdtrigger.runtime.service import Service

from . import test_front_manager as shared
from .fakes import FakeClock, FakeGateway
from .test_front_manager import FRONT, A, req

clock, gw, front = shared.clock, shared.gw, shared.front  # the manager tests' fixtures

PEER = ipaddress.ip_address("198.51.100.9")
IDLE = 600.0  # the fixture's idle_timeout (10m)


def inbound(port: int = 40000, sport: int = 5555, proto: Proto = Proto.TCP) -> Flow:
    """A WAN peer's connection to the mapped port, as the client's conntrack (or socket table,
    turned around) reads it."""
    return Flow(proto, PEER, ipaddress.ip_address(A), sport, port)


def connect(front: FrontManager, flow: Flow) -> None:
    """What the conntrack detector reports of a new TCP connection: the NEW event, then (it
    follows the flow) a look that finds it established."""
    front.service.observe(flow)
    assert front.follows(flow)
    front.service.observe(FlowLive(flow, connected=True))


def wait(front: FrontManager, clock: FakeClock, seconds: float, step: float = 60.0) -> None:
    """``seconds`` go by in ``step``s, the runner's tick and the engine's expiry at each."""
    while seconds > 0:
        clock.advance(min(step, seconds))
        seconds -= step
        front.tick()
        front.service.pipeline.engine.expire()


async def test_a_silent_live_connection_holds_the_mapping_past_idle_timeout(
        front: FrontManager, gw: FakeGateway, clock: FakeClock) -> None:
    assert isinstance(await front.add(req(proto=Proto.TCP)), Grant)
    flow = inbound()
    connect(front, flow)
    wait(front, clock, 3 * IDLE)  # no packet reported for 30 minutes: the connection is quiet
    (m,) = front.mappings()
    assert m.last_use == clock.now  # status: in use now, not idle
    assert front.status()["flows"] == {"followed": 1, "holding": 1, "refused": 0,
                                       "evicted": 0}
    front.service.wake()
    await front.service._wait_applied(front.service.pipeline.engine.generation, 1)
    assert gw.ports() == {"tcp/40000": A}  # still mapped upstream


async def test_the_mapping_lapses_idle_timeout_after_the_connection_ends(
        front: FrontManager, gw: FakeGateway, clock: FakeClock) -> None:
    assert isinstance(await front.add(req(proto=Proto.TCP)), Grant)
    flow = inbound()
    connect(front, flow)
    wait(front, clock, 2 * IDLE)
    front.service.observe(FlowEnded(flow, closed=True))  # FIN/RST: its last packet is now
    assert not front.follows(flow)
    wait(front, clock, IDLE - 10, step=10)
    assert front.lookup(40000, Proto.TCP) is not None  # idle_timeout not over yet
    wait(front, clock, 20, step=10)
    assert front.lookup(40000, Proto.TCP) is None
    front.service.wake()
    await front.service._wait_applied(front.service.pipeline.engine.generation + 1, 2)
    assert gw.ports() == {}


async def test_a_connection_that_stops_being_one_starts_the_idle_timer(
        front: FrontManager, clock: FakeClock) -> None:
    """conntrack's look finds the flow past ESTABLISHED (half-closed, its entry still there):
    it no longer holds; the timer starts then, not when the entry finally goes."""
    assert isinstance(await front.add(req(proto=Proto.TCP)), Grant)
    flow = inbound()
    connect(front, flow)
    wait(front, clock, 2 * IDLE)
    front.service.observe(FlowLive(flow, connected=False))
    assert front.follows(flow)  # still followed: its packets are still use
    wait(front, clock, IDLE + 10, step=10)
    assert front.lookup(40000, Proto.TCP) is None


async def test_the_socket_table_connected_socket_holds_and_its_close_releases(
        front: FrontManager, clock: FakeClock) -> None:
    """The socket table reports a new connected socket as a Flow and a connected FlowLive,
    and one gone as FlowEnded(closed=True); it never asks to follow."""
    assert isinstance(await front.add(req(proto=Proto.TCP)), Grant)
    flow = inbound()
    front.service.observe(flow)
    front.service.observe(FlowLive(flow, connected=True))
    wait(front, clock, 2 * IDLE)
    assert front.lookup(40000, Proto.TCP) is not None
    front.service.observe(FlowEnded(flow, closed=True))
    wait(front, clock, IDLE + 10, step=10)
    assert front.lookup(40000, Proto.TCP) is None


async def test_a_connection_from_the_mapped_internal_port_holds_too(
        front: FrontManager, clock: FakeClock) -> None:
    """Either direction: the client's own connection out of its mapped internal port."""
    assert isinstance(await front.add(req(port=40000, iport=40000, proto=Proto.TCP)), Grant)
    out = Flow(Proto.TCP, ipaddress.ip_address(A), PEER, 40000, 443)
    connect(front, out)
    wait(front, clock, 2 * IDLE)
    assert front.lookup(40000, Proto.TCP) is not None


async def test_a_connection_holds_no_longer_than_a_timed_lease(
        front: FrontManager, clock: FakeClock) -> None:
    assert isinstance(await front.add(req(proto=Proto.TCP, lease=120)), Grant)
    connect(front, inbound())
    wait(front, clock, 130, step=5)
    assert front.lookup(40000, Proto.TCP) is None


async def test_a_mapping_that_ends_stops_following_its_flows(
        front: FrontManager, clock: FakeClock) -> None:
    assert isinstance(await front.add(req(proto=Proto.TCP)), Grant)
    flow = inbound()
    connect(front, flow)
    assert await front.delete(FrontProtocol.UPNP, A, 40000, Proto.TCP) is None
    assert not front.follows(flow)  # the detectors stop looking at it
    assert front.status()["flows"] == {"followed": 0, "holding": 0, "refused": 0,
                                       "evicted": 0}
    assert isinstance(await front.add(req(proto=Proto.TCP)), Grant)  # mapped again
    wait(front, clock, IDLE + 10, step=10)  # the old connection is not a hold of the new one
    assert front.lookup(40000, Proto.TCP) is None


async def test_when_the_detector_stops_its_holds_are_released(
        tmp_path: Path, gw: FakeGateway, clock: FakeClock) -> None:
    """Nobody will say when the connections it reported end: the mappings they held start
    their idle timers when it stops (as the engine's own holds do)."""
    flow = inbound()

    class Stopping:
        name = "conntrack"
        holds_flows = True
        standby_for = ""

        def __init__(self) -> None:
            self.go = asyncio.Event()
            self.done = asyncio.Event()

        def check(self) -> None:
            pass

        async def run(self, sink: FlowSink) -> None:
            await self.go.wait()
            sink(flow)
            sink(FlowLive(flow, connected=True))
            self.done.set()
            raise DetectionUnavailable("conntrack: following live flows failed")

    det = Stopping()
    svc = Service(parse_config({"front": FRONT}), gw, clock=clock, state_dir=tmp_path,
                  wall=lambda: clock.now + 1.7e9, detectors=[det])
    runner = build_front(svc, [det])
    await svc.start()
    try:
        assert isinstance(await runner.manager.add(req(proto=Proto.TCP)), Grant)
        det.go.set()
        await asyncio.wait_for(det.done.wait(), 10)
        for _ in range(100):  # the supervisor sees the detector end
            await asyncio.sleep(0.01)
            if not runner.manager.follows(flow):
                break
        assert not runner.manager.follows(flow)
        wait(runner.manager, clock, IDLE + 10, step=10)
        assert runner.manager.lookup(40000, Proto.TCP) is None
    finally:
        await runner.stop()
        await svc.stop()


async def test_followed_flows_are_capped_per_mapping_and_in_all(
        front: FrontManager, clock: FakeClock) -> None:
    """At a mapping's cap a new flow takes the place of the oldest one that is not a
    connection (churn never displaces a hold); when all are connections, or the total cap is
    reached, it is not followed (counted): it is use when seen, but its silence holds nothing."""
    front.holds = FlowHolds(max_per_mapping=2, max_flows=3)
    assert isinstance(await front.add(req(port=40000, proto=Proto.TCP)), Grant)
    assert isinstance(await front.add(req(port=40001, proto=Proto.TCP)), Grant)
    a1, a2, a3, a4, a5 = (inbound(40000, sport) for sport in (1, 2, 3, 4, 5))
    connect(front, a1)  # a connection: holds 40000
    for flow in (a2, a3):  # a peer's churn: a3 takes a2's place, never a1's
        front.service.observe(flow)
    assert front.follows(a1) and front.follows(a3) and not front.follows(a2)
    connect(front, a4)  # takes a3's place, and holds too
    assert not front.follows(a3)
    front.service.observe(a5)  # both followed flows are connections: no room
    assert not front.follows(a5)
    b1, b2 = inbound(40001, 1), inbound(40001, 2)
    front.service.observe(b1)
    front.service.observe(b2)
    assert front.follows(b1) and not front.follows(b2)  # 3 in all
    assert front.status()["flows"] == {"followed": 3, "holding": 2, "refused": 2,
                                       "evicted": 2}
    front.service.observe(FlowLive(b2, connected=True))  # use once, no hold
    wait(front, clock, IDLE + 10, step=10)
    assert front.lookup(40000, Proto.TCP) is not None  # a1 and a4 hold it
    assert front.lookup(40001, Proto.TCP) is None  # b2 was never followed: no hold
    front.service.observe(FlowEnded(a1, closed=True))
    wait(front, clock, IDLE + 10, step=10)
    assert front.lookup(40000, Proto.TCP) is not None  # a4 still holds it
    front.service.observe(FlowEnded(a4, closed=True))
    wait(front, clock, IDLE + 10, step=10)
    assert front.lookup(40000, Proto.TCP) is None


def test_the_prefilter_index_agrees_with_a_scan_of_the_mappings() -> None:
    """``wants`` is two dict lookups; it answers as the scan over every mapping did, through
    adds, replacements and removals (two clients may map the same internal port)."""
    mgr = FrontManager.__new__(FrontManager)
    mgr._by_key = {}
    mgr._by_internal = {}
    mgr._ports = collections.Counter()
    mgr.holds = FlowHolds()
    rnd = random.Random(14)
    live: list[FrontMapping] = []

    def scan(proto: Proto, port: int) -> bool:
        return MappingKey(proto, port) in mgr._by_key or any(
            p is proto and ip == port for p, _c, ip in mgr._by_internal)

    for _ in range(2000):
        if live and rnd.random() < 0.45:
            m = live.pop(rnd.randrange(len(live)))
            mgr._unindex(m)
        else:
            proto = rnd.choice((Proto.TCP, Proto.UDP))
            ext, iport = rnd.randint(1000, 1030), rnd.randint(1000, 1030)
            client = rnd.choice(("192.168.1.20", "192.168.1.30"))
            m = FrontMapping(ClientRequest(FrontProtocol.UPNP, client, client, iport, ext,
                                           proto, 0), Grant(ext, 0, ""), 0.0, 0.0)
            old = mgr._by_key.get(MappingKey(proto, ext))
            if old is not None:  # a port is one mapping's: the old one goes first
                mgr._unindex(old)
                live.remove(old)
            mgr._index(m)
            live.append(m)
        for proto in Proto:
            for port in range(995, 1035):
                assert mgr.wants(proto, port) == scan(proto, port), (proto, port)
    for m in live:
        mgr._unindex(m)
    assert not mgr._ports and not mgr._by_internal and not mgr._by_key
