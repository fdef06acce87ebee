"""Engine edges a user would notice, each found by a mutant that no other test killed.

Pure: an injected clock, no sockets. Only public entry points (flows, activate, heartbeat,
restore, expire, desired, next_deadline), so the engine's internals are free to change.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from igdtrigger.core import engine as engine_mod
from igdtrigger.core.activation import (
    MAX_TTL,
    EventKind,
    Source,
    adhoc_rule,
    description_for,
    owned_by,
)
from igdtrigger.core.engine import Engine
from igdtrigger.core.errors import ActivationNotFound, HostNotAllowed, UsageError
from igdtrigger.core.matching import is_lan_source, is_remote_destination
from igdtrigger.core.model import Flow, MappingKey, PortRange, Proto, parse_port_spec
from igdtrigger.core.rules import Rule

from .fakes import FakeClock

HOST = "192.168.1.20"
OTHER = "192.168.1.21"


def ports(*specs: str) -> tuple[PortRange, ...]:
    return tuple(r for spec in specs for r in parse_port_spec(spec))


def rule(name: str = "demo", trigger: str = "udp/27015", open_: str = "udp/40000-40002",
         idle: float = 600, **kw: Any) -> Rule:
    return dataclasses.replace(
        Rule(name, ports(*trigger.split(",")), ports(*open_.split(",")), idle), **kw)


def flow(src: str = HOST, dport: int = 27015, proto: Proto = Proto.UDP,
         dst: str = "11.22.33.44") -> Flow:
    return Flow(proto, ipaddress.ip_address(src), ipaddress.ip_address(dst), 50000, dport)


Seen = tuple[EventKind, str, float]  # an engine event as make() records it: kind, activation, at


def make(*rules: Rule, local: tuple[str, ...] = ()) -> tuple[Engine, FakeClock, list[Seen]]:
    clock = FakeClock()
    events: list[Seen] = []
    ids = iter(f"id{i}" for i in range(10_000))
    eng = Engine(rules or (rule(),), clock=clock, tag="t1", local_hosts=local,
                 on_event=lambda e: events.append((e.kind, e.activation.id, e.at)),
                 id_factory=lambda: next(ids))
    return eng, clock, events


# --- a busy activation: refreshed many times, it still lapses on time ---------------------------


def test_busy_activation_refreshed_hundreds_of_times_lapses_once_on_time() -> None:
    eng, clock, events = make(rule(idle=60), rule("quiet", "udp/1000", "udp/1000", idle=90))
    [busy] = eng.on_flow(flow())
    [quiet] = eng.on_flow(flow(dport=1000, src=OTHER))
    t0 = clock.now
    for _ in range(300):  # a game sending a new flow every second: far more than 64 refreshes
        clock.advance(1)
        assert eng.on_flow(flow()) == []
        # the quiet one keeps its own deadline through every heap rebuild
        if clock.now < t0 + 90:
            assert eng.next_deadline() == min(clock.now + 60, t0 + 90)
            assert eng.expire() == []
        elif clock.now == t0 + 90:
            assert eng.expire() == [quiet]
    assert busy.hits == 301
    assert quiet.id not in eng.activations  # lapsed at 90 s, while the busy one was refreshed
    assert eng.next_deadline() == clock.now + 60
    clock.advance(59.5)
    assert eng.expire() == []
    clock.advance(0.5)
    assert [a.id for a in eng.expire()] == [busy.id]
    assert eng.next_deadline() is None
    assert eng.expire() == []
    assert [e for e in events if e[0] is EventKind.EXPIRED] == [
        (EventKind.EXPIRED, quiet.id, t0 + 90), (EventKind.EXPIRED, busy.id, t0 + 360)]


def test_refreshes_do_not_grow_the_timer_queue_without_bound() -> None:
    """A LAN host sending flows all day must not grow memory: stale timer entries are dropped."""
    eng, clock, _ = make(rule(idle=60))
    eng.on_flow(flow())
    for _ in range(5000):
        clock.advance(0.01)
        eng.on_flow(flow())
    assert len(eng._timers) <= 65


def test_many_activations_refreshed_keep_every_deadline() -> None:
    rules = [rule(f"r{i}", f"udp/{1000 + i}", f"udp/{2000 + i}", idle=100 + i) for i in range(20)]
    eng, clock, _ = make(*rules)
    for i in range(20):
        eng.on_flow(flow(dport=1000 + i))
    for _ in range(10):  # every activation refreshed: 200 stale entries, then rebuilt
        clock.advance(1)
        for i in range(20):
            eng.on_flow(flow(dport=1000 + i))
    assert eng.next_deadline() == clock.now + 100
    clock.advance(99.5)
    assert eng.expire() == []
    lapsed: list[str] = []
    for _ in range(25):
        clock.advance(1)
        lapsed += [a.rule.name for a in eng.expire()]
    assert lapsed == [f"r{i}" for i in range(20)]  # each at 10 + its own idle timeout


def test_heartbeat_many_times_then_lapse() -> None:
    eng, clock, _ = make(rule(idle=30))
    act = eng.activate("demo", HOST, ttl=30)
    for _ in range(200):
        clock.advance(10)
        eng.heartbeat(act.id)
    assert act.hits == 201
    assert eng.next_deadline() == clock.now + 30
    clock.advance(30)
    assert eng.expire() == [act]


# --- TTL: 1 s .. 7 days, as the error message and the API document it ---------------------------


@pytest.mark.parametrize("ttl", [0, -1, -0.5, 0.5, 0.999, MAX_TTL + 1, MAX_TTL + 0.001])
def test_ttl_outside_one_second_to_seven_days_is_refused(ttl: float) -> None:
    eng, _, _ = make()
    with pytest.raises(UsageError, match="outside 1s-7d"):
        eng.activate("demo", HOST, ttl=ttl)
    with pytest.raises(UsageError, match="outside 1s-7d"):
        eng.activate_adhoc(parse_port_spec("udp/5000"), HOST, ttl=ttl)
    act = eng.activate("demo", HOST, ttl=30)
    with pytest.raises(UsageError, match="outside 1s-7d"):
        eng.heartbeat(act.id, ttl=ttl)
    assert act.ttl == 30  # a refused heartbeat changes nothing
    assert len(eng.activations) == 1


@pytest.mark.parametrize("ttl", [MAX_TTL, 604800, 1, 1.5])
def test_ttl_up_to_exactly_seven_days_is_accepted(ttl: float) -> None:
    eng, clock, _ = make()
    assert MAX_TTL == 7 * 86400
    act = eng.activate("demo", HOST, ttl=ttl)
    assert act.expires == clock.now + ttl
    adhoc = eng.activate_adhoc(parse_port_spec("udp/5000"), OTHER, ttl=ttl)
    assert adhoc.expires == clock.now + ttl
    clock.advance(ttl / 2)
    assert eng.heartbeat(act.id, ttl=ttl).expires == clock.now + ttl
    assert act.ttl == ttl


def test_heartbeat_new_ttl_is_kept_for_later_heartbeats() -> None:
    eng, clock, _ = make()
    act = eng.activate("demo", HOST, ttl=30)
    eng.heartbeat(act.id, ttl=100)
    clock.advance(50)
    eng.heartbeat(act.id)
    assert act.expires == clock.now + 100
    clock.advance(99.9)
    assert eng.expire() == []
    clock.advance(0.1)
    assert eng.expire() == [act]
    with pytest.raises(ActivationNotFound):
        eng.heartbeat(act.id)


def test_activation_lapses_exactly_at_its_deadline_not_before() -> None:
    eng, clock, events = make()
    act = eng.activate("demo", HOST, ttl=10)
    assert eng.next_deadline() == clock.now + 10
    clock.advance(9.5)
    assert eng.expire() == []
    clock.advance(0.5)
    assert eng.expire() == [act]
    assert events[-1] == (EventKind.EXPIRED, act.id, clock.now)


# --- wide trigger ranges: scanned, not indexed, but every port still counts ---------------------


@pytest.mark.parametrize(("spec", "first", "last"), [
    ("tcp/1024-65535", 1024, 65535),  # 64,512 ports: scanned
    ("tcp/10000-14096", 10000, 14096),  # 4,097 ports: the first width that is scanned
    ("tcp/10000-14095", 10000, 14095),  # 4,096 ports: the widest that is indexed
])
def test_wide_trigger_range_first_and_last_port_trigger(spec: str, first: int, last: int) -> None:
    for port in (first, last, (first + last) // 2):
        eng, _, _ = make(rule("wide", spec, "tcp/7777"))
        assert len(eng.on_flow(flow(proto=Proto.TCP, dport=port))) == 1, port
        assert list(eng.desired()) == [MappingKey(Proto.TCP, 7777)]
    for port in (first - 1, last + 1):
        eng, _, _ = make(rule("wide", spec, "tcp/7777"))
        assert eng.on_flow(flow(proto=Proto.TCP, dport=port)) == [], port
    eng, _, _ = make(rule("wide", spec, "tcp/7777"))
    assert eng.on_flow(flow(proto=Proto.UDP, dport=first)) == []  # other protocol


def test_wide_and_narrow_ranges_of_one_rule_trigger_it_once() -> None:
    wide = rule("w", "tcp/1000-60000,tcp/2000,udp/1-65535", "tcp/7777")
    eng, _, _ = make(wide, rule("n", "tcp/2000", "udp/8888"))
    created = eng.on_flow(flow(proto=Proto.TCP, dport=2000))
    assert sorted(a.rule.name for a in created) == ["n", "w"]
    assert len(eng.activations) == 2
    assert len(eng.on_flow(flow(proto=Proto.UDP, dport=65535))) == 0  # "w" refreshed
    assert eng.activations[created[0].id].hits + eng.activations[created[1].id].hits == 3


def test_overlapping_narrow_ranges_of_one_rule_match_it_once() -> None:
    eng, _, _ = make(rule("o", "udp/1000-1010,udp/1005", "udp/7000"))
    assert len(eng.on_flow(flow(dport=1005))) == 1
    assert eng.index.match(Proto.UDP, 1005) == (eng.rules["o"],)


# --- two rules behind one trigger port: neither lapses while traffic continues ------------------


def test_two_rules_sharing_a_trigger_port_both_hold_while_traffic_continues() -> None:
    a = rule("a", "udp/27015", "udp/1000", idle=100)
    b = rule("b", "udp/27015", "tcp/2000", idle=300)
    eng, clock, events = make(a, b)
    assert len(eng.on_flow(flow())) == 2
    for _ in range(20):  # a flow every 90 s for 30 minutes
        clock.advance(90)
        assert eng.on_flow(flow()) == []
        eng.expire()
        assert sorted(act.rule.name for act in eng.activations.values()) == ["a", "b"]
    assert sorted(eng.desired()) == [MappingKey(Proto.TCP, 2000), MappingKey(Proto.UDP, 1000)]
    assert not [e for e in events if e[0] is EventKind.EXPIRED]
    clock.advance(100)
    assert [x.rule.name for x in eng.expire()] == ["a"]
    clock.advance(200)
    assert [x.rule.name for x in eng.expire()] == ["b"]


def test_two_hosts_on_one_rule_are_separate_activations() -> None:
    eng, clock, _ = make(rule(idle=100))
    [first] = eng.on_flow(flow())
    [second] = eng.on_flow(flow(src=OTHER))
    assert first.id != second.id
    clock.advance(60)
    eng.on_flow(flow(src=OTHER))  # only the second host keeps sending
    clock.advance(40)
    assert eng.expire() == [first]
    assert set(eng.activations) == {second.id}


def test_traffic_and_explicit_activation_of_one_rule_and_host_are_independent() -> None:
    eng, clock, _ = make(rule(idle=100))
    api = eng.activate("demo", HOST, ttl=1000)
    [traffic] = eng.on_flow(flow())
    assert traffic.id != api.id and traffic.source is Source.TRAFFIC
    clock.advance(100)
    assert eng.expire() == [traffic]
    assert api.expires == clock.now + 900  # flows never touched the explicit one
    eng.deactivate(api.id)
    assert eng.desired() == {}
    [again] = eng.on_flow(flow())  # traffic after the lapse starts a new activation
    assert again.id not in (traffic.id, api.id)


# --- restore after a restart re-links traffic and process activations --------------------------


@pytest.mark.parametrize("source", [Source.TRAFFIC, Source.PROCESS])
def test_restored_activation_is_refreshed_by_new_flows_not_duplicated(source: Source) -> None:
    eng, clock, events = make(rule(idle=600, process=("game",)))
    act = eng.restore("old1", "demo", HOST, source.value, age=100, remaining=50, ttl=600, meta={})
    assert act is not None and act.source is source
    assert act.created == clock.now - 100 and act.expires == clock.now + 50
    assert eng.next_deadline() == clock.now + 50
    clock.advance(10)
    if source is Source.TRAFFIC:
        assert eng.on_flow(flow()) == []
    else:
        assert eng.on_process(["game"], HOST) == []
    assert list(eng.activations) == ["old1"]
    assert act.expires == clock.now + 600 and act.hits == 2
    assert not [e for e in events if e[0] is EventKind.ACTIVATED]  # nothing new to announce
    clock.advance(600)
    assert eng.expire() == [act]
    # and once it lapsed, the link is gone too: the next flow starts a fresh activation
    fresh = eng.on_flow(flow()) if source is Source.TRAFFIC else eng.on_process(["game"], HOST)
    assert len(fresh) == 1 and fresh[0].id != "old1"


def test_restored_api_activation_is_not_taken_over_by_flows() -> None:
    eng, _, _ = make()
    act = eng.restore("old1", "demo", HOST, "api", age=0, remaining=50, ttl=300,
                      meta={"k": "v"})
    assert act is not None and act.meta == {"k": "v"} and act.ttl == 300
    assert len(eng.on_flow(flow())) == 1
    assert len(eng.activations) == 2
    assert eng.generation >= 2


@pytest.mark.parametrize(("rule_name", "host", "source", "remaining"), [
    ("gone", HOST, "traffic", 50),  # the rule was removed from the config
    ("demo", HOST, "telepathy", 50),  # a journal from a future version
    ("demo", HOST, "traffic", 0),  # lapsed while we were down
    ("demo", HOST, "traffic", -5),
    ("demo", "192.168.2.9", "api", 50),  # the rule no longer allows this host
])
def test_restore_refuses_what_cannot_come_back(rule_name: str, host: str, source: str,
                                               remaining: float) -> None:
    eng, _, _ = make(rule(hosts=(ipaddress.ip_network("192.168.1.0/24"),)))
    assert eng.restore("x", rule_name, host, source, age=1, remaining=remaining, ttl=60,
                       meta={}) is None
    assert eng.activations == {} and eng.desired() == {}


def test_restore_twice_keeps_one() -> None:
    eng, clock, _ = make()
    assert eng.restore("x", "demo", HOST, "api", age=1, remaining=5, ttl=60, meta={})
    assert eng.restore("x", "demo", HOST, "api", age=1, remaining=99, ttl=60, meta={}) is None
    assert eng.activations["x"].expires == clock.now + 5


def test_restore_with_negative_age_is_created_now() -> None:
    eng, clock, _ = make()
    clock.advance(1000)
    act = eng.restore("x", "demo", HOST, "api", age=-50, remaining=5, ttl=60, meta={})
    assert act is not None and act.created == clock.now


def test_restore_adhoc_only_while_permitted() -> None:
    eng, _, _ = make()
    meta = {"adhoc_open": "udp/5000 tcp/6000-6001"}
    seen: list[tuple[PortRange, ...]] = []

    def allow(ports: tuple[PortRange, ...]) -> bool:
        seen.append(ports)
        return True

    act = eng.restore("a1", "adhoc:abc", HOST, "api", age=0, remaining=10, ttl=60, meta=meta,
                      adhoc=allow)
    assert act is not None and act.rule.name == "adhoc:abc"
    assert seen == [parse_port_spec("udp/5000") + parse_port_spec("tcp/6000-6001")]
    assert sorted(eng.desired()) == [MappingKey(Proto.TCP, 6000), MappingKey(Proto.TCP, 6001),
                                     MappingKey(Proto.UDP, 5000)]
    assert eng.restore("a2", "adhoc:def", HOST, "api", age=0, remaining=10, ttl=60, meta=meta,
                       adhoc=lambda _: False) is None
    assert eng.restore("a3", "adhoc:ghi", HOST, "api", age=0, remaining=10, ttl=60,
                       meta={"adhoc_open": "udp/notaport"}, adhoc=allow) is None
    assert eng.restore("a4", "adhoc:jkl", HOST, "api", age=0, remaining=10, ttl=60,
                       meta={}, adhoc=allow) is None
    assert eng.restore("a5", "adhoc:mno", HOST, "api", age=0, remaining=10, ttl=60,
                       meta=meta) is None  # no permission callback: ad-hoc off
    assert list(eng.activations) == ["a1"]


# --- the rest of the public surface -------------------------------------------------------------


def test_adhoc_activation_opens_exactly_its_ports_and_records_them() -> None:
    eng, clock, events = make()
    act = eng.activate_adhoc(ports("udp/5000", "tcp/6000-6001"), HOST, ttl=60,
                             meta={"by": "me"})
    assert act.rule.name == "adhoc:id0"
    assert act.meta == {"by": "me", "adhoc_open": "udp/5000 tcp/6000-6001"}
    assert act.source is Source.API
    assert sorted(eng.desired()) == [MappingKey(Proto.TCP, 6000), MappingKey(Proto.TCP, 6001),
                                     MappingKey(Proto.UDP, 5000)]
    assert events == [(EventKind.ACTIVATED, "id1", clock.now)]
    with pytest.raises(UsageError, match="at least one port"):
        eng.activate_adhoc((), HOST, ttl=60)
    with pytest.raises(UsageError, match="not an IP address"):
        eng.activate_adhoc(parse_port_spec("udp/5000"), "my-pc", ttl=60)


def test_activation_json_shape() -> None:
    eng, clock, _ = make()
    act = eng.activate("demo", HOST, ttl=100, source=Source.RUN, meta={"pid": "42"})
    clock.advance(30.12345)
    assert act.to_json(clock.now).items() >= {
        "id": "id0", "rule": "demo", "host": HOST, "source": "run", "age": 30.123,
        "expires_in": 69.877, "ttl": 100, "hits": 1, "meta": {"pid": "42"}}.items()
    clock.advance(1000)
    plain = eng.activate("demo", OTHER).to_json(clock.now)
    assert plain["expires_in"] == 600 and "meta" not in plain
    assert act.to_json(clock.now)["expires_in"] == 0  # overdue, not negative


def test_event_carries_the_time_of_the_change() -> None:
    eng, clock, events = make()
    clock.advance(5)
    act = eng.activate("demo", HOST, ttl=10)
    clock.advance(3)
    eng.deactivate(act.id)
    assert events == [(EventKind.ACTIVATED, act.id, clock.now - 3),
                      (EventKind.DEACTIVATED, act.id, clock.now)]
    with pytest.raises(ActivationNotFound, match=act.id):
        eng.deactivate(act.id)
    assert eng.next_deadline() is None  # the removed one's timer is stale, not a deadline


def test_generation_moves_with_every_change_of_the_wanted_set() -> None:
    eng, clock, _ = make(rule(idle=10))
    g0 = eng.generation
    eng.on_flow(flow())
    g1 = eng.generation
    assert g1 > g0
    clock.advance(5)
    eng.on_flow(flow())  # a refresh changes no mapping
    assert eng.generation == g1
    clock.advance(10)
    eng.expire()
    assert eng.generation > g1


def test_refresh_marks_the_activation_dirty_for_the_journal() -> None:
    eng, clock, _ = make(rule(idle=10))
    [act] = eng.on_flow(flow())
    assert eng.dirty == set()
    eng.on_flow(flow())  # same instant: the expiry does not move
    assert eng.dirty == set()
    clock.advance(3)  # a later expiry is journaled once it moved a quarter of the timeout
    eng.on_flow(flow())
    assert eng.dirty == {act.id}


def test_flow_counters() -> None:
    eng, _, _ = make()
    eng.on_flow(flow(dport=1))
    eng.on_flow(flow(src="8.8.8.8"))
    eng.on_flow(flow())
    eng.on_flow(flow())
    assert (eng.flows_seen, eng.flows_matched) == (4, 2)


def test_local_host_with_a_public_address_can_trigger() -> None:
    eng, _, _ = make(local=("81.2.69.160",))
    assert len(eng.on_flow(flow(src="81.2.69.160"))) == 1
    assert eng.on_flow(flow(src="81.2.69.161")) == []


@pytest.mark.parametrize(("addr", "lan"), [
    ("192.168.1.2", True), ("10.0.0.1", True), ("172.16.0.1", True), ("169.254.1.1", True),
    ("fe80::1", True), ("fd00::1", True), ("127.0.0.1", False), ("::1", False),
    ("0.0.0.0", False), ("8.8.8.8", False), ("2001:db8::1", True), ("2a00::1", False),
])
def test_lan_source(addr: str, lan: bool) -> None:
    assert is_lan_source(ipaddress.ip_address(addr)) is lan


@pytest.mark.parametrize(("addr", "remote"), [
    ("8.8.8.8", True), ("2a00:1450::1", True), ("255.255.255.255", False),
    ("192.168.1.1", False), ("127.0.0.1", False), ("224.0.0.1", False), ("ff02::1", False),
    ("0.0.0.0", False), ("169.254.3.3", False), ("fe80::1", False), ("10.1.1.1", False),
])
def test_remote_destination(addr: str, remote: bool) -> None:
    assert is_remote_destination(ipaddress.ip_address(addr)) is remote


def test_description_marks_ours_and_only_ours() -> None:
    assert description_for("game", "t1") == "igdtrigger game t1"
    assert owned_by("igdtrigger game t1", "t1") == "game"
    assert owned_by("  igdtrigger game t1 ", "t1") == "game"
    assert owned_by("igdtrigger game t2", "t1") is None  # another instance's
    assert owned_by("igdtriggerx game t1", "t1") is None
    assert owned_by("igdtrigger game t1 x", "t1") is None
    assert owned_by("igdtrigger t1", "t1") is None
    assert owned_by("", "t1") is None


def test_share_latest_and_first_and_waiting_for() -> None:
    first = rule("f", "udp/1000", "udp/5000-5001")
    latest = rule("l", "udp/2000", "udp/6000", share="latest")
    eng, clock, _ = make(first, latest)
    [a] = eng.on_flow(flow(dport=1000))
    [c] = eng.on_flow(flow(dport=2000))
    clock.advance(1)
    [b] = eng.on_flow(flow(dport=1000, src=OTHER))
    [d] = eng.on_flow(flow(dport=2000, src=OTHER))
    desired = eng.desired()
    assert desired[MappingKey(Proto.UDP, 5000)].internal_client == HOST  # the oldest keeps it
    assert desired[MappingKey(Proto.UDP, 6000)].internal_client == OTHER  # the newest takes it
    assert eng.waiting_for(b, desired) == {HOST}
    assert eng.waiting_for(a, desired) == set()
    assert eng.waiting_for(c, desired) == {OTHER}
    assert eng.waiting_for(d, desired) == set()


def test_same_instant_ties_go_by_arrival_order() -> None:
    eng, _, _ = make(rule(share="latest"), rule("f", "udp/1000", "udp/40000"))
    eng.activate("demo", HOST)
    eng.activate("demo", OTHER)
    assert eng.desired()[MappingKey(Proto.UDP, 40001)].internal_client == OTHER
    eng2, _, _ = make(rule("f", "udp/1000", "udp/40000"))
    eng2.activate("f", HOST)
    eng2.activate("f", OTHER)
    assert eng2.desired()[MappingKey(Proto.UDP, 40000)].internal_client == HOST


def test_mapping_specs_carry_the_rule_settings() -> None:
    eng, _, _ = make(rule(external="any"), rule("fixed", "udp/1", "tcp/9000-9001"))
    eng.activate("demo", HOST)
    eng.activate("fixed", HOST)
    desired = eng.desired()
    spec = desired[MappingKey(Proto.UDP, 40000)]
    assert spec.external_any is True and spec.description == "igdtrigger demo t1"
    assert (spec.proto, spec.external_port, spec.internal_port) == (Proto.UDP, 40000, 40000)
    fixed = desired[MappingKey(Proto.TCP, 9001)]
    assert fixed.external_any is False and fixed.internal_client == HOST
    assert eng.desired() == desired  # asked twice, the same answer


def test_desired_is_a_copy_the_caller_cannot_change_the_engine_through() -> None:
    eng, _, _ = make(rule("big", "udp/1", "udp/10000-10300"), rule())
    eng.activate("big", HOST)
    first = eng.desired()
    assert len(first) == 301
    first.clear()
    assert len(eng.desired()) == 301
    eng.activate("demo", HOST)
    assert len(eng.desired()) == 304


def test_process_names_match_case_insensitively_and_once() -> None:
    r = rule(process=("Game.exe", "launcher"))
    eng, _, _ = make(r)
    created = eng.on_process(["GAME.EXE", "launcher", "other"], HOST)
    assert len(created) == 1 and created[0].source is Source.PROCESS
    assert eng.on_process(["nothing"], HOST) == []


# --- what the first mutation run still found ----------------------------------------------------


LAN = (ipaddress.ip_network("192.168.1.0/24"),)


def test_a_rule_that_refuses_the_host_does_not_stop_the_next_rule() -> None:
    only_other = rule("other", "udp/27015", "udp/1000", hosts=(ipaddress.ip_network(
        "10.0.0.0/8"),))
    eng, clock, _ = make(only_other, rule("open", "udp/27015", "udp/2000", idle=100),
                         rule("third", "udp/27015", "udp/3000", idle=100))
    assert sorted(a.rule.name for a in eng.on_flow(flow())) == ["open", "third"]
    for _ in range(5):  # refreshes reach every allowed rule too
        clock.advance(60)
        eng.on_flow(flow())
        assert eng.expire() == []


def test_two_rules_naming_one_process_both_hold() -> None:
    eng, _, _ = make(rule("a", process=("game",)), rule("b", "udp/1", "udp/2", process=("GAME",)))
    assert sorted(a.rule.name for a in eng.on_process(["Game"], HOST)) == ["a", "b"]


def test_traffic_activation_has_empty_meta() -> None:
    eng, _, _ = make()
    [act] = eng.on_flow(flow())
    assert act.meta == {} and act.ttl == 600 and act.host == HOST


def test_restricted_rule_admits_its_hosts() -> None:
    eng, _, _ = make(rule(hosts=LAN))
    assert eng.activate("demo", HOST).host == HOST
    with pytest.raises(HostNotAllowed, match=r"does not allow host 10.0.0.5 \(hosts = "
                                             r"192.168.1.0/24, 10.9.0.0/16\)"):
        make(rule(hosts=(*LAN, ipaddress.ip_network("10.9.0.0/16"))))[0].activate(
            "demo", "10.0.0.5")
    restored = eng.restore("r", "demo", OTHER, "traffic", age=0, remaining=9, ttl=60, meta={})
    assert restored is not None and restored.host == OTHER


def test_adhoc_rule_shape() -> None:
    ports_ = ports("udp/5000")
    assert adhoc_rule("abc", ports_, 60) == Rule("adhoc:abc", (), ports_, 60)
    eng, _, _ = make()
    act = eng.activate_adhoc(ports_, HOST, ttl=90)
    assert act.rule.idle_timeout == 90 and act.rule.trigger == () and act.host == HOST
    assert {s.internal_client for s in eng.desired().values()} == {HOST}
    back = eng.restore("a1", "adhoc:zz", OTHER, "api", age=0, remaining=10, ttl=77,
                       meta={"adhoc_open": "udp/6000"}, adhoc=lambda _: True)
    assert back is not None and back.rule.idle_timeout == 77


def test_restore_with_less_than_a_second_left_still_comes_back() -> None:
    eng, clock, _ = make()
    act = eng.restore("x", "demo", HOST, "api", age=0, remaining=0.5, ttl=60, meta={})
    assert act is not None and eng.next_deadline() == clock.now + 0.5


def test_restored_and_live_activations_with_one_deadline() -> None:
    eng, clock, _ = make()
    live = eng.activate("demo", HOST, ttl=50)
    back = eng.restore("x", "demo", OTHER, "api", age=0, remaining=50, ttl=60, meta={})
    assert back is not None
    clock.advance(50)
    assert {a.id for a in eng.expire()} == {live.id, "x"}


def test_restored_activations_keep_journal_order_for_latest_share() -> None:
    eng, _, _ = make(rule(share="latest"))
    eng.restore("x1", "demo", HOST, "api", age=10, remaining=50, ttl=60, meta={})
    eng.restore("x2", "demo", OTHER, "api", age=10, remaining=50, ttl=60, meta={})
    assert eng.desired()[MappingKey(Proto.UDP, 40000)].internal_client == OTHER


def test_default_ids_are_twelve_hex_digits_and_unique() -> None:
    eng = Engine([rule()], clock=FakeClock(), tag="t")
    ids = {eng.activate("demo", HOST).id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)


def test_lapsed_traffic_links_are_forgotten() -> None:
    """Many LAN hosts come and go: the per-host index must not keep the lapsed ones."""
    eng, clock, _ = make(rule(idle=10))
    for i in range(10):
        eng.on_flow(flow(src=f"192.168.2.{i}"))
    api = eng.activate("demo", HOST, ttl=5)
    eng.deactivate(api.id)
    clock.advance(10)
    assert len(eng.expire()) == 10
    assert eng._traffic == {}


def test_owned_by_needs_the_exact_spelling() -> None:
    assert owned_by("igdtrigger\tgame\tt1", "t1") is None
    assert owned_by("igdtrigger  game t1", "t1") is None


# --- what a person reads in status: why each activation is open ----------------------------------


def test_hold_reason_for_each_source() -> None:
    eng, clock, _ = make(rule(idle=60, process=("game",)))
    api = eng.activate("demo", HOST, ttl=70)
    run = eng.activate("demo", OTHER, ttl=3700, source=Source.RUN)
    assert api.hold_reason(clock.now) == "API, 1m10s left"
    assert run.hold_reason(clock.now) == "run, 1h01m left"
    [proc] = eng.on_process(["game"], HOST)
    clock.advance(5)
    assert proc.hold_reason(clock.now) == "process running"
    clock.advance(1)
    assert proc.hold_reason(clock.now) == "process last seen 6s ago"
    [traffic] = eng.on_flow(flow(src="192.168.1.30"))
    assert traffic.hold_reason(clock.now) == "traffic 0s ago, 1 live flow"
    eng.on_flow_ended(flow(src="192.168.1.30"))
    clock.advance(3)
    assert traffic.hold_reason(clock.now) == "traffic 3s ago"
    assert traffic.to_json(clock.now)["hold"] == "traffic 3s ago"
    assert traffic.to_json(clock.now)["live_flows"] == 0


def test_hold_reason_counts_live_flows() -> None:
    eng, clock, _ = make(rule(idle=60))
    one = flow()
    two = Flow(Proto.UDP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.45"),
               50001, 27015)
    [act] = eng.on_flow(one)
    eng.on_flow_live(one, connected=True)
    assert act.hold_reason(clock.now) == "1 live flow"
    eng.on_flow(two)
    eng.on_flow_live(two, connected=True)
    assert act.hold_reason(clock.now) == "2 live flows"
    j = act.to_json(clock.now)
    assert j["expires_in"] is None and j["live_flows"] == 2
    eng.on_flow_ended(one)
    eng.on_flow_live(two, connected=False)
    clock.advance(4)
    assert act.hold_reason(clock.now) == "traffic 4s ago, 1 live flow"
    assert act.to_json(clock.now)["expires_in"] == 56


# --- caps and counters on the live-flow and per-origin paths (mutation survivors) ---------------


def inbound(dport: int = 40000, dst: str = HOST) -> Flow:
    return Flow(Proto.UDP, ipaddress.ip_address("11.9.9.9"), ipaddress.ip_address(dst),
                61000, dport)


def src_flow(i: int, dport: int = 27015) -> Flow:
    return Flow(Proto.UDP, ipaddress.ip_address(f"192.168.1.{i}"),
                ipaddress.ip_address("11.22.33.44"), 50000 + i, dport)


def test_every_refusal_is_counted_and_room_comes_back() -> None:
    eng, _, _ = make(rule())
    eng.max_activations = 1
    eng.activate("demo", HOST, ttl=60)
    for _ in range(2):
        with pytest.raises(Exception, match="limit"):
            eng.activate("demo", "192.168.1.21", ttl=60)
    assert eng.refused["total"] == 2
    for n in range(2):
        assert eng.restore(f"r{n}", "demo", "192.168.1.22", "api", age=0, remaining=30,
                           ttl=60, meta={}) is None
    assert eng.refused["total"] == 4


def test_detected_total_cap_counts_each_activation_and_frees_on_removal() -> None:
    eng, _, _ = make(rule())
    eng.max_detected = 2
    eng.origin_of = lambda a: f"mac-{a}"
    a1 = eng.on_flow(src_flow(1))[0]
    assert a1.origin == "mac-192.168.1.1"
    eng.on_flow(src_flow(2))
    assert eng.on_flow(src_flow(3)) == []
    assert eng.refused["detected_total"] == 1
    eng.deactivate(a1.id)
    assert len(eng.on_flow(src_flow(4))) == 1  # one place freed: one more, not two
    assert eng.on_flow(src_flow(5)) == []
    assert eng.refused["detected_total"] == 2


def test_per_origin_cap_counts_a_host_until_its_last_activation_goes() -> None:
    eng, _, _ = make(rule("a", trigger="udp/27015"), rule("b", trigger="udp/27016",
                                                          open_="udp/41000"))
    eng.max_hosts_per_origin = 1
    eng.origin_of = lambda _a: "aa:bb:cc:dd:ee:ff"
    first = eng.on_flow(src_flow(1))[0]
    eng.on_flow(src_flow(1, 27016))  # the same host, a second rule: within the cap
    assert len(eng.activations) == 2
    eng.deactivate(first.id)  # the host still has one activation behind that MAC
    assert eng.on_flow(src_flow(2)) == []  # so a second address behind it is still refused
    assert eng.refused["detected_per_origin"] == 1


def test_a_connected_flow_holds_an_activation_created_once_there_was_room() -> None:
    eng, clock, _ = make(rule("a", idle=5), rule("b", idle=5, open_="udp/41000"))
    eng.max_activations = 1
    f = flow()
    eng.on_flow(f)
    eng.on_flow_live(f, connected=True)
    assert eng.refused["total"] == 1  # rule b: no room
    eng.max_activations = 2
    clock.advance(1)
    (b,) = eng.on_flow_live(f, connected=True, idle=0.0)
    assert b.rule.name == "b" and b.expires == float("inf")  # held by the connection
    eng.on_flow_ended(f)
    assert b.expires == clock.now + 5  # its idle timer starts when the connection ends


def test_inbound_flow_seen_again_refreshes_its_activation() -> None:
    eng, clock, _ = make(rule(idle=10))
    act = eng.on_flow(flow())[0]
    eng.on_flow(inbound())
    assert eng.follows(inbound())
    clock.advance(8)
    eng.on_flow_live(inbound(), connected=False, idle=1.0)
    assert act.expires == clock.now - 1 + 10


def test_ending_an_unknown_flow_changes_nothing() -> None:
    eng, _, _ = make()
    act = eng.on_flow(flow())[0]
    eng.on_flow_ended(flow(src="192.168.1.99"))
    assert eng.follows(flow()) and act.id in eng.activations


def test_per_host_flow_cap_frees_a_place_when_a_flow_ends_or_its_activation_goes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_FLOWS_PER_HOST", 2)
    eng, _, _ = make(rule())
    act = eng.on_flow(flow())[0]
    eng.on_flow(inbound())  # the LAN host's second followed flow
    assert eng.follows(inbound())
    f3 = Flow(Proto.UDP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.45"),
              50001, 27015)
    eng.on_flow(f3)
    assert not eng.follows(f3) and eng.flows_refused == 1
    eng.deactivate(act.id)  # its inbound flow is forgotten: one place free
    assert not eng.follows(inbound())
    eng.on_flow(f3)
    assert eng.follows(f3)
    f4 = Flow(Proto.UDP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.46"),
              50002, 27015)
    eng.on_flow(f4)
    assert not eng.follows(f4) and eng.flows_refused == 2
    eng.on_flow_ended(f3)
    eng.on_flow(f4)
    assert eng.follows(f4)


def test_flows_from_a_host_the_rule_does_not_allow_are_not_followed() -> None:
    eng, _, _ = make(rule(hosts=(ipaddress.ip_network("192.168.1.50/32"),)))
    assert eng.on_flow(flow()) == []
    assert not eng.follows(flow())


def test_inbound_use_refreshes_the_newest_holder_under_share_latest() -> None:
    eng, clock, _ = make(rule(idle=10, share="latest"))
    start = clock.now
    old = eng.on_flow(src_flow(1))[0]
    clock.advance(1)
    new = eng.on_flow(src_flow(2))[0]
    clock.advance(5)
    eng.on_flow(inbound(dst="192.168.1.2"))
    assert new.expires == clock.now + 10
    assert old.expires == start + 10  # untouched


@pytest.mark.parametrize("ttl", [0.0, -1.0, MAX_TTL + 1])
def test_restore_refuses_a_ttl_outside_limits_even_with_time_left(ttl: float) -> None:
    eng, _, _ = make()
    assert eng.restore("x", "demo", HOST, "api", age=0, remaining=30, ttl=ttl, meta={}) is None


def test_self_mapped_activation_asks_for_no_mappings_until_it_stops() -> None:
    eng, _, _ = make()
    act = eng.activate("demo", HOST, ttl=60)
    gen = eng.generation
    eng.set_self_mapped(act.id, True)
    assert eng.desired() == {} and eng.generation > gen
    eng.set_self_mapped(act.id, False)
    assert len(eng.desired()) == 3
    with pytest.raises(ActivationNotFound):
        eng.set_self_mapped("nope", True)


def test_addresses_behind_one_mac_are_capped_by_default() -> None:
    eng, _, _ = make(rule())
    eng.origin_of = lambda _a: "aa:bb:cc:dd:ee:ff"
    for i in range(1, engine_mod.MAX_HOSTS_PER_ORIGIN + 1):
        assert len(eng.on_flow(src_flow(i))) == 1
    assert eng.on_flow(src_flow(engine_mod.MAX_HOSTS_PER_ORIGIN + 1)) == []
    assert eng.refused["detected_per_origin"] == 1


@pytest.mark.parametrize("host", ["pc", "", "192.168.1.300"])
def test_restore_refuses_a_row_whose_host_is_not_an_address(host: str) -> None:
    eng, _, _ = make(rule())  # a rule for any host: only the address check can refuse
    assert eng.restore("x", "demo", host, "api", age=0, remaining=30, ttl=60, meta={}) is None
    assert eng.activations == {}


def test_an_earlier_expiry_is_journaled_at_once() -> None:
    """A heartbeat that shortens the lease moves the expiry earlier: the journal must hear of
    it now, or a crash would bring the activation back for longer than asked."""
    eng, _, _ = make()
    act = eng.activate("demo", HOST, ttl=600)
    eng.dirty.clear()
    eng.heartbeat(act.id, ttl=60)
    assert act.id in eng.dirty and act.journaled == act.expires
