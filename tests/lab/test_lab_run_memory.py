"""A standalone `igdtrigger run` (no service) against the lab's router, found by SSDP: it
remembers where the router is, and a remembered location that no longer works costs nothing
but the attempt (discovery at once); the game's status passes through either way."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import ROUTER_LAN_IP, Lab
from tests.lab.test_lab_service import ROOT, config_text, env, igdt_argv, ours

pytestmark = pytest.mark.lab


def _run_game(lab: Lab, cfg: Path, state: Path, marker: Path) -> None:
    marker.unlink(missing_ok=True)
    p = lab.popen(lab.lan, igdt_argv("run", "--config", str(cfg), "--rule", "game", "--",
                                     "sh", "-c", f"touch {marker}; sleep 1.5; exit 5"),
                  env={**env(), "IGDTRIGGER_STATE_DIR": str(state)}, cwd=ROOT,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker.exists, 30, "the game to start")
    wait_for(lambda: len(ours(lab)) == 4, 10, "the rule's four mappings")
    assert p.wait(30) == 5
    assert not ours(lab)


def test_a_standalone_run_remembers_the_router_it_discovered(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "config.toml"
    cfg.write_text(config_text(lab, state, url=""))  # no [gateway] url: SSDP
    memory = state / "router-location"
    _run_game(lab, cfg, state, tmp_path / "started")
    assert memory.read_text().strip() == lab.igd_url
    _run_game(lab, cfg, state, tmp_path / "started")  # asked first this time
    # the router restarted on another port: the remembered URL fails, discovery runs at once
    memory.write_text(f"http://{ROUTER_LAN_IP}:1/rootDesc.xml\n")
    _run_game(lab, cfg, state, tmp_path / "started")
    assert memory.read_text().strip() == lab.igd_url
