"""`igdtrigger doctor` with the IGD front (issue 14): the front, not a rule, is where
activations come from; which topology this host is (and what the upstream router or this
host's firewall must allow for it); double NAT said with what the front tells its apps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import igdtrigger.front.topology as topology
from igdtrigger.cli.doctor import (
    CAP_NET_ADMIN,
    check_config,
    check_front,
    check_tracking,
    doctor,
)
from igdtrigger.config import parse_config
from igdtrigger.detect.nfttrack import KernelTracking
from igdtrigger.front.dnat import ForwardDrop
from igdtrigger.front.topology import Topology
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer

from .test_doctor import line, run_doctor

FRONT = {"enabled": True, "interfaces": ["br-lan"]}
ADMIN = 1 << CAP_NET_ADMIN


def here(monkeypatch: pytest.MonkeyPatch, kind: Topology, *, forwarding: bool = False,
         drops: list[ForwardDrop] | None = None) -> None:
    """This host as doctor would find it: routing the LAN via eth0 (topology 1) or not."""
    monkeypatch.setattr(topology, "detect_topology", lambda served, host: (kind, "eth0"))
    monkeypatch.setattr(topology, "_forwarding", lambda: forwarding)
    monkeypatch.setattr(topology, "source_address_for", lambda host: "192.168.77.10")
    monkeypatch.setattr(topology, "read_forward_drops", lambda forward_chain=None: drops)


def test_with_only_the_front_the_config_line_names_it_not_no_rules() -> None:
    only = check_config(parse_config({"front": FRONT}))
    assert only.level == "ok" and "no rules" in only.detail
    assert "activations come from the IGD front" in only.detail
    assert "UPnP IGD, NAT-PMP and PCP" in only.detail
    both = check_config(parse_config({"front": FRONT, "rules": [
        {"name": "demo", "open": ["udp/40000"]}]}))
    assert both.level == "ok" and "1 rule(s), and the IGD front" in both.detail
    nothing = check_config(parse_config({}))
    assert nothing.level == "warn" and "nothing can be opened" in nothing.detail
    assert "[front]" in nothing.fix


def test_topology_2_says_what_the_upstream_router_must_allow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    here(monkeypatch, Topology.HOST)
    (topo,) = check_front(parse_config({"front": FRONT, "gateway": {
        "url": "http://192.168.1.1:5000/rootDesc.xml"}}), ADMIN)
    assert (topo.level, topo.name) == ("ok", "front topology")
    assert "LAN host or home server (topology 2)" in topo.detail
    assert "secure mode off" in topo.fix and "this host's own apps" in topo.fix
    assert "renew" in topo.fix  # other hosts' traffic is not seen here: said
    assert check_front(parse_config({}), ADMIN) == []  # no front, no line


def test_a_router_host_serving_no_named_interface_is_told_how_to_get_topology_1(
        monkeypatch: pytest.MonkeyPatch) -> None:
    here(monkeypatch, Topology.HOST, forwarding=True)
    lines = check_front(parse_config({"front": {"enabled": True}}), ADMIN)
    assert [c.level for c in lines] == ["ok", "warn"]
    assert "forwards IPv4" in lines[1].detail and "not eth0" in lines[1].detail


def test_topology_1_names_the_dropping_forward_chain_and_the_missing_privilege(
        monkeypatch: pytest.MonkeyPatch) -> None:
    drop = ForwardDrop("inet fw4 forward", "chain inet fw4 forward has policy drop ...")
    here(monkeypatch, Topology.GATEWAY, forwarding=True, drops=[drop])
    cfg = parse_config({"front": FRONT})
    lines = check_front(cfg, ADMIN)
    assert (lines[0].level, lines[0].name) == ("ok", "front topology")
    assert "home gateway (topology 1)" in lines[0].detail and "eth0" in lines[0].detail
    assert "192.168.77.10" in lines[0].detail
    assert [(c.level, c.name, c.detail) for c in lines[1:]] == [
        ("FAIL", "front forwarding", drop.text)]
    assert "ct status dnat accept" in lines[1].fix
    here(monkeypatch, Topology.GATEWAY, forwarding=True, drops=[])
    assert [c.level for c in check_front(cfg, ADMIN)] == ["ok"]  # nothing drops: all good
    no_admin = check_front(cfg, 0)
    assert no_admin[-1].level == "FAIL" and "CAP_NET_ADMIN" in no_admin[-1].detail
    assert [c.level for c in check_front(cfg, None)] == ["ok"]  # cannot tell: not said
    here(monkeypatch, Topology.GATEWAY, forwarding=True, drops=None)
    assert [c.level for c in check_front(cfg, ADMIN)] == ["ok", "warn"]  # ruleset unreadable


def test_conntrack_with_only_the_front_tracks_its_clients_flows() -> None:
    cfg = parse_config({"front": FRONT})
    t = KernelTracking(nft="/usr/sbin/nft", probe=lambda timeout, wanted: False)
    ok = check_tracking(cfg, object(), t)
    assert ok.level == "ok" and "tracks the IGD front's clients' flows" in ok.detail
    assert "trigger flows" not in ok.detail  # there is no trigger port
    both = check_tracking(parse_config({"front": FRONT, "rules": [
        {"name": "game", "trigger": ["udp/27015"], "open": ["udp/40000"]}]}), object(), t)
    assert "tracks the trigger flows and the IGD front's clients' flows" in both.detail
    blind = check_tracking(cfg, object(), KernelTracking(
        enabled=False, nft=None, probe=lambda timeout, wanted: False))
    assert blind.level == "warn" and "IGD front's clients' flows would not be seen" in \
        blind.detail


async def test_doctor_with_only_the_front_double_nat_said_with_what_apps_are_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here(monkeypatch, Topology.HOST)
    router = SimulatedRouter(external_ip="100.64.1.2")  # the upstream is itself behind NAT
    async with SimulatedIgdServer(router) as sim:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[gateway]\nurl = "{sim.url}"\ndiscover_timeout = "1s"\n\n'
                       f'[detect]\nmethods = []\n\n[service]\nstate_dir = "{tmp_path}"\n\n'
                       '[front]\nenabled = true\ninterfaces = ["br-lan"]\n')
        code, lines = await run_doctor(str(cfg), "http://127.0.0.1:9", None)
    assert code == 0, lines
    assert line(lines, "config").startswith("ok")
    assert "no rules, nothing can be opened" not in "\n".join(lines)
    assert "topology 2" in line(lines, "front topology")
    ext = line(lines, "external address")
    assert ext.startswith("warn") and "double NAT" in ext
    assert "the IGD front tells its apps 100.64.1.2 anyway" in ext


def test_doctor_prints_the_front_lines_in_order(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a router either: the config and front lines come first, whatever fails later."""
    here(monkeypatch, Topology.HOST)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[gateway]\nurl = "http://127.0.0.1:9/rootDesc.xml"\n'
                   'discover_timeout = "1s"\n\n[detect]\nmethods = []\n\n'
                   f'[service]\nstate_dir = "{tmp_path}"\n\n[front]\nenabled = true\n')
    out = io.StringIO()
    doctor(str(cfg), "http://127.0.0.1:9", None, out=out)
    names = [ln[6:].split(":")[0] for ln in out.getvalue().splitlines()]
    assert names[:3] == ["config", "privileges", "front topology"]
