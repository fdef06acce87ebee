"""The running service: wires detector → engine → mapper → gateway and schedules timers.

The scheduler is one task: it expires lapsed activations, reconciles the router with what the
engine wants, then sleeps until the next deadline (an expiry, a lease renewal, a retry, a
verification) or until something new happens (a flow, an API call).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igdtrigger.config import Config, default_state_dir
from igdtrigger.core import policy, trace
from igdtrigger.core.activation import Activation, Event, EventKind, Source
from igdtrigger.core.engine import Engine
from igdtrigger.core.errors import ActivationLimit, AdhocRefused, UsageError
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
)
from igdtrigger.core.rules import ADHOC_PREFIX, Rule
from igdtrigger.detect.base import Detector
from igdtrigger.gateway.base import Gateway, GatewayInfo, RouterChange, RouterChangeKind
from igdtrigger.netutil import guess_lan_address, host_key
from igdtrigger.runtime import compose
from igdtrigger.runtime.detectors import Detectors, DetectorStatus
from igdtrigger.runtime.events import EventHub
from igdtrigger.runtime.journal import Journal, boot_clock, no_boot_clock
from igdtrigger.runtime.leftovers import dead_runs
from igdtrigger.runtime.mapper import Applied, Mapper
from igdtrigger.runtime.pipeline import Pipeline, Settings
from igdtrigger.runtime.state import derived_tag, load_or_create_secret
from igdtrigger.runtime.views import (
    STATUS_ACTIVATIONS,
    ActivationView,
    StatusView,
    Tallies,
    activation_view,
    status_view,
    tallies,
)

if TYPE_CHECKING:
    from igdtrigger.runtime.compose import KernelTracking, NotifyWatcher

__all__ = [
    "APPLY_WAIT",
    "Service",
]

log = logging.getLogger("igdtrigger")

APPLY_WAIT = 5.0  # how long an API activation waits for its mappings before answering


class Service:
    """The running service as the API sees it: one ``Pipeline`` (engine, mapper, pinholes, journal
    on one scheduler) fed by ``detectors``, plus the event hub, the instance tag and API token
    (files in ``state_dir``), and the router's announcements. ``clock`` is monotonic seconds,
    ``wall`` epoch seconds (journal expiries that survive a reboot). Handlers call its methods
    only; the pipeline's parts are ``self.pipeline.*`` (for ``serve``, ``run`` and the tests)."""

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
        self.pipeline = Pipeline(
            config.rules, gateway, Journal.open(self.journal_dir),
            settings=Settings.from_config(config.gateway), clock=clock, wall=wall,
            boot=self.boot, tag=tag, on_event=self._on_engine_event,
            on_mapping_change=self._on_mapping_change,
            on_pinhole_change=self._on_pinhole_change,
            pinhole_client=(compose.firewall_client(self._upnp_location, on_call=on_router_call)
                            if config.gateway.ipv6_pinholes else None),
            ipv6_addresses=compose.ipv6_addresses, local_address=self.local_address,
            reopen_journal=self._reopen_journal, after_round=self._watch_router)
        # the pipeline's parts this façade drives (fixed for its life; the journal is not:
        # a reopened one replaces it, so it is read as self.pipeline.journal)
        self._engine: Engine = self.pipeline.engine
        self._mapper: Mapper = self.pipeline.mapper
        self._flows_listed: set[str] = set()  # flow detectors whose first look is reported
        self.restored = self.pipeline.restore(dead_runs(self.journal_dir),
                                              adhoc=self._adhoc_allowed)
        compose.set_lost_state_handler(gateway, self.pipeline.router_lost_state)
        self.started = clock()
        self._tasks: list[asyncio.Task[None]] = []
        self.supervisor = Detectors(self, detectors or [], tracking, self._tasks)
        self._stopping = False
        self._notify_watcher: NotifyWatcher | None = None
        self.hostmap = compose.host_map(self.local_address, clock=clock)
        self._engine.origin_of = self._origin_of  # bounds forged trigger sources per MAC address
        self.router_announcements = 0  # restarts/moves learned from the router's SSDP NOTIFYs

    # --- lifecycle -----------------------------------------------------------------------------

    def _upnp_location(self) -> str | None:
        info = self.gateway.info
        return info.location if info is not None and info.protocol == "upnp-igd" else None

    def desired(self) -> dict[MappingKey, Any]:
        """The mappings the engine wants now, by key (``Pipeline.desired``)."""
        return self.pipeline.desired()

    def desired_pinholes(self) -> set[PinholeSpec]:
        """The IPv6 pinholes wanted now (``Pipeline.desired_pinholes``)."""
        return self.pipeline.desired_pinholes()

    @property
    def gateway_up(self) -> bool:
        """The router answered the last call."""
        return self._mapper.gateway_up

    @property
    def gateway_error(self) -> str:
        """Why the router is down ("" while up or not asked yet)."""
        return self._mapper.gateway_error

    @property
    def gateway_info(self) -> GatewayInfo | None:
        """What the router said about itself (protocol, addresses, backend); ``None`` until it
        has been found."""
        return self.gateway.info

    def tallies(self) -> Tallies:
        """The counts ``/metrics`` exports, read now (``runtime.views.Tallies``)."""
        return tallies(self)

    def find_activation(self, act_id: str) -> Activation:
        """The live activation ``act_id``. Raises ``ActivationNotFound``."""
        return self._engine.get(act_id)

    def rule_names(self) -> list[str]:
        """The configured rules' names."""
        return list(self._engine.rules)

    def mapping_snapshot(self) -> list[dict[str, Any]]:
        """The mappings as ``GET /api/v1/mappings`` lists them."""
        return self._mapper.snapshot()

    def counts(self) -> tuple[int, int]:
        """(live activations, mappings held)."""
        return len(self._engine.activations), len(self._mapper.applied)

    def wire_detectors(self) -> None:
        """Give the detectors the engine's filters (flows no rule cares about are dropped
        before they cost anything)."""
        compose.wire_detectors(self.detectors, wants=self._engine.wants,
                               ports=self._engine.port_ranges(), follows=self.follows)

    def health(self) -> str | None:
        """``None`` while the scheduler runs, else what is wrong with it (``Pipeline.health``)."""
        return self.pipeline.health()

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
        self._notify_watcher = compose.notify_watcher(info.location, info.local_address,
                                                      self._router_changed,
                                                      root_uuid=info.root_uuid)
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
        compose.forget_connection(self.gateway, change.location)
        self._mapper.retry_gateway_now()
        self.pipeline.router_lost_state(change.reason)

    def _reopen_journal(self) -> Journal:
        """A new journal where the deleted one was (``Pipeline._journal_check``)."""
        journal = Journal.open(self.journal_dir)
        load_or_create_secret(self.journal_dir / "instance", 3, value=self.tag)
        return journal

    async def start(self) -> None:
        """Start the scheduler and the detectors (those that cannot run here report why in
        ``detector_status``)."""
        self._tasks.extend(self.pipeline.start())
        await self.supervisor.start()
        self.wake()

    # the detectors' side, for the API and the tests
    @property
    def detectors(self) -> list[Detector]:
        """The configured detectors, running or not."""
        return self.supervisor.detectors

    @property
    def detector_status(self) -> list[DetectorStatus]:
        """Each detector's state: whether it runs and sees what it is for, else why not."""
        return self.supervisor.detector_status

    @property
    def tracking(self) -> KernelTracking | None:
        """The nftables table that makes the kernel track trigger flows (``None``: no
        conntrack detector)."""
        return self.supervisor.tracking

    @property
    def tracked_flows(self) -> int | None:
        """New trigger flows the nftables counters saw (``None`` until read)."""
        return self.supervisor.tracked_flows

    @property
    def stopping(self) -> bool:
        """``stop()`` has begun."""
        return self._stopping

    async def retrack(self) -> None:
        """The rules changed: load the nftables table again for their trigger ports."""
        await self.supervisor.retrack()

        self.wake()

    async def stop(self, timeout: float = 8.0) -> int:
        """Stop detectors and timers, then delete every mapping we hold. Returns the count."""
        self._stopping = self.pipeline.stopping = True
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
        removed = await self.pipeline.remove_all(timeout)
        # A clean stop ends what it held: the next start restores nothing (only a crash does);
        # mappings the router did not confirm deleting stay journaled and are removed then.
        self.pipeline.journal.close()
        left = self._mapper.left_open
        if left:
            log.error("stopped; removed %d mapping(s); %d still open on the router: %s", removed,
                      len(left), "; ".join(x.describe() for x in left))
        else:
            log.info("stopped; removed %d mapping(s)", removed)
        return removed

    # --- inputs --------------------------------------------------------------------------------

    def on_flow(self, flow: Flow) -> None:
        """Feed one new flow to the engine (as a flow detector reports it), waking the scheduler
        when it changes what is wanted."""
        if self._engine.on_flow(flow):
            if trace.ON:
                trace.begin("engine")
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
                    and self._engine.settle_restored():
                self.wake()  # every flow detector looked: restored holds not found close
            return
        if isinstance(obs, ProcessSeen):
            host = self.local_address()
            if host is not None and obs.names and self._engine.on_process(obs.names, host):
                self.wake()
            return
        flow = self._as_v4(obs if isinstance(obs, Flow) else obs.flow)
        if flow is None:
            return
        if isinstance(obs, FlowEnded):
            self._engine.on_flow_ended(flow, closed=obs.closed)
            self.wake()  # the idle timer may have started: reschedule
        elif isinstance(obs, FlowLive):
            created = self._engine.on_flow_live(flow, connected=obs.connected, idle=obs.idle)
            # packets only move expiries later (the scheduler finds that when it wakes); a new
            # activation, or a connection that stopped holding (its timer now runs), needs it now
            if created or (not obs.connected and obs.idle is None):
                self.wake()
        else:
            self.on_flow(flow)

    def _as_v4(self, flow: Flow) -> Flow | None:
        """A dual-stack application's IPv6 trigger flow counts for the same machine's IPv4
        address (the IPv4 mappings go there); other IPv6 flows are not ours to judge."""
        if not isinstance(flow.src, ipaddress.IPv6Address):
            return flow
        if not self._engine.index.match(flow.proto, flow.dport):
            return None
        v4 = self.hostmap.ipv4_for(flow.src)
        if v4 is None:
            return None
        return Flow(flow.proto, ipaddress.IPv4Address(v4), flow.dst, flow.sport, flow.dport)

    def follows(self, flow: Flow) -> bool:
        """Detectors keep looking at a flow while the engine follows it."""
        v4 = self._as_v4(flow)
        return v4 is not None and self._engine.follows(v4)

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
        return guess_lan_address(self.config.gateway.url)

    def wake(self) -> None:
        """Run the scheduler's next round now (something changed)."""
        self.pipeline.wake()

    async def activate(
        self,
        what: str | list[str],
        host: str,
        *,
        ttl: float | None,
        source: Source,
        meta: dict[str, str] | None = None,
        wait: float = APPLY_WAIT,
        tokenless: bool = False,
    ) -> ActivationView:
        """Activate ``what`` for ``host`` and answer once the router did (or after ``wait`` s).

        ``what``: a configured rule's name, or a list of ad-hoc port specs (``["udp/40000"]``,
        see ``_adhoc_activation``). ``ttl`` in seconds (``None``: the rule's idle timeout, the
        ad-hoc maximum). ``tokenless`` (an API client acting for itself): at most ``[api]
        max_per_host`` live activations per host (``ActivationLimit``, HTTP 429), and its live
        activation of the same rule is refreshed instead of a second one being made (``source =
        "api"``). Raises ``UsageError`` while shutting down, ``RuleNotFound``, ``AdhocRefused``.
        """
        if self._stopping:
            raise UsageError("service is shutting down")
        if isinstance(what, list):
            act = self._adhoc_activation(what, host, ttl=ttl, source=source, meta=meta,
                                         tokenless=tokenless)
        else:
            act = self._rule_activation(what, host, ttl=ttl, source=source, meta=meta,
                                        tokenless=tokenless)
        if trace.ON:
            trace.begin("engine")
        await self._wait_applied(self._engine.generation, wait)
        return self.activation_json(act)

    def _rule_activation(self, rule: str, host: str, *, ttl: float | None, source: Source,
                         meta: dict[str, str] | None, tokenless: bool) -> Activation:
        if tokenless:
            if source is Source.API:
                for act in self._engine.activations.values():
                    if (act.host, act.rule.name, act.source) == (host, rule, Source.API):
                        self._engine.heartbeat(act.id, ttl if ttl is not None else act.ttl)
                        if meta:  # replaced, not merged: refreshes must not grow it
                            act.meta = dict(meta)
                        return act
            self._check_host_limit(host)
        return self._engine.activate(rule, host, ttl=ttl, source=source, meta=meta)

    def _check_host_limit(self, host: str) -> None:
        """At most ``[api] max_per_host`` tokenless activations per host; IPv6 addresses count
        per /64 (one host may use any number of addresses in its prefix)."""
        limit = self.config.api.max_per_host
        key = host_key(host)
        live = sum(1 for a in self._engine.activations.values()
                   if a.source in (Source.API, Source.RUN) and host_key(a.host) == key)
        if live >= limit:
            self._engine.refused["per_host"] += 1
            raise ActivationLimit(f"{host} already holds {live} activation(s), the [api] "
                                  "max_per_host limit; end one first")

    def _adhoc_activation(self, specs: list[str], host: str, *, ttl: float | None,
                          source: Source, meta: dict[str, str] | None,
                          tokenless: bool) -> Activation:
        """Open ports the request names (no rule): only with ``[api] allow_adhoc``, only
        ports inside ``adhoc_ports``, at most ``adhoc_max_ports`` for ``adhoc_max_ttl``, at
        most ``adhoc_per_host`` per host (an IPv6 host: its /64). ``tokenless``: they count
        towards ``[api] max_per_host`` as well (``ActivationLimit``)."""
        adhoc = self.config.api.adhoc
        if not adhoc.enabled:
            raise AdhocRefused("ad-hoc ports are off: activate a configured rule, or set "
                               "[api] allow_adhoc = true (with adhoc_ports limits)")
        ports = policy.adhoc_ports(specs, host, limits=adhoc, rules=self.config.rules)
        ttl = adhoc.max_ttl if ttl is None else ttl
        if ttl > adhoc.max_ttl:
            raise AdhocRefused(f"ttl {format_duration(ttl)} is above [api] adhoc_max_ttl "
                               f"({format_duration(adhoc.max_ttl)})")
        key = host_key(host)
        live = sum(1 for a in self._engine.activations.values()
                   if a.rule.name.startswith(ADHOC_PREFIX) and host_key(a.host) == key)
        if live >= adhoc.per_host:
            raise AdhocRefused(f"{host} already holds {live} ad-hoc activation(s), the "
                               f"[api] adhoc_per_host limit; deactivate one first")
        if tokenless:
            self._check_host_limit(host)
        return self._engine.activate_adhoc(ports, host, ttl=ttl, source=source, meta=meta)

    def _adhoc_allowed(self, ports: tuple[PortRange, ...]) -> bool:
        return policy.adhoc_permitted(self.config.api.adhoc, ports)

    async def deactivate(self, act_id: str, *, wait: float = APPLY_WAIT) -> ActivationView:
        """End activation ``act_id`` and answer once the router was told (or after ``wait`` s): its
        last ``ActivationView`` (``state = "ended"``). Raises ``ActivationNotFound``."""
        act = self._engine.deactivate(act_id)
        await self._wait_applied(self._engine.generation, wait)
        return self.activation_json(act, include_ports=False)

    def heartbeat(self, act_id: str, ttl: float | None,
                  self_mapped: bool | None = None) -> ActivationView:
        """Extend an activation; ``self_mapped``: its host reports it maps the ports itself
        (True; only after this service was refused them as secure mode) or no longer (False)."""
        act = self._engine.heartbeat(act_id, ttl)
        # taken only when true: after the router refused this host's ports to us as secure
        # mode (else ignored; the answer's state says which holds)
        if (self_mapped is not None and self_mapped != act.self_mapped
                and (not self_mapped or self._refused_self_only(act))):
            self._engine.set_self_mapped(act_id, self_mapped)
            log.info("rule %s for %s: %s", act.rule.name, act.host,
                     "mapped by that host itself (the router only lets a host map ports to "
                     "itself)" if self_mapped else "mapped by this service again")
            self.hub.publish({"at": self.wall(), "event": "self_mapped" if self_mapped
                              else "self_unmapped", "rule": act.rule.name, "host": act.host})
        self.wake()
        return self.activation_json(act)

    def _refused_self_only(self, act: Activation) -> bool:
        for rng in act.rule.open:
            for port in rng:
                app = self._mapper.applied.get(MappingKey(rng.proto, port))
                if app is not None and app.spec.internal_client == act.host and app.self_only:
                    return True
        return False

    async def _wait_applied(self, generation: int, timeout: float) -> None:
        await self.pipeline.wait_applied(generation, timeout)

    # --- reporting -----------------------------------------------------------------------------

    def _on_engine_event(self, ev: Event) -> None:
        act = ev.activation
        if ev.kind is EventKind.ACTIVATED:
            log.info(
                "rule %s activated for %s by %s (lapses after %s idle)",
                act.rule.name, act.host, act.source.value, format_duration(act.ttl),
            )
        else:
            log.info("rule %s for %s %s", act.rule.name, act.host, ev.kind.value)
        self.hub.publish(
            {"at": self.wall(), "event": ev.kind.value, "rule": act.rule.name,
             "host": act.host, "activation": act.id, "source": act.source.value}
        )

    def _on_mapping_change(self, app: Applied, what: str) -> None:
        s = app.spec
        if what in ("conflict", "failed"):
            self.error_counts[f"mapping_{what}"] += 1
        log.info("%s %s -> %s:%d%s", what, s.key, s.internal_client, s.internal_port,
                 f" ({app.error})" if app.error and what != "mapped" else "")
        self.hub.publish(
            {"at": self.wall(), "event": what, "mapping": str(s.key),
             "host": s.internal_client, **({"error": app.error} if app.error else {})}
        )

    def _on_pinhole_change(self, spec: PinholeSpec, what: str, error: str) -> None:
        if what == "failed":
            self.error_counts["pinhole_failed"] += 1
        log.info("pinhole %s %s%s", spec, what, f" ({error})" if error else "")
        self.hub.publish({"at": self.wall(), "event": f"pinhole_{what}", "pinhole": str(spec),
                          "host": spec.address, **({"error": error} if error else {})})

    def activation_json(self, act: Activation, *, include_ports: bool = True,
                        ) -> ActivationView:
        """``act`` as the API shows it (``views.activation_view``)."""
        return activation_view(self, act, include_ports=include_ports)

    def status(self, *, max_activations: int = STATUS_ACTIVATIONS) -> StatusView:
        """The whole state (``views.status_view``)."""
        view = status_view(self, max_activations=max_activations)
        if self.front_status is not None:  # front: the IGD front's part
            view["front"] = self.front_status()
        return view

    @property
    def router_watch_listening(self) -> bool:
        """The router's SSDP NOTIFYs are listened to."""
        w = self._notify_watcher
        return w is not None and w.listening

    def sorted_activations(self) -> list[Activation]:
        """Live activations, oldest first (the order pages of the API follow)."""
        return sorted(self._engine.activations.values(), key=lambda a: a.seq)

    def rules(self) -> list[Rule]:
        """The configured rules, in configuration order."""
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
        act = self._engine.activate_adhoc((port,), host, ttl=ttl, source=source, meta=meta)
        await self._wait_applied(self._engine.generation, wait)
        return act, self._mapper.applied.get(MappingKey(port.proto, port.first))
