"""Ad-hoc ports (`[api] allow_adhoc`): ports named by the request itself, inside set limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.config import parse_config
from igdtrigger.core.errors import ConfigError
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway
from .test_api_auth import fake_remote

THIS_HOST = "192.168.1.10"
LAN = "192.168.1.20"
RULES = [{"name": "demo", "open": ["udp/40000"]}]
ADHOC: dict[str, Any] = {"allow_adhoc": True, "adhoc_ports": ["both/20000-30000"],
                         "adhoc_max_ports": 4, "adhoc_max_ttl": "2h", "adhoc_per_host": 2}


def make_service(tmp_path: Path, clock: FakeClock, api: dict[str, Any],
                 gw: FakeGateway | None = None) -> Service:
    return Service(parse_config({"api": api, "rules": RULES}),
                   gw or FakeGateway(clock, local_address=THIS_HOST), clock=clock,
                   state_dir=tmp_path)


async def started(svc: Service) -> ApiClient:
    await svc.start()
    client: ApiClient = TestClient(TestServer(make_app(svc, middlewares=[fake_remote]),
                                           host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def on(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[Service, ApiClient]]:
    svc = make_service(tmp_path, clock, ADHOC)
    client = await started(svc)
    yield svc, client
    await client.close()
    await svc.stop()


def ports(svc: Service) -> list[str]:
    assert isinstance(svc.gateway, FakeGateway)
    return sorted(svc.gateway.ports())


async def error(r: Any, status: int) -> str:
    assert r.status == status, await r.text()
    message: str = (await r.json())["error"]["message"]
    return message


async def test_off_by_default(tmp_path: Path, clock: FakeClock) -> None:
    svc = make_service(tmp_path, clock, {})
    client = await started(svc)
    try:
        r = await client.post("/api/v1/activations", json={"open": ["udp/25000"]})
        assert "allow_adhoc" in await error(r, 403)
        assert ports(svc) == []
    finally:
        await client.close()
        await svc.stop()


async def test_adhoc_ports_open_and_close(on: tuple[Service, ApiClient]) -> None:
    svc, client = on
    r = await client.post("/api/v1/activations",
                          json={"open": ["udp/25000", "tcp/25001"], "ttl": "1h"})
    assert r.status == 201, await r.text()
    act = await r.json()
    assert act["rule"].startswith("adhoc:")
    assert act["state"] == "open"
    assert ports(svc) == ["tcp/25001", "udp/25000"]
    r = await client.get("/api/v1/rules")
    assert [x["name"] for x in (await r.json())["rules"]] == ["demo"]  # no rule left behind
    r = await client.delete(f"/api/v1/activations/{act['id']}")
    assert r.status == 200
    assert ports(svc) == []


async def test_ttl_defaults_to_the_limit_and_lapses(on: tuple[Service, ApiClient],
                                                    clock: FakeClock) -> None:
    svc, client = on
    r = await client.post("/api/v1/activations", json={"open": ["udp/25000"]})
    assert (await r.json())["ttl"] == 7200
    clock.advance(7201)
    svc.wake()
    await svc._wait_applied(svc.pipeline.engine.generation + 1, 0.5)
    assert ports(svc) == []


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"open": ["udp/19999"]}, 403, "outside [api] adhoc_ports"),
    ({"open": ["udp/25000-25010"]}, 403, "adhoc_max_ports allows 4"),
    ({"open": ["udp/25000"], "ttl": "3h"}, 403, "adhoc_max_ttl"),
    ({"open": ["tcp/1-2000"]}, 403, "below 1024"),
    ({"open": ["udp/25000"], "rule": "demo"}, 400, "not both"),
    ({"open": "udp/25000"}, 400, "list of port specs"),
    ({"open": ["udp:25000"]}, 400, "not a port spec"),
    ({"open": []}, 400, "at least one port"),
])
async def test_limits_are_enforced(on: tuple[Service, ApiClient], body: dict[str, Any],
                                   status: int, says: str) -> None:
    svc, client = on
    r = await client.post("/api/v1/activations", json=body)
    assert says in await error(r, status)
    assert ports(svc) == []


async def test_per_host_limit_and_own_address_rule(on: tuple[Service, ApiClient]) -> None:
    svc, client = on
    lan = {"X-Test-Remote": LAN}
    for port in (25000, 25001):
        r = await client.post("/api/v1/activations", json={"open": [f"udp/{port}"]}, headers=lan)
        assert r.status == 201
        assert (await r.json())["host"] == LAN
    r = await client.post("/api/v1/activations", json={"open": ["udp/25002"]}, headers=lan)
    assert "adhoc_per_host" in await error(r, 403)
    r = await client.post("/api/v1/activations", json={"open": ["udp/25003"], "host": "1.2.3.4"},
                          headers=lan)
    assert r.status == 403  # another host's ports need the admin token, as with rules
    # another host is not held back by LAN's limit
    r = await client.post("/api/v1/activations", json={"open": ["udp/25004"]})
    assert r.status == 201
    assert ports(svc) == ["udp/25000", "udp/25001", "udp/25004"]


async def test_admin_only(tmp_path: Path, clock: FakeClock) -> None:
    svc = make_service(tmp_path, clock, {**ADHOC, "adhoc_admin_only": True})
    client = await started(svc)
    try:
        lan = {"X-Test-Remote": LAN}
        r = await client.post("/api/v1/activations", json={"open": ["udp/25000"]}, headers=lan)
        assert "admin token" in await error(r, 403)
        r = await client.post("/api/v1/activations", json={"open": ["udp/25000"]},
                              headers={**lan, "Authorization": f"Bearer {svc.api_token}"})
        assert r.status == 201
        assert ports(svc) == ["udp/25000"]
    finally:
        await client.close()
        await svc.stop()


async def test_restored_after_a_crash_only_while_still_allowed(tmp_path: Path,
                                                               clock: FakeClock) -> None:
    gw = FakeGateway(clock, local_address=THIS_HOST)
    first = make_service(tmp_path, clock, ADHOC, gw)
    client = await started(first)
    r = await client.post("/api/v1/activations", json={"open": ["udp/25000"], "ttl": "1h"})
    assert r.status == 201
    await client.close()
    first.pipeline._journal_flushed = float("-inf")
    first.pipeline._journal_activations()  # what a crash leaves: the journal, no clean stop
    for task in first._tasks:
        task.cancel()

    again = make_service(tmp_path, clock, ADHOC, gw)
    assert again.restored == 1
    acts = again.pipeline.engine.activations.values()
    assert [a.rule.name.startswith("adhoc:") for a in acts] == [True]
    again.pipeline.journal.close()

    # the operator turned ad-hoc ports off meanwhile: the activation is not restored and the
    # mapping it left on the router is removed
    off = make_service(tmp_path, clock, {}, gw)
    assert off.restored == 0
    await off.start()
    await off._wait_applied(off.pipeline.engine.generation, 1.0)
    assert sorted(gw.ports()) == []
    await off.stop()


def test_config_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="adhoc_ports"):
        parse_config({"api": {"allow_adhoc": True, "adhoc_ports": ["tcp/1-2000"]}})
    with pytest.raises(ConfigError, match="adhoc_max_ports"):
        parse_config({"api": {"adhoc_max_ports": 0}})
    with pytest.raises(ConfigError, match="adhoc_ports"):
        parse_config({"api": {"adhoc_ports": []}})
    cfg = parse_config({"api": {"allow_adhoc": True, "adhoc_ports": ["tcp/80", "udp/5000-6000"]}})
    assert [str(r) for r in cfg.api.adhoc.ports] == ["tcp/80", "udp/5000-6000"]
