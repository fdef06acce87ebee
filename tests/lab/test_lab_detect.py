"""Detection against the real router: the socket table, a running game process, two LAN hosts.

Each test proves what a user would notice: a packet from the WAN host to the router's external
address reaches the LAN host while the rule holds, and the mappings go when it lapses.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_service import ROOT, env, igdt_argv, ours

pytestmark = pytest.mark.lab

API_PORT = 8741
PORTS = [("udp", 40000), ("tcp", 40005)]


def config(lab: Lab, tmp: Path, detect: str, rule: str) -> Path:
    path = tmp / "config.toml"
    path.write_text(f"""
[gateway]
url = "{lab.igd_url}"
lease = "1h"

[api]
listen = "127.0.0.1:{API_PORT}"

[service]
state_dir = "{tmp / 'state'}"

[detect]
{detect}

[[rules]]
name = "game"
open = ["udp/40000", "tcp/40005"]
{rule}
""")
    return path


class Serve:
    """`igdtrigger serve` in one of the lab's namespaces."""

    def __init__(self, lab: Lab, ns: str, cfg: Path, *, wrap: Sequence[str] = ()) -> None:
        """``wrap``: argv the service is started under (it execs the rest)."""
        self.lab, self.ns = lab, ns
        self.ready = cfg.parent / "ready"
        self.log = cfg.parent / "serve.log"
        self.ready.unlink(missing_ok=True)  # a restart: wait for this run's readiness
        with self.log.open("ab") as logf:
            argv = igdt_argv("serve", "--config", str(cfg), "--ready-file", str(self.ready))
            self.proc = lab.popen(ns, [*wrap, *argv], env=env(), cwd=ROOT,
                                  stdout=logf, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, 20, "serve")
        assert self.proc.poll() is None, self.log.read_text()

    def status(self) -> dict[str, Any]:
        p = self.lab.run(self.ns, igdt_argv("status", "--json", "--server",
                                            f"http://127.0.0.1:{API_PORT}"), env=env(), cwd=ROOT)
        assert p.returncode == 0, p.stdout + p.stderr
        data: dict[str, Any] = json.loads(p.stdout)
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def connected_game(lab: Lab, port: int = 27015) -> subprocess.Popen[bytes]:
    """A game's connected UDP socket to the WAN host (what the socket table can see), held
    for 30 s; kill it when done."""
    return lab.popen(lab.lan, [sys.executable, "-c",
                               "import socket, time\n"
                               "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                               f"s.connect(({lab.wan_ip!r}, {port}))\n"
                               "s.send(b'hello')\n"
                               "time.sleep(30)\n"])


def reachable(lab: Lab, host: int = 0) -> bool:
    return all(lab.probe(p, port, timeout=0.5, host=host)  # type: ignore[arg-type]
               for p, port in PORTS)


def clients(lab: Lab) -> set[str]:
    return {m[2] for m in ours(lab)}


def test_socket_table_detection_opens_ports(make_lab: Callable[..., Lab], tmp_path: Path,
                                            started: list[Serve]) -> None:
    """No conntrack in the LAN host at all: the game's connected UDP socket is the trigger."""
    lab = make_lab(lan_conntrack=False)
    cfg = config(lab, tmp_path, 'methods = ["sockets"]\nsocket_interval = "200ms"',
                 'trigger = ["udp/27015"]\nidle_timeout = "2s"')
    s = Serve(lab, lab.lan, cfg)
    started.append(s)
    assert [(d["name"], d["active"]) for d in s.status()["detectors"]] == [("sockets", True)]
    game = connected_game(lab)
    try:
        wait_for(lambda: len(ours(lab)) == 2, 5, "mappings after the socket appeared")
        assert clients(lab) == {lab.lan_ip}
        assert reachable(lab)
    finally:
        game.kill()
        game.wait()
    wait_for(lambda: not ours(lab), 10, "mappings removed after the idle timeout")
    assert not lab.probe("udp", 40000, timeout=0.3)


def test_a_running_game_process_holds_its_rule(lab: Lab, tmp_path: Path,
                                               started: list[Serve]) -> None:
    """A process named like the game (a copy of sleep) holds the ports; its death closes them
    after the idle timeout, not before."""
    exe = tmp_path / "eldenring.exe"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    cfg = config(lab, tmp_path, 'methods = ["process"]\nprocess_interval = "200ms"',
                 'process = ["EldenRing.exe"]\nidle_timeout = "3s"')
    s = Serve(lab, lab.lan, cfg)
    started.append(s)
    assert not ours(lab)
    game = lab.popen(lab.lan, [str(exe), "60"])
    try:
        wait_for(lambda: len(ours(lab)) == 2, 5, "mappings while the game runs")
        assert reachable(lab)
        time.sleep(4)  # longer than idle_timeout: a running game keeps its ports
        assert len(ours(lab)) == 2
        [act] = s.status()["activations"]
        assert act["source"] == "process"
    finally:
        game.kill()
        game.wait()
    gone = time.monotonic()
    wait_for(lambda: not ours(lab), 10, "mappings removed after the game exited")
    assert time.monotonic() - gone >= 2.5, "closed before the idle timeout"
    assert not lab.probe("udp", 40000, timeout=0.3)


def send_from(lab: Lab, host: int, port: int = 27015) -> None:
    lab.python(lab.lan_hosts[host],
               "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
               f"s.sendto(b'x', ({lab.wan_ip!r}, {port}))\n")


@pytest.mark.parametrize("share", ["first", "latest"])
def test_two_lan_hosts_on_one_rule(make_lab: Callable[..., Lab], tmp_path: Path,
                                   started: list[Serve], share: str) -> None:
    """igdtrigger on the router sees both hosts' flows. first: A keeps the ports and B is told
    it waits for A, then B gets them when A lapses; latest: B takes them at once."""
    lab = make_lab(lan_hosts=2, secure_mode=False)
    a, b = lab.lan_ips
    cfg = config(lab, tmp_path, 'methods = ["conntrack"]',
                 f'trigger = ["udp/27015"]\nidle_timeout = "3s"\nshare = "{share}"')
    s = Serve(lab, lab.router, cfg)
    started.append(s)
    send_from(lab, 0)
    wait_for(lambda: clients(lab) == {a} and len(ours(lab)) == 2, 5, "ports for host A")
    assert reachable(lab, host=0)
    send_from(lab, 1)
    if share == "latest":
        wait_for(lambda: clients(lab) == {b} and len(ours(lab)) == 2, 5, "ports moved to B")
        assert reachable(lab, host=1)
        return
    time.sleep(0.5)
    assert clients(lab) == {a}  # A keeps them
    acts = {x["host"]: x for x in s.status()["activations"]}
    assert acts[b]["state"] == "waiting" and acts[b]["held_by"] == [a]
    # B keeps playing, A stops: after A's idle timeout the ports are B's
    deadline = time.monotonic() + 12
    while clients(lab) != {b}:
        assert time.monotonic() < deadline, f"ports never moved to B: {ours(lab)}"
        send_from(lab, 1)
        time.sleep(0.5)
    assert reachable(lab, host=1)
