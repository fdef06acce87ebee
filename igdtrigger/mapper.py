"""Mapper: makes the router hold exactly the mappings the engine wants.

``reconcile(desired)`` compares what the engine wants with what this process has applied and
issues adds, deletes, renewals and verifications through a ``Gateway``. It only ever deletes
mappings it applied itself (or adopted: ours by description and internal client), and it never
takes over a port the router already maps to someone else.

Leases are renewed at half their life; a router that refuses timed leases (725, or 402 on some)
gets permanent mappings that we delete ourselves when the trigger lapses. Every mapping is
verified periodically; one the router lost is re-applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import Clock, owned_by
from .errors import (
    SECURE_MODE_HINT,
    GatewayError,
    GatewayUnreachable,
    LeaseRefused,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
)
from .gateway.base import Gateway, Granted
from .model import MappingKey, MappingSpec, RouterMapping

if TYPE_CHECKING:  # sqlite3 stays out of `igdtrigger run` (standalone) start-up
    from .journal import Journal

log = logging.getLogger("igdtrigger.mapper")

RETRY_FIRST = 1.0
RETRY_MAX = 60.0
CONFLICT_RECHECK = 30.0
ANY_PORT_TRIES = 4  # external = "any" without AddAnyPortMapping: random ports tried
# Checking many ports at once (a range opening, re-applying after a router restart): one listing
# of the router's table (one GetGenericPortMappingEntry per entry) instead of one
# GetSpecificPortMappingEntry per port, when the table is known to be smaller than the batch.
LIST_MIN_BATCH = 8


class MapState(enum.StrEnum):
    PENDING = "pending"  # wanted, not yet on the router
    ACTIVE = "active"  # on the router, ours
    CONFLICT = "conflict"  # the router maps this port to someone else; left alone
    FAILED = "failed"  # the router refused; retried with back-off


@dataclass(slots=True)
class Applied:
    spec: MappingSpec
    state: MapState = MapState.PENDING
    external_port: int = 0  # granted external port: the spec's, or another (external = "any")
    lease: int = 0  # granted lease in seconds, 0 = permanent
    since: float = 0.0
    renew_at: float = math.inf
    retry_at: float = 0.0
    attempts: int = 0
    error: str = ""
    # the router refused because the mapping is for another host (secure mode): only that
    # host can map it (``run`` there maps its own ports: wrapper.py)
    self_only: bool = False

    def __post_init__(self) -> None:
        if not self.external_port:
            self.external_port = self.spec.external_port

    @property
    def wire(self) -> MappingSpec:
        """The spec as sent to the router (with the granted external port)."""
        if self.external_port == self.spec.external_port:
            return self.spec
        return dataclasses.replace(self.spec, external_port=self.external_port)

    def to_json(self, now: float) -> dict[str, Any]:
        s = self.spec
        out: dict[str, Any] = {
            "protocol": s.proto.value,
            "external_port": self.external_port,
            "internal_client": s.internal_client,
            "internal_port": s.internal_port,
            "description": s.description,
            "state": self.state.value,
            "lease": self.lease,
        }
        if self.state is MapState.ACTIVE:
            out["age"] = round(now - self.since, 3)
            out["renew_in"] = None if self.renew_at == math.inf else round(self.renew_at - now, 3)
        if self.error:
            out["error"] = self.error
        return out


class Mapper:
    def __init__(
        self,
        gateway: Gateway,
        *,
        clock: Clock,
        tag: str,
        lease: float,
        verify_interval: float = 60.0,
        canary_interval: float = 2.0,
        check_before_add: bool = True,
        on_change: Callable[[Applied, str], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.gateway = gateway
        self.clock = clock
        self.tag = tag
        self.lease = int(lease)
        self.verify_interval = verify_interval
        self.canary_interval = canary_interval
        self.check_before_add = check_before_add
        self.on_change = on_change
        self.applied: dict[MappingKey, Applied] = {}
        # Mappings that may still be on the router but are no longer wanted: a delete that
        # failed, or what the journal says an earlier run left. Deleted when the router answers.
        self.orphans: dict[MappingKey, MappingSpec] = {}
        self.journal = journal
        self.permanent_only = False  # learned: the router refuses timed leases
        self.gateway_up = False
        self.gateway_error = ""
        self._gateway_retry_at = 0.0
        self._gateway_backoff = RETRY_FIRST
        self._next_verify = math.inf
        self._next_canary = math.inf
        self._canary_index = 0
        self._swept = False
        self._foreign_hint: int | None = None  # router entries not ours, at the last listing
        self.stale_removed = 0
        self._lock = asyncio.Lock()
        self.ops = {"add": 0, "renew": 0, "delete": 0, "verify": 0, "errors": 0}

    # --- public --------------------------------------------------------------------------------

    async def reconcile(self, desired: dict[MappingKey, MappingSpec]) -> None:
        """Bring the router in line with ``desired``; never raises for router trouble."""
        async with self._lock:
            await self._reconcile(desired)

    async def remove_all(self) -> int:
        """Delete every mapping we hold (shutdown). Returns how many were deleted."""
        async with self._lock:
            count = 0
            for key, app in list(self.applied.items()):
                self.applied.pop(key, None)
                if app.state is MapState.ACTIVE or app.error.startswith("router did not"):
                    self.orphans[app.wire.key] = app.wire
            if not self.orphans:  # nothing to delete: do not wait on a router never reached
                return 0
            if self.gateway_up or await self._connect():
                count = await self._delete_orphans(set())
            return count

    def reapply_all(self, reason: str) -> None:
        """The router lost its state (NAT-PMP/PCP epoch, announcement): re-add everything."""
        log.warning("router lost its mappings (%s): re-applying %d", reason,
                    self.count(MapState.ACTIVE))
        now = self.clock()
        for app in self.applied.values():
            if app.state is MapState.ACTIVE:
                app.renew_at = now

    def adopt_orphans(self, specs: list[MappingSpec]) -> None:
        """Mappings an earlier run may have left (from the journal): removed unless wanted."""
        for spec in specs:
            self.orphans.setdefault(spec.key, spec)

    async def _delete_orphans(self, wanted: set[tuple[MappingKey, str]]) -> int:
        done: list[MappingSpec] = []
        count = 0
        for key, spec in list(self.orphans.items()):
            if not self.gateway_up:
                break
            if (key, spec.internal_client) in wanted:
                done.append(spec)  # wanted again: the add path adopts or re-creates it
                continue
            try:
                await self.gateway.delete(spec.proto, spec.external_port)
                count += 1
                self.ops["delete"] += 1
                log.info("unmapped %s -> %s:%d", key, spec.internal_client, spec.internal_port)
            except NoSuchMapping:
                pass
            except GatewayUnreachable as exc:
                self._gateway_down(str(exc))
                break
            except GatewayError as exc:
                # NotAuthorized / 714-on-v1: not ours to delete (another host's now); let go.
                log.warning("could not delete %s: %s", key, exc)
            done.append(spec)
        for spec in done:
            self.orphans.pop(spec.key, None)
        self._journal_gone(done)
        return count

    def _journal_gone(self, specs: list[MappingSpec]) -> None:
        if self.journal is not None:
            for spec in specs:
                self.journal.mapping_gone(spec.proto, spec.external_port)

    def _journal_requested(self, specs: list[MappingSpec]) -> None:
        if self.journal is not None and specs:
            self.journal.mappings_requested(specs)

    def next_deadline(self) -> float | None:
        if not self.gateway_up:
            # Nothing can happen before the router is back: one timer, not one per mapping.
            return self._gateway_retry_at
        times = [self._next_verify, self._next_canary]
        for app in self.applied.values():
            if app.state is MapState.ACTIVE:
                times.append(app.renew_at)
            else:
                times.append(app.retry_at)
        when = min(times, default=math.inf)
        return None if when == math.inf else when

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [a.to_json(now) for _, a in sorted(self.applied.items())]

    def count(self, state: MapState) -> int:
        return sum(1 for a in self.applied.values() if a.state is state)

    # --- internals -----------------------------------------------------------------------------

    async def _reconcile(self, desired: dict[MappingKey, MappingSpec]) -> None:
        now = self.clock()
        if not self.gateway_up:
            if now < self._gateway_retry_at:
                self._mark_pending(desired)
                return
            if not await self._connect():
                self._mark_pending(desired)
                return

        # 1. Deletes: what we hold that is no longer wanted (or wanted for another host).
        gone: list[MappingSpec] = []
        for key, app in list(self.applied.items()):
            want = desired.get(key)
            if want == app.spec:
                continue
            del self.applied[key]
            if app.state is MapState.ACTIVE:
                if await self._delete(app):
                    gone.append(app.wire)
                else:
                    self.orphans[app.wire.key] = app.wire  # retried when the router answers
            elif app.error.startswith("router did not"):
                self.orphans[app.wire.key] = app.wire  # the request may have arrived
            else:
                gone.append(app.wire)  # never made it onto the router
        self._journal_gone(gone)
        if self.orphans and self.gateway_up:
            await self._delete_orphans({(k, s.internal_client) for k, s in desired.items()})

        # 2. Adds of new mappings first (latency), then retries, renewals and verification.
        new: list[MappingSpec] = []
        for key, spec in desired.items():
            if key not in self.applied:
                self.applied[key] = Applied(spec)
                new.append(spec)
        self._journal_requested(new)  # recorded before it is requested: a crash can't orphan it
        first = [a for a in self.applied.values()
                 if a.state is MapState.PENDING and a.attempts == 0]
        known = await self._snapshot(len(first)) if self.check_before_add and first else None
        for app in first:
            if not self.gateway_up:
                break
            await self._add(app, check=self.check_before_add, known=known)
        for app in list(self.applied.values()):
            if not self.gateway_up:
                break
            now = self.clock()
            if app.state is MapState.ACTIVE and now >= app.renew_at:
                await self._add(app, check=False, renewal=True)
            elif app.state is not MapState.ACTIVE and app.attempts > 0 and now >= app.retry_at:
                await self._add(app, check=True)

        if self.gateway_up and self.clock() >= self._next_canary:
            await self._canary()
        if self.gateway_up and self.clock() >= self._next_verify:
            await self._verify_all()
        if self._next_verify == math.inf and self.applied:
            self._next_verify = self.clock() + self.verify_interval
        if self._next_canary == math.inf and self.applied:
            self._next_canary = self.clock() + self.canary_interval
        if not self.applied:
            self._next_verify = self._next_canary = math.inf

    def _mark_pending(self, desired: dict[MappingKey, MappingSpec]) -> None:
        for key, spec in desired.items():
            app = self.applied.get(key)
            if app is None or app.spec != spec:
                self.applied[key] = Applied(
                    spec, retry_at=self._gateway_retry_at, attempts=1, error=self.gateway_error
                )
        for key in [k for k in self.applied if k not in desired]:
            if self.applied[key].state is not MapState.ACTIVE:
                del self.applied[key]

    async def _connect(self) -> bool:
        try:
            await self.gateway.connect()
        except GatewayError as exc:
            self._gateway_down(str(exc))
            return False
        if not self.gateway_up:
            log.info("gateway up")
        self.gateway_up = True
        self.gateway_error = ""
        self._gateway_backoff = RETRY_FIRST
        # Whatever we held may be gone (router restarted): re-apply everything now.
        for app in self.applied.values():
            if app.state is MapState.ACTIVE:
                app.renew_at = self.clock()
        if not self._swept:
            await self._sweep_stale()
        return True

    async def _sweep_stale(self) -> None:
        """Delete mappings a previous run of this instance left behind (crash, kill -9)."""
        try:
            found = await self.gateway.list()
        except GatewayError as exc:
            log.warning("could not list the router's mappings to remove stale ones: %s", exc)
            return
        self._swept = True
        self._foreign_hint = sum(1 for m in found if owned_by(m.description, self.tag) is None)
        for m in found:
            held = {a.wire.key for a in self.applied.values()}
            if owned_by(m.description, self.tag) is None or m.key in held:
                continue
            try:
                await self.gateway.delete(m.proto, m.external_port)
            except NoSuchMapping:
                continue
            except GatewayError as exc:
                log.warning("could not delete stale mapping %s: %s", m.key, exc)
                continue
            self.stale_removed += 1
            log.info("removed stale mapping %s -> %s left by an earlier run", m.key,
                     m.internal_client)

    def retry_gateway_now(self) -> None:
        """The router announced itself (it is back): no more waiting out the back-off."""
        self._gateway_retry_at = 0.0
        self._gateway_backoff = RETRY_FIRST

    def _gateway_down(self, message: str) -> None:
        if self.gateway_up or message != self.gateway_error:
            log.warning("gateway down: %s (retrying in %.0fs)", message, self._gateway_backoff)
        self.gateway_up = False
        self.gateway_error = message
        self._gateway_retry_at = self.clock() + self._gateway_backoff
        self._gateway_backoff = min(RETRY_MAX, self._gateway_backoff * 2)

    async def _snapshot(self, checks: int, *,
                        ours_listed: bool = True) -> dict[MappingKey, RouterMapping] | None:
        """The router's table from one listing, when that takes fewer requests than ``checks``
        one-port lookups (it takes one per entry: others' known from the last listing, plus
        ours unless ``ours_listed`` is False: the router lost them); else None.

        Used for the checks of a batch (a range being opened, everything re-applied after a
        router restart). The snapshot is as old as the batch is long, where a per-port check is
        fresh; the router's own conflict answer (718) still guards every add.
        """
        if checks < LIST_MIN_BATCH or self._foreign_hint is None:
            return None
        ours = self.count(MapState.ACTIVE) if ours_listed else 0
        if self._foreign_hint + ours + 1 >= checks:
            return None
        try:
            found = await self.gateway.list()
        except GatewayUnreachable as exc:
            self._gateway_down(str(exc))
            return None
        except GatewayError as exc:
            log.debug("listing the router's mappings failed (%s): checking port by port", exc)
            return None
        self.ops["verify"] += 1
        self._foreign_hint = sum(1 for m in found if owned_by(m.description, self.tag) is None)
        return {m.key: m for m in found}

    async def _foreign(self, wire: MappingSpec,
                       known: dict[MappingKey, RouterMapping] | None = None) -> str | None:
        """Why the router's entry for this port is someone else's, or None if free/ours.
        ``known``: a snapshot of the router's table to look in instead of asking."""
        if known is not None:
            existing = known.get(wire.key)
        else:
            existing = await self.gateway.get(wire.proto, wire.external_port)
            self.ops["verify"] += 1
        if existing is None or self._is_ours(existing.internal_client, existing.description,
                                             wire):
            return None
        return (f"{wire.key} is already mapped on the router to "
                f"{existing.internal_client}:{existing.internal_port} "
                f"({existing.description!r}); igdtrigger leaves it alone")

    async def _add_leased(self, wire: MappingSpec) -> Granted:
        lease = 0 if self.permanent_only else self.lease
        try:
            return await self.gateway.add(wire, lease)
        except LeaseRefused as exc:
            if lease == 0:
                raise
            log.warning(
                "router refuses timed leases (%s): using permanent mappings that igdtrigger "
                "deletes itself when the trigger lapses", exc.description
            )
            self.permanent_only = True
            return await self.gateway.add(wire, 0)

    async def _add_elsewhere(self, app: Applied) -> Granted | None:
        """``external = "any"``: our port is taken, so take another one (never someone's)."""
        spec = app.spec
        add_any = getattr(self.gateway, "add_any", None)
        info = self.gateway.info
        if add_any is not None and info is not None and info.service_type.endswith(":2"):
            lease = 0 if self.permanent_only else self.lease
            granted: Granted = await add_any(spec, lease)  # IGDv2 AddAnyPortMapping
            app.external_port = granted.external_port
            self._journal_requested([app.wire])  # after the fact: the port was the router's pick
            return granted
        for _ in range(ANY_PORT_TRIES):
            app.external_port = random.randint(1024, 65535)  # noqa: S311 - not security
            if await self._foreign(app.wire) is not None:
                continue
            self._journal_requested([app.wire])
            try:
                return await self._add_leased(app.wire)
            except MappingConflict:
                continue
        app.external_port = spec.external_port
        return None

    async def _add(self, app: Applied, *, check: bool, renewal: bool = False,
                   known: dict[MappingKey, RouterMapping] | None = None) -> None:
        spec = app.spec
        app.attempts += 1
        try:
            granted: Granted | None = None
            if check:
                why = await self._foreign(app.wire, known)
                if why is not None:
                    if spec.external_any and not renewal:
                        granted = await self._add_elsewhere(app)
                    if granted is None:
                        self._conflict(app, why)
                        return
            if granted is None:
                try:
                    granted = await self._add_leased(app.wire)
                except MappingConflict:
                    if not (spec.external_any and not renewal):
                        raise
                    granted = await self._add_elsewhere(app)
                    if granted is None:
                        raise
        except GatewayUnreachable as exc:
            app.error = str(exc)
            app.retry_at = self.clock()
            if app.state is not MapState.ACTIVE:
                app.state = MapState.PENDING
            self.ops["errors"] += 1
            self._gateway_down(str(exc))
            return
        except MappingConflict as exc:
            info = self.gateway.info
            for_other = info is not None and spec.internal_client != info.local_address
            if check and for_other:
                # The router lists nothing on this port yet says "conflict": it is refusing a
                # mapping for another host (IGDv1, and miniupnpd < 2.3.4 on IGDv2, use 718).
                self._failed(app, f"{spec.key} for {spec.internal_client}: {exc}; "
                                  f"{SECURE_MODE_HINT}", self_only=True)
            elif for_other:
                self._conflict(app, f"{spec.key}: {exc} (another host holds this port, or "
                                    f"{SECURE_MODE_HINT})")
            else:
                self._conflict(app, f"{spec.key}: {exc} (another host holds this port)")
            return
        except NotAuthorized as exc:
            info = self.gateway.info
            self._failed(app, f"{spec.key} for {spec.internal_client}: {exc}",
                         self_only=info is not None
                         and spec.internal_client != info.local_address)
            return
        except GatewayError as exc:
            self._failed(app, f"{spec.key}: {exc}")
            return
        now = self.clock()
        was_active = app.state is MapState.ACTIVE
        app.state = MapState.ACTIVE
        app.lease = granted.lease
        app.error = ""
        app.self_only = False
        app.attempts = 0
        if not was_active:
            app.since = now
        app.renew_at = now + granted.lease / 2 if granted.lease > 0 else math.inf
        self.ops["renew" if renewal else "add"] += 1
        if not renewal:
            self._changed(app, "mapped")

    def _is_ours(self, client: str, description: str, spec: MappingSpec) -> bool:
        return client == spec.internal_client and owned_by(description, self.tag) is not None

    def _conflict(self, app: Applied, message: str) -> None:
        if app.state is not MapState.CONFLICT or app.error != message:
            log.warning("%s", message)
        app.state = MapState.CONFLICT
        app.error = message
        app.retry_at = self.clock() + CONFLICT_RECHECK
        self.ops["errors"] += 1
        self._changed(app, "conflict")

    def _failed(self, app: Applied, message: str, *, self_only: bool = False) -> None:
        if app.error != message:
            log.warning("mapping failed: %s", message)
        app.self_only = self_only
        app.state = MapState.FAILED
        app.error = message
        app.retry_at = self.clock() + min(RETRY_MAX, RETRY_FIRST * 2 ** min(app.attempts, 6))
        self.ops["errors"] += 1
        self._changed(app, "failed")

    async def _delete(self, app: Applied) -> bool:
        spec = app.spec
        try:
            await self.gateway.delete(spec.proto, app.external_port)
        except NoSuchMapping:
            pass  # already gone (lease ran out, router restarted): nothing to do
        except GatewayError as exc:
            self.ops["errors"] += 1
            log.warning("could not delete %s: %s", spec.key, exc)
            if isinstance(exc, GatewayUnreachable):
                self._gateway_down(str(exc))
            return False
        self.ops["delete"] += 1
        app.state = MapState.PENDING
        self._changed(app, "unmapped")
        return True

    async def _canary(self) -> None:
        """One cheap check every few seconds: is one of our mappings still on the router?

        A router that restarted (new process, rules flushed) or lost its table is noticed
        within ``canary_interval``, and then everything is verified and re-applied.
        """
        self._next_canary = self.clock() + self.canary_interval
        active = [a for a in self.applied.values() if a.state is MapState.ACTIVE]
        if not active:
            return
        app = active[self._canary_index % len(active)]
        self._canary_index += 1
        spec = app.wire
        answered, found = await self._lookup(spec)
        if answered and (found is None or found.internal_client != spec.internal_client):
            log.warning("router no longer holds %s (restarted?): verifying every mapping",
                        spec.key)
            await self._verify_all(after_loss=True)

    async def _lookup(self, spec: MappingSpec) -> tuple[bool, RouterMapping | None]:
        """(answered, the router's entry) for one of our mappings; a router that does not
        answer is marked down."""
        try:
            found = await self.gateway.get(spec.proto, spec.external_port)
        except GatewayUnreachable as exc:
            self._gateway_down(str(exc))
            return False, None
        except GatewayError as exc:
            log.debug("checking %s: %s", spec.key, exc)
            return False, None
        self.ops["verify"] += 1
        return True, found

    async def _verify_all(self, *, after_loss: bool = False) -> None:
        """Check every active mapping on the router; re-apply the lost, let go the taken.
        ``after_loss``: the canary found one gone, so the router probably lost them all."""
        self._next_verify = self.clock() + self.verify_interval
        active = [a for a in self.applied.values() if a.state is MapState.ACTIVE]
        known = (await self._snapshot(len(active), ours_listed=not after_loss)
                 if self.gateway_up else None)
        lost: list[Applied] = []
        for app in active:
            if app.state is not MapState.ACTIVE or not self.gateway_up:
                continue
            spec = app.wire
            if known is not None:
                found = known.get(spec.key)
            else:
                answered, found = await self._lookup(spec)
                if not answered:
                    continue
            if found is None:
                lost.append(app)
            elif not self._is_ours(found.internal_client, found.description, spec):
                app.state = MapState.PENDING  # not ours any more: never delete it
                self._conflict(
                    app,
                    f"{spec.key} was taken over on the router by {found.internal_client} "
                    f"({found.description!r}); igdtrigger leaves it alone",
                )
        if lost:
            keys = ", ".join(str(a.wire.key) for a in lost[:5])
            more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
            log.warning("router lost %d mapping(s) (%s%s): re-applying them", len(lost), keys,
                        more)
        for app in lost:
            if not self.gateway_up:
                return
            app.renew_at = self.clock()
            await self._add(app, check=False, renewal=True)

    def _changed(self, app: Applied, what: str) -> None:
        if self.on_change is not None:
            self.on_change(app, what)
