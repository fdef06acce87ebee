"""Trigger logic with an injected clock: no sockets, no sleeps."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.core.activation import EventKind, Source, owned_by
from igdtrigger.core.engine import Engine
from igdtrigger.core.errors import HostNotAllowed, RuleNotFound, UsageError
from igdtrigger.core.model import Flow, MappingKey, Proto, parse_port_spec
from igdtrigger.core.rules import Rule, Share

from .fakes import FakeClock


def rule(name: str = "demo", trigger: str = "udp/27015", open_: str = "udp/40000-40002",
         idle: float = 600) -> Rule:
    return Rule(name, parse_port_spec(trigger), parse_port_spec(open_), idle)


def flow(src: str = "192.168.1.20", dport: int = 27015, proto: Proto = Proto.UDP,
         dst: str = "11.22.33.44") -> Flow:
    return Flow(proto, ipaddress.ip_address(src), ipaddress.ip_address(dst), 50000, dport)


def make(*rules: Rule) -> tuple[Engine, FakeClock, list[tuple[EventKind, str]]]:
    clock = FakeClock()
    events: list[tuple[EventKind, str]] = []
    eng = Engine(rules or (rule(),), clock=clock, tag="abc123",
                 on_event=lambda e: events.append((e.kind, e.activation.host)))
    return eng, clock, events


def test_trigger_flow_opens_rule_ports_for_that_host() -> None:
    eng, _, events = make()
    created = eng.on_flow(flow())
    assert len(created) == 1
    desired = eng.desired()
    assert sorted(desired) == [MappingKey(Proto.UDP, p) for p in (40000, 40001, 40002)]
    assert {s.internal_client for s in desired.values()} == {"192.168.1.20"}
    assert all(s.internal_port == s.external_port for s in desired.values())
    assert owned_by(next(iter(desired.values())).description, "abc123") == "demo"
    assert events == [(EventKind.ACTIVATED, "192.168.1.20")]


@pytest.mark.parametrize(
    "f",
    [
        flow(dport=27016),  # not a trigger port
        flow(proto=Proto.TCP),  # wrong protocol
        flow(src="11.9.9.9"),  # inbound from the internet: not a LAN source
        flow(dst="192.168.1.1"),  # stays on the LAN
        flow(dst="127.0.0.1"),  # loopback
        flow(src="127.0.0.1"),
        flow(dst="224.0.0.251"),  # multicast
    ],
)
def test_non_trigger_flows_open_nothing(f: Flow) -> None:
    eng, _, _ = make()
    assert eng.on_flow(f) == []
    assert eng.desired() == {}


def test_idle_timeout_is_refreshed_by_each_matching_flow() -> None:
    eng, clock, events = make(rule(idle=600))
    eng.on_flow(flow())
    clock.advance(500)
    assert eng.on_flow(flow()) == []  # refresh, not a new activation
    clock.advance(500)  # 1000s after the first flow, 500s after the last
    assert eng.expire() == []
    assert eng.desired()
    assert eng.next_deadline() == clock.now + 100
    clock.advance(100)
    gone = eng.expire()
    assert [a.rule.name for a in gone] == ["demo"]
    assert eng.desired() == {}
    assert events[-1] == (EventKind.EXPIRED, "192.168.1.20")
    assert eng.next_deadline() is None


def test_explicit_activation_ttl_and_heartbeat() -> None:
    eng, clock, _ = make()
    act = eng.activate("demo", "192.168.1.30", ttl=30, source=Source.RUN)
    clock.advance(20)
    eng.heartbeat(act.id)
    clock.advance(20)
    assert eng.expire() == []
    clock.advance(10)
    assert [a.id for a in eng.expire()] == [act.id]


def test_explicit_activation_defaults_to_rule_idle_timeout() -> None:
    eng, _, _ = make(rule(idle=120))
    assert eng.activate("demo", "192.168.1.30").ttl == 120


def test_deactivate_closes_immediately() -> None:
    eng, _, events = make()
    act = eng.activate("demo", "192.168.1.30", ttl=3600)
    eng.deactivate(act.id)
    assert eng.desired() == {}
    assert events[-1][0] is EventKind.DEACTIVATED


def test_unknown_rule_and_bad_input() -> None:
    eng, _, _ = make()
    with pytest.raises(RuleNotFound, match="unknown rule 'nope' \\(known rules: demo\\)"):
        eng.activate("nope", "192.168.1.30")
    with pytest.raises(UsageError, match="not an IP address"):
        eng.activate("demo", "my-pc")
    with pytest.raises(UsageError, match="outside"):
        eng.activate("demo", "192.168.1.30", ttl=-1)


def test_first_host_keeps_contested_ports_second_takes_over_after() -> None:
    eng, clock, _ = make(rule(idle=100))
    eng.on_flow(flow(src="192.168.1.20"))
    clock.advance(10)
    eng.on_flow(flow(src="192.168.1.21"))
    desired = eng.desired()
    assert {s.internal_client for s in desired.values()} == {"192.168.1.20"}
    second = next(a for a in eng.activations.values() if a.host == "192.168.1.21")
    assert eng.waiting_for(second, desired) == {"192.168.1.20"}
    clock.advance(95)  # the first lapses (100s idle), the second still has 5s
    eng.expire()
    assert {s.internal_client for s in eng.desired().values()} == {"192.168.1.21"}


def test_two_rules_share_a_trigger_port() -> None:
    a = rule("a", "udp/27015", "udp/1000")
    b = rule("b", "udp/27015", "tcp/2000")
    eng, _, _ = make(a, b)
    assert len(eng.on_flow(flow())) == 2
    assert sorted(eng.desired()) == [MappingKey(Proto.TCP, 2000), MappingKey(Proto.UDP, 1000)]


def test_wide_trigger_range_matches() -> None:
    eng, _, _ = make(rule("wide", "tcp/1024-65535", "tcp/7777"))
    assert eng.on_flow(flow(proto=Proto.TCP, dport=50000))
    assert eng.on_flow(flow(proto=Proto.TCP, dport=80)) == []


# --- property: any sequence of events leaves exactly the activations the rules imply ----------

HOSTS = ["192.168.1.20", "192.168.1.21", "192.168.1.22"]
RULES = (rule("a", "udp/1000", "udp/5000", idle=50), rule("b", "tcp/2000-2001", "both/6000", 80),
         dataclasses.replace(rule("c", "udp/1000", "tcp/7000", idle=30), process=("game",)))
LOCAL = HOSTS[0]  # process sightings are this host's

ops = st.one_of(
    st.tuples(st.just("flow"), st.sampled_from(HOSTS), st.sampled_from([1000, 2000, 2001, 3000]),
              st.sampled_from([Proto.UDP, Proto.TCP])),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=120)),
    st.tuples(st.just("proc"), st.frozensets(st.sampled_from(["game", "GAME", "other"]))),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=40))
def test_activations_match_a_simple_model(seq: list[tuple[object, ...]]) -> None:
    eng, clock, _ = make(*RULES)
    # the model: (rule, host, source) -> when it was last seen (a flow, or the process running)
    last_seen: dict[tuple[str, str, str], float] = {}
    for op in seq:
        if op[0] == "flow":
            _, host, port, proto = op
            assert isinstance(host, str) and isinstance(port, int) and isinstance(proto, Proto)
            eng.on_flow(flow(src=host, dport=port, proto=proto))
            for r in RULES:
                if any(port in rng and rng.proto is proto for rng in r.trigger):
                    last_seen[(r.name, host, "traffic")] = clock.now
        elif op[0] == "proc":
            names = op[1]
            assert isinstance(names, frozenset)
            eng.on_process(names, LOCAL)
            for r in RULES:
                if {n.lower() for n in names} & set(r.process):
                    last_seen[(r.name, LOCAL, "process")] = clock.now
        else:
            dt = op[1]
            assert isinstance(dt, float)
            clock.advance(dt)
        eng.expire()
        idle = {r.name: r.idle_timeout for r in RULES}
        for k, t in list(last_seen.items()):
            if clock.now >= t + idle[k[0]]:
                del last_seen[k]  # lapsed: a later sighting starts a new activation
        assert {(a.rule.name, a.host, a.source.value)
                for a in eng.activations.values()} == set(last_seen)
        # every desired port belongs to a live activation's rule, mapped to its oldest holder
        for key, spec in eng.desired().items():
            holders = sorted((a for a in eng.activations.values()
                              if any(key.external_port in rg and rg.proto is key.proto
                                     for rg in a.rule.open)),
                             key=lambda a: (a.created, a.seq))
            assert holders and spec.internal_client == holders[0].host


def test_rule_hosts_restrict_who_can_trigger() -> None:
    import dataclasses

    r = dataclasses.replace(rule(), hosts=(ipaddress.ip_network("192.168.1.16/28"),))
    eng, _, _ = make(r)
    assert eng.on_flow(flow(src="192.168.1.40")) == []  # outside the list: nothing opens
    assert eng.on_flow(flow(src="192.168.1.20"))
    with pytest.raises(HostNotAllowed, match=r"does not allow host 192\.168\.1\.40"):
        eng.activate("demo", "192.168.1.40")


def test_share_latest_gives_the_ports_to_the_newest_host() -> None:
    import dataclasses

    eng, clock, _ = make(dataclasses.replace(rule(idle=100), share=Share.LATEST))
    eng.on_flow(flow(src="192.168.1.20"))
    clock.advance(10)
    eng.on_flow(flow(src="192.168.1.21"))
    assert {s.internal_client for s in eng.desired().values()} == {"192.168.1.21"}
    first = next(a for a in eng.activations.values() if a.host == "192.168.1.20")
    assert eng.waiting_for(first, eng.desired()) == {"192.168.1.21"}


def test_process_holds_rule_while_running_and_lapses_after_idle() -> None:
    import dataclasses

    r = dataclasses.replace(rule(idle=60), process=("eldenring.exe", "cs2"))
    eng, clock, _ = make(r)
    assert eng.on_process(["bash", "CS2"], "192.168.1.10")  # names compare case-insensitively
    for _ in range(10):  # the detector keeps seeing it
        clock.advance(30)
        assert eng.on_process(["cs2"], "192.168.1.10") == []
        eng.expire()
        assert eng.desired()
    clock.advance(59)  # gone from the polls now
    eng.expire()
    assert eng.desired()
    clock.advance(2)
    eng.expire()
    assert eng.desired() == {}
    assert eng.on_process(["firefox"], "192.168.1.10") == []
