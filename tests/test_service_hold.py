"""The service side of issue 18: detector observations reach the engine, and status, the API,
the CLI and the journal say why an activation is held and when it closes."""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.cli.statuscmd import print_activation as _print_activation
from igdtrigger.config import parse_config
from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import Flow, FlowEnded, FlowLive, FlowsListed, Proto
from igdtrigger.runtime.service import Service

from .fakes import FakeClock, FakeGateway

CONFIG = {"rules": [{"name": "game", "trigger": ["tcp/27015"], "open": ["udp/40000"],
                     "idle_timeout": "5s"}]}
HOST = "192.168.1.10"
CONN = Flow(Proto.TCP, ipaddress.ip_address(HOST), ipaddress.ip_address("11.22.33.44"), 50000,
            27015)


@pytest.fixture
async def svc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Service]:
    gw = FakeGateway(clock, local_address=HOST)
    service = Service(parse_config(CONFIG), gw, clock=clock, state_dir=tmp_path)
    await service.start()
    yield service
    await service.stop()


async def test_a_live_connection_shows_as_held_until_it_closes(
        svc: Service, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    svc.observe(CONN)
    svc.observe(FlowLive(CONN, connected=True))
    async with TestClient(TestServer(make_app(svc), host="127.0.0.1")) as client:
        data = (await (await client.get("/api/v1/status")).json())
        (act,) = data["activations"]
        assert act["expires_in"] is None
        assert act["hold"] == "1 live flow" and act["live_flows"] == 1
        assert data["counts"]["flows_live"] == 1
        _print_activation(act)
        assert "held by 1 live flow, closes 5s after they end" in capsys.readouterr().out
        record = svc.pipeline.journal_record(svc.pipeline.engine.activations[act["id"]])
        assert record.expires_wall == math.inf  # journaled as held (see the crash tests)

        clock.advance(600)
        svc.pipeline.engine.expire()
        assert svc.pipeline.engine.activations  # ten silent minutes later: still held
        svc.observe(FlowEnded(CONN, closed=True))
        data = (await (await client.get("/api/v1/status")).json())
        (act,) = data["activations"]
        assert act["expires_in"] == 5.0 and act["live_flows"] == 0
        assert act["hold"] == "traffic 0s ago"
        _print_activation(act)
        assert "closes in 5s (traffic 0s ago)" in capsys.readouterr().out
    clock.advance(5.1)
    assert svc.pipeline.engine.expire()


async def test_an_inbound_flow_counts_as_use(svc: Service, clock: FakeClock) -> None:
    svc.observe(CONN)
    clock.advance(4)
    svc.observe(Flow(Proto.UDP, ipaddress.ip_address("11.9.9.9"), ipaddress.ip_address(HOST),
                     61000, 40000))
    (act,) = svc.pipeline.engine.activations.values()
    assert act.expires == clock.now + 5
    assert svc.status()["counts"]["flows_inbound"] == 1


class DyingDetector:
    """Reports a live connection, then fails: nobody could say when it ends."""

    name = "conntrack"
    holds_flows = True

    def check(self) -> None:
        pass

    async def run(self, sink: Callable[[object], None]) -> None:
        sink(CONN)
        sink(FlowLive(CONN, connected=True))
        await asyncio.sleep(0.05)
        raise DetectionUnavailable("netlink socket failed")


async def test_a_detector_that_stops_releases_its_holds(tmp_path: Path, clock: FakeClock) -> None:
    gw = FakeGateway(clock, local_address=HOST)
    service = Service(parse_config(CONFIG), gw, clock=clock, state_dir=tmp_path,
                      detectors=[DyingDetector()])  # type: ignore[list-item]
    await service.start()
    try:
        for _ in range(50):
            await asyncio.sleep(0.02)
            if not service.detector_status[0].active:
                break
        (act,) = service.pipeline.engine.activations.values()
        assert not act.held and act.expires == clock.now + 5
    finally:
        await service.stop()


async def crashed_while_held(tmp_path: Path, clock: FakeClock, gw: FakeGateway,
                             held_for: float, boot: Callable[[], tuple[str, float]] | None = None,
                             ) -> Service:
    """A service whose activation is held by a live connection, killed (-9: no stop) after
    ``held_for`` seconds; returns the next one on the same state (not started)."""
    first = Service(parse_config(CONFIG), gw, clock=clock, wall=lambda: clock.now + 1.7e9,
                    state_dir=tmp_path, boot=boot)
    await first.start()
    first.observe(CONN)
    first.observe(FlowLive(CONN, connected=True))
    first.pipeline._journal_new()
    first.pipeline._journal_activations()
    clock.advance(held_for)  # silent: nothing more is written while it is held
    for task in first._tasks:
        task.cancel()
    first.pipeline.journal.close()
    return Service(parse_config(CONFIG), gw, clock=clock, wall=lambda: clock.now + 1.7e9,
                   state_dir=tmp_path)


@pytest.mark.parametrize("still_connected", [True, False])
async def test_kill_9_while_held_comes_back_held_until_the_first_look(
        tmp_path: Path, clock: FakeClock, still_connected: bool) -> None:
    """Crash after a long hold (three timeouts): the activation comes back held (before, it was
    journaled as closing one timeout after the hold began and was gone at the restart), its
    ports are re-applied, and the detectors' first look decides: the connection still lives
    (held again, with no gap), or it does not (it closes now, not a timeout later)."""
    gw = FakeGateway(clock, local_address=HOST)
    second = await crashed_while_held(tmp_path, clock, gw, held_for=15)
    assert second.restored == 1
    (act,) = second.pipeline.engine.activations.values()
    assert act.unproven and act.expires == clock.now + 5  # capped: one timeout after restart
    assert "held before the restart" in second.status()["activations"][0]["hold"]
    await second.start()
    try:
        if still_connected:  # the start-up dump finds the connection
            second.observe(FlowLive(CONN, connected=True))
        second.observe(FlowsListed("conntrack"))
        assert act.id in second.pipeline.engine.activations
        if still_connected:
            assert act.held and not act.unproven
            clock.advance(60)
            assert not second.pipeline.engine.expire()
        else:
            assert act.expires == clock.now
            assert second.pipeline.engine.expire() == [act]
    finally:
        await second.stop()


async def test_kill_9_while_held_without_a_flow_detector_closes_one_timeout_after_restart(
        tmp_path: Path, clock: FakeClock) -> None:
    """Nothing will ever list the flows (no flow detector runs): the cap applies."""
    gw = FakeGateway(clock, local_address=HOST)
    second = await crashed_while_held(tmp_path, clock, gw, held_for=3600)
    (act,) = second.pipeline.engine.activations.values()
    clock.advance(4.9)
    assert not second.pipeline.engine.expire()
    clock.advance(0.2)
    assert second.pipeline.engine.expire() == [act]
    await second.stop()


class QuietDetector:
    """A flow detector that runs and reports nothing (the test reports for it)."""

    holds_flows = True

    def __init__(self, name: str) -> None:
        self.name = name

    def check(self) -> None:
        pass

    async def run(self, sink: Callable[[object], None]) -> None:
        await asyncio.Event().wait()


async def test_a_restored_hold_waits_for_every_running_flow_detectors_first_look(
        tmp_path: Path, clock: FakeClock) -> None:
    """Conntrack and the socket table both run: conntrack's dump alone does not settle a
    restored hold; the connection may be one only the socket table sees."""
    gw = FakeGateway(clock, local_address=HOST)
    (await crashed_while_held(tmp_path, clock, gw, held_for=15)).pipeline.journal.close()
    detectors: list[Any] = [QuietDetector("conntrack"), QuietDetector("sockets")]
    second = Service(parse_config(CONFIG), gw, clock=clock, wall=lambda: clock.now + 1.7e9,
                     state_dir=tmp_path, detectors=detectors)
    await second.start()
    try:
        (act,) = second.pipeline.engine.activations.values()
        second.observe(FlowsListed("conntrack"))
        assert act.unproven
        second.observe(CONN)
        second.observe(FlowLive(CONN, connected=True))
        second.observe(FlowsListed("sockets"))
        assert not act.unproven and act.held
    finally:
        await second.stop()


async def test_a_hold_journaled_before_a_reboot_does_not_come_back(
        tmp_path: Path, clock: FakeClock) -> None:
    """The machine rebooted (another boot id): no connection outlived that, so the held
    activation is not restored and its leftover mapping is deleted at the start."""
    gw = FakeGateway(clock, local_address=HOST)
    (await crashed_while_held(tmp_path, clock, gw, held_for=15,
                              boot=lambda: ("first-boot", clock.now))).pipeline.journal.close()
    after = Service(parse_config(CONFIG), gw, clock=clock, wall=lambda: clock.now + 1.7e9,
                    state_dir=tmp_path, boot=lambda: ("another-boot", 30.0))
    assert after.restored == 0 and not after.pipeline.engine.activations
    await after.stop()
