"""`igdtrigger doctor` on a host `serve` cannot use (the breaker's findings, issue 14)."""

from __future__ import annotations

import pytest

import igdtrigger.cli.doctor as doctor
from igdtrigger.cli.doctor import CAP_NET_ADMIN, check_front
from igdtrigger.config import parse_config
from igdtrigger.front.topology import Topology
from tests.test_doctor_front import FRONT, here


def test_topology_1_without_the_nft_command_fails_as_serve_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A home gateway without nftables' ``nft`` (lab: bind-mounted away): ``serve`` stops at
    start with "the nft command is missing: install nftables", while doctor said exit 0 with
    one warn, "could not read the forward chains (nft) -> run as root / with CAP_NET_ADMIN"
    (as root). Now a FAIL that names the missing command and how to get it."""
    here(monkeypatch, Topology.GATEWAY, forwarding=True, drops=None)
    monkeypatch.setattr(doctor, "find_nft", lambda: None)
    lines = check_front(parse_config({"front": FRONT}), 1 << CAP_NET_ADMIN)
    assert [(c.level, c.name) for c in lines] == [("ok", "front topology"),
                                                  ("FAIL", "front forwarding")]
    assert "nft command" in lines[1].detail and "missing" in lines[1].detail
    assert "install nftables" in lines[1].fix
    assert "CAP_NET_ADMIN" not in lines[1].fix  # not a privilege matter
    here(monkeypatch, Topology.HOST)  # topology 2 adds no DNAT: nft not needed for it
    assert [c.level for c in check_front(parse_config({"front": FRONT}), 1 << CAP_NET_ADMIN)
            ] == ["ok"]
