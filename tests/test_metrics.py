"""`/metrics`: a real scrape, parsed by prometheus_client's own parser, agrees with the service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.app import make_app
from igdtrigger.api.metrics import LATENCY_BUCKETS, Metrics
from igdtrigger.config import parse_config
from igdtrigger.core.model import Proto
from igdtrigger.gateway.select import build_gateway
from igdtrigger.runtime.service import Service
from igdtrigger.sim.router import SimulatedIgdServer

from .fakes import ApiClient, FakeClock, FakeGateway

parser = pytest.importorskip("prometheus_client.parser")

CONFIG = {"rules": [{"name": "demo", "open": ["udp/40000-40002", "tcp/40005"]},
                    {"name": "taken", "open": ["tcp/5000"]}]}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    kinds: dict[str, str] = {}
    samples: Samples = {}
    for fam in parser.text_string_to_metric_families(text):
        kinds[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return kinds, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(client: ApiClient) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return await r.text()


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedIgdServer]:
    server = SimulatedIgdServer()
    await server.start()
    yield server
    await server.close()


async def test_scrape_against_the_simulated_router(tmp_path: Path,
                                                   sim: SimulatedIgdServer) -> None:
    metrics = Metrics()
    gw = build_gateway(sim.url, backend="soap", on_call=metrics.on_router_call)
    svc = Service(parse_config(CONFIG), gw, state_dir=tmp_path)
    await svc.start()
    try:
        async with TestClient(TestServer(make_app(svc, metrics=metrics),
                                         host="127.0.0.1")) as client:
            r = await client.post("/api/v1/activations", json={"rule": "demo", "ttl": 60})
            assert (await r.json())["state"] == "open"
            kinds, samples = parse(await scrape(client))
    finally:
        await svc.stop()
    assert kinds["igdtrigger_router_request_seconds"] == "histogram"
    assert kinds["igdtrigger_gateway_up"] == "gauge"
    assert kinds["igdtrigger_errors"] == "counter"  # the parser strips _total from families
    assert value(samples, "igdtrigger_gateway_up", protocol="upnp-igd") == 1
    assert value(samples, "igdtrigger_activations", source="api") == 1
    assert value(samples, "igdtrigger_mappings", protocol="udp", state="active") == 3
    assert value(samples, "igdtrigger_mappings", protocol="tcp", state="active") == 1
    assert value(samples, "igdtrigger_mapping_operations_total", op="add") == 4
    adds = value(samples, "igdtrigger_router_requests_total", action="AddPortMapping",
                 result="ok")
    assert adds == 4
    count = value(samples, "igdtrigger_router_request_seconds_count", action="AddPortMapping")
    assert count == adds
    assert value(samples, "igdtrigger_router_request_seconds_bucket", action="AddPortMapping",
                 le="+Inf") == count
    buckets = [value(samples, "igdtrigger_router_request_seconds_bucket",
                     action="AddPortMapping", le=str(b)) for b in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)  # cumulative
    assert 0 < value(samples, "igdtrigger_router_request_seconds_sum",
                     action="AddPortMapping") < 5
    # the API's own answer time, by route template (the activation waited for the router)
    assert kinds["igdtrigger_api_request_seconds"] == "histogram"
    route = "POST /api/v1/activations"
    assert value(samples, "igdtrigger_api_request_seconds_count", route=route) == 1
    router_time = value(samples, "igdtrigger_router_request_seconds_sum",
                        action="AddPortMapping")
    assert value(samples, "igdtrigger_api_request_seconds_sum", route=route) >= router_time


async def test_api_latency_labels_stay_bounded(tmp_path: Path) -> None:
    """A scanner's random paths and methods must not grow the label set."""
    clock = FakeClock()
    svc = Service(parse_config(CONFIG), FakeGateway(clock), clock=clock, state_dir=tmp_path)
    metrics = Metrics()
    await svc.start()
    try:
        async with TestClient(TestServer(make_app(svc, metrics=metrics),
                                         host="127.0.0.1")) as client:
            for i in range(20):
                await client.get(f"/wp-admin/{i}.php")
                await client.request("PROPFIND" + "X" * i, "/api/v1/status")
            r = await client.delete("/api/v1/activations/nope")
            assert r.status == 404
            text = await scrape(client)
    finally:
        await svc.stop()
    _, samples = parse(text)
    routes = {dict(labels)["route"] for name, labels in samples
              if name == "igdtrigger_api_request_seconds_count"}
    assert routes == {"GET other", "OTHER other", "DELETE /api/v1/activations/{id}"}
    assert value(samples, "igdtrigger_api_request_seconds_count", route="GET other") == 20


async def test_errors_by_kind_and_gateway_down(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = FakeGateway(clock)
    gw.foreign(Proto.TCP, 5000, "192.168.1.99")  # someone else holds the port
    svc = Service(parse_config(CONFIG), gw, clock=clock, state_dir=tmp_path)
    metrics = Metrics()
    await svc.start()
    try:
        async with TestClient(TestServer(make_app(svc, metrics=metrics),
                                         host="127.0.0.1")) as client:
            r = await client.post("/api/v1/activations", json={"rule": "taken"})
            assert (await r.json())["state"] == "failed"
            metrics.on_router_call("AddPortMapping", 0.2, False)
            metrics.on_router_call("AddPortMapping", 0.02, True)
            _, samples = parse(await scrape(client))
            assert value(samples, "igdtrigger_errors_total", kind="mapping_conflict") == 1
            assert value(samples, "igdtrigger_errors_total", kind="router_request") == 1
            assert value(samples, "igdtrigger_mappings", protocol="tcp", state="conflict") == 1
            assert value(samples, "igdtrigger_router_request_seconds_bucket",
                         action="AddPortMapping", le="0.025") == 1
            assert value(samples, "igdtrigger_router_request_seconds_bucket",
                         action="AddPortMapping", le="0.25") == 2
            assert value(samples, "igdtrigger_gateway_up", protocol="fake") == 1
            gw.down = True
            svc.pipeline.mapper.gateway_up = False  # as the mapper marks it on its next failed call
            gw._info = None
            _, samples = parse(await scrape(client))
            assert value(samples, "igdtrigger_gateway_up", protocol="") == 0
            assert value(samples, "igdtrigger_http_responses_total", code="201") == 1
    finally:
        gw.down = False
        await svc.stop()


def test_label_values_are_escaped() -> None:
    from igdtrigger.api.metrics import _labels

    text = "# TYPE x gauge\nx" + _labels(action='We"ird\\Action\n') + " 1\n"
    _, samples = parse(text)
    assert value(samples, "x", action='We"ird\\Action\n') == 1
