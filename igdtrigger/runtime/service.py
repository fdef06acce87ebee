"""The running service: wires detector → engine → mapper → gateway and schedules timers.

The scheduler is one task: it expires lapsed activations, reconciles the router with what the
engine wants, then sleeps until the next deadline (an expiry, a lease renewal, a retry, a
verification) or until something new happens (a flow, an API call).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igdtrigger import __version__
from igdtrigger.config import Config, default_state_dir
from igdtrigger.core.engine import Activation, Engine, Event, EventKind, Source
from igdtrigger.core.errors import ActivationLimit, AdhocRefused, DetectionUnavailable, UsageError
from igdtrigger.core.model import (
    Flow,
    FlowEnded,
    FlowLive,
    FlowsListed,
    MappingKey,
    PinholeSpec,
    PortRange,
    ProcessSeen,
    format_duration,
    parse_port_spec,
)
from igdtrigger.core.rules import ADHOC_PREFIX, Rule
from igdtrigger.detect.base import Detector
from igdtrigger.detect.hostmap import HostMap
from igdtrigger.detect.nfttrack import TABLE, KernelTracking
from igdtrigger.gateway.base import Gateway, RouterChange, RouterChangeKind
from igdtrigger.gateway.select import forget_connection, set_lost_state_handler
from igdtrigger.gateway.upnp.pinhole import FirewallClient, global_ipv6_addresses
from igdtrigger.netutil import host_key
from igdtrigger.runtime.events import EventHub
from igdtrigger.runtime.journal import Journal, JournalActivation, boot_clock, no_boot_clock
from igdtrigger.runtime.leftovers import dead_run_tag, dead_runs, take_over
from igdtrigger.runtime.mapper import Applied, Mapper, MapState
from igdtrigger.runtime.pinholes import PinholeKeeper, PinholeState

if TYPE_CHECKING:
    from igdtrigger.gateway.upnp.ssdpwatch import NotifyWatcher

log = logging.getLogger("igdtrigger")

STATUS_ACTIVATIONS = 200  # activations listed in status(); the API pages through the rest
APPLY_WAIT = 5.0  # how long an API activation waits for its mappings before answering
JOURNAL_CHECK = 5.0  # s: how often the journal file is checked to be still in place
ADDRESSES_TTL = 30.0  # this machine's IPv6 addresses are looked up again after this long
TRACKING_CHECK = 15.0  # our nftables table is checked (and conntrack's events counted) this often


@dataclass(slots=True)
class DetectorStatus:
    """``active``: the detector runs *and* can see what it is for; ``reason``: why not;
    ``detail``: what an active one's claim rests on (conntrack: the kernel tracks the flows)."""

    name: str
    active: bool
    reason: str = ""
    detail: str = ""


def machine_id() -> str:
    """systemd's machine id (stable across reboots), else the host name."""
    for where in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(where).read_text().strip()
            if text:
                return text
    return socket.gethostname()


def derived_tag(state_dir: Path) -> str:
    """The instance tag a state directory gets: 6 hex digits from this machine's id and the
    directory's path, so it is the same at every start even when nothing can be written (a
    crash's leftovers are still recognised as ours), and differs between two services."""
    return hashlib.sha256(f"{machine_id()}\0{state_dir.absolute()}".encode()).hexdigest()[:6]


def load_or_create_secret(path: Path, nbytes: int, *, hexlen: int | None = None,
                          value: str | None = None) -> str | None:
    """Read a secret file, creating it (mode 0600) on first use with ``value`` (default: random).
    ``None`` if not possible."""
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    except OSError:
        return None
    value = value or secrets.token_hex(nbytes)[: hexlen or None]
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        return None
    return value


def _overlap(a: PortRange, b: PortRange) -> bool:
    return a.proto is b.proto and a.first <= b.last and b.first <= a.last


def self_only_message(rule: str, host: str) -> str:
    """One line: why a router in secure mode refused a host's ports to this service, and the
    fix (README: the home-server section)."""
    return (f"the router only lets a host map ports to itself (UPnP secure mode): start the game "
            f"on {host} with `igdtrigger run --rule {rule} -- GAME` (it maps its own ports and "
            "reports back), or allow mappings for other hosts in the router's UPnP settings")


class Service:
    # front: the IGD front (issue 14) sees every detector observation first (in-use of client
    # mappings); front_serving: None = no front, False until it serves (/readyz); front_status:
    # its part of status()
    front_observer: Callable[[Flow | FlowLive | FlowEnded | FlowsListed | ProcessSeen], None] \
        | None = None
    front_serving: bool | None = None
    front_status: Callable[[], dict[str, Any]] | None = None

    def __init__(
        self,
        config: Config,
        gateway: Gateway,
        *,
        detectors: list[Detector] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        state_dir: Path | None = None,
        journal_dir: Path | None = None,
        on_router_call: Callable[[str, float, bool], None] | None = None,
        tracking: KernelTracking | None = None,
        boot: Callable[[], tuple[str, float]] | None = None,
    ) -> None:
        """``journal_dir``: where the journal and instance tag live (default ``state_dir``);
        ``serve --simulate`` keeps them apart from the real service's."""
        self.config = config
        # makes the kernel track trigger flows for the conntrack detector (nfttrack.py); None:
        # not managed here (tests), the conntrack detector is then taken at its word
        self.tracking = tracking
        self.tracked_flows: int | None = None  # new trigger flows our nft counters saw
        self.gateway = gateway
        self.clock = clock
        self.wall = wall  # wall-clock time: journal expiries survive a reboot
        # (boot id, CLOCK_BOOTTIME): expiries no wall-clock jump moves; the kernel's when the
        # service runs on the real clock, none (the wall clock alone) for an injected clock
        self.boot = boot or (boot_clock if clock is time.monotonic else no_boot_clock)
        self.state_dir = state_dir or config.state_dir or default_state_dir()
        self.journal_dir = journal_dir or self.state_dir
        derived = derived_tag(self.journal_dir)
        tag = load_or_create_secret(self.journal_dir / "instance", 3, value=derived)
        if tag is None:
            tag = derived
            log.warning(
                "state directory %s is not writable: running with the tag %s derived from this "
                "machine and that path (a crash's leftovers are still recognised), but nothing "
                "is journaled (set service.state_dir)", self.journal_dir, tag)
        self.tag = tag
        self.api_token = load_or_create_secret(self.state_dir / "api-token", 24)
        self.hub = EventHub(history=200)  # SSE subscribers (api.py) and Last-Event-ID replay
        self.events: collections.deque[dict[str, Any]] = self.hub.history
        self.error_counts: collections.Counter[str] = collections.Counter()  # for /metrics
        self.journal = Journal.open(self.journal_dir)
        self.engine = Engine(config.rules, clock=clock, tag=tag, on_event=self._on_engine_event)
        self.mapper = Mapper(
            gateway,
            clock=clock,
            tag=tag,
            lease=config.gateway.lease,
            verify_interval=config.gateway.verify_interval,
            canary_interval=config.gateway.check_interval,
            check_before_add=config.gateway.check_before_add,
            on_change=self._on_mapping_change,
            journal=self.journal,
            abandon=self._lapse_due,
            reclaim=dead_run_tag,
        )
        # IPv6: the same ports, through the router's firewall, to this machine's own addresses
        self.pinholes: PinholeKeeper | None = None
        if config.gateway.ipv6_pinholes:
            self.pinholes = PinholeKeeper(
                FirewallClient(self._upnp_location, on_call=on_router_call), clock=clock,
                lease=config.gateway.lease,
                journal=self.journal, on_change=self._on_pinhole_change)
        self._v6_addresses: tuple[float, list[str]] = (-math.inf, [])
        self._pinhole_wake = asyncio.Event()
        self._journal_flushed = 0.0
        self._journal_checked = 0.0
        # New activations are journaled right after the round that requested their mappings
        # (the mappings themselves are journaled before they are requested): no fsync of its
        # own on the way from a trigger to an open port.
        self._unjournaled: dict[str, Activation] = {}
        self._flows_listed: set[str] = set()  # flow detectors whose first look is reported
        self.restored = self._restore()
        set_lost_state_handler(gateway, self._router_lost_state)
        self.detectors = detectors or []
        self.detector_status: list[DetectorStatus] = []
        self.started = clock()
        self._wake = asyncio.Event()
        self._applied_generation = -1
        self._applied_cond = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._desired_cache: tuple[int, dict[MappingKey, Any]] = (-1, {})
        self._cleaned_up = False
        self._notify_watcher: NotifyWatcher | None = None
        self.hostmap = HostMap(self.local_address, clock=clock)
        self.engine.origin_of = self._origin_of  # bounds forged trigger sources per MAC address
        self.router_announcements = 0  # restarts/moves learned from the router's SSDP NOTIFYs
        self._events_at_start = 0  # conntrack events_seen when its visibility was established
        self._tracking_watched = False  # conntrack runs with a KernelTracking: check it

    # --- lifecycle -----------------------------------------------------------------------------

    def _lapse_due(self) -> bool:
        """An activation's time is up: a long mapping pass stops adding so it can end."""
        due = self.engine.next_deadline()
        return due is not None and self.clock() >= due

    def _router_lost_state(self, reason: str) -> None:
        self.mapper.reapply_all(reason)
        if self.pinholes is not None:
            self.pinholes.lost_state()  # re-added after the scheduler's next round reconnects
        self.wake()

    def _upnp_location(self) -> str | None:
        info = self.gateway.info
        return info.location if info is not None and info.protocol == "upnp-igd" else None

    def ipv6_addresses(self) -> list[str]:
        """This machine's global IPv6 addresses on its IPv6 default route (cached briefly)."""
        at, addrs = self._v6_addresses
        now = self.clock()
        if now - at >= ADDRESSES_TTL and self.pinholes is not None:
            iface = self.pinholes.client.interface() if isinstance(
                self.pinholes.client, FirewallClient) else None
            addrs = global_ipv6_addresses(iface) if iface else []
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

    def _watch_router(self) -> None:
        """Listen to the UPnP gateway's SSDP NOTIFYs (started once it is known; again if it
        moved): a reboot is acted on when the router announces itself, not at the next check."""
        info = self.gateway.info
        if self._stopping or info is None or info.protocol != "upnp-igd":
            return
        w = self._notify_watcher
        if w is not None and (w.location, w.local_address) == (info.location,
                                                              info.local_address):
            return
        if w is not None and w.local_address == info.local_address and w.follow(info.location):
            return  # the same router at another URL: keeps what it announced
        if w is not None:
            w.close()
        from igdtrigger.gateway.upnp.ssdpwatch import NotifyWatcher

        self._notify_watcher = NotifyWatcher(info.location, info.local_address,
                                             self._router_changed, root_uuid=info.root_uuid)
        self._tasks.append(asyncio.create_task(self._start_watcher(self._notify_watcher),
                                               name="ssdp-notify"))

    @staticmethod
    async def _start_watcher(watcher: NotifyWatcher) -> None:
        await watcher.start()

    def _router_changed(self, change: RouterChange) -> None:
        if change.kind is RouterChangeKind.LEAVING:
            log.warning("%s: mappings are re-applied when it is back", change.reason)
            return
        self.router_announcements += 1
        log.warning("%s: reconnecting and re-applying every mapping", change.reason)
        forget_connection(self.gateway, change.location)
        self.mapper.retry_gateway_now()
        self._router_lost_state(change.reason)

    def _restore(self) -> int:
        """Activations still within their time come back; leftovers get cleaned up."""
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
                                      meta=ja.meta, adhoc=self._adhoc_allowed, held=held)
            if act is None:
                self.journal.activation_gone(ja.id)
            else:
                count += 1
                log.info("restored activation of rule %s for %s (%s)", ja.rule, ja.host,
                         act.hold_reason(self.clock()) if act.unproven
                         else f"{format_duration(act.expires - self.clock())} left")
        self.engine.dirty.clear()
        # a killed `igdtrigger run`'s journal (not for --simulate: those are the real router's)
        take_over(self.journal, dead_runs(self.journal_dir))
        leftovers = self.journal.mappings()
        if leftovers:
            self.mapper.adopt_orphans([m.spec for m in leftovers])
        return count

    def _journal_activations(self) -> None:
        """Write refreshed expiries to the journal, at most once a second."""
        if not self.engine.dirty or self.clock() - self._journal_flushed < 1.0:
            return
        self._journal_flushed = self.clock()
        acts = [self.engine.activations[i] for i in self.engine.dirty
                if i in self.engine.activations]
        self.engine.dirty.clear()
        self.journal.activations_put([self._journal_record(a) for a in acts])

    def _journal_check(self) -> None:
        """Every few seconds: was the journal deleted under us (``rm -rf`` of the state
        directory, a tmpfiles clean-up)? Then a new one gets what is held now, so a crash after
        that still leaves the next start knowing what to delete and restore."""
        now = self.clock()
        if now - self._journal_checked < JOURNAL_CHECK or not self.journal.deleted():
            self._journal_checked = now
            return
        self._journal_checked = now
        log.warning("journal %s was deleted while running (state directory removed?): "
                    "writing a new one with what is held now", self.journal.path)
        self.journal.close()
        journal = Journal.open(self.journal_dir)
        load_or_create_secret(self.journal_dir / "instance", 3, value=self.tag)
        journal.mappings_requested([a.wire for a in self.mapper.applied.values()]
                                   + list(self.mapper.orphans.values()))
        if self.pinholes is not None:
            journal.pinholes_requested([*self.pinholes.held, *self.pinholes.stale])
            self.pinholes.journal = journal
        journal.activations_put([self._journal_record(a)
                                 for a in self.engine.activations.values()])
        self.journal = self.mapper.journal = journal

    def _journal_new(self) -> None:
        if self._unjournaled:
            acts = list(self._unjournaled.values())
            self._unjournaled.clear()
            self.journal.activations_put([self._journal_record(a) for a in acts])

    def _journal_record(self, act: Activation) -> JournalActivation:
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

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._scheduler(), name="scheduler"))
        if self.pinholes is not None:
            self._tasks.append(asyncio.create_task(self._pinhole_loop(self.pinholes),
                                                   name="pinholes"))
        for det in self.detectors:
            standby = getattr(det, "standby_for", "")
            if standby and any(st.name == standby and st.active for st in self.detector_status):
                self.detector_status.append(DetectorStatus(
                    det.name, False, f"standby: {standby} is active; this one stands in if "
                    f"{standby} stops or stops seeing flows"))
                continue
            if det.name == "conntrack" and self.tracking is not None:
                det.tracking_managed = True  # type: ignore[attr-defined]
            try:
                det.check()
            except DetectionUnavailable as exc:
                self.detector_status.append(DetectorStatus(det.name, False, str(exc)))
                if det.name == "process" and not any(r.process for r in self.config.rules):
                    log.info("detector process idle: no rule names a process")
                    continue
                if not self.config.detect.explicit and any(
                        getattr(d, "standby_for", "") == det.name for d in self.detectors):
                    # the default set: the socket table stands in, as it is meant to; one calm
                    # line (status and doctor carry the reason and the fix)
                    log.info("detector %s not available here; the socket table stands in "
                             "(`igdtrigger doctor` says why and how to enable it)", det.name)
                    continue
                log.warning(
                    "detector %s unavailable: %s; explicit activations (run, activate, API) "
                    "still work", det.name, exc
                )
                continue
            st = DetectorStatus(det.name, True)
            if det.name == "conntrack" and self.tracking is not None:
                st = await self._conntrack_visibility(det)
            self.detector_status.append(st)
            # a conntrack that cannot see flows yet still listens: they may come later
            self._tasks.append(asyncio.create_task(self._run_detector(det), name=det.name))
        if self._tracking_watched:
            self._tasks.append(asyncio.create_task(self._watch_tracking(), name="tracking"))
        self.wake()

    def _tracked_ports(self) -> tuple[list[PortRange], list[PortRange]]:
        rules = self.config.rules
        return ([r for rule in rules for r in rule.trigger],
                [r for rule in rules for r in rule.open])

    async def _conntrack_visibility(self, det: Detector) -> DetectorStatus:
        """Make the kernel track the trigger flows (or find out whether it does): conntrack
        is reported active only on that ground."""
        assert self.tracking is not None
        trigger, opened = self._tracked_ports()
        vis = await asyncio.to_thread(
            self.tracking.establish, trigger, opened,
            lambda proto, port: bool(self.engine.index.match(proto, port)))
        self._events_at_start = getattr(det, "events_seen", 0)
        self._tracking_watched = True
        if vis.seen:
            return DetectorStatus(det.name, True, detail=vis.text)
        if not trigger:  # nothing to watch for: not a fault (rules for run/activate/API only)
            log.info("detector conntrack idle: no rule has a trigger port")
        else:
            log.warning("detector conntrack: %s; the socket table stands in", vis.text)
        return DetectorStatus(det.name, False, vis.text)

    async def retrack(self) -> None:
        """The rules changed: load the nftables table again for their trigger ports."""
        if self.tracking is not None and self.tracking.enabled:
            await asyncio.to_thread(self.tracking.install, *self._tracked_ports())

    async def _watch_tracking(self) -> None:
        """Keep our nftables table in place, count what it saw, and report conntrack active
        once it really sees flows (an event arrived), or inactive if tracking was lost."""
        assert self.tracking is not None
        tracking = self.tracking
        det = next(d for d in self.detectors if d.name == "conntrack")
        unannounced = 0  # consecutive checks where our counters saw trigger flows, events none
        while True:
            await asyncio.sleep(TRACKING_CHECK)
            st = next((s for s in self.detector_status if s.name == "conntrack"), None)
            if st is None or not any(t.get_name() == "conntrack" and not t.done()
                                     for t in self._tasks):
                continue  # not running (it stopped): nothing to vouch for
            if tracking.installed:
                counted = await asyncio.to_thread(tracking.check)
                if counted is not None:
                    self.tracked_flows = counted
                if not tracking.installed and st.active:  # removed, and cannot be put back
                    self._conntrack_blind(st, f"the kernel no longer tracks trigger flows: "
                                              f"nftables table {TABLE} was removed and "
                                              f"{tracking.reason}")
                reported = getattr(det, "flows_reported", None)
                # the kernel counted trigger flows, conntrack announced none: events are lost
                # (nf_conntrack_events=0, a full socket buffer...). Two checks in a row, so
                # an event still in flight at the first is not mistaken for a lost one.
                unannounced = unannounced + 1 if (counted and reported == 0) else 0
                if unannounced >= 2 and st.active:
                    self._conntrack_blind(st, f"the kernel counted {counted} new trigger "
                                              "flow(s) but no conntrack event announced one "
                                              "(events lost or disabled: sysctl "
                                              "net.netfilter.nf_conntrack_events)")
                elif (not st.active and st.reason.startswith("the kernel counted")
                      and isinstance(reported, int) and reported > 0):
                    st.active, st.reason = True, ""
                    st.detail = f"conntrack announced {reported} trigger flow(s)"
            events = getattr(det, "events_seen", 0) - self._events_at_start
            if not st.active and st.reason.startswith("listening") and events > 0:
                st.active, st.reason = True, ""
                st.detail = f"conntrack events seen ({events} since start)"
                log.info("detector conntrack: %s", st.detail)

    def _conntrack_blind(self, st: DetectorStatus, reason: str) -> None:
        """conntrack stays subscribed but cannot be vouched for: say why; a stand-in runs."""
        st.active, st.detail, st.reason = False, "", reason
        log.warning("detector conntrack: %s; the socket table stands in", reason)
        self._start_standins("conntrack")

    async def _run_detector(self, det: Detector) -> None:
        try:
            await det.run(self.observe)
        except asyncio.CancelledError:
            raise
        except DetectionUnavailable as exc:
            log.warning("detector %s stopped: %s", det.name, exc)
        except Exception:
            log.exception("detector %s crashed; explicit activations still work", det.name)
        for st in self.detector_status:
            if st.name == det.name:
                st.active = False
                st.reason = st.reason or "stopped (see log)"
        if getattr(det, "holds_flows", False) and (released := self.engine.release_flows()):
            log.warning("detector %s stopped: %d live flow(s) no longer hold their activations; "
                        "they close after their idle timeout unless seen again", det.name,
                        released)
            self.wake()
        if self._stopping:
            return
        self._start_standins(det.name)

    def _start_standins(self, name: str) -> None:
        """A stand-in waiting for detector ``name`` takes over."""
        for other in self.detectors:
            if getattr(other, "standby_for", "") != name:
                continue
            for st in self.detector_status:
                if st.name == other.name and not st.active and st.reason.startswith("standby"):
                    log.warning("detector %s takes over from %s", other.name, name)
                    st.active, st.reason = True, ""
                    self._tasks.append(asyncio.create_task(self._run_detector(other),
                                                           name=other.name))

    async def stop(self, timeout: float = 8.0) -> int:
        """Stop detectors and timers, then delete every mapping we hold. Returns the count."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._notify_watcher is not None:
            self._notify_watcher.close()
        if self.tracking is not None:
            await asyncio.to_thread(self.tracking.remove)
        removed = 0
        deleted_before = self.mapper.ops["delete"]
        try:
            removed = await asyncio.wait_for(self.mapper.remove_all(), timeout)
        except TimeoutError:
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
                log.error("router did not answer in %.0fs while closing IPv6 pinholes; their "
                          "leases (%ds) will end them", timeout, self.pinholes.lease)
        await self.gateway.close()
        # A clean stop ends what it held: the next start restores nothing (only a crash does);
        # mappings the router did not confirm deleting stay journaled and are removed then.
        self._unjournaled.clear()
        self.journal.activations_clear()
        self.journal.close()
        left = self.mapper.left_open
        if left:
            log.error("stopped; removed %d mapping(s); %d still open on the router: %s", removed,
                      len(left), "; ".join(x.describe() for x in left))
        else:
            log.info("stopped; removed %d mapping(s)", removed)
        return removed

    # --- inputs --------------------------------------------------------------------------------

    def on_flow(self, flow: Flow) -> None:
        if self.engine.on_flow(flow):
            self.wake()

    def observe(self, obs: Flow | FlowLive | FlowEnded | FlowsListed | ProcessSeen) -> None:
        """The sink every detector reports to."""
        if self.front_observer is not None:  # front:
            self.front_observer(obs)
        if isinstance(obs, FlowsListed):
            self._flows_listed.add(obs.detector)
            running = {t.get_name() for t in self._tasks if not t.done()}  # started, alive
            if all(d.name in self._flows_listed for d in self.detectors
                   if getattr(d, "holds_flows", False) and d.name in running) \
                    and self.engine.settle_restored():
                self.wake()  # every flow detector looked: restored holds not found close
            return
        if isinstance(obs, ProcessSeen):
            host = self.local_address()
            if host is not None and obs.names and self.engine.on_process(obs.names, host):
                self.wake()
            return
        flow = self._as_v4(obs if isinstance(obs, Flow) else obs.flow)
        if flow is None:
            return
        if isinstance(obs, FlowEnded):
            self.engine.on_flow_ended(flow, closed=obs.closed)
            self.wake()  # the idle timer may have started: reschedule
        elif isinstance(obs, FlowLive):
            created = self.engine.on_flow_live(flow, connected=obs.connected, idle=obs.idle)
            # packets only move expiries later (the scheduler finds that when it wakes); a new
            # activation, or a connection that stopped holding (its timer now runs), needs it now
            if created or (not obs.connected and obs.idle is None):
                self.wake()
        elif self.engine.on_flow(flow):
            self.wake()

    def _as_v4(self, flow: Flow) -> Flow | None:
        """A dual-stack application's IPv6 trigger flow counts for the same machine's IPv4
        address (the IPv4 mappings go there); other IPv6 flows are not ours to judge."""
        if not isinstance(flow.src, ipaddress.IPv6Address):
            return flow
        if not self.engine.index.match(flow.proto, flow.dport):
            return None
        v4 = self.hostmap.ipv4_for(flow.src)
        if v4 is None:
            return None
        return Flow(flow.proto, ipaddress.IPv4Address(v4), flow.dst, flow.sport, flow.dport)

    def follows(self, flow: Flow) -> bool:
        """Detectors keep looking at a flow while the engine follows it."""
        v4 = self._as_v4(flow)
        return v4 is not None and self.engine.follows(v4)

    def _origin_of(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """Where a triggering flow came from (Engine.origin_of): this machine, or its
        neighbour's MAC address (None: the neighbour table does not know it)."""
        info = self.gateway.info  # (no guessing per flow: that costs a syscall each)
        if info is not None and str(addr) == info.local_address:
            return "local"
        return self.hostmap.origin_of(addr)

    def local_address(self) -> str | None:
        """This host's LAN address as the router sees it (for process-held rules)."""
        info = self.gateway.info
        if info is not None:
            return info.local_address
        from igdtrigger.netutil import guess_lan_address

        return guess_lan_address(self.config.gateway.url)

    def wake(self) -> None:
        self._wake.set()

    async def activate(
        self,
        rule: str,
        host: str,
        *,
        ttl: float | None,
        source: Source,
        meta: dict[str, str] | None = None,
        wait: float = APPLY_WAIT,
        tokenless: bool = False,
    ) -> dict[str, Any]:
        """Activate ``rule`` for ``host``. ``tokenless`` (an API client acting for itself):
        its live activation of the same rule is refreshed instead of a second one being made
        (``source = "api"``), and at most ``[api] max_per_host`` live activations per host
        (``ActivationLimit``, HTTP 429)."""
        if self._stopping:
            raise UsageError("service is shutting down")
        if tokenless:
            if source is Source.API:
                for act in self.engine.activations.values():
                    if (act.host, act.rule.name, act.source) == (host, rule, Source.API):
                        self.engine.heartbeat(act.id, ttl if ttl is not None else act.ttl)
                        if meta:  # replaced, not merged: refreshes must not grow it
                            act.meta = dict(meta)
                        return await self._once_applied(act, wait)
            self._check_host_limit(host)
        act = self.engine.activate(rule, host, ttl=ttl, source=source, meta=meta)
        return await self._once_applied(act, wait)

    def _check_host_limit(self, host: str) -> None:
        """At most ``[api] max_per_host`` tokenless activations per host; IPv6 addresses count
        per /64 (one host may use any number of addresses in its prefix)."""
        limit = self.config.api.max_per_host
        key = host_key(host)
        live = sum(1 for a in self.engine.activations.values()
                   if a.source in (Source.API, Source.RUN) and host_key(a.host) == key)
        if live >= limit:
            self.engine.refused["per_host"] += 1
            raise ActivationLimit(f"{host} already holds {live} activation(s), the [api] "
                                  "max_per_host limit; end one first")

    async def _once_applied(self, act: Activation, wait: float) -> dict[str, Any]:
        """The activation as the API reports it, once the router answered (or ``wait`` s)."""
        await self._wait_applied(self.engine.generation, wait)
        return self.activation_json(act)

    async def activate_adhoc(
        self,
        specs: list[str],
        host: str,
        *,
        ttl: float | None,
        source: Source,
        meta: dict[str, str] | None = None,
        wait: float = APPLY_WAIT,
        tokenless: bool = False,
    ) -> dict[str, Any]:
        """Open ports the request names (no rule): only with ``[api] allow_adhoc``, only
        ports inside ``adhoc_ports``, at most ``adhoc_max_ports`` for ``adhoc_max_ttl``, at
        most ``adhoc_per_host`` per host (an IPv6 host: its /64). ``tokenless``: they count
        towards ``[api] max_per_host`` as well (``ActivationLimit``)."""
        if self._stopping:
            raise UsageError("service is shutting down")
        adhoc = self.config.api.adhoc
        if not adhoc.enabled:
            raise AdhocRefused("ad-hoc ports are off: activate a configured rule, or set "
                               "[api] allow_adhoc = true (with adhoc_ports limits)")
        ports = self._adhoc_ports(specs, host)
        ttl = adhoc.max_ttl if ttl is None else ttl
        if ttl > adhoc.max_ttl:
            raise AdhocRefused(f"ttl {format_duration(ttl)} is above [api] adhoc_max_ttl "
                               f"({format_duration(adhoc.max_ttl)})")
        key = host_key(host)
        live = sum(1 for a in self.engine.activations.values()
                   if a.rule.name.startswith(ADHOC_PREFIX) and host_key(a.host) == key)
        if live >= adhoc.per_host:
            raise AdhocRefused(f"{host} already holds {live} ad-hoc activation(s), the "
                               f"[api] adhoc_per_host limit; deactivate one first")
        if tokenless:
            self._check_host_limit(host)
        act = self.engine.activate_adhoc(ports, host, ttl=ttl, source=source, meta=meta)
        return await self._once_applied(act, wait)

    def _adhoc_ports(self, specs: list[str], host: str) -> tuple[PortRange, ...]:
        adhoc = self.config.api.adhoc
        ports: list[PortRange] = []
        for spec in specs:
            try:
                ranges = parse_port_spec(spec)
            except ValueError as exc:
                raise UsageError(f'field "open": {exc}') from None
            for rng in ranges:
                if rng.first < 1024 and rng.first != rng.last:
                    raise AdhocRefused(f"{rng} includes privileged ports below 1024; name "
                                       "each one")
                if not adhoc.permits(rng):
                    raise AdhocRefused(
                        f"{rng} is outside [api] adhoc_ports "
                        f"({', '.join(str(r) for r in adhoc.ports)})")
                for rule in self.config.rules:  # a rule's hosts list reserves its ports
                    if not rule.allows(host) and any(_overlap(rng, r) for r in rule.open):
                        raise AdhocRefused(
                            f"{rng} overlaps rule {rule.name!r}'s ports, which its hosts list "
                            f"({', '.join(str(n) for n in rule.hosts)}) keeps from {host}")
                ports.append(rng)
        if not ports:
            raise UsageError('field "open" must name at least one port, like "udp/34197"')
        count = sum(len(r) for r in ports)
        if count > adhoc.max_ports:
            raise AdhocRefused(f"{count} ports asked; [api] adhoc_max_ports allows "
                               f"{adhoc.max_ports} per activation")
        return tuple(ports)

    def _adhoc_allowed(self, ports: tuple[PortRange, ...]) -> bool:
        adhoc = self.config.api.adhoc
        return (adhoc.enabled and sum(len(r) for r in ports) <= adhoc.max_ports
                and all(adhoc.permits(r) for r in ports))

    async def deactivate(self, act_id: str, *, wait: float = APPLY_WAIT) -> dict[str, Any]:
        act = self.engine.deactivate(act_id)
        await self._wait_applied(self.engine.generation, wait)
        return self.activation_json(act, include_ports=False)

    def heartbeat(self, act_id: str, ttl: float | None,
                  self_mapped: bool | None = None) -> dict[str, Any]:
        """Extend an activation; ``self_mapped``: its host reports it maps the ports itself
        (True; only after this service was refused them as secure mode) or no longer (False)."""
        act = self.engine.heartbeat(act_id, ttl)
        # taken only when true: after the router refused this host's ports to us as secure
        # mode (else ignored; the answer's state says which holds)
        if (self_mapped is not None and self_mapped != act.self_mapped
                and (not self_mapped or self._refused_self_only(act))):
            self.engine.set_self_mapped(act_id, self_mapped)
            log.info("rule %s for %s: %s", act.rule.name, act.host,
                     "mapped by that host itself (the router only lets a host map ports to "
                     "itself)" if self_mapped else "mapped by this service again")
            self.hub.publish({"at": time.time(), "event": "self_mapped" if self_mapped
                              else "self_unmapped", "rule": act.rule.name, "host": act.host})
        self.wake()
        return self.activation_json(act)

    def _refused_self_only(self, act: Activation) -> bool:
        for rng in act.rule.open:
            for port in rng:
                app = self.mapper.applied.get(MappingKey(rng.proto, port))
                if app is not None and app.spec.internal_client == act.host and app.self_only:
                    return True
        return False

    async def _wait_applied(self, generation: int, timeout: float) -> None:
        self.wake()
        if timeout <= 0:
            return
        async with self._applied_cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._applied_cond.wait_for(lambda: self._applied_generation >= generation),
                    timeout,
                )

    # --- scheduler -----------------------------------------------------------------------------

    def desired(self) -> dict[MappingKey, Any]:
        gen = self.engine.generation
        if self._desired_cache[0] != gen:
            self._desired_cache = (gen, self.engine.desired())
        return self._desired_cache[1]

    async def _scheduler(self) -> None:
        while True:
            if self._stopping:  # Python 3.11's wait_for drops a cancel that meets a wake()
                return  # (gh-86296): without this, stop() waited for the next deadline
            self._wake.clear()
            self.engine.expire()
            gen = self.engine.generation
            await self.mapper.reconcile(self.desired())
            self._pinhole_wake.set()  # IPv6 follows in its own task: IPv4 never waits for it
            self._watch_router()
            self._journal_check()
            self._journal_new()
            self._journal_activations()
            async with self._applied_cond:
                self._applied_generation = gen
                self._applied_cond.notify_all()
            if self.engine.generation != gen:
                continue
            deadlines = [d for d in (self.engine.next_deadline(), self.mapper.next_deadline()) if d]
            delay = max(0.0, min(deadlines) - self.clock()) if deadlines else math.inf
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), None if delay == math.inf else delay)

    async def _pinhole_loop(self, keeper: PinholeKeeper) -> None:
        """IPv6 pinholes, after each round of the scheduler and at their own deadlines. Apart
        from the scheduler so a slow or silent IPv6 side never delays an IPv4 mapping."""
        deadline: float | None = None
        while True:
            # The first round waits for the scheduler's (which finds the router: the IGD's
            # address is what the IPv6 side is asked at; asking before would only back off).
            delay = math.inf if deadline is None else max(0.0, deadline - self.clock())
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pinhole_wake.wait(),
                                           None if delay == math.inf else delay)
            self._pinhole_wake.clear()
            try:
                await keeper.reconcile(self.desired_pinholes())
                deadline = keeper.next_deadline()
            except Exception:  # a bug here must not stop IPv4 or the service
                log.exception("IPv6 pinholes: unexpected error; trying again in 30 s")
                deadline = self.clock() + 30.0

    # --- reporting -----------------------------------------------------------------------------

    def _on_engine_event(self, ev: Event) -> None:
        act = ev.activation
        if ev.kind is EventKind.ACTIVATED:
            self._unjournaled[act.id] = act
        elif self._unjournaled.pop(act.id, None) is None:  # else it never reached the journal
            self.journal.activation_gone(act.id)
        if ev.kind is EventKind.ACTIVATED:
            log.info(
                "rule %s activated for %s by %s (lapses after %s idle)",
                act.rule.name, act.host, act.source.value, format_duration(act.ttl),
            )
        else:
            log.info("rule %s for %s %s", act.rule.name, act.host, ev.kind.value)
        self.hub.publish(
            {"at": time.time(), "event": ev.kind.value, "rule": act.rule.name,
             "host": act.host, "activation": act.id, "source": act.source.value}
        )

    def _on_mapping_change(self, app: Applied, what: str) -> None:
        s = app.spec
        if what in ("conflict", "failed"):
            self.error_counts[f"mapping_{what}"] += 1
        log.info("%s %s -> %s:%d%s", what, s.key, s.internal_client, s.internal_port,
                 f" ({app.error})" if app.error and what != "mapped" else "")
        self.hub.publish(
            {"at": time.time(), "event": what, "mapping": str(s.key),
             "host": s.internal_client, **({"error": app.error} if app.error else {})}
        )

    def _on_pinhole_change(self, spec: PinholeSpec, what: str, error: str) -> None:
        if what == "failed":
            self.error_counts["pinhole_failed"] += 1
        log.info("pinhole %s %s%s", spec, what, f" ({error})" if error else "")
        self.hub.publish({"at": time.time(), "event": f"pinhole_{what}", "pinhole": str(spec),
                          "host": spec.address, **({"error": error} if error else {})})

    def activation_json(self, act: Activation, *, include_ports: bool = True) -> dict[str, Any]:
        now = self.clock()
        out = act.to_json(now)
        info = self.gateway.info
        if info is not None and info.external_address:
            out["external_address"] = info.external_address
        if not include_ports:
            out["state"] = "ended"
            return out
        if act.self_mapped:
            out["state"] = "self"
            out["message"] = (f"mapped by {act.host} itself: the router only lets a host map "
                              "ports to itself (UPnP secure mode)")
            out["ports"] = [{"port": str(MappingKey(rng.proto, port)), "state": "self"}
                            for rng in act.rule.open for port in rng]
            return out
        desired = self.desired()
        waiting = self.engine.waiting_for(act, desired)
        ports: list[dict[str, Any]] = []
        states: set[str] = set()
        self_only = False
        for rng in act.rule.open:
            for port in rng:
                key = MappingKey(rng.proto, port)
                spec = desired.get(key)
                app = self.mapper.applied.get(key)
                if spec is None or spec.internal_client != act.host:
                    st = "held"
                    entry: dict[str, Any] = {"port": str(key), "state": st,
                                             "held_by": spec.internal_client if spec else None}
                elif app is None:
                    st = "pending"
                    entry = {"port": str(key), "state": st}
                else:
                    st = app.state.value
                    entry = {"port": str(key), "state": st, "external_port": app.external_port}
                    if app.error:
                        entry["error"] = app.error
                    self_only = self_only or app.self_only
                states.add(st)
                ports.append(entry)
        if waiting:
            out["state"] = "waiting"
            out["held_by"] = sorted(waiting)
        elif states == {"active"}:
            out["state"] = "open"
        elif "active" in states:
            out["state"] = "partial"
        elif states & {"failed", "conflict"}:
            out["state"] = "failed"
        else:
            out["state"] = "pending"
        if self_only:  # the reason and the fix, once (the ports' errors say it per port)
            out["reason"] = "router_self_only"
            out["message"] = self_only_message(act.rule.name, act.host)
        out["ports"] = ports
        return out

    def status(self, *, max_activations: int = STATUS_ACTIVATIONS) -> dict[str, Any]:
        """The whole state; at most ``max_activations`` activations (the oldest; the rest are
        paged through ``GET /api/v1/activations``), their total in ``counts``."""
        info = self.gateway.info
        now = self.clock()
        warnings: list[str] = []
        external_warning = info.external_warning() if info is not None else None
        if external_warning is not None:
            warnings.append(external_warning)
        for st in self.detector_status:
            if not st.active and not st.reason.startswith(("standby", "no rule names")):
                warnings.append(f"detector {st.name} inactive: {st.reason}")
        if self.pinholes is not None and self.pinholes.reason and self.desired_pinholes():
            warnings.append(f"IPv6 ports are not opened: {self.pinholes.reason}")
        if len(self.engine.activations) > max_activations:
            warnings.append(f"{len(self.engine.activations)} activations: the first "
                            f"{max_activations} are listed here, page through all of them with "
                            "GET /api/v1/activations?limit=&cursor=")
        if self.engine.refused:
            warnings.append("activations refused by the service's bounds: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.engine.refused.items())))
        warnings.extend(f"still open on the router: {x.describe()}"
                        for x in self.mapper.left_open)
        if self.journal.degraded:
            warnings.append(f"state journal {self.journal.path} not writable "
                            f"({self.journal.degraded}): working from memory")
        return {
            "version": __version__,
            "uptime": round(now - self.started, 3),
            "instance": self.tag,
            "journal": {"path": str(self.journal.path), "degraded": self.journal.degraded or None,
                        "restored_activations": self.restored,
                        "orphans_pending": len(self.mapper.orphans)},
            "gateway": {
                "up": self.mapper.gateway_up,
                "error": self.mapper.gateway_error or None,
                "protocol": info.protocol if info else None,
                "location": info.location if info else self.config.gateway.url,
                "local_address": info.local_address if info else None,
                "external_address": info.external_address if info else None,
                "external_reachable": info.reachable_or_unknown if info else None,
                # the one service choice (gateway.soap.find_wan_service) and what it offers
                "backend": (info.backend or None) if info else None,
                "service_type": (info.service_type or None) if info else None,
                "control_url": (info.control_url or None) if info else None,
                "capabilities": sorted(self.gateway.capabilities),
                "lease": self.mapper.lease,
                "permanent_leases": self.mapper.permanent_only,
                "permanent_why": self.mapper.traits.why_permanent or None,
                "learned": self.mapper.traits.to_json(),
                "left_open": [x.to_json() for x in self.mapper.left_open],
                "announcements": {
                    "listening": (self._notify_watcher is not None
                                  and self._notify_watcher.listening),
                    "restarts_seen": self.router_announcements,
                },
            },
            "detectors": [self._detector_json(d) for d in self.detector_status],
            "rules": [r.to_json() for r in self.config.rules],
            "activations": [
                self.activation_json(a)
                for a in self.sorted_activations()[:max_activations]
            ],
            "mappings": self.mapper.snapshot(),
            "pinholes": (self.pinholes.status() if self.pinholes is not None
                         else {"available": False, "reason": "gateway.ipv6_pinholes is off"}),
            "counts": {
                "activations": len(self.engine.activations),
                "mappings_active": self.mapper.count(MapState.ACTIVE),
                "pinholes_active": (self.pinholes.count(PinholeState.ACTIVE)
                                    if self.pinholes is not None else 0),
                "activations_refused": dict(sorted(self.engine.refused.items())),
                "flows_seen": self.engine.flows_seen,
                "flows_matched": self.engine.flows_matched,
                "flows_inbound": self.engine.flows_inbound,
                "flows_live": len(self.engine.live),
                "flows_refused": self.engine.flows_refused,
                **{f"router_{k}": v for k, v in self.mapper.ops.items()},
            },
            "warnings": warnings,
            "events": list(self.events)[-50:],
            **({"front": self.front_status()} if self.front_status else {}),  # front:
        }

    def sorted_activations(self) -> list[Activation]:
        """Live activations, oldest first (the order pages of the API follow)."""
        return sorted(self.engine.activations.values(), key=lambda a: a.seq)

    def _detector_json(self, st: DetectorStatus) -> dict[str, Any]:
        out: dict[str, Any] = {"name": st.name, "active": st.active}
        if st.reason:
            out["reason"] = st.reason
        if st.detail:
            out["detail"] = st.detail
        det = next((d for d in self.detectors if d.name == st.name), None)
        events = getattr(det, "events_seen", None)
        if isinstance(events, int):
            out["events_seen"] = events
        if st.name == "conntrack" and self.tracking is not None:
            t = self.tracking
            out["tracking"] = {"table": TABLE, "enabled": t.enabled, "loaded": t.installed,
                               "reason": t.reason or None, "reinstalls": t.reinstalls,
                               "trigger_flows_counted": self.tracked_flows}
        return out

    def rules(self) -> list[Rule]:
        return list(self.config.rules)

    # front: the IGD front's one façade method (igdtrigger/front/manager.py, issue 14) ------------

    async def front_activate(self, port: PortRange, host: str, *, ttl: float, source: Source,
                             meta: dict[str, str], wait: float = APPLY_WAIT,
                             ) -> tuple[Activation, Applied | None]:
        """A LAN client's mapping, its policy already checked by the front: an ad-hoc activation
        of the one external ``port`` for ``host`` (``meta[FRONT_TARGET]`` names the internal
        target). Returns it and the mapper's record of its mapping once the router answered
        (or after ``wait`` s; None: not applied yet). Raises ``UsageError`` while stopping,
        ``ActivationLimit`` when the engine is full."""
        if self._stopping:
            raise UsageError("service is shutting down")
        act = self.engine.activate_adhoc((port,), host, ttl=ttl, source=source, meta=meta)
        await self._wait_applied(self.engine.generation, wait)
        return act, self.mapper.applied.get(MappingKey(port.proto, port.first))
