"""Case: hostile (no lab): what a hostile LAN host can make the service hold and spend (issue 13).

* 150,000 forged trigger flows (sources the neighbour table does not know): activations created
  and traced memory grown, vs the same flows from one source (the floor: one activation);
* tokenless ``POST /api/v1/activations`` (``ttl: 7d``) from one host, over the aiohttp test
  client: latency of the last 100 of 2,000 (each refreshes the one activation), vs ``GET
  /healthz`` on the same client (the floor), and the live activations left;
* the same POST with the engine at its bound of live activations (4,096), and ``/status``'s
  size there (it lists the first 200; the rest are paged).

In-memory router (tests/fakes.FakeGateway); the numbers are the service's own cost.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from igdtrigger.config import parse_config
from igdtrigger.core.engine import Engine
from igdtrigger.core.model import Flow, Proto

from .common import Bench, row, stats

NAME = "hostile"
FORGED = 150_000
RULES = [{"name": "game", "trigger": ["udp/27015"], "open": ["udp/40000"]}]
DST = ipaddress.IPv4Address("11.22.33.2")


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _forged(n: int, one_source: bool) -> tuple[int, float, float]:
    """(activations, kB traced, seconds per flow) after ``n`` trigger flows."""
    eng = Engine(parse_config({"rules": RULES}).rules, clock=_Clock(), tag="bench")
    base = int(ipaddress.IPv4Address("10.0.0.1"))
    flows = [Flow(Proto.UDP, ipaddress.IPv4Address(base + (0 if one_source else i)), DST,
                  40000 + i % 20000, 27015) for i in range(n)]
    eng.origin_of = lambda _a: None  # the neighbour table knows none of them
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for f in flows:
        eng.on_flow(f)
    took = time.perf_counter() - t0
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return len(eng.activations), grown / 1e3, took / n


async def _api(posts: int) -> dict[str, Any]:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from igdtrigger.api.app import make_app
    from igdtrigger.runtime.service import Service
    from tests.fakes import FakeClock, FakeGateway

    @web.middleware
    async def lan(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
        return await handler(request.clone(remote="192.168.1.20"))

    clock = FakeClock()
    svc = Service(parse_config({"api": {"allow": ["192.168.0.0/16"]}, "rules": RULES}),
                  FakeGateway(clock), clock=clock, state_dir=Path(tempfile.mkdtemp()))
    await svc.start()
    out: dict[str, Any] = {}
    try:
        app = make_app(svc, middlewares=[lan], rate_limit=1e6, rate_burst=10**6)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            post_t: list[float] = []
            health_t: list[float] = []
            for i in range(posts):
                t0 = time.perf_counter()
                r = await c.post("/api/v1/activations", json={"rule": "game", "ttl": "7d"})
                await r.read()
                if i >= posts - 100:
                    post_t.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await (await c.get("/healthz")).read()
                    health_t.append(time.perf_counter() - t0)
            out["post"], out["health"] = post_t, health_t
            out["live"] = len(svc.pipeline.engine.activations)
            engine = svc.pipeline.engine
            for i in range(engine.max_activations - len(engine.activations)):
                engine.activate("game", f"10.{i // 250}.{i % 250}.1", ttl=600)
            full: list[float] = []
            for _ in range(100):
                t0 = time.perf_counter()
                await (await c.post("/api/v1/activations",
                                    json={"rule": "game", "ttl": "7d"})).read()
                full.append(time.perf_counter() - t0)
            out["post_full"] = full
            out["status_bytes"] = len(json.dumps(svc.status()))
            out["full_live"] = len(svc.pipeline.engine.activations)
    finally:
        await svc.stop()
    return out


def run(b: Bench) -> dict[str, Any]:
    n = 30_000 if b.quick else FORGED
    acts, mb, per = _forged(n, one_source=False)
    acts1, mb1, per1 = _forged(n, one_source=True)
    api = asyncio.run(_api(500 if b.quick else 2000))
    ps, hs, fs = stats(api["post"]), stats(api["health"]), stats(api["post_full"])
    rows = [
        row(NAME, f"{n:,} forged trigger flows: activations held", {"n": 1, "median": acts,
                                                                     "p99": acts},
            "acts", ref="one real source", ref_median=acts1, ratio=acts / max(1, acts1),
            note=f"+{mb:.0f} kB traced (one source: +{mb1:.0f} kB)", key=True),
        row(NAME, "forged trigger flow, refused", {"n": n, "median": per * 1e6,
                                                   "p99": per * 1e6}, "us",
            ref="one source (refresh)", ref_median=per1 * 1e6, ratio=per / per1),
        row(NAME, "tokenless POST ttl 7d, one host, again and again", ps, "ms",
            ref="GET /healthz", ref_median=hs["median"], ratio=ps["median"] / hs["median"],
            note=f"{api['live']} live activation(s) after all of them", key=True),
        row(NAME, f"tokenless POST with {api['full_live']:,} live activations (the bound)",
            fs, "ms", ref="GET /healthz", ref_median=hs["median"],
            ratio=fs["median"] / hs["median"],
            note=f"/status {api['status_bytes'] / 1e3:.0f} kB (the first 200 listed)"),
    ]
    return {"rows": rows, "detail": {"forged": n, "forged_activations": acts,
                                     "forged_kb": mb, "api": api}}
