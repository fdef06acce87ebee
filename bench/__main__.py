"""igdtrigger benchmarks against a real router (Debian's miniupnpd in network namespaces).

    sudo .venv/bin/python -m bench [--quick] [--trials N] [--json PATH]

Case "trigger to open port": time from the trigger leaving the LAN host to the first WAN packet
delivered through the new mapping, for the conntrack path (an outbound UDP packet to a trigger
port) and the API path (POST /api/v1/activations), measured interleaved in the same run with the
floor: one bare miniupnpc AddPortMapping from the same LAN host, timed the same way (call start
to first delivered packet) and also as the call alone. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab.netlab import Lab, lab_available  # noqa: E402

OPEN_PORT = 40000
FLOOR_PORT = 41000


class Agent:
    def __init__(self, lab: Lab, ns: str, role: str) -> None:
        self.proc = lab.popen(ns, [sys.executable, "-m", "bench.agents", role], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent died answering {cmd}")
        out: dict[str, Any] = json.loads(line)
        if not out.get("ok"):
            raise RuntimeError(f"agent failed {cmd}: {out.get('error')}")
        return out

    def quit(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    def q(p: float) -> float:
        return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3, "p90_ms": q(0.9) * 1e3,
            "p99_ms": q(0.99) * 1e3, "min_ms": xs[0] * 1e3, "max_ms": xs[-1] * 1e3}


def start_service(lab: Lab, tmp: Path) -> subprocess.Popen[bytes]:
    cfg = tmp / "config.toml"
    cfg.write_text(f"""
[gateway]
url = "{lab.igd_url}"
[api]
listen = "127.0.0.1:8731"
[service]
state_dir = "{tmp / 'state'}"
[[rules]]
name = "bench"
trigger = ["udp/27015"]
open = ["udp/{OPEN_PORT}"]
idle_timeout = "10m"
""")
    ready = tmp / "ready"
    log = (tmp / "serve.log").open("wb")
    proc = lab.popen(lab.lan, [sys.executable, "-m", "igdtrigger", "serve", "--config", str(cfg),
                               "--ready-file", str(ready), "--log-level", "warning"],
                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                     stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("igdtrigger serve did not start: "
                               + (tmp / "serve.log").read_text(errors="replace"))
        time.sleep(0.05)
    time.sleep(0.3)  # let it reach the router once
    return proc


def run(trials: int) -> dict[str, Any]:
    results: dict[str, list[float]] = {"floor_open": [], "floor_call": [], "conntrack_open": [],
                                       "api_open": [], "api_call": []}
    missed: dict[str, int] = {"floor": 0, "conntrack": 0, "api": 0}
    with Lab() as lab, tempfile.TemporaryDirectory() as td:
        service = start_service(lab, Path(td))
        blaster = Agent(lab, lab.wan, "blaster")
        driver = Agent(lab, lab.lan, "driver")
        try:
            driver.ask(op="init", wan_ip=lab.wan_ip, igd_url=lab.igd_url, lan_ip=lab.lan_ip)
            modes = ["floor", "conntrack", "api"]
            for i in range(trials + 2):  # two warm-up rounds, not counted
                order = modes[i % 3:] + modes[:i % 3]  # interleave, rotating who goes first
                for mode in order:
                    port = FLOOR_PORT if mode == "floor" else OPEN_PORT
                    blaster.ask(op="go", host=lab.router_wan_ip, port=port)
                    out = driver.ask(op="trial", mode=mode, port=port)
                    blaster.ask(op="stop")
                    driver.ask(op="reset", mode=mode, port=port)
                    if i < 2:
                        continue
                    if out["open"] is None:
                        missed[mode] += 1
                        continue
                    results[f"{mode}_open"].append(out["open"])
                    if mode in ("floor", "api"):
                        results[f"{mode}_call"].append(out["call"])
        finally:
            blaster.quit()
            driver.quit()
            service.terminate()
            service.wait(10)
    summary = {k: stats(v) for k, v in results.items()}
    floor = summary["floor_open"].get("median_ms", float("nan"))
    derived = {
        "conntrack_minus_floor_ms": summary["conntrack_open"].get("median_ms", float("nan"))
        - floor,
        "api_minus_floor_ms": summary["api_open"].get("median_ms", float("nan")) - floor,
        "conntrack_over_floor": summary["conntrack_open"].get("median_ms", float("nan")) / floor,
        "api_over_floor": summary["api_open"].get("median_ms", float("nan")) / floor,
    }
    return {"case": "trigger_to_open", "trials": trials, "missed": missed, "summary": summary,
            "derived": derived}


def table(res: dict[str, Any]) -> str:
    rows = [
        ("bare miniupnpc AddPortMapping, call only", "floor_call"),
        ("bare miniupnpc AddPortMapping -> WAN packet delivered (floor)", "floor_open"),
        ("conntrack: trigger packet -> WAN packet delivered", "conntrack_open"),
        ("API: POST /activations, call only (waits for the router)", "api_call"),
        ("API: POST /activations -> WAN packet delivered", "api_open"),
    ]
    out = [f"{'case':66} {'n':>4} {'median':>9} {'p90':>9} {'p99':>9}"]
    for label, key in rows:
        s = res["summary"].get(key) or {}
        if not s:
            continue
        out.append(f"{label:66} {s['n']:>4} {s['median_ms']:>8.2f}ms {s['p90_ms']:>8.2f}ms "
                   f"{s['p99_ms']:>8.2f}ms")
    d = res["derived"]
    out.append(f"conntrack path = floor + {d['conntrack_minus_floor_ms']:.2f} ms "
               f"({d['conntrack_over_floor']:.2f}x); API path = floor + "
               f"{d['api_minus_floor_ms']:.2f} ms ({d['api_over_floor']:.2f}x)")
    if any(res["missed"].values()):
        out.append(f"missed (no packet within 5 s): {res['missed']}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 trials per case (well under 1 min)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = ap.parse_args()
    reason = lab_available()
    if reason:
        print(f"bench needs the lab: {reason}", file=sys.stderr)
        return 2
    trials = 10 if args.quick else args.trials
    t0 = time.monotonic()
    res = run(trials)
    res["machine"] = {"python": platform.python_version(), "kernel": platform.release(),
                      "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    res["seconds"] = round(time.monotonic() - t0, 1)
    print(table(res))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"JSON: {path}  ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
