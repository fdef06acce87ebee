"""Engine behaviour a user would notice, each found by a mutant that survived every other test
(issue 19: `python -m bench.mutation engine`).

Pure: an injected clock, no sockets; only public entry points and what status, the dashboard,
metrics and the journal read (``hold_reason``, ``to_json``, ``desired``, ``flows_*``, ``dirty``).
"""

from __future__ import annotations

import ipaddress
import math

import pytest

from igdtrigger.core import engine as engine_mod
from igdtrigger.core.activation import MAX_TTL, Activation, Source
from igdtrigger.core.engine import Engine
from igdtrigger.core.model import Flow, MappingKey, Proto

from .fakes import FakeClock
from .test_engine_edges import HOST, OTHER, flow, make, rule


def only(eng: Engine) -> Activation:
    (act,) = eng.activations.values()
    return act


def inbound(dport: int = 40000, dst: str = "11.22.33.1", sport: int = 61000) -> Flow:
    """From beyond the LAN to an opened port; on a router, to its own external address."""
    return Flow(Proto.UDP, ipaddress.ip_address("11.9.9.9"), ipaddress.ip_address(dst),
                sport, dport)


# --- a packet's date: the idle timer runs from the last packet, first look included -----------


def test_a_flow_first_seen_silent_lapses_its_timeout_after_its_last_packet() -> None:
    """A game's flow already running when the service starts, silent for 3 s of a 5 s timeout:
    the mapping stays 2 s more, not 5 (as for a followed flow's later looks)."""
    eng, clock, _ = make(rule(idle=5))
    [act] = eng.on_flow_live(flow(), connected=False, idle=3.0)
    assert act.expires == clock.now + 2
    assert act.hold_reason(clock.now) == "traffic 3s ago, 1 live flow"
    clock.advance(2)
    assert eng.expire() == [act]


def test_a_flow_first_seen_with_a_packet_just_now_gets_the_whole_timeout() -> None:
    eng, clock, _ = make(rule(idle=5))
    [act] = eng.on_flow_live(flow(), connected=False, idle=0.0)
    assert act.expires == clock.now + 5


def test_a_flow_silent_for_exactly_the_timeout_at_start_opens_nothing() -> None:
    eng, _, _ = make(rule(idle=5))
    assert eng.on_flow_live(flow(), connected=False, idle=5.0) == []
    assert not eng.activations


def test_a_lapsed_flow_waking_up_is_dated_by_its_packet() -> None:
    eng, clock, _ = make(rule(idle=5))
    f = flow()
    eng.on_flow(f)
    clock.advance(6)
    assert eng.expire()
    [again] = eng.on_flow_live(f, connected=False, idle=2.0)  # it woke up 2 s ago
    assert again.expires == clock.now - 2 + 5


def test_looking_at_a_followed_flow_again_is_not_a_new_matched_flow() -> None:
    """igdtrigger_flows_total{result="matched"} counts flows that triggered, not the detector's
    looks at one it follows (every second or so)."""
    eng, clock, _ = make(rule(idle=5))
    f = flow()
    eng.on_flow(f)
    for _ in range(3):
        clock.advance(1)
        assert eng.on_flow_live(f, connected=False, idle=0.0) == []
    assert eng.flows_matched == 1
    clock.advance(6)
    eng.expire()
    assert len(eng.on_flow_live(f, connected=False, idle=0.0)) == 1  # woke up: triggers again
    assert eng.flows_matched == 2


# --- bounded tables: a stale flow counts for its host too ---------------------------------------


def test_stale_flows_count_toward_a_hosts_followed_flow_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_FLOWS_PER_HOST", 4)
    eng, _, _ = make(rule(idle=5))
    for sport in range(1024, 1030):  # silent too long: followed (may wake up), nothing opened
        f = Flow(Proto.UDP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.44"),
                 sport, 27015)
        assert eng.on_flow_live(f, connected=False, idle=60.0) == []
    assert len(eng.live) == 4 and eng.flows_refused == 2
    assert not eng.activations


# --- status wording ------------------------------------------------------------------------------


def test_silent_traffic_with_two_followed_flows_reads_in_the_plural() -> None:
    eng, clock, _ = make(rule(idle=60))
    eng.on_flow(flow())
    eng.on_flow(Flow(Proto.UDP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.44"),
                     50001, 27015))
    clock.advance(3)
    assert only(eng).hold_reason(clock.now) == "traffic 3s ago, 2 live flows"


def test_a_self_mapped_activation_says_so_in_its_json() -> None:
    eng, clock, _ = make()
    act = eng.activate("demo", HOST, ttl=60)
    assert "self_mapped" not in act.to_json(clock.now)
    eng.set_self_mapped(act.id, True)
    assert act.to_json(clock.now)["self_mapped"] is True


# --- a self-mapped activation gives its ports away, and only its own ---------------------------


def test_a_self_mapped_activation_does_not_hide_later_ones() -> None:
    eng, clock, _ = make(rule(), rule("other", "udp/1000", "udp/41000"))
    first = eng.activate("demo", HOST, ttl=60)
    clock.advance(1)
    eng.activate("other", OTHER, ttl=60)
    eng.set_self_mapped(first.id, True)
    desired = eng.desired()
    assert MappingKey(Proto.UDP, 40000) not in desired
    assert desired[MappingKey(Proto.UDP, 41000)].internal_client == OTHER


# --- inbound use refreshes the activation that holds the port ----------------------------------


def test_inbound_traffic_refreshes_the_holder_of_the_port_not_a_later_claimant() -> None:
    eng, clock, _ = make(rule(idle=30))
    [first] = eng.on_flow(flow())
    clock.advance(1)
    [second] = eng.on_flow(flow(src=OTHER))  # wants the same ports: waits for them
    second_expiry = second.expires
    assert eng.desired()[MappingKey(Proto.UDP, 40000)].internal_client == HOST
    clock.advance(10)
    eng.on_flow(inbound())
    assert first.expires == clock.now + 30
    assert second.expires == second_expiry  # untouched


def test_inbound_traffic_finds_an_activation_restored_after_the_last_lookup() -> None:
    eng, clock, _ = make(rule(idle=30), rule("other", "udp/1000", "udp/41000", idle=30))
    eng.on_flow(flow())
    eng.on_flow(inbound())  # the port owners were looked up once
    act = eng.restore("old", "other", OTHER, "traffic", age=0, remaining=30, ttl=30, meta={})
    assert act is not None
    clock.advance(5)
    before = eng.flows_inbound
    eng.on_flow(inbound(41000, sport=61001))
    assert eng.flows_inbound == before + 1
    assert act.expires == clock.now + 30


# --- detected-traffic quotas are for detected traffic --------------------------------------------


def test_a_process_sighting_is_not_held_back_by_the_detected_traffic_quota() -> None:
    r = rule(idle=60, process=("game",))
    eng, _, _ = make(r, rule("other", "udp/1000", "udp/41000"))
    eng.max_detected = 1
    eng.on_flow(flow(dport=1000, src=OTHER))  # the one detected activation allowed
    assert len(eng.activations) == 1
    [act] = eng.on_process(["game"], HOST)
    assert act.source is Source.PROCESS and not eng.refused


def test_a_host_whose_detected_activation_lapsed_frees_its_place_behind_the_mac() -> None:
    eng, clock, _ = make(rule(idle=5))
    eng.origin_of = lambda addr: "aa:bb:cc:dd:ee:ff"  # both hosts behind one MAC address
    eng.max_hosts_per_origin = 1
    eng.on_flow(flow())
    assert eng.on_flow(flow(src=OTHER)) == []  # the second host behind that MAC: refused
    assert eng.refused["detected_per_origin"] == 1
    clock.advance(5)
    assert eng.expire()
    [act] = eng.on_flow(flow(src=OTHER, dport=27015))
    assert act.host == OTHER


# --- restore: TTL edge, status, precedence, the journal ----------------------------------------


def test_an_activation_with_a_seven_day_ttl_is_restored() -> None:
    eng, clock, _ = make()
    act = eng.restore("old", "demo", HOST, "api", age=10, remaining=MAX_TTL, ttl=MAX_TTL,
                      meta={})
    assert act is not None and act.expires == clock.now + MAX_TTL


def test_a_restored_traffic_activation_reports_when_its_last_traffic_was() -> None:
    eng, clock, _ = make(rule(idle=600))
    act = eng.restore("old", "demo", HOST, "traffic", age=200, remaining=500, ttl=600, meta={})
    assert act is not None
    assert act.hold_reason(clock.now) == "traffic 1m40s ago"


def test_a_restored_activation_refreshed_by_traffic_does_not_rewrite_the_journal_each_time(
) -> None:
    eng, clock, _ = make(rule(idle=600))
    act = eng.restore("old", "demo", HOST, "traffic", age=0, remaining=600, ttl=600, meta={})
    assert act is not None
    eng.dirty.clear()
    clock.advance(1)
    eng.on_flow(flow())  # refreshed by a second: the journal's expiry is close enough
    assert act.expires == clock.now + 600 and act.hits == 2
    assert act.id not in eng.dirty


def test_a_restored_activation_does_not_take_ports_from_one_created_at_the_same_moment(
) -> None:
    eng, _, _ = make()
    eng.deactivate(eng.activate("demo", OTHER, ttl=60).id)
    live = eng.activate("demo", HOST, ttl=60)
    assert eng.restore("old", "demo", OTHER, "api", age=0, remaining=60, ttl=60, meta={})
    # both created at this moment: the live one came first and keeps the ports
    assert eng.desired()[MappingKey(Proto.UDP, 40000)].internal_client == live.host


# --- a restored held activation, a connection ending, the journal -------------------------------


def restored_held(idle: float = 600) -> tuple[Engine, Activation, FakeClock]:
    eng, clock, _ = make(rule(idle=idle))
    act = eng.restore("old", "demo", HOST, "traffic", age=3600, remaining=math.inf, ttl=idle,
                      meta={}, held=True)
    assert act is not None
    return eng, act, clock


def test_a_restored_held_activation_says_it_is_looking_for_its_connection() -> None:
    _, act, clock = restored_held()
    assert act.hold_reason(clock.now) == (
        "held before the restart, looking for its connection (10m00s left at most)")


def test_a_restored_held_activation_whose_connection_is_gone_closes_at_once() -> None:
    eng, act, _ = restored_held()
    assert eng.settle_restored() == [act]
    assert act.expires == eng.clock()
    assert eng.expire() == [act]


def test_a_restored_held_activation_with_traffic_again_tells_the_journal_its_expiry() -> None:
    """The journal holds it as held (no expiry); traffic seen before the detector's first look
    gives it one, which must reach the journal (else a crash now restores it as held)."""
    eng, act, clock = restored_held()
    eng.dirty.clear()
    clock.advance(10)
    eng.on_flow(flow())
    assert act.expires == clock.now + 600
    assert act.id in eng.dirty


def test_a_deactivated_held_activation_no_longer_reads_as_held() -> None:
    eng, clock, _ = make(rule(trigger="tcp/27015", idle=5))
    f = flow(proto=Proto.TCP)
    eng.on_flow(f)
    eng.on_flow_live(f, connected=True)
    act = only(eng)
    assert act.hold_reason(clock.now) == "1 live flow"
    eng.deactivate(act.id)
    assert act.hold_reason(clock.now) == "traffic 0s ago"


def test_a_silent_flow_that_ends_does_not_count_as_a_packet() -> None:
    """conntrack dropping a silent UDP flow is no traffic: the timer keeps running from its
    last packet (only a connection closed by its endpoints counts as one)."""
    eng, clock, _ = make(rule(idle=60))
    f = flow()
    eng.on_flow(f)
    t0 = clock.now
    clock.advance(30)
    eng.on_flow_ended(f)
    assert only(eng).expires == t0 + 60


def test_a_stale_flow_from_an_allowed_host_is_followed_for_when_it_wakes() -> None:
    eng, _, _ = make(rule(idle=5, hosts=(ipaddress.ip_network("192.168.1.0/24"),)))
    f = flow()
    assert eng.on_flow_live(f, connected=False, idle=60.0) == []
    assert eng.follows(f)


def test_the_journal_hears_of_a_later_expiry_once_it_moved_a_quarter_of_the_timeout() -> None:
    eng, clock, _ = make(rule(idle=600))
    [act] = eng.on_flow(flow())
    eng.dirty.clear()
    clock.advance(149)
    eng.on_flow(flow())
    assert act.id not in eng.dirty
    clock.advance(1)  # 150 s = a quarter of 600 s later than the journal's
    eng.on_flow(flow())
    assert act.id in eng.dirty


# --- after the rehouse: rules sharing a trigger port, the detected-traffic counts ------------


def test_a_rule_that_does_not_allow_the_host_does_not_hide_the_next_one() -> None:
    only_other = rule("other-only", idle=60, hosts=(ipaddress.ip_network(f"{OTHER}/32"),))
    eng, _, _ = make(only_other, rule("anyone", idle=60))
    [act] = eng.on_flow(flow())
    assert act.rule.name == "anyone"


def test_a_rule_whose_timeout_the_silence_outlasted_does_not_hide_the_next_one() -> None:
    eng, clock, _ = make(rule("short", idle=5), rule("long", idle=60))
    [act] = eng.on_flow_live(flow(), connected=False, idle=10.0)
    assert act.rule.name == "long" and act.expires == clock.now - 10 + 60


def test_api_and_local_activations_do_not_count_as_detected_traffic() -> None:
    eng, _, _ = make(rule(idle=60), rule("b", "udp/1000", "udp/41000"), local=("192.168.1.5",))
    eng.max_detected = 1
    eng.activate("b", HOST, ttl=60)
    eng.on_flow(flow(src="192.168.1.5", dport=1000))  # this machine's own traffic
    assert len(eng.on_flow(flow())) == 1  # the one detected activation allowed
    assert not eng.refused


def test_a_lapsed_detected_activation_frees_its_place_in_the_total() -> None:
    eng, clock, _ = make(rule(idle=5))
    eng.max_detected = 1
    eng.on_flow(flow())
    assert eng.on_flow(flow(src=OTHER)) == []
    assert eng.refused["detected_total"] == 1
    clock.advance(5)
    assert eng.expire()
    assert len(eng.on_flow(flow(src=OTHER))) == 1


def test_an_activation_with_the_shortest_ttl_is_restored() -> None:
    eng, clock, _ = make()
    act = eng.restore("old", "demo", HOST, "api", age=0, remaining=1, ttl=1, meta={})
    assert act is not None and act.expires == clock.now + 1


def test_an_ended_flow_frees_exactly_one_place_in_its_hosts_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_FLOWS_PER_HOST", 4)
    eng, _, _ = make(rule(idle=60))
    flows = [Flow(Proto.UDP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.44"),
                  sport, 27015) for sport in range(1024, 1030)]
    for f in flows[:4]:
        eng.on_flow(f)
    eng.on_flow_ended(flows[0])
    eng.on_flow(flows[4])
    eng.on_flow(flows[5])
    assert len(eng.live) == 4 and not eng.follows(flows[5])
