"""Keeps the router's IPv6 pinholes equal to what the live activations need, on this machine.

The IPv4 side is the mapper's; this is its IPv6 counterpart, on the same terms: every pinhole is
journaled before it is requested, renewed at half its lease, deleted the moment it is no longer
wanted, re-added when the router forgot it, and failures back off instead of hammering the
router. Pinholes left by a crash (in the journal, not wanted now) are closed on the next start.
Clock-injected; the router is behind ``FirewallClient`` (or anything with its four calls).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from igdtrigger.core.errors import (
    ActionFailed,
    GatewayError,
    GatewayNotFound,
    NoSuchMapping,
    NotAuthorized,
)
from igdtrigger.core.model import PinholeSpec
from igdtrigger.core.pinhole import PINHOLE_MAX_LEASE, FirewallInfo

__all__ = ["RECHECK", "RETRY_FIRST", "RETRY_MAX", "Pinhole", "PinholeClient", "PinholeJournal",
           "PinholeKeeper", "PinholeState"]

log = logging.getLogger("igdtrigger.runtime.pinholes")

RETRY_FIRST = 2.0
RETRY_MAX = 300.0
RECHECK = 600.0  # a router whose firewall is off, or that has no service, is asked again


class PinholeClient(Protocol):
    """The router side (``gateway.upnp.pinhole.FirewallClient`` is one)."""

    info: FirewallInfo | None

    async def connect(self) -> FirewallInfo:
        """Find the router's IPv6 firewall service; raises ``GatewayError``."""
    async def add(self, spec: PinholeSpec, lease: int) -> int:
        """Open a pinhole for ``lease`` seconds; returns its UniqueID."""
    async def update(self, spec: PinholeSpec, uid: int, lease: int) -> None:
        """Renew pinhole ``uid`` for ``lease`` seconds; ``NoSuchMapping`` when it is gone."""
    async def delete(self, spec: PinholeSpec, uid: int) -> None:
        """Close pinhole ``uid``; ``NoSuchMapping`` when it is gone already."""


class PinholeJournal(Protocol):
    """Where pinholes are recorded before they are requested (``runtime.journal.Journal``)."""

    def pinholes_requested(self, specs: list[PinholeSpec]) -> None:
        """Record pinholes about to be requested."""
    def pinholes_gone(self, specs: list[PinholeSpec]) -> None:
        """Forget pinholes confirmed closed."""
    def pinholes(self) -> list[PinholeSpec]:
        """Every pinhole that may still be open on the router."""


class PinholeState(enum.StrEnum):
    """Where one wanted pinhole stands with the router."""

    PENDING = "pending"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass(slots=True)
class Pinhole:
    """One wanted pinhole and what the router did with it (its UniqueID, timers)."""

    spec: PinholeSpec
    state: PinholeState = PinholeState.PENDING
    uid: int | None = None
    renew_at: float = 0.0
    retry_at: float = 0.0
    failures: int = 0
    error: str = ""
    refused: bool = False  # the last add was answered with an error: nothing to close

    def to_json(self, now: float) -> dict[str, Any]:
        """The JSON shape of ``status`` for this pinhole (``now``: the keeper clock, seconds)."""
        out: dict[str, Any] = {"address": self.spec.address, "proto": self.spec.proto.value,
                               "port": self.spec.port, "state": self.state.value}
        if self.uid is not None:
            out["uid"] = self.uid
        if self.state is PinholeState.ACTIVE:
            out["renew_in"] = round(max(0.0, self.renew_at - now), 1)
        if self.error:
            out["error"] = self.error
        return out


class PinholeKeeper:
    """Keeps the router's IPv6 pinholes equal to what is wanted (see the module docstring)."""

    def __init__(self, client: PinholeClient, *, clock: Callable[[], float], lease: float,
                 journal: PinholeJournal | None = None,
                 on_change: Callable[[PinholeSpec, str, str], None] | None = None) -> None:
        self.client = client
        self.clock = clock
        self.lease = max(1, min(PINHOLE_MAX_LEASE, int(lease)))
        self.journal = journal
        self.on_change = on_change
        self.held: dict[PinholeSpec, Pinhole] = {}
        self.stale: set[PinholeSpec] = set(journal.pinholes()) if journal else set()
        self._gone: list[PinholeSpec] = []  # closed, not yet forgotten by the journal
        self.reason = ""  # why pinholes cannot be opened now ("" when they can, or unknown)
        self._connected = False
        self._connect_at = 0.0
        self._connect_failures = 0

    @property
    def available(self) -> bool | None:
        """True when the router takes pinholes, False when it cannot, None before asked."""
        if self._connected and not self.reason:
            return True
        return False if self.reason else None

    # --- the loop ------------------------------------------------------------------------------

    async def reconcile(self, desired: set[PinholeSpec]) -> None:
        """Open, renew and close pinholes so the router holds ``desired``; never raises for
        router trouble."""
        now = self.clock()
        if not desired and not self.held and not self.stale:
            return
        if not await self._ensure_connected(now):
            return
        try:
            for spec in [s for s in self.held if s not in desired]:
                if not await self._remove(self.held[spec]) and self._router_gone(now):
                    return
            for spec in [s for s in self.stale if s not in desired]:
                if not await self._close_stale(spec) and self._router_gone(now):
                    return
        finally:
            self._forget_gone()
        todo = [s for s in sorted(desired) if s not in self.held
                or (self.held[s].state is not PinholeState.ACTIVE and self.held[s].retry_at <= now)
                or (self.held[s].state is PinholeState.ACTIVE and self.held[s].renew_at <= now)]
        new = [s for s in todo if s not in self.held]
        if new and self.journal is not None:
            self.journal.pinholes_requested(new)
        for spec in todo:
            if not self._connected:
                break
            ph = self.held.setdefault(spec, Pinhole(spec))
            self.stale.discard(spec)
            await self._apply(ph)

    async def _ensure_connected(self, now: float) -> bool:
        if self._connected and self.client.info is not None:
            return True
        if now < self._connect_at:
            return False
        try:
            info = await self.client.connect()
        except GatewayError as exc:
            self._connected = False
            self._connect_failures += 1
            delay = RECHECK if isinstance(exc, GatewayNotFound) else self._backoff(
                self._connect_failures)
            self._connect_at = now + delay
            if str(exc) != self.reason:
                log.warning("IPv6 pinholes unavailable: %s", exc)
            self.reason = str(exc)
            return False
        self._connect_failures = 0
        if not info.enabled or not info.inbound_allowed:
            why = ("the router's IPv6 firewall is off: its IPv6 addresses take inbound "
                   "traffic without pinholes" if not info.enabled else
                   "the router's IPv6 firewall does not allow inbound pinholes "
                   "(InboundPinholeAllowed=0): allow them in its IPv6 firewall settings")
            if why != self.reason:
                log.warning("IPv6 pinholes: %s", why)
            self.reason = why
            self._connected = False
            self._connect_at = now + RECHECK
            return False
        if self.reason:
            log.info("IPv6 pinholes available again via %s", info.control_url)
        self.reason = ""
        self._connected = True
        for ph in self.held.values():  # a (re)connect: the router may have lost them all
            if ph.state is PinholeState.ACTIVE:
                ph.renew_at = now
        return True

    def _router_gone(self, now: float) -> bool:
        """After a failed call: was it the router going away? Then stop this round and
        reconnect later (not one timeout per remaining pinhole)."""
        if self.client.info is not None:
            return False
        self._connected = False
        self._connect_failures += 1
        self._connect_at = now + self._backoff(self._connect_failures)
        return True

    @staticmethod
    def _backoff(failures: int) -> float:
        return float(min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, failures - 1)))

    def _failed(self, ph: Pinhole, exc: GatewayError, now: float) -> None:
        ph.failures += 1
        ph.error = str(exc)
        ph.state = PinholeState.FAILED
        ph.refused = isinstance(exc, ActionFailed) and ph.uid is None
        ph.retry_at = now + (RETRY_MAX if isinstance(exc, NotAuthorized)
                             else self._backoff(ph.failures))
        if ph.failures == 1 or isinstance(exc, NotAuthorized):
            log.warning("pinhole %s failed: %s", ph.spec, exc)
        self._changed(ph.spec, "failed", ph.error)
        if not isinstance(exc, (NotAuthorized, NoSuchMapping)) and self.client.info is None:
            self._connected = False  # the router went away: reconnect with back-off
            self._connect_at = now + self._backoff(ph.failures)

    async def _apply(self, ph: Pinhole) -> None:
        now = self.clock()
        try:
            if ph.state is PinholeState.ACTIVE and ph.uid is not None:
                try:
                    await self.client.update(ph.spec, ph.uid, self.lease)
                    ph.renew_at = now + self.lease / 2
                    return
                except NoSuchMapping:
                    log.warning("pinhole %s was gone from the router: opening it again", ph.spec)
                    ph.uid = None  # its number may be another pinhole's by now: never used again
            ph.uid = await self.client.add(ph.spec, self.lease)
        except GatewayError as exc:
            self._failed(ph, exc, now)
            return
        first = ph.state is not PinholeState.ACTIVE
        ph.state, ph.error, ph.failures, ph.refused = PinholeState.ACTIVE, "", 0, False
        ph.renew_at = now + self.lease / 2
        if first:
            self._changed(ph.spec, "opened", "")

    async def _remove(self, ph: Pinhole) -> bool:
        """Close a pinhole no longer wanted. One whose add never got an answer (cancelled at
        a stop, timed out) may exist on the router all the same: it is closed as a left-over."""
        self.held.pop(ph.spec, None)
        if ph.uid is None and not ph.refused:
            self.stale.add(ph.spec)
            return await self._close_stale(ph.spec)
        if ph.uid is not None:
            try:
                await self.client.delete(ph.spec, ph.uid)
            except NoSuchMapping:
                pass
            except GatewayError as exc:
                log.warning("could not close pinhole %s (%s): tried again, and its lease (%ds) "
                            "ends it anyway", ph.spec, exc, self.lease)
                self.stale.add(ph.spec)  # tried again next round, and after a restart
                return False
        self._gone.append(ph.spec)
        self._changed(ph.spec, "closed", "")
        return True

    async def _close_stale(self, spec: PinholeSpec) -> bool:
        """A pinhole a previous run may have left: its UniqueID is not known (nor trusted after
        a router restart), so ask for the same pinhole with a 1 s lease (the router answers
        with the existing one's ID) and delete that. A router that refuses the address (606)
        cannot hold a pinhole for it either."""
        try:
            uid = await self.client.add(spec, 1)
            await self.client.delete(spec, uid)
        except (NoSuchMapping, NotAuthorized):
            pass
        except GatewayError as exc:
            log.info("left-over pinhole %s not closed now (%s); it is tried again", spec, exc)
            return False
        self.stale.discard(spec)
        self._gone.append(spec)
        log.info("closed left-over pinhole %s", spec)
        return True

    def lost_state(self) -> None:
        """The router restarted: every pinhole is re-added on the next round."""
        now = self.clock()
        for ph in self.held.values():
            ph.renew_at = now
        self._connected = False
        self._connect_at = now

    def next_deadline(self) -> float | None:
        """When ``reconcile`` next has work (renewal, retry, reconnect), on the clock; None:
        none."""
        times = [ph.renew_at if ph.state is PinholeState.ACTIVE else ph.retry_at
                 for ph in self.held.values()]
        if self.stale or (self.held and not self._connected):
            times.append(self._connect_at)
        return min(times) if times else None

    async def remove_all(self) -> int:
        """Close every pinhole held or left over (stop); returns how many held ones closed."""
        if not self.held and not self.stale:
            return 0
        if not self._connected or self.client.info is None:
            try:
                await self.client.connect()
            except GatewayError as exc:
                log.warning("pinholes not closed (%s): their leases (%ds) end them", exc,
                            self.lease)
                return 0
        removed = 0
        now = self.clock()
        try:
            for ph in list(self.held.values()):
                ok = await self._remove(ph)
                removed += ok
                if not ok and self._router_gone(now):
                    log.warning("router stopped answering: the other pinholes' leases (%ds) "
                                "end them", self.lease)
                    return removed
            for spec in list(self.stale):
                if not await self._close_stale(spec) and self._router_gone(now):
                    break
            return removed
        finally:
            self._forget_gone()

    def _forget_gone(self) -> None:
        """Journal the pinholes closed since the last call, in one write: a crash before it
        only leaves rows for pinholes already closed, which the next start closes again
        (a harmless add-with-1s-lease and delete), never an open pinhole without a row."""
        gone, self._gone = self._gone, []
        if gone and self.journal is not None:
            self.journal.pinholes_gone(gone)

    # --- reporting -----------------------------------------------------------------------------

    def _changed(self, spec: PinholeSpec, what: str, error: str) -> None:
        if self.on_change is not None:
            self.on_change(spec, what, error)

    def count(self, state: PinholeState = PinholeState.ACTIVE) -> int:
        """How many wanted pinholes are in ``state``."""
        return sum(1 for ph in self.held.values() if ph.state is state)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each wanted pinhole as ``Pinhole.to_json``, sorted."""
        now = self.clock()
        return [ph.to_json(now) for ph in sorted(self.held.values(), key=lambda p: p.spec)]

    def status(self) -> dict[str, Any]:
        """The JSON shape of ``status["pinholes"]``: availability, why not, lease, entries."""
        info = self.client.info
        return {
            "available": self.available,
            "reason": self.reason or None,
            "control_url": info.control_url if info else None,
            "lease": self.lease,
            "entries": self.snapshot(),
        }

