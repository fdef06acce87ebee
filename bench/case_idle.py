"""Case 4, idle footprint: RSS and CPU of `igdtrigger serve` with 100 rules, the API and
conntrack detection over a window with no traffic (60 s; --quick: 10 s).

Measured side by side over the same window (psutil, from outside):

* idle: 100 rules, nothing active;
* holding: the same with 10 rules active (20 mappings): the periodic router check (every 2 s)
  and verification run;
* zeroconf: the API listening on the LAN (0.0.0.0) so it advertises itself with zeroconf;
* reference: a bare Python interpreter sleeping (what any Python service costs at least).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import psutil

from .common import ENV, ROOT, Bench, ServiceUnderTest, row, rule_toml

NAME = "idle"
RULES = 100
ACTIVE = 10
RSS_TARGET_MB = 60.0
CPU_TARGET = 0.5  # percent of one core


def _rules() -> str:
    return "".join(rule_toml(f"r{i:03d}", [f"udp/{20000 + i}"],
                             [f"tcp/{50000 + i}", f"udp/{50000 + i}"]) for i in range(RULES))


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in ns resolution (/proc/.../schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return total / 1e9


def run(b: Bench) -> dict[str, Any]:
    assert b.lab is not None
    lab = b.lab
    window = 10.0 if b.quick else 60.0
    driver = b.agent("driver")
    svcs = {
        "idle": ServiceUnderTest(b, "idle", api_port=8761, rules=_rules(), wait=False),
        "holding": ServiceUnderTest(b, "holding", api_port=8762, rules=_rules(), wait=False),
    }
    zc_error = ""
    try:
        # listening beyond loopback, as a LAN-serving install does: advertised with zeroconf
        svcs["zeroconf"] = ServiceUnderTest(b, "zeroconf", api_port=8763, rules=_rules(),
                                            api='zeroconf = "on"\n', listen_host="0.0.0.0",
                                            wait=False)
        svcs["zeroconf"].wait_ready()
    except Exception as exc:
        zc_error = str(exc)[:300]
        svcs.pop("zeroconf", None)
    svcs["idle"].wait_ready()
    svcs["holding"].wait_ready()
    bare = lab.popen(lab.lan, [sys.executable, "-c", f"import time; time.sleep({window + 30})"],
                     cwd=ROOT, env=ENV)
    procs: dict[str, psutil.Process] = {k: psutil.Process(s.pid) for k, s in svcs.items()}
    procs["python"] = psutil.Process(bare.pid)
    try:
        for i in range(ACTIVE):
            driver.ask(op="range_api_open", api_port=8762, rule=f"r{i:03d}", count=2)
        time.sleep(0.5)  # let start-up work (sweeps, first checks) finish
        cpu0 = {k: cpu_seconds(p.pid) for k, p in procs.items()}
        t0 = time.monotonic()
        peak = {k: 0 for k in procs}
        while time.monotonic() - t0 < window:
            for k, p in procs.items():
                peak[k] = max(peak[k], p.memory_info().rss)
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        cpu1 = {k: cpu_seconds(p.pid) for k, p in procs.items()}
        uss = {k: p.memory_full_info().uss for k, p in procs.items()}
        threads = {k: p.num_threads() for k, p in procs.items()}
    finally:
        for s in svcs.values():
            s.stop()
        bare.kill()
        bare.wait()
    cpu = {k: 100.0 * (cpu1[k] - cpu0[k]) / elapsed for k in procs}
    mb = {k: v / 2**20 for k, v in peak.items()}
    rows = []
    labels = {"idle": f"serve, {RULES} rules, API + conntrack, idle",
              "holding": f"serve, {RULES} rules, {ACTIVE} active ({2 * ACTIVE} mappings)",
              "zeroconf": f"serve, {RULES} rules, API on LAN + zeroconf, idle"}
    for k, label in labels.items():
        if k not in procs:
            continue
        rows.append(row(NAME, f"{label}: peak RSS", {"n": 1, "median": mb[k]}, "MB",
                        ref="bare python", ref_median=mb["python"], ratio=mb[k] / mb["python"],
                        target=f"<= {RSS_TARGET_MB:g} MB", ok=mb[k] <= RSS_TARGET_MB,
                        note=f"USS {uss[k] / 2**20:.1f} MB, {threads[k]} threads",
                        key=k != "holding"))
        rows.append(row(NAME, f"{label}: CPU over {window:g} s", {"n": 1, "median": cpu[k]},
                        "% core", ref="bare python", ref_median=cpu["python"],
                        ratio=cpu[k] / cpu["python"] if cpu["python"] > 0 else None,
                        target=f"<= {CPU_TARGET:g} %", ok=cpu[k] <= CPU_TARGET,
                        key=k != "zeroconf"))
    if zc_error:
        rows.append(row(NAME, "zeroconf variant: not measured", None, "", note=zc_error))
    return {"rows": rows, "detail": {"window_s": elapsed, "cpu_percent": cpu, "peak_rss_mb": mb,
                                     "uss_mb": {k: v / 2**20 for k, v in uss.items()},
                                     "threads": threads, "zeroconf_error": zc_error}}

