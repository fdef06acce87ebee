"""Faults survived, against the real router: crashes, stops, router restarts and outages, lost
mappings, a full or read-only state disk. 200 mappings where the issue says so.

Each test checks what a user would see: the router's own table (what is left open), a packet
from the WAN host reaching the LAN host, the API answering.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_detect import API_PORT, Serve
from tests.lab.test_lab_service import ROOT, env, igdt_argv, ours

pytestmark = pytest.mark.lab

BIG = 100  # ports per protocol: 200 mappings
BIG_FIRST = 41000
SHORT_FIRST = 42000
OUTAGE = float(os.environ.get("IGDTRIGGER_LAB_OUTAGE", "60"))


def config(lab: Lab, tmp: Path, *, state: Path | None = None, verify: str = "60s") -> Path:
    path = tmp / "config.toml"
    path.write_text(f"""
[gateway]
url = "{lab.igd_url}"
lease = "1h"
verify_interval = "{verify}"

[api]
listen = "127.0.0.1:{API_PORT}"

[service]
state_dir = "{state or tmp / 'state'}"

[detect]
methods = []

[[rules]]
name = "big"
open = ["udp/{BIG_FIRST}-{BIG_FIRST + BIG - 1}", "tcp/{BIG_FIRST}-{BIG_FIRST + BIG - 1}"]

[[rules]]
name = "short"
open = ["udp/{SHORT_FIRST}-{SHORT_FIRST + 9}"]

[[rules]]
name = "small"
open = ["udp/43000"]
""")
    return path


def cli(s: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    return s.lab.run(s.ns, igdt_argv(*args, "--server", f"http://127.0.0.1:{API_PORT}"),
                     env=env(), cwd=ROOT, timeout=60)


def activate(s: Serve, rule: str, ttl: str) -> None:
    p = cli(s, "activate", rule, "--for", ttl)
    assert p.returncode == 0, p.stdout + p.stderr


def big_ports(lab: Lab) -> set[tuple[str, int]]:
    return {(m[0], m[1]) for m in ours(lab) if BIG_FIRST <= m[1] < BIG_FIRST + BIG}


def some_big_ports_reachable(lab: Lab) -> bool:
    return all(lab.probe(proto, BIG_FIRST + off, timeout=1.0)  # type: ignore[arg-type]
               for proto, off in (("udp", 0), ("tcp", BIG // 2), ("udp", BIG - 1)))


def serve(lab: Lab, cfg: Path, started: list[Serve]) -> Serve:
    s = Serve(lab, lab.lan, cfg)
    started.append(s)
    wait_for(lambda: s.status()["gateway"]["up"], 10, "service to reach the router")
    return s


def test_kill_9_with_200_mappings_then_restart(lab: Lab, tmp_path: Path,
                                               started: list[Serve]) -> None:
    cfg = config(lab, tmp_path)
    s = serve(lab, cfg, started)
    activate(s, "big", "1h")
    activate(s, "short", "3s")
    assert len(ours(lab)) == 2 * BIG + 10
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(10)
    time.sleep(3.5)  # "short" lapses while the service is dead
    assert len(ours(lab)) == 2 * BIG + 10  # a crash deletes nothing (the leases are an hour)

    again = serve(lab, cfg, started)
    took = wait_for(lambda: len(ours(lab)) == 2 * BIG, 20, "the restart to reconcile")
    assert len(big_ports(lab)) == 2 * BIG  # every still-valid mapping is there, nothing else
    [act] = again.status()["activations"]
    assert act["rule"] == "big" and act["expires_in"] > 3000  # restored with its time
    assert some_big_ports_reachable(lab)
    assert not lab.probe("udp", SHORT_FIRST, timeout=0.3)
    print(f"reconciled {2 * BIG + 10} -> {2 * BIG} mappings {took:.2f}s after restart")


def test_sigterm_with_200_mappings_removes_all_within_5s(lab: Lab, tmp_path: Path,
                                                         started: list[Serve]) -> None:
    s = serve(lab, config(lab, tmp_path), started)
    activate(s, "big", "1h")
    assert len(ours(lab)) == 2 * BIG
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(30)
    took = time.monotonic() - t0
    assert rc == 0
    assert ours(lab) == []
    assert took < 5, f"SIGTERM took {took:.2f}s (docker stop gives 10 s)"
    print(f"SIGTERM with {2 * BIG} mappings: {took:.2f}s")


def test_router_restart_with_200_mappings(lab: Lab, tmp_path: Path,
                                          started: list[Serve]) -> None:
    s = serve(lab, config(lab, tmp_path), started)
    activate(s, "big", "1h")
    lab.restart_router(flush=True)  # a reboot: new process, its rules flushed
    took = wait_for(lambda: len(big_ports(lab)) == 2 * BIG, 5, "200 mappings restored")
    assert some_big_ports_reachable(lab)
    print(f"router restart: 200 mappings restored in {took:.2f}s")


def router_requests(s: Serve) -> int:
    p = s.lab.run(s.ns, ["curl", "-s", f"http://127.0.0.1:{API_PORT}/metrics"], timeout=10)
    return sum(int(float(m)) for m in re.findall(
        r"^igdtrigger_router_requests_total\{[^}]*\} (\S+)$", p.stdout, re.M))


def test_router_down_for_a_minute(lab: Lab, tmp_path: Path, started: list[Serve]) -> None:
    """No crash, the API answers throughout and says the router is down, retries back off,
    and everything is back when the router returns."""
    s = serve(lab, config(lab, tmp_path), started)
    activate(s, "small", "1h")
    assert len(ours(lab)) == 1
    lab.stop_router()
    t0 = time.monotonic()
    seen_down = None
    answers = 0
    before = None
    while time.monotonic() - t0 < OUTAGE:
        st = s.status()  # asserts the API answered
        answers += 1
        if not st["gateway"]["up"] and seen_down is None:
            seen_down = time.monotonic() - t0
            assert st["gateway"]["error"]
            before = router_requests(s)
        time.sleep(1)
    assert s.proc.poll() is None
    assert seen_down is not None and seen_down < 10, "the router's absence was not reported"
    assert before is not None
    during = router_requests(s) - before
    # back-off (1 s doubling to 60 s): a handful of attempts per protocol, not one per second
    assert during <= 40, f"{during} requests to a router that was down for {OUTAGE:g}s"
    assert answers >= OUTAGE * 0.5
    lab.restart_router(flush=True)
    took = wait_for(lambda: len(ours(lab)) == 1, 10, "the mapping back after the outage")
    assert lab.probe("udp", 43000)
    assert s.status()["gateway"]["up"]
    print(f"outage {OUTAGE:g}s: {answers} status answers, {during} router requests, "
          f"restored {took:.2f}s after the router returned")


def test_mapping_lost_by_the_router_is_reapplied(lab: Lab, tmp_path: Path,
                                                 started: list[Serve]) -> None:
    s = serve(lab, config(lab, tmp_path, verify="3s"), started)
    activate(s, "big", "1h")
    # the router drops one of them (as some do under load) while still holding the rest
    p = lab.run(lab.lan, ["upnpc", "-u", lab.igd_url, "-d", str(BIG_FIRST + 7), "UDP"])
    assert ("UDP", BIG_FIRST + 7) not in big_ports(lab), p.stdout
    wait_for(lambda: ("UDP", BIG_FIRST + 7) in big_ports(lab), 10, "the lost mapping back")
    assert lab.probe("udp", BIG_FIRST + 7)
    assert "re-applying" in s.log.read_text()


@contextlib.contextmanager
def small_disk(where: Path, size: str = "4m") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()


def test_state_disk_full(lab: Lab, tmp_path: Path, started: list[Serve]) -> None:
    with small_disk(tmp_path / "disk") as disk:
        s = serve(lab, config(lab, tmp_path, state=disk), started)
        activate(s, "big", "1h")
        fill(disk)
        activate(s, "small", "1h")  # still serving: a new activation opens its port
        assert lab.probe("udp", 43000)
        wait_for(lambda: any("journal" in w for w in s.status()["warnings"]), 10,
                 "the journal problem reported in status")
        assert {a["rule"] for a in s.status()["activations"]} == {"big", "small"}  # none lost
        assert len(big_ports(lab)) == 2 * BIG and some_big_ports_reachable(lab)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert ours(lab) == []  # and the stop still removes everything


def test_state_disk_read_only(lab: Lab, tmp_path: Path, started: list[Serve]) -> None:
    """The service crashed and its state disk came back read-only (a container's read-only
    volume, a remount after errors): the next start still reads the journal, restores what it
    holds, serves from memory, says why, and cleans up on stop."""
    with small_disk(tmp_path / "disk") as disk:
        cfg = config(lab, tmp_path, state=disk)
        s = serve(lab, cfg, started)
        activate(s, "big", "1h")
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        again = serve(lab, cfg, started)
        warnings = again.status()["warnings"]
        assert any("journal" in w for w in warnings), warnings
        assert [a["rule"] for a in again.status()["activations"]] == ["big"]
        activate(again, "small", "1h")
        assert lab.probe("udp", 43000)
        assert len(big_ports(lab)) == 2 * BIG and some_big_ports_reachable(lab)
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0
        assert ours(lab) == []
