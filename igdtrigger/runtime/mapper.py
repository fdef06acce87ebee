"""Mapper: makes the router hold exactly the mappings the engine wants.

``reconcile(desired)`` compares what the engine wants with what this process has applied and
issues adds, deletes, renewals and verifications through a ``Gateway``. It only ever deletes
mappings it applied itself (or adopted: ours by description and internal client), and it never
takes over a port the router already maps to someone else.

Leases are renewed at half their life; a router that refuses timed leases (725, or a 402 that a
lease-0 retry then gets past) or drops them at once gets permanent mappings that we delete
ourselves when the trigger lapses. Every mapping is verified periodically; one the router lost
is re-applied.

The router's answers are checked, not believed (``traits.RouterTraits``): an add is read back
until the router has shown a few times that it keeps what it accepts, a delete is confirmed
gone (at stop, with one listing), and what was learned is kept in the journal per router. A
router that cannot report its mappings is not re-added to on every check; its deletes are
repeated until it says the mapping is gone. A delete refused is retried after the others and
stays in the journal until confirmed; a delete the router answered but did not do is reported
(``left_open``), never counted as removed.

What a crashed run left is known from the journal only (``adopt_orphans``). NAT-PMP/PCP routers
cannot list mappings, so the backend adopts each leftover first (``AdoptsLeftovers``: PCP with
the nonce the journal recorded, derived from the journal's key) and then deletes it like any
other; one it cannot delete from here (another protocol made it, no nonce recorded, another host
over NAT-PMP) is named in the log as lapsing by its lifetime, never as removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from igdtrigger.core import trace
from igdtrigger.core.errors import (
    DEVICE_DENIED_HINT,
    SECURE_MODE_HINT,
    GatewayError,
    GatewayUnreachable,
    LocalResourceError,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
)
from igdtrigger.core.model import MappingKey, MappingSpec, RouterMapping
from igdtrigger.gateway.base import Capability, GatewayInfo, Granted, add_if_free
from igdtrigger.runtime.mapbase import RETRY_FIRST, Applied, MapState, backoff
from igdtrigger.runtime.orphans import Orphans

__all__ = ["TRACE_ENV", "Applied", "MapState", "Mapper", "write_trace"]

log = logging.getLogger("igdtrigger.runtime.mapper")  # one logger for the whole mapper
T = TypeVar("T")

LOCAL_RETRY = 5.0  # seconds before retrying after this machine ran out of descriptors
CONFLICT_RECHECK = 30.0
SIBLING_RECHECK = 2.0  # s: a port another igdtrigger holds for the same host and port
ANY_PORT_TRIES = 4  # external = "any" without AddAnyPortMapping: random ports tried


TRACE_ENV = "IGDTRIGGER_TRACE"  # a file: one JSON line per traced add (core/trace.py)


def write_trace(info: GatewayInfo | None) -> None:
    """Append the trace that ends with this add to the file ``IGDTRIGGER_TRACE`` names: the
    steps' names and their times in ms after the first (a debug aid, off the measured path)."""
    steps = trace.end()
    path = os.environ.get(TRACE_ENV)
    if not steps or not path:
        return
    t0 = steps[0][1]
    line = {"steps": [[what, round((ns - t0) / 1e6, 4)] for what, ns in steps],
            "backend": info.backend if info is not None else ""}
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


class Mapper(Orphans):
    """Makes the router hold exactly the mappings the engine wants (see the module docstring).
    Built as ``MapperBase`` (state) -> ``RouterTruth`` (read-backs) -> ``Orphans`` (deletes)
    -> this (the apply loop: adds, renewals, verification)."""

    async def reconcile(self, desired: dict[MappingKey, MappingSpec],
                        answered: Callable[[], None] | None = None) -> None:
        """Bring the router in line with ``desired``; never raises for router trouble.
        ``answered()`` is called once the deletes and the new mappings' adds were answered
        and journaled (what a caller waiting for this change needs), before renewals,
        retries of older mappings and verification."""
        async with self._lock:
            await self._reconcile(desired, answered)

    async def remove_all(self) -> int:
        """Delete every mapping we hold (shutdown). Returns how many the router confirmed gone
        (where it can report mappings; else how many it answered); ``left_open`` lists what it
        still holds, with until when."""
        async with self._lock:
            never_sent: list[MappingSpec] = []
            for key, app in list(self.applied.items()):
                self.applied.pop(key, None)
                if app.state is MapState.ACTIVE or app.maybe_applied:
                    self._orphan(app.wire, app)
                elif app.attempts == 0:
                    never_sent.append(app.wire)  # journaled, never asked: nothing to delete
            self._journal_gone([w for w in never_sent if w.key not in self.orphans])
            self.left_open = []
            removed = 0
            # nothing to delete: do not wait on a router never reached
            if self.orphans and (self.gateway_up or await self._connect({})):
                removed = await self._delete_orphans(set(), final=True)
            for spec, client, remaining in self._taken_over.values():
                self._note_left_open(spec, (
                    f"was added by igdtrigger, then the router showed it for {client}: not "
                    "deleted, as it may not be ours any more (taken over, or the router "
                    "reports another client)"), remaining)
            self._taken_over.clear()
            return removed

    def reapply_all(self, reason: str) -> None:
        """The router lost its state (NAT-PMP/PCP epoch, announcement): re-add everything."""
        log.warning("router lost its mappings (%s): re-applying %d", reason,
                    self.count(MapState.ACTIVE))
        now = self.clock()
        for app in self.applied.values():
            if app.state is MapState.ACTIVE:
                app.renew_at = now

    def next_deadline(self) -> float | None:
        """When ``reconcile`` next has work (renewal, retry, check), on the mapper clock;
        None: none."""
        if not self.gateway_up:
            # Nothing can happen before the router is back: one timer, not one per mapping.
            return self._gateway_retry_at
        times = [self._next_verify, self._next_canary]
        times.extend(m.retry_at for m in self._orphan_meta.values())  # deletes to retry
        for app in self.applied.values():
            if app.state is MapState.ACTIVE:
                times.append(app.renew_at)
            else:
                times.append(app.retry_at)
        when = min(times, default=math.inf)
        return None if when == math.inf else when

    def snapshot(self) -> list[dict[str, Any]]:
        """Each mapping as ``Applied.to_json``. While the router does not answer, no active
        mapping is claimed verified: its state is what was last so, with why it is unconfirmed
        (a router that vanished may have taken every mapping with it)."""
        now = self.clock()
        out = [a.to_json(now) for _, a in sorted(self.applied.items())]
        if not self.gateway_up:
            for m in out:
                if m["state"] == MapState.ACTIVE.value:
                    m["verified"] = False
                    m.setdefault("error", f"not confirmed: the router is not answering "
                                          f"({self.gateway_error or 'not found yet'})")
        return out

    async def _reconcile(self, desired: dict[MappingKey, MappingSpec],
                         answered: Callable[[], None] | None) -> None:
        if not self.gateway_up and (self.clock() < self._gateway_retry_at
                                    or not await self._connect(desired)):
            self._mark_pending(desired)
            return

        # 1. Deletes: what we hold that is no longer wanted (or wanted for another host). They
        # go through the orphan path: deleted now, confirmed, retried if refused.
        gone: list[MappingSpec] = []
        for key, app in list(self.applied.items()):
            want = desired.get(key)
            if want == app.spec:
                continue
            del self.applied[key]
            if app.state is MapState.ACTIVE or app.maybe_applied:
                self._orphan(app.wire, app if app.state is MapState.ACTIVE else None)
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
        # recorded while the first request is in flight: durable before the add where the
        # router could not show a crash's leftover to the next start (_may_trail)
        self._journal_soon(new)
        first = [a for a in self.applied.values()
                 if a.state is MapState.PENDING and a.attempts == 0]
        known = (await self._beside(self._snapshot(len(first)))
                 if self.check_before_add and first else None)
        for app in first:
            if not self.gateway_up or self._abandoned():
                break
            await self._add(app, check=self.check_before_add, known=known)
        await self._journal_settled()  # what the adds journaled beside them: written
        self._journal_requested([])  # nothing was asked (router down, abandoned): now
        if answered is not None:
            answered()
        for app in list(self.applied.values()):
            if not self.gateway_up or self._abandoned():
                break
            now = self.clock()
            if app.state is MapState.ACTIVE and now >= app.renew_at:
                await self._add(app, check=False, renewal=True)
            elif app.state is not MapState.ACTIVE and app.attempts > 0 and now >= app.retry_at:
                await self._add(app, check=True)
        await self._journal_settled()  # what the pass journaled beside its requests: written
        self._journal_requested([])

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

    async def _connect(self, wanted: Mapping[MappingKey, MappingSpec]) -> bool:
        """Connect to the router; the first time it answers, sweep what an earlier run of
        this instance left, except ``wanted`` (the mappings wanted right now; none at stop).
        False when it does not answer (marked down, back-off)."""
        try:
            info = await self.gateway.connect()
        except GatewayError as exc:
            self._gateway_down(str(exc))
            return False
        self._know_router(info)
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
            await self._sweep_stale(wanted)
        return True

    async def _add_leased(self, wire: MappingSpec, app: Applied | None = None, *,
                          any_port: bool = False) -> Granted:
        """Add with the lease policy learned for this router, through the gateway layer's one
        lease fallback (``base.add_with_lease_fallback``): a timed lease refused is tried once
        with lease 0 there, and only when that succeeds (``Granted.timed_lease_refused``) is
        the router "permanent only" (a 402 for a full table, miniupnp/miniupnp#92, fails both
        and teaches nothing). ``any_port``: ``add_any`` (the router may pick the port)."""
        gw = self.gateway
        granted = await self._leased(wire, app, gw.add_any if any_port else gw.add)
        self._lease_answer(granted, app)
        return granted

    async def _leased(self, wire: MappingSpec, app: Applied | None,
                      request: Callable[[MappingSpec, int], Awaitable[T]]) -> T:
        """``request(wire, lease)`` with the lease learned for this router, the deferred
        journal write beside it (``_beside``)."""
        lease = self.lease if self.traits.timed_leases else 0
        if app is not None:
            app.asked = lease
        try:
            return await self._beside(request(wire, lease), wire)
        except asyncio.CancelledError:
            if app is not None:  # a stop cancelled it unanswered: it may be on the router
                app.maybe_applied = True
            raise

    def _lease_answer(self, granted: Granted, app: Applied | None) -> None:
        """Learn from an add's answer: a timed lease refused, lease 0 accepted."""
        refused = granted.timed_lease_refused
        if refused is not None:
            if app is not None:
                app.asked = 0
            self._learn(permanent_only=True)
            self._warn_once("permanent_only", (
                f"router refuses timed leases ({refused.code} {refused.description}; lease 0 "
                "accepted): using permanent mappings that igdtrigger deletes itself when the "
                "trigger lapses"))

    def _one_job(self, known: dict[MappingKey, RouterMapping] | None) -> bool:
        """Whether the check before an add and the add go to the gateway as one job
        (``base.add_if_free``): a lookup is due (no listing already shows the port, the router
        can look mappings up) and no journal row must be durable before the add (else the
        lookup and the journal write overlap, then the add: ``_beside``)."""
        return (known is None and self.traits.reports_mappings is not False
                and all(self._may_trail(s) for s in self._deferred))

    async def _check_and_add(self, app: Applied) -> tuple[Granted | None, str | None]:
        """The check and the add as one job: (granted, None) when the port was free and the
        add made; (None, why) when someone else holds it; (None, None) when our own entry
        holds it or the router cannot look it up (the caller adds, as after a check)."""
        wire = app.wire
        checked = await self._leased(wire, app, lambda w, lease: add_if_free(
            self.gateway, w, lease))
        if checked.unchecked is not None:
            self._cannot_look_up(checked.unchecked)
            return None, None
        self.ops["verify"] += 1
        if checked.granted is not None:
            self._lease_answer(checked.granted, app)
            return checked.granted, None
        return None, self._whose(checked.held, wire)

    async def _add_elsewhere(self, app: Applied) -> Granted | None:
        """``external = "any"``: our port is taken, so take another one (never someone's)."""
        spec = app.spec
        if Capability.ADD_ANY in self.gateway.capabilities:  # IGDv2 AddAnyPortMapping
            granted = await self._add_leased(spec, app, any_port=True)
            app.external_port = granted.external_port
            self._journal_requested([app.wire])  # after the fact: the port was the router's pick
            return granted
        for _ in range(ANY_PORT_TRIES):
            app.external_port = random.randint(1024, 65535)  # noqa: S311 - not security
            if await self._foreign(app.wire) is not None:
                continue
            self._journal_requested([app.wire])
            try:
                return await self._add_leased(app.wire, app)
            except MappingConflict:
                continue
        app.external_port = spec.external_port
        return None

    async def _add(self, app: Applied, *, check: bool, renewal: bool = False,
                   known: dict[MappingKey, RouterMapping] | None = None) -> None:
        spec = app.spec
        app.attempts += 1
        self._siblings.discard(app.wire.key)
        try:
            granted: Granted | None = None
            if check:
                if self._one_job(known):
                    granted, why = await self._check_and_add(app)
                else:
                    why = await self._beside(self._foreign(app.wire, known))
                    if trace.ON:
                        trace.stamp("checked")
                if why is not None:
                    if spec.external_any and not renewal:
                        granted = await self._add_elsewhere(app)
                    if granted is None:
                        self._conflict(app, why)
                        return
            if granted is None:
                try:
                    granted = await self._add_leased(app.wire, app)
                except MappingConflict:
                    if renewal and await self._still_ours(app.wire):
                        granted = await self._recreate(app)
                    elif not (spec.external_any and not renewal):
                        raise
                    else:
                        granted = await self._add_elsewhere(app)
                    if granted is None:
                        raise
        except (GatewayUnreachable, LocalResourceError) as exc:
            app.error = str(exc)
            app.retry_at = self.clock()
            if app.state is not MapState.ACTIVE:
                app.state = MapState.PENDING
            self.ops["errors"] += 1
            if isinstance(exc, LocalResourceError):  # never sent: says nothing about the router
                app.retry_at += LOCAL_RETRY
                log.warning("%s", exc)
                return
            app.maybe_applied = True  # the request may have arrived
            self._gateway_down(str(exc))
            return
        except MappingConflict as exc:
            info = self.gateway.info
            for_other = info is not None and spec.internal_client != info.local_address
            if check:
                # The router lists nothing on this port yet says "conflict": it is refusing
                # the mapping. For another host: secure mode (IGDv1, and miniupnpd < 2.3.4 on
                # IGDv2, use 718); for this host itself: the router denies UPnP to this device
                # or port (FRITZ!Box "permit independent port sharing").
                hint = SECURE_MODE_HINT if for_other else DEVICE_DENIED_HINT
                self._failed(app, f"{spec.key} for {spec.internal_client}: "
                                  f"{exc.with_hint(hint)}", self_only=for_other)
            else:
                self._conflict(app, f"{spec.key}: {exc}")
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
        self._taken_over.pop(app.wire.key, None)
        app.state = MapState.ACTIVE
        app.lease = granted.lease
        if self.traits.forced_lease is not None and app.asked > 0 and self._reads_back():
            app.lease = self.traits.forced_lease  # what the router showed last time
        elif self.traits.lease_cap and app.asked > self.traits.lease_cap and self._reads_back():
            app.lease = min(app.lease or self.traits.lease_cap, self.traits.lease_cap)
        app.adds += 1
        app.added_at = now
        app.error = ""
        app.self_only = False
        app.maybe_applied = False
        app.attempts = 0
        if not was_active:
            app.since = now
        self._moved(app, granted)
        app.renew_at = now + app.lease / 2 if app.lease > 0 else math.inf
        self.ops["renew" if renewal else "add"] += 1
        if not renewal and self._reads_back() and (self.traits.confirm_adds()
                                                   or self._recheck_readback):
            await self._confirm_add(app)
        elif self.traits.reports_mappings is False and self._reads_back():
            app.verified = False  # it cannot show it: nothing to confirm
        if not renewal:
            if trace.ON:
                write_trace(self.gateway.info)
            self._changed(app, "mapped")

    async def _recreate(self, app: Applied) -> Granted:
        """Renew a mapping the router will not refresh: it answers 718 to our own re-add
        (lontivero/Open.NAT#14) while its record shows the mapping is ours, so the lease would
        run out. Deleted and added again (a moment closed, not abandoned as a conflict)."""
        wire = app.wire
        self._warn_once("refresh_conflict", (
            f"router answered 718 ConflictInMappingEntry to renewing {wire.key}, which it shows "
            "as ours: renewing by deleting and re-adding it"))
        with contextlib.suppress(NoSuchMapping):
            await self.gateway.delete(wire.proto, wire.external_port)
        self.ops["delete"] += 1
        return await self._add_leased(wire, app)

    def _moved(self, app: Applied, granted: Granted) -> None:
        """``external = "any"``: keep the port the router assigned (a VPN's NAT-PMP gateway
        picks its own, yimingliu/py-natpmp#12), journaled before it is reported."""
        if granted.external_port == app.external_port or not app.spec.external_any:
            return
        old = app.wire
        app.external_port = granted.external_port
        self._journal_requested([app.wire])
        self._journal_gone([old])  # never held there
        log.info("%s: the router assigned external port %d", app.spec.key, app.external_port)

    def _conflict(self, app: Applied, message: str) -> None:
        if app.state is not MapState.CONFLICT or app.error != message:
            log.warning("%s", message)
        app.state = MapState.CONFLICT
        app.error = message
        sibling = app.wire.key in self._siblings
        self._siblings.discard(app.wire.key)
        app.retry_at = self.clock() + (SIBLING_RECHECK if sibling else CONFLICT_RECHECK)
        self.ops["errors"] += 1
        self._changed(app, "conflict")

    def _failed(self, app: Applied, message: str, *, self_only: bool = False) -> None:
        if app.error != message:
            log.warning("mapping failed: %s", message)
        app.self_only = self_only
        app.state = MapState.FAILED
        app.error = message
        app.retry_at = self.clock() + backoff(app.attempts)
        self.ops["errors"] += 1
        self._changed(app, "failed")

    async def _canary(self) -> None:
        """One cheap check every few seconds: is one of our mappings still on the router?

        A router that restarted (new process, rules flushed) or lost its table is noticed
        within ``canary_interval``, and then everything is verified and re-applied.
        """
        self._next_canary = self.clock() + self.canary_interval
        active = [a for a in self.applied.values() if a.state is MapState.ACTIVE]
        if not active or self.traits.reports_mappings is False:
            return  # a router that cannot show its mappings: not seeing one proves nothing
        app = active[self._canary_index % len(active)]
        self._canary_index += 1
        spec = app.wire
        answered, found = await self._lookup(spec)
        if answered and (found is None or found.internal_client != spec.internal_client):
            log.warning("router no longer holds %s (restarted?): verifying every mapping",
                        spec.key)
            await self._verify_all(after_loss=True)

    async def _verify_all(self, *, after_loss: bool = False) -> None:
        """Check every active mapping on the router; re-apply the lost, let go the taken.
        ``after_loss``: the canary found one gone, so the router probably lost them all."""
        self._next_verify = self.clock() + self.verify_interval
        active = [a for a in self.applied.values() if a.state is MapState.ACTIVE]
        if self.traits.reports_mappings is False:
            return  # renewed at half lease instead (no re-add storm, miniupnp/miniupnp#719)
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
            elif not self._is_ours(found, spec):
                # not ours any more: never delete it; named at stop (we did add it)
                self._taken_over[spec.key] = (spec, found.internal_client,
                                              found.lease_remaining)
                app.state = MapState.PENDING
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
        for i, app in enumerate(lost):
            if not self.gateway_up:
                return
            app.renew_at = self.clock()
            await self._add(app, check=False, renewal=True)
            if i == 0 and app.state is MapState.ACTIVE and self._reads_back():
                # one re-added mapping read back: a router that now drops timed leases is
                # caught here, not by a re-add at every check
                await self._confirm_add(app)
