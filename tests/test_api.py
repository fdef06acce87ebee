"""HTTP API over a real aiohttp server on loopback, with an in-memory router behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.config import parse_config
from igdtrigger.core.activation import Source
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway

CONFIG = {
    "rules": [
        {"name": "demo", "trigger": ["udp/27015"], "open": ["udp/40000-40002", "both/3074"]},
        {"name": "other", "open": ["tcp/5000"], "idle_timeout": "2m"},
    ]
}


@pytest.fixture
async def svc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Service]:
    gw = FakeGateway(clock, local_address="192.168.1.10")
    service = Service(parse_config(CONFIG), gw, clock=clock, state_dir=tmp_path)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def client(svc: Service) -> AsyncIterator[ApiClient]:
    async with TestClient(TestServer(make_app(svc), host="127.0.0.1")) as c:
        yield c


def admin(svc: Service) -> dict[str, str]:
    assert svc.api_token
    return {"Authorization": f"Bearer {svc.api_token}"}


async def test_healthz_and_status(client: ApiClient, svc: Service) -> None:
    r = await client.get("/healthz")
    assert r.status == 200
    assert (await r.json())["ok"] is True
    r = await client.get("/api/v1/status")
    data = await r.json()
    assert data["gateway"]["up"] is True
    assert data["gateway"]["local_address"] == "192.168.1.10"
    assert [x["name"] for x in data["rules"]] == ["demo", "other"]


async def test_activation_opens_ports_and_delete_closes_them(
        client: ApiClient, svc: Service) -> None:
    gw = svc.gateway
    assert isinstance(gw, FakeGateway)
    r = await client.post("/api/v1/activations", json={"rule": "demo", "ttl": 30})
    assert r.status == 201
    act = await r.json()
    assert act["rule"] == "demo"
    assert act["host"] == "192.168.1.10"  # loopback client acts for this host's LAN address
    assert act["state"] == "open"
    assert act["ttl"] == 30
    assert len(act["ports"]) == 5
    assert sorted(gw.ports()) == ["tcp/3074", "udp/3074", "udp/40000", "udp/40001", "udp/40002"]
    r = await client.get("/api/v1/mappings")
    assert len((await r.json())["mappings"]) == 5
    r = await client.delete(f"/api/v1/activations/{act['id']}")
    assert r.status == 200
    assert gw.ports() == {}
    r = await client.delete(f"/api/v1/activations/{act['id']}")
    assert r.status == 404
    assert "no activation" in (await r.json())["error"]["message"]


async def test_ttl_lapses_and_ports_close(client: ApiClient, svc: Service,
                                          clock: FakeClock) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "other", "ttl": "30s"})
    assert r.status == 201
    assert svc.gateway.info is not None
    clock.advance(31)
    svc.wake()
    await svc._wait_applied(svc.pipeline.engine.generation + 1, 0.5)  # scheduler expires it
    r = await client.get("/api/v1/activations")
    assert (await r.json())["activations"] == []
    assert isinstance(svc.gateway, FakeGateway) and svc.gateway.ports() == {}


async def test_refresh_extends(client: ApiClient, svc: Service,
                               clock: FakeClock) -> None:
    act = await (await client.post("/api/v1/activations", json={"rule": "other", "ttl": 30})).json()
    clock.advance(20)
    r = await client.post(f"/api/v1/activations/{act['id']}/refresh", json={"ttl": 30})
    assert r.status == 200
    assert (await r.json())["expires_in"] == 30


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"rule": "nope"}, 404, "unknown rule 'nope'"),
        ({}, 400, '"rule" is required'),
        ({"rule": "demo", "ttl": "soon"}, 400, "ttl"),
        ({"rule": "demo", "ttl": -5}, 400, "ttl"),
        ({"rule": "demo", "ports": ["udp/1"]}, 400, "unknown field(s) ports"),
        ({"rule": "demo", "source": "traffic"}, 400, "source"),
        ({"rule": "demo", "host": "192.168.1.77"}, 403, "admin token"),
        ([1, 2], 400, "JSON object"),
    ],
)
async def test_bad_requests_get_json_errors(client: ApiClient, body: object,
                                            status: int, text: str) -> None:
    r = await client.post("/api/v1/activations", json=body)
    assert r.status == status
    data = await r.json()
    assert text in data["error"]["message"]
    assert data["error"]["status"] == status


async def test_invalid_json_and_unknown_endpoint(client: ApiClient) -> None:
    r = await client.post("/api/v1/activations", data=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert "not valid JSON" in (await r.json())["error"]["message"]
    r = await client.get("/api/v1/nothing")
    assert r.status == 404
    assert "error" in await r.json()


async def test_admin_token_may_act_for_another_host(client: ApiClient,
                                                    svc: Service) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "other", "host": "192.168.1.77"},
                          headers=admin(svc))
    assert r.status == 201
    assert (await r.json())["host"] == "192.168.1.77"
    assert isinstance(svc.gateway, FakeGateway)
    assert svc.gateway.ports() == {"tcp/5000": "192.168.1.77"}
    # a client without the token may not end another host's activation
    act_id = (await r.json())["id"]
    r = await client.delete(f"/api/v1/activations/{act_id}")
    assert r.status == 403
    r = await client.delete(f"/api/v1/activations/{act_id}", headers=admin(svc))
    assert r.status == 200


async def test_wrong_token_is_not_admin(client: ApiClient) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "other", "host": "192.168.1.77"},
                          headers={"Authorization": "Bearer wrong"})
    assert r.status == 401  # said, not silently taken as "no token"
    assert "wrong admin token" in (await r.json())["error"]["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await client.get("/api/v1/status", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401  # even from loopback, which may read without a token
    assert (await client.get("/healthz", headers={"Authorization": "Bearer x"})).status == 200


async def test_token_file_is_private(svc: Service, tmp_path: Path) -> None:
    mode = (tmp_path / "api-token").stat().st_mode & 0o777
    assert mode == 0o600


async def test_stop_removes_all_mappings(tmp_path: Path, clock: FakeClock) -> None:
    gw = FakeGateway(clock)
    service = Service(parse_config(CONFIG), gw, clock=clock, state_dir=tmp_path)
    await service.start()
    await service.activate("demo", "192.168.1.10", ttl=60, source=Source.API)
    assert len(gw.ports()) == 5
    assert await service.stop() == 5
    assert gw.ports() == {}
