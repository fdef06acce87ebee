"""The API fuzzed from its own OpenAPI document (schemathesis) against a real `igdtrigger serve`
(built-in simulated router, loopback): no 5xx, every answer as documented, errors as JSON, and
nothing opened that no rule allows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igdtrigger.api.openapi import build_openapi
from igdtrigger.core.version import __version__
from tests.fakes import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
[gateway]
url = "simulate"

[detect]
methods = []

[[rules]]
name = "demo"
open = ["udp/40000-40001", "tcp/40005"]
idle_timeout = "1m"

[[rules]]
name = "other"
open = ["tcp/5000"]
"""
ALLOWED = {("UDP", 40000), ("UDP", 40001), ("TCP", 40005), ("TCP", 5000)}
EXAMPLES = int(os.environ.get("IGDTRIGGER_FUZZ_EXAMPLES", "25"))

schema = schemathesis.openapi.from_dict(build_openapi(__version__))


class Live:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "config.toml"
        cfg.write_text(CONFIG)
        state = tmp / "state"
        ready = tmp / "ready"
        env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(state), "PYTHONPATH": str(ROOT)}
        self.log = (tmp / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "igdtrigger", "serve", "--config", str(cfg), "--listen",
             f"127.0.0.1:{self.port}", "--ready-file", str(ready)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, ready, why=lambda: "serve failed")
        self.token = (state / "api-token").read_text().strip()

    def get(self, path: str) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("live"))
    yield server
    server.close()
    assert server.proc.returncode == 0


# the event stream never ends by itself: tested in test_api_events.py
@schema.exclude(path="/api/v1/events").parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_as_documented(case: schemathesis.Case[Any], live: Live) -> None:
    """Authenticated: every operation, with generated parameters and bodies."""
    response = case.call(base_url=live.url, headers={"Authorization": f"Bearer {live.token}"},
                         timeout=15)
    assert response.status_code < 500, response.text
    case.validate_response(response)
    if response.status_code >= 400 and case.path.startswith("/api/"):
        body = response.json()
        assert isinstance(body.get("error", {}).get("message"), str)
    mappings = live.get("/api/v1/mappings")["mappings"]
    assert isinstance(mappings, list)
    opened = {tuple(str(m["port"]).upper().split("/")) for m in mappings}
    assert {(p, int(n)) for p, n in opened} <= ALLOWED


@schema.include(method=["POST", "DELETE", "PUT", "PATCH"]).parametrize()
@settings(max_examples=max(5, EXAMPLES // 3), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_cross_site_changes_are_refused(case: schemathesis.Case[Any], live: Live) -> None:
    """A web page in the user's browser posting to the service (a foreign Origin, no token;
    forged forwarding headers change nothing): refused with a JSON error, nothing opened."""
    before = live.get("/api/v1/mappings")["mappings"]
    response = case.call(base_url=live.url, headers={"Origin": "http://evil.example",
                                                     "X-Forwarded-For": "192.168.1.66"},
                         timeout=15)
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["error"]["message"], str)
    assert live.get("/api/v1/mappings")["mappings"] == before


def raw(live: Live, method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
    req = urllib.request.Request(live.url + path, data=body, method=method, headers={
        "Authorization": f"Bearer {live.token}", "Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["POST", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(["/api/v1/activations", "/api/v1/activations/x",
                             "/api/v1/activations/x/heartbeat", "/api/v1/status"])
       | st.text(alphabet="/abcv1%?=&.-_~", max_size=40).map(lambda t: "/" + t),
       body=st.binary(max_size=300)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(
                          st.sampled_from(["rule", "open", "ttl", "host", "meta", "x"]), c,
                          max_size=4), max_leaves=10).map(lambda v: json.dumps(v).encode()),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-"
                              "urlencoded", "application/json; charset=latin-1"]))
def test_raw_bodies_never_break_the_api(live: Live, method: str, path: str, body: bytes,
                                        ctype: str) -> None:
    status, data = raw(live, method, path, body, ctype)
    assert status < 500, data
    if status >= 400:
        assert isinstance(json.loads(data)["error"]["message"], str)
    opened = {str(m["port"]).upper() for m in live.get("/api/v1/mappings")["mappings"]}
    assert {(p, int(n)) for p, n in (o.split("/") for o in opened)} <= ALLOWED


def test_oversized_body_is_refused(live: Live) -> None:
    status, data = raw(live, "POST", "/api/v1/activations",
                       b'{"rule": "demo", "x": "' + b"a" * 100_000 + b'"}', "application/json")
    assert status in (400, 413)
    assert "larger than" in json.loads(data)["error"]["message"] or status == 413
