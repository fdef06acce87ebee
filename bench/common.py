"""Shared pieces of the benchmark cases: agents, services under test, statistics, result rows.

The orchestrator (``python -m bench``) runs in the root namespace and never times anything that
crosses namespaces itself: agents (``bench/agents.py``) run inside the lab's namespaces and stamp
CLOCK_MONOTONIC, which all namespaces share.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.lab.netlab import Lab  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPATH"] = str(ROOT)


def precompile(workdir: Path) -> None:
    """Byte-compile igdtrigger into a cache of the run's own (PYTHONPYCACHEPREFIX), so that every
    process the bench starts loads it as an installed package does, not compiling the sources
    each time (a checkout run with PYTHONDONTWRITEBYTECODE=1 would), and the tree stays clean."""
    ENV["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "igdtrigger")],
                   env=ENV, check=True, stdout=subprocess.DEVNULL)
# API limits high enough for a benchmark's polling (the defaults protect a real service)
API_LIMITS = "rate_limit = 10000\nrate_burst = 100000\n"


class AgentError(RuntimeError):
    pass


class Agent:
    """A ``python -m bench.agents ROLE`` process in a namespace, driven by JSON lines."""

    def __init__(self, lab: Lab, ns: str, role: str) -> None:
        self.role = role
        self.proc = lab.popen(ns, [sys.executable, "-m", "bench.agents", role], cwd=ROOT,
                              env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AgentError(f"{self.role} agent died answering {cmd}")
        out: dict[str, Any] = json.loads(line)
        if not out.get("ok"):
            raise AgentError(f"{self.role} agent failed {cmd.get('op')}: {out.get('error')}")
        return out

    def quit(self) -> None:
        if self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Bench:
    """What every case gets: the lab (None for pure cases), a work dir, the mode."""

    lab: Lab | None
    workdir: Path
    quick: bool
    trials: int
    _agents: dict[str, Agent] = field(default_factory=dict)

    def agent(self, role: str) -> Agent:
        """The shared agent for a role: driver/loader on the LAN host, blaster on the WAN host."""
        if role not in self._agents:
            assert self.lab is not None
            ns = self.lab.wan if role == "blaster" else self.lab.lan
            a = Agent(self.lab, ns, role)
            if role in ("driver", "loader"):
                a.ask(op="init", wan_ip=self.lab.wan_ip, igd_url=self.lab.igd_url,
                      lan_ip=self.lab.lan_ip, router_ip=self.lab.router_lan_ip,
                      root=str(ROOT), python=sys.executable)
            self._agents[role] = a
        return self._agents[role]

    def close(self) -> None:
        for a in self._agents.values():
            a.quit()
        self._agents.clear()


class ServiceUnderTest:
    """``igdtrigger serve`` on the LAN host with a config written for one case."""

    def __init__(self, b: Bench, name: str, *, api_port: int, rules: str, gateway: str = "",
                 api: str = "", detect: bool = True, log_level: str = "warning",
                 listen_host: str = "127.0.0.1", wait: bool = True) -> None:
        assert b.lab is not None
        self.lab = b.lab
        self.name = name
        self.api_port = api_port
        self.dir = b.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)  # parents: the case's work dir too
        self.config = self.dir / "config.toml"
        methods = '["conntrack"]' if detect else "[]"
        state = self.dir / "state"
        self.config.write_text(
            f'[gateway]\nurl = "{self.lab.igd_url}"\n{gateway}\n'
            f'[api]\nlisten = "{listen_host}:{api_port}"\n{API_LIMITS}{api}\n'
            f'[detect]\nmethods = {methods}\n'
            f'[service]\nstate_dir = "{state}"\n{rules}\n')
        self.log = self.dir / "serve.log"
        self.ready = ready = self.dir / "ready"
        ready.unlink(missing_ok=True)
        with self.log.open("wb") as log:
            self.proc = self.lab.popen(
                self.lab.lan, [sys.executable, "-m", "igdtrigger", "serve", "--config",
                               str(self.config), "--ready-file", str(ready),
                               "--log-level", log_level],
                cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid  # `ip netns exec` execs: this is the Python process
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"igdtrigger serve ({self.name}) did not start: "
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def rule_toml(name: str, trigger: list[str], open_: list[str], idle: str = "10m") -> str:
    return (f'[[rules]]\nname = "{name}"\ntrigger = {json.dumps(trigger)}\n'
            f'open = {json.dumps(open_)}\nidle_timeout = "{idle}"\n')


def stats(xs: list[float], scale: float = 1e3) -> dict[str, float]:
    """n, median, p90, p99, min, max (scaled: seconds to ms by default)."""
    xs = sorted(xs)
    if not xs:
        return {"n": 0}

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)]

    return {"n": len(xs), "median": statistics.median(xs) * scale, "p90": q(0.9) * scale,
            "p99": q(0.99) * scale, "min": xs[0] * scale, "max": xs[-1] * scale}


def row(case: str, what: str, s: dict[str, float] | None, unit: str, *, ref: str = "",
        ref_median: float | None = None, ratio: float | None = None, target: str = "",
        ok: bool | None = None, note: str = "", key: bool = False) -> dict[str, Any]:
    """One line of the table. ``ratio`` is as the case defines it (its docstring says which
    way). ``key``: also in the short table (``--markdown``, the README's)."""
    s = s or {}
    return {"case": case, "what": what, "n": s.get("n"), "median": s.get("median"),
            "p99": s.get("p99"), "unit": unit, "ref": ref, "ref_median": ref_median,
            "ratio": ratio, "target": target, "ok": ok, "note": note, "key": key}


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit in ("ms",):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'case':<9} {'measurement':<58} {'n':>4} {'median':>9} {'p99':>9} {'unit':<8} "
            f"{'vs reference':<32} {'ratio':>7}  {'target':<20} ok  note")
    out = [head, "-" * len(head)]
    for r in rows:
        ok = {True: "yes", False: "NO", None: ""}[r["ok"]]
        ref = r["ref"] + (f" {fmt(r['ref_median'], r['unit'])}" if r["ref_median"] is not None
                          else "")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        out.append(f"{r['case']:<9} {r['what'][:58]:<58} {r['n'] if r['n'] is not None else '':>4} "
                   f"{fmt(r['median'], r['unit']):>9} {fmt(r['p99'], r['unit']):>9} "
                   f"{r['unit']:<8} {ref[:32]:<32} {ratio:>7}  {r['target'][:20]:<20} {ok:<3} "
            f"{r['note']}".rstrip())
    return "\n".join(out)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The short table: the key rows, as Markdown."""
    out = ["| case | measurement | n | median | p99 | vs reference | ratio | target | met |",
           "|---|---|--:|--:|--:|---|--:|---|---|"]
    for r in rows:
        if not r.get("key"):
            continue
        ok = {True: "yes", False: "**no**", None: ""}[r["ok"]]
        ref = r["ref"] + (f" {fmt(r['ref_median'], r['unit'])}" if r["ref_median"] is not None
                          else "")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        out.append(f"| {r['case']} | {r['what']} | {r['n'] if r['n'] is not None else ''} | "
                   f"{fmt(r['median'], r['unit'])} {r['unit']} | {fmt(r['p99'], r['unit'])} | "
                   f"{ref} | {ratio} | {r['target']} | {ok} |")
    return "\n".join(out)
