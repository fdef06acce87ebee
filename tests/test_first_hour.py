"""Issue 15, the first hour with igdtrigger: what a new user meets on the command line, in the
demo and on a home server whose router is in secure mode."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.cli.main import DEMO_RULE, main
from igdtrigger.config import parse_config
from igdtrigger.runtime.mapper import Mapper
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway, free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"


# --- the command line ----------------------------------------------------------------------------

def test_no_arguments_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: igdtrigger") and "check-config" in out
    assert "serve --simulate" in out and "Python >= 3.11" in out
    assert "required: cmd" not in out + err


@pytest.fixture
def quiet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No config, no service, no zeroconf: every client command goes to a closed port."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IGDTRIGGER_SERVER", "http://127.0.0.1:9")
    monkeypatch.delenv("IGDTRIGGER_CONFIG", raising=False)
    monkeypatch.delenv("IGDTRIGGER_TOKEN", raising=False)
    return tmp_path


def _hostile(tmp: Path) -> list[tuple[list[str], str]]:
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("[[rules]\nname = 'x'\n")
    bad_value = tmp / "value.toml"
    bad_value.write_text('[[rules]]\nname = "x"\nopen = ["udp/0"]\n')
    fifo = tmp / "fifo.toml"  # no writer: reading it would block for ever
    os.mkfifo(fifo)
    binary = tmp / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    long_host = "h" * 300
    return [
        (["status", "--server", "   "], "'   '"),
        (["status", "--server", f"http://{long_host}:8731"], long_host),
        (["status", "--server", "unix:/run/igdtrigger.sock"], "unix:/run/igdtrigger.sock"),
        (["status", "--server", "http://a b:8731"], "http://a b:8731"),
        (["status", "--timeout", "99999999999999999999"], "'99999999999999999999'"),
        (["status", "--token", "jeton-\u00e9\U0001f3ae"], "--token"),
        (["status", "--token", "a\nb"], "--token"),
        (["activate", "demo", "--for", "8d"], "'8d'"),
        (["activate", ""], "''"),
        (["deactivate", " "], "' '"),
        (["run", "--rule", "", "--", "true"], "''"),
        (["serve", "--config", ""], "''"),
        (["serve", "--listen", ""], "''"),
        (["serve", "--config", str(fifo)], str(fifo)),
        (["serve", "--config", str(binary)], "not UTF-8"),
        (["check-config", str(fifo)], "FIFO"),
        (["check-config", "/dev/zero"], "/dev/zero"),
        (["check-config", ""], "''"),
        (["gateway", "--config", str(fifo)], str(fifo)),
        (["doctor", "--timeout", "1e400"], "'1e400'"),
        (["status", "--timeout", "-1"], "'-1'"),
        (["status", "--timeout", "soon"], "'soon'"),
        (["status", "--server", "http://[bad"], "http://[bad"),
        (["status", "--server", "http://127.0.0.1:99999"], "99999"),
        (["status", "--server", "ftp://x"], "ftp://x"),
        (["status", "--bogus"], "--bogus"),
        (["activate", "demo", "--for", "0"], "'0'"),
        (["activate", "demo", "--for", "1h 0m x"], "'1h 0m x'"),
        (["activate", "demo", "--for", "30m1h"], "'30m1h'"),
        (["activate"], "name a RULE"),
        (["activate", "demo", "--open", "udp/1"], "not both"),
        (["activate", "demo", "--timeout", "-1"], "'-1'"),
        (["deactivate"], "rule"),
        (["deactivate", "demo", "--timeout", "x"], "'x'"),
        (["run", "--rule", "demo"], "no command to run"),
        (["run", "--rule", "demo", "--ttl", "-5", "--", "true"], "'-5'"),
        (["run", "--rule", "demo", "--wait-start", "never", "--", "true"], "'never'"),
        (["run", "--infer", "origin", "--", "true"], "'origin'"),
        (["run", "--", "true"], "--rule"),
        (["serve", "--listen", "nope"], "nope"),
        (["serve", "--listen", "127.0.0.1:70000"], "70000"),
        (["serve", "--config", str(tmp / "missing.toml")], "missing.toml"),
        (["serve", "--config", str(tmp)], str(tmp)),
        (["serve", "--config", str(bad_toml)], "invalid TOML"),
        (["serve", "--config", str(bad_value)], "udp/0"),
        (["serve", "--log-level", "loud"], "'loud'"),
        (["gateway", "--timeout", "-1"], "'-1'"),
        (["gateway", "--config", str(bad_value)], "udp/0"),
        (["healthcheck", "--timeout", "-1"], "'-1'"),
        (["doctor", "--timeout", "x"], "'x'"),
        (["check-config", str(tmp / "missing.toml")], "missing.toml"),
        (["check-config", str(bad_toml)], "invalid TOML"),
        (["check-config", str(bad_value)], "rules[0].open[0]"),
        (["check-config", "a", "b"], "arguments: b"),
        (["bogus"], "'bogus'"),
    ]


def test_every_subcommand_with_hostile_arguments(quiet_env: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A clear error naming the input, never a traceback, never a success."""
    for argv, named in _hostile(quiet_env):
        try:
            rc = main(argv)
        except SystemExit as exc:  # --help/--version only
            pytest.fail(f"{argv}: exited {exc.code}")
        out, err = capsys.readouterr()
        assert rc != 0, (argv, out, err)
        assert TRACEBACK not in out + err, argv
        assert err.startswith("igdtrigger: ") and named in err, (argv, err)
        assert err.count("\n") == 1, (argv, err)  # one line


@pytest.mark.parametrize(("name", "value", "named"), [
    ("IGDTRIGGER_API__LISTEN", "garbage", "IGDTRIGGER_API__LISTEN"),
    ("IGDTRIGGER_API__LISTEN", "", "IGDTRIGGER_API__LISTEN"),
    ("IGDTRIGGER_API__LISTEN", "\u00e9\U0001f3ae:1", "IGDTRIGGER_API__LISTEN"),
    ("IGDTRIGGER_GATEWAY__LEASE", "forever", "'forever'"),
    ("IGDTRIGGER_GATEWAY__LEASE", "-1", "IGDTRIGGER_GATEWAY__LEASE"),
    ("IGDTRIGGER_GATEWAY__URL", "ftp://x", "'ftp://x'"),
    ("IGDTRIGGER_API__PUBLIC_READ", "maybe", "'maybe'"),
    ("IGDTRIGGER_NOPE__X", "1", "IGDTRIGGER_NOPE__X"),
    ("IGDTRIGGER_CONFIG", "{tmp}", "{tmp}"),  # docker: a bind mount of a missing file
    ("IGDTRIGGER_CONFIG", "{fifo}", "FIFO"),
])
@pytest.mark.parametrize("cmd", [["check-config"], ["serve", "--simulate"], ["gateway"]])
def test_environment_garbage_is_one_clear_line(quiet_env: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], cmd: list[str],
                                               name: str, value: str, named: str) -> None:
    """A bad IGDTRIGGER_* variable stops the command before it touches anything, naming the
    variable or its value; IGDTRIGGER_CONFIG naming a directory or a FIFO is that config,
    refused (was: passed over for the defaults, or a read blocking for ever)."""
    fifo = quiet_env / "fifo"
    os.mkfifo(fifo)
    fill = {"tmp": str(quiet_env), "fifo": str(fifo)}
    monkeypatch.setenv(name, value.format(**fill))
    rc = main(cmd)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert TRACEBACK not in out + err
    assert err.startswith("igdtrigger: ") and named.format(**fill) in err, err
    assert err.count("\n") == 1, err


def test_conntrack_probe_with_loopback_down_cannot_tell() -> None:
    """serve in a network namespace whose loopback is down (a bare container) died with
    "igdtrigger: Network is unreachable": the conntrack probe's send is now 'cannot tell'."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a network namespace of its own")
    code = "from igdtrigger.detect.nfttrack import probe_events; print(probe_events(0.2))"
    p = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and p.stdout.strip() in ("None", "False"), p.stdout + p.stderr


def test_unreadable_config_directory_is_one_clear_line(tmp_path: Path) -> None:
    """IGDTRIGGER_CONFIG inside a directory this user may not enter (a container's /config
    volume owned by uid 1000, seen by root without CAP_DAC_OVERRIDE)."""
    locked = tmp_path / "config"
    locked.mkdir()
    (locked / "config.toml").write_text("")
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, needs setpriv to drop CAP_DAC_OVERRIDE")
        os.chown(locked, 1000, 1000)
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    locked.chmod(0o700 if os.geteuid() == 0 else 0)
    env = {**os.environ, "IGDTRIGGER_CONFIG": str(locked / "config.toml"),
           "IGDTRIGGER_STATE_DIR": str(locked), "IGDTRIGGER_SERVER": "http://127.0.0.1:9",
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(ROOT)}
    try:
        for argv in (["serve", "--simulate", "--listen", "127.0.0.1:9"], ["check-config"],
                     ["gateway", "--simulate"], ["doctor"],
                     ["run", "--rule", "demo", "--", "true"]):
            p = subprocess.run([*prefix, sys.executable, "-m", "igdtrigger", *argv], env=env,
                               capture_output=True, text=True, timeout=60)
            assert TRACEBACK not in p.stderr + p.stdout, (argv, p.stderr)
            if argv[0] in ("serve", "check-config", "gateway"):
                assert p.returncode == 2, (argv, p.stderr)
                assert str(locked) in p.stderr and "uid" in p.stderr, (argv, p.stderr)
    finally:
        locked.chmod(0o700)


def test_check_config_touches_no_network(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def no_network(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("check-config used the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert main(["check-config", str(ROOT / "examples" / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert "config.toml: ok" in out
    assert "rule demo: open udp/40000-40010, tcp/3074, udp/3074" in out
    for rule in sorted((ROOT / "examples" / "rules").glob("*.toml")):
        assert main(["check-config", str(rule)]) == 0, rule
    capsys.readouterr()


def test_gateway_obeys_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[gateway]\nurl = "simulate"\n')
    for argv in (["gateway", "--simulate"], ["gateway", "--config", str(cfg)]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "external 203.0.113.4" in out and "igdtrigger would use: upnp-igd" in out
        assert "double NAT" not in out  # the documentation address stands for a public one
        assert "pcp" not in out  # only the simulated router was asked


def test_without_miniupnpc_the_soap_client_does_the_job() -> None:
    """A platform where miniupnpc has no wheel (32-bit Raspberry Pi) and it is not installed."""
    code = ("import sys, json; sys.modules['miniupnpc'] = None\n"
            "from igdtrigger.cli.main import main\n"
            "sys.exit(main(['gateway', '--simulate', '--json']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert '"ok": true' in p.stdout and "igdtrigger-simulated" in p.stdout  # SOAP's server
    code = ("import sys; sys.modules['miniupnpc'] = None\n"
            "from igdtrigger.gateway.select import build_gateway\n"
            "build_gateway('http://127.0.0.1:9/x.xml', backend='miniupnpc')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert p.returncode != 0 and "miniupnpc is not installed" in p.stderr


STATUS: dict[str, Any] = {
    "version": "0.1.0", "instance": "abc123", "uptime": 75,
    "gateway": {"up": True, "protocol": "upnp-igd", "location": "http://192.168.1.1/x.xml",
                "external_address": "203.0.113.4", "local_address": "192.168.1.10"},
    "detectors": [], "warnings": [], "rules": [{"name": "factorio"}],
    "counts": {"mappings_active": 1},
    "activations": [{
        "id": "a1", "rule": "factorio", "host": "192.168.1.20", "state": "partial",
        "expires_in": 5400, "reason": "router_self_only",
        "message": "the router only lets a host map ports to itself (UPnP secure mode): ...",
        "ports": [{"port": f"udp/{p}", "state": "failed", "error": "udp: refused (secure mode)"}
                  for p in range(34197, 34200)]
        + [{"port": "tcp/27015", "state": "active", "external_port": 27015}]}],
    "mappings": [
        {"protocol": "UDP", "external_port": p, "internal_client": "192.168.1.20",
         "internal_port": p, "state": "failed", "lease": 0,
         "error": "udp: refused (secure mode)"} for p in range(34197, 34200)] + [
        {"protocol": "TCP", "external_port": 27015, "internal_client": "192.168.1.20",
         "internal_port": 27015, "state": "active", "lease": 3600, "renew_in": 1700},
        {"protocol": "TCP", "external_port": 5000, "internal_client": "192.168.1.30",
         "internal_port": 5000, "state": "active", "lease": 3600, "renew_in": 100}],
}


def test_status_groups_ports_under_their_activation(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from igdtrigger.cli import client

    monkeypatch.setattr(client.Client, "request", lambda *_a, **_k: STATUS)
    assert main(["status", "--server", "http://127.0.0.1:9"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("  factorio for 192.168.1.20"))
    assert "closes in 1h30m" in lines[head]
    assert lines[head + 1].strip().startswith("the router only lets a host map ports")
    assert "udp/34197-34199: failed - udp: refused (secure mode)" in lines[head + 2]
    assert "tcp/27015: active - lease 1h00m" in lines[head + 3]
    assert out.count("udp: refused (secure mode)") == 1  # an error once, not per port
    assert "mappings of no live activation" in out and "tcp/5000 -> 192.168.1.30" in out


# --- the demo ------------------------------------------------------------------------------------

def test_demo_rule_is_the_readmes() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it for real"):]
    block = section[section.index("```toml") + 7:]
    block = block[:block.index("```")]
    assert parse_config(tomllib.loads(block)).rules[0] == DEMO_RULE


def test_newcomer_facts_where_they_look() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "Python 3.11" in readme[:1500]  # before the first command
    unit = (ROOT / "examples" / "igdtrigger.service").read_text()
    doc = re.search(r"^Documentation=file:(\S+)$", unit, re.M)
    assert doc is not None, "Documentation= points at the installed README"
    assert f"README.md {doc.group(1)}" in readme or doc.group(1) in readme


async def test_stop_without_a_router_does_not_wait_for_one() -> None:
    """Nothing mapped and the router never reached: stop must not start a discovery."""

    class Unreachable(FakeGateway):
        async def connect(self) -> Any:
            await asyncio.Event().wait()  # a discovery that never ends

    gw = Unreachable(FakeClock())
    mapper = Mapper(gw, clock=FakeClock(), tag="t1", lease=3600)
    assert await asyncio.wait_for(mapper.remove_all(), 5) == 0


# --- a home server on a router in secure mode ----------------------------------------------------

CONFIG = {"rules": [{"name": "factorio", "open": ["udp/34197"]},
                    {"name": "own", "open": ["tcp/5000"]}]}


@pytest.fixture
async def secure(tmp_path: Path) -> AsyncIterator[tuple[Service, ApiClient]]:
    clock = FakeClock()
    gw = FakeGateway(clock, local_address="192.168.1.10", secure_mode=True)
    svc = Service(parse_config(CONFIG), gw, clock=clock, state_dir=tmp_path)
    await svc.start()
    async with TestClient(TestServer(make_app(svc), host="127.0.0.1")) as c:
        yield svc, c
    await svc.stop()


async def test_secure_mode_refusal_says_why_and_the_pc_reports_mapping_itself(
        secure: tuple[Service, ApiClient]) -> None:
    svc, client = secure
    admin = {"Authorization": f"Bearer {svc.api_token}"}
    r = await client.post("/api/v1/activations", headers=admin,
                          json={"rule": "factorio", "host": "192.168.1.20", "ttl": 30})
    act = await r.json()
    assert act["state"] == "failed" and act["reason"] == "router_self_only"
    assert "only lets a host map ports to itself" in act["message"]
    assert "igdtrigger run --rule factorio" in act["message"]
    assert act["external_address"]
    # the PC maps the ports itself and says so: the service stops asking the router
    r = await client.post(f"/api/v1/activations/{act['id']}/refresh", headers=admin,
                          json={"ttl": 30, "self_mapped": True})
    act = await r.json()
    assert act["state"] == "self" and "itself" in act["message"]
    await asyncio.sleep(0.05)
    status = await (await client.get("/api/v1/status")).json()
    assert status["mappings"] == []  # no failed retries piling up
    assert [a["state"] for a in status["activations"]] == ["self"]
    assert any(e["event"] == "self_mapped" for e in status["events"])
    # a claim without a refusal changes nothing
    r = await client.post("/api/v1/activations", json={"rule": "own", "ttl": 30})
    own = await r.json()
    assert own["state"] == "open" and "reason" not in own
    r = await client.post(f"/api/v1/activations/{own['id']}/refresh",
                          json={"self_mapped": True})
    assert (await r.json())["state"] == "open"
    r = await client.post(f"/api/v1/activations/{own['id']}/refresh",
                          json={"self_mapped": "yes"})
    assert r.status == 400 and "self_mapped" in (await r.json())["error"]["message"]


def test_activate_prints_the_reason_once(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from igdtrigger.cli import client

    act = dict(STATUS["activations"][0], state="failed")
    monkeypatch.setattr(client.Client, "request", lambda *_a, **_k: act)
    assert main(["activate", "factorio", "--server", "http://127.0.0.1:9"]) == 1
    out = capsys.readouterr().out
    assert out.count("the router only lets a host map ports to itself") == 1


# --- `run` says once what it opened ------------------------------------------------------------


@pytest.fixture
def simulated(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[gateway]\nurl = "simulate"\n[api]\nlisten = "127.0.0.1:{port}"\n'
                   '[detect]\nmethods = []\n[[rules]]\nname = "demo"\n'
                   'open = ["udp/40000-40010", "both/3074"]\n')
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_STATE_DIR": str(tmp_path / "s")}
    p = subprocess.Popen([sys.executable, "-m", "igdtrigger", "serve", "--config", str(cfg),
                          "--ready-file", str(ready)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_ready(p, ready)
    try:
        yield f"http://127.0.0.1:{port}", cfg
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_run_says_once_what_it_opened(simulated: tuple[str, Path], tmp_path: Path) -> None:
    url, cfg = simulated
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_TOKEN": "",
           "IGDTRIGGER_STATE_DIR": str(tmp_path / "s")}
    argv = [sys.executable, "-m", "igdtrigger", "run", "--config", str(cfg), "--server", url,
            "--rule", "demo"]
    p = subprocess.run([*argv, "--", sys.executable, "-c", "pass"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ("igdtrigger: udp/40000-40010, tcp/3074, udp/3074 open on 203.0.113.4 "
                        "for this PC while the game runs\n")
    p = subprocess.run([*argv, "--quiet", "--", sys.executable, "-c", "pass"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_wrong_token_is_said_and_a_guessed_one_is_dropped(simulated: tuple[str, Path],
                                                          tmp_path: Path) -> None:
    url, _cfg = simulated
    base = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(tmp_path / "x")}
    base.pop("IGDTRIGGER_TOKEN", None)
    argv = [sys.executable, "-m", "igdtrigger", "status", "--server", url]
    # given on purpose and wrong: a 401 that says so
    p = subprocess.run([*argv, "--token", "nope"], env=base, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "wrong admin token" in p.stderr, p.stderr
    # read from a token file of another service (a second instance, a container's): dropped,
    # and the request is heard as any local client's
    other = tmp_path / "other-state"
    other.mkdir()
    (other / "api-token").write_text("another-service-token\n")
    p = subprocess.run(argv, env={**base, "IGDTRIGGER_STATE_DIR": str(other)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "gateway up" in p.stdout, p.stderr


def test_first_run_is_calm(tmp_path: Path) -> None:
    """`igdtrigger serve --simulate` on a fresh machine: no warning, nothing but what happens
    (as root in a network namespace of its own, where the kernel tracks nothing yet)."""
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "IGDTRIGGER_STATE_DIR": str(tmp_path / "state")}
    env.pop("IGDTRIGGER_CONFIG", None)
    serve = [sys.executable, "-m", "igdtrigger", "serve", "--simulate", "--listen",
             "127.0.0.1:8731", "--ready-file", str(ready)]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *serve]
    else:
        argv = [*serve[:-4], "--listen", f"127.0.0.1:{free_port()}", *serve[-2:]]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    wait_ready(p, ready, why=lambda: p.communicate()[0])
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    lines = out.splitlines()
    assert [ln for ln in lines if " WARNING " in ln or " ERROR " in ln] == [], out
    assert any("203.0.113.4" in ln for ln in lines), out
    assert all(len(ln) < 200 for ln in lines), out


async def test_stop_while_the_simulated_router_answers_logs_no_error() -> None:
    """A stop while the demo's router still owes an answer (a loaded machine: the client's
    connect is slower than the user's Ctrl-C) ends that request quietly: the first run's log
    had an ERROR with a traceback ("Exception in callback ... CancelledError")."""
    from igdtrigger.sim.device import SimulatedRouter
    from igdtrigger.sim.router import SimulatedIgdServer

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    sim = SimulatedIgdServer(SimulatedRouter(latency=5.0))
    await sim.start()
    reader, writer = await asyncio.open_connection(sim.host, sim.port)
    writer.write(b"GET /rootDesc.xml HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # the request is read; the router sits in its latency
    await asyncio.wait_for(sim.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, no answer
    writer.close()
    for _ in range(5):
        await asyncio.sleep(0)  # the stream's done-callback runs on a later loop turn
    assert errors == []


async def test_stop_during_the_protocol_probe_logs_no_traceback() -> None:
    """Ctrl-C while `protocol = "auto"` still probes a router that does not answer: every
    probe is ended and its outcome collected (was: 'Task exception was never retrieved' with a
    traceback at ERROR per protocol, once the stop closed their sockets)."""
    import gc

    from igdtrigger.core.errors import GatewayUnreachable
    from igdtrigger.gateway.select import FallbackGateway

    class Silent:
        """A router that never answers until its socket is closed."""
        def __init__(self) -> None:
            self.closed = asyncio.Event()

        async def connect(self) -> Any:
            await self.closed.wait()
            raise GatewayUnreachable("connection closed")

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    silent = [Silent(), Silent()]
    gw = FallbackGateway([("pcp", silent[0]), ("natpmp", silent[1])],  # type: ignore[list-item]
                         parallel=True, probe_timeout=30)
    probe = asyncio.create_task(gw.connect())
    await asyncio.sleep(0.05)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    for s in silent:  # the stop closes the protocols' sockets
        s.closed.set()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    await asyncio.sleep(0)
    assert errors == []


async def test_rules_without_trigger_ports_start_calm(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A home server whose rules are only activated by `run`/`activate`/the API (no trigger
    port): conntrack has nothing to watch, which is not a fault: one INFO line (was: a WARNING
    that the kernel does not track connections)."""
    import logging

    from igdtrigger.detect.nfttrack import KernelTracking

    from .test_nfttrack import FakeDetector, FakeNft

    clock = FakeClock()
    tracking = KernelTracking(nft="/usr/sbin/nft", runner=FakeNft(), probe=lambda t, w: False,
                              netlink=False)
    config = parse_config({"rules": [{"name": "factorio", "open": ["udp/34197"]}]})
    svc = Service(config, FakeGateway(clock), clock=clock, state_dir=tmp_path,
                  detectors=[FakeDetector("conntrack"), FakeDetector("sockets", "conntrack")],
                  tracking=tracking)
    with caplog.at_level(logging.INFO, logger="igdtrigger"):
        await svc.start()
        await svc.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("conntrack idle: no rule has a trigger port" in r.getMessage()
               for r in caplog.records)


def test_fast_exit_after_a_clean_stop_runs_atexit_and_flushes(tmp_path: Path) -> None:
    """serve, as the program, leaves by os._exit once every mapping is removed: what that
    skips is done first (atexit handlers, buffered stdout), so nothing a user or a library
    needs at exit is lost (was: atexit handlers skipped)."""
    ready = tmp_path / "ready"
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('atexit handler ran'))\n"
            "print('buffered line', end='')\n"  # stdout is a pipe: block-buffered
            "from igdtrigger.cli.main import main\n"
            "sys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "IGDTRIGGER_STATE_DIR": str(tmp_path / "state")}
    env.pop("IGDTRIGGER_CONFIG", None)
    argv = [sys.executable, "-c", code, "serve", "--simulate", "--listen",
            f"127.0.0.1:{free_port()}", "--ready-file", str(ready)]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_ready(p, ready, why=p.communicate)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "stopped in" in err
    assert out.startswith("buffered line") and "atexit handler ran" in out, out
