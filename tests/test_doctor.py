"""`igdtrigger doctor` (one line per check, with the fix) and `igdtrigger healthcheck` (0/1)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from igdtrigger.api.app import make_app
from igdtrigger.cli import main as cli
from igdtrigger.cli.doctor import (
    Check,
    check_privileges,
    doctor,
    effective_capabilities,
    healthcheck,
)
from igdtrigger.config import parse_config
from igdtrigger.runtime.service import Service
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer

from .fakes import FakeClock, FakeGateway


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, Service]]:
    clock = FakeClock()
    svc = Service(parse_config({"rules": [{"name": "demo", "open": ["udp/40000"]}]}),
                  FakeGateway(clock), clock=clock, state_dir=tmp_path / "svc")
    await svc.start()
    server = TestServer(make_app(svc), host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", svc
    await server.close()
    await svc.stop()


def write_config(tmp_path: Path, url: str, *, rules: bool = True) -> Path:
    p = tmp_path / "config.toml"
    text = f'[gateway]\nurl = "{url}"\ndiscover_timeout = "1s"\n\n[detect]\nmethods = []\n\n'
    text += f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
    if rules:
        text += '\n[[rules]]\nname = "demo"\nopen = ["udp/40000"]\n'
    p.write_text(text)
    return p


async def run_doctor(config: str, server: str, token: str | None) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = await asyncio.to_thread(doctor, config, server, token, out)
    return code, out.getvalue().splitlines()


def line(lines: list[str], name: str) -> str:
    found = [ln for ln in lines if ln[6:].startswith(name + ":")]
    assert found, f"no {name!r} line in {lines}"
    return found[0]


async def test_doctor_all_good(tmp_path: Path, api: tuple[str, Service]) -> None:
    async with SimulatedIgdServer() as sim:
        cfg = write_config(tmp_path, sim.url)
        code, lines = await run_doctor(str(cfg), api[0], api[1].api_token)
    assert code == 0, lines
    assert line(lines, "config").startswith("ok")
    assert line(lines, "detectors").startswith("ok")
    gw = line(lines, "gateway")
    assert gw.startswith("ok") and sim.url in gw
    assert line(lines, "external address").startswith("ok") and "203.0.113.4 is public" in \
        line(lines, "external address")
    assert line(lines, "state directory").startswith("ok")
    assert line(lines, "api").startswith("ok") and api[0] in line(lines, "api")
    assert line(lines, "service's router").startswith("ok")
    assert all(ln.split()[0] in ("ok", "warn", "FAIL") for ln in lines)


async def test_doctor_says_what_to_fix(tmp_path: Path) -> None:
    router = SimulatedRouter(external_ip="100.64.1.2")  # CGNAT
    async with SimulatedIgdServer(router) as sim:
        cfg = write_config(tmp_path, sim.url, rules=False)
        code, lines = await run_doctor(str(cfg), "http://127.0.0.1:9", None)
    assert code == 0, lines  # warnings only
    ext = line(lines, "external address")
    assert ext.startswith("warn") and "double NAT or CGNAT" in ext and "->" in ext
    assert line(lines, "config").startswith("warn") and "add [[rules]]" in line(lines, "config")
    api_line = line(lines, "api")
    assert api_line.startswith("warn") and "igdtrigger serve" in api_line


async def test_doctor_fails_without_a_router(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9/rootDesc.xml")
    code, lines = await run_doctor(str(cfg), "http://127.0.0.1:9", None)
    assert code == 1
    gw = line(lines, "gateway")
    assert gw.startswith("FAIL") and "-> enable UPnP IGD on the router" in gw


def test_doctor_bad_config_is_one_fail_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[api]\nlisten = "nowhere"\n')
    out = io.StringIO()
    assert doctor(str(bad), None, None, out=out) == 1
    (only,) = out.getvalue().splitlines()
    assert only.startswith("FAIL  config:") and "api.listen" in only


def test_privileges_check() -> None:
    cfg = parse_config({})
    assert check_privileges(cfg, 1 << 12).level == "ok"
    warn = check_privileges(cfg, 0)
    assert warn.level == "warn" and "CAP_NET_ADMIN" in warn.fix
    assert check_privileges(parse_config({"detect": {"methods": []}}), 0).level == "ok"
    assert effective_capabilities("/nonexistent") is None
    assert Check("ok", "x", "y").line() == "ok    x: y"


async def test_healthcheck(api: tuple[str, Service]) -> None:
    url, svc = api
    out = io.StringIO()
    assert await asyncio.to_thread(healthcheck, None, url, ready=False, timeout=3,
                                   out=out) == 0
    assert out.getvalue().startswith("healthy")
    assert await asyncio.to_thread(healthcheck, None, url, ready=True, timeout=3,
                                   out=io.StringIO()) == 0
    svc.pipeline.mapper.gateway_up = False  # the router went away: alive, not ready
    out = io.StringIO()
    assert await asyncio.to_thread(healthcheck, None, url, ready=True, timeout=3,
                                   out=out) == 1
    assert "unhealthy" in out.getvalue()
    assert await asyncio.to_thread(healthcheck, None, url, ready=False, timeout=3,
                                   out=io.StringIO()) == 0
    out = io.StringIO()
    assert healthcheck(None, "http://127.0.0.1:9", ready=False, timeout=1, out=out) == 1
    assert "no igdtrigger service" in out.getvalue()


async def test_healthcheck_cli_reads_listen_from_env(api: tuple[str, Service],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    port = api[0].rsplit(":", 1)[1]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("IGDTRIGGER_CONFIG", raising=False)
    monkeypatch.setenv("IGDTRIGGER_API__LISTEN", f"0.0.0.0:{port}")  # as in the Docker image
    assert await asyncio.to_thread(cli.main, ["healthcheck"]) == 0
    assert f"127.0.0.1:{port}/healthz" in capsys.readouterr().out
