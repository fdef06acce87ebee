"""Who may do what over the API: the auth matrix, CSRF/DNS-rebinding guards and rate limits.

A test-only middleware presents the request as coming from ``X-Test-Remote`` (a LAN address),
so the server sees exactly what a request from another host would look like.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.api.ratelimit import RateLimiter
from igdtrigger.config import parse_config
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway

CONFIG = {
    "rules": [
        {"name": "demo", "open": ["udp/40000-40001"]},
        {"name": "other", "open": ["tcp/5000"]},
    ]
}
THIS_HOST = "192.168.1.10"  # the FakeGateway's local address: what loopback clients act for
LAN = "192.168.1.20"  # another host on the LAN, without the token
OTHER = "192.168.1.77"



@web.middleware
async def fake_remote(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    remote = request.headers.get("X-Test-Remote")
    if remote:
        request = request.clone(remote=remote)
    return await handler(request)


@pytest.fixture
async def svc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Service]:
    service = Service(parse_config(CONFIG), FakeGateway(clock, local_address=THIS_HOST),
                      clock=clock, state_dir=tmp_path)
    await service.start()
    yield service
    await service.stop()


async def _client(svc: Service, **kw: Any) -> ApiClient:
    client: ApiClient = TestClient(TestServer(make_app(svc, middlewares=[fake_remote], **kw),
                                           host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def client(svc: Service) -> AsyncIterator[ApiClient]:
    c = await _client(svc)
    yield c
    await c.close()


@pytest.fixture
async def public_client(svc: Service) -> AsyncIterator[ApiClient]:
    c = await _client(svc, public_read=True)
    yield c
    await c.close()


def lan(remote: str = LAN, **extra: str) -> dict[str, str]:
    return {"X-Test-Remote": remote, **extra}


def admin(svc: Service, remote: str = LAN) -> dict[str, str]:
    assert svc.api_token
    return lan(remote, Authorization=f"Bearer {svc.api_token}")


async def activate_for(client: ApiClient, svc: Service, host: str, rule: str = "other") -> str:
    r = await client.post("/api/v1/activations", json={"rule": rule, "host": host},
                          headers=admin(svc))
    assert r.status == 201, await r.text()
    return str((await r.json())["id"])


# --- the matrix ----------------------------------------------------------------------------

READ_ONLY = ["/api/v1/status", "/api/v1/mappings", "/metrics", "/api/v1/events"]
PUBLIC = ["/healthz", "/api/v1/openapi.json", "/", "/dashboard.js", "/dashboard.css"]


@pytest.mark.parametrize("path", READ_ONLY)
async def test_read_only_needs_token_from_the_lan(client: ApiClient, svc: Service,
                                                  path: str) -> None:
    r = await client.get(path, headers=lan())
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    err = (await r.json())["error"]
    assert err["status"] == 401
    assert "public_read" in err["message"] and "token" in err["message"]
    # a wrong token is no token
    r = await client.get(path, headers=lan(Authorization="Bearer not-the-token"))
    assert r.status == 401


@pytest.mark.parametrize("path", [p for p in READ_ONLY if p != "/api/v1/events"])
async def test_read_only_with_token_loopback_or_public_read(
        client: ApiClient, public_client: ApiClient, svc: Service, path: str) -> None:
    assert (await client.get(path, headers=admin(svc))).status == 200
    assert (await client.get(path)).status == 200  # loopback
    assert (await public_client.get(path, headers=lan())).status == 200


@pytest.mark.parametrize("path", PUBLIC)
async def test_public_endpoints(client: ApiClient, path: str) -> None:
    r = await client.get(path, headers=lan())
    assert r.status == 200, await r.text()


async def test_lan_client_acts_for_its_own_address_only(client: ApiClient, svc: Service) -> None:
    gw = svc.gateway
    assert isinstance(gw, FakeGateway)
    r = await client.get("/api/v1/rules", headers=lan())
    assert r.status == 200  # what may be activated is not a secret from those who may
    r = await client.post("/api/v1/activations", json={"rule": "demo"}, headers=lan())
    assert r.status == 201
    own = await r.json()
    assert own["host"] == LAN and own["state"] == "open"
    assert gw.ports() == {"udp/40000": LAN, "udp/40001": LAN}
    r = await client.post("/api/v1/activations", json={"rule": "demo", "host": LAN},
                          headers=lan())
    assert r.status == 201  # naming its own address explicitly is fine
    r = await client.post("/api/v1/activations", json={"rule": "other", "host": OTHER},
                          headers=lan())
    assert r.status == 403
    assert "admin token" in (await r.json())["error"]["message"]
    assert "tcp/5000" not in gw.ports()
    # another host's activation: invisible in the list, 403 to read, refresh or end
    theirs = await activate_for(client, svc, OTHER)
    r = await client.get("/api/v1/activations", headers=lan())
    listed = (await r.json())["activations"]
    assert {a["host"] for a in listed} == {LAN} and own["id"] in {a["id"] for a in listed}
    r = await client.get("/api/v1/activations", headers=admin(svc))
    assert {a["host"] for a in (await r.json())["activations"]} == {LAN, OTHER}
    assert (await client.get(f"/api/v1/activations/{theirs}", headers=lan())).status == 403
    assert (await client.post(f"/api/v1/activations/{theirs}/refresh", json={"ttl": 60},
                              headers=lan())).status == 403
    assert (await client.delete(f"/api/v1/activations/{theirs}", headers=lan())).status == 403
    assert gw.ports()["tcp/5000"] == OTHER
    # its own: readable, refreshable, endable
    assert (await client.get(f"/api/v1/activations/{own['id']}", headers=lan())).status == 200
    r = await client.post(f"/api/v1/activations/{own['id']}/refresh", json={"ttl": 60},
                          headers=lan())
    assert r.status == 200
    assert (await client.delete(f"/api/v1/activations/{own['id']}", headers=lan())).status == 200


async def test_admin_token_from_the_lan_may_do_anything(client: ApiClient, svc: Service) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "other", "host": OTHER},
                          headers=admin(svc))
    assert r.status == 201
    act_id = (await r.json())["id"]
    r = await client.get("/api/v1/activations", headers=admin(svc))
    assert [a["host"] for a in (await r.json())["activations"]] == [OTHER]
    assert (await client.delete(f"/api/v1/activations/{act_id}", headers=admin(svc))).status == 200


async def test_public_read_does_not_widen_acting(public_client: ApiClient, svc: Service) -> None:
    theirs = await activate_for(public_client, svc, OTHER)
    r = await public_client.get("/api/v1/activations", headers=lan())
    assert [a["host"] for a in (await r.json())["activations"]] == [OTHER]  # readable by all
    r = await public_client.delete(f"/api/v1/activations/{theirs}", headers=lan())
    assert r.status == 403
    r = await public_client.post("/api/v1/activations", json={"rule": "demo", "host": OTHER},
                                 headers=lan())
    assert r.status == 403


async def test_loopback_acts_for_this_host_not_others(client: ApiClient, svc: Service) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "demo"})
    assert r.status == 201
    assert (await r.json())["host"] == THIS_HOST
    theirs = await activate_for(client, svc, OTHER)
    assert (await client.delete(f"/api/v1/activations/{theirs}")).status == 403


async def test_bad_host_field(client: ApiClient) -> None:
    r = await client.post("/api/v1/activations", json={"rule": "demo", "host": "router.lan"},
                          headers=lan())
    assert r.status == 400
    assert "not an IP address" in (await r.json())["error"]["message"]


# --- browser-facing guards -------------------------------------------------------------------


async def test_dns_rebinding_host_header_refused(client: ApiClient, svc: Service) -> None:
    evil = {"Host": "attacker.example:8731"}
    r = await client.get("/api/v1/status", headers=evil)
    assert r.status == 403
    assert "DNS-rebinding" in (await r.json())["error"]["message"]
    r = await client.post("/api/v1/activations", json={"rule": "demo"}, headers=evil)
    assert r.status == 403
    assert (await client.get("/healthz", headers=evil)).status == 200  # public stays public
    ok = {"Host": "localhost:8731"}
    assert (await client.get("/api/v1/status", headers=ok)).status == 200
    token = {"Host": "attacker.example", "Authorization": f"Bearer {svc.api_token}"}
    assert (await client.get("/api/v1/status", headers=token)).status == 200


async def test_allowed_hosts_config(svc: Service) -> None:
    c = await _client(svc, allowed_hosts=["igd.home.arpa"])
    try:
        r = await c.get("/api/v1/status", headers={"Host": "igd.home.arpa:8731"})
        assert r.status == 200
        r = await c.get("/api/v1/status", headers={"Host": "other.home.arpa:8731"})
        assert r.status == 403
    finally:
        await c.close()


async def test_cross_site_post_refused(client: ApiClient, svc: Service) -> None:
    gw = svc.gateway
    assert isinstance(gw, FakeGateway)
    host = f"127.0.0.1:{client.port}"
    for origin in ("http://attacker.example", "null"):
        r = await client.post("/api/v1/activations", json={"rule": "demo"},
                              headers={"Origin": origin, "Host": host})
        assert r.status == 403, origin
        assert "cross-site" in (await r.json())["error"]["message"]
    assert gw.ports() == {}
    r = await client.post("/api/v1/activations", json={"rule": "demo"},
                          headers={"Origin": f"http://{host}", "Host": host})
    assert r.status == 201  # the dashboard itself: same origin


async def test_form_encoded_body_refused(client: ApiClient) -> None:
    # what a cross-site <form> could send without a CORS preflight
    r = await client.post("/api/v1/activations", data=b'{"rule": "demo"}',
                          headers={"Content-Type": "text/plain"})
    assert r.status == 415
    assert "application/json" in (await r.json())["error"]["message"]


# --- rate limits -----------------------------------------------------------------------------


async def test_rate_limit_429_with_retry_after(svc: Service) -> None:
    fake = FakeClock()
    c = await _client(svc, rate_limit=1.0, rate_burst=3, clock=fake)
    try:
        for _ in range(3):
            assert (await c.get("/api/v1/rules", headers=lan())).status == 200
        r = await c.get("/api/v1/rules", headers=lan())
        assert r.status == 429
        assert r.headers["Retry-After"] == "1"
        err = (await r.json())["error"]
        assert err["status"] == 429 and "too many requests" in err["message"]
        # per client: another address still has its whole bucket, even for a POST
        r = await c.post("/api/v1/activations", json={"rule": "demo"}, headers=lan(OTHER))
        assert r.status == 201
        # the token admin is a client like any other
        assert (await c.get("/healthz", headers=lan())).status == 429
        fake.advance(1.0)
        assert (await c.get("/api/v1/rules", headers=lan())).status == 200
        assert (await c.get("/api/v1/rules", headers=lan())).status == 429
        for _ in range(10):  # loopback (this host's own processes) is not limited
            assert (await c.get("/api/v1/rules")).status == 200
        r = await c.get("/metrics")
        assert 'igdtrigger_http_responses_total{code="429"} 3' in await r.text()
    finally:
        await c.close()


def test_token_bucket_refills_and_forgets() -> None:
    clock = FakeClock(0.0)
    rl = RateLimiter(2.0, 2, clock=clock, max_clients=2)
    assert rl.take("a") == 0 and rl.take("a") == 0
    wait = rl.take("a")
    assert wait == pytest.approx(0.5)
    assert RateLimiter.retry_after(wait) == "1"
    clock.advance(0.5)
    assert rl.take("a") == 0
    assert rl.take("a") > 0
    clock.advance(100)  # refills only up to the burst
    assert [rl.take("a") for _ in range(3)][2] > 0
    rl.take("b")
    rl.take("c")  # "a" is the least recently seen: forgotten
    assert "a" not in rl._buckets and len(rl._buckets) == 2
    assert rl.rejected == 3
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(0, 1)
