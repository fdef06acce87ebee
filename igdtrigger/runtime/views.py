"""The JSON views the API serves (and the CLI client reads), as ``TypedDict``s, and how they
are made from the running service.

Also ``Tallies``: the counts ``/metrics`` reads at scrape time (a dataclass, not JSON).

Shapes: ``ActivationView`` (``POST/GET /api/v1/activations``), ``PortView`` (one of its ports),
``StatusView`` (``GET /api/v1/status``), ``DetectorView`` (one detector's status). Times are
seconds (floats); ``expires_in`` is ``None`` while a live connection holds the activation.
They live in ``runtime/`` because the façade answers with them (``Service.activate`` and
friends); ``api/`` and ``cli/`` import the shapes from here.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, cast

from igdtrigger.core.activation import Activation
from igdtrigger.core.model import MappingKey
from igdtrigger.core.version import __version__
from igdtrigger.runtime import compose
from igdtrigger.runtime.mapper import MapState
from igdtrigger.runtime.pinholes import PinholeState

if TYPE_CHECKING:
    from igdtrigger.runtime.detectors import DetectorStatus
    from igdtrigger.runtime.service import Service

__all__ = [
    "STATUS_ACTIVATIONS",
    "ActivationState",
    "ActivationView",
    "DetectorView",
    "HealthView",
    "PortView",
    "StatusView",
    "Tallies",
    "activation_view",
    "detector_view",
    "self_only_message",
    "status_view",
    "tallies",
]

STATUS_ACTIVATIONS = 200  # activations listed in status(); the API pages through the rest

ActivationState = Literal["open", "partial", "pending", "waiting", "failed", "self", "ended"]


class PortView(TypedDict):
    """One port of an activation: ``udp/40000``; ``state`` the mapping's (``active``,
    ``pending``, ``failed``, ``conflict``...), ``held`` (another host's activation has it) or
    ``self`` (the host maps it itself)."""

    port: str
    state: str
    held_by: NotRequired[str | None]
    external_port: NotRequired[int]
    error: NotRequired[str]


class ActivationView(TypedDict):
    """An activation as the API shows it."""

    id: str
    rule: str
    host: str
    source: str
    age: float
    expires_in: float | None
    hold: str
    live_flows: int
    ttl: float
    hits: int
    meta: NotRequired[dict[str, str]]
    self_mapped: NotRequired[bool]
    external_address: NotRequired[str]
    state: NotRequired[ActivationState]
    message: NotRequired[str]
    reason: NotRequired[str]
    held_by: NotRequired[list[str]]
    ports: NotRequired[list[PortView]]


class DetectorView(TypedDict):
    """A detector's status: ``active`` (it runs and can see what it is for), else ``reason``."""

    name: str
    active: bool
    reason: NotRequired[str]
    detail: NotRequired[str]
    events_seen: NotRequired[int]
    tracking: NotRequired[dict[str, Any]]


class HealthView(TypedDict):
    """``GET /healthz``: ``ok`` false (HTTP 503) names a dead or stuck scheduler in ``error``."""

    ok: bool
    gateway_up: bool
    version: str
    error: NotRequired[str]


class StatusView(TypedDict):
    """``GET /api/v1/status``: the whole state (``uptime`` s; ``counts`` totals)."""

    version: str
    uptime: float
    instance: str
    journal: dict[str, Any]
    gateway: dict[str, Any]
    detectors: list[DetectorView]
    rules: list[dict[str, Any]]
    activations: list[ActivationView]
    mappings: Any
    pinholes: Any
    counts: dict[str, Any]
    warnings: list[str]
    events: list[dict[str, Any]]
    api_connections: NotRequired[Any]
    front: NotRequired[dict[str, Any]]  # front: the IGD front (issue 14), when enabled


@dataclass(frozen=True, slots=True)
class Tallies:
    """The service's counts at one instant, for ``/metrics`` (which must not reach past the
    façade into the engine, mapper or pinhole keeper). Protocols are lower case (``tcp``,
    ``udp``); states are ``MapState``/``PinholeState`` values."""

    activations: collections.Counter[str]  # live activations by Source value (traffic, api, run)
    refused: collections.Counter[str]  # activations refused, by the bound that refused them
    mappings: collections.Counter[tuple[str, str]]  # (protocol, state) -> mappings held/wanted
    unconfirmed: int  # deletes the router has not confirmed yet (retried, journaled)
    pinholes: collections.Counter[tuple[str, str]]  # (protocol, state) -> IPv6 pinholes
    pinholes_available: bool  # the router takes pinholes from this machine (False: not asked yet)
    operations: dict[str, int]  # router operations done by the mapper, by kind ("errors" too)
    flows_seen: int  # new flows the detectors reported
    flows_matched: int  # ... that matched a trigger
    flows_inbound: int  # ... that arrived on a port an activation opened
    flows_refused: int  # matching flows not followed (a flow-table bound was reached)
    flows_live: int  # live matching flows followed now


def tallies(svc: Service) -> Tallies:
    """The counts ``Tallies`` holds, read from ``svc``'s pipeline now."""
    engine, mapper, keeper = svc.pipeline.engine, svc.pipeline.mapper, svc.pipeline.pinholes
    holes = keeper.held.values() if keeper is not None else ()
    return Tallies(
        activations=collections.Counter(a.source.value for a in engine.activations.values()),
        refused=collections.Counter(engine.refused),
        mappings=collections.Counter((a.spec.proto.value.lower(), a.state.value)
                                     for a in mapper.applied.values()),
        unconfirmed=len(mapper.orphans),
        pinholes=collections.Counter((h.spec.proto.value.lower(), h.state.value) for h in holes),
        pinholes_available=keeper is not None and keeper.available is True,
        operations=dict(mapper.ops),
        flows_seen=engine.flows_seen, flows_matched=engine.flows_matched,
        flows_inbound=engine.flows_inbound, flows_refused=engine.flows_refused,
        flows_live=len(engine.live))


def self_only_message(rule: str, host: str) -> str:
    """One line: why a router in secure mode refused a host's ports to this service, and the
    fix (README: the home-server section)."""
    return (f"the router only lets a host map ports to itself (UPnP secure mode): start the game "
            f"on {host} with `igdtrigger run --rule {rule} -- GAME` (it maps its own ports and "
            "reports back), or allow mappings for other hosts in the router's UPnP settings")



def activation_view(svc: Service, act: Activation, *, include_ports: bool = True,
                    ) -> ActivationView:
    """``act`` as the API shows it: the engine's fields, its ports' states on the router and
    the activation's overall ``state`` (``include_ports=False``: an ended one)."""
    now = svc.clock()
    out = cast(ActivationView, act.to_json(now))
    info = svc.gateway.info
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
    desired = svc.desired()
    waiting = svc.pipeline.engine.waiting_for(act, desired)
    ports: list[PortView] = []
    states: set[str] = set()
    self_only = False
    for rng in act.rule.open:
        for port in rng:
            key = MappingKey(rng.proto, port)
            spec = desired.get(key)
            app = svc.pipeline.mapper.applied.get(key)
            if spec is None or spec.internal_client != act.host:
                st = "held"
                entry: PortView = {"port": str(key), "state": st,
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


def status_view(svc: Service, *, max_activations: int = STATUS_ACTIVATIONS) -> StatusView:
    """The whole state; at most ``max_activations`` activations (the oldest; the rest are
    paged through ``GET /api/v1/activations``), their total in ``counts``."""
    info = svc.gateway.info
    now = svc.clock()
    engine, mapper, journal = svc.pipeline.engine, svc.pipeline.mapper, svc.pipeline.journal
    keeper = svc.pipeline.pinholes
    warnings: list[str] = []
    external_warning = info.external_warning() if info is not None else None
    if external_warning is not None:
        warnings.append(external_warning)
    for st in svc.detector_status:
        if not st.active and not st.reason.startswith(("standby", "no rule names")):
            warnings.append(f"detector {st.name} inactive: {st.reason}")
    if keeper is not None and keeper.reason and svc.desired_pinholes():
        warnings.append(f"IPv6 ports are not opened: {keeper.reason}")
    if len(engine.activations) > max_activations:
        warnings.append(f"{len(engine.activations)} activations: the first "
                        f"{max_activations} are listed here, page through all of them with "
                        "GET /api/v1/activations?limit=&cursor=")
    if engine.refused:
        warnings.append("activations refused by the service's bounds: " + ", ".join(
            f"{k} {v}" for k, v in sorted(engine.refused.items())))
    warnings.extend(f"still open on the router: {x.describe()}"
                    for x in mapper.left_open)
    if journal.degraded:
        warnings.append(f"state journal {journal.path} not writable "
                        f"({journal.degraded}): working from memory")
    return {
        "version": __version__,
        "uptime": round(now - svc.started, 3),
        "instance": svc.tag,
        "journal": {"path": str(journal.path), "degraded": journal.degraded or None,
                    "restored_activations": svc.restored,
                    "orphans_pending": len(mapper.orphans)},
        "gateway": {
            "up": mapper.gateway_up,
            "error": mapper.gateway_error or None,
            "protocol": info.protocol if info else None,
            "location": info.location if info else svc.config.gateway.url,
            "local_address": info.local_address if info else None,
            "external_address": info.external_address if info else None,
            "external_reachable": info.reachable_or_unknown if info else None,
            # the one service choice (gateway.soap.find_wan_service) and what it offers
            "backend": (info.backend or None) if info else None,
            "service_type": (info.service_type or None) if info else None,
            "control_url": (info.control_url or None) if info else None,
            "capabilities": sorted(svc.gateway.capabilities),
            "lease": mapper.lease,
            "permanent_leases": mapper.permanent_only,
            "permanent_why": mapper.traits.why_permanent or None,
            "learned": mapper.traits.to_json(),
            "left_open": [x.to_json() for x in mapper.left_open],
            "announcements": {
                "listening": svc.router_watch_listening,
                "restarts_seen": svc.router_announcements,
            },
        },
        "detectors": [detector_view(svc, d) for d in svc.detector_status],
        "rules": [r.to_json() for r in svc.config.rules],
        "activations": [
            activation_view(svc, a)
            for a in svc.sorted_activations()[:max_activations]
        ],
        "mappings": mapper.snapshot(),
        "pinholes": (keeper.status() if keeper is not None
                     else {"available": False, "reason": "gateway.ipv6_pinholes is off"}),
        "counts": {
            "activations": len(engine.activations),
            "mappings_active": mapper.count(MapState.ACTIVE),
            "pinholes_active": (keeper.count(PinholeState.ACTIVE)
                                if keeper is not None else 0),
            "activations_refused": dict(sorted(engine.refused.items())),
            "flows_seen": engine.flows_seen,
            "flows_matched": engine.flows_matched,
            "flows_inbound": engine.flows_inbound,
            "flows_live": len(engine.live),
            "flows_refused": engine.flows_refused,
            **{f"router_{k}": v for k, v in mapper.ops.items()},
        },
        "warnings": warnings,
        "events": list(svc.events)[-50:],
    }


def detector_view(svc: Service, st: DetectorStatus) -> DetectorView:
    """One detector's line in the status: whether it can see what it is for, and why not."""
    out: DetectorView = {"name": st.name, "active": st.active}
    if st.reason:
        out["reason"] = st.reason
    if st.detail:
        out["detail"] = st.detail
    det = next((d for d in svc.detectors if d.name == st.name), None)
    events = getattr(det, "events_seen", None)
    if isinstance(events, int):
        out["events_seen"] = events
    if st.name == "conntrack" and svc.tracking is not None:
        t = svc.tracking
        out["tracking"] = {"table": compose.tracking_table(), "enabled": t.enabled,
                           "loaded": t.installed,
                           "reason": t.reason or None, "reinstalls": t.reinstalls,
                           "trigger_flows_counted": svc.tracked_flows}
    return out
