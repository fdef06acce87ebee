"""The mapper's state: what it applied, what may be left on the router, what it learned.

``MapperBase`` holds every field the mapper's parts share (``Mapper`` in ``mapper.py`` is the
public class; ``readback.py`` checks the router's answers, ``orphans.py`` deletes what is no
longer wanted) and the small bookkeeping they all use: the gateway's up/down back-off, the
journal calls, what was learned about the router (``core.traits``). No requests are sent here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from igdtrigger.core import trace
from igdtrigger.core.activation import Clock
from igdtrigger.core.errors import GatewayError
from igdtrigger.core.model import MappingKey, MappingSpec
from igdtrigger.core.traits import NO_READBACK, RouterTraits, router_identity
from igdtrigger.gateway.base import AdoptsLeftovers, Gateway, GatewayInfo

T = TypeVar("T")

if TYPE_CHECKING:  # sqlite3 stays out of `igdtrigger run` (standalone) start-up
    from igdtrigger.runtime.journal import Journal, JournalActivation

__all__ = ["RETRY_FIRST", "RETRY_MAX", "Applied", "LeftOpen", "MapState", "MapperBase",
           "OrphanMeta", "backoff"]

log = logging.getLogger("igdtrigger.runtime.mapper")  # one logger for the whole mapper


RETRY_FIRST = 1.0  # s: back-off after the router failed us, doubling
RETRY_MAX = 60.0  # s: up to this


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: ``RETRY_FIRST`` doubling
    per attempt, at most ``RETRY_MAX``."""
    return float(min(RETRY_MAX, RETRY_FIRST * 2 ** min(attempts, 6)))


@dataclass(frozen=True, slots=True)
class LeftOpen:
    """A mapping of ours the router still holds after we deleted it (or could not)."""

    spec: MappingSpec
    why: str
    lease_remaining: int | None  # what the router reports, 0 = permanent, None = unknown
    until_wall: float | None  # wall-clock time it lapses on the router, None = not on its own

    def describe(self) -> str:
        """One line for the log and the stop summary: what, why, and until when it stays open."""
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
        """The JSON shape of status and the stop summary (``until``: epoch seconds or null)."""
        return {"mapping": str(self.spec.key), "internal_client": self.spec.internal_client,
                "why": self.why, "lease_remaining": self.lease_remaining,
                "until": self.until_wall}


@dataclass(slots=True)
class OrphanMeta:
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


class MapState(enum.StrEnum):
    """Where one wanted mapping stands with the router."""

    PENDING = "pending"  # wanted, not yet on the router
    ACTIVE = "active"  # on the router, ours
    CONFLICT = "conflict"  # the router maps this port to someone else; left alone
    FAILED = "failed"  # the router refused; retried with back-off


@dataclass(slots=True)
class Applied:
    """One wanted mapping and what the router did with it (granted port and lease, timers)."""

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
        """The JSON shape of ``status`` for this mapping (``now``: the mapper clock, seconds)."""
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



class MapperBase:
    """The fields and bookkeeping shared by the mapper's parts (see ``Mapper``)."""

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
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: monotonic seconds. ``tag``: this instance's tag (its descriptions read
        ``igdtrigger <rule> <tag>``). ``lease``: seconds asked per mapping (0 = permanent).
        ``verify_interval`` / ``canary_interval``: seconds between checks of every mapping /
        of one. ``check_before_add``: look the port up first (never take another host's).
        ``readback_settle``: seconds before a missing read-back is believed. ``on_change(app,
        what)``: what is "mapped", "unmapped", "conflict", "failed" or "left_open".
        ``journal``: where mappings are recorded before they are requested.
        ``abandon``: asked before each add of a pass; True ends the pass there (an
        activation lapsed meanwhile: the caller expires it and reconciles again, deleting
        instead of adding for minutes after it should have ended). ``reclaim``: see below.
        ``wall``: the wall clock (epoch seconds), only to say until when a mapping left open
        stays."""
        self.gateway = gateway
        self.abandon = abandon
        # ``reclaim(description)``: an entry of another igdtrigger on this machine that is gone
        # (a killed ``run``): ours to take over and delete when it maps to this host.
        self.reclaim = reclaim
        self.clock = clock
        self.wall = wall  # epoch seconds: only to say until when a mapping left open stays
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
        self._orphan_meta: dict[MappingKey, OrphanMeta] = {}
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
        # mappings to journal at the next router request, beside it (_beside), on a thread
        self._deferred: list[MappingSpec] = []
        # rows of new activations to record in the same transaction as the next mapping rows
        # (the pipeline's: one fsync for an activation and its mappings)
        self.journal_riders: Callable[[], list[JournalActivation]] | None = None
        self._journal_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._journal_pending: concurrent.futures.Future[None] | None = None
        self._foreign_hint: int | None = None  # router entries not ours, at the last listing
        self.stale_removed = 0
        self._siblings: set[MappingKey] = set()  # conflicts with another igdtrigger's same map
        self._lock = asyncio.Lock()
        self.ops = {"add": 0, "renew": 0, "delete": 0, "verify": 0, "errors": 0}

    @property
    def permanent_only(self) -> bool:
        """Mappings are asked with lease 0 (the router refuses or drops timed leases)."""
        return not self.traits.timed_leases

    @permanent_only.setter
    def permanent_only(self, value: bool) -> None:
        self.traits.permanent_only = value

    def count(self, state: MapState) -> int:
        """How many wanted mappings are in ``state``."""
        return sum(1 for a in self.applied.values() if a.state is state)

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

    def _changed(self, app: Applied, what: str) -> None:
        if self.on_change is not None:
            self.on_change(app, what)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)

    def _learn(self, **changes: object) -> None:
        """Record what the router showed; persisted when it changes what we know."""
        changed = False
        for name, value in changes.items():
            if getattr(self.traits, name) != value:
                setattr(self.traits, name, value)
                changed = True
        if changed and self.journal is not None and self.traits.identity:
            self.journal.router_traits_put(self.traits.identity, self.traits.persisted())

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

    def _reads_back(self) -> bool:
        """Whether the protocol can look mappings up on the router at all (NAT-PMP/PCP: the
        granted reply is all there is)."""
        info = self.gateway.info
        protocol = info.protocol if info is not None else self._protocol
        return protocol not in NO_READBACK

    def _abandoned(self) -> bool:
        return self.abandon is not None and self.abandon()

    def _journal_gone(self, specs: list[MappingSpec]) -> None:
        self._journal_settle()
        if self.journal is not None and specs:
            self.journal.mappings_gone([(s.proto, s.external_port) for s in specs])

    def _journal_requested(self, specs: list[MappingSpec]) -> None:
        """Record ``specs`` (and whatever ``_journal_soon`` deferred) before they are asked."""
        self._journal_settle()
        if self._deferred:
            specs = [*self._deferred, *specs]
            self._deferred = []
        self._journal_put(specs)

    def _journal_put(self, specs: list[MappingSpec],
                     acts: list[JournalActivation] | None = None) -> None:
        """Record ``specs`` (with ``acts``, or the riders'), in one transaction."""
        if self.journal is not None and specs:
            if acts is None:
                acts = self._riders()
            gw = self.gateway
            nonces = {s.key: n for s in specs if isinstance(gw, AdoptsLeftovers)
                      and (n := gw.mapping_nonce(s))}
            self.journal.mappings_requested(specs, nonces,
                                            gw.info.protocol if gw.info is not None else "",
                                            activations=acts)

    def _riders(self) -> list[JournalActivation]:
        return self.journal_riders() if self.journal_riders is not None else []

    def _journal_soon(self, specs: list[MappingSpec]) -> None:
        """Journal ``specs`` at the next router request (``_beside``) rather than before the
        pass: beside a check's lookup, or after the add where ``_may_trail`` holds."""
        self._deferred.extend(specs)

    def _may_trail(self, wire: MappingSpec) -> bool:
        """Whether ``wire`` may be added before its journal row is durable: a crash in between
        still leaves it findable by the next start, because this router listed its table this
        run (the next start's sweep lists it and deletes our description's rows), shows what
        it holds, and the mapping is to this host (rows of our description for other hosts are
        deleted only when journaled, orphans.py). Elsewhere the journal comes first."""
        info = self.gateway.info
        return (self._swept and self.traits.reports_mappings is not False
                and self._reads_back()  # a protocol that lists (not NAT-PMP/PCP)
                and info is not None and wire.internal_client == info.local_address)

    async def _beside(self, request: Awaitable[T], wire: MappingSpec | None = None) -> T:
        """Await the router ``request`` with the deferred journal write kept off its way.

        Where every deferred mapping ``_may_trail``, the write waits until the add (``wire``:
        the mapping this request adds) has been answered and then runs on the journal thread
        (``_journal_settle`` at the end of the pass and before the next journal write keeps
        the order): the port opens without an fsync before it. Elsewhere the write is durable
        before any add is sent: beside a check's lookup (on the journal thread while the lookup
        is in flight), or before the add when there was no lookup."""
        if not self._deferred:
            return await request
        if all(self._may_trail(s) for s in self._deferred):
            if wire is None:
                return await request  # a lookup: the add it precedes writes it afterwards
            result = await request
            self._journal_later()
            return result
        if wire is not None:
            self._journal_requested([])
            return await request
        task = asyncio.ensure_future(request)
        await asyncio.sleep(0)  # the request's first step: handed to the worker / sent
        if task.done():  # answered at once (nothing in flight to overlap with)
            self._journal_requested([])
            return task.result()
        self._journal_later()
        try:
            return await task
        finally:
            await self._journal_settled()

    def _journal_later(self) -> None:
        """Write what is deferred on the journal thread (waited for by ``_journal_settle``),
        the riders' activation rows with it."""
        specs, self._deferred = self._deferred, []
        if self._journal_thread is None:
            self._journal_thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="journal")
        self._journal_pending = self._journal_thread.submit(
            self._journal_write, specs, self._riders() if specs else [])

    def _journal_write(self, specs: list[MappingSpec],
                       acts: list[JournalActivation]) -> None:  # on the journal thread
        self._journal_put(specs, acts)
        if trace.ON:
            trace.stamp("journal")

    def settle_journal(self) -> None:
        """Wait for a journal write still on the journal thread: before a write of the
        caller's own that must follow it (``_journal_settle``)."""
        self._journal_settle()

    def _journal_settle(self) -> None:
        """Wait for a journal write still on the journal thread (before the next one)."""
        pending, self._journal_pending = self._journal_pending, None
        if pending is not None:
            pending.result()

    async def _journal_settled(self) -> None:
        """``_journal_settle`` without blocking the event loop."""
        pending, self._journal_pending = self._journal_pending, None
        if pending is not None:
            await asyncio.wrap_future(pending)
