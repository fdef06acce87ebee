"""The desired mapping set is kept incrementally (core/desired.py): after any sequence of
activations, deactivations, expiries, refreshes, restores and self-mapping changes it equals a
full recomputation by the first-come-first-served / ``share = "latest"`` rule, port by port."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.core.activation import Activation, Source, description_for
from igdtrigger.core.engine import Engine
from igdtrigger.core.model import Flow, MappingKey, MappingSpec, PortRange, Proto
from igdtrigger.core.rules import External, Rule, Share

from .fakes import FakeClock

TAG = "t1"
HOSTS = [f"192.168.1.{10 + i}" for i in range(4)]


def _udp(first: int, last: int) -> PortRange:
    return PortRange(Proto.UDP, first, last)


# rules sharing ports in every combination of share modes; one opens TCP too, one maps "any"
RULES = [
    Rule("a", (_udp(27015, 27015),), (_udp(40000, 40002),), 30.0),
    Rule("b", (_udp(27016, 27016),), (_udp(40001, 40003),), 20.0, share=Share.LATEST),
    Rule("c", (_udp(27017, 27017),), (_udp(40002, 40002), PortRange(Proto.TCP, 40002, 40002)),
         40.0, external=External.ANY),
    Rule("d", (_udp(27018, 27018),), (_udp(40003, 40004),), 25.0, share=Share.LATEST),
]
KEYS = sorted({MappingKey(r.proto, p) for rule in RULES for r in rule.open for p in r},
              key=str)


def reference(eng: Engine, *, mapped: bool) -> dict[MappingKey, Activation]:
    """The holders by a full recomputation, in precedence order (the engine before it was
    incremental)."""
    holders: dict[MappingKey, Activation] = {}
    for act in sorted(eng.activations.values(), key=lambda a: (a.created, a.seq)):
        if mapped and act.self_mapped:
            continue
        for rng in act.rule.open:
            for port in rng:
                key = MappingKey(rng.proto, port)
                held = holders.get(key)
                if held is None or (act.rule.share is Share.LATEST
                                    and held.rule.name == act.rule.name):
                    holders[key] = act
    return holders


def spec_of(key: MappingKey, act: Activation) -> MappingSpec:
    return MappingSpec(proto=key.proto, external_port=key.external_port,
                       internal_client=act.host, internal_port=key.external_port,
                       description=description_for(act.rule.name, TAG),
                       external_any=act.rule.external is External.ANY)


def check(eng: Engine) -> None:
    want = {k: spec_of(k, a) for k, a in reference(eng, mapped=True).items()}
    assert eng.desired() == want
    owners = reference(eng, mapped=False)
    for key in KEYS:
        assert eng.holder(key) is owners.get(key)


OPS = st.one_of(
    st.tuples(st.just("activate"), st.integers(0, 3), st.integers(0, 3), st.integers(1, 60)),
    st.tuples(st.just("flow"), st.integers(0, 3), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("deactivate"), st.integers(0, 50), st.just(0), st.just(0)),
    st.tuples(st.just("tick"), st.integers(1, 30), st.just(0), st.just(0)),
    st.tuples(st.just("heartbeat"), st.integers(0, 50), st.integers(1, 60), st.just(0)),
    st.tuples(st.just("self_mapped"), st.integers(0, 50), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("restore"), st.integers(0, 3), st.integers(0, 3), st.integers(0, 100)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=60))
def test_incremental_desired_equals_a_full_recompute(ops: list[tuple[str, int, int, int]]) -> None:
    clock = FakeClock()
    ids = iter(f"id{i}" for i in range(10_000))
    eng = Engine(RULES, clock=clock, tag=TAG, id_factory=lambda: next(ids))
    restored = 0
    for op, x, y, z in ops:
        live = sorted(eng.activations)
        if op == "activate":
            eng.activate(RULES[x].name, HOSTS[y], ttl=float(z))
        elif op == "flow":
            src, dst = ipaddress.ip_address(HOSTS[y]), ipaddress.ip_address("11.22.33.44")
            eng.on_flow(Flow(Proto.UDP, src, dst, 50000, RULES[x].trigger[0].first))
        elif op == "deactivate" and live:
            eng.deactivate(live[x % len(live)])
        elif op == "tick":
            clock.advance(x)
            eng.expire()
        elif op == "heartbeat" and live:
            eng.heartbeat(live[x % len(live)], ttl=float(y))
        elif op == "self_mapped" and live:
            eng.set_self_mapped(live[x % len(live)], bool(y))
        elif op == "restore":  # an older activation comes back: it goes first in precedence
            restored += 1
            eng.restore(f"r{restored}", RULES[x].name, HOSTS[y], Source.API.value, age=z,
                        remaining=10.0, ttl=30.0, meta={})
        check(eng)


def test_a_port_two_rules_open_stays_held_until_neither_has_an_activation() -> None:
    clock = FakeClock()
    eng = Engine(RULES, clock=clock, tag=TAG)
    shared = MappingKey(Proto.UDP, 40002)
    first = eng.activate("a", HOSTS[0], ttl=10)
    clock.advance(1)
    second = eng.activate("c", HOSTS[1], ttl=20)
    assert eng.desired()[shared].internal_client == HOSTS[0]
    eng.deactivate(first.id)
    assert eng.desired()[shared].internal_client == HOSTS[1]  # the younger one takes over
    assert eng.desired()[shared].external_any is True
    eng.deactivate(second.id)
    assert shared not in eng.desired() and eng.holder(shared) is None
