"""`igdtrigger run`: the child's status and signals pass through; the game starts even when
no service and no router answer (fail open); an unknown rule stops before launching."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.core.errors import ConfigError
from tests.fakes import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent

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


def igdt(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(kw.pop("state", "/nonexistent")),
           **kw.pop("env_extra", {})}
    return subprocess.Popen([sys.executable, "-m", "igdtrigger", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


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


def signal_reaches_child(argv: list[str], tmp_path: Path, sig: signal.Signals) -> None:
    """Start ``argv + [child]``, send ``sig`` to the wrapper: the child must get it."""
    marker = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal({int(sig)}, lambda n, f: (print('got', n, flush=True), sys.exit(42)))\n"
        f"pathlib.Path({str(marker)!r}).write_text('x')\n"
        "time.sleep(30)\n"
        "sys.exit(7)\n"
    )
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": "/nonexistent"}
    p = subprocess.Popen([*argv, sys.executable, "-c", child], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, "child never started"
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert f"got {int(sig)}" in out, err
    assert p.returncode == 42


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,
                                 signal.SIGPWR])
def test_signals_sent_to_wrapper_reach_the_child(config: Path, tmp_path: Path,
                                                 sig: signal.Signals) -> None:
    signal_reaches_child([sys.executable, "-m", "igdtrigger", "run", "--config", str(config),
                          "--rule", "demo", "--"], tmp_path, sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_signals_reach_the_child_without_sigtimedwait(config: Path, tmp_path: Path,
                                                      sig: signal.Signals) -> None:
    """macOS has no sigtimedwait: plain handlers forward what was sent to the wrapper."""
    as_on_macos = ("import sys, igdtrigger.cli.child as c; c.SIGTIMEDWAIT = False; "
                   "from igdtrigger.cli.main import main; sys.exit(main(sys.argv[1:]))")
    signal_reaches_child([sys.executable, "-c", as_on_macos, "run", "--config", str(config),
                          "--rule", "demo", "--"], tmp_path, sig)


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


# --- --infer and the launcher hooks, against a running service (simulated router) -------------

SERVICE_CONFIG = """
[gateway]
url = "simulate"

[api]
listen = "127.0.0.1:{port}"

[detect]
methods = []

[[rules]]
name = "demo"
open = ["udp/40000-40001"]

[[rules]]
name = "quake-champions"
open = ["udp/40005"]

[launchers]
"steam:730" = "demo"
"""

SHOW_ACTIVATION = ("import os, sys; print(os.environ.get('IGDTRIGGER_ACTIVATION', '-'), "
                   "os.environ.get('IGDTRIGGER_PORTS', '-')); sys.exit(7)")



@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`igdtrigger serve` with a simulated router; yields (URL, config path)."""
    port = free_port()
    cfg = tmp_path / "service.toml"
    cfg.write_text(SERVICE_CONFIG.format(port=port))
    ready = tmp_path / "ready"
    p = igdt("serve", "--config", str(cfg), "--ready-file", str(ready), state=tmp_path / "state")
    wait_ready(p, ready, why=p.communicate)
    try:
        yield f"http://127.0.0.1:{port}", cfg
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)


def api_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_infer_steam_maps_the_app_id_to_a_rule(service: tuple[str, Path]) -> None:
    url, cfg = service
    p = igdt("run", "--config", str(cfg), "--infer", "steam", "--", sys.executable, "-c",
             SHOW_ACTIVATION, env_extra={"SteamAppId": "730"})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    act_id, ports = out.split()
    assert ports == "udp/40000,udp/40001"
    events = api_get(f"{url}/api/v1/status")["events"]
    mine = [e for e in events if e.get("activation") == act_id]
    assert [e["event"] for e in mine] == ["activated", "deactivated"]
    assert mine[0]["rule"] == "demo" and mine[0]["source"] == "run"
    assert api_get(f"{url}/api/v1/activations")["activations"] == []


def test_infer_lutris_uses_a_rule_named_like_the_game(service: tuple[str, Path]) -> None:
    _, cfg = service
    p = igdt("run", "--config", str(cfg), "--infer", "lutris", "--", sys.executable, "-c",
             SHOW_ACTIVATION, env_extra={"GAME_NAME": "Quake Champions"})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    assert out.split()[1] == "udp/40005"


@pytest.mark.parametrize(("launcher", "env_extra", "warning"), [
    ("steam", {}, "none of SteamAppId, SteamGameId is set"),
    ("heroic", {"HEROIC_APP_NAME": "Fortnite"}, 'add [launchers] "heroic:Fortnite"'),
])
def test_infer_fails_open(service: tuple[str, Path], launcher: str, env_extra: dict[str, str],
                          warning: str) -> None:
    url, cfg = service
    p = igdt("run", "--config", str(cfg), "--infer", launcher, "--", sys.executable, "-c",
             SHOW_ACTIVATION, env_extra=env_extra)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7  # the game ran, with nothing opened
    assert out.split() == ["-", "-"]
    assert warning in err
    assert api_get(f"{url}/api/v1/activations")["activations"] == []


def test_infer_rule_resolution() -> None:
    from igdtrigger.cli.run import infer_rule, slug
    from igdtrigger.config import parse_config

    cfg = parse_config({"rules": [{"name": "demo", "open": ["udp/40000"]},
                                  {"name": "730", "open": ["udp/40001"]}],
                        "launchers": {"steam:440": "demo", "heroic:Some Game": "demo"}})
    assert infer_rule("steam", cfg, {"SteamAppId": "440"}) == "demo"
    assert infer_rule("steam", cfg, {"SteamGameId": "730"}) == "730"  # a rule of that name
    assert infer_rule("heroic", cfg, {"HEROIC_APP_NAME": "Some Game"}) == "demo"
    assert infer_rule("steam", cfg, {"SteamAppId": "999"}) is None  # unknown here: warn
    # no local rules (the service has them): the name as it is, slugged
    assert infer_rule("lutris", parse_config({}), {"GAME_NAME": "Quake: Champions!"}) == \
        "quake-champions"
    assert slug("  Call of Duty®: MW III  ") == "call-of-duty-mw-iii"
    assert len(slug("x" * 100)) == 40


def test_launchers_config_is_validated() -> None:
    from igdtrigger.config import parse_config

    rules = [{"name": "demo", "open": ["udp/40000"]}]
    with pytest.raises(ConfigError, match=r"launchers.origin:1: key 'origin:1' must be"):
        parse_config({"rules": rules, "launchers": {"origin:1": "demo"}}, source="c.toml")
    with pytest.raises(ConfigError, match=r"launchers.steam:1: 'nope' is not a configured rule"):
        parse_config({"rules": rules, "launchers": {"steam:1": "nope"}}, source="c.toml")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_shell_wrapper_holds_ports_while_the_command_runs(service: tuple[str, Path],
                                                          tmp_path: Path) -> None:
    url, _ = service
    script = ROOT / "examples" / "hooks" / "igdtrigger-wrap.sh"
    child = (
        "import json, os, sys, urllib.request\n"
        f"acts = json.load(urllib.request.urlopen({url!r} + '/api/v1/activations'))\n"
        "print([a['rule'] for a in acts['activations']], os.environ['IGDTRIGGER_ACTIVATION'])\n"
        "sys.exit(5)\n"
    )
    env = {**os.environ, "IGDTRIGGER_SERVER": url, "IGDTRIGGER_TTL": "6"}
    r = subprocess.run(["sh", str(script), "demo", "--", sys.executable, "-c", child], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 5, r.stderr
    rules, act_id = r.stdout.rsplit(" ", 1)
    assert rules == "['demo']" and act_id.strip()
    assert api_get(f"{url}/api/v1/activations")["activations"] == []  # ended on exit
    # a signal to the wrapper reaches the command; its status comes back
    marker = tmp_path / "started"
    sleeper = ("import pathlib, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
               f"pathlib.Path({str(marker)!r}).touch()\n"
               "time.sleep(30)\n")
    p = subprocess.Popen(["sh", str(script), "demo", sys.executable, "-c", sleeper], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_ready(p, marker, why=p.communicate)
    assert len(api_get(f"{url}/api/v1/activations")["activations"]) == 1
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=20)
    assert p.returncode == 42
    assert api_get(f"{url}/api/v1/activations")["activations"] == []
    # fail open: no service
    r = subprocess.run(["sh", str(script), "demo", "--", "true"], capture_output=True, text=True,
                       env={**env, "IGDTRIGGER_SERVER": "http://127.0.0.1:9"}, timeout=30)
    assert r.returncode == 0 and "running without open ports" in r.stderr


def test_ports_env_names_granted_external_ports() -> None:
    from igdtrigger.cli.run import ports_env

    act = {"ports": [
        {"port": "udp/40000", "state": "active", "external_port": 40000},
        {"port": "udp/40001", "state": "active", "external_port": 51234},
        {"port": "tcp/3074", "state": "held", "held_by": "192.168.1.5"},
        {"port": "tcp/3075", "state": "conflict"},
    ]}
    assert ports_env(act) == "udp/40000,udp/40001=51234"


# --- a service that is slow or away: the game starts anyway, the ports follow ----------------

class _SlowService:
    """A stand-in igdtrigger API whose first activation answer comes only after ``delay`` s
    (an overloaded service): records every request it saw."""

    def __init__(self, delay: float) -> None:
        import http.server
        import threading

        outer = self
        self.seen: list[str] = []
        self.delay = delay
        self.second_post = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up on the slow answer
                    pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen.append(f"POST {self.path}")
                if self.path == "/api/v1/activations":
                    n = outer.seen.count("POST /api/v1/activations")
                    if n == 1:
                        time.sleep(outer.delay)
                    else:
                        outer.second_post.set()
                    self._answer(201, {"id": f"a{n}", "state": "open", "ports": [
                        {"port": "udp/40000", "state": "active", "external_port": 40000}]})
                else:
                    self._answer(200, {"id": "a2", "state": "open", "ports": []})

            def do_DELETE(self) -> None:
                outer.seen.append(f"DELETE {self.path}")
                self._answer(200, {"id": self.path.rsplit("/", 1)[-1], "state": "ended"})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_busy_service_the_game_starts_and_the_ports_open_when_it_answers(
        tmp_path: Path) -> None:
    svc = _SlowService(delay=6.0)
    marker = tmp_path / "second-post"
    # the game starts while the first answer is still pending, and runs until the wrapper's
    # retry got its activation; what it saw at start goes to stdout
    child = ("import os, pathlib, sys, time\n"
             "print(os.environ.get('IGDTRIGGER_ACTIVATION', '-'), flush=True)\n"
             f"p = pathlib.Path({str(marker)!r})\n"
             "deadline = time.monotonic() + 20\n"
             "while not p.exists() and time.monotonic() < deadline: time.sleep(0.05)\n"
             "sys.exit(7)\n")
    try:
        p = igdt("run", "--server", svc.url, "--token", "t", "--rule", "demo", "--",
                 sys.executable, "-c", child)
        assert svc.second_post.wait(20), (svc.seen, p.poll())
        marker.touch()
        out, err = p.communicate(timeout=30)
    finally:
        svc.close()
    assert p.returncode == 7, err
    assert out.split() == ["-"]  # it started before any activation existed
    assert "did not answer within 2s" in err and "starting without open ports" in err
    assert "the service answered: udp/40000 open on the router for this PC while the game " \
        "runs" in err
    assert "DELETE /api/v1/activations/a2" in svc.seen  # the late activation ended on exit


def test_rule_kept_on_the_service_and_service_away_the_game_still_runs(tmp_path: Path) -> None:
    """A PC whose rules live on the home server: the server being away must not stop the
    game (an unknown rule stops it only where this machine has rules of its own)."""
    empty = tmp_path / "client.toml"
    empty.write_text("")
    marker = tmp_path / "ran"
    p = igdt("run", "--config", str(empty), "--server", "http://127.0.0.1:9", "--rule",
             "lan-party", "--", sys.executable, "-c",
             f"import pathlib, sys; pathlib.Path({str(marker)!r}).touch(); sys.exit(9)")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 9, err
    assert marker.exists()
    assert "no igdtrigger service at http://127.0.0.1:9" in err
    assert "no rule 'lan-party' in this machine's config either" in err
