"""FrontManager: the one place a LAN client's port-mapping request becomes (or ends) an activation.

Every protocol server of the front (UPnP IGD, NAT-PMP, PCP) hands the manager a
:class:`ClientRequest` and answers its client with the :class:`Grant` or :class:`Refusal` it gets
back (the contract: ``add``, ``delete``, ``lookup``, ``mappings``, ``external_address``,
``epoch``); the servers never touch the engine, the mapper or the router themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from igdtrigger.core import trace
from igdtrigger.core.activation import FRONT_SOURCES, FRONT_TARGET, MIN_TTL, Activation, Source
from igdtrigger.core.errors import ActivationLimit, UsageError
from igdtrigger.core.frontconfig import FrontConfig
from igdtrigger.core.model import (
    Flow,
    FlowEnded,
    FlowLive,
    MappingKey,
    PortRange,
    Proto,
    format_duration,
)
from igdtrigger.front.contract import (
    ClientRequest,
    Forwarder,
    FrontMapping,
    FrontProtocol,
    FrontTrace,
    Grant,
    Refusal,
    RefusalKind,
)
from igdtrigger.front.holds import FlowHolds, decrement, key_of
from igdtrigger.front.journaled import (
    M_CLIENT,
    M_DESC,
    M_INTERNAL,
    M_LEASE,
    M_LEASE_END,
    M_NONCE,
    from_activation,
    granted_lease,
    told_lease,
)
from igdtrigger.runtime.mapper import MapState

if TYPE_CHECKING:
    from igdtrigger.runtime.service import Service

log = logging.getLogger("igdtrigger.front")

__all__ = ["ClientRequest", "Forwarder", "FrontManager", "FrontMapping", "FrontProtocol",
           "Grant", "Refusal", "RefusalKind"]


_SOURCE = {p: Source(p.value) for p in FrontProtocol}
MAX_DESCRIPTION = 128  # characters of a client's description kept
ALTERNATIVE_TRIES = 64  # free ports looked at for an alternative
UPSTREAM_TRIES = 3  # alternatives tried when the upstream router refuses a port as taken
HOLD_AHEAD = 10.0  # a held mapping's activation runs at least this far ahead of now (s): the
# runner's 1 s tick extends it well before it could lapse, even with a 1 s idle_timeout


def clean_description(text: str) -> str:
    """A client's description as kept and shown: printable, at most MAX_DESCRIPTION chars."""
    return "".join(c for c in text if c.isprintable())[:MAX_DESCRIPTION]


class FrontManager:
    """Client requests -> activations through the service façade.

    Policy, in the order miniupnpd applies it: secure mode (a client maps only to itself: else
    OTHER_CLIENT, UPnP 718), the ``allow``/``deny`` lines (else NOT_AUTHORIZED, UPnP 606), a live
    mapping of another client on the port (CONFLICT, 718; with ``allow_alternative`` another free
    port the lines allow is granted), ``max_per_client`` (NO_RESOURCES). Each mapping is an
    ad-hoc activation (source ``upnp``/``natpmp``/``pcp``) of its one external port: the engine
    times it, the mapper maps it upstream, the journal keeps it across a crash.

    Lifetime: a lease ``L`` > 0 is granted as ``min(L, max_lease)``; lease 0 as ``max_lease``,
    renewed while in use. The activation ends at ``min(lease end, last use + idle_timeout)``;
    "use" is the client renewing or a flow to/from the mapped internal port of the client (or
    arriving on the external port) reported by a detector (:meth:`observe`). A live
    *connection* (``FlowLive(connected=True)``: TCP established in conntrack, a connected socket)
    holds the mapping however silent it is, as it holds a rule's activation in the engine: the
    front follows such flows until the detector reports them ended (``FlowEnded``) or no longer
    connected, and :meth:`tick` (every second) counts the mappings they hold as in use; the idle
    timer starts when the last one ends (its close is its last packet). Followed flows are
    bounded (per mapping and in all: front/holds.py).
    """

    def __init__(self, service: Service, settings: FrontConfig, *,
                 forwarder: Forwarder | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.service = service
        self.settings = settings
        self.forwarder = forwarder
        self.clock = service.pipeline.engine.clock
        self.wall = wall
        self._started = self.clock()
        self._by_key: dict[MappingKey, FrontMapping] = {}
        self._by_internal: dict[tuple[Proto, str, int], set[MappingKey]] = {}
        # (proto, port) -> how many _by_key entries (external ports) and _by_internal entries
        # ((client, internal port)) name it: the detectors' prefilter (:meth:`wants`) in one
        # lookup of a plain tuple, whatever the number of mappings
        self._ports: collections.Counter[tuple[Proto, int]] = collections.Counter()
        self.holds = FlowHolds()  # live flows followed, the mappings connections hold
        self._lock = asyncio.Lock()
        self.refused: collections.Counter[str] = collections.Counter()  # kind -> count
        self.granted = 0

    # --- the contract ------------------------------------------------------------------------

    async def add(self, req: ClientRequest) -> Grant | Refusal:
        """Grant (or renew) ``req``'s mapping, or say why not; never raises for a client's bad
        input (that is a refusal naming it)."""
        req = replace(req, description=clean_description(req.description))
        async with self._lock:  # one decision at a time: two clients racing for a port
            result = await self._add(req)
        if isinstance(result, Refusal):
            self.refused[result.kind.value] += 1
            log.info("front: %s %s %s:%d -> %s:%d refused (%s): %s", req.protocol, req.client,
                     req.proto.value, req.external_port, req.internal_client, req.internal_port,
                     result.kind.value, result.reason)
        return result

    async def delete(self, protocol: FrontProtocol, client: str, external_port: int, proto: Proto,
                     nonce: bytes | None = None) -> Refusal | None:
        """End ``client``'s mapping of ``proto``/``external_port`` (removed upstream at once).
        NO_SUCH when there is none; OTHER_CLIENT when it is another client's (UPnP answers 606
        then, as miniupnpd in secure mode); NOT_AUTHORIZED for a PCP nonce that is not its."""
        async with self._lock:
            m = self.lookup(external_port, proto)
            if m is None:
                return Refusal(RefusalKind.NO_SUCH, f"no mapping of {proto.value} port "
                               f"{external_port}")
            if self.settings.secure_mode and client not in (m.request.client,
                                                            m.request.internal_client):
                return Refusal(RefusalKind.OTHER_CLIENT,
                               f"{proto.value} port {external_port} is mapped for "
                               f"{m.request.internal_client}, not {client}")
            if (m.request.nonce is not None and nonce is not None and nonce != m.request.nonce):
                return Refusal(RefusalKind.NOT_AUTHORIZED, "the mapping nonce does not match")
            await self._end(m, f"deleted by {client} ({protocol})")
        return None

    def lookup(self, external_port: int, proto: Proto) -> FrontMapping | None:
        """The live mapping of ``proto``/``external_port``, if the front holds one."""
        m = self._by_key.get(MappingKey(proto, external_port))
        if m is not None and not self._live(m):
            return None
        return m

    def mappings(self) -> list[FrontMapping]:
        """Every live mapping, oldest first."""
        return sorted((m for m in list(self._by_key.values()) if self._live(m)),
                      key=lambda m: m.created)

    async def external_address(self) -> str | None:
        """The UPSTREAM router's external address (None: unknown). Behind double NAT it is
        private: apps get it anyway, status and doctor say so (:meth:`double_nat`)."""
        info = self.service.gateway.info
        if info is None or not info.external_known:
            return None
        return info.external_address.strip()

    def epoch(self) -> int:
        """Seconds since the front started serving (the NAT-PMP/PCP epoch, RFC 6886 §3.6)."""
        return int(max(0.0, self.clock() - self._started))

    # --- beyond the contract -------------------------------------------------------------------

    def double_nat(self) -> str | None:
        """What the upstream's external address says (None: public): for status and doctor."""
        info = self.service.gateway.info
        return None if info is None else info.external_warning()

    def status(self) -> dict[str, Any]:
        """The front's part of status: epoch, upstream address, mappings, grants, refusals."""
        now = self.clock()
        info = self.service.gateway.info
        return {
            "enabled": True, "epoch": self.epoch(),
            "external_address": (info.external_address.strip() or None) if info else None,
            "double_nat": self.double_nat(),
            "mappings": [m.to_json(now) for m in self.mappings()],
            "granted": self.granted, "refused": dict(self.refused),
            "flows": self.holds.counts()}

    def attach(self) -> int:
        """After the service restored its journal: take back the front's activations (listed
        again, removed by the next stop) when the policy still allows them, end the others.
        Returns how many came back."""
        back = 0
        for act in list(self.service.pipeline.engine.activations.values()):
            if act.source not in FRONT_SOURCES:
                continue
            m = self._from_activation(act)
            if m is None or self._policy(m.request) is not None:
                self.service.pipeline.engine.deactivate(act.id)
                continue
            self._index(m)
            back += 1
        if back:
            log.info("front: %d client mapping(s) restored from the journal", back)
        self.service.wake()
        return back

    def wants(self, proto: Proto, port: int) -> bool:
        """Detector prefilter: a flow to (or from) ``port`` is use of a mapping (its external
        port, or an internal port of one). One dict lookup, whatever the number of mappings."""
        return (proto, port) in self._ports

    def observe(self, obs: object) -> None:
        """A detector's observation (the service passes every one). A new flow, or a later look
        that saw packets, to or from a mapped internal port of its client, or arriving on a
        mapped external port, is use; such a flow is followed (bounded) until it ends. A
        connection holds its mappings while it lives (:meth:`tick`); when it ends or stops
        being one, that is their last use."""
        if isinstance(obs, FlowEnded):
            self._ended(obs.flow, closed=obs.closed)
        elif isinstance(obs, FlowLive):
            self._looked(obs)
        elif isinstance(obs, Flow):
            matching = self._matching(obs)
            for m in matching:
                self._used(m)
            if matching:
                self.holds.follow(obs, map(key_of, matching))

    def counted(self, m: FrontMapping) -> None:
        """The kernel counted packets to or from ``m``'s internal port (topology 1's inner
        DNAT table, read every second): in use now."""
        self._used(m)

    def follows(self, flow: Flow) -> bool:
        """Detectors keep looking at a flow the front follows (its later packets, its end)."""
        return flow in self.holds

    def tick(self) -> int:
        """Every second (the runner): each mapping a live connection holds is in use now; its
        activation is kept at least ``max(idle_timeout, HOLD_AHEAD)`` ahead, extended (one
        journal write) once less than half of that is left. Returns how many are held."""
        ahead = max(self.settings.idle_timeout, HOLD_AHEAD)
        held = self._mappings_of(self.holds.held())
        for m in held:
            self._used(m, ahead=ahead, slack=ahead / 2)
        return len(held)

    def release_flows(self) -> int:
        """Forget every followed flow (their detector stopped: nobody will say when they end);
        the mappings they held start their idle timers now. Returns how many."""
        flows = self.holds.flows()
        for flow in flows:
            self._ended(flow)
        return len(flows)

    def _looked(self, obs: FlowLive) -> None:
        """A detector's later look (``Engine.on_flow_live``'s semantics): an unknown flow (one
        that began before the mapping's detector looked) is taken as new; packets are use at
        their time; a change to or from connected takes or drops the hold."""
        now = self.clock()
        keys = self.holds.keys_of(obs.flow)
        if keys is None:
            if obs.idle is None and not obs.connected:
                return
            matching = self._matching(obs.flow)
            for m in matching:
                self._used(m, at=now - max(0.0, obs.idle or 0.0))
            if matching and self.holds.follow(obs.flow, map(key_of, matching)) and obs.connected:
                self._connect(obs.flow, True)
            return
        if obs.idle is not None:
            for m in self._mappings_of(keys):
                self._used(m, at=now - max(0.0, obs.idle))
        self._connect(obs.flow, obs.connected)

    def _connect(self, flow: Flow, connected: bool) -> None:
        """``flow`` became a connection (holds its mappings) or stopped being one: either way
        its mappings are used now; one no other connection holds starts its idle timer now
        (exactly ``idle_timeout`` from now: the hold's run-ahead is taken back)."""
        for m in self._mappings_of(self.holds.connect(flow, connected)):
            self._used(m, force=not connected and not self.holds.holds(key_of(m)))

    def _ended(self, flow: Flow, *, closed: bool = False) -> None:
        """A followed flow is gone: ``closed`` (its ends closed it now) or a connection's end
        is its mappings' last use now; the last connection holding a mapping starts its idle
        timer."""
        gone = self.holds.end(flow)
        if gone is None or not (closed or gone.connected):
            return
        for m in self._mappings_of(gone.keys):
            self._used(m, force=gone.connected and not self.holds.holds(key_of(m)))

    def _mappings_of(self, keys: Iterable[MappingKey]) -> list[FrontMapping]:
        """The live mappings of ``keys`` (a copy is walked: an ended one is unindexed)."""
        return [m for k in list(keys) if (m := self._by_key.get(k)) is not None and self._live(m)]

    def _matching(self, flow: Flow) -> list[FrontMapping]:
        """Every live mapping the flow uses: one host may map one internal port several times."""
        keys = {MappingKey(flow.proto, flow.dport), *self._by_internal.get(
            (flow.proto, str(flow.src), flow.sport), ()), *self._by_internal.get(
            (flow.proto, str(flow.dst), flow.dport), ())} if self._by_key else set()
        return self._mappings_of(keys)

    async def stop(self) -> None:
        """The service's stop ends the activations (and upstream mappings); forwards go here."""
        if self.forwarder is not None:
            for m in list(self._by_key.values()):
                await self.forwarder.remove(m.request.proto, m.grant.external_port)
        self._by_key.clear()
        self._by_internal.clear()
        self._ports.clear()
        self.holds.clear()

    # --- internals -----------------------------------------------------------------------------

    def _policy(self, req: ClientRequest, external_port: int | None = None) -> Refusal | None:
        """Secure mode then the allow/deny lines, for ``external_port`` (default the asked one)."""
        if self.settings.secure_mode and req.internal_client != req.client:
            return Refusal(RefusalKind.OTHER_CLIENT,
                           f"{req.client} may map ports only to itself, not to "
                           f"{req.internal_client} (secure mode)")
        port = req.external_port if external_port is None else external_port
        line = self.settings.acl.check(port, req.internal_client, req.internal_port)
        if line is None or not line.allow:
            why = f"denied by [front] allow line {line.text!r}" if line else \
                "no [front] allow line matches"
            return Refusal(RefusalKind.NOT_AUTHORIZED,
                           f"{req.proto.value} {port} -> {req.internal_client}:"
                           f"{req.internal_port}: {why}")
        return None

    def _taken(self, key: MappingKey, req: ClientRequest) -> str | None:
        """Who else holds ``key`` now: another client's front mapping, or a rule's activation."""
        m = self.lookup(key.external_port, key.proto)
        if m is not None:
            if m.request.internal_client == req.internal_client and (
                    m.request.internal_port == req.internal_port or not req.allow_alternative):
                return None
            return f"mapped for {m.request.internal_client}:{m.request.internal_port}"
        spec = self.service.desired().get(key)
        if spec is not None:
            return f"held by igdtrigger for {spec.internal_client} ({spec.description})"
        app = self.service.pipeline.mapper.applied.get(key)
        if app is not None and app.state is MapState.CONFLICT:
            return "mapped on the upstream router by another host"
        return None

    def _alternatives(self, req: ClientRequest) -> Iterator[int]:
        """Ports to offer instead: the internal port, then ports around the asked one, then
        random ones; only those the allow lines permit and nobody holds."""
        seen: set[int] = set()
        start = req.external_port or req.internal_port
        candidates = [req.internal_port, *(start + d for d in range(1, 16)),
                      *(secrets.randbelow(65535 - 1024) + 1024
                        for _ in range(ALTERNATIVE_TRIES))]
        for port in candidates:
            if port in seen or not 1 <= port <= 65535:
                continue
            seen.add(port)
            if (self._policy(req, port) is None and self.lookup(port, req.proto) is None
                    and self._taken(MappingKey(req.proto, port), req) is None):
                yield port

    def _grant_lease(self, lease: float) -> float:
        return granted_lease(self.settings, lease)

    def _told(self, lease: float, protocol: FrontProtocol) -> float:
        return told_lease(self.settings, lease, protocol)

    async def _add(self, req: ClientRequest) -> Grant | Refusal:
        if (bad := req.problem()) is not None:
            return Refusal(RefusalKind.NOT_AUTHORIZED, bad)
        if self.settings.secure_mode and req.internal_client != req.client:
            return self._policy(req) or Refusal(RefusalKind.OTHER_CLIENT, "secure mode")
        own = self.lookup(req.external_port, req.proto) if req.external_port else None
        if own is not None and own.request.internal_client == req.internal_client:
            if own.request.nonce is not None and req.nonce != own.request.nonce:
                return Refusal(RefusalKind.NOT_AUTHORIZED, "the mapping nonce does not match")
            if own.request.internal_port == req.internal_port:
                return self._renew(own, req)
            if not req.allow_alternative:  # UPnP AddPortMapping: same client, another target
                await self._end(own, "replaced by its client")  # (else another port, as
                # miniupnpd's natpmp.c moves on to the next one: never end the other mapping)
        refusal: Refusal | None = None
        port: int | None = None
        if req.external_port:
            key = MappingKey(req.proto, req.external_port)
            refusal = self._policy(req)
            if refusal is None and (taken := self._taken(key, req)) is not None:
                refusal = Refusal(RefusalKind.CONFLICT, f"{key} is {taken}")
            if refusal is None:
                port = req.external_port
            elif not req.allow_alternative:
                return refusal
        live = sum(1 for m in self.mappings()  # live only: the engine ends idle ones
                   if m.request.internal_client == req.internal_client)
        if live >= self.settings.max_per_client:
            return Refusal(RefusalKind.NO_RESOURCES, f"{req.internal_client} already holds "
                           f"{live} mappings, the [front] max_per_client limit")
        tries = UPSTREAM_TRIES if req.allow_alternative else 1
        result: Grant | Refusal = refusal or Refusal(RefusalKind.NO_RESOURCES, "no port")
        for _ in range(tries):
            if port is None:
                port = next(self._alternatives(req), None)
            if port is None:
                if refusal is None or refusal.kind is RefusalKind.CONFLICT:
                    return Refusal(RefusalKind.NO_RESOURCES, "no free external port the "
                                   "[front] allow lines permit")
                return refusal
            result = await self._map(req, MappingKey(req.proto, port))
            if not (isinstance(result, Refusal) and result.kind is RefusalKind.CONFLICT):
                break
            port = None
        return result

    async def _map(self, req: ClientRequest, key: MappingKey) -> Grant | Refusal:
        """Make the activation and wait for the upstream router's answer."""
        stamps = FrontTrace() if trace.ON else None
        if trace.ON:
            trace.begin("front")  # the mapper's line for this add runs from the request
        lease = self._grant_lease(req.lease)
        now = self.clock()
        if self.forwarder is not None:
            upstream = self.forwarder.upstream_address()
            if upstream is None:
                return Refusal(RefusalKind.UPSTREAM, "our own upstream address is unknown")
            target = f"{upstream} {key.external_port}"
            if trace.ON:
                trace.stamp("upstream_address")
        else:
            target = f"{req.internal_client} {req.internal_port}"
        meta = {FRONT_TARGET: target, M_CLIENT: req.client,
                M_INTERNAL: f"{req.internal_client} {req.internal_port}",
                M_DESC: req.description, M_LEASE: f"{req.lease:g}"}
        if req.nonce is not None:
            meta[M_NONCE] = req.nonce.hex()
        if req.lease:
            meta[M_LEASE_END] = f"{self.wall() + lease:.3f}"
        ttl = min(lease, self.settings.idle_timeout)
        # topology 1: the inner DNAT goes in BEFORE the upstream mapping exists (over netlink,
        # ~0.2 ms): a rule for a port nothing maps upstream yet forwards nothing, but a WAN
        # packet reaching us before the rule would get a conntrack entry to this host, and that
        # flow would never be forwarded while it lasts. Removed at once on a refusal.
        if self.forwarder is not None and (failed := await self._forward(req, key)):
            return Refusal(RefusalKind.UPSTREAM, failed)
        try:
            act, applied = await self.service.front_activate(
                PortRange(key.proto, key.external_port, key.external_port), req.internal_client,
                ttl=max(ttl, MIN_TTL), source=_SOURCE[req.protocol], meta=meta)
        except (ActivationLimit, UsageError) as exc:
            await self._unforward(key)
            return Refusal(RefusalKind.NO_RESOURCES, str(exc))
        if stamps is not None:
            stamps.stamp("activated")
        if applied is None or applied.state is not MapState.ACTIVE:
            await self._unforward(key)
            state = "no answer yet" if applied is None else (
                f"{applied.state.value}: {applied.error}" if applied.error
                else applied.state.value)
            self.service.pipeline.engine.deactivate(act.id)
            self.service.wake()
            kind = (RefusalKind.CONFLICT if applied is not None
                    and applied.state is MapState.CONFLICT else RefusalKind.UPSTREAM)
            return Refusal(kind, f"the upstream router did not map {key} ({state})")
        grant = Grant(external_port=key.external_port, lease=self._told(lease, req.protocol),
                      external_address=await self.external_address() or "")
        m = FrontMapping(request=replace(req, external_port=key.external_port), grant=grant,
                         created=now, last_use=now,
                         lease_end=now + lease if req.lease else math.inf,
                         activation_id=act.id)
        self._index(m)
        self.granted += 1
        if stamps is not None:
            stamps.write()
        log.info("front: %s %s mapped %s -> %s:%d for %s (%s)", req.protocol, req.client, key,
                 req.internal_client, req.internal_port, format_duration(lease),
                 meta[M_DESC] or "no description")
        return grant

    async def _forward(self, req: ClientRequest, key: MappingKey) -> str | None:
        """Add the inner DNAT for ``key``; why it failed, or None."""
        assert self.forwarder is not None
        try:
            await self.forwarder.add(req.proto, key.external_port, req.internal_client,
                                     req.internal_port)
            if trace.ON:
                trace.stamp("dnat")
        except (OSError, ValueError) as exc:
            log.warning("front: inner DNAT for %s not added: %s", key, exc)
            return f"the inner DNAT was not added (nothing was mapped upstream): {exc}"
        return None

    async def _unforward(self, key: MappingKey) -> None:
        """Take back the inner DNAT of a mapping that was not made."""
        if self.forwarder is not None:
            with contextlib.suppress(OSError):  # the reconciler's sync retries it
                await self.forwarder.remove(key.proto, key.external_port)

    @contextlib.asynccontextmanager
    async def settled(self) -> AsyncIterator[None]:
        """Hold the front still (no add or delete deciding meanwhile): the reconciler compares
        the inner DNAT with :meth:`mappings` inside this, so a rule added while its upstream
        mapping is being asked for is not swept as unwanted."""
        async with self._lock:
            yield

    def _renew(self, m: FrontMapping, req: ClientRequest) -> Grant:
        lease = self._grant_lease(req.lease)
        now = self.clock()
        m.request = replace(req, external_port=m.grant.external_port)
        m.lease_end = now + lease if req.lease else math.inf
        m.grant = replace(m.grant, lease=self._told(lease, req.protocol))
        act = self.service.pipeline.engine.activations.get(m.activation_id)
        if act is not None:
            act.meta[M_LEASE] = f"{req.lease:g}"
            act.meta[M_DESC] = req.description
            if req.lease:
                act.meta[M_LEASE_END] = f"{self.wall() + lease:.3f}"
            else:
                act.meta.pop(M_LEASE_END, None)
        self._used(m, force=True)
        return m.grant

    def _used(self, m: FrontMapping, *, at: float | None = None, force: bool = False,
              ahead: float | None = None, slack: float = 1.0) -> None:
        """In use at ``at`` (default now): the activation's end moves to min(lease end,
        at + ``ahead``), never earlier (``ahead`` defaults to idle_timeout; a move by less than
        ``slack`` seconds is not worth a journal write). ``force``: set it even if earlier (a
        renewal; a hold's end takes back the hold's run-ahead)."""
        now = self.clock()
        at = now if at is None else min(at, now)
        if at <= m.last_use and not force:
            return
        m.last_use = max(m.last_use, at)
        end = min(m.lease_end, m.last_use + (self.settings.idle_timeout if ahead is None
                                             else ahead))
        act = self.service.pipeline.engine.activations.get(m.activation_id)
        if act is None or (not force and end - act.expires < slack):
            return
        with contextlib.suppress(UsageError, KeyError):
            self.service.pipeline.engine.heartbeat(act.id, max(MIN_TTL, end - now))
            self.service.wake()

    async def _end(self, m: FrontMapping, why: str) -> None:
        self._unindex(m)
        if m.activation_id in self.service.pipeline.engine.activations:
            await self.service.deactivate(m.activation_id)
        if self.forwarder is not None:
            await self.forwarder.remove(m.request.proto, m.grant.external_port)
        log.info("front: %s %s %s", m.request.proto.value, m.grant.external_port, why)

    def _live(self, m: FrontMapping) -> bool:
        if m.activation_id in self.service.pipeline.engine.activations:
            return True
        self._unindex(m)  # the engine ended it (lease or idle): gone upstream; the runner
        return False  # syncs the forwarder's inner rules with mappings() every second

    def _index(self, m: FrontMapping) -> None:
        key = MappingKey(m.request.proto, m.grant.external_port)
        if key not in self._by_key:
            self._ports[(key.proto, key.external_port)] += 1
        self._by_key[key] = m
        ik = (m.request.proto, m.request.internal_client, m.request.internal_port)
        if ik not in self._by_internal:
            self._by_internal[ik] = set()
            self._ports[(ik[0], ik[2])] += 1
        self._by_internal[ik].add(key)

    def _unindex(self, m: FrontMapping) -> None:
        key = MappingKey(m.request.proto, m.grant.external_port)
        if self._by_key.get(key) is m:
            del self._by_key[key]
            decrement(self._ports, [(key.proto, key.external_port)])
            self.holds.drop(key)  # its flows are followed for it no more
        ik = (m.request.proto, m.request.internal_client, m.request.internal_port)
        keys = self._by_internal.get(ik)
        if keys is None:
            return
        keys.discard(key)
        if not keys:
            del self._by_internal[ik]
            decrement(self._ports, [(ik[0], ik[2])])

    def _from_activation(self, act: Activation) -> FrontMapping | None:
        """A journaled activation back as a front mapping (None: not one we wrote)."""
        return from_activation(act, self.settings, now=self.clock(), wall=self.wall())
