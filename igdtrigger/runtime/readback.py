"""Router truth: the mapper's look-ups, read-backs after an add, and what they teach.

A router's answer is a claim (``core.traits``): an add is read back until the router has shown a
few times that it keeps what it accepts; what the router shows (another lease, a cut
description, nothing at all) is learned and kept per router in the journal. Also the checks
before an add: whether the port is someone else's, from one lookup or one listing of the
router's table when a batch of ports is checked (``_snapshot``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TypeGuard

from igdtrigger.core.activation import owned_by
from igdtrigger.core.errors import GatewayError, GatewayUnreachable, UnsupportedAction
from igdtrigger.core.model import MappingKey, MappingSpec, RouterMapping
from igdtrigger.gateway.base import Granted
from igdtrigger.runtime.mapbase import Applied, MapperBase, MapState

__all__ = ["LIST_MIN_BATCH", "MIN_CUT", "RouterTruth"]

log = logging.getLogger("igdtrigger.runtime.mapper")  # one logger for the whole mapper

# Checking many ports at once (a range opening, re-applying after a router restart): one listing
# of the router's table (one GetGenericPortMappingEntry per entry) instead of one
# GetSpecificPortMappingEntry per port, when the table is known to be smaller than the batch.
LIST_MIN_BATCH = 8
MIN_CUT = 8  # a description cut shorter than this tells nothing about whose mapping it is


class RouterTruth(MapperBase):
    """Look-ups and read-backs of the router's table (a part of ``Mapper``)."""

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

    def _is_ours(self, found: RouterMapping | None,
                 spec: MappingSpec) -> TypeGuard[RouterMapping]:
        """Whether the router's entry (None: it has none) is our ``spec``, by its internal
        client and description. On a router learned to cut descriptions, a prefix of ours of
        that length counts."""
        if found is None or found.internal_client != spec.internal_client:
            return False
        client, description = found.internal_client, found.description
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

    async def _still_ours(self, spec: MappingSpec) -> bool | None:
        """Whether the router's entry for this port is still ours (None: it cannot tell)."""
        if not self._reads_back() or self.traits.reports_mappings is False:
            return None
        answered, found = await self._lookup(spec)
        if not answered:
            return None
        return self._is_ours(found, spec)

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
            if not (self._is_ours(found, wire)
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
            if self._is_ours(found, wire):
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
            gw = self.gateway
            try:
                existing = await gw.get(wire.proto, wire.external_port)
            except UnsupportedAction as exc:
                self._cannot_look_up(exc)
                return None
            self.ops["verify"] += 1
        return self._whose(existing, wire)

    def _whose(self, existing: RouterMapping | None, wire: MappingSpec) -> str | None:
        """Why the router's entry ``existing`` (None: it has none) for ``wire``'s port is
        someone else's, or None if free/ours."""
        if existing is None or self._is_ours(existing, wire):
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
