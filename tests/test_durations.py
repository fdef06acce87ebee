"""One duration grammar for config, CLI, API and dashboard: it reads back what the product
prints (``format_duration``, the dashboard's countdowns and placeholders)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.cli.main import main
from igdtrigger.config import parse_config
from igdtrigger.core.model import format_duration, parse_duration
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway

SPELLINGS = {
    "10m 0s": 600, "1h 0m": 3600, "1h30m": 5400, "2H": 7200, "90s": 90, "2h": 7200,
    "90": 90, "1h00m": 3600, "10m00s": 600, "1d 2h": 93600, "250ms": 0.25, "1.5h": 5400,
    "1H 30M": 5400,
}


@pytest.mark.parametrize(("text", "seconds"), sorted(SPELLINGS.items()))
def test_grammar_accepts_what_users_and_the_product_write(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(seconds) == seconds


@pytest.mark.parametrize("text", ["30m1h", "1h1h", "", "h", "-1", "1x", "1 h 30", "0", "0s"])
def test_grammar_refuses_nonsense_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [1, 59, 60, 90, 600, 3599, 3600, 5400, 86400, 200000])
def test_format_duration_reads_back(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds - seconds % (
        60 if seconds >= 3600 else 1)


DASHBOARD = Path(__file__).parent.parent / "igdtrigger" / "api" / "dashboard" / "dashboard.js"


def dashboard_spellings(values: list[int]) -> list[str]:
    """What the dashboard's own ``duration()`` prints (run in node)."""
    src = DASHBOARD.read_text()
    fn = re.search(r"^function duration\(seconds\) \{.*?^\}", src, re.S | re.M)
    assert fn is not None
    out = subprocess.run(["node", "-e", fn.group(0) + f"\nconsole.log(JSON.stringify("
                          f"{json.dumps(values)}.map(duration)))"],
                         capture_output=True, text=True, check=True, timeout=30)
    return [str(x) for x in json.loads(out.stdout)]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_dashboard_spellings_parse() -> None:
    values = [5, 119, 120, 600, 3599, 3600, 5400, 7260]
    for value, text in zip(values, dashboard_spellings(values), strict=True):
        assert parse_duration(text) == value - value % (60 if value >= 3600 else 1), text


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[ApiClient]:
    clock = FakeClock()
    svc = Service(parse_config({"rules": [{"name": "demo", "open": ["udp/40000"],
                                           "idle_timeout": "10m 0s"}]}),
                  FakeGateway(clock, local_address="192.168.1.10"), clock=clock,
                  state_dir=tmp_path)
    await svc.start()
    async with TestClient(TestServer(make_app(svc), host="127.0.0.1")) as c:
        yield c
    await svc.stop()


async def test_api_takes_the_dashboard_placeholder(client: ApiClient) -> None:
    rules = (await (await client.get("/api/v1/rules")).json())["rules"]
    assert rules[0]["idle_timeout"] == 600
    for ttl, want in (("10m 0s", 600), ("1h 0m", 3600), ("1h30m", 5400), ("2H", 7200)):
        r = await client.post("/api/v1/activations", json={"rule": "demo", "ttl": ttl})
        assert r.status == 201, await r.text()
        assert (await r.json())["ttl"] == want
    r = await client.post("/api/v1/activations", json={"rule": "demo", "ttl": "soon"})
    assert r.status == 400
    assert "'soon'" in (await r.json())["error"]["message"]


def test_cli_takes_the_same_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    # parsed before any network: a bad value is a usage error naming it
    assert main(["activate", "demo", "--for", "1h 0m x", "--server", "http://127.0.0.1:9"]) == 2
    assert "'1h 0m x'" in capsys.readouterr().err
