"""What the NAT-PMP and PCP backends share: the transport, this client's own table of granted
mappings, epoch checks, announcements and per-mapping locks (``PortMapGateway``).

Neither protocol can list or look up mappings: ``get()`` and ``list()`` report this client's
own table (``HeldMapping``) until the entries expire, are deleted, or the router is seen to
lose its state (RFC 6886 §3.6, RFC 6887 §8.5: the client's table is emptied, ``epoch_resets``
counts it and ``on_lost_state(reason)`` runs: re-apply every mapping).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal, TypedDict, TypeVar

from igdtrigger.core.errors import ConfigError, GatewayUnreachable, MappingConflict
from igdtrigger.core.model import MappingKey, MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import Capability, GatewayInfo, Granted, counts_as_public
from igdtrigger.gateway.natpmp.codec import (
    ANNOUNCE_GROUP,
    ANNOUNCE_PORT,
    DEFAULT_PERMANENT_LIFETIME,
    MAX_LIFETIME,
    PCP_VERSION,
    PMP_VERSION,
    SERVER_PORT,
    EpochTracker,
    PcpOp,
    PmpOp,
    decode_pcp_reply,
    decode_pmp_reply,
)
from igdtrigger.gateway.natpmp.transport import DatagramClient, listen_announcements

__all__ = ["HeldMapping", "PortMapGateway", "PortMapOptions"]

log = logging.getLogger("igdtrigger.gateway.natpmp")
T = TypeVar("T")


@dataclass(slots=True)
class HeldMapping:
    """A mapping this client was granted."""

    spec: MappingSpec
    external_port: int  # as assigned
    external_ip: str
    lifetime: int  # granted, seconds
    granted_at: float  # clock() time
    nonce: bytes = b""  # PCP: the nonce that created it (needed to refresh or delete)

    @property
    def expires_at(self) -> float:
        """When the lease ends (same clock as ``granted_at``, seconds)."""
        return self.granted_at + self.lifetime


class PortMapOptions(TypedDict, total=False):
    """The options every NAT-PMP/PCP backend takes (``PortMapGateway``'s keywords)."""

    port: int
    bind_ip: str | None
    initial_timeout: float
    total_timeout: float
    permanent_lifetime: int
    exact_port: bool
    max_in_flight: int
    on_lost_state: Callable[[str], None] | None
    on_call: Callable[[str, float, bool], None] | None
    listen_announcements: bool
    announce_group: str
    announce_port: int
    clock: Callable[[], float]


class PortMapGateway:
    """What NAT-PMP and PCP share: transport, own table, epoch checks, locking."""

    protocol = ""
    _rule: Literal["nat-pmp", "pcp"] = "nat-pmp"

    def __init__(
        self,
        gateway_ip: str,
        *,
        port: int = SERVER_PORT,
        bind_ip: str | None = None,
        initial_timeout: float = 0.25,
        total_timeout: float = 2.0,
        permanent_lifetime: int = DEFAULT_PERMANENT_LIFETIME,
        exact_port: bool = True,
        max_in_flight: int = 16,
        on_lost_state: Callable[[str], None] | None = None,
        on_call: Callable[[str, float, bool], None] | None = None,
        listen_announcements: bool = False,
        announce_group: str = ANNOUNCE_GROUP,
        announce_port: int = ANNOUNCE_PORT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            ipaddress.ip_address(gateway_ip)
        except ValueError:
            raise ConfigError(f"gateway address {gateway_ip!r} is not an IP address") from None
        if not 1 <= permanent_lifetime <= MAX_LIFETIME:
            raise ConfigError(f"permanent_lifetime {permanent_lifetime} is outside "
                              f"1-{MAX_LIFETIME} (0 would delete the mapping)")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        self.gateway_ip = gateway_ip
        self.port = port
        self.permanent_lifetime = permanent_lifetime
        self.exact_port = exact_port
        self.on_lost_state = on_lost_state
        self.on_call = on_call
        self.listen_announcements = listen_announcements
        self.announce_group = announce_group
        self.announce_port = announce_port
        self.clock = clock
        self.client = DatagramClient(gateway_ip, port, bind_ip=bind_ip,
                                     initial_timeout=initial_timeout,
                                     total_timeout=total_timeout)
        self.epoch = EpochTracker(self._rule)
        self.epoch_resets = 0  # times the epoch check showed that the router lost its state
        self.announcements = 0  # unsolicited announcements received from the router
        self.lost_state = False  # set when the router lost its state; the caller may clear it
        self.last_lost_reason = ""
        self._held: dict[MappingKey, HeldMapping] = {}
        # Entries dropped when the router lost its state: not reported by get()/list(), but
        # kept so that a later delete (or PCP refresh, with the same nonce) still works.
        self._stale: dict[MappingKey, HeldMapping] = {}
        self._info: GatewayInfo | None = None
        self._connect_lock = asyncio.Lock()
        self._locks: dict[object, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._announce: asyncio.DatagramTransport | None = None
        self._announce_last = -math.inf
        self._announce_gap = 0.0
        self.nonce_key: bytes | None = None

    # -- Gateway protocol ---------------------------------------------------------------------

    @property
    def info(self) -> GatewayInfo | None:
        """What the last ``connect`` found, or ``None``."""
        return self._info

    async def connect(self) -> GatewayInfo:
        """Ask the router for its external address (once, shared by concurrent callers). Raises
        a ``GatewayError`` (``GatewayTimeout``, ``GatewayUnreachable``...) when it does not
        answer."""
        if self._info is not None:
            return self._info
        async with self._connect_lock:
            if self._info is not None:
                return self._info
            if not self.client.is_open:
                await self.client.open()
            info = await self._timed("connect", self._probe())
            self._info = info
            if self.listen_announcements and self._announce is None:
                await self._start_listener(info.local_address)
            warning = info.external_warning()
            if warning is not None:
                log.warning("%s: %s", self.protocol, warning)
            log.info("using %s at %s (external address %s, we are %s)", self.protocol,
                     info.location, info.external_address or "unknown", info.local_address)
            return info

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The router always picks the external port (ADD_ANY); it cannot list its table."""
        return frozenset({Capability.ADD_ANY}) if self._info is not None else frozenset()

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """Map ``spec`` (``exact_port``: only on its own external port, else
        ``MappingConflict``). Lifetimes are always timed here: no lease fallback applies."""
        return await self._map(spec, lease, self.exact_port)

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """Map ``spec`` on whatever external port the router assigns (kept and reported in
        ``Granted.external_port``; VPN NAT-PMP gateways ignore the suggested port)."""
        return await self._map(spec, lease, False)

    async def _map(self, spec: MappingSpec, lease: int, exact: bool) -> Granted:
        raise NotImplementedError

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """This client's own entry (the protocols cannot query the router), or ``None``."""
        held = self._live(MappingKey(proto, external_port))
        return None if held is None else self._as_router_mapping(held)

    async def list(self) -> list[RouterMapping]:
        """This client's own live mappings (the protocols cannot list the router's table)."""
        out = []
        for key in sorted(self._held):
            held = self._live(key)
            if held is not None:
                out.append(self._as_router_mapping(held))
        return out

    async def close(self) -> None:
        """Close the socket and the announcement listener, and forget the connection."""
        self.client.close()
        if self._announce is not None:
            self._announce.close()
            self._announce = None
        self._info = None

    # -- leftovers of an earlier run (``base.AdoptsLeftovers``) --------------------------------

    def use_nonce_key(self, key: bytes) -> None:
        """Derive PCP mapping nonces from ``key`` (a secret kept across runs), not at random."""
        self.nonce_key = bytes(key) or None

    def mapping_nonce(self, spec: MappingSpec) -> bytes:
        """The nonce a new mapping for ``spec`` is requested with; b"" when the protocol has
        none (NAT-PMP) or it is random (no ``nonce_key``)."""
        return b""

    def adopt(self, spec: MappingSpec, nonce: bytes = b"") -> bool:
        """Take up a mapping an earlier run of ours may have left, so that ``delete()`` (or a
        refresh) can reach it; it is not reported by ``get()``/``list()``. ``nonce``: what the
        journal recorded it with (PCP). False when this protocol cannot delete it from here:
        NAT-PMP for another host than this one, PCP without its nonce."""
        if self._known(spec.key) is not None:
            return True  # this run holds it already
        if not self._adoptable(spec, nonce):
            return False
        self._stale[spec.key] = HeldMapping(spec, spec.external_port, "", 0, self.clock(),
                                            nonce)
        return True

    def _adoptable(self, spec: MappingSpec, nonce: bytes) -> bool:
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------

    def held(self) -> dict[MappingKey, HeldMapping]:
        """A copy of this client's table (live and expired entries)."""
        return dict(self._held)

    def _live(self, key: MappingKey) -> HeldMapping | None:
        held = self._held.get(key)
        if held is not None and self.clock() >= held.expires_at:
            del self._held[key]
            return None
        return held

    def _known(self, key: MappingKey) -> HeldMapping | None:
        """The entry for ``key``, live, expired or dropped after a loss of router state."""
        return self._held.get(key) or self._stale.get(key)

    def _forget(self, key: MappingKey) -> None:
        self._held.pop(key, None)
        self._stale.pop(key, None)

    def _remember(self, key: MappingKey, held: HeldMapping) -> None:
        self._stale.pop(key, None)
        self._held[key] = held

    def _as_router_mapping(self, held: HeldMapping) -> RouterMapping:
        remaining = max(1, math.ceil(held.expires_at - self.clock()))
        return RouterMapping(
            proto=held.spec.proto,
            external_port=held.external_port,
            internal_client=held.spec.internal_client,
            internal_port=held.spec.internal_port,
            description=held.spec.description,
            enabled=True,
            lease_remaining=remaining,
        )

    def _lifetime(self, lease: int) -> int:
        lease = int(lease)
        return self.permanent_lifetime if lease <= 0 else min(lease, MAX_LIFETIME)

    def _lock(self, key: object) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _ready(self) -> GatewayInfo:
        return self._info if self._info is not None else await self.connect()

    async def _timed(self, action: str, coro: Awaitable[T]) -> T:
        t0 = time.perf_counter()
        ok = False
        try:
            result = await coro
            ok = True
            return result
        except GatewayUnreachable:
            self._info = None  # probe again before the next request
            raise
        finally:
            if self.on_call is not None:
                self.on_call(action, time.perf_counter() - t0, ok)

    def _observe_epoch(self, epoch: int | None) -> None:
        if epoch is None:
            return
        prev = self.epoch.server
        if self.epoch.observe(epoch, self.clock()):
            self.epoch_resets += 1
            self._state_lost(
                f"router epoch went from {prev} to {epoch}: it restarted or lost its mappings")

    def _state_lost(self, reason: str) -> None:
        self.lost_state = True
        self.last_lost_reason = reason
        count = len(self._held)
        self._stale.update(self._held)
        self._held.clear()
        log.warning("%s: %s; %d mapping(s) must be re-applied", self.protocol, reason, count)
        if self.on_lost_state is not None:
            try:
                self.on_lost_state(reason)
            except Exception:
                log.exception("on_lost_state callback failed")

    def _set_external(self, address: str | None) -> None:
        if not address or address in ("0.0.0.0", "::") or self._info is None:
            return
        if address != self._info.external_address:
            if self._info.external_address:
                log.info("%s router's external address changed: %s -> %s", self.protocol,
                         self._info.external_address, address)
            self._info = replace(self._info, external_address=address)

    @staticmethod
    def _check_spec(spec: MappingSpec) -> None:
        for name, port in (("external", spec.external_port), ("internal", spec.internal_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name} port {port} of {spec.key} is outside 1-65535")

    async def _start_listener(self, local_ip: str) -> None:
        try:
            self._announce = await listen_announcements(
                self.announce_group, self.announce_port, local_ip, self._announced)
        except OSError as exc:
            log.warning("cannot listen for %s announcements on %s:%d: %s", self.protocol,
                        self.announce_group, self.announce_port, exc)

    def _announced(self, data: bytes, source: str) -> None:
        if source != self.gateway_ip:
            return
        epoch: int | None = None
        address: str | None = None
        pcp = decode_pcp_reply(data)
        if pcp is not None and pcp.version == PCP_VERSION:
            if pcp.opcode != PcpOp.ANNOUNCE or pcp.result != 0 or pcp.epoch is None:
                return
            epoch = pcp.epoch
        else:
            pmp = decode_pmp_reply(data)
            if pmp is None or pmp.version != PMP_VERSION or pmp.opcode != PmpOp.ADDRESS \
                    or pmp.result != 0 or not pmp.complete:
                return
            epoch, address = pmp.epoch, pmp.external_ip
        self.announcements += 1
        resets = self.epoch_resets
        self._observe_epoch(epoch)
        self._set_external(address)
        # RFC 6886 §3.2.1 routers repeat an announcement up to 10 times, each gap twice the
        # last (0.25 s, 0.5 s, ...): a repeat of the series re-applies nothing.
        now = self.clock()
        gap = now - self._announce_last
        repeat = self.epoch_resets == resets and gap <= 2 * self._announce_gap + 1.0
        self._announce_gap = gap if repeat else 0.0
        self._announce_last = now
        if self.epoch_resets == resets and self._held and not repeat:
            # An unsolicited announcement means the router (re)started its NAT-PMP/PCP server
            # or changed address; miniupnpd with system_uptime=yes keeps its epoch across a
            # restart, so re-apply rather than trust the epoch.
            self._state_lost(f"router announced a restart or address change (epoch {epoch})")

    def _gateway_info(self, external: str, server: str, notes: tuple[str, ...]) -> GatewayInfo:
        """What ``connect`` learned; ``external``: "" when the router did not say."""
        if external and not counts_as_public(external):
            notes += ("external address not public",)
        return GatewayInfo(protocol=self.protocol, location=f"{self.gateway_ip}:{self.port}",
                           local_address=self.client.local_address,
                           external_address=external, server=server, notes=notes)

    def _conflict(self, action: str, spec: MappingSpec, assigned: int) -> MappingConflict:
        return MappingConflict(
            action, None, f"external port {spec.external_port} is taken (the router offered "
            f"{assigned})", "another host or program holds this port")

    async def _probe(self) -> GatewayInfo:
        raise NotImplementedError
