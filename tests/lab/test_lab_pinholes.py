"""IPv6 pinholes against a real router: miniupnpd's WANIPv6FirewallControl with its IPv6 side on.

There is no NAT on IPv6, so "open" means the router's firewall lets a WAN packet through to the
LAN host's own global address. The lab's router drops every WAN -> LAN IPv6 packet unless
miniupnpd has put a pinhole rule in its forward chain; ``probe6`` sends a real packet to find out.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_service import (
    ROOT,
    RULE_PORTS,
    Serve,
    all_open,
    config_text,
    env,
    igdt_argv,
    ours,
    send_trigger,
)

pytestmark = pytest.mark.lab


def reachable6(lab: Lab, timeout: float = 0.5) -> dict[str, bool]:
    return {f"{proto}/{port}": lab.probe6(proto, port, timeout=timeout)  # type: ignore[arg-type]
            for proto, port in RULE_PORTS}


def active_pinholes(s: Serve) -> list[dict[str, Any]]:
    return [p for p in s.status().get("pinholes", {}).get("entries", [])
            if p["state"] == "active"]


@pytest.fixture
def lab6(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab(ipv6=True)


def test_the_router_firewall_blocks_ipv6_without_a_pinhole(lab6: Lab) -> None:
    """The premise of every other test here: without a pinhole nothing gets in over IPv6."""
    assert not any(reachable6(lab6, 0.3).values())
    assert lab6.nft_pinholes() == []


def test_a_trigger_opens_ipv6_pinholes_too_and_the_idle_timeout_closes_them(
        lab6: Lab, tmp_path: Path) -> None:
    s = Serve(lab6, tmp_path, idle="3s").start()
    try:
        send_trigger(lab6)
        wait_for(lambda: len(ours(lab6)) == 4 and len(active_pinholes(s)) == 4, 10,
                 "IPv4 mappings and IPv6 pinholes after a trigger")
        st = s.status()
        assert st["pinholes"]["available"] is True
        assert {p["address"] for p in st["pinholes"]["entries"]} == {
            lab6.ipv6_addrs[lab6.lan]}
        got = reachable6(lab6)
        assert all(got.values()), f"not reachable over IPv6: {got}; {lab6.nft_pinholes()}"
        assert all_open(lab6)  # and IPv4 as before
        wait_for(lambda: not lab6.nft_pinholes(), 15, "pinholes removed after the idle timeout")
        assert not any(reachable6(lab6, 0.3).values())
        assert not ours(lab6)
    finally:
        s.stop()


def test_sigterm_closes_the_pinholes(lab6: Lab, tmp_path: Path) -> None:
    s = Serve(lab6, tmp_path, idle="1h").start()
    try:
        send_trigger(lab6)
        wait_for(lambda: len(lab6.nft_pinholes()) == 4, 10, "pinholes after a trigger")
    finally:
        assert s.stop() == 0
    assert lab6.nft_pinholes() == []
    assert not any(reachable6(lab6, 0.3).values())
    assert "closed 4 IPv6 pinhole(s)" in s.logtext()


def test_pinholes_left_by_kill_9_are_closed_on_the_next_start(lab6: Lab, tmp_path: Path) -> None:
    s = Serve(lab6, tmp_path, idle="2s").start()
    send_trigger(lab6)
    wait_for(lambda: len(lab6.nft_pinholes()) == 4, 10, "pinholes after a trigger")
    s.stop(signal.SIGKILL)
    time.sleep(2.5)  # the activation lapses while the service is down
    assert len(lab6.nft_pinholes()) == 4  # the router still has them: nobody closed them
    s.start()
    try:
        wait_for(lambda: not lab6.nft_pinholes(), 10, "left-over pinholes closed after restart")
        assert not any(reachable6(lab6, 0.3).values())
        assert "closed left-over pinhole" in s.logtext()
    finally:
        s.stop()


def test_router_restart_pinholes_come_back(lab6: Lab, tmp_path: Path) -> None:
    s = Serve(lab6, tmp_path, idle="1h").start()
    try:
        send_trigger(lab6)
        wait_for(lambda: len(lab6.nft_pinholes()) == 4, 10, "pinholes after a trigger")
        lab6.restart_router(flush=True)  # a reboot: its firewall forgets every pinhole
        wait_for(lambda: len(lab6.nft_pinholes()) == 4, 15, "pinholes re-applied after reboot")
        got = reachable6(lab6)
        assert all(got.values()), f"not reachable over IPv6 after the reboot: {got}"
    finally:
        s.stop()


def test_without_an_ipv6_firewall_service_status_says_why(lab: Lab, tmp_path: Path) -> None:
    """IPv6 on the hosts but the router's IPv6 side off: IPv4 works, status explains IPv6."""
    lab.enable_ipv6()
    s = Serve(lab, tmp_path, idle="1h").start()
    try:
        send_trigger(lab)
        wait_for(lambda: len(ours(lab)) == 4, 10, "IPv4 mappings")
        wait_for(lambda: s.status()["pinholes"]["reason"] is not None, 10, "a reason")
        st = s.status()
        assert st["pinholes"]["available"] is False
        assert any(w.startswith("IPv6 ports are not opened:") for w in st["warnings"])
        assert all_open(lab)
    finally:
        s.stop()


def test_run_without_a_service_opens_ipv6_too_while_the_game_runs(lab6: Lab,
                                                                 tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab6, tmp_path / "state"))
    marker = tmp_path / "child-started"
    p = lab6.popen(lab6.lan, igdt_argv("run", "--config", str(cfg), "--rule", "game", "--",
                                       "sh", "-c", f"touch {marker}; sleep 3; exit 5"),
                   env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker.exists, 30, "wrapped child to start")
    wait_for(lambda: len(lab6.nft_pinholes()) == 4, 5, "standalone pinholes")
    got = reachable6(lab6)
    assert all(got.values()), f"not reachable over IPv6 while the game runs: {got}"
    assert p.wait(20) == 5
    assert lab6.nft_pinholes() == []
    assert not any(reachable6(lab6, 0.3).values())


def test_gateway_list_and_clean_cover_a_crashs_pinholes(lab6: Lab, tmp_path: Path) -> None:
    """The router cannot list its pinholes: `gateway --list` shows the ones the journal holds,
    and `--clean` closes them while no service runs (they stayed until their lease ended)."""
    import json

    s = Serve(lab6, tmp_path, idle="1h").start()
    send_trigger(lab6)
    wait_for(lambda: len(lab6.nft_pinholes()) == 4, 10, "pinholes after a trigger")
    s.stop(signal.SIGKILL)

    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        return lab6.run(lab6.lan, igdt_argv("gateway", "--config", str(s.config), *args),
                        env=env(), cwd=ROOT, timeout=60)

    listed = gateway("--list", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    holes = json.loads(listed.stdout)["pinholes"]
    assert len(holes) == 4 and all(h["leftover"] for h in holes), holes
    assert len(lab6.nft_pinholes()) == 4  # listing touched nothing
    done = gateway("--clean")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "closed 4 leftover pinhole(s)" in done.stdout, done.stdout
    assert lab6.nft_pinholes() == []
    assert not any(reachable6(lab6, 0.3).values())
    again = gateway("--list", "--json")
    assert json.loads(again.stdout)["pinholes"] == []  # and the journal forgot them
