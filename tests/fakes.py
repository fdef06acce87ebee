"""Test doubles: an in-memory router behind the Gateway interface, and a settable clock.

Also the one type of an aiohttp test client on the API (``ApiClient``), for fixtures'
annotations, and the helpers every test that starts ``igdtrigger serve`` needs (``free_port``,
``wait_ready``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from igdtrigger.core.errors import (
    GatewayUnreachable,
    LeaseRefused,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
)
from igdtrigger.core.model import MappingKey, MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import Capability, GatewayInfo, Granted, add_with_lease_fallback

# An aiohttp test client on the API's application (``make_app``): what API fixtures yield.
ApiClient = TestClient[web.Request, web.Application]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll ``pred`` every ``step`` s until it holds; fail the test naming ``what`` after
    ``timeout`` s. Returns the seconds it took (a measurement, never to be asserted on)."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(step)


def wait_ready(proc: subprocess.Popen[Any], ready: Path, *, timeout: float = 30,
               why: Callable[[], object] = lambda: "serve did not start") -> None:
    """Poll until ``proc`` created the file ``ready`` (``serve --ready-file``, a child's
    marker); fail with ``why()`` (evaluated only then, e.g. ``proc.communicate``) if the
    process exits first or ``timeout`` seconds pass. Generous by default: the CI is loaded."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, why()
        time.sleep(0.05)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeGateway:
    """A router in memory: mappings with leases, conflicts, and knobs for failures."""

    clock: FakeClock
    local_address: str = "192.168.1.10"
    external_address: str = "11.22.33.44"
    permanent_only: bool = False
    secure_mode: bool = False
    down: bool = False
    table: dict[MappingKey, tuple[RouterMapping, float]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    _info: GatewayInfo | None = None

    @property
    def info(self) -> GatewayInfo | None:
        return self._info

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.LIST}) if self._info is not None else frozenset()

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        raise AssertionError("FakeGateway has no add-any capability")

    def _check_up(self) -> None:
        if self.down:
            self._info = None
            raise GatewayUnreachable("router did not answer (connection refused)")

    def _expire(self) -> None:
        now = self.clock()
        for key, (_, until) in list(self.table.items()):
            if until <= now:
                del self.table[key]

    async def connect(self) -> GatewayInfo:
        self.calls.append("connect")
        self._check_up()
        self._info = GatewayInfo("fake", "fake://router", self.local_address,
                                 self.external_address)
        return self._info

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """Through the one lease fallback every backend uses (a 725 retried with lease 0)."""
        return await add_with_lease_fallback(lambda asked: self._add_once(spec, asked), lease)

    async def _add_once(self, spec: MappingSpec, lease: int) -> Granted:
        self.calls.append(f"add {spec.key}")
        self._check_up()
        self._expire()
        if lease and self.permanent_only:
            raise LeaseRefused("AddPortMapping", 725, "OnlyPermanentLeasesSupported")
        if self.secure_mode and spec.internal_client != self.local_address:
            raise NotAuthorized("AddPortMapping", 606, "Action not authorized")
        have = self.table.get(spec.key)
        if have is not None and have[0].internal_client != spec.internal_client:
            raise MappingConflict("AddPortMapping", 718, "ConflictInMappingEntry")
        until = self.clock() + lease if lease else float("inf")
        self.table[spec.key] = (
            RouterMapping(spec.proto, spec.external_port, spec.internal_client,
                          spec.internal_port, spec.description, True, lease),
            until,
        )
        return Granted(spec.external_port, lease)

    async def delete(self, proto: Proto, external_port: int) -> None:
        self.calls.append(f"delete {MappingKey(proto, external_port)}")
        self._check_up()
        self._expire()
        if self.table.pop(MappingKey(proto, external_port), None) is None:
            raise NoSuchMapping("DeletePortMapping", 714, "NoSuchEntryInArray")

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        self.calls.append(f"get {MappingKey(proto, external_port)}")
        self._check_up()
        self._expire()
        have = self.table.get(MappingKey(proto, external_port))
        return have[0] if have else None

    async def list(self) -> list[RouterMapping]:
        self.calls.append("list")
        self._check_up()
        self._expire()
        return [m for m, _ in self.table.values()]

    async def close(self) -> None:
        self.calls.append("close")

    def foreign(self, proto: Proto, port: int, client: str, desc: str = "someone else") -> None:
        self.table[MappingKey(proto, port)] = (
            RouterMapping(proto, port, client, port, desc, True, 0), float("inf"))

    def ports(self) -> dict[str, str]:
        self._expire()
        return {str(k): m.internal_client for k, (m, _) in sorted(self.table.items())}
