"""Trigger logic: rules, activations and their timers. Pure: no sockets, no sleeps.

The engine is fed flows (from detectors) and explicit requests (API, wrapper), asked to expire
what has lapsed at a given time, and asked which mappings should exist now. Time comes from an
injected clock so every behaviour is unit-testable with a fake one.

Semantics (router-style port triggering):
- A flow from a LAN host to a trigger port of rule R creates (or refreshes) the activation
  (R, host, traffic), which lapses ``idle_timeout`` after the last matching flow.
- An explicit activation lives for its ``ttl``; a heartbeat extends it by its ttl again.
- Ports are owned first come, first served: when two activations want the same external port for
  different hosts, the older one keeps it; the younger one waits and takes over when it lapses.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import ADHOC_PREFIX, Rule
from .errors import ActivationNotFound, HostNotAllowed, RuleNotFound, UsageError
from .model import Flow, IPAddress, MappingKey, MappingSpec, PortRange, Proto, parse_port_spec

Clock = Callable[[], float]
MAX_TTL = 7 * 86400.0
_BIG_RANGE = 4096  # ranges wider than this are scanned instead of indexed port by port
_SPEC_CACHE_MAX = 256  # an activation keeps its mapping specs when its rule opens at most this many
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class Source(enum.StrEnum):
    TRAFFIC = "traffic"
    PROCESS = "process"
    API = "api"
    RUN = "run"


class EventKind(enum.StrEnum):
    ACTIVATED = "activated"
    EXPIRED = "expired"
    DEACTIVATED = "deactivated"


@dataclass(slots=True)
class Activation:
    id: str
    rule: Rule
    host: str
    source: Source
    created: float
    expires: float
    ttl: float
    hits: int = 1
    seq: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    # the host maps these ports itself (a router in secure mode refused them to us; ``run`` on
    # that host reported it): the activation stays (status, dashboard) but wants no mapping
    self_mapped: bool = False
    # the mappings it wants, built once by Engine.desired() (rule, host and tag never change)
    specs: tuple[tuple[MappingKey, MappingSpec], ...] | None = field(
        default=None, repr=False, compare=False)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule.name,
            "host": self.host,
            "source": self.source.value,
            "age": round(now - self.created, 3),
            "expires_in": round(max(0.0, self.expires - now), 3),
            "ttl": self.ttl,
            "hits": self.hits,
            **({"meta": dict(self.meta)} if self.meta else {}),
            **({"self_mapped": True} if self.self_mapped else {}),
        }


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    activation: Activation
    at: float


ADHOC_META = "adhoc_open"  # an ad-hoc activation's ports, kept in its meta (and the journal)


def adhoc_rule(ident: str, open_ports: tuple[PortRange, ...], ttl: float) -> Rule:
    return Rule(name=f"{ADHOC_PREFIX}{ident}", trigger=(), open=open_ports, idle_timeout=ttl)


def description_for(rule: str, tag: str) -> str:
    """The router-visible description that marks a mapping as ours: ``igdtrigger <rule> <tag>``."""
    return f"igdtrigger {rule} {tag}"


def owned_by(description: str, tag: str) -> str | None:
    """The rule name if ``description`` is one of ours (same instance tag), else ``None``."""
    parts = description.strip().split(" ")
    if len(parts) == 3 and parts[0] == "igdtrigger" and parts[2] == tag:
        return parts[1]
    return None


def is_lan_source(addr: IPAddress) -> bool:
    return (addr.is_private or addr.is_link_local) and not (
        addr.is_loopback or addr.is_unspecified or addr.is_multicast
    )


def is_remote_destination(addr: IPAddress) -> bool:
    """A destination beyond the LAN: not private, loopback, link-local, multicast or broadcast."""
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local:
        return False
    if isinstance(addr, ipaddress.IPv4Address) and addr == _BROADCAST:
        return False
    return not addr.is_private


class RuleIndex:
    """Maps (protocol, destination port) to the rules it triggers: a dict lookup per flow."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._exact: dict[tuple[Proto, int], tuple[Rule, ...]] = {}
        self._wide: list[tuple[Proto, int, int, Rule]] = []
        for rule in rules:
            for rng in rule.trigger:
                if len(rng) > _BIG_RANGE:
                    self._wide.append((rng.proto, rng.first, rng.last, rule))
                    continue
                for port in rng:
                    key = (rng.proto, port)
                    have = self._exact.get(key, ())
                    if rule not in have:
                        self._exact[key] = (*have, rule)

    def match(self, proto: Proto, port: int) -> tuple[Rule, ...]:
        found = self._exact.get((proto, port), ())
        if self._wide:
            extra = tuple(
                r for p, a, b, r in self._wide if p is proto and a <= port <= b and r not in found
            )
            if extra:
                return found + extra
        return found


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
        self.process_index: dict[str, tuple[Rule, ...]] = {}
        for rule in self.rules.values():
            for name in rule.process:
                key = name.lower()
                self.process_index[key] = (*self.process_index.get(key, ()), rule)
        self.clock = clock
        self.tag = tag
        self.on_event = on_event
        self._new_id = id_factory or (lambda: secrets.token_hex(6))
        self.local_hosts = {ipaddress.ip_address(h) for h in local_hosts}
        self.activations: dict[str, Activation] = {}
        self._traffic: dict[tuple[str, str, Source], str] = {}  # (rule, host, src) -> act id
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.generation = 0  # bumped whenever the desired mapping set may have changed
        self.dirty: set[str] = set()  # activations whose expiry moved (for the journal)
        self.flows_seen = 0
        self.flows_matched = 0

    # --- inputs --------------------------------------------------------------------------------

    def on_flow(self, flow: Flow) -> list[Activation]:
        """A detector saw a new outbound flow. Returns the activations it created."""
        self.flows_seen += 1
        rules = self.index.match(flow.proto, flow.dport)
        if not rules:
            return []
        if not (is_lan_source(flow.src) or flow.src in self.local_hosts):
            return []
        if not is_remote_destination(flow.dst):
            return []
        self.flows_matched += 1
        return self._observed(rules, str(flow.src), Source.TRAFFIC)

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

    def _observed(self, rules: tuple[Rule, ...], host: str, source: Source) -> list[Activation]:
        now = self.clock()
        created: list[Activation] = []
        for rule in rules:
            if not rule.allows(host):
                continue
            key = (rule.name, host, source)
            act_id = self._traffic.get(key)
            act = self.activations.get(act_id) if act_id else None
            if act is not None:
                act.hits += 1
                self._set_expiry(act, now + rule.idle_timeout)
                continue
            act = self._add(rule, host, source, now, rule.idle_timeout, {})
            self._traffic[key] = act.id
            created.append(act)
        return created

    def activate(
        self,
        rule_name: str,
        host: str,
        *,
        ttl: float | None = None,
        source: Source = Source.API,
        meta: dict[str, str] | None = None,
    ) -> Activation:
        rule = self.rules.get(rule_name)
        if rule is None:
            raise RuleNotFound(rule_name, list(self.rules))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"host {host!r} is not an IP address") from None
        if not rule.allows(host):
            raise HostNotAllowed(
                f"rule {rule.name!r} does not allow host {host} (hosts = "
                f"{', '.join(str(n) for n in rule.hosts)})"
            )
        ttl = rule.idle_timeout if ttl is None else ttl
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"ttl {ttl:g}s is outside 1s-7d")
        return self._add(rule, host, source, self.clock(), ttl, meta or {})

    def activate_adhoc(
        self,
        open_ports: tuple[PortRange, ...],
        host: str,
        *,
        ttl: float,
        source: Source = Source.API,
        meta: dict[str, str] | None = None,
    ) -> Activation:
        """Ports named by the request itself (``[api] allow_adhoc``; the caller checked the
        limits): a one-off rule ``adhoc:<id>`` that lives as long as this activation."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"host {host!r} is not an IP address") from None
        if not open_ports:
            raise UsageError("an ad-hoc activation needs at least one port")
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"ttl {ttl:g}s is outside 1s-7d")
        rule = adhoc_rule(self._new_id(), open_ports, ttl)
        meta = {**(meta or {}), ADHOC_META: " ".join(str(r) for r in open_ports)}
        return self._add(rule, host, source, self.clock(), ttl, meta)

    def heartbeat(self, act_id: str, ttl: float | None = None) -> Activation:
        act = self.get(act_id)
        if ttl is not None:
            if not 0 < ttl <= MAX_TTL:
                raise UsageError(f"ttl {ttl:g}s is outside 1s-7d")
            act.ttl = ttl
        act.hits += 1
        self._set_expiry(act, self.clock() + act.ttl)
        return act

    def set_self_mapped(self, act_id: str, on: bool) -> Activation:
        """The activation's host maps its ports itself (``on``), or wants us to again."""
        act = self.get(act_id)
        if act.self_mapped != on:
            act.self_mapped = on
            self.generation += 1
        return act

    def deactivate(self, act_id: str) -> Activation:
        act = self.get(act_id)
        self._remove(act, EventKind.DEACTIVATED)
        return act

    def restore(self, act_id: str, rule_name: str, host: str, source: str, *, age: float,
                remaining: float, ttl: float, meta: dict[str, str],
                adhoc: Callable[[tuple[PortRange, ...]], bool] | None = None,
                ) -> Activation | None:
        """Bring back an activation from the journal after a restart (None if it can't be).
        Ad-hoc ones come back only when ``adhoc`` still permits their ports."""
        rule = self.rules.get(rule_name)
        if rule is None and rule_name.startswith(ADHOC_PREFIX) and adhoc is not None:
            try:
                ports = tuple(r for spec in meta.get(ADHOC_META, "").split()
                              for r in parse_port_spec(spec))
            except ValueError:
                ports = ()
            if ports and adhoc(ports):
                rule = adhoc_rule(rule_name[len(ADHOC_PREFIX):], ports, ttl)
        try:
            src = Source(source)
        except ValueError:
            return None
        if rule is None or remaining <= 0 or act_id in self.activations or not rule.allows(host):
            return None
        now = self.clock()
        act = Activation(id=act_id, rule=rule, host=host, source=src, created=now - max(0, age),
                         expires=now + remaining, ttl=ttl, seq=next(self._seq), meta=meta)
        self.activations[act.id] = act
        if src in (Source.TRAFFIC, Source.PROCESS):
            self._traffic[(rule.name, host, src)] = act.id
        heapq.heappush(self._heap, (act.expires, act.seq, act.id))
        self.generation += 1
        return act

    def get(self, act_id: str) -> Activation:
        act = self.activations.get(act_id)
        if act is None:
            raise ActivationNotFound(f"no activation with id {act_id!r} (it may have lapsed)")
        return act

    def expire(self) -> list[Activation]:
        """Remove every activation whose time is up. Returns them."""
        now = self.clock()
        gone: list[Activation] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, act_id = heapq.heappop(self._heap)
            act = self.activations.get(act_id)
            if act is not None and act.expires <= now:
                self._remove(act, EventKind.EXPIRED)
                gone.append(act)
        return gone

    def next_deadline(self) -> float | None:
        while self._heap:
            when, _, act_id = self._heap[0]
            act = self.activations.get(act_id)
            if act is not None and act.expires == when:
                return when
            heapq.heappop(self._heap)  # stale entry from a refresh or removal
        return None

    # --- outputs -------------------------------------------------------------------------------

    def desired(self) -> dict[MappingKey, MappingSpec]:
        """The mappings that should exist now.

        A port two hosts want goes to the oldest activation (``share = "first"``, as routers
        do it) or to the newest (``share = "latest"``).
        """
        out: dict[MappingKey, MappingSpec] = {}
        for act in sorted(self.activations.values(), key=self._precedence):
            if act.self_mapped:
                continue
            specs = act.specs
            if specs is None:
                specs = self._specs(act)
                if act.rule.port_count() <= _SPEC_CACHE_MAX:
                    act.specs = specs
            for key, spec in specs:
                if key not in out:
                    out[key] = spec
        return out

    def _specs(self, act: Activation) -> tuple[tuple[MappingKey, MappingSpec], ...]:
        rule = act.rule
        description = description_for(rule.name, self.tag)
        external_any = rule.external == "any"
        return tuple(
            (MappingKey(rng.proto, port),
             MappingSpec(proto=rng.proto, external_port=port, internal_client=act.host,
                         internal_port=port, description=description, external_any=external_any))
            for rng in rule.open
            for port in rng
        )

    @staticmethod
    def _precedence(act: Activation) -> tuple[int, float, int]:
        if act.rule.share == "latest":
            return (0, -act.created, -act.seq)
        return (1, act.created, act.seq)

    def waiting_for(self, act: Activation, desired: dict[MappingKey, MappingSpec]) -> set[str]:
        """Hosts that hold ports this activation wants (empty when it holds all of them)."""
        holders: set[str] = set()
        for rng in act.rule.open:
            for port in rng:
                spec = desired.get(MappingKey(rng.proto, port))
                if spec is not None and spec.internal_client != act.host:
                    holders.add(spec.internal_client)
        return holders

    # --- internals -----------------------------------------------------------------------------

    def _add(
        self, rule: Rule, host: str, source: Source, now: float, ttl: float, meta: dict[str, str]
    ) -> Activation:
        act = Activation(
            id=self._new_id(),
            rule=rule,
            host=host,
            source=source,
            created=now,
            expires=now + ttl,
            ttl=ttl,
            seq=next(self._seq),
            meta=meta,
        )
        self.activations[act.id] = act
        heapq.heappush(self._heap, (act.expires, act.seq, act.id))
        self.generation += 1
        self._emit(EventKind.ACTIVATED, act, now)
        return act

    def _set_expiry(self, act: Activation, when: float) -> None:
        if when == act.expires:
            return
        act.expires = when
        self.dirty.add(act.id)
        heapq.heappush(self._heap, (when, act.seq, act.id))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self.activations):
            self._heap = [(a.expires, a.seq, a.id) for a in self.activations.values()]
            heapq.heapify(self._heap)

    def _remove(self, act: Activation, kind: EventKind) -> None:
        del self.activations[act.id]
        if act.source in (Source.TRAFFIC, Source.PROCESS):
            self._traffic.pop((act.rule.name, act.host, act.source), None)
        self.generation += 1
        self._emit(kind, act, self.clock())

    def _emit(self, kind: EventKind, act: Activation, now: float) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, act, now))
