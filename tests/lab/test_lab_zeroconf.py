"""Zeroconf across two LAN hosts (network namespaces on one bridge) with a real miniupnpd.

`igdtrigger serve` listens on the LAN in host A and advertises `_igdtrigger._tcp`; the CLI in
host B has no --server and no config, finds A by mDNS, and, without the admin token, may open a
rule's ports for B's own address but not read A's status (no public_read). The mappings are
checked on the router itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PORT = 8731


def client_env(tmp: Path) -> dict[str, str]:
    """Host B: no config file, no token, no server named anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IGDTRIGGER_")}
    home = tmp / "b-home"
    home.mkdir(exist_ok=True)
    return {**env, "PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(home),
            "IGDTRIGGER_STATE_DIR": str(home / "state"), "HOME": str(home)}


class Service:
    def __init__(self, lab: Lab, tmp: Path, listen: str) -> None:
        self.lab = lab
        self.state = tmp / "a-state"
        self.config = tmp / "a-config.toml"
        self.config.write_text(f"""
[gateway]
url = "{lab.igd_url}"

[api]
listen = "{listen}"

[detect]
methods = []

[service]
state_dir = "{self.state}"

[[rules]]
name = "game"
open = ["udp/40000-40001"]
""")
        ready = tmp / "a-ready"
        self.log = tmp / "a-serve.log"
        env = {**client_env(tmp), "IGDTRIGGER_STATE_DIR": str(self.state)}
        with self.log.open("wb") as logf:
            self.proc = lab.popen(
                lab.lan_hosts[0],
                [sys.executable, "-m", "igdtrigger", "serve", "--config", str(self.config),
                 "--ready-file", str(ready)],
                env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: ready.exists() or self.proc.poll() is not None, 20, "serve in host A")
        assert self.proc.poll() is None, self.log.read_text()

    @property
    def token(self) -> str:
        return (self.state / "api-token").read_text().strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def two_hosts(make_lab: Callable[..., Lab]) -> Lab:
    # secure_mode off: the service on host A maps ports to host B, as a home server would
    return make_lab(lan_hosts=2, secure_mode=False)


@pytest.fixture
def service(two_hosts: Lab, tmp_path: Path) -> Iterator[Service]:
    s = Service(two_hosts, tmp_path, f"0.0.0.0:{PORT}")
    yield s
    s.stop()


def cli_b(lab: Lab, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(lab.lan_hosts[1], [sys.executable, "-m", "igdtrigger", *args],
                   env=client_env(tmp), cwd=ROOT, timeout=60)


def ours(lab: Lab) -> list[tuple[str, int, str, int, str]]:
    return [m for m in lab.router_mappings() if m[4].startswith("igdtrigger ")]


def test_cli_on_another_host_finds_the_service_by_zeroconf(
        two_hosts: Lab, service: Service, tmp_path: Path) -> None:
    lab = two_hosts
    a_ip, b_ip = lab.lan_ips[0], lab.lan_ips[1]
    # what is advertised (TXT record), seen from host B
    code = ("import dataclasses, json; from igdtrigger.cli.discovery import browse; "
            "print(json.dumps([dataclasses.asdict(f) for f in browse(3.0)]))")
    p = lab.run(lab.lan_hosts[1], [sys.executable, "-c", code], env=client_env(tmp_path),
                cwd=ROOT, timeout=30)
    assert p.returncode == 0, p.stderr
    found = json.loads(p.stdout)
    assert len(found) == 1, found
    assert found[0]["address"] == a_ip and found[0]["port"] == PORT
    props = found[0]["properties"]
    assert props["path"] == "/api/v1" and props["token"] == "yes"
    assert props["version"] and props["instance"]

    # no token, no public_read: status is refused, and says why
    p = cli_b(lab, tmp_path, "status")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "public_read" in p.stderr

    # ... but B may open a rule's ports for itself
    t0 = time.monotonic()
    p = cli_b(lab, tmp_path, "activate", "game", "--for", "2m", "--json")
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    act = json.loads(p.stdout)
    assert act["host"] == b_ip and act["state"] == "open"
    assert sorted((m[0], m[1], m[2]) for m in ours(lab)) == [
        ("UDP", 40000, b_ip), ("UDP", 40001, b_ip)]
    assert elapsed < 10

    # with the token B may read everything; --server auto forces discovery
    p = cli_b(lab, tmp_path, "status", "--json", "--server", "auto", "--token", service.token)
    assert p.returncode == 0, p.stderr
    assert [a["host"] for a in json.loads(p.stdout)["activations"]] == [b_ip]

    p = cli_b(lab, tmp_path, "deactivate", "game")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for(lambda: not ours(lab), 10, "B's mappings to be removed")
    # advertising starts in the background (a stop never waits on mDNS probing): its log line
    # may come after B already found the service
    wait_for(lambda: "zeroconf: advertising" in service.log.read_text(), 10,
             "the service to log that it advertises")


def test_loopback_service_is_not_advertised(two_hosts: Lab, tmp_path: Path) -> None:
    lab = two_hosts
    s = Service(lab, tmp_path, f"127.0.0.1:{PORT}")
    try:
        t0 = time.monotonic()
        p = cli_b(lab, tmp_path, "status")
        elapsed = time.monotonic() - t0
        # nothing found by mDNS: falls back to localhost on B, where nothing listens
        assert p.returncode == 3, p.stdout + p.stderr
        assert "no igdtrigger service at http://127.0.0.1:8731" in p.stderr
        assert elapsed < 8
        assert "zeroconf: advertising" not in s.log.read_text()
    finally:
        s.stop()
