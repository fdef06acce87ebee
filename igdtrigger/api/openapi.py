"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json``, written by hand.

``tests/test_api_openapi.py`` walks the application's routes and checks that every route and
method is documented here, with the same access class (``x-access``), and that every documented
operation exists.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "API_PREFIX", "build_openapi",
]

API_PREFIX = "/api/v1"

_ACCESS_TEXT = {
    "public": "Anyone who can connect.",
    "read": "Loopback clients, the admin token (or the local admin socket), or LAN clients "
            "when `[api] public_read = true`; else 401 (403 from outside the LAN).",
    "act": "LAN clients (`[api] allow`, else the listening interface's networks; others need "
           "the admin token: 403), under the own-address rule: without the admin token a "
           "client acts only for its own address (loopback: this host) and only on its own "
           "activations (403); one live activation per rule and host (asking again refreshes "
           "it) and at most `[api] max_per_host` in all (429).",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_ERRORS_COMMON = {"429": _err("Rate limit exceeded; see Retry-After")}
_ERRORS_READ = {**_ERRORS_COMMON, "401": _err("Needs the admin token or public_read"),
                "403": _err("Host header not this service (DNS-rebinding protection), or a "
                            "client outside the LAN without the admin token")}
_ERRORS_ACT = {**_ERRORS_COMMON,
               "403": _err("Another host's activation, cross-site, or a client outside the "
                           "LAN without the admin token"),
               "400": _err("Malformed request")}
_PAGE_PARAMS = [
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 500},
     "description": "activations per page"},
    {"name": "cursor", "in": "query", "required": False,
     "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"},
     "description": "`next_cursor` of the previous page (absent: the first page)"},
]


def _op(summary: str, access: str, responses: dict[str, Any], *, op_id: str,
        body: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None,
        errors: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "description": _ACCESS_TEXT[access],
        "x-access": access,
        "responses": {**responses, **(errors or {})},
    }
    if access != "public":
        op["security"] = [{}, {"bearer": []}]
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
       "description": "Activation id"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["status", "message"],
                                 "properties": {"status": {"type": "integer"},
                                                "message": {"type": "string"}}}},
    },
    "Detector": {
        "type": "object", "required": ["name", "active"],
        "description": "active: it runs and can see what it is for (conntrack: the kernel "
                       "tracks the trigger flows, or events were seen); else reason says why",
        "properties": {
            "name": {"type": "string", "enum": ["conntrack", "sockets", "process"]},
            "active": {"type": "boolean"},
            "reason": {"type": "string"},
            "detail": {"type": "string", "description": "what an active one's claim rests on"},
            "events_seen": {"type": "integer", "description": "conntrack events received"},
            "tracking": {
                "type": "object",
                "description": "conntrack: the nftables table that makes the kernel track "
                               "trigger flows",
                "properties": {
                    "table": {"type": "string"},
                    "enabled": {"type": "boolean"},
                    "loaded": {"type": "boolean"},
                    "reason": {"type": ["string", "null"]},
                    "reinstalls": {"type": "integer"},
                    "trigger_flows_counted": {"type": ["integer", "null"]},
                },
            },
        },
    },
    "Rule": {
        "type": "object", "required": ["name", "trigger", "open", "idle_timeout"],
        "properties": {
            "name": {"type": "string"},
            "trigger": {"type": "array", "items": {"type": "string"},
                        "description": "outbound PROTO/PORT[-PORT] that activate the rule"},
            "open": {"type": "array", "items": {"type": "string"},
                     "description": "inbound PROTO/PORT[-PORT] forwarded while it holds"},
            "idle_timeout": {"type": "number", "description": "seconds"},
        },
    },
    "Port": {
        "type": "object", "required": ["port", "state"],
        "properties": {
            "port": {"type": "string", "example": "udp/40000"},
            "state": {"enum": ["active", "pending", "held", "conflict", "failed", "self"]},
            "held_by": {"type": ["string", "null"]},
            "external_port": {"type": "integer"},
            "error": {"type": "string"},
        },
    },
    "Activation": {
        "type": "object", "required": ["id", "rule", "host", "state"],
        "properties": {
            "id": {"type": "string"},
            "rule": {"type": "string"},
            "host": {"type": "string", "description": "LAN address the ports go to"},
            "source": {"enum": ["traffic", "process", "api", "run"]},
            "state": {"enum": ["open", "partial", "pending", "waiting", "failed", "ended",
                               "self"],
                      "description": "self: the host maps its ports itself (secure mode)"},
            "ttl": {"type": "number"},
            "expires_in": {"type": ["number", "null"],
                           "description": "seconds until it closes if nothing changes; null "
                                          "while a live connection holds it"},
            "hold": {"type": "string",
                     "description": "why it is open now: '2 live flows', 'traffic 3s ago', "
                                    "'process running', 'API, 12m left'"},
            "live_flows": {"type": "integer",
                           "description": "live trigger and inbound flows it follows"},
            "held_by": {"type": "array", "items": {"type": "string"}},
            "external_address": {"type": "string",
                                 "description": "the router's external address, when known"},
            "reason": {"enum": ["router_self_only"],
                       "description": "why ports failed: router_self_only = the router only "
                                      "lets a host map ports to itself (secure mode)"},
            "message": {"type": "string", "description": "that reason and its fix, one line"},
            "self_mapped": {"type": "boolean"},
            "ports": {"type": "array", "items": _ref("Port")},
        },
    },
    "ActivationRequest": {
        "type": "object", "additionalProperties": False,
        "oneOf": [{"required": ["rule"]}, {"required": ["open"]}],
        "properties": {
            "rule": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$",
                     "description": "a configured rule's name"},
            "open": {"type": "array", "minItems": 1, "maxItems": 64,
                     "items": {"type": "string",
                               "pattern": "^(tcp|udp|both)/[1-9][0-9]{0,3}(-[1-9][0-9]{0,3})?$"},
                     "description": "ad-hoc ports like udp/34197 instead of a rule (only with "
                                    "[api] allow_adhoc, within adhoc_ports and its limits)"},
            "ttl": {"oneOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": 604800},
                {"type": "string",
                 "pattern": "^([1-9][0-9]{0,4}[sS]|[1-9][0-9]{0,3}[mM]|[1-9][0-9]?[hH]"
                            "|[1-7][dD]|[1-9][0-9]?[hH] ?[0-5]?[0-9][mM]"
                            "|[1-9][0-9]{0,3}[mM] ?[0-5]?[0-9][sS])$"}],
                "description": "seconds, or the duration grammar every input shares: 90s, 10m, "
                               "2h, 1d, 1h30m, 10m 0s, 1h 0m, 2H (at most 7d); default: the "
                               "rule's idle_timeout"},
            "host": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
                     "description": "another LAN host (admin token only)"},
            "source": {"enum": ["api", "run"]},
            "meta": {"type": "object", "maxProperties": 16,
                     "propertyNames": {"maxLength": 64},
                     "additionalProperties": {"type": "string", "maxLength": 256}},
        },
    },
    "Mapping": {
        "type": "object",
        "properties": {
            "protocol": {"enum": ["TCP", "UDP"]},
            "external_port": {"type": "integer"},
            "internal_client": {"type": "string"},
            "internal_port": {"type": "integer"},
            "description": {"type": "string"},
            "state": {"enum": ["active", "pending", "conflict", "failed"]},
            "lease": {"type": "integer",
                      "description": "seconds the router granted (what it reports, when it "
                                     "can), 0 = permanent"},
            "lease_asked": {"type": "integer", "description": "seconds asked, 0 = permanent"},
            "verified": {"type": ["boolean", "null"],
                         "description": "the router's own record showed it (false: the router "
                                        "cannot show it; null: not checked yet)"},
            "age": {"type": "number"},
            "renew_in": {"type": ["number", "null"]},
            "error": {"type": "string"},
        },
    },
    "Status": {
        "type": "object",
        "required": ["version", "gateway", "rules", "activations", "mappings", "warnings"],
        "properties": {
            "version": {"type": "string"},
            "uptime": {"type": "number"},
            "instance": {"type": "string"},
            "gateway": {"type": "object"},
            "detectors": {"type": "array", "items": _ref("Detector")},
            "rules": {"type": "array", "items": _ref("Rule")},
            "activations": {"type": "array", "items": _ref("Activation")},
            "mappings": {"type": "array", "items": _ref("Mapping")},
            "pinholes": {
                "type": "object",
                "description": "IPv6 pinholes (WANIPv6FirewallControl) to this machine",
                "properties": {
                    "available": {"type": ["boolean", "null"]},
                    "reason": {"type": ["string", "null"]},
                    "control_url": {"type": ["string", "null"]},
                    "lease": {"type": "integer"},
                    "entries": {"type": "array", "items": {"type": "object"}},
                },
            },
            "counts": {"type": "object", "description": "activations (all of them; the list "
                       "above holds at most 200: page with GET /activations), "
                       "activations_refused by bound, flows, router operations"},
            "api_connections": {
                "type": "object",
                "description": "Open API connections, their limits and the refusals",
                "properties": {"open": {"type": "integer"}, "open_local": {"type": "integer"},
                               "limits": {"type": "object"}, "refused": {"type": "object"}}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "events": {"type": "array", "items": {"type": "object"}},
        },
    },
}


def build_openapi(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-ready dict) of ``/api/v1``, ``/healthz``, ``/readyz`` and
    ``/metrics``, with ``version`` as ``info.version``."""
    p = API_PREFIX
    paths: dict[str, Any] = {
        "/healthz": {"get": _op(
            "Liveness: the service answers (and whether the router does)", "public",
            {"200": _json({"type": "object", "properties": {
                "ok": {"const": True}, "gateway_up": {"type": "boolean"},
                "version": {"type": "string"}}})}, op_id="healthz", errors=_ERRORS_COMMON)},
        "/readyz": {"get": _op(
            "Readiness: 200 when the router answers, 503 while it does not", "public",
            {"200": _json({"type": "object"}), "503": _json({"type": "object"}, "Router down")},
            op_id="readyz", errors=_ERRORS_COMMON)},
        f"{p}/openapi.json": {"get": _op(
            "This document", "public", {"200": _json({"type": "object"})},
            op_id="openapi", errors=_ERRORS_COMMON)},
        f"{p}/status": {"get": _op(
            "Gateway, detectors, rules, activations, mappings, counters, warnings, recent "
            "events", "read", {"200": _json(_ref("Status"))}, op_id="getStatus",
            errors=_ERRORS_READ)},
        f"{p}/mappings": {"get": _op(
            "Mappings this service holds, with state and lease", "read",
            {"200": _json({"type": "object", "properties": {
                "mappings": {"type": "array", "items": _ref("Mapping")}}})},
            op_id="getMappings", errors=_ERRORS_READ)},
        f"{p}/events": {"get": _op(
            "Server-sent events: `hello`, then one event per activation or mapping change "
            "(`activated`, `expired`, `deactivated`, `mapped`, `unmapped`, `conflict`, "
            "`failed`, ...), each with `id:` = its `seq`; `lost` when a slow client missed "
            "some; `: keep-alive` comments. Replays from `Last-Event-ID` (or `?since=`) while "
            "the events are still in the service's short history.", "read",
            {"200": {"description": "An event stream",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
            op_id="getEvents",
            params=[{"name": "since", "in": "query", "required": False,
                     "schema": {"type": "integer"},
                     "description": "replay events after this seq"}],
            errors={**_ERRORS_READ, "400": _err("since / Last-Event-ID is not an event number")})},
        "/metrics": {"get": _op(
            "Prometheus metrics (text exposition format 0.0.4)", "read",
            {"200": {"description": "Metrics",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            op_id="getMetrics", errors=_ERRORS_READ)},
        f"{p}/rules": {"get": _op(
            "Configured rules (what can ever be opened)", "act",
            {"200": _json({"type": "object", "properties": {
                "rules": {"type": "array", "items": _ref("Rule")}}})},
            op_id="getRules", errors=_ERRORS_COMMON)},
        f"{p}/activations": {
            "get": _op(
                "Live activations, oldest first, a page at a time (without read access: only "
                "the client's own)", "act",
                {"200": _json({"type": "object", "required": ["activations", "total",
                                                              "next_cursor"],
                               "properties": {
                    "activations": {"type": "array", "items": _ref("Activation")},
                    "total": {"type": "integer"},
                    "next_cursor": {"type": ["string", "null"],
                                    "description": "pass as ?cursor= for the next page; "
                                                   "null on the last"}}})},
                op_id="listActivations", params=_PAGE_PARAMS,
                errors={**_ERRORS_COMMON, "400": _err("limit or cursor malformed"),
                        "403": _err("A client outside the LAN without the admin token")}),
            "post": _op(
                "Activate a rule (or ad-hoc ports); waits up to 5 s for the router, then says "
                "which ports are active, held, in conflict or failed", "act",
                {"201": _json(_ref("Activation"), "Created (or, for a client without the "
                              "token, its live activation of the rule, refreshed)"),
                 "404": _err("Unknown rule"),
                 "415": _err("Body is not application/json")},
                op_id="createActivation", body=_ref("ActivationRequest"),
                errors={**_ERRORS_ACT, "429": _err(
                    "Rate limit exceeded (Retry-After), or a bound on live activations: "
                    "[api] max_per_host, or the service's")}),
        },
        f"{p}/activations/{{id}}": {
            "get": _op("One activation", "act",
                       {"200": _json(_ref("Activation")), "404": _err("No such activation")},
                       op_id="getActivation", params=[_ID], errors=_ERRORS_ACT),
            "delete": _op("End an activation now; its ports close", "act",
                          {"200": _json(_ref("Activation")),
                           "404": _err("No such activation")},
                          op_id="deleteActivation", params=[_ID], errors=_ERRORS_ACT),
        },
        f"{p}/activations/{{id}}/refresh": {"post": _op(
            "Heartbeat: extend the activation by ttl (launcher wrappers call this)", "act",
            {"200": _json(_ref("Activation")), "404": _err("No such activation")},
            op_id="refreshActivation", params=[_ID],
            body={"type": "object", "additionalProperties": False,
                  "properties": {"ttl": {"type": ["number", "string"]},
                                 "self_mapped": {
                                     "type": "boolean",
                                     "description": "the caller maps the ports itself: taken "
                                                    "after the router refused them to this "
                                                    "service (secure mode)"}}},
            errors=_ERRORS_ACT)},
        "/": {"get": _op("The dashboard (HTML)", "public",
                         {"200": {"description": "HTML",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}},
                         op_id="dashboard")},
        "/dashboard.js": {"get": _op("Dashboard script", "public",
                                     {"200": {"description": "JavaScript"}},
                                     op_id="dashboardScript")},
        "/dashboard.css": {"get": _op("Dashboard style sheet", "public",
                                      {"200": {"description": "CSS"}},
                                      op_id="dashboardStyle")},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "igdtrigger",
            "version": version,
            "description": (
                "Router-grade port triggering: rules, activations and the UPnP IGD mappings "
                "they hold. Errors are `{\"error\": {\"status\", \"message\"}}`. Every client "
                "address but loopback is rate limited (429 with Retry-After)."),
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "The admin token from `<state_dir>/api-token` (mode 0600)."}},
        },
    }
