"""Deleting what may still be on the router and is no longer wanted, and confirming it.

Orphans are mappings of ours that are not wanted any more: a lapsed trigger's, a delete that
failed, what the journal says a crashed run left (``adopt_orphans``), or what the start-up sweep
finds under this instance's tag. A delete names only the port, so one this run cannot vouch for
is looked up first and never made on another host's mapping; a delete is confirmed where the
router can show its table, repeated where it cannot, retried with back-off when refused, and
forgotten in the journal only when done with. What stays open is named (``LeftOpen``).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from igdtrigger.core.activation import owned_by
from igdtrigger.core.errors import (
    GatewayError,
    GatewayUnreachable,
    NoSuchMapping,
    NotAuthorized,
)
from igdtrigger.core.model import MappingKey, MappingSpec, RouterMapping
from igdtrigger.core.traits import NO_READBACK
from igdtrigger.gateway.base import AdoptsLeftovers
from igdtrigger.runtime.mapbase import Applied, LeftOpen, MapState, OrphanMeta, backoff
from igdtrigger.runtime.readback import RouterTruth

__all__ = ["JOURNAL_BATCH", "JOURNAL_FLUSH", "MAX_DELETE_REPEAT", "ORPHAN_TRIES",
           "STOP_DELETE_RETRIES", "DeleteRound", "Orphans", "Removal"]

log = logging.getLogger("igdtrigger.runtime.mapper")  # one logger for the whole mapper

# A router that cannot report its mappings: a delete is repeated until it answers "no such
# mapping" (each add may have left a copy, miniupnp/miniupnp#719), at most this often.
MAX_DELETE_REPEAT = 16
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


@dataclass(slots=True)
class DeleteRound:
    """What one round of ``_delete_orphans`` has booked so far (lists shared with it)."""

    gone: list[MappingSpec]  # done with: forgotten in the journal
    asked: list[MappingSpec]  # deletes answered: confirmed at stop
    again: list[MappingSpec]  # refused or failed: once more after the others
    counted: set[MappingKey]  # deleted by a request of ours
    known: dict[MappingKey, RouterMapping] | None = None  # the router's table, if listed




class Orphans(RouterTruth):
    """The delete side of the mapper (a part of ``Mapper``)."""

    def adopt_orphans(self, specs: list[MappingSpec]) -> None:
        """Mappings an earlier run may have left (from the journal): removed unless wanted.
        Their PCP nonce and protocol are looked up in this mapper's journal."""
        rows = {m.spec.key: m for m in self.journal.mappings()} \
            if self.journal is not None else {}
        for spec in specs:
            self.orphans.setdefault(spec.key, spec)
            row = rows.get(spec.key)
            # copies unknown: a router that cannot report them gets the full repeat budget
            self._orphan_meta.setdefault(spec.key, OrphanMeta(
                copies=MAX_DELETE_REPEAT, from_journal=True,
                nonce=row.nonce if row is not None else b"",
                protocol=row.protocol if row is not None else ""))

    async def _sweep_stale(self, wanted: Mapping[MappingKey, MappingSpec]) -> None:
        """Delete mappings a previous run of this instance left behind (crash, kill -9),
        except those ``wanted`` right now (a restored activation's: kept, no gap)."""
        try:
            found = await self.gateway.list()
        except GatewayError as exc:
            log.warning("could not list the router's mappings to remove stale ones: %s", exc)
            return
        self._swept = True
        self._foreign_hint = sum(1 for m in found if owned_by(m.description, self.tag) is None)
        info = self.gateway.info
        me = info.local_address if info is not None else ""
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

    def _orphan(self, wire: MappingSpec, app: Applied | None = None) -> None:
        self.orphans[wire.key] = wire
        copies = max(1, app.adds) if app is not None else 1
        meta = self._orphan_meta.get(wire.key)
        if meta is None:
            self._orphan_meta[wire.key] = OrphanMeta(copies=copies, app=app)
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
                    meta = self._orphan_meta.setdefault(key, OrphanMeta())
                    if rnd == 0 and not final and meta.retry_at > now:
                        continue
                    count += await self._delete_orphan(spec, meta, rnd, final,
                                                       DeleteRound(gone, asked, again, counted,
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

    async def _delete_orphan(self, spec: MappingSpec, meta: OrphanMeta, rnd: int, final: bool,
                             book: DeleteRound) -> int:
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

    def _unvouched(self, meta: OrphanMeta | None) -> bool:
        """A mapping this run cannot vouch for: journaled by an earlier run or a dead wrapper,
        or ours once but its lease ran out since (the port may be someone else's now)."""
        app = meta.app if meta is not None else None
        return app is None or (app.lease > 0 and self.clock() >= app.added_at + app.lease)

    async def _owner_check(self, spec: MappingSpec, meta: OrphanMeta,
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
        if not self._is_ours(found, spec):
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

    def _adopt(self, spec: MappingSpec, meta: OrphanMeta) -> bool:
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

    def _leftover(self, spec: MappingSpec, meta: OrphanMeta, outcome: Removal, deleted: bool,
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

    def _leftover_gone(self, spec: MappingSpec, meta: OrphanMeta) -> None:
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

    def _settle(self, spec: MappingSpec, meta: OrphanMeta, outcome: Removal) -> bool:
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
        meta.retry_at = self.clock() + backoff(meta.attempts)
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
                if answered and self._is_ours(found, spec):
                    self._delete_ignored(spec, found, "'no such entry' (714)")
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
            if answered and self._is_ours(found, spec):
                self._delete_ignored(spec, found, "success")
                return Removal.LEFT_OPEN, deleted
            if answered:
                self.traits.deletes_confirmed += 1
                self._learn(deletes_work=True)
        return Removal.GONE, deleted

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
            if self._is_ours(m, spec):
                self._delete_ignored(spec, m, "success")
                self.orphans[spec.key] = spec  # journal keeps it: the next start tries again
                self._orphan_meta.setdefault(spec.key, OrphanMeta())
                left.add(spec.key)
        return left

    def _delete_ignored(self, spec: MappingSpec, found: RouterMapping, answer: str) -> None:
        """The router still shows ``found`` (ours) after it answered our delete with
        ``answer``: deletes on this router are not done (learned); named as left open."""
        self._learn(deletes_work=False)
        self._note_left_open(spec, f"is still on the router after a delete it answered with "
                                   f"{answer}", found.lease_remaining)

    def _note_left_open(self, spec: MappingSpec, why: str, remaining: int | None) -> None:
        until = self.wall() + remaining if remaining else None
        entry = LeftOpen(spec, why, remaining, until)
        self.left_open = [x for x in self.left_open if x.spec.key != spec.key] + [entry]
        log.warning("%s", entry.describe())
        meta = self._orphan_meta.get(spec.key)
        if meta is not None and meta.app is not None:
            meta.app.error = entry.describe()
            self._changed(meta.app, "left_open")
