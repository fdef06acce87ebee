"""igdtrigger against a real router (miniupnpd in a namespace): what users care about.

Each test runs `igdtrigger serve` (or `run`) inside the LAN host's namespace and checks with real
packets that a WAN host reaches the LAN host through the router's external address while the
trigger holds, and no longer after it lapses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
API = "http://127.0.0.1:8731"
RULE_PORTS = [("udp", 40000), ("udp", 40001), ("udp", 40002), ("tcp", 40005)]


def config_text(lab: Lab, state: Path, *, idle: str = "3s", verify: str = "60s",
                protocol: str = "auto", check: str = "2s", url: str | None = None) -> str:
    gateway_url = f'url = "{url or lab.igd_url}"' if url != "" else ""
    return f"""
[gateway]
{gateway_url}
lease = "1h"
verify_interval = "{verify}"
check_interval = "{check}"
protocol = "{protocol}"

[api]
listen = "127.0.0.1:8731"

[service]
state_dir = "{state}"

[[rules]]
name = "game"
trigger = ["udp/27015", "tcp/27015-27030"]
open = ["udp/40000-40002", "tcp/40005"]
idle_timeout = "{idle}"
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_TOKEN": ""}


def igdt_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "igdtrigger", *args]


def ours(lab: Lab) -> list[tuple[str, int, str, int, str]]:
    return [m for m in lab.router_mappings() if m[4].startswith("igdtrigger ")]


class Serve:
    """`igdtrigger serve` running inside the LAN host's namespace."""

    def __init__(self, lab: Lab, tmp: Path, **cfg: Any) -> None:
        self.lab = lab
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        self.config.write_text(config_text(lab, self.state, **cfg))
        self.ready = tmp / "ready"
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        self.ready.unlink(missing_ok=True)
        logf = self.log.open("ab")
        self.proc = self.lab.popen(
            self.lab.lan,
            igdt_argv("serve", "--config", str(self.config), "--ready-file", str(self.ready)),
            env=env(), stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        logf.close()
        wait_for(lambda: self.ready.exists() or self.proc is None or self.proc.poll() is not None,
                 20, "igdtrigger serve to start")
        assert self.proc.poll() is None, self.log.read_text()
        wait_for(lambda: self.status()["gateway"]["up"], 10, "service to reach the router")
        return self

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = self.lab.run(self.lab.lan, igdt_argv(*args, "--server", API), env=env(), cwd=ROOT,
                         timeout=60)
        if check:
            assert p.returncode == 0, p.stdout + p.stderr
        return p

    def status(self) -> dict[str, Any]:
        p = self.cli("status", "--json", check=False)
        if p.returncode != 0:
            return {"gateway": {"up": False}}
        data: dict[str, Any] = json.loads(p.stdout)
        return data

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def factory(**cfg: Any) -> Serve:
        s = Serve(lab, tmp_path, **cfg).start()
        started.append(s)
        return s

    yield factory
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def send_trigger(lab: Lab, port: int = 27015, proto: str = "udp") -> None:
    """One outbound packet from the LAN host to the WAN host's trigger port."""
    dst = f"({lab.wan_ip!r}, {port})"
    if proto == "udp":
        send = f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', {dst})"
    else:
        send = f"s = socket.socket()\ns.settimeout(1)\ns.connect_ex({dst})"
    code = "import socket\n" + send + "\n"
    lab.python(lab.lan, code)


def reachable(lab: Lab, timeout: float = 0.5) -> dict[str, bool]:
    """Which of the rule's ports a WAN packet reaches the LAN host through."""
    return {f"{proto}/{port}": lab.probe(proto, port, timeout=timeout)  # type: ignore[arg-type]
            for proto, port in RULE_PORTS}


def all_open(lab: Lab) -> bool:
    got = reachable(lab)
    assert all(got.values()), f"not reachable from the WAN: {got}; router has {ours(lab)}"
    return True


def none_open(lab: Lab) -> bool:
    got = reachable(lab, 0.3)
    assert not any(got.values()), f"still reachable from the WAN: {got}; router has {ours(lab)}"
    return True


def test_outbound_trigger_opens_ports_and_idle_timeout_closes_them(
        lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve(idle="3s")
    assert none_open(lab), "ports reachable before any trigger: the probe cannot tell"
    send_trigger(lab)
    wait_for(lambda: lab.probe("udp", 40000, timeout=0.3), 5, "udp/40000 to open after trigger")
    wait_for(lambda: len(ours(lab)) == 4, 2, "all four mappings")  # added one after another
    assert all_open(lab)
    entries = {(m[0], m[1]): m for m in ours(lab)}
    assert set(entries) == {("UDP", 40000), ("UDP", 40001), ("UDP", 40002), ("TCP", 40005)}
    assert {m[2] for m in entries.values()} == {lab.lan_ip}
    assert all(" game " in m[4] for m in entries.values())
    st = s.status()
    assert st["activations"][0]["source"] == "traffic"
    assert st["activations"][0]["host"] == lab.lan_ip
    # after the idle timeout (3s since the last trigger flow) the router holds nothing of ours
    wait_for(lambda: not ours(lab), 10, "mappings removed after the idle timeout")
    assert none_open(lab)
    assert s.proc is not None and s.proc.poll() is None


def test_each_trigger_flow_refreshes_the_idle_timer(lab: Lab, serve: Callable[..., Serve]) -> None:
    serve(idle="3s")
    send_trigger(lab)
    wait_for(lambda: bool(ours(lab)), 5, "mappings after trigger")
    for _ in range(3):  # 4.5s of activity, longer than the idle timeout
        time.sleep(1.5)
        send_trigger(lab, port=27020, proto="tcp")
    assert len(ours(lab)) == 4
    wait_for(lambda: not ours(lab), 10, "mappings removed once the flows stop")


def test_non_trigger_traffic_opens_nothing(lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve()
    send_trigger(lab, port=27014)
    send_trigger(lab, port=27015, proto="tcp")  # tcp/27015 IS a trigger: positive control below
    wait_for(lambda: bool(ours(lab)), 5, "tcp/27015 trigger")
    st = s.status()
    assert st["counts"]["activations"] == 1


def test_run_holds_ports_while_child_runs_and_passes_exit_code(
        lab: Lab, serve: Callable[..., Serve], tmp_path: Path) -> None:
    s = serve()
    marker = tmp_path / "child-started"
    p = lab.popen(lab.lan, igdt_argv("run", "--config", str(s.config), "--rule", "game", "--",
                                     "sh", "-c", f"touch {marker}; sleep 2; exit 3"),
                  env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker.exists, 30, "wrapped child to start")
    assert all_open(lab)
    assert p.wait(20) == 3
    wait_for(lambda: not ours(lab), 5, "mappings removed after the child exited")
    assert none_open(lab)


def test_run_zero_exit_code(lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve()
    p = lab.run(lab.lan, igdt_argv("run", "--config", str(s.config), "--rule", "game", "--",
                                   "true"), env=env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert not ours(lab)


def test_run_without_a_service_maps_ports_itself(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, tmp_path / "state"))
    marker = tmp_path / "child-started"
    p = lab.popen(lab.lan, igdt_argv("run", "--config", str(cfg), "--rule", "game", "--",
                                     "sh", "-c", f"touch {marker}; sleep 2; exit 7"),
                  env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker.exists, 30, "wrapped child to start")
    wait_for(lambda: len(ours(lab)) == 4, 5, "standalone mappings")
    assert all_open(lab)
    assert p.wait(20) == 7
    assert not ours(lab)
    assert none_open(lab)


def test_api_activation_with_ttl(lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    out = s.cli("activate", "game", "--for", "3s", "--json")
    act = json.loads(out.stdout)
    assert act["state"] == "open"
    assert act["host"] == lab.lan_ip
    assert all_open(lab)
    wait_for(lambda: not ours(lab), 8, "mappings removed when the ttl ran out")
    assert none_open(lab)


def test_deactivate_closes_at_once(lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    assert lab.probe("udp", 40001)
    s.cli("deactivate", "game")
    assert not ours(lab)
    assert none_open(lab)


def test_sigterm_removes_every_mapping(lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    assert len(ours(lab)) == 4
    t0 = time.monotonic()
    assert s.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5
    assert ours(lab) == []
    assert none_open(lab)
    assert "removed 4 mapping" in s.logtext()


def test_foreign_mapping_is_left_alone_and_reported(make_lab: Callable[..., Lab],
                                                    tmp_path: Path) -> None:
    lab = make_lab(secure_mode=False)
    lab.add_foreign_mapping("udp", 40001, "192.168.77.99", desc="console")
    s = Serve(lab, tmp_path, idle="10m").start()
    try:
        p = s.cli("activate", "game", "--for", "1h", "--json", check=False)
        act = json.loads(p.stdout)
        states = {x["port"]: x["state"] for x in act["ports"]}
        assert states["udp/40001"] == "conflict"
        assert states["udp/40000"] == "active"
        conflict = next(x for x in act["ports"] if x["port"] == "udp/40001")
        assert "192.168.77.99" in conflict["error"]
        assert s.stop() == 0
        table = {(m[0], m[1]): m for m in lab.router_mappings()}
        assert table[("UDP", 40001)][2] == "192.168.77.99"
        assert table[("UDP", 40001)][4] == "console"
        assert ("UDP", 40000) not in table
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()


def test_secure_mode_refusal_for_another_host_is_explained(lab: Lab,
                                                           serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    token = (s.state / "api-token").read_text().strip()
    p = lab.run(lab.lan, igdt_argv("activate", "game", "--host", "192.168.77.50", "--json",
                                   "--server", API, "--token", token), env=env(), cwd=ROOT)
    act = json.loads(p.stdout)
    assert act["state"] == "failed"
    errors = " ".join(x.get("error", "") for x in act["ports"])
    assert "run igdtrigger on the host that needs the ports" in errors
    assert not ours(lab)


def test_kill_9_then_restart_restores_live_activation(lab: Lab,
                                                     serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    assert len(ours(lab)) == 4
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    s.start()
    st = s.status()
    assert st["journal"]["restored_activations"] == 1
    assert [a["rule"] for a in st["activations"]] == ["game"]
    assert len(ours(lab)) == 4
    assert all_open(lab)
    assert s.stop() == 0
    assert not ours(lab)


def test_kill_9_then_restart_removes_what_lapsed_meanwhile(lab: Lab,
                                                           serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    s.cli("activate", "game", "--for", "2s")
    assert len(ours(lab)) == 4
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(2.5)  # the activation's time runs out while the service is dead
    assert len(ours(lab)) == 4  # a crash leaves them (their lease is an hour)
    s.start()
    wait_for(lambda: not ours(lab), 10, "stale mappings removed by the restarted service")
    assert none_open(lab)
    assert s.status()["activations"] == []


def test_router_restart_mappings_come_back(lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")  # defaults: the router's NOTIFY or the 2 s check notices the restart
    s.cli("activate", "game", "--for", "1h")
    assert len(ours(lab)) == 4
    # a new miniupnpd process, its rules flushed (the service may have re-applied them already
    # by the time this returns: the NOTIFY reaches it within milliseconds)
    lab.restart_router(flush=True)
    took = wait_for(lambda: len(ours(lab)) == 4, 10, "mappings re-applied after router restart")
    assert all_open(lab)
    assert took < 5, f"took {took:.1f}s"
    assert "re-applying" in s.logtext() or "gateway up" in s.logtext()


def test_router_reboot_announced_over_ssdp_is_acted_on_at_once(lab: Lab,
                                                              serve: Callable[..., Serve]) -> None:
    # the periodic checks are an hour apart: only the router's own NOTIFYs can tell the service
    s = serve(idle="10m", check="1h", verify="1h")
    s.cli("activate", "game", "--for", "1h")
    assert len(ours(lab)) == 4
    wait_for(lambda: s.status()["gateway"]["announcements"]["listening"], 5,
             "service to listen to the router's SSDP announcements")
    lab.restart_router(flush=True)
    took = wait_for(lambda: len(ours(lab)) == 4, 5, "mappings re-applied after the reboot NOTIFY")
    assert all_open(lab)
    assert s.status()["gateway"]["announcements"]["restarts_seen"] >= 1
    log = s.logtext()
    assert "BOOTID.UPNP.ORG" in log or "byebye and is back" in log, log[-2000:]
    assert took < 2, f"took {took:.1f}s"


def test_router_rebooted_onto_a_new_port_is_followed(make_lab: Callable[..., Lab],
                                                     tmp_path: Path) -> None:
    lab = make_lab()
    s = Serve(lab, tmp_path, idle="10m", url="", check="1h", verify="1h").start()  # SSDP
    try:
        s.cli("activate", "game", "--for", "1h")
        assert len(ours(lab)) == 4
        wait_for(lambda: s.status()["gateway"]["announcements"]["listening"], 5,
                 "service to listen to the router's SSDP announcements")
        lab.move_router(5002)
        wait_for(lambda: len(ours(lab)) == 4, 5, "mappings re-applied at the router's new URL")
        assert all_open(lab)
        assert s.status()["gateway"]["location"] == lab.igd_url
        assert "now announces its IGD" in s.logtext()
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.stop()


def test_router_restart_without_announcements_is_caught_by_the_check(
        lab: Lab, serve: Callable[..., Serve]) -> None:
    s = serve(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    # the router's NOTIFYs cannot reach the LAN host: only the 2 s check can notice
    lab.run(lab.lan, ["nft", "add table inet igdt_drop_ssdp"], check=True)
    lab.run(lab.lan, ["nft", "add chain inet igdt_drop_ssdp in "
                             "{ type filter hook input priority -10; }"], check=True)
    lab.run(lab.lan, ["nft", "add rule inet igdt_drop_ssdp in udp dport 1900 drop"], check=True)
    lab.restart_router(flush=True)
    took = wait_for(lambda: len(ours(lab)) == 4, 10, "mappings re-applied after router restart")
    assert all_open(lab)
    assert s.status()["gateway"]["announcements"]["restarts_seen"] == 0
    assert took < 5, f"took {took:.1f}s"


def test_on_the_router_forwarded_flows_trigger_for_the_lan_host(make_lab: Callable[..., Lab],
                                                                 tmp_path: Path) -> None:
    """igdtrigger on a Linux box that routes for the LAN sees the LAN hosts' forwarded flows."""
    lab = make_lab(secure_mode=False)  # the router maps ports for a LAN host, not for itself
    with served_on_router(lab, tmp_path):
        send_trigger(lab)
        wait_for(lambda: len(ours(lab)) == 4, 5, "mappings for the LAN host")
        assert {m[2] for m in ours(lab)} == {lab.lan_ip}
        assert all_open(lab)
        wait_for(lambda: not ours(lab), 10, "mappings removed after the idle timeout")
    assert not ours(lab)


@contextlib.contextmanager
def served_on_router(lab: Lab, tmp_path: Path) -> Iterator[None]:
    """`igdtrigger serve` on the Linux router itself (it sees the LAN hosts' forwarded flows)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, tmp_path / "state", idle="3s"))
    ready = tmp_path / "ready"
    log = (tmp_path / "serve.log").open("wb")
    proc = lab.popen(lab.router, igdt_argv("serve", "--config", str(cfg), "--ready-file",
                                           str(ready)), env=env(), cwd=ROOT, stdout=log,
                     stderr=subprocess.STDOUT)
    try:
        wait_for(ready.exists, 20, "serve on the router")
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def send_trigger6(lab: Lab, dst: str, port: int = 27015) -> None:
    lab.python(lab.lan, "import socket\n"
                        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                        f"s.sendto(b'x', ({dst!r}, {port}))\n")


def test_ipv6_trigger_opens_the_same_hosts_ipv4_ports(lab: Lab,
                                                      serve: Callable[..., Serve]) -> None:
    """A dual-stack game reaching its server over IPv6: the IPv4 mappings go to this host."""
    v6 = lab.enable_ipv6()
    serve(idle="3s")
    send_trigger6(lab, v6["wan"])
    wait_for(lambda: len(ours(lab)) == 4, 5, "mappings after an IPv6 trigger")
    assert {m[2] for m in ours(lab)} == {lab.lan_ip}
    assert all_open(lab)


def test_on_the_router_ipv6_flows_trigger_for_the_lan_hosts_ipv4(make_lab: Callable[..., Lab],
                                                                 tmp_path: Path) -> None:
    """On the router, the LAN host behind an IPv6 flow is found by its MAC address."""
    lab = make_lab(secure_mode=False)
    v6 = lab.enable_ipv6()
    with served_on_router(lab, tmp_path):
        send_trigger6(lab, v6["wan"])
        wait_for(lambda: len(ours(lab)) == 4, 5, "mappings for the LAN host's IPv4 address")
        assert {m[2] for m in ours(lab)} == {lab.lan_ip}
        assert all_open(lab)
    assert not ours(lab)


def pmp_held(lab: Lab) -> set[tuple[str, int]]:
    """What the router's DNAT chain forwards to the LAN host (NAT-PMP/PCP cannot be listed)."""
    return {(p, e) for p, e, client, _ in lab.nft_mappings() if client == lab.lan_ip}


@pytest.mark.parametrize("protocol", ["auto", "pcp", "natpmp"])
def test_router_without_upnp_works_over_pcp_and_natpmp(make_lab: Callable[..., Lab],
                                                       tmp_path: Path, protocol: str) -> None:
    lab = make_lab(enable_upnp=False)
    s = Serve(lab, tmp_path, idle="3s", protocol=protocol).start()
    try:
        st = s.status()
        assert st["gateway"]["protocol"] == ("pcp" if protocol == "auto" else
                                             {"pcp": "pcp", "natpmp": "nat-pmp"}[protocol])
        send_trigger(lab)
        wait_for(lambda: len(pmp_held(lab)) == 4, 5, "mappings over PCP/NAT-PMP")
        assert all_open(lab)
        wait_for(lambda: not pmp_held(lab), 10, "mappings removed after the idle timeout")
        assert none_open(lab)
    finally:
        s.stop()


def test_pcp_router_restart_is_caught_and_mappings_come_back(make_lab: Callable[..., Lab],
                                                             tmp_path: Path) -> None:
    lab = make_lab(enable_upnp=False)
    s = Serve(lab, tmp_path, idle="10m", protocol="pcp").start()
    try:
        s.cli("activate", "game", "--for", "1h")
        assert len(pmp_held(lab)) == 4
        lab.restart_router(flush=True)  # rules flushed; the new daemon announces itself (PCP)
        took = wait_for(lambda: len(pmp_held(lab)) == 4, 10, "mappings back after restart")
        assert took < 5, f"took {took:.1f}s"
        assert all_open(lab)
        assert "router lost its mappings" in s.logtext()
    finally:
        assert s.stop() == 0
    assert not pmp_held(lab)


def router_descriptions(lab: Lab) -> set[str]:
    """The descriptions miniupnpd keeps with its mappings (its lease file: PROTO:eport:
    iaddr:iport:timestamp:description; written as mappings change)."""
    try:
        lines = lab.lease_path.read_text().splitlines()
    except FileNotFoundError:
        return set()
    return {line.split(":", 5)[5] for line in lines if line.count(":") >= 5}


def journal_nonces(s: Serve) -> set[str]:
    """The journal's PCP nonces as miniupnpd writes them: three 32-bit words, each printed
    with %08x from host (little-endian) order."""
    db = sqlite3.connect(s.state / "journal.sqlite3")
    try:
        raw = [bytes.fromhex(str(n)) for (n,) in db.execute("SELECT nonce FROM mappings")]
    finally:
        db.close()
    return {"".join(n[i:i + 4][::-1].hex() for i in (0, 4, 8)) for n in raw}


@pytest.mark.parametrize("protocol", ["pcp", "natpmp"])
def test_kill_9_natpmp_pcp_leftovers_are_deleted_at_the_next_start(
        make_lab: Callable[..., Lab], tmp_path: Path, protocol: str) -> None:
    """A crash leaves NAT-PMP/PCP mappings (an hour's lifetime) that nobody can list; the next
    start deletes them from the journal (PCP with the nonce that made them, which miniupnpd
    checks) and the WAN can no longer reach the ports."""
    lab = make_lab(enable_upnp=False)
    s = Serve(lab, tmp_path, idle="10m", protocol=protocol).start()
    try:
        s.cli("activate", "game", "--for", "2s")
        wait_for(lambda: len(pmp_held(lab)) == 4, 10, f"mappings over {protocol}")
        if protocol == "pcp":  # the router's record of each nonce is the journal's
            assert router_descriptions(lab) == {f"PCP MAP {n}" for n in journal_nonces(s)}
        assert s.stop(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(2.5)  # the activation's time runs out while the service is dead
        assert len(pmp_held(lab)) == 4  # a crash leaves them (their lifetime is an hour)
        assert all_open(lab)
        s.start()
        wait_for(lambda: not pmp_held(lab), 15, "leftovers deleted by the restarted service")
        assert not router_descriptions(lab)  # the daemon's own record agrees
        assert none_open(lab)
        log = s.logtext()
        assert log.count("(left by an earlier run)") == 4, log
        assert "cannot be deleted" not in log and "refused" not in log, log
        assert s.status()["activations"] == []
    finally:
        if s.proc is not None and s.proc.poll() is None:
            assert s.stop() == 0
    assert not pmp_held(lab)


def test_pcp_leftover_remapped_by_another_program_is_left_alone(make_lab: Callable[..., Lab],
                                                                tmp_path: Path) -> None:
    """After the crash another PCP client on the LAN host maps one of the ports with its own
    nonce (miniupnpd replaces ours): the next start's delete with our nonce is refused by the
    router (it checks nonces), so that mapping is left alone; the other three are deleted."""
    lab = make_lab(enable_upnp=False)
    s = Serve(lab, tmp_path, idle="10m", protocol="pcp").start()
    try:
        s.cli("activate", "game", "--for", "2s")
        wait_for(lambda: len(pmp_held(lab)) == 4, 10, "mappings over PCP")
        assert s.stop(signal.SIGKILL) == -signal.SIGKILL
        other = ("import os, socket\n"
                 "from igdtrigger.gateway.natpmp.codec import build_pcp_map\n"
                 "from igdtrigger.core.model import Proto\n"
                 "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "s.settimeout(3)\n"
                 f"s.sendto(build_pcp_map(os.urandom(12), Proto.UDP, 40000, 40000, 3600, "
                 f"{lab.lan_ip!r}), ({lab.router_lan_ip!r}, 5351))\n"
                 "print(s.recv(1100)[3])\n")
        p = lab.run(lab.lan, [sys.executable, "-c", other], env=env(), cwd=ROOT, check=True)
        assert p.stdout.strip() == "0", p.stdout + p.stderr  # SUCCESS: theirs now
        time.sleep(2.5)
        s.start()
        wait_for(lambda: pmp_held(lab) == {("UDP", 40000)}, 15, "our three deleted, theirs not")
        wait_for(lambda: "another client has mapped that internal port" in s.logtext(), 15,
                 "the refused delete named")
        assert s.logtext().count("(left by an earlier run)") == 3
        assert lab.probe("udp", 40000)  # theirs still works
    finally:
        if s.proc is not None and s.proc.poll() is None:
            assert s.stop() == 0
    assert pmp_held(lab) == {("UDP", 40000)}  # not ours: the stop leaves it too


@pytest.mark.parametrize("igd_v1", [False, True], ids=["igdv2", "igdv1"])
def test_activation_for_another_host_with_secure_mode_off(make_lab: Callable[..., Lab],
                                                          tmp_path: Path, igd_v1: bool) -> None:
    """A home server acting for another LAN host: works where the router allows it."""
    lab = make_lab(secure_mode=False, igd_v1=igd_v1, lan_hosts=2)
    s = Serve(lab, tmp_path, idle="10m").start()
    try:
        token = (s.state / "api-token").read_text().strip()
        other = lab.lan_ips[1]
        p = lab.run(lab.lan, igdt_argv("activate", "game", "--host", other, "--for", "1h",
                                       "--json", "--server", API, "--token", token),
                    env=env(), cwd=ROOT)
        act = json.loads(p.stdout)
        assert act["state"] == "open", act
        assert {m[2] for m in ours(lab)} == {other}
        assert lab.probe("udp", 40000, host=1)
        assert lab.probe("tcp", 40005, host=1)
    finally:
        assert s.stop() == 0
    assert not ours(lab)


def test_without_gateway_url_the_router_is_found_by_ssdp(lab: Lab, tmp_path: Path) -> None:
    s = Serve(lab, tmp_path, idle="10m")
    s.config.write_text(s.config.read_text().replace(f'url = "{lab.igd_url}"\n', ""))
    assert "url =" not in s.config.read_text()
    s.start()
    try:
        st = s.status()
        assert st["gateway"]["location"] == lab.igd_url
        s.cli("activate", "game", "--for", "1h")
        assert all_open(lab)
    finally:
        assert s.stop() == 0
    assert not ours(lab)


@pytest.mark.parametrize("igd_v1", [False, True], ids=["igdv2", "igdv1"])
def test_home_server_on_a_secure_mode_router_the_pc_maps_its_own_ports(
        make_lab: Callable[..., Lab], tmp_path: Path, igd_v1: bool) -> None:
    """issue 15: the service on LAN host 1 (a home server), `igdtrigger run` on LAN host 2.
    miniupnpd in secure mode refuses host 2's ports to the server; the wrapper says why in one
    line, maps them from host 2 itself (the server's rule: the same ports), reports back, and
    the WAN packet reaches host 2 while the game runs. Nothing stays open after it."""
    lab = make_lab(secure_mode=True, igd_v1=igd_v1, lan_hosts=2)
    s = Serve(lab, tmp_path, idle="10m")
    s.config.write_text(s.config.read_text().replace(
        'listen = "127.0.0.1:8731"', 'listen = "0.0.0.0:8731"\nzeroconf = false'))
    s.start()
    pc_config = tmp_path / "pc.toml"  # the PC has no rules of its own: they live on the server
    pc_config.write_text("")
    marker = tmp_path / "game-may-exit"
    game = ("import pathlib, sys, time\n"
            f"p = pathlib.Path({str(marker)!r})\n"
            "deadline = time.monotonic() + 60\n"
            "while not p.exists() and time.monotonic() < deadline: time.sleep(0.05)\n"
            "sys.exit(5)\n")
    pc = lab.lan_hosts[1]
    errlog = tmp_path / "run.err"
    with errlog.open("wb") as err:
        wrapper = lab.popen(pc, igdt_argv(
            "run", "--config", str(pc_config), "--server", f"http://{lab.lan_ip}:8731",
            "--rule", "game", "--", sys.executable, "-c", game),
            env={**env(), "IGDTRIGGER_STATE_DIR": str(tmp_path / "pc-state")}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        other = lab.lan_ips[1]
        wait_for(lambda: {m[2] for m in ours(lab)} == {other} and len(ours(lab)) == 4, 30,
                 "host 2 to map its own ports")
        assert lab.probe("udp", 40000, host=1), f"router has {ours(lab)}"
        assert lab.probe("tcp", 40005, host=1)

        def reported() -> bool:
            acts = s.status()["activations"]
            return any(a["host"] == other and a["state"] == "self" for a in acts)

        wait_for(reported, 30, "the server to show the activation as mapped by the PC itself")
        act = next(a for a in s.status()["activations"] if a["host"] == other)
        assert "itself" in act["message"] and act["source"] == "run"
        text = errlog.read_text()
        # the reason and the fix, once, then what opened
        assert text.count("the router only lets a host map ports to itself") == 1, text
        assert f"open on {lab.router_wan_ip} for this PC while the game runs" in text, text
        assert "Traceback" not in text
    finally:
        marker.touch()
        rc = wrapper.wait(30)
    assert rc == 5, errlog.read_text()
    wait_for(lambda: not ours(lab), 15, "host 2's own mappings to be removed")
    wait_for(lambda: not s.status()["activations"], 15, "the activation to end on the server")
    assert "could not end the activation" not in errlog.read_text()
    assert s.stop() == 0
