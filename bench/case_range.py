"""Case 2, opening a range: a rule with 200 ports (100 TCP + 100 UDP) opened and closed.

Through the service: POST /api/v1/activations and wait until every port is active (open), then
DELETE and wait until the service holds nothing (close). Variants, each its own `igdtrigger
serve` (detection off), interleaved round by round with the floor:

* floor: a bare miniupnpc loop on the LAN host doing the same calls (200 AddPortMapping, then
  200 DeletePortMapping); "floor, checked": the same with a GetSpecificPortMappingEntry before
  each add (what a careful client does, and what check_before_add does one port at a time);
* backend miniupnpc / our SOAP client, each with ``check_before_add`` on (the default) and off;
* NAT-PMP on the same router: a bare request/reply loop, the same 200 requests all in flight,
  and igdtrigger's NatPmpGateway one at a time and pipelined (``asyncio.gather``).

Ratios are throughputs relative to the floor (floor time / our time): 1.0 = as fast as the loop.
"""

from __future__ import annotations

from typing import Any

from .common import Bench, ServiceUnderTest, row, rule_toml, stats

NAME = "range"
FIRST = 42000
COUNT = 100  # per protocol
PORTS = [["TCP", FIRST, FIRST + COUNT - 1], ["UDP", FIRST, FIRST + COUNT - 1]]
N = 2 * COUNT

VARIANTS = {  # name: (api port, [gateway] lines)
    "miniupnpc, check on": (8741, 'backend = "miniupnpc"\ncheck_before_add = true'),
    "miniupnpc, check off": (8742, 'backend = "miniupnpc"\ncheck_before_add = false'),
    "soap, check on": (8743, 'backend = "soap"\ncheck_before_add = true'),
    "soap, check off": (8744, 'backend = "soap"\ncheck_before_add = false'),
}
QUICK = {"miniupnpc, check on", "miniupnpc, check off", "raw_seq", "gw_pipe"}  # --quick
PMP = {"raw_seq": "NAT-PMP: bare request/reply loop",
       "raw_all": "NAT-PMP: bare, all 200 requests in flight",
       "gw_seq": "NAT-PMP: NatPmpGateway, one at a time",
       "gw_pipe": "NAT-PMP: NatPmpGateway, pipelined (gather)"}


def run(b: Bench) -> dict[str, Any]:
    driver = b.agent("driver")
    rules = rule_toml("range", ["udp/27999"], [f"tcp/{FIRST}-{FIRST + COUNT - 1}",
                                              f"udp/{FIRST}-{FIRST + COUNT - 1}"])
    variants = [v for v in VARIANTS if not b.quick or v in QUICK]
    services = {name: ServiceUnderTest(b, f"range{VARIANTS[name][0]}", api_port=VARIANTS[name][0],
                                       rules=rules, gateway=VARIANTS[name][1], detect=False,
                                       wait=False)
                for name in variants}
    for svc in services.values():
        svc.wait_ready()
    pmp_error = ""
    try:
        pmp_error = _pmp_available(driver)
    except Exception as exc:
        pmp_error = str(exc)
    rounds = 2 if b.quick else max(5, b.trials // 3)
    warmup = 0 if b.quick else 1
    modes: list[str] = ["floor", *([] if b.quick else ["floor_checked"]), *variants]
    if not pmp_error:
        modes += [f"pmp:{k}" for k in PMP if not b.quick or k in QUICK]
    open_s: dict[str, list[float]] = {m: [] for m in modes}
    close_s: dict[str, list[float]] = {m: [] for m in modes}
    calls: dict[str, dict[str, float]] = {}
    try:
        for i in range(rounds + warmup):
            k = i % len(modes)
            for mode in modes[k:] + modes[:k]:
                if mode.startswith("floor"):
                    out = driver.ask(op="range_floor", ports=PORTS, checked=mode != "floor")
                elif mode.startswith("pmp:"):
                    out = driver.ask(op="pmp", mode=mode[4:], ports=PORTS)
                else:
                    out = driver.ask(op="range_api", api_port=VARIANTS[mode][0], rule="range",
                                     count=N)
                if i < warmup:
                    continue
                open_s[mode].append(out["open"])
                close_s[mode].append(out["close"])
        # router requests per open + close, from the services' own counters
        for name, svc in services.items():
            counts = driver.ask(op="api", port=svc.api_port, method="GET",
                                path="/api/v1/status")["data"]["counts"]
            calls[name] = {k[len("router_"):]: v / (rounds + warmup) for k, v in counts.items()
                           if k.startswith("router_")}
    finally:
        for svc in services.values():
            svc.stop()
    rows = []
    so = {m: stats(v) for m, v in open_s.items()}
    sc = {m: stats(v) for m, v in close_s.items()}
    sy = {m: stats([a + c for a, c in zip(open_s[m], close_s[m], strict=True)]) for m in modes}

    def tput(s: dict[str, float]) -> dict[str, float]:  # ports per second, from ms
        if not s.get("n"):
            return s
        return {"n": s["n"], "median": N / (s["median"] / 1e3), "p99": N / (s["max"] / 1e3)}

    floor_open, floor_close = so["floor"]["median"], sc["floor"]["median"]
    floor_cycle = sy["floor"]["median"]
    rows.append(row(NAME, "floor: bare miniupnpc loop, open 200", tput(so["floor"]), "ports/s",
                    note=f"{floor_open:.0f} ms", key=True))
    rows.append(row(NAME, "floor: bare miniupnpc loop, close 200", tput(sc["floor"]), "ports/s",
                    note=f"{floor_close:.0f} ms"))
    if "floor_checked" in modes:
        fc = so["floor_checked"]["median"]
        rows.append(row(NAME, "floor, checked: Get + Add per port, open 200",
                        tput(so["floor_checked"]), "ports/s", ref="floor",
                        ref_median=N / (floor_open / 1e3), ratio=floor_open / fc,
                        note=f"{fc:.0f} ms"))
    for mode in variants:
        o, c, y = so[mode]["median"], sc[mode]["median"], sy[mode]["median"]
        ratio = floor_cycle / y
        rows.append(row(NAME, f"service ({mode}): open 200", tput(so[mode]), "ports/s",
                        ref="floor", ref_median=N / (floor_open / 1e3), ratio=floor_open / o,
                        note=f"{o:.0f} ms"))
        rows.append(row(NAME, f"service ({mode}): close 200", tput(sc[mode]), "ports/s",
                        ref="floor", ref_median=N / (floor_close / 1e3), ratio=floor_close / c,
                        note=f"{c:.0f} ms"))
        n = calls.get(mode, {})
        rows.append(row(NAME, f"service ({mode}): open + close", tput(sy[mode]), "ports/s",
                        ref="floor", ref_median=N / (floor_cycle / 1e3), ratio=ratio,
                        target=">= 0.9x floor", ok=ratio >= 0.9,
                        note=f"{y:.0f} ms; per cycle {n.get('add', 0):.0f} adds, "
                             f"{n.get('delete', 0):.0f} deletes, {n.get('verify', 0):.0f} checks",
                        key=True))
    if pmp_error:
        rows.append(row(NAME, "NAT-PMP: not measured", None, "", note=pmp_error[:200]))
    else:
        base = sy["pmp:raw_seq"]["median"]
        for pk, label in PMP.items():
            if f"pmp:{pk}" not in modes:
                continue
            y = sy[f"pmp:{pk}"]["median"]
            rows.append(row(NAME, f"{label}, open + close", tput(sy[f"pmp:{pk}"]), "ports/s",
                            ref="bare loop", ref_median=N / (base / 1e3), ratio=base / y,
                            note=f"{y:.0f} ms", key=pk == "gw_pipe"))
    return {"rows": rows, "detail": {"rounds": rounds, "open_s": open_s, "close_s": close_s,
                                     "router_calls_per_cycle": calls, "pmp_error": pmp_error}}


def _pmp_available(driver: Any) -> str:
    """'' if NAT-PMP can be benchmarked (the backend imports and the router answers)."""
    try:
        driver.ask(op="pmp", mode="gw_seq", ports=[["UDP", FIRST, FIRST]])
    except Exception as exc:
        return f"NAT-PMP backend unavailable: {exc}"
    return ""
