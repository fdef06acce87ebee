"""Router answers checked against the real router (issue 11): after a stop `upnpc -l` lists
nothing of ours; a delete the router cannot answer (an nft rule in the router's namespace drops
its HTTP packets) is reported, kept in the journal, retried while running and by the next start.
(A mapping deleted behind our back: test_lab_faults.py, test_mapping_lost_by_the_router_...)
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_detect import Serve
from tests.lab.test_lab_faults import activate, cli, config, serve

pytestmark = pytest.mark.lab

PORT = 43000  # the "small" rule of test_lab_faults.config
BLOCK_TABLE = "igdt_truth"


@contextlib.contextmanager
def router_http_blocked(lab: Lab) -> Iterator[None]:
    """The router's HTTP server (miniupnpd, port 5000) sends nothing out: every UPnP request
    times out, and the mapping stays where it is."""
    for cmd in (["add", "table", "inet", BLOCK_TABLE],
                ["add", "chain", "inet", BLOCK_TABLE, "out",
                 "{ type filter hook output priority 0 ; policy accept ; }"],
                ["add", "rule", "inet", BLOCK_TABLE, "out", "tcp", "sport", "5000", "drop"]):
        lab.run(lab.router, ["nft", *cmd], check=True)
    try:
        yield
    finally:
        lab.run(lab.router, ["nft", "delete", "table", "inet", BLOCK_TABLE])


def on_router(lab: Lab) -> set[int]:
    """Ports the router's DNAT chain forwards (what the kernel does, read in its namespace)."""
    return {m[1] for m in lab.nft_mappings()}


def upnpc_list(lab: Lab) -> str:
    p = lab.run(lab.lan, ["upnpc", "-u", lab.igd_url, "-l"], timeout=30)
    return str(p.stdout)


def journal_ports(state: Path) -> list[int]:
    db = sqlite3.connect(f"file:{state / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return [int(r[0]) for r in db.execute("SELECT external_port FROM mappings")]
    finally:
        db.close()


def test_stop_leaves_nothing_that_upnpc_lists(lab: Lab, tmp_path: Path,
                                              started: list[Serve]) -> None:
    s = serve(lab, config(lab, tmp_path), started)
    activate(s, "small", "1h")
    activate(s, "short", "1h")
    assert "igdtrigger" in upnpc_list(lab)
    [m] = [m for m in s.status()["mappings"] if m["external_port"] == PORT]
    assert (m["verified"], m["lease_asked"]) == (True, 3600)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    listing = upnpc_list(lab)
    assert "igdtrigger" not in listing, listing
    assert journal_ports(tmp_path / "state") == []
    assert "still open" not in s.log.read_text()


def test_delete_without_an_answer_is_reported_kept_and_retried(
        lab: Lab, tmp_path: Path, started: list[Serve]) -> None:
    s = serve(lab, config(lab, tmp_path, verify="5s"), started)
    activate(s, "small", "1h")
    assert PORT in on_router(lab)
    with router_http_blocked(lab):
        p = cli(s, "deactivate", "small")
        assert p.returncode == 0, p.stdout + p.stderr
        wait_for(lambda: s.status()["gateway"]["up"] is False, 60, "the delete to time out")
        st = s.status()
        assert st["gateway"]["error"]  # reported
        assert st["journal"]["orphans_pending"] == 1  # kept
        assert PORT in on_router(lab)  # really still open
        assert journal_ports(tmp_path / "state") == [PORT]  # a crash now: the next start knows
        assert f"could not delete udp/{PORT}" in s.log.read_text()
    # the router answers again: the delete is retried and confirmed
    wait_for(lambda: PORT not in on_router(lab), 90, "the delete to be retried")
    wait_for(lambda: s.status()["journal"]["orphans_pending"] == 0, 30, "the orphan settled")
    assert journal_ports(tmp_path / "state") == []


def test_stop_while_the_router_does_not_answer_then_next_start_deletes(
        lab: Lab, tmp_path: Path, started: list[Serve]) -> None:
    cfg = config(lab, tmp_path)
    s = serve(lab, cfg, started)
    activate(s, "small", "5s")  # lapsed by the next start: nothing wants the port then
    with router_http_blocked(lab):
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        assert PORT in on_router(lab)
        assert journal_ports(tmp_path / "state") == [PORT]  # kept: not confirmed gone
        log = s.log.read_text()
        assert "removed 1 mapping" not in log  # never counted as removed
        assert f"udp/{PORT} -> " in log and "still open on the router" in log  # named
    again = serve(lab, cfg, started)
    wait_for(lambda: PORT not in on_router(lab), 60, "the next start to delete the leftover")
    wait_for(lambda: journal_ports(tmp_path / "state") == [], 30, "the journal to forget it")
    assert again.status()["journal"]["orphans_pending"] == 0


# --- variants of the same kinds (issue 11: "other routers of the same kinds") ------------------


def upnpc_add(lab: Lab, ns: str, ip: str, port: int, description: str) -> None:
    p = lab.run(ns, ["upnpc", "-u", lab.igd_url, "-e", description, "-a", ip, str(port),
                     str(port), "UDP", "3600"], timeout=30)
    assert port in on_router(lab), p.stdout + p.stderr


def test_mapping_deleted_behind_our_back_just_before_stop(
        lab: Lab, tmp_path: Path, started: list[Serve]) -> None:
    """The router answers the stop's delete with 714 (someone removed it): confirmed gone by a
    look-up, nothing named left open, nothing kept in the journal, nothing on the router."""
    s = serve(lab, config(lab, tmp_path), started)
    activate(s, "small", "1h")
    lab.run(lab.lan, ["upnpc", "-u", lab.igd_url, "-d", str(PORT), "UDP"], check=True)
    assert PORT not in on_router(lab)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    assert "igdtrigger" not in upnpc_list(lab)
    assert journal_ports(tmp_path / "state") == []
    assert "still open" not in s.log.read_text()


def test_start_up_sweep_leaves_another_hosts_entry_with_our_description(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve]) -> None:
    """Another LAN host holds a mapping under this instance's description (a copied state
    directory shares the instance tag): the start-up sweep removes our own stale entry and
    leaves that host's. secure_mode off, so the router itself would let us delete it."""
    lab = make_lab(lan_hosts=2, secure_mode=False)
    cfg = config(lab, tmp_path)
    s = serve(lab, cfg, started)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    tag = (tmp_path / "state" / "instance").read_text().strip()
    desc = f"igdtrigger small {tag}"
    upnpc_add(lab, lab.lan_hosts[1], lab.lan_ips[1], 45000, desc)  # the other host's
    upnpc_add(lab, lab.lan, lab.lan_ip, 45001, desc)  # ours, left by a crash
    again = serve(lab, cfg, started)
    wait_for(lambda: 45001 not in on_router(lab), 30, "our stale mapping swept")
    assert 45000 in on_router(lab)  # never the other host's
    assert "maps to another host and is not in the journal" in again.log.read_text()
