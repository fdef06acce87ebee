"""The OpenAPI document matches the application: every route documented, nothing invented."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from igdtrigger.api.access import ACCESS
from igdtrigger.api.app import make_app
from igdtrigger.api.openapi import build_openapi
from igdtrigger.config import parse_config
from igdtrigger.core.version import __version__
from igdtrigger.runtime.service import Service

from .fakes import ApiClient, FakeClock, FakeGateway

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def service(tmp_path: Path) -> Service:
    clock = FakeClock()
    return Service(parse_config({"rules": [{"name": "demo", "open": ["udp/40000"]}]}),
                   FakeGateway(clock), clock=clock, state_dir=tmp_path)


def app_operations(service: Service) -> dict[tuple[str, str], str]:
    """(method, path) -> access class, from the application's router."""
    app = make_app(service)
    access = app[ACCESS]
    out: dict[tuple[str, str], str] = {}
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert path, f"route without a path: {route!r}"
        out[(route.method.lower(), path)] = access[route].value
    return out


def doc_operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert method in METHODS, f"{path}: unexpected key {method!r}"
            yield method, path, op


def test_every_route_is_documented_and_every_documented_route_exists(service: Service) -> None:
    doc = build_openapi(__version__)
    routes = app_operations(service)
    documented = {(m, p): op["x-access"] for m, p, op in doc_operations(doc)}
    assert set(routes) - set(documented) == set(), "routes missing from openapi.py"
    assert set(documented) - set(routes) == set(), "openapi.py documents routes that do not exist"
    assert routes == documented, "access classes differ between api.ROUTES and openapi.py"


def test_document_is_well_formed() -> None:
    doc = build_openapi(__version__)
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == __version__
    schemas = doc["components"]["schemas"]
    text = json.dumps(doc)
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert ref in schemas, f"dangling $ref {ref}"
    op_ids: set[str] = set()
    for method, path, op in doc_operations(doc):
        assert op["operationId"] not in op_ids, f"duplicate operationId {op['operationId']}"
        op_ids.add(op["operationId"])
        assert op["responses"], f"{method} {path} has no responses"
        assert all(re.fullmatch(r"[1-5]\d\d", code) for code in op["responses"])
        params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert params == set(re.findall(r"\{(\w+)\}", path)), f"{method} {path} path params"
        if op["x-access"] == "read":
            assert "401" in op["responses"], f"{method} {path} should document 401"
        if op["x-access"] != "public":
            assert {"bearer": []} in op["security"]


@pytest.fixture
async def client(service: Service) -> AsyncIterator[ApiClient]:
    async with TestClient(TestServer(make_app(service), host="127.0.0.1")) as c:
        yield c


async def test_served_document_is_the_built_one(client: ApiClient) -> None:
    r = await client.get("/api/v1/openapi.json")
    assert r.status == 200
    assert await r.json() == build_openapi(__version__)


def test_readme_lists_every_api_path() -> None:
    readme = (ROOT / "README.md").read_text()
    for _method, path, op in doc_operations(build_openapi(__version__)):
        if op["x-access"] == "public" and not path.startswith(("/api", "/healthz", "/readyz")):
            continue  # the dashboard's own files
        assert f"`{path}`" in readme, f"README.md does not mention {path}"
