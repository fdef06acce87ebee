"""Case 6, engine (pure, no lab): flow events matched per second with 1,000 rules and 10,000
live activations, and what ``Engine.desired()`` costs at that size.

1,000 rules (each: one trigger port, one TCP + one UDP port to open); 10,000 traffic
activations (10 LAN hosts per rule, so hosts compete for ports). Measured:

* matching flows (each refreshes one of the 10,000 activations) per second, against the floor:
  two bare ``dict`` lookups (rule by port, activation by rule and host) and a store of the new
  expiry: the least a matcher with timers can do in Python;
* non-matching flows per second (the common case for a busy LAN), against one bare lookup;
* ``Engine.desired()`` with 10,000 activations: the engine keeps the desired set up to date
  as activations change (core/desired.py), so asking is one dict copy;
* one change (an activation added or removed) at that size, with and without the copy the
  service then asks for: target 0.5 ms (issue 17), it was a whole recomputation (7 ms).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from igdtrigger.core.engine import Engine
from igdtrigger.core.model import Flow, PortRange, Proto
from igdtrigger.core.rules import Rule

from .common import Bench, row, stats

NAME = "engine"
RULES = 1000
HOSTS = 10
TRIGGER0 = 20000
OPEN0 = 30000


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def build() -> tuple[Engine, FakeClock, list[Flow], list[Flow]]:
    rules = [Rule(f"r{i}", (PortRange(Proto.UDP, TRIGGER0 + i, TRIGGER0 + i),),
                  (PortRange(Proto.TCP, OPEN0 + i, OPEN0 + i),
                   PortRange(Proto.UDP, OPEN0 + i, OPEN0 + i)), 600.0)
             for i in range(RULES)]
    clock = FakeClock()
    eng = Engine(rules, clock=clock, tag="bench")
    # the service bounds live activations (4,096); this case measures a table past that
    eng.max_activations = eng.max_detected = RULES * HOSTS + 1  # (+1: the change below)
    hosts = [ipaddress.ip_address(f"192.168.1.{10 + h}") for h in range(HOSTS)]
    dst = ipaddress.ip_address("11.22.33.2")  # the lab's WAN host: a public-looking address
    matching = [Flow(Proto.UDP, hosts[h], dst, 40000 + h, TRIGGER0 + i)
                for i in range(RULES) for h in range(HOSTS)]
    other = [Flow(Proto.UDP if i % 2 else Proto.TCP, hosts[i % HOSTS], dst, 40000,
                  443 + (i % 1000)) for i in range(10_000)]
    for f in matching:  # 10,000 live activations
        eng.on_flow(f)
        clock.t += 0.0001
    assert len(eng.activations) == RULES * HOSTS
    return eng, clock, matching, other


def _rate(fn: Any, items: list[Flow], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in items:
            fn(f)
        out.append(len(items) / (time.perf_counter() - t0))
    return out


def run(b: Bench) -> dict[str, Any]:
    reps = 5 if b.quick else 15
    eng, _clock, matching, other = build()
    floor_index = {(Proto.UDP, TRIGGER0 + i): i for i in range(RULES)}
    floor_acts = {(i, f.src): [0.0] for i in range(RULES) for f in matching[:HOSTS]}

    def floor(f: Flow) -> object:
        return floor_index.get((f.proto, f.dport))

    def floor_refresh(f: Flow) -> None:
        rule = floor_index.get((f.proto, f.dport))
        if rule is not None:
            floor_acts[(rule, f.src)][0] = 1000.0 + 600.0

    on_flow = eng.on_flow
    match_rates: list[float] = []
    floor_rates: list[float] = []
    other_rates: list[float] = []
    floor_other: list[float] = []
    for _ in range(reps):  # interleaved
        match_rates += _rate(on_flow, matching, 1)
        floor_rates += _rate(floor_refresh, matching, 1)
        other_rates += _rate(on_flow, other, 1)
        floor_other += _rate(floor, other, 1)
    assert len(eng.activations) == RULES * HOSTS  # refreshes, not new activations
    t0 = time.perf_counter()
    eng.desired()  # the first call builds what each activation wants (the service: as they come)
    first = time.perf_counter() - t0
    desired_t: list[float] = []
    size = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        d = eng.desired()
        desired_t.append(time.perf_counter() - t0)
        size = len(d)
    # a change (one new activation, then its removal), alone and followed by desired() as the
    # service does it
    change_t: list[float] = []
    alone_t: list[float] = []
    for i in range(reps * 20):
        t0 = time.perf_counter()
        act = eng.activate(f"r{i % RULES}", "192.168.1.99", ttl=60)
        eng.deactivate(act.id)
        alone_t.append((time.perf_counter() - t0) / 2)
        t0 = time.perf_counter()
        act = eng.activate(f"r{i % RULES}", "192.168.1.99", ttl=60)
        eng.desired()
        eng.deactivate(act.id)
        eng.desired()
        change_t.append((time.perf_counter() - t0) / 2)

    # a wide rule (4,000 ports) with 100 live activations: a change that moves no port (a
    # younger activation added and removed) costs the same as any, whatever the width
    wide = Engine([Rule("wide", (PortRange(Proto.UDP, 1, 1),),
                        (PortRange(Proto.UDP, 20000, 23999),), 600.0)], clock=_clock, tag="b")
    for h in range(100):
        wide.activate("wide", f"192.168.2.{h + 1}", ttl=600)
    wide_t: list[float] = []
    for _ in range(reps * 20):
        t0 = time.perf_counter()
        act = wide.activate("wide", "192.168.2.200", ttl=60)
        wide.deactivate(act.id)
        wide_t.append((time.perf_counter() - t0) / 2)

    def per_s(xs: list[float]) -> dict[str, float]:
        s = stats(xs, scale=1.0)
        return {"n": s["n"], "median": s["median"], "p99": s["min"]}  # p99 of rate: slowest

    mr, fr = per_s(match_rates), per_s(floor_rates)
    orr, fo = per_s(other_rates), per_s(floor_other)
    ds = stats(desired_t)
    cs = stats(change_t)
    ca = stats(alone_t)
    cw = stats(wide_t)
    rows = [
        row(NAME, "floor: bare lookups + expiry store per matching flow", fr, "flows/s"),
        row(NAME, f"on_flow, matching (refresh; {RULES} rules, {RULES * HOSTS} activations)",
            mr, "flows/s", ref="floor", ref_median=fr["median"],
            ratio=mr["median"] / fr["median"], key=True),
        row(NAME, "on_flow, non-matching", orr, "flows/s", ref="one dict lookup",
            ref_median=fo["median"], ratio=orr["median"] / fo["median"]),
        row(NAME, f"Engine.desired() with {RULES * HOSTS} activations ({size} mappings)", ds,
            "ms", note=f"kept up to date: a copy; first call {first * 1e3:.2f} ms", key=True),
        row(NAME, f"one change (activate or deactivate) at {RULES * HOSTS} activations", ca,
            "ms", note=f"target <= 0.5 ms: {'yes' if ca['median'] <= 0.5 else 'NO'}", key=True),
        row(NAME, "one change, 4,000-port rule, 100 activations", cw,
            "ms", note=f"target <= 0.5 ms: {'yes' if cw['median'] <= 0.5 else 'NO'}"),
        row(NAME, "one change (activate or deactivate) + desired()", cs, "ms",
            ref="desired()", ref_median=ds["median"], ratio=cs["median"] / ds["median"],
            note=f"target <= 0.5 ms: {'yes' if cs['median'] <= 0.5 else 'NO'}"),
    ]
    return {"rows": rows, "detail": {"reps": reps, "match_rates": match_rates,
                                     "floor_rates": floor_rates, "other_rates": other_rates,
                                     "floor_other_rates": floor_other, "desired_s": desired_t,
                                     "change_s": change_t, "change_alone_s": alone_t,
                                     "change_wide_s": wide_t,
                                     "desired_size": size,
                                     "desired_first_s": first}}
