"""`igdtrigger run`'s quick way to a running service (issue 17): the activation request goes to
the service's admin socket before the config is validated; what a user sees is unchanged
(the child's status, the ports in its environment, an unknown rule stops before launching) and
a broken config is still one clear line while the game starts with the service's rule."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from igdtrigger import paths
from igdtrigger.cli import entry
from tests.fakes import free_port, wait_ready
from tests.test_wrapper import (  # noqa: F401 - service: a fixture
    DEAD_ROUTER,
    ROOT,
    SERVICE_CONFIG,
    SHOW_ACTIVATION,
    api_get,
    igdt,
    service,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture
def admin_service(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """`igdtrigger serve` (simulated router) with its state, and so its admin socket, in
    ``tmp_path/state``; yields (URL, its config, its state directory)."""
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "service.toml"
    cfg.write_text(SERVICE_CONFIG.format(port=port) + f'\n[service]\nstate_dir = "{state}"\n')
    ready = tmp_path / "ready"
    p = igdt("serve", "--config", str(cfg), "--ready-file", str(ready), state=state)
    wait_ready(p, ready, why=p.communicate)
    try:
        assert (state / paths.ADMIN_SOCKET).exists()
        yield f"http://127.0.0.1:{port}", cfg, state
    finally:
        p.send_signal(15)
        p.communicate(timeout=20)


def test_a_broken_config_still_asks_the_service_by_rule_name(
        admin_service: tuple[str, Path, Path], tmp_path: Path) -> None:
    url, _, state = admin_service
    broken = tmp_path / "broken.toml"
    broken.write_text(f'[service]\nstate_dir = "{state}"\n\n'
                      '[[rules]]\nname = "demo"\nopen = ["udp/70000"]\n')
    p = igdt("run", "--config", str(broken), "--rule", "demo", "--", sys.executable, "-c",
             SHOW_ACTIVATION)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, err  # the game ran; its status passes through
    assert "Traceback" not in err
    assert f"{broken}: rules[0].open[0]" in err and "70000" in err  # what is wrong, named
    act_id, ports = out.split()
    assert ports == "udp/40000,udp/40001"  # the service's rule, asked for by its name
    events = api_get(f"{url}/api/v1/status")["events"]
    mine = [e for e in events if e.get("activation") == act_id]
    assert [e["event"] for e in mine] == ["activated", "deactivated"]
    assert mine[0]["source"] == "run"
    assert api_get(f"{url}/api/v1/activations")["activations"] == []


def test_the_quick_way_keeps_status_and_the_unknown_rule_stop(
        admin_service: tuple[str, Path, Path], tmp_path: Path) -> None:
    url, cfg, _ = admin_service
    p = igdt("run", "--config", str(cfg), "--rule", "demo", "--", sys.executable, "-c",
             SHOW_ACTIVATION)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    assert out.split()[1] == "udp/40000,udp/40001"
    assert "udp/40000-40001 open" in err
    marker = tmp_path / "ran"
    p = igdt("run", "--config", str(cfg), "--rule", "nope", "--", "touch", str(marker))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2
    assert "nope" in err and "Traceback" not in err
    assert not marker.exists()
    assert api_get(f"{url}/api/v1/activations")["activations"] == []


class _FakeSocket:
    """A Unix socket in ``directory`` (owned by us) that keeps what one client writes."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.path = directory / paths.ADMIN_SOCKET
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(1)
        self.got = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:  # closed: nobody connected
            return
        with conn:
            while b"\r\n\r\n" not in self.got or len(self.got.partition(b"\r\n\r\n")[2]) < int(
                    self.got.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                self.got += chunk
            body = b'{"id": "x"}'
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))

    def close(self) -> None:
        self.server.close()


def test_the_quick_request_is_the_clients_request(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IGDTRIGGER_SERVER", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[api]\nlisten = "127.0.0.1:9"\n')
    fake = _FakeSocket(tmp_path / "state")
    try:
        sent = entry.presend(["run", "--config", str(cfg), "--rule", "cs2.x", "--", "game"])
        assert sent is not None
        fake.thread.join(10)
        sent.close()
    finally:
        fake.close()
    body = {"rule": "cs2.x", "ttl": 30.0, "source": "run", "meta": {"pid": str(os.getpid())}}
    # byte for byte what the API client writes for the same activation (cli/client.py)
    assert fake.got == entry.request_bytes(
        "POST", "/api/v1/activations", "localhost",
        {"Accept": "application/json", "Connection": "close",
         "Content-Type": "application/json"}, json.dumps(body).encode())
    assert sent.path == str(fake.path)


@pytest.mark.parametrize(("argv", "env", "config"), [
    (["--server", "http://127.0.0.1:9"], {}, ""),
    (["--ttl", "60"], {}, ""),
    (["--token", "t"], {}, ""),
    ([], {"IGDTRIGGER_SERVER": "http://127.0.0.1:9"}, ""),
    ([], {}, '[api]\nlisten = "0.0.0.0:8731"\n'),  # a service for the LAN: token, zeroconf
    ([], {"IGDTRIGGER_API__LISTEN": "192.168.1.2:8731"}, ""),
    ([], {}, "<missing>"),  # the full way says which file is missing
    ([], {}, "<directory>"),
])
def test_the_quick_way_leaves_the_rest_to_the_full_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str],
        config: str) -> None:
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IGDTRIGGER_SERVER", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "c.toml"
    if config == "<directory>":
        cfg.mkdir()
    elif config != "<missing>":
        cfg.write_text(config)
    fake = _FakeSocket(tmp_path / "state")
    try:
        assert entry.presend(["run", "--config", str(cfg), *argv, "--rule", "demo", "--",
                              "game"]) is None
    finally:
        fake.close()


@pytest.mark.parametrize("argv", [
    ["run", "--rule", "demo"],  # no command
    ["run", "--rule", "de mo", "--", "g"],  # not a rule name
    ["run", "--rule", "x" * 41, "--", "g"],
    ["run", "--infer", "steam", "--", "g"],
    ["run", "--rule", "demo", "--wait-process", "x", "--", "g"],
])
def test_the_quick_way_declines_what_it_does_not_parse(argv: list[str]) -> None:
    assert entry.presend(argv) is None


TOMLS = [
    "",
    '[api]\nlisten = "127.0.0.1:9"\n',
    '[api]\nlisten="127.0.0.1:9" # here\n[service]\nstate_dir = \'/srv/x\'\n',
    'api.listen = "127.0.0.1:1"\n',
    'api = { listen = "127.0.0.1:1" }\n',
    '[api]\nallow = [\n  "192.168.1.0/24",\n]\nlisten = "127.0.0.1:2"\n',
    '[[rules]]\nname = "x"\nopen = [\n "udp/1",\n]\n[api]\nlisten = "127.0.0.1:3"\n',
    '[api]\nlisten = "127.0.0.1:\\u0034"\n',
    '[ api ]\nlisten = "127.0.0.1:5"\n',
    '["api"]\nlisten = "127.0.0.1:6"\n',
    '[api.x]\ny = 1\n[api]\nlisten = "127.0.0.1:7"\n',
    '[gateway]\nurl = "http://r/x.xml"\n[service]\nstate_dir = "/s"\n',
    '[api]\nx = [[1],\n[2]]\nlisten = "127.0.0.1:8"\n',
    '[api]\nlisten = 5\n',
    '[rules]\ntext = """\n[api]\nlisten = "no"\n"""\n',
    '[api]\nzeroconf = true\nrate_limit = 5\nlisten = \'127.0.0.1:9\'\n[detect]\nmethods = []\n',
    '[api]\nallowed_hosts = ["a", "b"]\nlisten = "127.0.0.1:10"\n',
    '[api]\n"listen" = "127.0.0.1:11"\n',
    '[service]\nstate_dir = "/a"\n[api]\nlisten = "127.0.0.1:12"\n[service.x]\n',
]


@pytest.mark.parametrize("text", TOMLS)
def test_the_quick_config_reading_agrees_with_tomllib_or_abstains(text: str) -> None:
    found = paths.service_location(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # invalid TOML: the full way reports it, whatever was read here
    want = (data.get("api", {}).get("listen"), data.get("service", {}).get("state_dir"))
    assert found is None or found == want


def test_isolation_switch_keeps_the_system_state_dir_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """IGDTRIGGER_STATE_DIR (tests set it): a root service's /var/lib/igdtrigger socket and
    token are not looked at (a running `serve --simulate` made test_wrapper.py fail)."""
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", "/nonexistent")
    assert paths.state_dirs("/cfg") == ["/cfg", "/nonexistent"]
    monkeypatch.delenv("IGDTRIGGER_STATE_DIR")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert paths.state_dirs(None)[-1] == paths.SYSTEM_STATE_DIR


@pytest.mark.parametrize("argv", [
    ["run", "--rule", "demo", "--", "game"],
    ["run", "--config", "/x.toml", "--rule", "demo", "--", "game", "--fullscreen", "-w"],
    ["run", "--config=/x.toml", "--rule=cs2", "-q", "--", "g"],
    ["run", "--quiet", "--rule", "a", "--rule", "b", "--config", "", "--", "g", "--"],
    ["run", "--rule", "demo", "--", "--rule"],
])
def test_the_entry_points_reading_is_the_parsers(argv: list[str]) -> None:
    from igdtrigger.cli.main import build_parser, quick_args

    quick = entry.parse_run(argv)
    assert quick is not None
    assert vars(quick_args(quick)) == vars(build_parser("run").parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["run", "--rule", "demo"],
    ["run", "--rule", "", "--", "g"],
    ["run", "--rule", "--", "g"],
    ["run", "--config", "--rule", "x", "--", "g"],
    ["run", "--conf", "x", "--rule", "demo", "--", "g"],
    ["run", "--rule", "demo", "--ttl", "5", "--", "g"],
    ["run", "--rule", "demo", "game"],
    ["status"],
])
def test_the_entry_point_leaves_other_command_lines_to_the_parser(argv: list[str]) -> None:
    assert entry.parse_run(argv) is None


def test_a_standalone_run_that_finds_no_router_leaves_no_journal(tmp_path: Path) -> None:
    """The journal opens while the router is asked (issue 17): when none answers, nothing of
    it stays behind, and the game's status passes through."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(DEAD_ROUTER + f'\n[service]\nstate_dir = "{state}"\n')
    p = igdt("run", "--config", str(cfg), "--rule", "demo", "--", sys.executable, "-c",
             "import sys; sys.exit(9)", state=state)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 9, err
    assert "router unavailable" in err
    assert not [p for p in state.rglob("*") if p.is_file()]


class _FakeTcp(_FakeSocket):
    """The same on a loopback TCP port."""

    def __init__(self) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.got = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

def _no_token(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    """This user's state dir is ``state``; no server or token from the environment."""
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(state))
    monkeypatch.delenv("IGDTRIGGER_SERVER", raising=False)
    monkeypatch.delenv("IGDTRIGGER_TOKEN", raising=False)


def _presend_over_tcp(tmp_path: Path) -> tuple[_FakeTcp, entry.Presend]:
    """A config naming a fake loopback service; the quick request it got (``got``) and what
    ``presend`` answered (asserted not None: the quick way was taken)."""
    fake = _FakeTcp()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[api]\nlisten = "127.0.0.1:{fake.port}"\n')
    try:
        sent = entry.presend(["run", "--config", str(cfg), "--rule", "demo", "--", "game"])
        assert sent is not None
        fake.thread.join(10)
        sent.close()
    finally:
        fake.close()
    return fake, sent


def test_a_loopback_service_is_asked_without_a_token(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The service runs as another user (its admin socket and token are not this user's): the
    request goes to its loopback address as the API client would write it, no token."""
    _no_token(monkeypatch, tmp_path / "state")
    fake, sent = _presend_over_tcp(tmp_path)
    body = {"rule": "demo", "ttl": 30.0, "source": "run", "meta": {"pid": str(os.getpid())}}
    assert fake.got == entry.request_bytes(
        "POST", "/api/v1/activations", f"127.0.0.1:{fake.port}",
        {"Accept": "application/json", "Connection": "close",
         "Content-Type": "application/json"}, json.dumps(body).encode())
    assert b"Authorization" not in fake.got
    assert (sent.path, sent.url) == (None, f"http://127.0.0.1:{fake.port}")


@pytest.mark.parametrize("token_from", ["file", "environment"])
def test_a_token_holder_takes_the_full_way_over_tcp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_from: str) -> None:
    """A token is sent only after the full way checked who listens: the quick way never
    writes to TCP for a user holding one."""
    state = tmp_path / "state"
    state.mkdir()
    _no_token(monkeypatch, state)
    if token_from == "file":
        (state / "api-token").write_text("secret\n")
    else:
        monkeypatch.setenv("IGDTRIGGER_TOKEN", "secret")
    fake = _FakeTcp()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[api]\nlisten = "127.0.0.1:{fake.port}"\n')
    try:
        assert entry.presend(["run", "--config", str(cfg), "--rule", "demo", "--", "g"]) is None
    finally:
        fake.close()


def test_the_quick_way_over_tcp_keeps_what_a_user_sees(
        service: tuple[str, Path]) -> None:  # noqa: F811 - the fixture, imported above
    """Against a real service (simulated router) reached on loopback without a token: the
    game's status and its ports pass through; the activation ends with the game."""
    url, cfg = service
    p = igdt("run", "--config", str(cfg), "--rule", "demo", "--", sys.executable, "-c",
             SHOW_ACTIVATION)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    act_id, ports = out.split()
    assert ports == "udp/40000,udp/40001"
    events = [e for e in api_get(f"{url}/api/v1/status")["events"]
              if e.get("activation") == act_id]
    assert [e["event"] for e in events] == ["activated", "deactivated"]


def test_a_stale_admin_socket_falls_back_to_loopback(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed service's socket file is left behind: the request goes to the loopback API of
    the service running now, as the full way's client would fall back."""
    state = tmp_path / "state"
    state.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(state / paths.ADMIN_SOCKET))
    stale.close()
    _no_token(monkeypatch, state)
    fake, sent = _presend_over_tcp(tmp_path)
    assert fake.got.startswith(b"POST /api/v1/activations HTTP/1.1\r\nHost: 127.0.0.1:")
    assert sent.url == f"http://127.0.0.1:{fake.port}"


def test_the_quick_request_leaves_before_the_heavy_modules_load(tmp_path: Path) -> None:
    """What the request waits for is the interpreter, the entry module, its config reading and
    a socket: no dataclasses, typing, tomllib, argparse, json, config or core module (those
    were ~35 ms of a launcher hook's start-up; issue 17)."""
    fake = _FakeSocket(tmp_path / "state")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[api]\nlisten = "127.0.0.1:9"\n[[rules]]\nname = "demo"\nopen = ["udp/1"]\n')
    heavy = ("dataclasses", "typing", "tomllib", "argparse", "json", "socket", "re", "enum",
             "igdtrigger.config", "igdtrigger.core", "igdtrigger.cli.main",
             "igdtrigger.cli.client")
    code = ("import sys\nfrom igdtrigger.cli import entry\n"
            f"sent = entry.presend(['run', '--config', {str(cfg)!r}, '--rule', 'demo', '--', "
            "'game'])\n"
            f"print(sent is not None, sorted(m for m in {heavy!r} if m in sys.modules))\n")
    try:
        p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                           timeout=60, cwd=str(ROOT), env={
                               **os.environ, "PYTHONPATH": str(ROOT),
                               "IGDTRIGGER_STATE_DIR": str(tmp_path / "state")})
        fake.thread.join(10)
    finally:
        fake.close()
    assert p.stdout.split(maxsplit=1) == ["True", "[]\n"], p.stdout + p.stderr
    assert fake.got.startswith(b"POST /api/v1/activations HTTP/1.1\r\n")


def test_the_entry_points_defaults_are_the_configs() -> None:
    from igdtrigger.cli.main import build_parser
    from igdtrigger.config import MAX_CONFIG_BYTES
    from igdtrigger.core.settings import DEFAULT_LISTEN

    assert entry._DEFAULT_LISTEN == DEFAULT_LISTEN
    assert entry._MAX_CONFIG == MAX_CONFIG_BYTES
    assert build_parser("run").parse_args(["run", "--rule", "x", "--", "g"]).ttl == entry._TTL
    assert entry._loopback("127.0.0.1:0080") == (socket.AF_INET, ("127.0.0.1", 80), "127.0.0.1")
    assert entry._loopback("[::1]:8731") == (socket.AF_INET6, ("::1", 8731), "[::1]:8731")
    assert entry._loopback("0.0.0.0:8731") is None
    assert entry._loopback("localhost:8731") is None  # resolved by the full way
