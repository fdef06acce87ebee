"""IPv6 pinholes: the 200-port rule (100 TCP + 100 UDP) opened and closed with pinholes too.

The lab's router has its IPv6 side on (miniupnpd's WANIPv6FirewallControl). Interleaved, round
by round:

* floor, IPv4: the bare miniupnpc loop (200 AddPortMapping, then 200 DeletePortMapping);
* floor, IPv6: the bare pinhole loop on the LAN host (200 AddPinhole, then 200 DeletePinhole,
  one prebuilt SOAP request per TCP connection from the host's IPv6 address);
* floor, both: the two bare loops in the order the service works (200 mappings, 200
  pinholes; then the mappings deleted, then the pinholes), so the router's tables are as full
  for the floor as for the service (miniupnpd's nft work grows with its chain);
* the service with ``ipv6_pinholes = false`` (IPv4 only) and with pinholes (the default): POST
  the activation, wait until it is open (IPv4 and IPv6), DELETE it, wait until nothing is held.

The service with pinholes does the "both" floor's work, so that is its reference; the IPv4-only
service shows what the pinholes add.
"""

from __future__ import annotations

from typing import Any

from .common import Bench, ServiceUnderTest, row, rule_toml, stats

NAME = "ipv6"
FIRST = 43000
COUNT = 100  # per protocol
PORTS = [["TCP", FIRST, FIRST + COUNT - 1], ["UDP", FIRST, FIRST + COUNT - 1]]
N = 2 * COUNT
SERVICES = {"ipv4": (8761, "ipv6_pinholes = false"), "ipv46": (8762, "ipv6_pinholes = true")}


def run(b: Bench) -> dict[str, Any]:
    assert b.lab is not None
    lab = b.lab
    driver = b.agent("driver")
    rules = rule_toml("range", ["udp/27999"], [f"tcp/{FIRST}-{FIRST + COUNT - 1}",
                                              f"udp/{FIRST}-{FIRST + COUNT - 1}"])
    services = {k: ServiceUnderTest(b, f"ipv6-{k}", api_port=port, rules=rules,
                                    gateway=f'backend = "miniupnpc"\n{gw}', detect=False,
                                    wait=False)
                for k, (port, gw) in SERVICES.items()}
    for svc in services.values():
        svc.wait_ready()
    pin = {"router": lab.ipv6_addrs["router"], "source": lab.ipv6_addrs[lab.lan],
           "path": "/ctl/IP6FCtl", "http_port": lab.http_port, "ports": PORTS}
    rounds = 2 if b.quick else max(5, b.trials // 3)
    warmup = 0 if b.quick else 1
    modes = ["floor4", "floor6", "floor46", "ipv4", "ipv46"]
    open_s: dict[str, list[float]] = {m: [] for m in modes}
    close_s: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for i in range(rounds + warmup):
            k = i % len(modes)
            for mode in modes[k:] + modes[:k]:
                if mode == "floor4":
                    out = driver.ask(op="range_floor", ports=PORTS)
                elif mode in ("floor6", "floor46"):
                    out = driver.ask(op="pinhole_floor", ipv4=mode == "floor46", **pin)
                else:
                    out = driver.ask(op="range_api", api_port=SERVICES[mode][0], rule="range",
                                     count=N, pinholes=mode == "ipv46")
                if i < warmup:
                    continue
                open_s[mode].append(out["open"])
                close_s[mode].append(out["close"])
    finally:
        for svc in services.values():
            svc.stop()
    cycle = {m: [a + c for a, c in zip(open_s[m], close_s[m], strict=True)] for m in modes}
    s = {m: stats(v) for m, v in cycle.items()}
    s_both = s["floor46"]
    s_open6 = stats(open_s["floor6"])

    def tput(st: dict[str, float], n: int = N) -> dict[str, float]:
        if not st.get("n"):
            return st
        return {"n": st["n"], "median": n / (st["median"] / 1e3), "p99": n / (st["max"] / 1e3)}

    f6, fb = s["floor6"]["median"], s_both["median"]
    rows = [
        row(NAME, "floor: bare AddPinhole loop, open 200", tput(s_open6), "pinholes/s",
            note=f"{s_open6['median']:.0f} ms"),
        row(NAME, "floor: bare pinhole loop, open + close 200", tput(s["floor6"]),
            "pinholes/s", note=f"{f6:.0f} ms", key=True),
        row(NAME, "floor: both bare loops, open + close 200 + 200", tput(s["floor46"]),
            "ports/s", note=f"{fb:.0f} ms; the pinholes' share "
                            f"{fb - s['floor4']['median']:.0f} ms"),
        row(NAME, "service, IPv4 only: open + close 200", tput(s["ipv4"]), "ports/s",
            ref="bare miniupnpc loop", ref_median=N / (s["floor4"]["median"] / 1e3),
            ratio=s["floor4"]["median"] / s["ipv4"]["median"],
            note=f"{s['ipv4']['median']:.0f} ms"),
    ]
    y = s["ipv46"]["median"]
    ratio = fb / y
    rows.append(row(NAME, "service, IPv4 + IPv6: open + close 200 + 200", tput(s["ipv46"]),
                    "ports/s", ref="both bare loops", ref_median=N / (fb / 1e3), ratio=ratio,
                    target=">= 0.9x floor", ok=ratio >= 0.9,
                    note=f"{y:.0f} ms; pinholes add {y - s['ipv4']['median']:.0f} ms "
                         f"(bare: {f6:.0f} ms alone, {fb - s['floor4']['median']:.0f} ms "
                         "next to 200 mappings)", key=True))
    return {"rows": rows, "detail": {"rounds": rounds, "open_s": open_s, "close_s": close_s}}
