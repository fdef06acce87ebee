"""Activations: one rule held open for one host, why, and until when; the events the engine
emits about them; and the router-visible description that marks a mapping as ours. Pure."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from igdtrigger.core.errors import UsageError
from igdtrigger.core.model import MAX_TTL, Flow, PortRange, format_duration, parse_port_spec
from igdtrigger.core.rules import ADHOC_PREFIX, Rule

__all__ = [
    "ADHOC_META",
    "FRONT_SOURCES",
    "FRONT_TARGET",
    "MAX_TTL",
    "MIN_TTL",
    "PROCESS_RUNNING_WITHIN",
    "Activation",
    "Clock",
    "Event",
    "EventKind",
    "Source",
    "adhoc_rule",
    "check_ttl",
    "description_for",
    "mapping_target",
    "owned_by",
    "restored_adhoc_rule",
]

Clock = Callable[[], float]
MIN_TTL = 1.0  # a mapping asked for less than a second is over before the router answers
PROCESS_RUNNING_WITHIN = 5.0  # s: a process seen this recently is reported as running


def check_ttl(ttl: float) -> None:
    """Raises ``UsageError`` unless ``ttl`` (seconds) is within 1s-7d (``nan``/``inf`` are not)."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise UsageError(f"ttl {ttl:g}s is outside 1s-7d")


class Source(enum.StrEnum):
    """What started an activation: detected ``traffic``, a running ``process``, an ``api`` request,
    or ``igdtrigger run`` (``run``)."""

    TRAFFIC = "traffic"
    PROCESS = "process"
    API = "api"
    RUN = "run"
    # front: a LAN client's UPnP IGD / NAT-PMP / PCP request (igdtrigger/front, issue 14)
    UPNP = "upnp"
    NATPMP = "natpmp"
    PCP = "pcp"


FRONT_SOURCES = frozenset({Source.UPNP, Source.NATPMP, Source.PCP})  # front:
FRONT_TARGET = "front_target"  # front: meta "<internal client> <internal port>" of its one port


class EventKind(enum.StrEnum):
    """What happened to an activation (``Event.kind``); the engine's ``on_event`` hook and the
    event stream carry it."""

    ACTIVATED = "activated"
    EXPIRED = "expired"
    DEACTIVATED = "deactivated"


@dataclass(slots=True)
class Activation:
    """One live trigger of ``rule`` for ``host`` (an IP address). Times are the engine's clock in
    seconds: ``expires`` is ``inf`` while a live connection holds it (``held``); ``ttl`` is how
    long a heartbeat or trigger packet extends it; ``hits`` counts its triggers and refreshes;
    ``seq`` orders activations by creation."""

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
    last_active: float = 0.0  # engine clock: its last trigger/inbound packet or process sighting
    flows: set[Flow] = field(default_factory=set, repr=False, compare=False)  # live, followed
    holding: int = 0  # how many of ``flows`` are connections that hold it while silent
    journaled: float = 0.0  # the expiry last handed to the journal (see Engine._set_expiry)
    origin: str = ""  # detected traffic: where the flow came from (see MAX_HOSTS_PER_ORIGIN)
    # the host maps these ports itself (a router in secure mode refused them to us; ``run`` on
    # that host reported it): the activation stays (status, dashboard) but wants no mapping
    self_mapped: bool = False
    # restored after a restart as held by a connection: held (at most one timeout from the
    # restart) until a flow detector's first look shows whether that connection still lives
    unproven: bool = False

    @property
    def held(self) -> bool:
        """True while a live connection holds it: it cannot lapse until that ends."""
        return self.expires == math.inf

    def hold_reason(self, now: float) -> str:
        """Why it is open now, for a person: "2 live flows", "traffic 3s ago", "process
        running", "API, 12m left"."""
        if self.source not in (Source.TRAFFIC, Source.PROCESS):  # API, run, front: timed
            label = "API" if self.source is Source.API else self.source.value
            return f"{label}, {format_duration(self.expires - now)} left"
        if self.unproven and not self.holding:
            return (f"held before the restart, looking for its connection "
                    f"({format_duration(self.expires - now)} left at most)")
        if self.source is Source.PROCESS:  # the process detector looks every second or so
            since = now - self.last_active
            return ("process running" if since <= PROCESS_RUNNING_WITHIN
                    else f"process last seen {format_duration(since)} ago")
        n = len(self.flows)
        if self.holding:
            return f"{n} live flow{'s' if n != 1 else ''}"
        ago = f"traffic {format_duration(now - self.last_active)} ago"
        return f"{ago}, {n} live flow{'s' if n != 1 else ''}" if n else ago

    def to_json(self, now: float) -> dict[str, Any]:
        """The activation as ``GET /api/v1/activations`` shows it, ``now`` on the engine's clock:
        ``age`` and ``expires_in`` in seconds (``expires_in`` ``None`` while held), ``hold`` the
        reason in words."""
        return {
            "id": self.id,
            "rule": self.rule.name,
            "host": self.host,
            "source": self.source.value,
            "age": round(now - self.created, 3),
            # seconds until it closes if nothing changes; None while a live connection holds it
            "expires_in": None if self.held else round(max(0.0, self.expires - now), 3),
            "hold": self.hold_reason(now),
            "live_flows": len(self.flows),
            "ttl": self.ttl,
            "hits": self.hits,
            **({"meta": dict(self.meta)} if self.meta else {}),
            **({"self_mapped": True} if self.self_mapped else {}),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """``activation`` went ``kind`` (activated, expired, deactivated) at ``at`` (engine clock,
    seconds)."""

    kind: EventKind
    activation: Activation
    at: float


ADHOC_META = "adhoc_open"  # an ad-hoc activation's ports, kept in its meta (and the journal)


def adhoc_rule(ident: str, open_ports: tuple[PortRange, ...], ttl: float) -> Rule:
    """The one-off rule of an ad-hoc activation: named ``adhoc:<ident>``, no trigger, opening
    ``open_ports`` with ``ttl`` seconds as its idle timeout."""
    return Rule(name=f"{ADHOC_PREFIX}{ident}", trigger=(), open=open_ports, idle_timeout=ttl)


def restored_adhoc_rule(rule_name: str, meta: dict[str, str], ttl: float,
                        permits: Callable[[tuple[PortRange, ...]], bool]) -> Rule | None:
    """The one-off rule of an ad-hoc activation read back from the journal (its ports are in
    ``meta[ADHOC_META]``), or None: not an ad-hoc name, unreadable ports, or ports ``permits``
    no longer allows."""
    if not rule_name.startswith(ADHOC_PREFIX):
        return None
    try:
        ports = tuple(r for spec in meta.get(ADHOC_META, "").split()
                      for r in parse_port_spec(spec))
    except ValueError:
        return None
    if not ports or not permits(ports):
        return None
    return adhoc_rule(rule_name[len(ADHOC_PREFIX):], ports, ttl)


def mapping_target(act: Activation, port: int) -> tuple[str, int]:
    """Where ``act``'s mapping of external ``port`` points: its host and the same port, or
    for a front client's mapping the target in ``meta[FRONT_TARGET]`` (front: issue 14)."""
    client, _, iport = act.meta.get(FRONT_TARGET, "").partition(" ")
    return (client, int(iport)) if iport.isdecimal() else (act.host, port)


def description_for(rule: str, tag: str) -> str:
    """The router-visible description that marks a mapping as ours: ``igdtrigger <rule> <tag>``."""
    return f"igdtrigger {rule} {tag}"


def owned_by(description: str, tag: str) -> str | None:
    """The rule name if ``description`` is one of ours (same instance tag), else ``None``."""
    parts = description.strip().split(" ")
    if len(parts) == 3 and parts[0] == "igdtrigger" and parts[2] == tag:
        return parts[1]
    return None
