"""Open exactly while needed, against miniupnpd: every stop is clean, only a crash restores,
and what a killed `igdtrigger run` or a lost instance left is removed (never another
program's mapping)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_service import (
    ROOT,
    Serve,
    all_open,
    config_text,
    env,
    igdt_argv,
    none_open,
    ours,
    pmp_held,
    serve,  # noqa: F401 (a fixture: pytest finds it by its name)
)

pytestmark = pytest.mark.lab


@pytest.fixture
def service(serve: Callable[..., Serve]) -> Callable[..., Serve]:  # noqa: F811
    """test_lab_service's ``serve``: `igdtrigger serve` in the LAN host, stopped at the end."""
    return serve


def test_sighup_is_a_clean_stop(lab: Lab, service: Callable[..., Serve]) -> None:
    """A closed terminal or a dropped SSH session (SIGHUP) used to kill `serve` with every
    mapping left open on the router."""
    s = service(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    assert len(ours(lab)) == 4
    assert s.stop(signal.SIGHUP) == 0
    assert ours(lab) == []
    assert none_open(lab)
    assert "SIGHUP received" in s.logtext()


def test_clean_stop_ends_activations_only_a_crash_restores(lab: Lab,
                                                            service: Callable[..., Serve]) -> None:
    s = service(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    assert s.stop(signal.SIGTERM) == 0
    s.start()  # after a clean stop: nothing comes back
    st = s.status()
    assert st["journal"]["restored_activations"] == 0 and st["activations"] == []
    time.sleep(1)
    assert ours(lab) == []
    s.cli("activate", "game", "--for", "1h")
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash
    s.start()
    assert s.status()["journal"]["restored_activations"] == 1
    wait_for(lambda: len(ours(lab)) == 4, 10, "the restored activation's mappings")
    assert all_open(lab)
    assert s.stop() == 0
    assert ours(lab) == []


def _run(lab: Lab, cfg: Path, *command: str) -> subprocess.Popen[str]:
    return lab.popen(lab.lan, igdt_argv("run", "--config", str(cfg), "--rule", "game", "--",
                                        *command),
                     env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     text=True, start_new_session=True)


def _kill_9(p: subprocess.Popen[str]) -> None:
    """kill -9 of a wrapper (and of its game, left orphaned), as a crash does."""
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # the game, orphaned
    if p.stderr is not None:
        p.stderr.close()
    time.sleep(0.3)


def _crashed_wrapper(lab: Lab, cfg: Path) -> int:
    """`igdtrigger run` without a service, killed with -9 while it holds the rule's ports."""
    p = _run(lab, cfg, "sleep", "120")
    wait_for(lambda: len(ours(lab)) == 4, 20, "the wrapper to map the rule's ports")
    _kill_9(p)
    assert {m[4] for m in ours(lab)} == {f"igdtrigger game run{p.pid}"}  # left (5 min lease)
    return p.pid


def test_wrapper_kill_9_leftovers_are_reclaimed_by_the_next_run(lab: Lab,
                                                                tmp_path: Path) -> None:
    """Relaunching the same rule used to open 0 of 4 ("already mapped ... igdtrigger leaves it
    alone") and leave the dead wrapper's mappings for their lease."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, tmp_path / "state"))
    dead = _crashed_wrapper(lab, cfg)
    again = _run(lab, cfg, "sleep", "5")
    wait_for(lambda: {m[4] for m in ours(lab)} == {f"igdtrigger game run{again.pid}"}
             and len(ours(lab)) == 4, 20, f"the new wrapper to take over run{dead}'s ports")
    assert all_open(lab)
    _, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert "leaves it alone" not in err, err
    assert ours(lab) == []
    assert none_open(lab)


def test_wrapper_kill_9_leftovers_are_removed_by_a_serve_start(lab: Lab, tmp_path: Path,
                                                               service: Callable[..., Serve]
                                                               ) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, tmp_path / "state"))
    _crashed_wrapper(lab, cfg)
    s = service(idle="10m")
    wait_for(lambda: ours(lab) == [], 10, "serve to remove the dead wrapper's mappings")
    assert none_open(lab)
    assert s.stop() == 0


def test_gateway_clean_removes_ours_and_leaves_a_foreign_upnpc_mapping(
        lab: Lab, service: Callable[..., Serve]) -> None:
    lab.add_foreign_mapping("udp", 41000, lab.lan_ip, desc="someone's upnpc -a")
    s = service(idle="10m")
    s.cli("activate", "game", "--for", "1h")
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL  # its mappings stay on the router
    assert len(ours(lab)) == 4

    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        return lab.run(lab.lan, igdt_argv("gateway", "--config", str(s.config), *args),
                       env=env(), cwd=ROOT, timeout=60)

    listed = gateway("--list", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = {(m["proto"], m["external_port"]): m for m in json.loads(listed.stdout)["mappings"]}
    assert not rows[("UDP", 41000)]["ours"] and not rows[("UDP", 41000)]["leftover"]
    assert sum(m["leftover"] for m in rows.values()) == 4
    done = gateway("--clean")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed 4 leftover mapping(s)" in done.stdout, done.stdout
    assert ours(lab) == []
    assert [(m[0], m[1], m[4]) for m in lab.router_mappings()] == [
        ("UDP", 41000, "someone's upnpc -a")]


BIG_FIRST, BIG_PORTS = 42000, 2000


def _big_serve(lab: Lab, tmp_path: Path, started: list[Serve]) -> Serve:
    s = Serve(lab, tmp_path, idle="10m")
    s.config.write_text(config_text(lab, s.state, idle="10m") + f"""
[[rules]]
name = "big"
open = ["udp/{BIG_FIRST}-{BIG_FIRST + BIG_PORTS - 1}"]
""")
    started.append(s)
    return s.start()


def _kill(started: list[Serve]) -> None:
    for x in started:
        if x.proc is not None and x.proc.poll() is None:
            x.proc.kill()
            x.proc.wait(10)


def _big(lab: Lab) -> int:
    """The big rule's mappings, read from the router's DNAT chain (a UPnP listing of thousands
    of entries is too slow while miniupnpd is busy)."""
    return sum(1 for m in lab.nft_mappings() if m[1] >= BIG_FIRST)


def test_sigterm_in_the_middle_of_a_long_pass_stops_within_seconds_and_nothing_leaks(
        lab: Lab, tmp_path: Path) -> None:
    """The pass is interrupted at once; what the stop could not delete in its time (miniupnpd
    deletes slowly with a big table) stays journaled, an add in flight included, and the next
    start removes it all and restores nothing."""
    started: list[Serve] = []
    s = _big_serve(lab, tmp_path, started)
    try:
        p = lab.popen(lab.lan, igdt_argv("activate", "big", "--for", "1h", "--server",
                                         "http://127.0.0.1:8731"), env=env(), cwd=ROOT,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _big(lab) >= 50, 30, "the pass to be under way")
        t0 = time.monotonic()
        assert s.stop(signal.SIGTERM, timeout=60) == 0
        took = time.monotonic() - t0
        p.wait(30)
        left = _big(lab)
        assert left < BIG_PORTS  # the pass did not go on to the end of the range
        s.start()
        assert s.status()["activations"] == []  # a clean stop: nothing restored
        wait_for(lambda: _big(lab) == 0, 120, "the next start to remove what was left")
        assert ours(lab) == []
        print(f"SIGTERM mid-pass ({BIG_PORTS}-port rule): stopped in {took:.2f}s, {left} left "
              "on the router, all removed by the next start")
        assert s.stop() == 0
    finally:
        _kill(started)


def test_a_lapse_during_a_long_pass_ends_it(lab: Lab, tmp_path: Path) -> None:
    started: list[Serve] = []
    s = _big_serve(lab, tmp_path, started)
    try:
        s.cli("activate", "big", "--for", "2s", "--timeout", "60")
        t_lapse = time.monotonic()  # the activation's 2 s are over about now (or soon)
        most = 0

        def gone() -> bool:
            nonlocal most
            n = _big(lab)
            most = max(most, n)
            return n == 0 and not s.status()["activations"]

        wait_for(gone, 60, "the lapsed activation's mappings to go")
        print(f"{BIG_PORTS}-port rule for 2s: at most {most} mapped; all gone "
              f"{time.monotonic() - t_lapse:.2f}s after the activate call returned")
        assert most < BIG_PORTS  # the pass did not run to the end of the range
        assert s.stop() == 0
    finally:
        _kill(started)


def test_gateway_list_says_a_natpmp_router_cannot_list_its_table(
        make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(enable_upnp=False)
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, tmp_path / "state", url=""))
    p = lab.run(lab.lan, igdt_argv("gateway", "--config", str(cfg), "--list"), env=env(),
                cwd=ROOT, timeout=60)
    assert p.returncode == 1
    assert "cannot list its mapping table" in p.stderr, p.stdout + p.stderr


def test_a_crash_leftover_whose_port_another_host_took_is_left_alone(
        make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    """kill -9 of serve, then a router reboot (its table gone), then another LAN host maps one
    of our journaled ports with upnpc. The next start must not delete that host's mapping (a
    delete names only the port; miniupnpd without secure_mode takes it from anyone): it reads
    the router's entry first and forgets the row."""
    lab = make_lab(secure_mode=False, lan_hosts=2)
    s = Serve(lab, tmp_path, idle="10m").start()
    try:
        s.cli("activate", "game", "--for", "3s")
        wait_for(lambda: len(ours(lab)) == 4, 20, "the activation's mappings")
        proto, port = ours(lab)[0][:2]
        assert s.stop(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(4)  # the activation lapses while the service is down: its rows are leftovers
        lab.restart_router()  # and the router rebooted, its table gone
        other = lab.lan_ips[1]
        lab.add_foreign_mapping(proto, port, other, desc="console upnpc")
        s.start()
        wait_for(lambda: s.status()["journal"]["orphans_pending"] == 0, 20,
                 "the start to settle the journal's leftovers")
        assert [(m[0], m[1], m[2], m[4]) for m in lab.router_mappings()] == [
            (proto, port, other, "console upnpc")]
        assert s.stop() == 0
        assert [m[2] for m in lab.router_mappings()] == [other]
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


@pytest.mark.parametrize("protocol", ["pcp", "natpmp"])
def test_wrapper_kill_9_natpmp_pcp_leftovers_are_removed_by_a_serve_start(
        make_lab: Callable[..., Lab], tmp_path: Path, protocol: str) -> None:
    """A router without UPnP: what a killed `igdtrigger run` mapped over NAT-PMP/PCP (its own
    journal, its own PCP nonces) is deleted by the next `serve`, which takes its journal over."""
    lab = make_lab(enable_upnp=False)
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, tmp_path / "state", protocol=protocol))
    p = _run(lab, cfg, "sleep", "120")
    wait_for(lambda: len(pmp_held(lab)) == 4, 20, "the wrapper to map the rule's ports")
    _kill_9(p)
    assert len(pmp_held(lab)) == 4  # left by the crash
    s = Serve(lab, tmp_path, idle="10m", protocol=protocol).start()
    try:
        wait_for(lambda: not pmp_held(lab), 15, "serve to delete the dead wrapper's mappings")
        assert none_open(lab)
        assert s.logtext().count("(left by an earlier run)") == 4, s.logtext()
    finally:
        assert s.stop() == 0
