"""`igdtrigger run` edge cases from issue 13: a missing command ends the activation once and
says nothing false; `--wait-process` follows the command's own descendants first."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.cli import child as wrapper
from igdtrigger.cli.child import ProcessWaiter

from .test_wrapper import api_get, igdt, service  # noqa: F401 (the fixture)


def test_missing_command_ends_the_activation_once_without_a_false_lapse(
        service: tuple[str, Path]) -> None:  # noqa: F811
    url, cfg = service
    p = igdt("run", "--config", str(cfg), "--server", url, "--rule", "demo", "--",
             "/nonexistent/game")
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 127, err
    assert "cannot run" in err
    assert "lapses" not in err and "could not end" not in err
    assert api_get(f"{url}/api/v1/activations")["activations"] == []


def _waiter(results: list[tuple[set[str], set[str]]], warnings: list[str],
            monkeypatch: pytest.MonkeyPatch) -> ProcessWaiter:
    it = iter(results)
    monkeypatch.setattr(wrapper, "_warn", warnings.append)
    return ProcessWaiter(["game"], 5, scan=lambda m: set(), family=lambda m: next(it))


def test_wait_process_prefers_the_commands_descendants(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    w = _waiter([({"game"}, {"game"}), (set(), {"game"})], warnings, monkeypatch)
    assert w.running() == {"game"}
    # ours exited; another user's "game" keeps running: that one does not hold our ports
    assert w.running() == set()
    assert warnings == []


def test_wait_process_falls_back_to_the_name_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    w = _waiter([(set(), {"game"}), (set(), {"game"}), (set(), set())], warnings, monkeypatch)
    assert w.running() == {"game"}
    assert w.running() == {"game"}
    assert w.running() == set()
    assert len(warnings) == 1 and "not as a child of the command" in warnings[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs and a subreaper")
def test_a_game_left_behind_by_its_launcher_stub_still_holds_the_ports(
        service: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    url, cfg = service
    # a name no other process on the machine has (a machine-wide `sleep` would be found by the
    # name fallback and make the test depend on what else runs)
    game = tmp_path / f"game{os.getpid()}"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", game)
    stub = tmp_path / "stub.sh"  # starts the "game" in the background and exits at once
    stub.write_text(f"#!/bin/sh\n{game} 3 &\nexit 0\n")
    stub.chmod(0o755)
    started = time.monotonic()
    p = igdt("run", "--config", str(cfg), "--server", url, "--rule", "demo",
             "--wait-process", game.name, "--wait-start", "5", "--", str(stub))
    acts: list[Any] = []
    while p.poll() is None and time.monotonic() - started < 2:
        acts = api_get(f"{url}/api/v1/activations")["activations"]
        time.sleep(0.2)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert time.monotonic() - started >= 2.5  # held until sleep exited
    assert [a["rule"] for a in acts] == ["demo"]
    assert f"holding the ports while {game.name} runs" in err
    assert "not as a child" not in err  # found as our descendant (re-parented to us)


def test_scan_family_follows_parent_links_and_skips_zombies(tmp_path: Path) -> None:
    from igdtrigger.detect.process import Matcher, scan_family

    def proc(pid: int, comm: str, ppid: int, state: str = "S") -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} ({comm}) {state} {ppid} 1 1 0 -1\n")
        (d / "cmdline").write_bytes(comm.encode() + b"\0")

    proc(100, "wrapper", 1)
    proc(101, "launcher", 100)
    proc(102, "game", 101)        # ours, two levels down
    proc(200, "game", 1)          # someone else's
    proc(300, "other", 100)
    proc(301, "game", 300, "Z")   # ours but exited
    assert scan_family(Matcher(["game"]), 100, str(tmp_path)) == ({"game"}, {"game"})
    assert scan_family(Matcher(["game"]), 300, str(tmp_path)) == (set(), {"game"})
