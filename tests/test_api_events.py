"""Server-sent events: changes arrive as they happen, bounded per client, with heartbeats."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.config import parse_config
from igdtrigger.runtime.events import MAX_SUBSCRIBERS_PER_CLIENT, SUBSCRIBER_QUEUE, EventHub
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway

CONFIG = {"rules": [{"name": "demo", "open": ["udp/40000-40001"]}]}


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    clock = FakeClock()
    service = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock, state_dir=tmp_path)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def client(svc: Service) -> AsyncIterator[ApiClient]:
    async with TestClient(TestServer(make_app(svc, sse_heartbeat=0.2), host="127.0.0.1")) as c:
        yield c


class Stream:
    """Parses an event stream: blocks of ``field: value`` lines separated by a blank line."""

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []

    async def next(self, timeout: float = 3.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                block = (await self.resp.content.readuntil(b"\n\n")).decode()
                fields: dict[str, Any] = {}
                for line in block.strip("\n").split("\n"):
                    if line.startswith(":"):
                        self.comments.append(line)
                        continue
                    name, _, value = line.partition(": ")
                    fields[name] = value
                if "data" in fields:
                    fields["data"] = json.loads(fields["data"])
                if fields:
                    return fields

    async def until(self, event: str, timeout: float = 3.0) -> dict[str, Any]:
        while True:
            ev = await self.next(timeout)
            if ev.get("event") == event:
                return ev


async def open_stream(client: ApiClient, **headers: str) -> Stream:
    resp = await client.get("/api/v1/events", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return Stream(resp)


async def test_activation_and_mapping_changes_stream_live(client: ApiClient, svc: Service) -> None:
    s = await open_stream(client)
    retry = await s.next()
    assert retry == {"retry": "3000"}
    hello = await s.next()
    assert hello["event"] == "hello" and hello["data"]["instance"] == svc.tag
    r = await client.post("/api/v1/activations", json={"rule": "demo", "ttl": 60})
    act = await r.json()
    ev = await s.until("activated")
    assert ev["data"]["activation"] == act["id"] and ev["data"]["rule"] == "demo"
    first = int(ev["id"])
    mapped = [await s.until("mapped"), await s.until("mapped")]
    assert sorted(m["data"]["mapping"] for m in mapped) == ["udp/40000", "udp/40001"]
    assert [int(m["id"]) for m in mapped] == [first + 1, first + 2]  # id = seq, increasing
    await client.delete(f"/api/v1/activations/{act['id']}")
    assert (await s.until("deactivated"))["data"]["activation"] == act["id"]
    assert (await s.until("unmapped"))["event"] == "unmapped"
    s.resp.close()


async def test_heartbeat_comments_keep_idle_streams_alive(client: ApiClient) -> None:
    s = await open_stream(client)
    await s.until("hello")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await s.next(timeout=0.5)  # nothing happens: only comments arrive
    assert s.comments and s.comments[0] == ": keep-alive"
    assert time.monotonic() - t0 >= 0.45
    s.resp.close()


async def test_last_event_id_replays_what_was_missed(client: ApiClient, svc: Service) -> None:
    s = await open_stream(client)
    hello = await s.until("hello")
    seq0 = hello["data"]["seq"]
    s.resp.close()
    await client.post("/api/v1/activations", json={"rule": "demo"})  # while disconnected
    s2 = await open_stream(client, **{"Last-Event-ID": str(seq0)})
    await s2.until("hello")
    replayed = [await s2.next() for _ in range(3)]
    assert [e["event"] for e in replayed] == ["activated", "mapped", "mapped"]
    assert int(replayed[0]["id"]) == seq0 + 1
    s2.resp.close()
    r = await client.get("/api/v1/events?since=x")
    assert r.status == 400


async def test_slow_client_gets_lost_not_unbounded_memory(client: ApiClient, svc: Service) -> None:
    s = await open_stream(client)
    await s.until("hello")
    extra = 44
    for i in range(SUBSCRIBER_QUEUE + extra):  # no await: the stream cannot drain meanwhile
        svc.hub.publish({"event": "test", "n": i})
    lost = await s.next()
    assert lost["event"] == "lost"
    assert lost["data"]["dropped"] == extra
    first = await s.next()
    assert first["data"]["n"] == extra  # the oldest were dropped, the newest kept
    s.resp.close()


async def test_streams_per_client_are_limited(client: ApiClient) -> None:
    streams = [await open_stream(client) for _ in range(MAX_SUBSCRIBERS_PER_CLIENT)]
    r = await client.get("/api/v1/events")
    assert r.status == 429
    assert "event streams open" in (await r.json())["error"]["message"]
    for s in streams:
        s.resp.close()


async def test_shutdown_ends_open_streams_promptly(svc: Service) -> None:
    client: ApiClient = TestClient(TestServer(make_app(svc), host="127.0.0.1"))
    await client.start_server()
    s = await open_stream(client)
    await s.until("hello")
    assert len(svc.hub.subscribers) == 1
    t0 = time.monotonic()
    await client.close()
    assert time.monotonic() - t0 < 3.0
    assert svc.hub.subscribers == set()


def test_hub_bounds_and_history() -> None:
    hub = EventHub(history=3)
    sub = hub.subscribe("a", maxlen=2)
    for i in range(5):
        hub.publish({"event": "x", "n": i})
    events, dropped = sub.take()
    assert [e["n"] for e in events] == [3, 4] and dropped == 3
    assert [e["seq"] for e in hub.since(0)] == [3, 4, 5]  # history is bounded too
    assert hub.since(4) == [hub.history[-1]]
    hub.unsubscribe(sub)
    hub.publish({"event": "x"})
    assert sub.take() == ([], 0)
