"""`igdtrigger run`: the child's status and signals pass through; the game starts even when
no service and no router answer (fail open); an unknown rule stops before launching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

DEAD_ROUTER = """
[gateway]
url = "http://127.0.0.1:9/rootDesc.xml"

[api]
listen = "127.0.0.1:9"

[[rules]]
name = "demo"
open = ["udp/40000"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(DEAD_ROUTER)
    return p


def igdt(*args: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(kw.pop("state", "/nonexistent"))}
    return subprocess.Popen([sys.executable, "-m", "igdtrigger", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_code_passes_through(config: Path, code: int) -> None:
    p = igdt("run", "--config", str(config), "--rule", "demo", "--", sys.executable, "-c",
             f"import sys; print('child ran'); sys.exit({code})")
    out, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    assert "child ran" in out
    assert "router unavailable" in err or "could not open ports" in err  # said, not fatal


def test_signal_death_is_128_plus_n(config: Path) -> None:
    p = igdt("run", "--config", str(config), "--rule", "demo", "--", sys.executable, "-c",
             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_sent_to_wrapper_reach_the_child(config: Path, tmp_path: Path,
                                                 sig: signal.Signals) -> None:
    marker = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal({int(sig)}, lambda n, f: (print('got', n, flush=True), sys.exit(42)))\n"
        f"pathlib.Path({str(marker)!r}).write_text('x')\n"
        "time.sleep(30)\n"
        "sys.exit(7)\n"
    )
    p = igdt("run", "--config", str(config), "--rule", "demo", "--", sys.executable, "-c", child)
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, "child never started"
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert f"got {int(sig)}" in out, err
    assert p.returncode == 42


def test_unknown_rule_stops_before_launch(config: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    p = igdt("run", "--config", str(config), "--rule", "nope", "--", "touch", str(marker))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2
    assert "unknown rule 'nope'" in err
    assert not marker.exists()


def test_missing_command_is_usage_error(config: Path) -> None:
    p = igdt("run", "--config", str(config), "--rule", "demo", "--")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2
    assert "no command to run" in err


def test_command_not_found_is_127(config: Path) -> None:
    p = igdt("run", "--config", str(config), "--rule", "demo", "--", "/nonexistent/game")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 127
    assert "cannot run" in err


def test_bad_config_value_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "x"\nopen = ["udp/70000"]\n')
    p = igdt("activate", "x", "--config", str(bad))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2
    assert err.strip().count("\n") == 0
    assert "rules[0].open[0]" in err and "70000" in err


def test_client_commands_without_service_say_so(tmp_path: Path) -> None:
    p = igdt("status", "--server", "http://127.0.0.1:9")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 3
    assert "no igdtrigger service at http://127.0.0.1:9" in err
