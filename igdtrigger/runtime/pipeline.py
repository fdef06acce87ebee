"""The pipeline: Engine + Mapper + IPv6 pinholes + Journal on one scheduler loop.

``serve`` runs one inside the ``Service`` façade; ``igdtrigger run`` without a service runs one
of its own (journaled in its run directory, leftovers.py), so both follow one lease policy,
one journal format and one scheduler. The scheduler is one task: it expires lapsed
activations, reconciles the router with what the engine wants, journals, then sleeps until the
next deadline (an expiry, a lease renewal, a retry, a verification) or until ``wake()``. It is
guarded: an unexpected exception is logged (throttled: runtime/logthrottle) and the loop goes
on; ``health()`` names a dead or stuck scheduler (``/healthz`` answers 503 with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igdtrigger.core import trace
from igdtrigger.core.activation import Activation, Event, EventKind
from igdtrigger.core.engine import Engine
from igdtrigger.core.model import MappingKey, PinholeSpec, PortRange, format_duration
from igdtrigger.core.rules import Rule
from igdtrigger.core.settings import GatewayConfig
from igdtrigger.gateway.base import Gateway
from igdtrigger.runtime.journal import Journal, JournalActivation
from igdtrigger.runtime.leftovers import dead_run_tag, take_over
from igdtrigger.runtime.logthrottle import PerKindThrottle
from igdtrigger.runtime.mapper import TRACE_ENV, Mapper
from igdtrigger.runtime.pinholes import PinholeClient, PinholeKeeper

__all__ = [
    "ADDRESSES_TTL",
    "JOURNAL_CHECK",
    "STANDALONE_LEASE",
    "STUCK_AFTER",
    "Pipeline",
    "Settings",
]

log = logging.getLogger("igdtrigger")
# the guard's own logger: a bug that fails every round logs a few lines a minute, not a flood
sched_log = logging.getLogger("igdtrigger.scheduler")
if not any(isinstance(f, PerKindThrottle) for f in sched_log.filters):
    sched_log.addFilter(PerKindThrottle(burst=3, interval=60.0))

JOURNAL_CHECK = 5.0  # s: how often the journal file is checked to be still in place
ADDRESSES_TTL = 30.0  # this machine's IPv6 addresses are looked up again after this long
STANDALONE_LEASE = 300.0  # s: `run` without a service: a crash leaves nothing open for long
STUCK_AFTER = 300.0  # s: a round running this long is reported stuck by health()
RETRY_AFTER_ERROR = 1.0  # s: the guarded loop's pause after an unexpected exception


@dataclass(frozen=True, slots=True)
class Settings:
    """What the pipeline takes from ``[gateway]``: the one lease policy. ``lease``, intervals
    in seconds."""

    lease: float
    verify_interval: float
    canary_interval: float
    check_before_add: bool
    ipv6_pinholes: bool

    @classmethod
    def from_config(cls, gw: GatewayConfig, *, standalone: bool = False) -> Settings:
        """``standalone`` (``run`` without a service): leases of at most ``STANDALONE_LEASE``,
        so a wrapper killed with nothing left to delete its mappings leaves them for minutes,
        not for the service's lease."""
        lease = min(STANDALONE_LEASE, gw.lease) if standalone else gw.lease
        return cls(lease, gw.verify_interval, gw.check_interval, gw.check_before_add,
                   gw.ipv6_pinholes)


class Pipeline:
    """Engine → Mapper (+ PinholeKeeper) → Gateway, journaled, on one scheduler.

    ``clock``: monotonic seconds (the engine's and mapper's); ``wall``: epoch seconds (journal
    expiries survive a reboot); ``boot()``: (boot id, CLOCK_BOOTTIME seconds). ``on_event`` gets
    every engine event after it is journaled; ``after_round`` runs after each scheduler round.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        gateway: Gateway,
        journal: Journal,
        *,
        settings: Settings,
        clock: Callable[[], float],
        wall: Callable[[], float],
        boot: Callable[[], tuple[str, float]],
        tag: str,
        on_event: Callable[[Event], None] | None = None,
        on_mapping_change: Callable[..., None] | None = None,
        on_pinhole_change: Callable[[PinholeSpec, str, str], None] | None = None,
        pinhole_client: PinholeClient | None = None,
        ipv6_addresses: Callable[[PinholeClient], list[str]] | None = None,
        local_address: Callable[[], str | None] = lambda: None,
        abandon: Callable[[], bool] | None = None,
        reopen_journal: Callable[[], Journal] | None = None,
        after_round: Callable[[], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.journal = journal
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.boot = boot
        self.tag = tag
        self.on_event = on_event
        self.local_address = local_address
        self.reopen_journal = reopen_journal
        self.after_round = after_round
        self._abandon = abandon
        if os.environ.get(TRACE_ENV):
            trace.enable()
        self.engine = Engine(rules, clock=clock, tag=tag, on_event=self._on_engine_event)
        self.mapper = Mapper(
            gateway, clock=clock, tag=tag, lease=settings.lease,
            verify_interval=settings.verify_interval, canary_interval=settings.canary_interval,
            check_before_add=settings.check_before_add,
            on_change=self._after_events(on_mapping_change),
            journal=journal, abandon=self._abandon_pass, reclaim=dead_run_tag)
        self.pinholes: PinholeKeeper | None = None
        if settings.ipv6_pinholes and pinhole_client is not None:
            self.pinholes = PinholeKeeper(pinhole_client, clock=clock, lease=settings.lease,
                                          journal=journal,
                                          on_change=self._after_events(on_pinhole_change))
        self._ipv6_lookup = ipv6_addresses
        self._v6_addresses: tuple[float, list[str]] = (-math.inf, [])
        self._wake = asyncio.Event()
        self._pinhole_wake = asyncio.Event()
        self._applied_generation = -1
        self._rounds = 0  # rounds started
        # (generation, the first round that counts, the waiter): wait_applied
        self._applied_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._desired_cache: tuple[int, dict[MappingKey, Any]] = (-1, {})
        self._journal_flushed = 0.0
        self._journal_checked = 0.0
        # New activations are journaled right after the round that requested their mappings
        # (the mappings themselves are journaled before they are requested): no fsync of its
        # own on the way from a trigger to an open port.
        self._unjournaled: dict[str, Activation] = {}
        self.mapper.journal_riders = self._journal_riders
        self._events: list[Event] = []  # engine events for on_event, held back a moment
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        # the guard: what health() reports
        self.round_started: float | None = None  # clock() at the start of a running round
        self.errors = 0  # unexpected exceptions the guarded loop survived
        self.last_error = ""
        self.removal_timed_out = False  # remove_all(): the router did not finish in time

    # --- inputs --------------------------------------------------------------------------------

    def wake(self) -> None:
        """Run a scheduler round now (something changed)."""
        self._wake.set()

    def _lapse_due(self) -> bool:
        """An activation's time is up: a long mapping pass stops adding so it can end."""
        due = self.engine.next_deadline()
        return due is not None and self.clock() >= due

    def _abandon_pass(self) -> bool:
        return self._lapse_due() or (self._abandon is not None and self._abandon())

    def router_lost_state(self, reason: str) -> None:
        """The router lost its mappings (a reboot): everything is re-applied."""
        self.mapper.reapply_all(reason)
        if self.pinholes is not None:
            self.pinholes.lost_state()  # re-added after the scheduler's next round reconnects
        self.wake()

    async def wait_applied(self, generation: int, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until a round for engine ``generation`` has applied it:
        its deletes and new mappings' adds answered by the router, and the activations and
        mappings journaled (``Mapper.reconcile``'s ``answered``). What follows in that round
        (renewals and retries of older mappings, verification) is not waited for. A
        generation applied already: until the round this call wakes has got as far."""
        self.wake()
        if timeout <= 0:
            return
        first = self._rounds + 1 if self._applied_generation >= generation else 0
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (generation, first, fut)
        self._applied_waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await fut
        finally:
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._applied_waiters.remove(waiter)

    def _applied(self, generation: int) -> None:
        """The running round has applied engine ``generation``: tell those waiting for it."""
        self._applied_generation = max(self._applied_generation, generation)
        waiting, self._applied_waiters = self._applied_waiters, []
        for gen, first, fut in waiting:
            if gen > generation or self._rounds < first:
                self._applied_waiters.append((gen, first, fut))
            elif not fut.done():
                fut.set_result(None)

    # --- what is wanted -----------------------------------------------------------------------

    def desired(self) -> dict[MappingKey, Any]:
        """The engine's desired mappings (cached per engine generation)."""
        gen = self.engine.generation
        if self._desired_cache[0] != gen:
            self._desired_cache = (gen, self.engine.desired())
        return self._desired_cache[1]

    def ipv6_addresses(self) -> list[str]:
        """This machine's global IPv6 addresses on its IPv6 default route (cached briefly)."""
        at, addrs = self._v6_addresses
        now = self.clock()
        if now - at >= ADDRESSES_TTL and self.pinholes is not None:
            lookup = self._ipv6_lookup
            addrs = lookup(self.pinholes.client) if lookup is not None else []
            self._v6_addresses = (now, addrs)
        return addrs

    def desired_pinholes(self) -> set[PinholeSpec]:
        """Pinholes for the mappings that go to this machine, on each of its IPv6 addresses.
        (A router opens a pinhole only when asked from the address it is for, so another
        host's activation gets its IPv4 mappings here and its pinholes from its own igdtrigger.)"""
        local = self.local_address()
        specs = {(s.proto, s.internal_port) for s in self.desired().values()
                 if s.internal_client == local}
        if not specs:
            return set()
        return {PinholeSpec(a, proto, port) for a in self.ipv6_addresses()
                for proto, port in specs}

    # --- journal ------------------------------------------------------------------------------

    def restore(self, take_from: list[Path], *, adhoc: Callable[[tuple[PortRange, ...]], bool]
                | None = None) -> int:
        """Bring back the journal's activations (what a crash left), take over the journals
        in ``take_from`` (killed wrappers'), and adopt every journaled mapping as an orphan
        the next round deletes unless wanted. Returns how many activations came back."""
        now_wall = self.wall()
        boot_id, now_boot = self.boot()
        count = 0
        for ja in self.journal.activations():
            # the same boot: the boot clock says what is left, whatever the wall clock did
            # while the service was down; after a reboot only the wall clock can (capped at
            # the ttl by the engine)
            same_boot = bool(boot_id) and ja.boot_id == boot_id and math.isfinite(
                ja.expires_boot)
            remaining = (ja.expires_boot - now_boot if same_boot
                         else ja.expires_wall - now_wall)
            held = ja.expires_wall == math.inf  # a live connection held it
            if held and boot_id and ja.boot_id and ja.boot_id != boot_id:
                held, remaining = False, 0.0  # before a reboot: no connection outlived that
            act = self.engine.restore(ja.id, ja.rule, ja.host, ja.source,
                                      age=now_wall - ja.created_wall,
                                      remaining=remaining, ttl=ja.ttl,
                                      meta=ja.meta, adhoc=adhoc, held=held)
            if act is None:
                self.journal.activation_gone(ja.id)
            else:
                count += 1
                log.info("restored activation of rule %s for %s (%s)", ja.rule, ja.host,
                         act.hold_reason(self.clock()) if act.unproven
                         else f"{format_duration(act.expires - self.clock())} left")
        self.engine.dirty.clear()
        take_over(self.journal, take_from)
        leftovers = self.journal.mappings()
        if leftovers:
            self.mapper.adopt_orphans([m.spec for m in leftovers])
        return count

    def journal_record(self, act: Activation) -> JournalActivation:
        """``act`` as the journal keeps it (wall-clock and boot-clock expiries)."""
        now_wall, now = self.wall(), self.clock()
        boot_id, now_boot = self.boot()
        # a held activation is written as held (expires inf): after a crash it comes back
        # held until the detectors' first look finds its connection or not (at most one
        # timeout after the restart; Engine.restore/settle_restored). Written when the hold
        # starts and ends only: no write per packet.
        remaining = math.inf if act.held else act.expires - now
        return JournalActivation(act.id, act.rule.name, act.host, act.source.value,
                                 now_wall - (now - act.created), now_wall + remaining,
                                 act.ttl, dict(act.meta), boot_id, now_boot + remaining)

    def _on_engine_event(self, ev: Event) -> None:
        act = ev.activation
        if ev.kind is EventKind.ACTIVATED:
            self._unjournaled[act.id] = act
        elif self._unjournaled.pop(act.id, None) is None:  # else it never reached the journal
            self.mapper.settle_journal()  # after its row, if that is still being written
            self.journal.activation_gone(act.id)
        if self.on_event is None:
            return
        if not self._events:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): at once
                self.on_event(ev)
                return
            # two loop turns later: after the scheduler round this change wakes (in the next
            # turn) has queued its router call; the log line and the event stream's message
            # are not on the way from a trigger to the router (issue 17)
            loop.call_soon(loop.call_soon, self.flush_events)
        self._events.append(ev)

    def _after_events(self, report: Callable[..., None] | None) -> Callable[..., None] | None:
        """``report`` (a mapping's or pinhole's change), after the engine events held back:
        an activation is reported before the mappings it brought."""
        if report is None:
            return None

        def after(*args: Any) -> None:
            self.flush_events()
            report(*args)

        return after

    def flush_events(self) -> None:
        """Hand the engine events held back (``_on_engine_event``) to ``on_event``, in order."""
        events, self._events = self._events, []
        if self.on_event is not None:
            for ev in events:
                self.on_event(ev)

    def _journal_activations(self) -> None:
        """Write refreshed expiries to the journal, at most once a second."""
        if not self.engine.dirty or self.clock() - self._journal_flushed < 1.0:
            return
        self._journal_flushed = self.clock()
        acts = [self.engine.activations[i] for i in self.engine.dirty
                if i in self.engine.activations]
        self.engine.dirty.clear()
        self.journal.activations_put([self.journal_record(a) for a in acts])

    def _journal_check(self) -> None:
        """Every few seconds: was the journal deleted under us (``rm -rf`` of the state
        directory, a tmpfiles clean-up)? Then a new one gets what is held now, so a crash after
        that still leaves the next start knowing what to delete and restore."""
        now = self.clock()
        if (self.reopen_journal is None or now - self._journal_checked < JOURNAL_CHECK
                or not self.journal.deleted()):
            self._journal_checked = now
            return
        self._journal_checked = now
        log.warning("journal %s was deleted while running (state directory removed?): "
                    "writing a new one with what is held now", self.journal.path)
        self.journal.close()
        journal = self.reopen_journal()
        journal.mappings_requested([a.wire for a in self.mapper.applied.values()]
                                   + list(self.mapper.orphans.values()))
        if self.pinholes is not None:
            journal.pinholes_requested([*self.pinholes.held, *self.pinholes.stale])
            self.pinholes.journal = journal
        journal.activations_put([self.journal_record(a)
                                 for a in self.engine.activations.values()])
        self.journal = self.mapper.journal = journal

    def _journal_new(self) -> None:
        if self._unjournaled:
            self.journal.activations_put(self._journal_riders())

    def _journal_riders(self) -> list[JournalActivation]:
        """The new activations' rows, taken to be written (with their mappings' rows, in one
        transaction: ``Mapper.journal_riders``; else by ``_journal_new``)."""
        acts = list(self._unjournaled.values())
        self._unjournaled.clear()
        return [self.journal_record(a) for a in acts]

    # --- scheduler ----------------------------------------------------------------------------

    def start(self) -> list[asyncio.Task[None]]:
        """Start the scheduler (and the pinhole loop); the tasks, for the caller to track."""
        new = [asyncio.create_task(self._scheduler(), name="scheduler")]
        if self.pinholes is not None:
            new.append(asyncio.create_task(self._pinhole_loop(self.pinholes), name="pinholes"))
        self.tasks.extend(new)
        self.wake()
        return new

    async def round(self) -> int:
        """One scheduler round: expire, reconcile, journal, tell the waiters. Returns the
        engine generation the round applied."""
        if trace.ON:
            trace.stamp("round")
        self._rounds += 1
        self.engine.expire()
        gen = self.engine.generation

        def answered() -> None:  # the round's changes are on the router and journaled
            self._journal_new()  # activations whose mappings wrote no row (held already)
            self._applied(gen)

        if self.mapper.gateway.info is not None:
            # the router is known: IPv6 goes beside IPv4 in its own task (the router answers
            # both in turn, and each side's own work fills the other's wait for the router)
            self._pinhole_wake.set()
        await self.mapper.reconcile(self.desired(), answered)
        self._pinhole_wake.set()  # IPv6 in its own task: IPv4 never waits for it
        if self.after_round is not None:
            self.after_round()
        self._journal_check()
        self._journal_new()
        self._journal_activations()
        self._applied(gen)  # (a router not answering: the pass ended early)
        return gen

    async def _scheduler(self) -> None:
        while True:
            if self.stopping:  # Python 3.11's wait_for drops a cancel that meets a wake()
                return  # (gh-86296): without this, stop() waited for the next deadline
            self._wake.clear()
            self.round_started = self.clock()
            try:
                gen = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop every timer: log, pause, go on
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                sched_log.exception("scheduler round failed (%s); going on", self.last_error)
                self.round_started = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RETRY_AFTER_ERROR)
                continue
            self.round_started = None
            if self.engine.generation != gen:
                continue
            deadlines = [d for d in (self.engine.next_deadline(), self.mapper.next_deadline())
                         if d]
            delay = max(0.0, min(deadlines) - self.clock()) if deadlines else math.inf
            if delay > 0:
                # asyncio.timeout, not wait_for: no task per wait, so a wake() from a trigger
                # resumes this loop in the next iteration of the event loop
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if delay == math.inf else delay):
                        await self._wake.wait()

    async def _pinhole_loop(self, keeper: PinholeKeeper) -> None:
        """IPv6 pinholes, after each round of the scheduler and at their own deadlines. Apart
        from the scheduler so a slow or silent IPv6 side never delays an IPv4 mapping."""
        deadline: float | None = None
        while True:
            if self.stopping:  # as in _scheduler: a cancel must end this loop (gh-86296)
                return
            # The first round waits for the scheduler's (which finds the router: the IGD's
            # address is what the IPv6 side is asked at; asking before would only back off).
            delay = math.inf if deadline is None else max(0.0, deadline - self.clock())
            if delay > 0:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that
                # meets a wake (gh-86296), and stop() then waited for the next deadline
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if delay == math.inf else delay):
                        await self._pinhole_wake.wait()
            self._pinhole_wake.clear()
            try:
                await keeper.reconcile(self.desired_pinholes())
                deadline = keeper.next_deadline()
            except Exception:  # a bug here must not stop IPv4 or the service
                log.exception("IPv6 pinholes: unexpected error; trying again in 30 s")
                deadline = self.clock() + 30.0

    def health(self) -> str | None:
        """``None`` while the scheduler runs; else what is wrong with it (dead: its task
        ended; stuck: one round has run for ``STUCK_AFTER`` s)."""
        sched = next((t for t in self.tasks if t.get_name() == "scheduler"), None)
        if sched is None:
            return None if self.stopping else "scheduler not started"
        if sched.done():
            if self.stopping:
                return None
            exc = None if sched.cancelled() else sched.exception()
            return f"scheduler dead ({type(exc).__name__}: {exc})" if exc else "scheduler dead"
        started = self.round_started
        if started is not None and self.clock() - started >= STUCK_AFTER:
            return (f"scheduler stuck: one round has run for "
                    f"{format_duration(self.clock() - started)}")
        return None

    # --- stop ---------------------------------------------------------------------------------

    async def stop_tasks(self) -> None:
        """Cancel the scheduler and the pinhole loop."""
        self.stopping = True
        self.flush_events()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def remove_all(self, timeout: float) -> int:
        """Delete every mapping and pinhole held (within ``timeout`` s each), close the gateway,
        and end the journal's activations (a clean stop restores nothing). Returns how many
        mappings were removed; those the router did not confirm deleting stay journaled."""
        removed = 0
        deleted_before = self.mapper.ops["delete"]
        try:
            removed = await asyncio.wait_for(self.mapper.remove_all(), timeout)
        except TimeoutError:
            self.removal_timed_out = True
            removed = self.mapper.ops["delete"] - deleted_before
            log.error(
                "the router did not finish removing mappings within %.0fs (%d removed, %d "
                "left): they stay journaled and the next start removes them; their leases (%s) "
                "end them on the router", timeout, removed, len(self.mapper.orphans),
                format_duration(self.mapper.lease) if not self.mapper.permanent_only
                else "permanent")
        if self.pinholes is not None:
            try:
                closed = await asyncio.wait_for(self.pinholes.remove_all(), timeout)
                if closed:
                    log.info("closed %d IPv6 pinhole(s)", closed)
            except TimeoutError:
                self.removal_timed_out = True
                log.error("router did not answer in %.0fs while closing IPv6 pinholes; their "
                          "leases (%ds) will end them", timeout, self.pinholes.lease)
        await self.gateway.close()
        self._unjournaled.clear()
        self.journal.activations_clear()
        return removed
