"""Trigger logic: rules, activations and their timers. Pure: no sockets, no sleeps.

The engine is fed flows (from detectors) and explicit requests (API, wrapper), asked to expire
what has lapsed at a given time, and asked which mappings should exist now. Time comes from an
injected clock so every behaviour is unit-testable with a fake one.

Semantics (router-style port triggering, as ipt_TRIGGER and router manuals describe it):
- A flow from a LAN host to a trigger port of rule R creates (or refreshes) the activation
  (R, host, traffic). The activation closes ``idle_timeout`` after the trigger traffic and the
  inbound traffic stop: every packet the detectors report on a live trigger flow refreshes it, a
  flow arriving on one of its opened ports (inbound use) does too, and a live *connection* (TCP
  established, a connected socket) holds it however silent it is. The timer starts when the last
  such connection ends (its close counts as its last packet).
- Memory: only live flows that match (a trigger flow of an allowed host, or inbound on a port an
  activation holds) are remembered, at most ``MAX_FLOWS_PER_HOST`` per LAN host and
  ``MAX_FLOWS`` in all; beyond that a flow still refreshes the timer but is not followed
  (counted in ``flows_refused``).
- A process-held activation lapses ``idle_timeout`` after the process was last seen.
- An explicit activation lives for its ``ttl``; a heartbeat extends it by its ttl again.
- Ports are owned first come, first served: the older activation keeps a port two want, the
  younger takes over when it lapses; ``share = "latest"`` lets a rule's newest activation take
  ports from its own older ones, never from another rule's (kept incrementally: core/desired.py).
- Bounded: at most ``MAX_ACTIVATIONS`` live activations (``ActivationLimit`` past it), and
  detected ones (traffic) at most ``MAX_DETECTED`` in all, and the source addresses behind one
  origin (the flow's link-layer address when the neighbour table knows it, through
  ``origin_of``) at most ``MAX_HOSTS_PER_ORIGIN``; sources the table does not know share
  ``MAX_UNKNOWN_HOSTS``, so forged source addresses cannot grow the table; what was refused is
  counted in ``refused``.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import math
import secrets
from collections.abc import Callable, Iterable

from igdtrigger.core.activation import (
    ADHOC_META,
    FRONT_SOURCES,  # front:
    MAX_TTL,
    Activation,
    Clock,
    Event,
    EventKind,
    Source,
    adhoc_rule,
    check_ttl,
    restored_adhoc_rule,
)
from igdtrigger.core.desired import DesiredMap, waiting_for
from igdtrigger.core.errors import (
    ActivationLimit,
    ActivationNotFound,
    HostNotAllowed,
    RuleNotFound,
    UsageError,
)
from igdtrigger.core.matching import (
    Live,
    RuleIndex,
    is_lan_source,
    is_remote_destination,
    process_index,
)
from igdtrigger.core.model import (
    Flow,
    IPAddress,
    MappingKey,
    MappingSpec,
    PortRange,
    Proto,
)
from igdtrigger.core.origins import LOCAL_ORIGIN, UNKNOWN_ORIGIN, OriginCounts
from igdtrigger.core.rules import Rule
from igdtrigger.core.timers import ExpiryHeap

# the engine and its bounds; its vocabulary lives in core/activation.py, matching.py, origins.py
__all__ = [
    "MAX_ACTIVATIONS", "MAX_DETECTED", "MAX_FLOWS", "MAX_FLOWS_PER_HOST", "MAX_HOSTS_PER_ORIGIN",
    "MAX_UNKNOWN_HOSTS", "Engine",
]

MAX_ACTIVATIONS = 4096  # live activations of every kind
MAX_DETECTED = 4096  # live activations created by detected traffic
MAX_HOSTS_PER_ORIGIN = 8  # source addresses with detected activations behind one MAC address
MAX_UNKNOWN_HOSTS = 16  # ... behind no known MAC address, all together
MAX_FLOWS_PER_HOST = 256  # live matching flows followed per LAN host
MAX_FLOWS = 4096  # ... and in all


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"host {host!r} is not an IP address") from None


class Engine:
    """Holds the live activations and decides which mappings should exist."""

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        clock: Clock,
        tag: str,
        on_event: Callable[[Event], None] | None = None,
        id_factory: Callable[[], str] | None = None,
        local_hosts: Iterable[str] = (),
    ) -> None:
        self.rules: dict[str, Rule] = {r.name: r for r in rules}
        self.index = RuleIndex(self.rules.values())
        self.open_index = RuleIndex(self.rules.values(), opened=True)
        self.process_index = process_index(self.rules.values())
        self.clock = clock
        self.tag = tag
        self.on_event = on_event
        self._new_id = id_factory or (lambda: secrets.token_hex(6))
        self.local_hosts = {ipaddress.ip_address(h) for h in local_hosts}
        self.activations: dict[str, Activation] = {}
        self._traffic: dict[tuple[str, str, Source], str] = {}  # (rule, host, src) -> act id
        self._timers = ExpiryHeap(self.activations)
        self._seq = itertools.count()
        self.generation = 0  # bumped whenever the desired mapping set may have changed
        self.dirty: set[str] = set()  # activations whose expiry moved (for the journal)
        self.flows_seen = 0
        self.flows_matched = 0
        self.flows_inbound = 0  # new flows that arrived on a port an activation holds
        self.flows_refused = 0  # matching flows not followed: the per-host or total cap was hit
        self.live: dict[Flow, Live] = {}  # live matching flows followed (bounded, see above)
        self._live_per_host: dict[str, int] = {}
        self._desired = DesiredMap(tag)  # kept up to date as activations change
        # detected traffic's origin: the source's link-layer address if known (the service
        # reads the neighbour table); asked only when a flow would create an activation
        self.origin_of: Callable[[IPAddress], str | None] | None = None
        self.max_activations = MAX_ACTIVATIONS
        self.max_detected = MAX_DETECTED
        self.max_hosts_per_origin = MAX_HOSTS_PER_ORIGIN
        self.max_unknown_hosts = MAX_UNKNOWN_HOSTS
        self._origins = OriginCounts()
        self.refused: collections.Counter[str] = collections.Counter()  # why, how many

    # --- inputs --------------------------------------------------------------------------------

    def wants(self, proto: Proto, port: int) -> bool:
        """A detector's prefilter: can a flow to ``port`` matter (a trigger or an opened port)?"""
        return bool(self.index.match(proto, port) or self.open_index.match(proto, port))

    def port_ranges(self) -> list[PortRange]:
        """Every port :meth:`wants` accepts (the rules' trigger and opened ports)."""
        return [rng for rule in self.rules.values() for rng in (*rule.trigger, *rule.open)]

    def on_flow(self, flow: Flow) -> list[Activation]:
        """A detector saw a new flow: a trigger flow (LAN host to a trigger port) creates or
        refreshes activations; one arriving from beyond the LAN on a port an activation holds
        is inbound use and refreshes that one. Both are followed while they live. Returns the
        activations it created."""
        self.flows_seen += 1
        return self._seen(flow, self.clock())

    def on_flow_live(self, flow: Flow, *, connected: bool,
                     idle: float | None = None) -> list[Activation]:
        """A detector's later look at a flow: still there; ``connected`` holds the activation
        while silent; ``idle`` (seconds since its last packet, when one went by since the last
        look) refreshes it. An unknown flow (one that began before the detector started) is
        taken as new. Returns the activations it created."""
        now = self.clock()
        live = self.live.get(flow)
        if live is None:
            if not connected and idle is None:
                return []
            # first look: as new, unless its last packet is already older than the timeout
            at = now if idle is None else now - max(0.0, idle)
            first = self._seen(flow, at)
            live = self.live.get(flow)
            if live is not None and live.connected != connected:
                self._set_connected(flow, live, connected, now)
            return first
        if live.muted:
            return []
        created: list[Activation] = []
        if idle is not None:
            at = now - max(0.0, idle)
            if live.trigger:
                if not live.acts:  # its activation lapsed; the flow woke up: it triggers again
                    return self._seen(flow, at)
                rules = self.index.match(flow.proto, flow.dport)
                created = self._observed(rules, live.host, Source.TRAFFIC, at=at, flow=flow)
            else:
                for act_id in live.acts:
                    act = self.activations.get(act_id)
                    if act is not None:
                        self._touch(act, at)
        if live.connected != connected:
            self._set_connected(flow, live, connected, now)
        return created

    def on_flow_ended(self, flow: Flow, *, closed: bool = False) -> None:
        """A followed flow is gone; ``closed`` (its endpoints closed it just now) counts as a
        packet now. When it was the last connection holding an activation, that activation's
        idle timer starts."""
        live = self.live.pop(flow, None)
        if live is None:
            return
        self._count_host(live.host, -1)
        now = self.clock()
        for act_id in live.acts:
            act = self.activations.get(act_id)
            if act is None:
                continue
            act.flows.discard(flow)
            if live.connected:
                act.holding -= 1
            if closed or live.connected:
                act.last_active = max(act.last_active, now)
            self._reschedule(act)

    def release_flows(self) -> int:
        """Forget every followed flow (their detector stopped: nobody will say when they end);
        the activations they held start their idle timers now. Returns how many."""
        flows = list(self.live)
        for flow in flows:
            self.on_flow_ended(flow)
        return len(flows)

    def follows(self, flow: Flow) -> bool:
        """Is this flow followed (a detector keeps looking at it)?"""
        return flow in self.live

    def _seen(self, flow: Flow, at: float) -> list[Activation]:
        rules = self.index.match(flow.proto, flow.dport)
        if rules and (is_lan_source(flow.src) or flow.src in self.local_hosts) \
                and is_remote_destination(flow.dst):
            self.flows_matched += 1
            refused = self.flows_refused
            created = self._observed(rules, str(flow.src), Source.TRAFFIC, at=at, flow=flow)
            if flow not in self.live and self.flows_refused == refused \
                    and any(r.allows(str(flow.src)) for r in rules):  # refused once is counted once
                self._follow(flow, None, str(flow.src), trigger=True)  # idle: may wake up
            return created
        if is_remote_destination(flow.src) and self.open_index.match(flow.proto, flow.dport):
            self._inbound(flow, at)
        return []

    def _inbound(self, flow: Flow, at: float) -> None:
        """A flow from beyond the LAN to an opened port: on a host, its destination is the LAN
        host; on a router, conntrack's original tuple names the router's own external address."""
        act = self.holder(MappingKey(flow.proto, flow.dport))
        if act is None or act.source is not Source.TRAFFIC:
            return
        if (is_lan_source(flow.dst) or flow.dst in self.local_hosts) and str(flow.dst) != act.host:
            return
        self.flows_inbound += 1
        self._touch(act, at)
        self._follow(flow, act, act.host, trigger=False)

    def _follow(self, flow: Flow, act: Activation | None, host: str, *, trigger: bool) -> None:
        live = self.live.get(flow)
        if live is None:
            if (len(self.live) >= MAX_FLOWS
                    or self._live_per_host.get(host, 0) >= MAX_FLOWS_PER_HOST):
                self.flows_refused += 1
                return
            live = self.live[flow] = Live(host, [], trigger)
            self._count_host(host, 1)
        if act is not None and act.id not in live.acts:
            live.acts.append(act.id)
            act.flows.add(flow)
            if live.connected:
                act.holding += 1
                self._reschedule(act)

    def _set_connected(self, flow: Flow, live: Live, connected: bool, now: float) -> None:
        live.connected = connected
        for act_id in live.acts:
            act = self.activations.get(act_id)
            if act is None:
                continue
            act.holding += 1 if connected else -1
            if not connected:
                act.last_active = max(act.last_active, now)
            self._reschedule(act)

    def _count_host(self, host: str, delta: int) -> None:
        n = self._live_per_host.get(host, 0) + delta
        if n > 0:
            self._live_per_host[host] = n
        else:
            self._live_per_host.pop(host, None)

    def on_process(self, names: Iterable[str], host: str) -> list[Activation]:
        """A detector saw processes with these names running on ``host`` (this machine).

        Rules naming one of them hold while they run, and lapse ``idle_timeout`` after the
        process was last seen. Returns the activations it created.
        """
        rules: list[Rule] = []
        for name in names:
            for rule in self.process_index.get(name.lower(), ()):
                if rule not in rules:
                    rules.append(rule)
        return self._observed(tuple(rules), host, Source.PROCESS) if rules else []

    def _observed(self, rules: tuple[Rule, ...], host: str, source: Source, *,
                  at: float | None = None, flow: Flow | None = None) -> list[Activation]:
        """Activity at ``at`` (default now) for ``rules``; ``flow`` is followed while it lives.
        Activity already older than the timeout creates nothing."""
        now = self.clock()
        at = now if at is None else min(at, now)
        created: list[Activation] = []
        for rule in rules:
            if not rule.allows(host):
                continue
            key = (rule.name, host, source)
            act_id = self._traffic.get(key)
            act = self.activations.get(act_id) if act_id else None
            if act is not None:
                act.hits += 1
                self._touch(act, at)
            elif at + rule.idle_timeout > now:
                origin = self._origin(host) if source is Source.TRAFFIC else ""
                why = self._detected_refusal(origin, host) if origin else None
                if why is None and len(self.activations) >= self.max_activations:
                    why = "total"
                if why is not None:
                    self.refused[why] += 1
                    continue
                act = self._add(rule, host, source, now, rule.idle_timeout, {}, origin=origin)
                act.last_active = at  # a packet dated before now (first look): its timer runs
                self._touch(act, at)  # from that packet, as on a followed flow's later looks
                self._traffic[key] = act.id
                created.append(act)
            else:
                continue
            if flow is not None:
                self._follow(flow, act, host, trigger=True)
        return created

    def _origin(self, host: str) -> str:
        addr = ipaddress.ip_address(host)
        if addr in self.local_hosts:
            return LOCAL_ORIGIN
        found = self.origin_of(addr) if self.origin_of is not None else None
        return found or UNKNOWN_ORIGIN

    def _detected_refusal(self, origin: str, host: str) -> str | None:
        return self._origins.refusal(origin, host, max_detected=self.max_detected,
                                     max_per_origin=self.max_hosts_per_origin,
                                     max_unknown=self.max_unknown_hosts)

    def activate(self, rule_name: str, host: str, *, ttl: float | None = None,
                 source: Source = Source.API, meta: dict[str, str] | None = None) -> Activation:
        """An explicit activation of ``rule_name`` for ``host`` (an IP address as text) for
        ``ttl`` seconds (default: the rule's ``idle_timeout``). Raises ``RuleNotFound``,
        ``UsageError`` (not an address; ttl outside 1s-7d), ``HostNotAllowed`` (the rule's
        ``hosts``) or ``ActivationLimit`` (``max_activations`` live)."""
        rule = self.rules.get(rule_name)
        if rule is None:
            raise RuleNotFound(rule_name, list(self.rules))
        _check_host(host)
        if not rule.allows(host):
            raise HostNotAllowed(f"rule {rule.name!r} does not allow host {host} (hosts = "
                                 f"{', '.join(str(n) for n in rule.hosts)})")
        ttl = rule.idle_timeout if ttl is None else ttl
        check_ttl(ttl)
        return self._add(rule, host, source, self.clock(), ttl, meta or {})

    def activate_adhoc(self, open_ports: tuple[PortRange, ...], host: str, *, ttl: float,
                       source: Source = Source.API,
                       meta: dict[str, str] | None = None) -> Activation:
        """Ports named by the request itself (``[api] allow_adhoc``; the caller checked the
        limits): a one-off rule ``adhoc:<id>`` that lives as long as this activation."""
        _check_host(host)
        if not open_ports:
            raise UsageError("an ad-hoc activation needs at least one port")
        check_ttl(ttl)
        rule = adhoc_rule(self._new_id(), open_ports, ttl)
        meta = {**(meta or {}), ADHOC_META: " ".join(str(r) for r in open_ports)}
        return self._add(rule, host, source, self.clock(), ttl, meta)

    def heartbeat(self, act_id: str, ttl: float | None = None) -> Activation:
        """Extend an activation by its ttl (or a new ``ttl``, seconds) from now. Raises
        ``ActivationNotFound`` or ``UsageError`` (ttl outside 1s-7d)."""
        act = self.get(act_id)
        if ttl is not None:
            check_ttl(ttl)
            act.ttl = ttl
        act.hits += 1
        self._set_expiry(act, self.clock() + act.ttl)
        return act

    def set_self_mapped(self, act_id: str, on: bool) -> Activation:
        """The activation's host maps its ports itself (``on``), or wants us to again."""
        act = self.get(act_id)
        if act.self_mapped != on:
            act.self_mapped = on
            self._desired.set_mapped(act)
            self.generation += 1
        return act

    def deactivate(self, act_id: str) -> Activation:
        """End an activation now (its flows stop re-triggering it). Raises
        ``ActivationNotFound``."""
        act = self.get(act_id)
        self._remove(act, EventKind.DEACTIVATED)
        return act

    def restore(self, act_id: str, rule_name: str, host: str, source: str, *, age: float,
                remaining: float, ttl: float, meta: dict[str, str],
                adhoc: Callable[[tuple[PortRange, ...]], bool] | None = None,
                held: bool = False) -> Activation | None:
        """Bring back an activation from the journal after a restart (None if it can't be).
        Ad-hoc ones come back only when ``adhoc`` still permits their ports.

        ``held``: it was held by a live connection when last journaled (the journal's expiry is
        infinite; ``remaining`` is ignored). It comes back held for at most ``ttl`` from now
        (``unproven``) until :meth:`settle_restored`: a flow detector's first look either finds
        the connection (held again) or not (it closes then, unless traffic was seen since).

        It never outlives what was asked: ``remaining`` (wall-clock seconds the journal says
        are left) is capped at ``ttl``, the longest it can have been since its last refresh,
        whatever the wall clock did meanwhile (behind at start, ahead, or a hostile row 20
        years ahead); a ``ttl`` outside 0-7d, or not finite, is not restored."""
        if held:
            remaining = ttl  # no evidence of activity yet: any packet seen is newer
        if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL and math.isfinite(remaining)):
            return None
        remaining = min(remaining, ttl)
        rule = self.rules.get(rule_name)
        if rule is None and adhoc is not None:
            front = source in FRONT_SOURCES  # front: FrontManager.attach decides, not [api]
            rule = restored_adhoc_rule(rule_name, meta, ttl, (lambda _: True) if front else adhoc)
        try:
            src = Source(source)
            ipaddress.ip_address(host)  # a row that is not what we wrote maps nowhere
        except ValueError:
            return None
        if rule is None or remaining <= 0 or act_id in self.activations or not rule.allows(host):
            return None
        if len(self.activations) >= self.max_activations:
            self.refused["total"] += 1
            return None
        now = self.clock()
        unproven = held and src in (Source.TRAFFIC, Source.PROCESS)
        act = Activation(id=act_id, rule=rule, host=host, source=src, created=now - max(0, age),
                         expires=now + remaining, ttl=ttl, seq=next(self._seq), meta=meta,
                         last_active=now + remaining - ttl - (ttl if unproven else 0.0),
                         journaled=math.inf if unproven else now + remaining,
                         unproven=unproven)
        if src in (Source.TRAFFIC, Source.PROCESS):
            self._traffic[(rule.name, host, src)] = act.id
        self._insert(act)
        return act

    def settle_restored(self) -> list[Activation]:
        """A flow detector listed every live flow (:class:`~igdtrigger.core.model.FlowsListed`): a
        restored activation held before the restart and not held again has lost its connection
        at some unknown time; it closes now, or ``idle_timeout`` after traffic seen since the
        restart. Returns the activations settled."""
        now = self.clock()
        settled = [a for a in self.activations.values() if a.unproven]
        for act in settled:
            act.unproven = False
            if not act.holding:
                self._set_expiry(act, min(act.expires,
                                          max(act.last_active + act.rule.idle_timeout, now)))
        return settled

    def get(self, act_id: str) -> Activation:
        """The live activation ``act_id``. Raises ``ActivationNotFound``."""
        act = self.activations.get(act_id)
        if act is None:
            raise ActivationNotFound(f"no activation with id {act_id!r} (it may have lapsed)")
        return act

    def expire(self) -> list[Activation]:
        """Remove every activation whose time is up. Returns them."""
        now = self.clock()
        gone: list[Activation] = []
        for act in self._timers.due(now):  # lazily: a removed one's later entries are skipped
            self._remove(act, EventKind.EXPIRED)
            gone.append(act)
        return gone

    def next_deadline(self) -> float | None:
        """When the next activation lapses (engine clock), or None."""
        return self._timers.next()

    # --- outputs -------------------------------------------------------------------------------

    def desired(self) -> dict[MappingKey, MappingSpec]:
        """The mappings that should exist now (a copy: ``{MappingKey: MappingSpec}``).

        A port two activations want goes to the oldest (first come, first served, as routers
        do it), except that under ``share = "latest"`` a rule's newest activation takes it from
        the same rule's older ones (never from another rule's). Kept up to date as activations
        change (see :mod:`igdtrigger.core.desired`): asking costs one dict copy.
        """
        return self._desired.snapshot()

    def holder(self, key: MappingKey) -> Activation | None:
        """The activation holding port ``key`` now (as :meth:`desired`, but counting those
        whose host maps its ports itself), or None."""
        return self._desired.owner(key)

    def waiting_for(self, act: Activation, desired: dict[MappingKey, MappingSpec]) -> set[str]:
        """Hosts that hold ports this activation wants (empty when it holds all of them)."""
        return waiting_for(act, desired)

    # --- internals -----------------------------------------------------------------------------

    def _add(
        self, rule: Rule, host: str, source: Source, now: float, ttl: float, meta: dict[str, str],
        *, origin: str = "",
    ) -> Activation:
        if len(self.activations) >= self.max_activations:
            self.refused["total"] += 1
            raise ActivationLimit(
                f"{len(self.activations)} activations are live, the service's limit; end some "
                "first")
        act = Activation(id=self._new_id(), rule=rule, host=host, source=source, created=now,
                         expires=now + ttl, ttl=ttl, seq=next(self._seq), meta=meta,
                         last_active=now, journaled=now + ttl, origin=origin)
        self._origins.add(origin, host)
        self._insert(act)
        self._emit(EventKind.ACTIVATED, act, now)
        return act

    def _insert(self, act: Activation) -> None:
        self.activations[act.id] = act
        self._timers.push(act)
        self._desired.add(act)
        self.generation += 1

    def _touch(self, act: Activation, at: float) -> None:
        """A packet (or process sighting) at ``at``: the idle timer restarts from there."""
        if at > act.last_active:
            act.last_active = at
        self._reschedule(act)

    def _reschedule(self, act: Activation) -> None:
        """Traffic and process activations: held (no expiry) while a live connection holds them,
        else ``idle_timeout`` after their last activity."""
        if act.source in (Source.TRAFFIC, Source.PROCESS):
            self._set_expiry(act, math.inf if act.holding > 0
                             else act.last_active + act.rule.idle_timeout)

    def _set_expiry(self, act: Activation, when: float) -> None:
        if when == act.expires:
            return
        act.expires = when
        # the journal hears of an earlier expiry, a hold starting or ending, and a later one
        # once it moved a quarter of the timeout: packets every second must not fsync every
        # second (after a crash an activation comes back with an expiry a little too early)
        if (when < act.journaled or math.inf in (when, act.journaled)
                or when - act.journaled >= max(1.0, act.ttl / 4)):
            act.journaled = when
            self.dirty.add(act.id)
        self._timers.push(act)  # held (inf): nothing to schedule (its heap entries go stale)

    def _remove(self, act: Activation, kind: EventKind) -> None:
        del self.activations[act.id]
        self._desired.remove(act)
        self._origins.remove(act.origin, act.host)
        if act.source in (Source.TRAFFIC, Source.PROCESS):
            self._traffic.pop((act.rule.name, act.host, act.source), None)
        for flow in act.flows:  # its flows stay followed: one that wakes up triggers again
            live = self.live.get(flow)
            if live is None:
                continue
            if act.id in live.acts:
                live.acts.remove(act.id)
            if kind is EventKind.DEACTIVATED:
                live.muted = True
            if not live.acts and not live.trigger:
                del self.live[flow]
                self._count_host(live.host, -1)
        act.flows.clear()
        act.holding = 0
        self.generation += 1
        self._emit(kind, act, self.clock())

    def _emit(self, kind: EventKind, act: Activation, now: float) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, act, now))
