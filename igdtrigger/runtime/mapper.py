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
import dataclasses
import enum
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igdtrigger.core.engine import Clock, owned_by
from igdtrigger.core.errors import (
    DEVICE_DENIED_HINT,
    SECURE_MODE_HINT,
    GatewayError,
    GatewayUnreachable,
    LocalResourceError,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
    UnsupportedAction,
)
from igdtrigger.core.model import MappingKey, MappingSpec, RouterMapping
from igdtrigger.core.traits import NO_READBACK, RouterTraits, router_identity
from igdtrigger.gateway.base import AdoptsLeftovers, Capability, Gateway, GatewayInfo, Granted

if TYPE_CHECKING:  # sqlite3 stays out of `igdtrigger run` (standalone) start-up
    from igdtrigger.runtime.journal import Journal

log = logging.getLogger("igdtrigger.runtime.mapper")

RETRY_FIRST = 1.0
RETRY_MAX = 60.0
LOCAL_RETRY = 5.0  # seconds before retrying after this machine ran out of descriptors
CONFLICT_RECHECK = 30.0
SIBLING_RECHECK = 2.0  # s: a port another igdtrigger holds for the same host and port
ANY_PORT_TRIES = 4  # external = "any" without AddAnyPortMapping: random ports tried
# Checking many ports at once (a range opening, re-applying after a router restart): one listing
# of the router's table (one GetGenericPortMappingEntry per entry) instead of one
# GetSpecificPortMappingEntry per port, when the table is known to be smaller than the batch.
LIST_MIN_BATCH = 8
# A router that cannot report its mappings: a delete is repeated until it answers "no such
# mapping" (each add may have left a copy, miniupnp/miniupnp#719), at most this often.
MAX_DELETE_REPEAT = 16
MIN_CUT = 8  # a description cut shorter than this tells nothing about whose mapping it is
STOP_DELETE_RETRIES = 2  # at stop, a delete answered but not done is repeated this often
ORPHAN_TRIES = 10  # deletes refused/failed: retried this often in one run (journal keeps them)


JOURNAL_BATCH = 64  # orphans forgotten in one journal transaction at most
JOURNAL_FLUSH = 0.25  # s: and at least this often while a long round of deletes runs


class Removal(enum.Enum):
    """What became of one delete, as far as the router lets us know."""

    GONE = "gone"  # the router no longer has it (confirmed where it can report mappings)
    LEFT_OPEN = "left_open"  # it answered the delete, yet still holds the mapping
    UNCONFIRMED = "unconfirmed"  # repeated deletes never got "no such mapping"
    REFUSED = "refused"  # it refused the delete (PCP NOT_AUTHORIZED, 606): ours, still there
    NOT_OURS = "not_ours"  # the port is someone else's now: let go, never delete
    FAILED = "failed"  # another error; retried
    DOWN = "down"  # no answer; retried when the router is back


@dataclass(frozen=True, slots=True)
class LeftOpen:
    """A mapping of ours the router still holds after we deleted it (or could not)."""

    spec: MappingSpec
    why: str
    lease_remaining: int | None  # what the router reports, 0 = permanent, None = unknown
    until_wall: float | None  # wall-clock time it lapses on the router, None = not on its own

    def describe(self) -> str:
        if self.until_wall is not None:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.until_wall))
            stays = f"stays open until {until} ({self.lease_remaining}s lease left)"
        elif self.lease_remaining == 0:
            stays = "stays open until the router restarts or it is removed there (no lease)"
        else:
            stays = "may stay open until its lease ends on the router"
        return (f"{self.spec.key} -> {self.spec.internal_client}:{self.spec.internal_port} "
                f"{self.why}; it {stays}")

    def to_json(self) -> dict[str, Any]:
        return {"mapping": str(self.spec.key), "internal_client": self.spec.internal_client,
                "why": self.why, "lease_remaining": self.lease_remaining,
                "until": self.until_wall}


@dataclass(slots=True)
class _Orphan:
    """Delete bookkeeping of a mapping that may still be on the router."""

    copies: int = 1  # adds the router accepted (copies, on a router that cannot report them)
    attempts: int = 0
    retry_at: float = 0.0
    app: Applied | None = None  # for the "unmapped" event
    from_journal: bool = False  # left by an earlier run
    nonce: bytes = b""  # PCP: the nonce the journal recorded it with
    protocol: str = ""  # what the journal says it was requested over ("": unknown)
    adopted: bool | None = None  # the gateway took it up for deleting (NAT-PMP/PCP)
    told: bool = False  # its end was logged already (_leftover_gone)


@dataclass(slots=True)
class _Round:
    """What one round of ``_delete_orphans`` has booked so far (lists shared with it)."""

    gone: list[MappingSpec]  # done with: forgotten in the journal
    asked: list[MappingSpec]  # deletes answered: confirmed at stop
    again: list[MappingSpec]  # refused or failed: once more after the others
    counted: set[MappingKey]  # deleted by a request of ours
    known: dict[MappingKey, RouterMapping] | None = None  # the router's table, if listed


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
    asked: int = 0  # lease asked for at the last add (the router may grant another)
    adds: int = 0  # adds the router accepted since it was last known gone
    verified: bool | None = None  # the router's own record showed it (None: not checked)
    maybe_applied: bool = False  # an add went unanswered: it may have arrived
    added_at: float = 0.0  # clock() of the last add the router accepted (its lease runs from)
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
            "lease_asked": self.asked,
            "verified": self.verified,
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
        readback_settle: float = 0.25,
        on_change: Callable[[Applied, str], None] | None = None,
        journal: Journal | None = None,
        abandon: Callable[[], bool] | None = None,
        reclaim: Callable[[str], bool] | None = None,
    ) -> None:
        """``abandon``: asked before each add of a pass; True ends the pass there (an
        activation lapsed meanwhile: the caller expires it and reconciles again, deleting
        instead of adding for minutes after it should have ended)."""
        self.gateway = gateway
        self.abandon = abandon
        # ``reclaim(description)``: an entry of another igdtrigger on this machine that is gone
        # (a killed ``run``): ours to take over and delete when it maps to this host.
        self.reclaim = reclaim
        self.clock = clock
        self.tag = tag
        self.lease = int(lease)
        self.verify_interval = verify_interval
        self.canary_interval = canary_interval
        self.check_before_add = check_before_add
        self.readback_settle = readback_settle  # s before a missing read-back is believed
        self.on_change = on_change
        self.applied: dict[MappingKey, Applied] = {}
        # Mappings that may still be on the router but are no longer wanted: a delete that
        # failed, or what the journal says an earlier run left. Deleted when the router answers.
        self.orphans: dict[MappingKey, MappingSpec] = {}
        self._orphan_meta: dict[MappingKey, _Orphan] = {}
        self.journal = journal
        if journal is not None and isinstance(gateway, AdoptsLeftovers):
            # PCP nonces derived from a secret the journal keeps: the next run can delete
            key = journal.secret("pcp-nonce-key")  # what this one leaves after a crash
            if key:
                gateway.use_nonce_key(key)
        self.traits = RouterTraits()  # learned per router (journal), see traits.py
        self._recheck_readback = False
        self._warned: set[str] = set()
        self._lookup_error: GatewayError | None = None
        self.left_open: list[LeftOpen] = []  # of the last remove_all (the stop summary)
        self._protocol = ""  # of the router last connected
        # mappings we added that the router then showed for another client: left alone,
        # named at stop (key -> spec, that client, lease left)
        self._taken_over: dict[MappingKey, tuple[MappingSpec, str, int | None]] = {}
        self.gateway_up = False
        self.gateway_error = ""
        self._gateway_retry_at = 0.0
        self._gateway_backoff = RETRY_FIRST
        self._next_verify = math.inf
        self._next_canary = math.inf
        self._canary_index = 0
        self._swept = False
        self._wanted_now: dict[MappingKey, MappingSpec] = {}
        self._foreign_hint: int | None = None  # router entries not ours, at the last listing
        self.stale_removed = 0
        self._siblings: set[MappingKey] = set()  # conflicts with another igdtrigger's same map
        self._lock = asyncio.Lock()
        self.ops = {"add": 0, "renew": 0, "delete": 0, "verify": 0, "errors": 0}

    # --- public --------------------------------------------------------------------------------

    @property
    def permanent_only(self) -> bool:
        """Mappings are asked with lease 0 (the router refuses or drops timed leases)."""
        return not self.traits.timed_leases

    @permanent_only.setter
    def permanent_only(self, value: bool) -> None:
        self.traits.permanent_only = value

    async def reconcile(self, desired: dict[MappingKey, MappingSpec]) -> None:
        """Bring the router in line with ``desired``; never raises for router trouble."""
        async with self._lock:
            await self._reconcile(desired)

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
            if self.orphans and (self.gateway_up or await self._connect()):
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

    def adopt_orphans(self, specs: list[MappingSpec]) -> None:
        """Mappings an earlier run may have left (from the journal): removed unless wanted.
        Their PCP nonce and protocol are looked up in this mapper's journal."""
        rows = {m.spec.key: m for m in self.journal.mappings()} \
            if self.journal is not None else {}
        for spec in specs:
            self.orphans.setdefault(spec.key, spec)
            row = rows.get(spec.key)
            # copies unknown: a router that cannot report them gets the full repeat budget
            self._orphan_meta.setdefault(spec.key, _Orphan(
                copies=MAX_DELETE_REPEAT, from_journal=True,
                nonce=row.nonce if row is not None else b"",
                protocol=row.protocol if row is not None else ""))

    def _orphan(self, wire: MappingSpec, app: Applied | None = None) -> None:
        self.orphans[wire.key] = wire
        copies = max(1, app.adds) if app is not None else 1
        meta = self._orphan_meta.get(wire.key)
        if meta is None:
            self._orphan_meta[wire.key] = _Orphan(copies=copies, app=app)
        else:
            meta.copies, meta.app = max(meta.copies, copies), app

    def _let_go(self, key: MappingKey) -> None:
        self.orphans.pop(key, None)
        self._orphan_meta.pop(key, None)

    async def _delete_orphans(self, wanted: set[tuple[MappingKey, str]], *,
                              final: bool = False) -> int:
        """Delete what may still be on the router and is not wanted. Deletes the router refuses
        are retried once after the others (a PCP server that finds a mapping by internal port
        refuses the older of a TCP/UDP pair until the newer is gone, miniupnp/miniupnp#186);
        what is still refused stays (journal too) and is retried with back-off. ``final``
        (stop): every one is tried now, and the result confirmed with one listing."""
        now = self.clock()
        gone: list[MappingSpec] = []
        count = 0
        counted: set[MappingKey] = set()
        again: list[MappingSpec] = []
        asked: list[MappingSpec] = []
        flushed = now
        # leftovers to be looked up before their delete: from one listing when that is cheaper
        unvouched = sum(1 for k in self.orphans if self._unvouched(self._orphan_meta.get(k)))
        known = await self._snapshot(unvouched, ours_listed=False) if unvouched else None
        try:
            for rnd in (0, 1):
                batch = list(self.orphans.values()) if rnd == 0 else again
                for spec in batch:
                    if not self.gateway_up:
                        break
                    if gone and (len(gone) >= JOURNAL_BATCH
                                 or self.clock() - flushed >= JOURNAL_FLUSH):
                        # each confirmed delete is forgotten within a moment, not at the end
                        # of the round: a stop cut short leaves journaled exactly what may
                        # still be on the router
                        self._journal_gone(gone)
                        gone, flushed = [], self.clock()
                    key = spec.key
                    if (key, spec.internal_client) in wanted:
                        gone.append(spec)  # wanted again: the add path adopts or re-creates it
                        row = self._orphan_meta.get(key)
                        if row is not None and row.from_journal and row.adopted is None:
                            self._adopt(spec, row)  # PCP: refreshed with the nonce that made it
                        self._let_go(key)
                        continue
                    meta = self._orphan_meta.setdefault(key, _Orphan())
                    if rnd == 0 and not final and meta.retry_at > now:
                        continue
                    count += await self._delete_orphan(spec, meta, rnd, final,
                                                       _Round(gone, asked, again, counted,
                                                              known))
            if final and asked and self.gateway_up:
                left = await self._confirm_all_gone(asked)
                first_left = set(left)
                left = await self._delete_again(asked, left)
                count -= len(left & counted)
                count += len((first_left - left) - counted)  # deleted by a later try
                gone = [g for g in gone if g.key not in left]
                # forgotten already when its delete was answered: journaled again
                self._journal_requested([a for a in asked if a.key in left])
        finally:
            self._journal_gone(gone)
        if final:
            self._report_unconfirmed()
        return count

    async def _delete_orphan(self, spec: MappingSpec, meta: _Orphan, rnd: int, final: bool,
                             book: _Round) -> int:
        """One orphan of ``_delete_orphans``: returns 1 when a delete was answered and it is
        gone. A mapping we cannot vouch for is looked up first (``_owner_check``)."""
        key = spec.key
        outcome = await self._owner_check(spec, meta, book.known)
        deleted = False
        if outcome is None:
            if meta.app is None and meta.adopted is None:
                meta.adopted = self._adopt(spec, meta)
            outcome, deleted = await self._remove(spec, meta.copies, confirm=not final)
            outcome = self._leftover(spec, meta, outcome, deleted, rnd)
            if outcome is Removal.GONE:
                book.asked.append(spec)  # a 714 at stop is confirmed like a success
            if outcome in (Removal.REFUSED, Removal.FAILED) and rnd == 0:
                book.again.append(spec)  # once more after the others (busy, or order-bound)
                return 0
        if self._settle(spec, meta, outcome):
            book.gone.append(spec)
            if deleted:
                book.counted.add(key)
            return int(deleted)
        return 0

    def _unvouched(self, meta: _Orphan | None) -> bool:
        """A mapping this run cannot vouch for: journaled by an earlier run or a dead wrapper,
        or ours once but its lease ran out since (the port may be someone else's now)."""
        app = meta.app if meta is not None else None
        return app is None or (app.lease > 0 and self.clock() >= app.added_at + app.lease)

    async def _owner_check(self, spec: MappingSpec, meta: _Orphan,
                           known: dict[MappingKey, RouterMapping] | None = None,
                           ) -> Removal | None:
        """Before deleting a mapping this run cannot vouch for (journaled by an earlier run or
        a dead wrapper, or ours once but its lease has run out since): what the router holds
        on that port now (``known``: from one listing of the round). A delete names only the
        port, so deleting blindly would remove another host's mapping that took the port
        meanwhile. Returns GONE (nothing there:
        forget it), NOT_OURS (someone else's now: forget it, never delete), DOWN, or None
        (ours, or the router cannot show it: delete)."""
        if not self._unvouched(meta) or not self._reads_back() \
                or self.traits.reports_mappings is False:
            return None
        if known is not None:
            answered, found = True, known.get(spec.key)
        else:
            answered, found = await self._lookup(spec)
        if not answered:
            return Removal.DOWN if not self.gateway_up else None
        if found is None:
            return Removal.GONE
        if not self._is_ours(found.internal_client, found.description, spec):
            log.info("not deleting %s: the router maps it to %s:%d (%r) now, not ours", spec.key,
                     found.internal_client, found.internal_port, found.description)
            return Removal.NOT_OURS
        return None

    async def _delete_again(self, specs: list[MappingSpec],
                            left: set[MappingKey]) -> set[MappingKey]:
        """At stop: a delete the router answered but did not do is repeated (bounded), each
        time confirmed by a look-up; some routers act only on a later delete. Returns the keys
        still on the router."""
        for _ in range(STOP_DELETE_RETRIES):
            for spec in [s for s in specs if s.key in left]:
                if not self.gateway_up:
                    return left
                outcome, _ = await self._remove(spec)
                if outcome in (Removal.GONE, Removal.NOT_OURS):
                    left.discard(spec.key)
                    self._let_go(spec.key)
                    self.left_open = [x for x in self.left_open if x.spec.key != spec.key]
            if not left:
                break
        return left

    def _adopt(self, spec: MappingSpec, meta: _Orphan) -> bool:
        """Let a NAT-PMP/PCP backend delete a mapping it did not make in this run (a crashed
        run's, from the journal, or one whose add got no answer)."""
        if not isinstance(self.gateway, AdoptsLeftovers):
            return True
        info = self.gateway.info
        if meta.protocol and info is not None and info.protocol in NO_READBACK \
                and meta.protocol != info.protocol:
            return False  # miniupnpd: NAT-PMP and PCP delete only their own protocol's rules
        nonce = meta.nonce
        if not nonce and not meta.from_journal:  # this run's: requested with this nonce
            nonce = self.gateway.mapping_nonce(spec)
        return self.gateway.adopt(spec, nonce)

    def _leftover(self, spec: MappingSpec, meta: _Orphan, outcome: Removal, deleted: bool,
                  rnd: int) -> Removal:
        """What a delete of a mapping an earlier run left means (logged); ``outcome`` as
        ``_remove`` found it, changed only where the router showed it is not ours any more."""
        if not meta.from_journal:
            return outcome
        if deleted and outcome is Removal.GONE:
            self.stale_removed += 1
        elif self._reads_back():
            pass  # UPnP: looked up and confirmed like any other delete
        elif outcome is Removal.GONE:
            self._leftover_gone(spec, meta)
        elif outcome is Removal.REFUSED and rnd == 1 and meta.nonce:
            return self._leftover_taken(spec)
        return outcome

    def _leftover_gone(self, spec: MappingSpec, meta: _Orphan) -> None:
        """A NAT-PMP/PCP mapping not made by this run that the router says it does not hold,
        or that cannot be deleted from here: said which, never "removed"."""
        proto = self.gateway.info.protocol if self.gateway.info else "NAT-PMP"
        meta.told = True
        if meta.adopted:
            log.info("%s -> %s:%d (from an earlier run) is not on the router any more (%s "
                     "has no such mapping)", spec.key, spec.internal_client, spec.internal_port,
                     proto)
            return
        if meta.protocol and meta.protocol != proto:
            why = f"it was made over {meta.protocol}"
        elif proto == "pcp":
            why = "the journal holds no nonce for it (recorded by an older igdtrigger)"
        else:
            why = "NAT-PMP deletes only the asking host's own mappings"
        log.warning("%s -> %s:%d from an earlier run cannot be deleted over %s (%s); it "
                    "lapses on the router at the end of its lifetime", spec.key,
                    spec.internal_client, spec.internal_port, proto, why)

    @staticmethod
    def _leftover_taken(spec: MappingSpec) -> Removal:
        """A PCP router that refuses, even after the other deletes, to delete a crashed run's
        mapping with the nonce that made it: its entry for that internal port was made with
        another nonce since (another program on this host; miniupnpd 2.3.1 replaces a mapping
        on a MAP with a new nonce). Not ours any more: left alone, not retried forever."""
        log.warning("%s -> %s:%d from an earlier run: the router refuses its delete with the "
                    "nonce that made it; another client has mapped that internal port since, "
                    "so it is left alone", spec.key, spec.internal_client, spec.internal_port)
        return Removal.NOT_OURS

    def _report_unconfirmed(self) -> None:
        """At stop: every mapping not confirmed gone is named, with until when it may stay
        open (the journal keeps it, so the next start deletes it)."""
        named = {x.spec.key for x in self.left_open}
        now = self.clock()
        for key, spec in self.orphans.items():
            if key in named:
                continue
            meta = self._orphan_meta.get(key)
            app = meta.app if meta is not None else None
            remaining: int | None = None
            if app is not None and app.lease > 0:
                remaining = max(0, math.ceil(app.added_at + app.lease - now))
            elif app is not None:
                remaining = 0
            # the journal keeps it (PCP: with the nonce that made it), so the next start
            # deletes it, over whichever protocol made it
            why = ("was not confirmed deleted (the router did not answer or refused); the "
                   "journal keeps it and the next start deletes it")
            self._note_left_open(spec, why, remaining)

    def _settle(self, spec: MappingSpec, meta: _Orphan, outcome: Removal) -> bool:
        """Book one delete's outcome; True when the mapping is done with (gone or not ours)."""
        key = spec.key
        if outcome in (Removal.GONE, Removal.NOT_OURS):
            self._let_go(key)
            self.left_open = [x for x in self.left_open if x.spec.key != key]
            if meta.app is not None and outcome is Removal.GONE:
                meta.app.state = MapState.PENDING
                self._changed(meta.app, "unmapped")
            elif outcome is Removal.GONE and not meta.told:
                log.info("unmapped %s -> %s:%d%s", key, spec.internal_client, spec.internal_port,
                         " (left by an earlier run)" if meta.from_journal else "")
            return True
        if outcome is Removal.DOWN:
            return False
        meta.attempts += 1
        meta.retry_at = self.clock() + min(RETRY_MAX, RETRY_FIRST * 2 ** min(meta.attempts, 6))
        if meta.attempts >= ORPHAN_TRIES:
            meta.retry_at = math.inf  # kept in the journal: the next start tries again
            log.error("gave up deleting %s after %d attempts in this run; the journal keeps it "
                      "and the next start tries again", key, meta.attempts)
        return False

    async def _remove(self, spec: MappingSpec, copies: int = 1, *,
                      confirm: bool = True) -> tuple[Removal, bool]:
        """Delete one mapping and find out whether it is gone. Returns the outcome and whether
        the router accepted at least one delete request."""
        repeat = self.traits.reports_mappings is False and self._reads_back()
        tries = min(MAX_DELETE_REPEAT, copies + 1) if repeat else 1
        deleted = False
        for _ in range(tries):
            try:
                await self.gateway.delete(spec.proto, spec.external_port)
            except NoSuchMapping:
                if deleted or not (confirm and self._reads_back()
                                   and self.traits.confirm_deletes()):
                    return Removal.GONE, deleted
                # "no such entry" is a claim too (IGDv1 miniupnpd answers 714 to a delete it
                # refuses, router-facts §1.5): confirmed like a success
                answered, found = await self._lookup(spec)
                if answered and found is not None and self._is_ours(
                        found.internal_client, found.description, spec):
                    self._learn(deletes_work=False)
                    self._note_left_open(spec, "is still on the router though it answered the "
                                               "delete with 'no such entry' (714)",
                                         found.lease_remaining)
                    return Removal.LEFT_OPEN, deleted
                return Removal.GONE, deleted
            except GatewayUnreachable as exc:
                self.ops["errors"] += 1
                log.warning("could not delete %s: %s", spec.key, exc)
                self._gateway_down(str(exc))
                return Removal.DOWN, deleted
            except NotAuthorized as exc:
                self.ops["errors"] += 1
                if await self._still_ours(spec) is False:
                    log.info("not deleting %s: the router now maps it for someone else (%s)",
                             spec.key, exc)
                    return Removal.NOT_OURS, deleted
                log.warning("router refused to delete %s: %s (retried)", spec.key, exc)
                return Removal.REFUSED, deleted
            except GatewayError as exc:
                self.ops["errors"] += 1
                log.warning("could not delete %s: %s (retried)", spec.key, exc)
                return Removal.FAILED, deleted
            deleted = True
            self.ops["delete"] += 1
        if repeat:
            self._note_left_open(spec, f"was deleted {tries} times and the router never said "
                                       "it is gone (it cannot report its mappings)", None)
            return Removal.UNCONFIRMED, deleted
        if confirm and self._reads_back() and self.traits.confirm_deletes():
            answered, found = await self._lookup(spec)
            if answered and found is not None and self._is_ours(
                    found.internal_client, found.description, spec):
                self._delete_ignored(spec, found)
                return Removal.LEFT_OPEN, deleted
            if answered:
                self.traits.deletes_confirmed += 1
                self._learn(deletes_work=True)
        return Removal.GONE, deleted

    async def _still_ours(self, spec: MappingSpec) -> bool | None:
        """Whether the router's entry for this port is still ours (None: it cannot tell)."""
        if not self._reads_back() or self.traits.reports_mappings is False:
            return None
        answered, found = await self._lookup(spec)
        if not answered:
            return None
        return found is not None and self._is_ours(found.internal_client, found.description,
                                                   spec)

    async def _confirm_all_gone(self, specs: list[MappingSpec]) -> set[MappingKey]:
        """After the deletes of a stop: what the router still holds of ``specs``, from one
        listing when that takes fewer requests (one per entry left) than a lookup per port.
        Returns the keys still there (booked as left open, kept as orphans)."""
        if not self._reads_back() or self.traits.reports_mappings is False:
            return set()
        found: dict[MappingKey, RouterMapping] = {}
        listed = False
        if self._foreign_hint is not None and self._foreign_hint + 1 < len(specs):
            try:
                found = {m.key: m for m in await self.gateway.list()}
                listed = True
            except GatewayUnreachable as exc:
                self._gateway_down(str(exc))
                return set()
            except GatewayError as exc:
                log.debug("listing after the deletes failed (%s): checking port by port", exc)
        if not listed:
            for spec in specs:
                if not self.gateway_up:
                    break
                answered, one = await self._lookup(spec)
                if answered and one is not None:
                    found[spec.key] = one
        left: set[MappingKey] = set()
        for spec in specs:
            m = found.get(spec.key)
            if m is not None and self._is_ours(m.internal_client, m.description, spec):
                self._delete_ignored(spec, m)
                self.orphans[spec.key] = spec  # journal keeps it: the next start tries again
                self._orphan_meta.setdefault(spec.key, _Orphan())
                left.add(spec.key)
        return left

    def _delete_ignored(self, spec: MappingSpec, found: RouterMapping) -> None:
        self._learn(deletes_work=False)
        self._note_left_open(spec, "is still on the router after a delete it answered with "
                                   "success", found.lease_remaining)

    def _note_left_open(self, spec: MappingSpec, why: str, remaining: int | None) -> None:
        until = time.time() + remaining if remaining else None
        entry = LeftOpen(spec, why, remaining, until)
        self.left_open = [x for x in self.left_open if x.spec.key != spec.key] + [entry]
        log.warning("%s", entry.describe())
        meta = self._orphan_meta.get(spec.key)
        if meta is not None and meta.app is not None:
            meta.app.error = entry.describe()
            self._changed(meta.app, "left_open")

    def _journal_gone(self, specs: list[MappingSpec]) -> None:
        if self.journal is not None and specs:
            self.journal.mappings_gone([(s.proto, s.external_port) for s in specs])

    def _journal_requested(self, specs: list[MappingSpec]) -> None:
        if self.journal is not None and specs:
            gw = self.gateway
            nonces = {s.key: n for s in specs if isinstance(gw, AdoptsLeftovers)
                      and (n := gw.mapping_nonce(s))}
            self.journal.mappings_requested(specs, nonces,
                                            gw.info.protocol if gw.info is not None else "")

    def next_deadline(self) -> float | None:
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

    def count(self, state: MapState) -> int:
        return sum(1 for a in self.applied.values() if a.state is state)

    # --- internals -----------------------------------------------------------------------------

    async def _reconcile(self, desired: dict[MappingKey, MappingSpec]) -> None:
        now = self.clock()
        self._wanted_now = desired  # the start-up sweep never deletes what is wanted right now
        if not self.gateway_up:
            if now < self._gateway_retry_at:
                self._mark_pending(desired)
                return
            if not await self._connect():
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
        self._journal_requested(new)  # recorded before it is requested: a crash can't orphan it
        first = [a for a in self.applied.values()
                 if a.state is MapState.PENDING and a.attempts == 0]
        known = await self._snapshot(len(first)) if self.check_before_add and first else None
        for app in first:
            if not self.gateway_up or self._abandoned():
                break
            await self._add(app, check=self.check_before_add, known=known)
        for app in list(self.applied.values()):
            if not self.gateway_up or self._abandoned():
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
            await self._sweep_stale()
        return True

    # --- learning the router ---------------------------------------------------------------

    def _know_router(self, info: GatewayInfo) -> None:
        """Take up what an earlier run learned about this router (journal)."""
        self._protocol = info.protocol  # kept while the router is down
        identity = router_identity(info)
        if identity == self.traits.identity:
            return
        saved = self.journal.router_traits(identity) if self.journal is not None else None
        self.traits = RouterTraits.restore(identity, saved or {})
        self._warned.clear()
        # A router that could not report its mappings gets one plain read-back per run
        # (a firmware update may have fixed it), never another probe add.
        self._recheck_readback = self.traits.reports_mappings is False
        if saved:
            log.info("router %s, as learned before: %s", identity, self._traits_text())

    def _traits_text(self) -> str:
        t = self.traits
        parts = [
            {True: "reports its mappings", False: "cannot report its mappings",
             None: "mapping reports not yet checked"}[t.reports_mappings],
            t.why_permanent or {True: "keeps timed leases", False: "",
                                None: "timed leases not yet checked"}[t.keeps_timed],
            {True: "deletes work", False: "deletes answered but not done",
             None: "deletes not yet checked"}[t.deletes_work],
        ]
        if t.forced_lease is not None:
            parts.append(f"sets every lease to {t.forced_lease}s")
        if t.lease_cap is not None:
            parts.append(f"grants at most {t.lease_cap}s leases")
        if t.description_cut is not None:
            parts.append(f"cuts descriptions to {t.description_cut} characters")
        return ", ".join(p for p in parts if p)

    def _learn(self, **changes: object) -> None:
        """Record what the router showed; persisted when it changes what we know."""
        changed = False
        for name, value in changes.items():
            if getattr(self.traits, name) != value:
                setattr(self.traits, name, value)
                changed = True
        if changed and self.journal is not None and self.traits.identity:
            self.journal.router_traits_put(self.traits.identity, self.traits.persisted())

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)

    def _reads_back(self) -> bool:
        """Whether the protocol can look mappings up on the router at all (NAT-PMP/PCP: the
        granted reply is all there is)."""
        info = self.gateway.info
        protocol = info.protocol if info is not None else self._protocol
        return protocol not in NO_READBACK

    async def _confirm_add(self, app: Applied) -> None:
        """Read back a mapping the router accepted, and learn from what it shows.

        Not there after a timed lease: once more with lease 0. There now: the router drops
        timed leases at once (old DD-WRT, tailscale#18196), lease 0 from now on. Still not
        there: it cannot report its mappings (miniupnpd 2.3.0-2.3.3 pf, miniupnp/miniupnp#719),
        so nothing is re-added for not being seen."""
        wire = app.wire
        settle = not self._recheck_readback and self.traits.reports_mappings is not False
        answered, found = await self._look_settled(wire, settle=settle)
        if not answered:
            if isinstance(self._lookup_error, UnsupportedAction):
                self._cannot_look_up(self._lookup_error)
                app.verified = False
            return
        if found is not None:
            if not (self._is_ours(found.internal_client, found.description, wire)
                    or self._learn_cut(found, wire)):
                return  # someone else's now: the next verification reports it
            self._shown(app, found)
            return
        if self._recheck_readback or self.traits.reports_mappings is False:
            self._recheck_readback = False
            app.verified = False
            return
        if app.asked > 0:
            granted = await self._add_raw(app, 0)
            if granted is None:
                return
            answered, found = await self._look_settled(wire)
            if not answered:
                return
            if found is not None and self._is_ours(found.internal_client, found.description,
                                                   wire):
                self._learn(keeps_timed=False)
                self._warn_once("drops_timed", (
                    f"router accepted a {app.asked}s lease for {wire.key} but did not keep the "
                    "mapping (old DD-WRT does this): using lease 0, igdtrigger deletes the "
                    "mappings itself when the trigger lapses"))
                app.lease, app.asked, app.renew_at = 0, 0, math.inf
                self._shown(app, found)
                return
        self._learn(reports_mappings=False)
        app.verified = False
        app.renew_at = self.clock() + self.lease / 2 if self.lease > 0 else math.inf
        app.lease = app.asked = self.lease if self.traits.timed_leases else 0
        self._warn_once("unreadable", (
            f"router accepted {wire.key} but does not show it (GetSpecificPortMappingEntry and "
            "the listing do not have it; miniupnpd 2.3.0-2.3.3 on pf does this): igdtrigger "
            "cannot verify mappings on this router, renews them at half lease only, and "
            "repeats each delete until the router says the mapping is gone"))

    async def _look_settled(self, wire: MappingSpec, *,
                            settle: bool = True) -> tuple[bool, RouterMapping | None]:
        """A read-back right after an add; not there: once more after ``readback_settle``
        seconds, before anything is concluded from its absence (a router that installs the
        rule a moment after answering is neither "drops timed leases" nor "cannot report")."""
        answered, found = await self._lookup(wire)
        if answered and found is None and settle and self.readback_settle >= 0:
            await asyncio.sleep(self.readback_settle)
            answered, found = await self._lookup(wire)
        return answered, found

    def _cannot_look_up(self, exc: GatewayError) -> None:
        """GetSpecificPortMappingEntry not implemented (401/602): as a router that cannot
        report its mappings."""
        self._learn(reports_mappings=False)
        self._warn_once("unreadable", (
            f"router cannot look mappings up ({exc}): igdtrigger cannot verify mappings on "
            "this router, renews them at half lease only, and repeats each delete until the "
            "router says the mapping is gone"))

    def _shown(self, app: Applied, found: RouterMapping) -> None:
        """The router's record has the mapping: trust grows, and its lease is the granted one."""
        app.verified = True
        self._recheck_readback = False
        self.traits.adds_confirmed += 1
        learned: dict[str, object] = {"reports_mappings": True}
        if app.asked > 0:
            learned["keeps_timed"] = True
        shown = found.lease_remaining
        if shown is not None and shown >= 0:
            if app.asked == 0:
                app.lease = shown  # IGDv2 makes lease 0 a week (router-facts §7)
            elif shown == 0 or shown > app.asked + 5:
                # a router that sets its own lease (Technicolor, miniupnp/miniupnp#398)
                learned["forced_lease"] = shown
                app.lease = shown
            elif shown < app.asked - 5:
                # capped below what we asked, silently: renew in time for the router's lease,
                # at every renewal (not only this read-back)
                learned["lease_cap"] = shown
                app.lease = shown
            if shown > 0:
                app.renew_at = min(app.renew_at, self.clock() + shown / 2)
        self._learn(**learned)
        if "lease_cap" in learned:
            self._warn_once("lease_cap", (
                f"router granted {app.wire.key} a {shown}s lease (asked {app.asked}s) without "
                "saying so: igdtrigger renews at half the router's lease"))
        if "forced_lease" in learned and app.lease != app.asked:
            self._warn_once("forced_lease", (
                f"router set the lease of {app.wire.key} to "
                f"{app.lease or 'permanent'}{'s' if app.lease else ''} (asked {app.asked}s): "
                "status shows the router's lease; igdtrigger still deletes the mapping when "
                "the trigger lapses"))

    async def _sweep_stale(self) -> None:
        """Delete mappings a previous run of this instance left behind (crash, kill -9)."""
        try:
            found = await self.gateway.list()
        except GatewayError as exc:
            log.warning("could not list the router's mappings to remove stale ones: %s", exc)
            return
        self._swept = True
        self._foreign_hint = sum(1 for m in found if owned_by(m.description, self.tag) is None)
        info = self.gateway.info
        me = info.local_address if info is not None else ""
        wanted = self._wanted_now
        for m in found:
            held = {a.wire.key for a in self.applied.values()}
            want = wanted.get(m.key)
            if (want is not None and want.internal_client == m.internal_client
                    and owned_by(m.description, self.tag) is not None):
                # ours, and a restored activation wants it: no delete (no gap in the open
                # ports). Tracked as possibly on the router, so the add path refreshes it in
                # place, and it is deleted like any other if the activation ends first.
                if m.key not in self.applied:
                    kept = Applied(want)
                    kept.maybe_applied = True
                    self.applied[m.key] = kept
                continue
            if m.key in held or (owned_by(m.description, self.tag) is None
                                 and not self._reclaimable(m.internal_client, m.description)):
                continue
            if m.internal_client != me and m.key not in self.orphans:
                # Our description, another host, and not in our journal: a copy of this
                # state directory on another machine (same instance tag), or a router listing
                # other hosts' rows under our description. Not provably ours: left alone.
                log.info("not removing %s -> %s: it has this instance's description but maps "
                         "to another host and is not in the journal", m.key, m.internal_client)
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
        elif self.traits.reports_mappings is False:
            return None  # it shows nothing: its own conflict answer (718) guards the add
        else:
            try:
                existing = await self.gateway.get(wire.proto, wire.external_port)
            except UnsupportedAction as exc:
                self._cannot_look_up(exc)
                return None
            self.ops["verify"] += 1
        if existing is None or self._is_ours(existing.internal_client, existing.description,
                                             wire):
            return None
        if (existing.internal_client, existing.internal_port) == (
                wire.internal_client, wire.internal_port) and existing.description.startswith(
                "igdtrigger "):
            # another igdtrigger (a second `run` of the same rule, or the service) holds the
            # very same mapping: open meanwhile, and taken over soon after it lets go (its
            # owner deletes it when it ends, so waiting the full recheck left the game closed)
            self._siblings.add(wire.key)
            return (f"{wire.key} is held by another igdtrigger for the same host and port "
                    f"({existing.description!r}): open meanwhile, taken over when it lets go")
        return (f"{wire.key} is already mapped on the router to "
                f"{existing.internal_client}:{existing.internal_port} "
                f"({existing.description!r}); igdtrigger leaves it alone")

    def _abandoned(self) -> bool:
        return self.abandon is not None and self.abandon()

    async def _add_leased(self, wire: MappingSpec, app: Applied | None = None, *,
                          any_port: bool = False) -> Granted:
        """Add with the lease policy learned for this router, through the gateway layer's one
        lease fallback (``base.add_with_lease_fallback``): a timed lease refused is tried once
        with lease 0 there, and only when that succeeds (``Granted.timed_lease_refused``) is
        the router "permanent only" (a 402 for a full table, miniupnp/miniupnp#92, fails both
        and teaches nothing). ``any_port``: ``add_any`` (the router may pick the port)."""
        lease = self.lease if self.traits.timed_leases else 0
        if app is not None:
            app.asked = lease
        try:
            if any_port:
                granted = await self.gateway.add_any(wire, lease)
            else:
                granted = await self.gateway.add(wire, lease)
        except asyncio.CancelledError:
            if app is not None:  # a stop cancelled it unanswered: it may be on the router
                app.maybe_applied = True
            raise
        refused = granted.timed_lease_refused
        if refused is not None:
            if app is not None:
                app.asked = 0
            self._learn(permanent_only=True)
            self._warn_once("permanent_only", (
                f"router refuses timed leases ({refused.code} {refused.description}; lease 0 "
                "accepted): using permanent mappings that igdtrigger deletes itself when the "
                "trigger lapses"))
        return granted

    async def _add_raw(self, app: Applied, lease: int) -> Granted | None:
        """One add of ``app``'s mapping with exactly this lease (a probe); None if refused."""
        try:
            granted = await self.gateway.add(app.wire, lease)
        except GatewayUnreachable as exc:
            app.maybe_applied = True
            self._gateway_down(str(exc))
            return None
        except GatewayError as exc:
            log.debug("probe add of %s with lease %d: %s", app.wire.key, lease, exc)
            return None
        app.adds += 1
        app.added_at = self.clock()
        self.ops["add"] += 1
        return granted

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
                why = await self._foreign(app.wire, known)
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

    def _is_ours(self, client: str, description: str, spec: MappingSpec) -> bool:
        """Whether the router's entry (its internal client and description) is our ``spec``.
        On a router learned to cut descriptions, a prefix of ours of that length counts."""
        if client != spec.internal_client:
            return False
        if owned_by(description, self.tag) is not None or self._reclaimable(client, description):
            return True
        cut, shown = self.traits.description_cut, description.strip()
        return (cut is not None and abs(len(shown) - cut) <= 1 and len(shown) >= MIN_CUT
                and len(shown) < len(spec.description) and spec.description.startswith(shown))

    def _learn_cut(self, found: RouterMapping, wire: MappingSpec) -> bool:
        """Read back right after our add was accepted: the router shows our client and port
        with a prefix of our description, so it cuts descriptions (learned, persisted)."""
        shown = found.description.strip()
        if (found.internal_client != wire.internal_client
                or found.internal_port != wire.internal_port or len(shown) < MIN_CUT
                or len(shown) >= len(wire.description)
                or not wire.description.startswith(shown)):
            return False
        self._learn(description_cut=len(shown))
        self._warn_once("description_cut", (
            f"router shows {wire.key} with its description cut to {shown!r}: igdtrigger "
            "recognises its own mappings on this router by client, port and that prefix"))
        return True

    def _reclaimable(self, client: str, description: str) -> bool:
        info = self.gateway.info
        return (self.reclaim is not None and info is not None
                and client == info.local_address and self.reclaim(description))

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
        app.retry_at = self.clock() + min(RETRY_MAX, RETRY_FIRST * 2 ** min(app.attempts, 6))
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

    async def _lookup(self, spec: MappingSpec) -> tuple[bool, RouterMapping | None]:
        """(answered, the router's entry) for one of our mappings; a router that does not
        answer is marked down. An error answer is kept in ``_lookup_error``."""
        self._lookup_error = None
        try:
            found = await self.gateway.get(spec.proto, spec.external_port)
        except GatewayUnreachable as exc:
            self._gateway_down(str(exc))
            return False, None
        except GatewayError as exc:
            log.debug("checking %s: %s", spec.key, exc)
            self._lookup_error = exc
            return False, None
        self.ops["verify"] += 1
        return True, found

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
            elif not self._is_ours(found.internal_client, found.description, spec):
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

    def _changed(self, app: Applied, what: str) -> None:
        if self.on_change is not None:
            self.on_change(app, what)
