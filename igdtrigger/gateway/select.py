"""Choosing a gateway backend: by configuration, and by what the router actually speaks.

``FallbackGateway`` tries its candidates in order on ``connect`` and delegates to the first that
works; when that one stops answering it forgets the choice, so the next ``connect`` probes again
(a router restart can change what works). With ``parallel=True`` it probes all candidates at
once, each bounded in time, and takes the first in rank that answered as soon as every one
ranked above it failed (the rest are not waited for).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from igdtrigger.core.errors import ConfigError, GatewayError, GatewayNotFound, GatewayUnreachable
from igdtrigger.core.model import MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import (
    AdoptsLeftovers,
    Capability,
    CheckedAdd,
    Gateway,
    GatewayInfo,
    Granted,
    add_if_free,
)
from igdtrigger.gateway.upnp.miniupnpc import MiniupnpcGateway  # the C binding loads on connect
from igdtrigger.gateway.upnp.soap import SoapGateway
from igdtrigger.netutil import default_gateway

__all__ = [
    "FallbackGateway", "OnCall", "build_gateway", "forget_connection", "miniupnpc_available",
    "prime_location", "set_lost_state_handler",
]

log = logging.getLogger("igdtrigger.gateway")

OnCall = Callable[[str, float, bool], None]
T = TypeVar("T")


class FallbackGateway:
    """The first of several gateways that connects; re-chosen after it fails."""

    def __init__(self, candidates: Sequence[tuple[str, Gateway]], *, parallel: bool = False,
                 probe_timeout: float = 2.0) -> None:
        if not candidates:
            raise ValueError("no gateway candidates")
        self.candidates = list(candidates)
        self.parallel = parallel
        self.probe_timeout = probe_timeout
        self.current: Gateway | None = None
        self.current_name = ""
        self.probe_results: dict[str, str] = {}  # name -> "ok" or the error

    @property
    def info(self) -> GatewayInfo | None:
        """The chosen backend's ``info`` (``None`` before one connected)."""
        return self.current.info if self.current is not None else None

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The chosen backend's (empty before one connected)."""
        return self.current.capabilities if self.current is not None else frozenset()

    async def connect(self) -> GatewayInfo:
        """Keep the chosen backend if it still answers, else probe the candidates (in order, or in
        parallel); raises ``GatewayNotFound`` naming each one's error when none answers."""
        if self.current is not None:
            try:
                return await self.current.connect()
            except GatewayError:
                self.current = None
        if self.parallel:
            return await self._probe_parallel()
        errors: list[str] = []
        for name, gw in self.candidates:
            try:
                info = await gw.connect()
            except GatewayError as exc:
                self.probe_results[name] = str(exc)
                errors.append(f"{name}: {exc}")
                continue
            self.probe_results[name] = "ok"
            self._choose(name, gw)
            return info
        raise GatewayNotFound("; ".join(errors))

    async def _probe_parallel(self) -> GatewayInfo:
        """Probe every candidate at once; the first in order among those that answer is chosen
        as soon as it is known (every candidate before it failed): the rest are not waited for
        (a router that drops NAT-PMP/PCP silently held an answered UPnP for ``probe_timeout``,
        3 s by default, before anything could be mapped; issue 17)."""
        async def attempt(gw: Gateway) -> GatewayInfo:
            async with asyncio.timeout(self.probe_timeout):
                return await gw.connect()

        tasks = [asyncio.create_task(attempt(gw)) for _, gw in self.candidates]
        pending = set(tasks)
        try:
            while pending and not _decided(tasks):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # a stop while the router is still being looked for: end every probe and take
            # their outcomes (unretrieved, each was logged as a traceback at exit)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for task in pending:  # a preferred candidate answered: these are not needed
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        best: tuple[str, Gateway, GatewayInfo] | None = None
        for (name, gw), task in zip(self.candidates, tasks, strict=True):
            if task.cancelled():
                self.probe_results[name] = (f"not waited for ({best[0]} answered first)"
                                            if best is not None else "cancelled")
                continue
            exc = task.exception()
            if exc is None:
                self.probe_results[name] = "ok"
                if best is None:
                    best = (name, gw, task.result())
            else:
                self.probe_results[name] = (
                    f"no answer within {self.probe_timeout:g}s" if isinstance(exc, TimeoutError)
                    else str(exc))
        if best is None:
            raise GatewayNotFound("; ".join(f"{n}: {e}" for n, e in self.probe_results.items()))
        self._choose(best[0], best[1])
        return best[2]

    def _choose(self, name: str, gw: Gateway) -> None:
        if name != self.current_name:
            log.info("gateway protocol: %s", name)
        self.current, self.current_name = gw, name

    async def _gw(self) -> Gateway:
        if self.current is None:
            await self.connect()
        assert self.current is not None
        return self.current

    async def _on_current(self, op: Callable[[Gateway], Awaitable[T]]) -> T:
        """Run ``op`` on the chosen backend; forget the choice when the router stops answering
        (the next ``connect`` probes again)."""
        gw = await self._gw()
        try:
            return await op(gw)
        except GatewayUnreachable:
            self.current = None
            raise

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """``Gateway.add`` on the chosen backend."""
        return await self._on_current(lambda gw: gw.add(spec, lease))

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """``Gateway.add_any`` on the chosen backend."""
        return await self._on_current(lambda gw: gw.add_any(spec, lease))

    # s17a (issue 17) hook: the check and the add as one job on the chosen backend
    async def add_if_free(self, spec: MappingSpec, lease: int) -> CheckedAdd:
        """``base.add_if_free`` on the chosen backend (its own, faster one where it has it)."""
        return await self._on_current(lambda gw: add_if_free(gw, spec, lease))

    async def delete(self, proto: Proto, external_port: int) -> None:
        """``Gateway.delete`` on the chosen backend."""
        await self._on_current(lambda gw: gw.delete(proto, external_port))

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """``Gateway.get`` on the chosen backend."""
        return await self._on_current(lambda gw: gw.get(proto, external_port))

    async def list(self) -> list[RouterMapping]:
        """``Gateway.list`` on the chosen backend."""
        return await self._on_current(lambda gw: gw.list())

    # -- base.AdoptsLeftovers, for the candidates that have it ---------------------------------

    def use_nonce_key(self, key: bytes) -> None:
        """Pass the key to every candidate that adopts leftovers."""
        for _, gw in self.candidates:
            if isinstance(gw, AdoptsLeftovers):
                gw.use_nonce_key(key)

    def mapping_nonce(self, spec: MappingSpec) -> bytes:
        """The PCP candidate's nonce (which candidate will map it is not known yet)."""
        for _, gw in self.candidates:
            if isinstance(gw, AdoptsLeftovers) and (nonce := gw.mapping_nonce(spec)):
                return nonce
        return b""

    def adopt(self, spec: MappingSpec, nonce: bytes = b"") -> bool:
        """The chosen backend's answer; True for UPnP, whose delete reaches any port."""
        gw = self.current
        return gw.adopt(spec, nonce) if isinstance(gw, AdoptsLeftovers) else True

    async def close(self) -> None:
        """Close every candidate (errors ignored)."""
        for _, gw in self.candidates:
            with contextlib.suppress(Exception):
                await gw.close()


def _decided(tasks: Sequence[asyncio.Task[GatewayInfo]]) -> bool:
    """Is the choice among parallel probes (in order of preference) known: some probe
    answered and every one before it failed, or all are done?"""
    for task in tasks:
        if not task.done():
            return False
        if not task.cancelled() and task.exception() is None:
            return True
    return True


def miniupnpc_available() -> bool:
    """Is the miniupnpc binding importable? (It is optional in practice: a platform without a
    binary wheel and without a compiler installs igdtrigger without it.)"""
    try:
        return importlib.util.find_spec("miniupnpc") is not None
    except (ImportError, ValueError):
        return False


_said_no_miniupnpc = False


def _say_no_miniupnpc() -> None:
    global _said_no_miniupnpc
    if not _said_no_miniupnpc:
        _said_no_miniupnpc = True
        log.info("miniupnpc is not installed: UPnP IGD through igdtrigger's own SOAP client")


def build_gateway(url: str | None, *, backend: str = "auto", protocol: str = "upnp",
                  discover_timeout: float = 2.0, on_call: OnCall | None = None) -> Gateway:
    """The gateway for ``[gateway] protocol`` and ``backend``.

    UPnP IGD: miniupnpc, our SOAP client, or (``auto``) miniupnpc falling back to our tolerant
    client where miniupnpc cannot use the router's description. ``protocol = "auto"`` probes
    UPnP, PCP and NAT-PMP in parallel and prefers them in that order among those that answer.
    """

    def upnp() -> Gateway:
        soap = SoapGateway(url, discover_timeout=discover_timeout, on_call=on_call)
        if backend == "soap":
            return soap
        if not miniupnpc_available():
            if backend == "miniupnpc":
                raise ConfigError("miniupnpc is not installed here (no binary wheel for this "
                                  "platform?): pip install miniupnpc (needs a C compiler), or "
                                  'set backend = "auto" or "soap"', field="gateway.backend")
            _say_no_miniupnpc()
            return soap  # the same protocol through our own SOAP client
        mini = MiniupnpcGateway(url, discover_timeout=discover_timeout, on_call=on_call)
        if backend == "miniupnpc":
            return mini
        return FallbackGateway([("upnp-igd/miniupnpc", mini), ("upnp-igd/soap", soap)])

    if protocol == "upnp":
        return upnp()
    router = (urllib.parse.urlsplit(url).hostname if url else None) or default_gateway()
    if router is None:
        if protocol != "auto":
            raise ConfigError("cannot tell the router's address for NAT-PMP/PCP: no default "
                              "route; set [gateway] url (its host is used)", field="gateway.url")
        return upnp()
    # NAT-PMP/PCP only when asked for: a standalone `run` on the default UPnP loads less
    from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway

    pcp = PcpGateway(router, on_call=on_call, listen_announcements=True)
    pmp = NatPmpGateway(router, on_call=on_call, listen_announcements=True)
    if protocol == "pcp":
        return pcp
    if protocol == "natpmp":
        return pmp
    return FallbackGateway([("upnp-igd", upnp()), ("pcp", pcp), ("nat-pmp", pmp)],
                           parallel=True, probe_timeout=discover_timeout + 1.0)


def set_lost_state_handler(gateway: Gateway, handler: Callable[[str], None]) -> None:
    """Tell NAT-PMP/PCP backends (however wrapped) whom to call when the router lost state."""
    if isinstance(gateway, FallbackGateway):
        for _, gw in gateway.candidates:
            set_lost_state_handler(gw, handler)
    elif hasattr(gateway, "on_lost_state"):
        gateway.on_lost_state = handler


def forget_connection(gateway: Gateway, location: str | None = None) -> None:
    """Make a UPnP backend (however wrapped) reconnect, at ``location`` if given."""
    if isinstance(gateway, FallbackGateway):
        if gateway.current is not None:
            forget_connection(gateway.current, location)
    elif hasattr(gateway, "forget"):
        gateway.forget(location)


def prime_location(gateway: Gateway, location: str) -> None:
    """Have every UPnP backend (however wrapped) try the description URL ``location`` first at
    its next ``connect``, discovering at once when the router is not usable there (the way a
    router's SSDP NOTIFY is used; ignored where ``gateway.url`` pins one)."""
    if isinstance(gateway, FallbackGateway):
        for _, gw in gateway.candidates:
            prime_location(gw, location)
    elif hasattr(gateway, "forget"):
        gateway.forget(location)
