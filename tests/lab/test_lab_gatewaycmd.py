"""`igdtrigger gateway` against the real router: what it speaks, in each lab mode."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netlab import Lab
from tests.lab.test_lab_service import ROOT, env

pytestmark = pytest.mark.lab


def probe(lab: Lab, tmp_path: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[gateway]\nurl = "{lab.igd_url}"\n')
    p = lab.run(lab.lan, [sys.executable, "-m", "igdtrigger", "gateway", "--json", "--config",
                          str(cfg), "--timeout", "2s", *extra], env=env(), cwd=ROOT, timeout=60)
    return p.returncode, json.loads(p.stdout)


def by_proto(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["protocol"]: r for r in results}


def test_full_router_speaks_all_three(lab: Lab, tmp_path: Path) -> None:
    rc, results = probe(lab, tmp_path, "--test")
    r = by_proto(results)
    assert rc == 0
    assert r["upnp-igd"]["ok"]
    assert r["upnp-igd"]["external_address"] == lab.router_wan_ip
    assert r["upnp-igd"]["local_address"] == lab.lan_ip
    assert r["upnp-igd"]["service_type"] in (None, "urn:schemas-upnp-org:service:WANIPConnection:2")
    assert "timed leases accepted" in r["upnp-igd"]["lease_test"]
    assert r["pcp"]["ok"]
    assert r["nat-pmp"]["ok"]
    assert r["nat-pmp"]["external_address"] == lab.router_wan_ip
    assert not [m for m in lab.router_mappings() if "gateway-test" in m[4]]  # test cleaned up


def test_upnp_off_router_still_found_by_pcp_and_natpmp(make_lab: Callable[..., Lab],
                                                       tmp_path: Path) -> None:
    lab = make_lab(enable_upnp=False)
    rc, results = probe(lab, tmp_path)
    r = by_proto(results)
    assert rc == 0
    assert not r["upnp-igd"]["ok"]
    assert r["pcp"]["ok"]
    assert r["nat-pmp"]["ok"]


def test_nothing_answers_is_exit_1_with_advice(make_lab: Callable[..., Lab],
                                               tmp_path: Path) -> None:
    lab = make_lab()
    lab.stop_router()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[gateway]\nurl = "{lab.igd_url}"\n')
    p = lab.run(lab.lan, [sys.executable, "-m", "igdtrigger", "gateway", "--config", str(cfg),
                          "--timeout", "1s"], env=env(), cwd=ROOT, timeout=60)
    assert p.returncode == 1
    assert "no port-mapping protocol answered" in p.stdout


def test_ipv6_router_reports_that_pinholes_are_allowed_and_for_which_address(
        make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(ipv6=True)
    rc, results = probe(lab, tmp_path)
    verdict = by_proto(results)["upnp-igd"]["ipv6"]
    assert rc == 0
    assert verdict.startswith("pinholes allowed at http://[2a0c:5bc0::1]:")
    assert lab.ipv6_addrs[lab.lan] in verdict


def test_without_ipv6_the_reason_pinholes_cannot_be_had_is_given(lab: Lab,
                                                                  tmp_path: Path) -> None:
    rc, results = probe(lab, tmp_path)
    verdict = by_proto(results)["upnp-igd"]["ipv6"]
    assert rc == 0
    assert verdict == "no pinholes: this machine has no IPv6 default route: no IPv6 to open"
