"""The machine as it comes: a LAN host with no firewall rule at all, where the kernel tracks no
connection until something asks it to, and a host with a desktop firewall of its own.

One outbound UDP datagram (``sendto`` on an unconnected socket, which the socket table cannot
see) to a trigger port must open the rule's ports on miniupnpd, proven by a packet from the WAN
host arriving; the host's own rules are untouched (its ruleset before and after, minus our
table, is the same) and our table is gone after a clean stop.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_detect import (
    Serve,
    clients,
    config,
    connected_game,
    reachable,
    send_from,
)
from tests.lab.test_lab_service import ours

pytestmark = pytest.mark.lab

RULE = 'trigger = ["udp/27015"]\nidle_timeout = "60s"'


def without_ours(ruleset: str) -> list[str]:
    """A ruleset's lines minus table inet igdtrigger, with counter values blanked (the user's
    own counters count traffic; that is not a change of their rules)."""
    out: list[str] = []
    skip = False
    for line in ruleset.splitlines():
        if line.startswith("table inet igdtrigger "):
            skip = True
        if not skip:
            out.append(re.sub(r"counter packets \d+ bytes \d+", "counter", line))
        elif line == "}":
            skip = False
    return out


@pytest.mark.parametrize("firewall", ["none", "desktop"])
def test_one_outbound_datagram_opens_the_ports(make_lab: Callable[..., Lab], tmp_path: Path,
                                               started: list[Serve], firewall: str) -> None:
    lab = make_lab(lan_firewall=firewall)
    before = lab.lan_ruleset()
    if firewall == "none":
        assert before.strip() == ""
    cfg = config(lab, tmp_path, "", RULE)  # default detectors, as a new user runs it
    s = Serve(lab, lab.lan, cfg)
    started.append(s)
    det = {d["name"]: d for d in s.status()["detectors"]}
    assert det["conntrack"]["active"], det
    assert "inet igdtrigger" in det["conntrack"]["detail"]
    assert det["conntrack"]["tracking"]["loaded"] is True
    assert det["sockets"]["reason"].startswith("standby")
    during = lab.lan_ruleset()
    assert "table inet igdtrigger" in during and "27015" in during
    assert without_ours(during) == without_ours(before)

    send_from(lab, 0)  # one datagram
    wait_for(lambda: len(ours(lab)) == 2, 15, "the rule's mappings after one trigger datagram")
    assert clients(lab) == {lab.lan_ip}
    assert reachable(lab)
    [act] = s.status()["activations"]
    assert act["source"] == "traffic"

    s.close()
    assert s.proc.returncode == 0, s.log.read_text()
    after = lab.lan_ruleset()
    assert "igdtrigger" not in after
    assert without_ours(after) == without_ours(before)
    assert not ours(lab)


def test_without_our_table_the_socket_table_takes_over_and_status_says_why(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve]) -> None:
    """track_flows = false on a plain host: conntrack listens but is reported inactive with
    the reason; the socket table runs and a connected UDP socket still opens the ports."""
    lab = make_lab(lan_firewall="none")
    cfg = config(lab, tmp_path, "track_flows = false\nsocket_interval = \"200ms\"", RULE)
    s = Serve(lab, lab.lan, cfg)
    started.append(s)
    det = {d["name"]: d for d in s.status()["detectors"]}
    assert not det["conntrack"]["active"]
    assert "does not track connections" in det["conntrack"]["reason"]
    assert "track_flows" in det["conntrack"]["reason"]
    assert det["sockets"]["active"], det
    assert any("detector conntrack inactive" in w for w in s.status()["warnings"])
    assert lab.lan_ruleset().strip() == ""
    game = connected_game(lab)
    try:
        wait_for(lambda: len(ours(lab)) == 2, 10, "mappings from the socket table")
        assert reachable(lab)
    finally:
        game.kill()
        game.wait()


def test_a_crashed_runs_table_is_replaced_and_removed_at_the_next_clean_stop(
        make_lab: Callable[..., Lab], tmp_path: Path, started: list[Serve]) -> None:
    lab = make_lab(lan_firewall="none")
    cfg = config(lab, tmp_path, "", RULE)
    first = Serve(lab, lab.lan, cfg)
    started.append(first)
    first.proc.kill()  # kill -9: no clean stop, the table stays
    first.proc.wait()
    assert lab.lan_ruleset().count("table inet igdtrigger") == 1
    s = Serve(lab, lab.lan, cfg)
    started.append(s)
    assert s.status()["detectors"][0]["active"]
    assert lab.lan_ruleset().count("table inet igdtrigger") == 1
    send_from(lab, 0)
    wait_for(lambda: len(ours(lab)) == 2, 15, "the rule's mappings after one trigger datagram")
    assert reachable(lab)
    s.close()
    assert lab.lan_ruleset().strip() == ""


def test_a_machine_without_the_nft_command(make_lab: Callable[..., Lab], tmp_path: Path,
                                           started: list[Serve]) -> None:
    """Ubuntu ships no `nft`: the service writes its table over nf_tables netlink and one
    trigger datagram still opens the ports; the table is gone after stop."""
    nft = shutil.which("nft")
    if nft is None or shutil.which("unshare") is None:
        pytest.skip("needs nft (to inspect) and unshare")
    lab = make_lab(lan_firewall="none")
    blank = tmp_path / "not-nft"
    blank.write_text("")
    blank.chmod(0o644)
    # a private mount namespace for the service only, where the nft binary is not executable
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind {blank} {nft} && exec "$@"', "sh"]
    cfg = config(lab, tmp_path, "", RULE)
    s = Serve(lab, lab.lan, cfg, wrap=wrap)
    started.append(s)
    det = {d["name"]: d for d in s.status()["detectors"]}
    assert det["conntrack"]["active"], det
    assert "over netlink" in det["conntrack"]["detail"]
    assert "table inet igdtrigger" in lab.lan_ruleset()
    send_from(lab, 0)
    wait_for(lambda: len(ours(lab)) == 2, 15, "the rule's mappings after one trigger datagram")
    assert reachable(lab)
    s.close()
    assert s.proc.returncode == 0, s.log.read_text()
    assert lab.lan_ruleset().strip() == ""
