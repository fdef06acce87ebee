"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Counters that happen between scrapes (router requests and their latency) are recorded here
through ``on_router_call``, the hook every gateway backend calls as ``(action, seconds, ok)``;
possibly from a worker thread, hence the lock. Everything else is read from the service at
scrape time, through the ``Service`` façade only (``Service.tallies``, ``gateway_info`` and its
other read-only accessors), so a scrape always agrees with ``/api/v1/status``.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import TYPE_CHECKING

from igdtrigger.core.version import __version__

if TYPE_CHECKING:
    from igdtrigger.api.httpguard import ConnectionGuard
    from igdtrigger.runtime.service import Service

__all__ = [
    "LATENCY_BUCKETS",
    "Metrics",
]

# router round trips: LAN routers answer in ms, slow ones in seconds
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Histogram:
    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.sum = 0.0
        self.total = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.total += 1


def _histogram(w: _Writer, name: str, hist: tuple[list[int], float, int], **labels: str) -> None:
    counts, total_sum, total = hist
    cumulative = 0
    for bound, n in zip(LATENCY_BUCKETS, counts, strict=True):
        cumulative += n
        w.sample(f"{name}_bucket", cumulative, **labels, le=repr(float(bound)))
    w.sample(f"{name}_bucket", total, **labels, le="+Inf")
    w.sample(f"{name}_sum", round(total_sum, 6), **labels)
    w.sample(f"{name}_count", total, **labels)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Metrics:
    """The ``/metrics`` collector: router-call and API-request histograms recorded as they happen
    (thread-safe), everything else read from the ``Service`` at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency: dict[str, _Histogram] = {}
        self._requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self._api: dict[str, _Histogram] = {}

    def on_api_request(self, route: str, seconds: float) -> None:
        """One API request handled (``route`` is "METHOD /path/{template}"): the time the
        service spent on it, router round trips it waited for included."""
        with self._lock:
            hist = self._api.get(route)
            if hist is None:
                hist = self._api[route] = _Histogram()
            hist.observe(seconds)

    def on_router_call(self, action: str, seconds: float, ok: bool) -> None:
        """The gateway's ``on_call`` hook."""
        with self._lock:
            hist = self._latency.get(action)
            if hist is None:
                hist = self._latency[action] = _Histogram()
            hist.observe(seconds)
            self._requests[(action, "ok" if ok else "error")] += 1

    def render(self, svc: Service, http_status: collections.Counter[int] | None = None,
               guard: ConnectionGuard | None = None) -> str:
        """The exposition text (format 0.0.4) for ``svc`` now; ``http_status`` (responses by status
        code) and ``guard`` (API connections) add their families when given."""
        w = _Writer()
        w.family("igdtrigger_info", "gauge", "Version and instance tag of this service.")
        w.sample("igdtrigger_info", 1, version=__version__, instance=svc.tag)
        w.family("igdtrigger_uptime_seconds", "gauge", "Seconds since the service started.")
        w.sample("igdtrigger_uptime_seconds", round(svc.clock() - svc.started, 3))

        info = svc.gateway_info
        counts = svc.tallies()
        w.family("igdtrigger_gateway_up", "gauge",
                 "1 when the router answers, 0 while it is down or not found yet.")
        w.sample("igdtrigger_gateway_up", 1 if svc.gateway_up else 0,
                 protocol=info.protocol if info else "")
        w.family("igdtrigger_external_address_public", "gauge",
                 "1 when the router's external address is public (no double NAT/CGNAT).")
        w.sample("igdtrigger_external_address_public",
                 1 if info is not None and info.external_reachable else 0)

        w.family("igdtrigger_activations", "gauge", "Live activations by what started them.")
        for source in sorted({"traffic", "api", "run", *counts.activations}):
            w.sample("igdtrigger_activations", counts.activations[source], source=source)

        w.family("igdtrigger_activations_refused_total", "counter",
                 "Activations refused by the service's bounds, by which bound.")
        for why in sorted({"total", "detected_total", "detected_per_origin", "per_host",
                           *counts.refused}):
            w.sample("igdtrigger_activations_refused_total", counts.refused[why], bound=why)

        by_map = counts.mappings
        w.family("igdtrigger_mappings", "gauge",
                 "Mappings this service holds or wants, by protocol and state.")
        for proto in ("tcp", "udp"):
            for state in ("active", "pending", "conflict", "failed"):
                w.sample("igdtrigger_mappings", by_map[(proto, state)], protocol=proto,
                         state=state)
        for (proto, state), n in sorted(by_map.items()):
            if state not in ("active", "pending", "conflict", "failed"):
                w.sample("igdtrigger_mappings", n, protocol=proto, state=state)

        w.family("igdtrigger_mappings_unconfirmed", "gauge",
                 "Mappings no longer wanted that the router may still hold (a delete refused, "
                 "unanswered, or answered but not done); retried, kept in the journal.")
        w.sample("igdtrigger_mappings_unconfirmed", counts.unconfirmed)

        w.family("igdtrigger_pinholes", "gauge",
                 "IPv6 pinholes this service holds or wants, by protocol and state.")
        by_hole = counts.pinholes
        for proto in ("tcp", "udp"):
            for state in ("active", "pending", "failed"):
                w.sample("igdtrigger_pinholes", by_hole[(proto, state)], protocol=proto,
                         state=state)
        w.family("igdtrigger_pinholes_available", "gauge",
                 "1 when the router takes IPv6 pinholes from this machine, 0 when it cannot "
                 "(see status: pinholes.reason) or has not been asked yet.")
        w.sample("igdtrigger_pinholes_available", 1 if counts.pinholes_available else 0)

        w.family("igdtrigger_mapping_operations_total", "counter",
                 "Router operations done by the mapper, by kind.")
        for op, n in sorted(counts.operations.items()):
            if op != "errors":
                w.sample("igdtrigger_mapping_operations_total", n, op=op)

        with self._lock:
            latency = {k: (list(h.counts), h.sum, h.total) for k, h in self._latency.items()}
            api = {k: (list(h.counts), h.sum, h.total) for k, h in self._api.items()}
            requests = dict(self._requests)
        w.family("igdtrigger_api_request_seconds", "histogram",
                 "Time the service took to answer an API request (waiting for the router "
                 "included), by route; the event stream is left out.")
        for route, hist in sorted(api.items()):
            _histogram(w, "igdtrigger_api_request_seconds", hist, route=route)
        w.family("igdtrigger_router_requests_total", "counter",
                 "Requests sent to the router, by action and result.")
        for (action, result), n in sorted(requests.items()):
            w.sample("igdtrigger_router_requests_total", n, action=action, result=result)
        w.family("igdtrigger_router_request_seconds", "histogram",
                 "Router request latency (one SOAP/miniupnpc call), by action.")
        for action, hist in sorted(latency.items()):
            _histogram(w, "igdtrigger_router_request_seconds", hist, action=action)

        errors: collections.Counter[str] = collections.Counter(svc.error_counts)
        errors["router_request"] = sum(n for (_, r), n in requests.items() if r == "error")
        errors["mapper"] = counts.operations.get("errors", 0)
        w.family("igdtrigger_errors_total", "counter",
                 "Errors by kind: failed router requests, mapping conflicts and failures, "
                 "mapper errors.")
        for kind in sorted({"mapping_conflict", "mapping_failed", *errors}):
            w.sample("igdtrigger_errors_total", errors[kind], kind=kind)

        w.family("igdtrigger_detector_active", "gauge",
                 "1 for each detector that runs and can see what it is for (conntrack: the "
                 "kernel tracks the trigger flows).")
        for det in svc.detector_status:
            w.sample("igdtrigger_detector_active", 1 if det.active else 0, detector=det.name)
        if svc.tracking is not None:
            w.family("igdtrigger_tracking_table_loaded", "gauge",
                     "1 while nftables table inet igdtrigger (the kernel tracks trigger flows) "
                     "is loaded.")
            w.sample("igdtrigger_tracking_table_loaded", 1 if svc.tracking.installed else 0)
        w.family("igdtrigger_flows_total", "counter",
                 "New flows seen by the detectors, those matching a trigger, those arriving on "
                 "an opened port (inbound use), and matching ones not followed (cap reached).")
        w.sample("igdtrigger_flows_total", counts.flows_seen, result="seen")
        w.sample("igdtrigger_flows_total", counts.flows_matched, result="matched")
        w.sample("igdtrigger_flows_total", counts.flows_inbound, result="inbound")
        w.sample("igdtrigger_flows_total", counts.flows_refused, result="refused")
        if svc.front_status is not None:  # front: the IGD front's answers (issue 14)
            front = svc.front_status()
            w.family("igdtrigger_front_requests_total", "counter",
                     "IGD front client mapping requests: granted, or refused and why.")
            for result, n in [("granted", front["granted"]), *sorted(front["refused"].items())]:
                w.sample("igdtrigger_front_requests_total", n, result=result)
        w.family("igdtrigger_flows_live", "gauge",
                 "Live matching flows followed: they hold their activations.")
        w.sample("igdtrigger_flows_live", counts.flows_live)
        w.family("igdtrigger_events_total", "counter", "Activation and mapping events published.")
        w.sample("igdtrigger_events_total", svc.hub.published)
        w.family("igdtrigger_event_streams", "gauge", "Open server-sent event streams.")
        w.sample("igdtrigger_event_streams", len(svc.hub.subscribers))
        if guard is not None:
            w.family("igdtrigger_api_connections", "gauge",
                     "Open API connections: from this machine (local) or the network (remote).")
            w.sample("igdtrigger_api_connections", guard.local, origin="local")
            w.sample("igdtrigger_api_connections", guard.remote, origin="remote")
            w.family("igdtrigger_api_connections_refused_total", "counter",
                     "API connections closed at once because a limit was reached.")
            for why in ("per_client", "total", "local", "descriptors"):
                w.sample("igdtrigger_api_connections_refused_total", guard.refused[why],
                         limit=why)
        if http_status is not None:
            w.family("igdtrigger_http_responses_total", "counter",
                     "API responses by HTTP status code.")
            for code, n in sorted(http_status.items()):
                w.sample("igdtrigger_http_responses_total", n, code=str(code))
        return w.text()
