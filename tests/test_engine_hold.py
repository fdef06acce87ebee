"""Router semantics (issue 18): the trigger holds while the connection lives, inbound traffic on
the opened ports counts as use, and the idle timer starts when both stop. Fake clock only."""

from __future__ import annotations

import ipaddress
import math

import pytest

from igdtrigger.core import engine as engine_mod
from igdtrigger.core.activation import Activation, EventKind, Source
from igdtrigger.core.engine import Engine
from igdtrigger.core.model import Flow, Proto

from .fakes import FakeClock
from .test_engine import flow, make, rule

HOST = "192.168.1.20"


def inbound(dport: int = 40000, dst: str = HOST, src: str = "11.9.9.9", sport: int = 61000,
            proto: Proto = Proto.UDP) -> Flow:
    return Flow(proto, ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport)


def only(eng: Engine) -> Activation:
    (act,) = eng.activations.values()
    return act


def held_by_a_connection() -> tuple[Engine, FakeClock, Flow]:
    """An activation held by one established TCP connection to its trigger port."""
    eng, clock, _ = make(rule(trigger="tcp/27015", idle=5))
    f = flow(proto=Proto.TCP)
    eng.on_flow(f)
    eng.on_flow_live(f, connected=True)
    return eng, clock, f


def test_a_long_udp_flow_keeps_refreshing_the_activation() -> None:
    eng, clock, events = make(rule(idle=5))
    f = flow()
    eng.on_flow(f)
    for _ in range(15):  # one packet a second for three times the timeout
        clock.advance(1)
        eng.on_flow_live(f, connected=False, idle=0.0)
        assert not eng.expire()
    clock.advance(4.9)
    assert not eng.expire()
    clock.advance(0.2)
    assert [a.host for a in eng.expire()] == [HOST]
    assert events[-1] == (EventKind.EXPIRED, HOST)


def test_idle_reported_by_the_detector_dates_the_last_packet() -> None:
    eng, clock, _ = make(rule(idle=5))
    f = flow()
    eng.on_flow(f)
    clock.advance(3)
    eng.on_flow_live(f, connected=False, idle=2.0)  # its last packet was 2 s ago
    assert only(eng).expires == clock.now - 2 + 5


def test_a_silent_tcp_connection_holds_until_it_closes() -> None:
    eng, clock, f = held_by_a_connection()
    act = only(eng)
    assert act.held and act.hold_reason(clock.now) == "1 live flow"
    assert act.to_json(clock.now)["expires_in"] is None
    assert eng.next_deadline() is None
    clock.advance(3600)
    assert not eng.expire()
    eng.on_flow_ended(f, closed=True)
    assert not act.held and act.expires == clock.now + 5
    clock.advance(5.1)
    assert eng.expire() == [act]


def test_a_connection_leaving_established_starts_the_timer() -> None:
    eng, clock, f = held_by_a_connection()
    clock.advance(100)
    eng.on_flow_live(f, connected=False)
    assert only(eng).expires == clock.now + 5


def test_two_connections_hold_until_the_last_ends() -> None:
    eng, clock, _ = make(rule(trigger="tcp/27015", idle=5))
    a, b = flow(proto=Proto.TCP), Flow(Proto.TCP, ipaddress.ip_address(HOST),
                                       ipaddress.ip_address("11.22.33.44"), 50001, 27015)
    for f in (a, b):
        eng.on_flow(f)
        eng.on_flow_live(f, connected=True)
    act = only(eng)
    assert act.hold_reason(clock.now) == "2 live flows"
    eng.on_flow_ended(a, closed=True)
    assert act.held
    clock.advance(50)
    eng.on_flow_ended(b, closed=True)
    assert act.expires == clock.now + 5


def test_a_flow_that_began_before_the_detector_holds_on_first_look() -> None:
    eng, _, _ = make(rule(trigger="tcp/27015", idle=5))
    f = flow(proto=Proto.TCP)
    created = eng.on_flow_live(f, connected=True)  # from the table dump at start
    assert [a.host for a in created] == [HOST]
    assert only(eng).held


def test_a_stale_udp_flow_at_start_opens_nothing_but_triggers_when_it_wakes() -> None:
    eng, clock, _ = make(rule(idle=5))
    f = flow()
    assert eng.on_flow_live(f, connected=False, idle=20.0) == []
    assert not eng.activations and eng.follows(f)
    clock.advance(1)
    assert len(eng.on_flow_live(f, connected=False, idle=0.0)) == 1


def test_a_flow_that_wakes_up_after_its_activation_lapsed_triggers_again() -> None:
    eng, clock, events = make(rule(idle=5))
    f = flow()
    eng.on_flow(f)
    clock.advance(6)
    assert eng.expire()
    assert eng.follows(f)
    eng.on_flow_live(f, connected=False, idle=0.0)
    assert [k for k, _ in events] == [EventKind.ACTIVATED, EventKind.EXPIRED,
                                      EventKind.ACTIVATED]


def test_deactivating_by_hand_is_not_undone_by_the_same_flow() -> None:
    eng, clock, _ = make(rule(idle=5))
    f = flow()
    eng.on_flow(f)
    eng.deactivate(only(eng).id)
    clock.advance(1)
    assert eng.on_flow_live(f, connected=False, idle=0.0) == []
    assert not eng.activations
    eng.on_flow_ended(f)
    assert not eng.live


def test_inbound_traffic_on_an_opened_port_keeps_it_open() -> None:
    eng, clock, _ = make(rule(idle=5))
    eng.on_flow(flow())
    act = only(eng)
    for i in range(15):
        clock.advance(1)
        eng.on_flow(inbound(sport=61000 + i))  # a fresh flow each second from the WAN
        assert not eng.expire()
    assert eng.flows_inbound == 15
    clock.advance(5.1)
    assert eng.expire() == [act]
    assert not eng.live or all(v.trigger for v in eng.live.values())


def test_one_long_inbound_flow_refreshes_and_its_tcp_connection_holds() -> None:
    eng, clock, _ = make(rule(open_="tcp/40000", idle=5))
    eng.on_flow(flow())
    act = only(eng)
    f = inbound(proto=Proto.TCP)
    eng.on_flow(f)
    eng.on_flow_live(f, connected=True)
    clock.advance(60)
    assert not eng.expire() and act.held
    eng.on_flow_ended(f, closed=True)
    assert act.expires == clock.now + 5


def test_inbound_on_a_router_names_the_external_address() -> None:
    """On a Linux router, conntrack's original tuple of the forwarded flow is WAN -> router."""
    eng, clock, _ = make(rule(idle=5))
    eng.on_flow(flow())
    clock.advance(4)
    eng.on_flow(inbound(dst="11.22.33.1"))
    assert only(eng).expires == clock.now + 5


def test_inbound_for_another_host_or_port_or_without_activation_is_ignored() -> None:
    eng, clock, _ = make(rule(idle=5))
    eng.on_flow(inbound())  # nothing is open yet
    assert not eng.activations and not eng.live
    eng.on_flow(flow())
    before = only(eng).expires
    clock.advance(2)
    eng.on_flow(inbound(dst="192.168.1.99"))  # another LAN host
    eng.on_flow(inbound(dport=40009))  # a port the rule does not open
    eng.on_flow(inbound(src="192.168.1.30"))  # from the LAN: not inbound
    assert only(eng).expires == before
    assert eng.flows_inbound == 0


def test_api_activations_keep_their_ttl() -> None:
    eng, clock, _ = make(rule(idle=5))
    act = eng.activate("demo", HOST, ttl=720)
    eng.on_flow(inbound())
    assert act.expires == clock.now + 720
    assert act.hold_reason(clock.now) == "API, 12m00s left"


def test_process_reason() -> None:
    eng, clock, _ = make(rule(idle=5))
    eng.process_index["game"] = (eng.rules["demo"],)
    eng.on_process(["game"], HOST)
    clock.advance(2)
    assert only(eng).source is Source.PROCESS
    assert only(eng).hold_reason(clock.now) == "process running"
    clock.advance(8)
    assert only(eng).hold_reason(clock.now) == "process last seen 10s ago"


def test_followed_flows_are_capped_per_host_and_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_FLOWS_PER_HOST", 8)
    monkeypatch.setattr(engine_mod, "MAX_FLOWS", 12)
    eng, _, _ = make(rule(trigger="tcp/27015", idle=5))

    def connect(host: str, n: int) -> None:
        for i in range(n):
            f = Flow(Proto.TCP, ipaddress.ip_address(host), ipaddress.ip_address("11.22.33.44"),
                     1024 + i, 27015)
            eng.on_flow(f)
            eng.on_flow_live(f, connected=True)

    connect(HOST, 10)
    assert len(eng.live) == 8 and eng.flows_refused > 0
    assert all(a.held for a in eng.activations.values())  # a refused flow still counted as use
    connect("192.168.1.21", 10)
    assert len(eng.live) == 12  # the total cap
    assert len(eng.activations) == 2


def test_non_matching_flows_are_not_remembered() -> None:
    eng, _, _ = make(rule(idle=5))
    for i in range(100):
        eng.on_flow(flow(dport=30000 + i))
        eng.on_flow(inbound(dport=30000 + i))
        eng.on_flow_live(flow(dport=30000 + i), connected=True)
    assert not eng.live and not eng.activations


def test_wants_is_trigger_or_opened_ports() -> None:
    eng, _, _ = make(rule(idle=5))
    assert eng.wants(Proto.UDP, 27015) and eng.wants(Proto.UDP, 40001)
    assert not eng.wants(Proto.UDP, 27016) and not eng.wants(Proto.TCP, 40001)


def test_releasing_flows_starts_the_timers() -> None:
    eng, clock, _ = held_by_a_connection()
    clock.advance(100)
    assert eng.release_flows() == 1
    assert not eng.live and only(eng).expires == clock.now + 5


def test_packets_every_second_do_not_rewrite_the_journal_every_second() -> None:
    eng, clock, _ = make(rule(idle=600))
    f = flow()
    eng.on_flow(f)
    eng.dirty.clear()
    writes = 0
    for _ in range(600):
        clock.advance(1)
        eng.on_flow_live(f, connected=False, idle=0.0)
        writes += len(eng.dirty)
        eng.dirty.clear()
    assert 1 <= writes <= 4  # once per quarter of the timeout
    eng.on_flow_live(f, connected=True)  # a hold starting is written at once
    assert eng.dirty


def test_a_restored_hold_with_traffic_since_the_restart_closes_a_timeout_after_it() -> None:
    """Held before a crash; after the restart a packet of the trigger traffic is seen but no
    connection holds: it closes ``idle_timeout`` after that packet, not at the restart."""
    eng, clock, _ = make(rule(idle=5))
    act = eng.restore("a1", "demo", HOST, "traffic", age=100, remaining=math.inf, ttl=5,
                      meta={}, held=True)
    assert act is not None and act.unproven and act.expires == clock.now + 5
    clock.advance(2)
    eng.on_flow(flow())  # a packet of the game's UDP flow
    clock.advance(1)
    assert eng.settle_restored() == [act]
    assert not act.unproven and act.expires == clock.now - 1 + 5
    api = eng.restore("a2", "demo", HOST, "api", age=1, remaining=math.inf, ttl=5, meta={},
                      held=True)
    assert api is not None and not api.unproven and api.expires == clock.now + 5


def test_two_rules_sharing_a_trigger_port_are_both_held_by_one_connection() -> None:
    """One TCP connection to a port two rules trigger on (a launcher and the game's voice
    chat, say): both activations are held, and both timers start when it closes."""
    eng, clock, _ = make(rule("game", trigger="tcp/27015", open_="udp/40000", idle=5),
                         rule("voice", trigger="tcp/27015", open_="udp/41000", idle=8))
    f = flow(proto=Proto.TCP)
    eng.on_flow(f)
    eng.on_flow_live(f, connected=True)
    acts = sorted(eng.activations.values(), key=lambda a: a.rule.name)
    assert [a.held for a in acts] == [True, True]
    clock.advance(600)
    assert not eng.expire()
    eng.on_flow_ended(f, closed=True)
    assert [a.expires - clock.now for a in acts] == [5, 8]
