"""HTTP API (aiohttp). JSON in, JSON out; every error is ``{"error": {"status", "message"}}``.

Who may do what (README "Who may do what"; the OpenAPI document repeats it per operation):

- ``public``: anyone who can connect (``/healthz``, ``/readyz``, the OpenAPI document and the
  dashboard's static files).
- ``read`` (status, mappings, events, metrics): clients on loopback, requests with the admin
  bearer token or over the local admin socket, and LAN clients only when
  ``[api] public_read = true``; else 401.
- ``act`` (rules, activations): LAN clients, under the own-address rule: a client without the
  admin token may only activate rules for its own address (loopback clients act for this host's
  LAN address) and only see, refresh and end its own activations; one live activation of a rule
  per host (asking again refreshes it), at most ``[api] max_per_host`` in all. Rules decide
  which ports can ever be opened; the admin token (``<state_dir>/api-token``) may act for any
  host. "LAN" is ``[api] allow``, else the networks of the interface(s) the API listens on
  (private and link-local addresses when those cannot be read): a client from elsewhere needs
  the token for anything but ``public``.

The local admin socket (``<state_dir>/api.sock``, mode 0600: only the service's user and root
can connect) carries the admin role without a token, so a local CLI never hands the token to
whatever listens on 127.0.0.1:8731.

Every client address but loopback has a token bucket (``[api] rate_limit``/``rate_burst``): past
it, 429 with ``Retry-After``. (Local processes are not limited: they could talk to the router
directly anyway, and benchmarks poll the API.) Requests without the token must name this service
in ``Host`` (an IP address, ``localhost``, this host's name or ``[api] allowed_hosts``:
DNS-rebinding protection), and a browser's state-changing request must come from the same origin
(CSRF protection).
"""

from __future__ import annotations

import asyncio
import collections
import importlib.resources
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from igdtrigger.api.access import (
    ACCESS,
    BODY_TIMEOUT,
    CALLER,
    GUARD,
    LIMITER,
    MAX_BODY,
    METRICS,
    PAGE_DEFAULT,
    PAGE_MAX,
    SERVICE,
    SETTINGS,
    SSE_HEARTBEAT,
    SSE_WRITE_TIMEOUT,
    STATUS_COUNTS,
    UNSAFE_METHODS,
    WRONG_AUTH,
    Access,
    ApiSettings,
    Handler,
    caller_of,
    error_response,
    host_allowed,
    local_names,
    make_caller,
    origin_matches,
    refused_log,
)
from igdtrigger.api.httpguard import ConnectionGuard, describe
from igdtrigger.api.metrics import Metrics
from igdtrigger.api.openapi import API_PREFIX, build_openapi
from igdtrigger.api.ratelimit import RateLimiter
from igdtrigger.api.requests import (
    check_refresh_fields,
    parse_activation,
    parse_refresh,
    short,
)
from igdtrigger.api.stream import get_events
from igdtrigger.core import trace
from igdtrigger.core.errors import (
    Forbidden,
    IgdTriggerError,
    NotReady,
    RequestTimeout,
    RuleNotFound,
    Unauthorized,
    UnsupportedMedia,
    UsageError,
)
from igdtrigger.core.version import __version__
from igdtrigger.netutil import Network, interface_networks
from igdtrigger.runtime.service import Service
from igdtrigger.runtime.views import STATUS_ACTIVATIONS

__all__ = [
    "ROUTES",
    "delete_activation",
    "errors_middleware",
    "get_activation",
    "get_activations",
    "get_mappings",
    "get_metrics",
    "get_openapi",
    "get_rules",
    "get_status",
    "guard_middleware",
    "healthz",
    "make_app",
    "not_found",
    "post_activation",
    "readyz",
    "refresh_activation",
]

log = logging.getLogger("igdtrigger.api.app")
@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into the API's JSON error shape (``IgdTriggerError`` subclasses carry their
    HTTP status; anything unexpected is a logged 500), count responses by status and time each
    route for ``/metrics``."""
    counts = request.app[STATUS_COUNTS]
    started = time.perf_counter()
    try:
        resp = await handler(request)
    except Unauthorized as exc:
        resp = error_response(401, str(exc), {"WWW-Authenticate": 'Bearer realm="igdtrigger"'})
    except IgdTriggerError as exc:
        resp = error_response(exc.http_status, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        resp = error_response(exc.status, exc.reason or "error", keep or None)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("API handler failed: %s %s", request.method, request.path)
        resp = error_response(500, "internal error (see the service log)")
    counts[resp.status] += 1
    route = _route_label(request)
    if resp.status in (400, 408, 413, 415, 422):
        refused_log(f"{resp.status} {route}", "malformed request from %s: %s: %d %s",
                     request.remote, route, resp.status, short(getattr(resp, "text", "") or ""))
    if route != "GET /api/v1/events":  # a stream: its length is the client's, not ours
        request.app[METRICS].on_api_request(route, time.perf_counter() - started)
    return resp


def _route_label(request: web.Request) -> str:
    """"METHOD /path/{template}" for a known route, else "METHOD other" (a scanner's random
    paths must not grow the metric's label set)."""
    info = request.match_info
    method = request.method if request.method in _METHODS else "OTHER"
    if info.http_exception is None and info.route.resource is not None:
        return f"{method} {info.route.resource.canonical}"
    return f"{method} other"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rate limit, then who-may-do-what (see the module docstring)."""
    app = request.app
    caller = make_caller(request)
    request[CALLER] = caller
    wait = 0.0 if caller.loopback else app[LIMITER].take(caller.key())
    if wait > 0:
        refused_log(f"rate limit: {caller.key()}", "too many requests from %s", caller.key())
        return error_response(
            429, f"too many requests from {caller.key()}: at most "
            f"{app[LIMITER].rate:g}/s (bursts of {app[LIMITER].burst:g}); retry in "
            f"{wait:.1f}s", {"Retry-After": RateLimiter.retry_after(wait)})
    access = app[ACCESS].get(request.match_info.route, Access.PUBLIC)
    if access is Access.PUBLIC:
        return await handler(request)
    if not caller.admin and request.headers.get("Authorization") is not None:
        # a token that is not this service's is a mistake to say, not "no token" in silence
        raise Unauthorized(WRONG_AUTH)
    host_header = request.headers.get("Host", "")
    if not caller.admin and not host_allowed(host_header, app[SETTINGS].allowed_hosts):
        raise Forbidden(
            f"Host {host_header!r} is not an address of this service (DNS-rebinding "
            "protection); use its IP address, or add the name to [api] allowed_hosts")
    origin = request.headers.get("Origin")
    if (request.method in UNSAFE_METHODS and origin is not None and origin != "null"
            and not origin_matches(origin, host_header)):
        raise Forbidden(f"cross-site request from {origin} refused")
    if origin == "null" and request.method in UNSAFE_METHODS:
        raise Forbidden("cross-site request from an opaque origin refused")
    if not caller.admin and not caller.lan:
        raise Forbidden(
            f"{caller.key()} is outside this service's LAN ([api] allow, else the networks of "
            "the interface it listens on): only the admin token may use this endpoint from "
            "there")
    if access is Access.READ and not caller.reader:
        raise Unauthorized(
            f"{request.path} needs the admin token (Authorization: Bearer <token from the "
            "service's state directory>) from another host, unless the service's config says "
            "[api] public_read = true")
    return await handler(request)


def _client_host(request: web.Request) -> str:
    """The address a non-admin client may act for: its own; loopback means this host."""
    svc = request.app[SERVICE]
    caller = caller_of(request)
    if not caller.address:
        raise Forbidden(f"cannot tell the client's address ({request.remote!r})")
    if caller.loopback:
        guess = svc.local_address()
        if guess is None:
            raise NotReady(
                "the router has not been reached yet, so this host's LAN address is unknown; "
                "retry in a moment"
            )
        return guess
    return caller.address


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise UsageError(f"request body larger than {MAX_BODY} bytes")
    try:  # the whole body (read(n) would return what has arrived so far). wait_for, not
        # asyncio.timeout: a client hanging up mid-body then raises ConnectionResetError here
        # (one "went away" line) instead of a silent cancel of the handler
        raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {BODY_TIMEOUT:g}s") from None
    except web.HTTPRequestEntityTooLarge:
        raise UsageError(f"request body larger than {MAX_BODY} bytes") from None
    if len(raw) > MAX_BODY:
        raise UsageError(f"request body larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(
            f"request body must be JSON with Content-Type: application/json (got {ctype!r})")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise UsageError("request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of 4,301+ digits
        raise UsageError(f"request body is not valid JSON: {short(str(exc))}") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


# --- handlers ----------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """200 while the service runs; 503 naming a dead or stuck scheduler (no timer would fire:
    mappings would neither renew nor close)."""
    svc = request.app[SERVICE]
    problem = svc.health()
    body: dict[str, Any] = {"ok": problem is None, "gateway_up": svc.gateway_up,
                            "version": __version__}
    if svc.front_serving is not None:  # front: the IGD front (issue 14)
        body["front_serving"] = svc.front_serving
    if problem is not None:
        body["error"] = problem
    return web.json_response(body, status=200 if problem is None else 503)


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 ``{"ready": true, ...}`` once the router answers; 503 with ``error``
    saying why not (a container orchestrator's readiness probe)."""
    svc = request.app[SERVICE]
    up = svc.gateway_up
    front = svc.front_serving is not False  # front: ready only once the IGD front serves
    body: dict[str, Any] = {"ready": up and front, "gateway_up": up}
    if not up:
        body["error"] = svc.gateway_error or "the router has not answered yet"
    elif not front:
        body["error"] = "the IGD front ([front]) is not serving yet"
    up = up and front
    return web.json_response(body, status=200 if up else 503)


async def get_status(request: web.Request) -> web.Response:
    """``GET /api/v1/status``: ``StatusView`` (at most ``STATUS_ACTIVATIONS`` activations) plus the
    open API connections."""
    body = request.app[SERVICE].status(max_activations=STATUS_ACTIVATIONS)
    guard = request.app.get(GUARD)
    if guard is not None:
        body["api_connections"] = describe(guard)
    return web.json_response(body)


async def get_rules(request: web.Request) -> web.Response:
    """``GET /api/v1/rules``: ``{"rules": [...]}``, the configured rules as JSON."""
    return web.json_response({"rules": [r.to_json() for r in request.app[SERVICE].rules()]})


async def get_mappings(request: web.Request) -> web.Response:
    """``GET /api/v1/mappings``: ``{"mappings": [...]}``, each mapping this service holds or wants
    and its state on the router."""
    return web.json_response({"mappings": request.app[SERVICE].mapping_snapshot()})


def _page_args(request: web.Request) -> tuple[int, int]:
    """``?limit=`` (1-PAGE_MAX, default PAGE_DEFAULT) and ``?cursor=`` (the ``next_cursor`` of
    the previous page)."""
    limit_raw = request.query.get("limit", str(PAGE_DEFAULT))
    cursor_raw = request.query.get("cursor") or "0"
    if not limit_raw.isdecimal() or len(limit_raw) > 6 or not 1 <= int(limit_raw) <= PAGE_MAX:
        raise UsageError(f"limit must be a number 1-{PAGE_MAX}, got {short(limit_raw)!r}")
    if not cursor_raw.isdecimal() or len(cursor_raw) > 18:
        raise UsageError(f"cursor must be the next_cursor of the previous page, got "
                         f"{short(cursor_raw)!r}")
    return int(limit_raw), int(cursor_raw)


async def get_activations(request: web.Request) -> web.Response:
    """One page of live activations, oldest first: ``{"activations": [...], "total": n,
    "next_cursor": "..." | null}``."""
    svc = request.app[SERVICE]
    limit, cursor = _page_args(request)
    acts = svc.sorted_activations()
    if not caller_of(request).reader:  # own-address rule: only this client's activations
        own = _client_host(request)
        acts = [a for a in acts if a.host == own]
    total = len(acts)
    acts = [a for a in acts if a.seq >= cursor]
    page, rest = acts[:limit], acts[limit:limit + 1]
    return web.json_response({"activations": [svc.activation_json(a) for a in page],
                              "total": total,
                              "next_cursor": str(rest[0].seq) if rest else None})


async def post_activation(request: web.Request) -> web.Response:
    """``POST /api/v1/activations``: 201 with the ``ActivationView``. Without the admin token a
    client may act only for its own address (403), ad-hoc ports may need the token
    (``adhoc_admin_only``); 404 for an unknown rule, 400 for a malformed body."""
    if trace.ON:
        trace.mark("api", first=True)
    svc = request.app[SERVICE]
    req = parse_activation(await _json_body(request))
    caller = caller_of(request)
    host = req.host
    if host is None:
        host = _client_host(request)
    elif not caller.admin:
        own = _client_host(request)
        if host != own:
            raise Forbidden(
                f"only the admin token may activate rules for another host ({host}); "
                f"without it you may act for your own address {own}"
            )
    if req.open is not None:
        if svc.config.api.adhoc.admin_only and not caller.admin:
            raise Forbidden("ad-hoc ports need the admin token here ([api] adhoc_admin_only)")
        result = await svc.activate(list(req.open), host, ttl=req.ttl, source=req.source,
                                    meta=req.meta, tokenless=not caller.admin)
        return web.json_response(result, status=201)
    assert req.rule is not None
    if req.rule not in svc.rule_names():
        raise RuleNotFound(req.rule, svc.rule_names())
    result = await svc.activate(req.rule, host, ttl=req.ttl, source=req.source, meta=req.meta,
                                tokenless=not caller.admin)
    return web.json_response(result, status=201)


def _check_owner(request: web.Request, act_id: str) -> None:
    svc = request.app[SERVICE]
    act = svc.find_activation(act_id)
    if not caller_of(request).admin and act.host != _client_host(request):
        raise Forbidden(f"activation {act_id} belongs to {act.host}; only the admin token may "
                        "change another host's activation")


async def delete_activation(request: web.Request) -> web.Response:
    """``DELETE /api/v1/activations/{id}``: ends it; the ``ActivationView`` once the router was
    told. 404 unknown, 403 another host's (without the token)."""
    svc = request.app[SERVICE]
    act_id = request.match_info["id"]
    _check_owner(request, act_id)
    return web.json_response(await svc.deactivate(act_id))


async def refresh_activation(request: web.Request) -> web.Response:
    """``POST /api/v1/activations/{id}/refresh``: extends it (``RefreshRequest``); 400 for a
    malformed body before 404 for an unknown activation."""
    svc = request.app[SERVICE]
    act_id = request.match_info["id"]
    body = await _json_body(request)
    check_refresh_fields(body)  # 400 for a malformed body before 404 for a missing activation
    _check_owner(request, act_id)
    req = parse_refresh(body)
    return web.json_response(svc.heartbeat(act_id, req.ttl, req.self_mapped))


async def get_activation(request: web.Request) -> web.Response:
    """``GET /api/v1/activations/{id}``: its ``ActivationView``; 403 for another host's activation
    without read access, 404 unknown."""
    svc = request.app[SERVICE]
    act = svc.find_activation(request.match_info["id"])
    if not caller_of(request).reader and act.host != _client_host(request):
        raise Forbidden(f"activation {act.id} belongs to another host")
    return web.json_response(svc.activation_json(act))


async def get_openapi(request: web.Request) -> web.Response:
    """``GET /api/v1/openapi.json``: the OpenAPI 3.1 document of this API
    (``openapi.build_openapi``)."""
    return web.json_response(build_openapi(__version__))


async def get_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format 0.0.4 (``metrics.Metrics.render``), never cached."""
    text = request.app[METRICS].render(request.app[SERVICE], request.app[STATUS_COUNTS],
                                       request.app.get(GUARD))
    return web.Response(text=text, content_type="text/plain",
                        headers={"Cache-Control": "no-store"}, charset="utf-8")


# --- dashboard ---------------------------------------------------------------------------------

_STATIC = {
    "/": ("index.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _static_handler(filename: str, ctype: str) -> Handler:
    body = (importlib.resources.files("igdtrigger.api") / "dashboard" / filename).read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers={
            "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        })

    return handler


async def not_found(request: web.Request) -> web.Response:
    """Any path no route serves: 404 in the API's JSON error shape."""
    return error_response(404, f"no such endpoint: {request.method} {request.path}")


async def _close_streams(app: web.Application) -> None:
    app[SERVICE].hub.close_all()


# (method, path, handler, access): the one table of routes; the OpenAPI test walks it too.
ROUTES: tuple[tuple[str, str, Handler, Access], ...] = (
    ("GET", "/healthz", healthz, Access.PUBLIC),
    ("GET", "/readyz", readyz, Access.PUBLIC),
    ("GET", f"{API_PREFIX}/openapi.json", get_openapi, Access.PUBLIC),
    ("GET", f"{API_PREFIX}/status", get_status, Access.READ),
    ("GET", f"{API_PREFIX}/mappings", get_mappings, Access.READ),
    ("GET", f"{API_PREFIX}/events", get_events, Access.READ),
    ("GET", "/metrics", get_metrics, Access.READ),
    ("GET", f"{API_PREFIX}/rules", get_rules, Access.ACT),
    ("GET", f"{API_PREFIX}/activations", get_activations, Access.ACT),
    ("POST", f"{API_PREFIX}/activations", post_activation, Access.ACT),
    ("GET", f"{API_PREFIX}/activations/{{id}}", get_activation, Access.ACT),
    ("DELETE", f"{API_PREFIX}/activations/{{id}}", delete_activation, Access.ACT),
    ("POST", f"{API_PREFIX}/activations/{{id}}/refresh", refresh_activation, Access.ACT),
)


def make_app(
    service: Service,
    *,
    metrics: Metrics | None = None,
    guard: ConnectionGuard | None = None,
    public_read: bool | None = None,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
    allowed_hosts: Iterable[str] | None = None,
    allow: Iterable[Network] | None = None,
    sse_heartbeat: float = SSE_HEARTBEAT,
    sse_write_timeout: float = SSE_WRITE_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    middlewares: Iterable[Any] = (),
) -> web.Application:
    """The API application. Settings default to ``service.config.api``; ``middlewares`` run
    first (tests use one to present a LAN client address). ``allow``: the LAN (default
    ``[api] allow``, else the networks of the interface(s) ``[api] listen`` is on)."""
    cfg = service.config.api
    app = web.Application(
        middlewares=[*middlewares, errors_middleware, guard_middleware],
        client_max_size=MAX_BODY,
    )
    app[SERVICE] = service
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[SETTINGS] = ApiSettings(
        public_read=cfg.public_read if public_read is None else public_read,
        allowed_hosts=local_names() | frozenset(
            h.lower() for h in (cfg.allowed_hosts if allowed_hosts is None else allowed_hosts)),
        sse_heartbeat=sse_heartbeat,
        sse_write_timeout=sse_write_timeout,
        allow=tuple(allow) if allow is not None else (
            cfg.allow or interface_networks(cfg.host) if not cfg.loopback_only else cfg.allow),
    )
    app[LIMITER] = RateLimiter(cfg.rate_limit if rate_limit is None else rate_limit,
                               cfg.rate_burst if rate_burst is None else rate_burst, clock=clock)
    app[STATUS_COUNTS] = collections.Counter()
    if guard is not None:
        app[GUARD] = guard
    access: dict[AbstractRoute, Access] = {}
    for method, path, handler, acc in ROUTES:
        route = app.router.add_route(method, path, handler)
        access[route] = acc
    for path, (filename, ctype) in _STATIC.items():
        access[app.router.add_get(path, _static_handler(filename, ctype))] = Access.PUBLIC
    app[ACCESS] = access
    app.on_shutdown.append(_close_streams)
    return app
