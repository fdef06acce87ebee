"""Load run (issue 6): the service against the lab router for N minutes under

* 1,000 API activations per minute from 50 concurrent clients (random rule among 50, ttl
  5-30 s, about a third ended early by DELETE), and
* 200 concurrent wrapped processes: ``igdtrigger run --rule rN -- sleep 5..20``, each replaced
  when it ends, so about 200 run at any time (each one a real ``igdtrigger run``: a Python
  start-up, an activation, heartbeats, a deactivation).

Then everything is let go and the router's table must hold no igdtrigger mapping. Measured:
errors (non-2xx API answers, wrappers that failed or warned), wrapped games that started
before the service answered (it took over 2 s: they run at once and their ports open when it
answers; counted apart, and whether they ever opened), the service's own answer time (its
/metrics histogram) next to what clients saw, the machine's load average, leaked
mappings, the service's RSS every 5 s (start, end, max: flat or not), its CPU, API latency.

    sudo .venv/bin/python -m bench.load              # 5 minutes
    sudo .venv/bin/python -m bench.load --minutes 1  # shorter

Not a test: it prints a table and writes bench/results/load.json. Needs the lab (root,
miniupnpd, network namespaces); no traffic leaves the namespaces it creates.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_PORT = 8781
RULES = 50
PORT0 = 45000


# --- the driver: runs inside the LAN host's namespace ------------------------------------------

class Api:
    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> tuple[int, Any, float]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    return 0, None, time.perf_counter() - t0
                continue
            took = time.perf_counter() - t0
            try:
                return r.status, json.loads(raw) if raw else None, took
            except ValueError:
                return r.status, None, took
        return 0, None, 0.0


def client(n: int, args: argparse.Namespace, stop_at: float, out: dict[str, Any],
           lock: threading.Lock) -> None:
    api = Api(args.api_port, args.token)
    rng = random.Random(n)
    period = 60.0 * args.clients / args.per_minute  # one activation per period per client
    next_at = time.monotonic() + rng.random() * period
    pending: list[tuple[float, str]] = []  # (when, id) to DELETE early
    while True:
        now = time.monotonic()
        for when, act_id in [p for p in pending if p[0] <= now]:
            pending.remove((when, act_id))
            status, _, took = api.call("DELETE", f"/api/v1/activations/{act_id}")
            with lock:
                out["latency"].append(took)
                if status not in (200, 404):  # 404: it had lapsed already
                    out["errors"].append(f"DELETE {status}")
        if now >= stop_at:
            break
        if now >= next_at:
            next_at += period
            rule = f"r{rng.randrange(RULES)}"
            status, data, took = api.call("POST", "/api/v1/activations",
                                          {"rule": rule, "ttl": rng.randint(5, 30)})
            with lock:
                out["latency"].append(took)
                out["activations"] += 1
                if status != 201:
                    out["errors"].append(f"POST {status} {data}")
                elif data.get("state") not in ("open", "waiting", "partial"):
                    out["not_open"] += 1
            if status == 201 and rng.random() < 0.33:
                pending.append((now + rng.uniform(1, 5), data["id"]))
        time.sleep(max(0.0, min(next_at, *(p[0] for p in pending), stop_at)
                       - time.monotonic()) if pending else max(0.0, min(next_at, stop_at)
                                                                 - time.monotonic()))


def wrappers(args: argparse.Namespace, stop_at: float, out: dict[str, Any],
             lock: threading.Lock) -> None:
    rng = random.Random(999)
    server = f"http://127.0.0.1:{args.api_port}"
    running: list[tuple[subprocess.Popen[bytes], float]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start() -> None:
        argv = [sys.executable, "-m", "igdtrigger", "run", "--rule", f"r{rng.randrange(RULES)}",
                "--server", server, "--token", args.token, "--", "sleep",
                f"{rng.uniform(5, 20):.1f}"]
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running.append((p, time.monotonic()))

    ramp = time.monotonic()
    while True:
        now = time.monotonic()
        for p, t0 in list(running):
            if p.poll() is None:
                continue
            running.remove((p, t0))
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            if p.stderr:
                p.stderr.close()
            said = [line for line in err.splitlines() if line.startswith("igdtrigger:")]
            late = any("did not answer within" in line for line in said)
            other = [line for line in said if "did not answer within" not in line
                     and "the service answered" not in line]
            with lock:
                out["wrapped"] += 1
                if late:  # the game started at once, its ports opened when the service answered
                    out["late"] += 1
                    if not any("the service answered" in line for line in said):
                        out["late_never_opened"] += 1
                if p.returncode != 0 or other:
                    out["errors"].append(f"run rc={p.returncode} {err.strip()[:300]}")
        if now < stop_at:
            # ramp up over 10 s, then keep the count
            target = args.wrapped if now - ramp > 10 else int(args.wrapped * (now - ramp) / 10)
            while len(running) < target:
                start()
        elif not running:
            return
        with lock:
            out["concurrent"].append(len(running))
        time.sleep(0.1)


def driver(args: argparse.Namespace) -> None:
    stop_at = time.monotonic() + args.minutes * 60
    out: dict[str, Any] = {"latency": [], "errors": [], "activations": 0, "not_open": 0,
                           "wrapped": 0, "late": 0, "late_never_opened": 0, "concurrent": []}
    lock = threading.Lock()
    threads = [threading.Thread(target=client, args=(i, args, stop_at, out, lock), daemon=True)
               for i in range(args.clients)]
    threads.append(threading.Thread(target=wrappers, args=(args, stop_at, out, lock),
                                    daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(args.out).write_text(json.dumps(out))


# --- the orchestrator: root namespace ----------------------------------------------------------

def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def service_latency(lab: Any, token: str) -> dict[str, float | None]:
    """The service's own answer time for POST /api/v1/activations, from its /metrics histogram
    (p50/p99 as the upper bound of the bucket they fall in)."""
    p = lab.run(lab.lan, ["curl", "-s", "-H", f"Authorization: Bearer {token}",
                          f"http://127.0.0.1:{API_PORT}/metrics"])
    name = "igdtrigger_api_request_seconds"
    route = 'route="POST /api/v1/activations"'
    buckets: list[tuple[float, float]] = []
    total = count = router = 0.0
    for line in p.stdout.splitlines():
        if line.startswith("igdtrigger_router_request_seconds_sum"):
            router += float(line.rsplit(" ", 1)[1])
        if route not in line:
            continue
        metric, value = line.rsplit(" ", 1)
        if metric.startswith(f"{name}_bucket"):
            le = metric.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(value)))
        elif metric.startswith(f"{name}_sum"):
            total = float(value)
        elif metric.startswith(f"{name}_count"):
            count = float(value)

    def quantile(q: float) -> float | None:
        for bound, n in sorted(buckets):
            if count and n >= q * count:
                return 1e3 * bound
        return None

    return {"count": count, "mean": 1e3 * total / count if count else None,
            "p50": quantile(0.5), "p99": quantile(0.99), "router_seconds": router}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--per-minute", type=int, default=1000)
    ap.add_argument("--wrapped", type=int, default=200)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "load.json"))
    ap.add_argument("--service-nice", type=int, default=0,
                    help="run the service at this nice value (the example unit's Nice=-5)")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--api-port", type=int, default=API_PORT, help=argparse.SUPPRESS)
    ap.add_argument("--token", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(args)
        return 0

    from bench.case_idle import cpu_seconds
    from bench.common import API_LIMITS, ENV, precompile
    from tests.lab.netlab import Lab, lab_available

    reason = lab_available()
    if reason is not None:
        print(f"the load run needs the lab: {reason}", file=sys.stderr)
        return 2
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="igdt-load-"))
    precompile(work)
    rules = "".join(f'[[rules]]\nname = "r{i}"\nopen = ["udp/{PORT0 + 2 * i}", '
                    f'"tcp/{PORT0 + 2 * i + 1}"]\nidle_timeout = "30s"\n' for i in range(RULES))
    with Lab() as lab:
        cfg = work / "config.toml"
        state = work / "state"
        cfg.write_text(f'[gateway]\nurl = "{lab.igd_url}"\nlease = "10m"\n'
                       f'[api]\nlisten = "127.0.0.1:{API_PORT}"\n{API_LIMITS}'
                       f'[detect]\nmethods = []\n[service]\nstate_dir = "{state}"\n{rules}')
        ready = work / "ready"
        log = (work / "serve.log").open("wb")
        nice = ["nice", "-n", str(args.service_nice)] if args.service_nice else []
        svc = lab.popen(lab.lan, [*nice, sys.executable, "-m", "igdtrigger", "serve", "--config",
                                  str(cfg), "--ready-file", str(ready), "--log-level",
                                  "warning"], cwd=ROOT, env=ENV, stdout=log,
                        stderr=subprocess.STDOUT)
        while not ready.exists():
            if svc.poll() is not None:
                print((work / "serve.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.05)
        token = (state / "api-token").read_text().strip()
        rss: list[tuple[float, float]] = []
        t0 = time.monotonic()
        cpu0 = cpu_seconds(svc.pid)
        drv = lab.popen(lab.lan, [sys.executable, "-m", "bench.load", "--driver", "--minutes",
                                  str(args.minutes), "--clients", str(args.clients),
                                  "--per-minute", str(args.per_minute), "--wrapped",
                                  str(args.wrapped), "--api-port", str(API_PORT), "--token",
                                  token, "--out", str(work / "driver.json")], cwd=ROOT, env=ENV)
        loadavg: list[float] = []
        while drv.poll() is None:
            rss.append((time.monotonic() - t0, rss_mb(svc.pid)))
            loadavg.append(os.getloadavg()[0])
            time.sleep(5)
        window = time.monotonic() - t0
        cpu = cpu_seconds(svc.pid) - cpu0
        served = service_latency(lab, token)
        res = json.loads((work / "driver.json").read_text())
        # everything lets go: activations lapse (ttl <= 30 s) or were ended
        deadline = time.monotonic() + 90
        left = -1
        while time.monotonic() < deadline:
            p = lab.run(lab.lan, [sys.executable, "-m", "igdtrigger", "status", "--json",
                                  "--server", f"http://127.0.0.1:{API_PORT}", "--token", token],
                        env=ENV, cwd=ROOT)
            st = json.loads(p.stdout)
            left = len(st["activations"]) + len(st["mappings"])
            if left == 0:
                break
            time.sleep(1)
        leaked = [m for m in lab.router_mappings() if m[4].startswith("igdtrigger ")]
        svc.terminate()
        rc = svc.wait(30)
        log.close()
        after_stop = [m for m in lab.router_mappings() if m[4].startswith("igdtrigger ")]

    lat = sorted(res["latency"])
    mem = [m for _, m in rss]
    warm = [m for t, m in rss if t >= 30] or mem
    summary = {
        "minutes": args.minutes, "service_nice": args.service_nice,
        "api_activations": res["activations"],
        "api_per_minute": res["activations"] / args.minutes,
        "wrapped_processes_run": res["wrapped"],
        "wrapped_concurrent_median": statistics.median(res["concurrent"] or [0]),
        "errors": len(res["errors"]), "error_samples": res["errors"][:10],
        "not_open_at_answer": res["not_open"],
        "leaked_mappings_after_lapse": len(leaked), "left_in_service_after_lapse": left,
        "leaked_after_stop": len(after_stop), "service_exit_code": rc,
        "rss_mb_start": warm[0], "rss_mb_end": warm[-1], "rss_mb_max": max(mem),
        "rss_samples": rss, "service_cpu_percent": 100 * cpu / window,
        "wrapped_late": res["late"], "wrapped_late_never_opened": res["late_never_opened"],
        "machine_load_avg_1min_median": statistics.median(loadavg or [0.0]),
        "cpus": os.cpu_count(),
        "service_side_activation_ms": served,
        "router_busy_percent": 100 * (served.get("router_seconds") or 0.0) / window,
        "api_latency_ms_p50": 1e3 * lat[len(lat) // 2] if lat else None,
        "api_latency_ms_p99": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat
        else None,
    }
    rows = [
        ("API activations (per minute)", f"{summary['api_activations']} "
         f"({summary['api_per_minute']:.0f}/min)"),
        ("wrapped processes run (median concurrent)",
         f"{summary['wrapped_processes_run']} ({summary['wrapped_concurrent_median']:.0f})"),
        ("  of which started before the service answered (>2 s; ports opened later)",
         f"{summary['wrapped_late']} ({summary['wrapped_late_never_opened']} never opened)"),
        ("errors", str(summary["errors"])),
        ("leaked mappings after everything lapsed", str(summary["leaked_mappings_after_lapse"])),
        ("service RSS MB: after warm-up / end / max",
         f"{summary['rss_mb_start']:.1f} / {summary['rss_mb_end']:.1f} / "
         f"{summary['rss_mb_max']:.1f}"),
        ("service CPU (% of one core)", f"{summary['service_cpu_percent']:.1f}"),
        ("API latency p50 / p99 (ms)", f"{summary['api_latency_ms_p50']:.1f} / "
         f"{summary['api_latency_ms_p99']:.1f}"),
        ("  service side, POST activation: mean / p50 / p99 (ms, from /metrics)",
         " / ".join("-" if served.get(k) is None else f"{served[k]:.1f}"
                    for k in ("mean", "p50", "p99"))),
        ("router busy answering the service (% of the run)",
         f"{100 * (served.get('router_seconds') or 0.0) / window:.0f}"),
        ("machine load average (median, on N cores)",
         f"{summary['machine_load_avg_1min_median']:.1f} on {summary['cpus']}"),
        ("service exit code after SIGTERM", str(rc)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"JSON: {args.json}")
    ok = (summary["errors"] == 0 and not leaked and not after_stop and rc == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
