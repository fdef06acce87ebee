"""Case 5, detection under load: 5,000 new non-matching flows per second for 10 s (--quick: 6 s)
from the LAN host, and trigger-to-open of a matching flow in the middle of it.

The flows are UDP datagrams from fresh sockets to the WAN host (a lab-only address) on ports no
rule triggers on: each is a NEW conntrack event the service's detector receives. Measured over
the load window (from outside, /proc schedstat):

* the CPU `igdtrigger serve` uses, against `conntrack -E -e NEW` (conntrack-tools, C) reading the
  same events in the same namespace: the floor for merely receiving them;
* between 20 % and 80 % of the window, matching triggers (conntrack path, as in case 1)
  alternate with the floor (a bare miniupnpc AddPortMapping); target: conntrack <= floor + 2 ms.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from .case_idle import cpu_seconds
from .case_trigger import FLOOR_PORT, OPEN_PORT, TRIGGER_PORT
from .common import Bench, ServiceUnderTest, row, rule_toml, stats

NAME = "load"
API_PORT = 8771
RATE = 5000.0
TARGET_MS = 2.0
TRIAL_GAP = 0.2  # s between trial pairs


def _ct_stats(lab: Any) -> dict[str, int]:
    p = lab.run(lab.lan, ["conntrack", "-S"])
    out: dict[str, int] = {}
    for line in p.stdout.splitlines():
        for tok in line.split():
            k, sep, v = tok.partition("=")
            if sep and v.isdigit():
                out[k] = out.get(k, 0) + int(v)
    return out


def run(b: Bench) -> dict[str, Any]:
    assert b.lab is not None
    lab = b.lab
    duration = 6.0 if b.quick else 10.0
    rules = rule_toml("bench", [f"udp/{TRIGGER_PORT}"], [f"udp/{OPEN_PORT}"])
    svc = ServiceUnderTest(b, "load", api_port=API_PORT, rules=rules)
    ct = lab.popen(lab.lan, ["conntrack", "-E", "-e", "NEW"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    blaster, driver, loader = b.agent("blaster"), b.agent("driver"), b.agent("loader")
    samples: dict[str, list[float]] = {"conntrack": [], "floor": []}
    at: dict[str, list[float]] = {"conntrack": [], "floor": []}
    missed = {"conntrack": 0, "floor": 0}

    def trial(mode: str) -> float | None:
        port = FLOOR_PORT if mode == "floor" else OPEN_PORT
        blaster.ask(op="go", host=lab.router_wan_ip, port=port)
        try:
            out = driver.ask(op="trial", mode=mode, port=port, api_port=API_PORT,
                             trigger_port=TRIGGER_PORT)
        finally:
            blaster.ask(op="stop")
        driver.ask(op="reset", mode=mode, port=port, api_port=API_PORT)
        return out["open"]  # type: ignore[no-any-return]

    try:
        for mode in ("conntrack", "floor"):  # warm-up, no load
            trial(mode)
        time.sleep(0.5)
        st0 = _ct_stats(lab)
        pids = {"service": svc.pid, "conntrack -E": ct.pid, "load generator": loader.proc.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        status0 = driver.ask(op="api", port=API_PORT, method="GET", path="/api/v1/status")
        t_start = float(loader.ask(op="load", dst=lab.wan_ip, rate=RATE, duration=duration,
                                   first_port=30000, last_port=39999, sockets=8)["t_start"])
        time.sleep(duration * 0.2)
        i = 0
        while time.monotonic() - t_start < duration * 0.8:
            mode = ("conntrack", "floor")[i % 2]
            t = time.monotonic() - t_start
            if i % 2 == 0:
                time.sleep(TRIAL_GAP)
            v = trial(mode)
            if v is None:
                missed[mode] += 1
            else:
                samples[mode].append(v)
                at[mode].append(t)
            i += 1
        load = loader.ask(op="wait")
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        window = float(load["t_end"]) - t_start
        st1 = _ct_stats(lab)
        status1 = driver.ask(op="api", port=API_PORT, method="GET", path="/api/v1/status")
    finally:
        svc.stop()
        ct.terminate()
        ct.wait(5)
    cpu = {k: 100.0 * (cpu1[k] - cpu0[k]) / window for k in pids}
    cpu["load generator"] = 100.0 * float(load["cpu_s"]) / window  # its thread has ended
    flows = int(load["sent"])
    kernel = {k: st1.get(k, 0) - st0.get(k, 0) for k in st1}
    seen = status1["data"]["counts"]["flows_seen"] - status0["data"]["counts"]["flows_seen"]
    ref = cpu["conntrack -E"]
    rows = [
        row(NAME, f"load: new non-matching flows/s for {duration:g} s",
            {"n": 1, "median": float(load["rate"])}, "flows/s", target=f"{RATE:g}/s",
            note=f"{flows} flows; kernel conntrack drops: {kernel.get('drop', 0)}, early "
                 f"{kernel.get('early_drop', 0)}, insert_failed "
                 f"{kernel.get('insert_failed', 0)}"),
        row(NAME, "service CPU during the load", {"n": 1, "median": cpu["service"]}, "% core",
            ref="conntrack -E", ref_median=ref, ratio=cpu["service"] / ref if ref else None,
            note=f"{1e6 * (cpu1['service'] - cpu0['service']) / max(1, flows):.1f} us/flow; "
                 f"engine saw {seen} (prefiltered in the detector)", key=True),
        row(NAME, "load generator CPU (for scale)", {"n": 1, "median": cpu["load generator"]},
            "% core"),
    ]
    sf, sc = stats(samples["floor"]), stats(samples["conntrack"])
    fm, cm = sf.get("median"), sc.get("median")
    rows.append(row(NAME, "floor under load: bare AddPortMapping -> WAN packet", sf, "ms"))
    rows.append(row(NAME, "conntrack under load: trigger packet -> WAN packet", sc, "ms",
                    ref="floor", ref_median=fm,
                    ratio=None if not fm or cm is None else cm / fm,
                    target=f"<= floor + {TARGET_MS:g} ms",
                    ok=None if fm is None or cm is None else cm - fm <= TARGET_MS and
                    not missed["conntrack"],
                    note=(f"floor + {cm - fm:.2f} ms; " if fm is not None and cm is not None
                          else "") + f"missed {missed['conntrack']}", key=True))
    return {"rows": rows, "detail": {"duration_s": duration, "window_s": window, "load": load,
                                     "cpu_percent": cpu, "kernel_stats_delta": kernel,
                                     "flows_seen_by_engine": seen, "samples_s": samples,
                                     "trial_at_s": at, "missed": missed}}
