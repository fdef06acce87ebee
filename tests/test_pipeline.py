"""The pipeline's guarded scheduler: a bug in one round is logged and the loop goes on;
``/healthz`` answers 503 naming a dead or stuck scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.config import parse_config
from igdtrigger.core.activation import Source
from igdtrigger.runtime.pipeline import STUCK_AFTER
from igdtrigger.runtime.service import Service
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import run_in_thread

from .fakes import ApiClient, FakeClock, FakeGateway

CONFIG = {"rules": [{"name": "demo", "open": ["udp/40000"]}]}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def svc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Service]:
    service = Service(parse_config(CONFIG), FakeGateway(clock, local_address="192.168.1.10"),
                      clock=clock, state_dir=tmp_path)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def client(svc: Service) -> AsyncIterator[ApiClient]:
    async with TestClient(TestServer(make_app(svc), host="127.0.0.1")) as c:
        yield c


async def test_a_failing_round_is_logged_and_the_scheduler_goes_on(
        svc: Service, client: ApiClient,
        caplog: pytest.LogCaptureFixture) -> None:
    real = svc.pipeline.mapper.reconcile
    calls = 0

    async def flaky(desired: Any, answered: Any = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in one round")
        await real(desired, answered)

    svc.pipeline.mapper.reconcile = flaky  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="igdtrigger.scheduler"):
        act = await svc.activate("demo", "192.168.1.10", ttl=60, source=Source.API, wait=5.0)
    assert act["state"] == "open"  # the next round opened it
    assert svc.pipeline.errors == 1
    assert any("a bug in one round" in r.getMessage() for r in caplog.records)
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.json())["ok"] is True


async def test_healthz_names_a_dead_scheduler(svc: Service,
                                              client: ApiClient) -> None:
    sched = next(t for t in svc.pipeline.tasks if t.get_name() == "scheduler")
    sched.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sched
    r = await client.get("/healthz")
    assert r.status == 503
    body = await r.json()
    assert body["ok"] is False and "scheduler dead" in body["error"]


async def test_healthz_names_a_stuck_scheduler(svc: Service, clock: FakeClock,
                                               client: ApiClient) -> None:
    hang = asyncio.Event()

    async def stuck(desired: Any, answered: Any = None) -> None:
        await hang.wait()

    svc.pipeline.mapper.reconcile = stuck  # type: ignore[method-assign]
    await svc.activate("demo", "192.168.1.10", ttl=600, source=Source.API, wait=0.05)
    assert (await client.get("/healthz")).status == 200  # a round in progress is not stuck
    clock.advance(STUCK_AFTER + 1)
    r = await client.get("/healthz")
    assert r.status == 503
    assert "scheduler stuck" in (await r.json())["error"]
    hang.set()


def test_run_without_a_service_maps_through_the_pipeline_without_aiohttp_or_zeroconf(
        tmp_path: Path) -> None:
    """The launcher hook's import path stays light: a standalone `igdtrigger run` maps and
    removes the rule's ports without importing aiohttp or zeroconf."""
    from .test_leftovers import ROOT, descriptions, write_config

    sim = run_in_thread(SimulatedRouter())
    try:
        cfg = write_config(tmp_path, sim, tmp_path / "state")
        code = ("import sys\nfrom igdtrigger.cli.main import main\n"
                f"rc = main(['run', '--config', {str(cfg)!r}, '--rule', 'demo', '--', "
                f"{sys.executable!r}, '-c', 'import time; time.sleep(1)'])\n"
                "print(sorted(m for m in ('aiohttp', 'zeroconf') if m in sys.modules))\n"
                "sys.exit(rc)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT),
                                            "IGDTRIGGER_TOKEN": ""}, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert "udp/40000-40001 open" in p.stderr, p.stderr
        assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
        assert descriptions(sim) == []
    finally:
        sim.stop()


async def test_the_activated_event_follows_the_router_call_and_precedes_mapped(
        svc: Service) -> None:
    """The log line and event of a new activation are not on the way to the router: the
    router is asked first; the stream still says "activated" before "mapped"."""
    published_at_add: list[list[str]] = []
    gw = svc.gateway
    add = gw.add

    async def watching(spec: Any, lease: int) -> Any:
        published_at_add.append([str(e["event"]) for e in svc.hub.history])
        return await add(spec, lease)

    gw.add = watching  # type: ignore[method-assign]
    before = svc.hub.seq
    await svc.activate("demo", "192.168.1.10", ttl=60, source=Source.API, wait=5.0)
    assert published_at_add and "activated" not in published_at_add[0]
    events = [str(e["event"]) for e in svc.hub.since(before)]
    assert events[0] == "activated" and "mapped" in events[1:]
