"""The mapping journal write beside the router call (issue 17): where the router lists our
mappings by description, a new mapping's journal row is written while its add is in flight, so
a crash between the add and that write must still be cleaned up by the next start; where the
router cannot list them, the row is durable before the add is sent (today's order)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.config import parse_config
from igdtrigger.core.activation import Source
from igdtrigger.core.model import MappingSpec
from igdtrigger.gateway.select import build_gateway
from igdtrigger.runtime.journal import Journal
from igdtrigger.runtime.service import Service
from igdtrigger.sim.device import SimulatedRouter
from igdtrigger.sim.router import SimulatedIgdServer

from .fakes import FakeClock

HOST = "127.0.0.1"
CONFIG = {"rules": [{"name": "game", "open": ["udp/40000"], "idle_timeout": "1h"}]}


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimulatedIgdServer, FakeClock]]:
    clock = FakeClock()
    server = SimulatedIgdServer(SimulatedRouter(clock=clock))
    await server.start()
    yield server, clock
    await server.close()


def service(server: SimulatedIgdServer, clock: FakeClock, state: Path, backend: str) -> Service:
    return Service(parse_config(CONFIG), build_gateway(server.url, backend=backend),
                   clock=clock, wall=lambda: clock.now + 1.7e9, state_dir=state)


def ours(server: SimulatedIgdServer) -> list[int]:
    return [m.external_port for m in server.router.mappings() if m.internal_client == HOST]


async def activate(svc: Service) -> None:
    gen = svc.pipeline.engine.generation
    await svc.activate("game", HOST, ttl=3600, source=Source.API)
    await svc._wait_applied(gen + 1, 5)


@pytest.mark.parametrize("backend", ["miniupnpc", "soap"])
async def test_a_crash_before_the_trailing_journal_write_is_cleaned_up_on_the_next_start(
        sim: tuple[SimulatedIgdServer, FakeClock], tmp_path: Path, backend: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, clock = sim
    s1 = service(server, clock, tmp_path, backend)
    await s1.start()
    await s1._wait_applied(s1.pipeline.engine.generation, 5)  # connected: the table was listed
    # the process dies right after the add went out: no journal write of it ever lands
    lost: list[Any] = []
    monkeypatch.setattr(Journal, "mappings_requested", lambda self, *a, **k: lost.append(a))
    monkeypatch.setattr(Journal, "activations_put", lambda self, *a, **k: None)
    await activate(s1)
    assert ours(server) == [40000] and lost  # on the router, never journaled
    for t in s1._tasks:  # crash: the tasks just vanish, nothing is deleted
        t.cancel()
    monkeypatch.undo()
    s1.pipeline.journal.close()
    await s1.gateway.close()  # the process is gone (its sockets too)
    if s1._notify_watcher is not None:
        s1._notify_watcher.close()
    assert ours(server) == [40000]

    s2 = service(server, clock, tmp_path, backend)
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 5)
    assert ours(server) == []  # found by its description and deleted
    assert s2.pipeline.mapper.stale_removed == 1
    await s2.stop()


async def test_a_router_that_cannot_show_its_mappings_gets_the_journal_row_first(
        sim: tuple[SimulatedIgdServer, FakeClock], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, clock = sim
    svc = service(server, clock, tmp_path, "miniupnpc")
    await svc.start()
    await svc._wait_applied(svc.pipeline.engine.generation, 5)
    svc.pipeline.mapper.traits.reports_mappings = False  # learned: it shows nothing it holds
    seen: list[list[int]] = []
    write = Journal.mappings_requested

    def record(self: Journal, specs: list[MappingSpec], *a: Any, **k: Any) -> None:
        seen.append(ours(server))  # what the router held when the row was written
        write(self, specs, *a, **k)

    monkeypatch.setattr(Journal, "mappings_requested", record)
    await activate(svc)
    assert ours(server) == [40000]
    assert seen and seen[0] == []  # journaled before the add reached the router
    assert [m.external_port for m in svc.pipeline.journal.mappings()] == [40000]
    await svc.stop()


@pytest.mark.parametrize("backend", ["miniupnpc", "soap"])
async def test_an_activation_answered_open_is_journaled_with_its_mappings_in_one_write(
        sim: tuple[SimulatedIgdServer, FakeClock], tmp_path: Path, backend: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The API answers once the router accepted the add and the activation is durable: one
    transaction holds the activation and its mapping (one fsync), and a crash right after
    the answer restores the activation at the next start."""
    server, clock = sim
    s1 = service(server, clock, tmp_path, backend)
    await s1.start()
    await s1._wait_applied(s1.pipeline.engine.generation, 5)
    writes: list[tuple[list[int], list[str]]] = []
    write = Journal.mappings_requested

    def record(self: Journal, specs: list[MappingSpec], *a: Any, **k: Any) -> None:
        writes.append(([s.external_port for s in specs],
                       [act.rule for act in k.get("activations") or []]))
        write(self, specs, *a, **k)

    monkeypatch.setattr(Journal, "mappings_requested", record)
    put: list[Any] = []
    monkeypatch.setattr(Journal, "activations_put", lambda self, acts: put.append(acts))
    view = await s1.activate("game", HOST, ttl=3600, source=Source.API)
    assert view["state"] == "open" and ours(server) == [40000]
    assert writes == [([40000], ["game"])]  # together, before the answer
    assert put == []  # no second write for the activation
    monkeypatch.undo()
    for t in s1._tasks:  # crash right after the answer
        t.cancel()
    s1.pipeline.journal.close()
    await s1.gateway.close()
    if s1._notify_watcher is not None:
        s1._notify_watcher.close()

    s2 = service(server, clock, tmp_path, backend)
    await s2.start()
    await s2._wait_applied(s2.pipeline.engine.generation, 5)
    assert [a.rule.name for a in s2.pipeline.engine.activations.values()] == ["game"]
    assert ours(server) == [40000]  # restored, still open
    await s2.stop()
    assert ours(server) == []
