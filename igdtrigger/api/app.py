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
import contextlib
import enum
import hmac
import importlib.resources
import ipaddress
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from igdtrigger import __version__
from igdtrigger.api.httpguard import ConnectionGuard, describe
from igdtrigger.api.metrics import Metrics
from igdtrigger.api.openapi import API_PREFIX, build_openapi
from igdtrigger.api.ratelimit import RateLimiter
from igdtrigger.core.engine import Source, is_lan_source
from igdtrigger.core.errors import (
    Forbidden,
    IgdTriggerError,
    NotReady,
    RequestTimeout,
    RuleNotFound,
    TooMany,
    TooManySubscribers,
    Unauthorized,
    UnsupportedMedia,
    UsageError,
)
from igdtrigger.core.model import parse_duration
from igdtrigger.netutil import Network, guess_lan_address, host_key, interface_networks
from igdtrigger.runtime.events import Event, Subscriber
from igdtrigger.runtime.service import STATUS_ACTIVATIONS, Service

log = logging.getLogger("igdtrigger.api.app")
SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
SETTINGS: web.AppKey[ApiSettings] = web.AppKey("settings")
ACCESS: web.AppKey[dict[AbstractRoute, Access]] = web.AppKey("access")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter", RateLimiter)
GUARD: web.AppKey[ConnectionGuard] = web.AppKey("guard", ConnectionGuard)
ADMIN_SOCKET = "api.sock"  # in the state directory: the local admin's way in (no token)
STATUS_COUNTS: web.AppKey[collections.Counter[int]] = web.AppKey("status_counts")
CALLER: web.RequestKey[Caller] = web.RequestKey("caller")
MAX_BODY = 16 * 1024
BODY_TIMEOUT = 10.0  # seconds to receive a request body once the headers arrived
PAGE_DEFAULT = 500  # activations per page of GET /activations
PAGE_MAX = 1000
SSE_HEARTBEAT = 15.0
SSE_WRITE_TIMEOUT = 30.0  # an event stream whose client reads nothing for this long is closed
SSE_SEND_BUFFER = 64 * 1024  # kernel send buffer of a stream (else autotuned up to megabytes)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Access(enum.StrEnum):
    PUBLIC = "public"
    READ = "read"
    ACT = "act"


@dataclass(frozen=True, slots=True)
class ApiSettings:
    public_read: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    sse_heartbeat: float = SSE_HEARTBEAT
    sse_write_timeout: float = SSE_WRITE_TIMEOUT
    allow: tuple[Network, ...] = ()  # empty: private and link-local addresses

    def is_lan(self, address: str) -> bool:
        """May a client at ``address`` act without the token (and read with public_read)?"""
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped  # ::ffff:203.0.113.9 is 203.0.113.9
        if addr.is_loopback:
            return True
        if self.allow:
            return any(addr in net for net in self.allow)
        return is_lan_source(addr)


@dataclass(frozen=True, slots=True)
class Caller:
    address: str  # the client's IP address ("" if unknown)
    loopback: bool  # on this machine (a loopback address, or the local admin socket)
    admin: bool  # carries the admin token, or came over the local admin socket
    reader: bool  # may use ``read`` endpoints
    lan: bool = True  # inside [api] allow (or this host's networks): may act without the token

    def key(self) -> str:
        """Rate-limit and stream-pool key: every loopback address is this one machine, every
        address of an IPv6 /64 one host (privacy addresses rotate)."""
        if self.loopback:
            return "loopback"
        return host_key(self.address) if self.address else "unknown"


WRONG_AUTH = ("wrong admin token: the Authorization header does not carry this service's token "
               "(the api-token file in its state directory); send that one, or none")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status,
                             headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    counts = request.app[STATUS_COUNTS]
    started = time.perf_counter()
    try:
        resp = await handler(request)
    except Unauthorized as exc:
        resp = _error(401, str(exc), {"WWW-Authenticate": 'Bearer realm="igdtrigger"'})
    except IgdTriggerError as exc:
        resp = _error(exc.http_status, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        resp = _error(exc.status, exc.reason or "error", keep or None)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("API handler failed: %s %s", request.method, request.path)
        resp = _error(500, "internal error (see the service log)")
    counts[resp.status] += 1
    route = _route_label(request)
    if resp.status in (400, 408, 413, 415, 422):
        _refused_log(f"{resp.status} {route}", "malformed request from %s: %s: %d %s",
                     request.remote, route, resp.status, _short(getattr(resp, "text", "") or ""))
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


def _remote_address(request: web.Request) -> tuple[str, bool]:
    remote = request.remote or ""
    try:
        addr = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return "", False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr), addr.is_loopback


def _has_admin_token(request: web.Request) -> bool:
    token = request.app[SERVICE].api_token
    auth = request.headers.get("Authorization", "")
    if not token or auth[:7].lower() != "bearer ":
        return False
    # header bytes that are not UTF-8 arrive as surrogates: compare bytes, never raise
    given = auth[7:].strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, token.encode())


def _over_admin_socket(request: web.Request) -> bool:
    """Did the request come over the local admin socket (AF_UNIX)?"""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and getattr(sock, "family", None) == socket.AF_UNIX


def _caller(request: web.Request) -> Caller:
    caller = request.get(CALLER)
    if caller is None:  # route without the guard (tests calling handlers directly)
        caller = _make_caller(request)
    return caller


def _make_caller(request: web.Request) -> Caller:
    if _over_admin_socket(request):
        return Caller("127.0.0.1", True, True, True, True)
    address, loopback = _remote_address(request)
    settings = request.app[SETTINGS]
    admin = _has_admin_token(request)
    lan = loopback or (bool(address) and settings.is_lan(address))
    reader = admin or loopback or (settings.public_read and lan)
    return Caller(address, loopback, admin, reader, lan)


def _host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Is ``Host`` an IP address, ``localhost`` or a name this service answers to?"""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return host == "localhost" or host.endswith(".localhost") or host in allowed


def _origin_matches(origin: str, host_header: str) -> bool:
    parsed = urllib.parse.urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return False
    return parsed.netloc.lower() == host_header.strip().lower()


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rate limit, then who-may-do-what (see the module docstring)."""
    app = request.app
    caller = _make_caller(request)
    request[CALLER] = caller
    wait = 0.0 if caller.loopback else app[LIMITER].take(caller.key())
    if wait > 0:
        _refused_log(f"rate limit: {caller.key()}", "too many requests from %s", caller.key())
        return _error(
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
    if not caller.admin and not _host_allowed(host_header, app[SETTINGS].allowed_hosts):
        raise Forbidden(
            f"Host {host_header!r} is not an address of this service (DNS-rebinding "
            "protection); use its IP address, or add the name to [api] allowed_hosts")
    origin = request.headers.get("Origin")
    if (request.method in UNSAFE_METHODS and origin is not None and origin != "null"
            and not _origin_matches(origin, host_header)):
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


_REFUSED_LOG = RateLimiter(1 / 60, 1, max_clients=256)  # one line per kind and minute


def _refused_log(kind: str, msg: str, *args: object) -> None:
    """Log a refused or malformed request once per kind and minute: a flood must not flood
    the journal too."""
    if _REFUSED_LOG.take(kind) == 0.0:
        log.warning(msg + " (further ones of this kind are not logged for a minute)", *args)


def _client_host(request: web.Request) -> str:
    """The address a non-admin client may act for: its own; loopback means this host."""
    svc = request.app[SERVICE]
    caller = _caller(request)
    if not caller.address:
        raise Forbidden(f"cannot tell the client's address ({request.remote!r})")
    if caller.loopback:
        info = svc.gateway.info
        if info is not None:
            return info.local_address
        guess = guess_lan_address(svc.config.gateway.url)
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
    try:  # the whole body (read(n) would return what has arrived so far)
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
        raise UsageError(f"request body is not valid JSON: {_short(str(exc))}") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


def _ttl(value: object, field: str = "ttl") -> float | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 10**9:
        raise UsageError(f"{field}: {_short(str(value))} seconds is out of range (at most 7d)")
    try:
        return parse_duration(value)
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"{field}: {_short(str(exc))}") from None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- handlers ----------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response({"ok": True, "gateway_up": svc.mapper.gateway_up,
                              "version": __version__,
                              **({"front_serving": svc.front_serving}  # front:
                                 if svc.front_serving is not None else {})})


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    up = svc.mapper.gateway_up
    front = svc.front_serving is not False  # front: ready only once the IGD front serves
    body: dict[str, Any] = {"ready": up and front, "gateway_up": up}
    if not up:
        body["error"] = svc.mapper.gateway_error or "the router has not answered yet"
    elif not front:
        body["error"] = "the IGD front ([front]) is not serving yet"
    up = up and front
    return web.json_response(body, status=200 if up else 503)


async def get_status(request: web.Request) -> web.Response:
    body = request.app[SERVICE].status(max_activations=STATUS_ACTIVATIONS)
    guard = request.app.get(GUARD)
    if guard is not None:
        body["api_connections"] = describe(guard)
    return web.json_response(body)


async def get_rules(request: web.Request) -> web.Response:
    return web.json_response({"rules": [r.to_json() for r in request.app[SERVICE].rules()]})


async def get_mappings(request: web.Request) -> web.Response:
    return web.json_response({"mappings": request.app[SERVICE].mapper.snapshot()})


def _page_args(request: web.Request) -> tuple[int, int]:
    """``?limit=`` (1-PAGE_MAX, default PAGE_DEFAULT) and ``?cursor=`` (the ``next_cursor`` of
    the previous page)."""
    limit_raw = request.query.get("limit", str(PAGE_DEFAULT))
    cursor_raw = request.query.get("cursor") or "0"
    if not limit_raw.isdecimal() or len(limit_raw) > 6 or not 1 <= int(limit_raw) <= PAGE_MAX:
        raise UsageError(f"limit must be a number 1-{PAGE_MAX}, got {_short(limit_raw)!r}")
    if not cursor_raw.isdecimal() or len(cursor_raw) > 18:
        raise UsageError(f"cursor must be the next_cursor of the previous page, got "
                         f"{_short(cursor_raw)!r}")
    return int(limit_raw), int(cursor_raw)


async def get_activations(request: web.Request) -> web.Response:
    """One page of live activations, oldest first: ``{"activations": [...], "total": n,
    "next_cursor": "..." | null}``."""
    svc = request.app[SERVICE]
    limit, cursor = _page_args(request)
    acts = svc.sorted_activations()
    if not _caller(request).reader:  # own-address rule: only this client's activations
        own = _client_host(request)
        acts = [a for a in acts if a.host == own]
    total = len(acts)
    acts = [a for a in acts if a.seq >= cursor]
    page, rest = acts[:limit], acts[limit:limit + 1]
    return web.json_response({"activations": [svc.activation_json(a) for a in page],
                              "total": total,
                              "next_cursor": str(rest[0].seq) if rest else None})


_POST_FIELDS = {"rule", "open", "ttl", "host", "source", "meta"}


async def post_activation(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    body = await _json_body(request)
    unknown = set(body) - _POST_FIELDS
    if unknown:
        raise UsageError(
            f"unknown field(s) {', '.join(sorted(unknown))} (allowed: "
            f"{', '.join(sorted(_POST_FIELDS))})"
        )
    rule = body.get("rule")
    open_raw = body.get("open")
    if open_raw is not None:
        if rule is not None:
            raise UsageError('give either "rule" (a configured rule) or "open" (ad-hoc ports), '
                             'not both')
        if not isinstance(open_raw, list) or not all(isinstance(p, str) for p in open_raw) \
                or len(open_raw) > 64:
            raise UsageError('field "open" must be a list of port specs like ["udp/34197"]')
    elif not isinstance(rule, str) or not rule:
        raise UsageError('field "rule" is required: the name of a configured rule (or "open" '
                         'with ad-hoc ports, when [api] allow_adhoc is on)')
    ttl = _ttl(body.get("ttl"))
    source_raw = body.get("source", "api")
    try:
        source = Source(source_raw)
    except ValueError:
        raise UsageError(f'field "source" must be "api" or "run", got {source_raw!r}') from None
    if source is Source.TRAFFIC or source_raw not in ("api", "run"):
        raise UsageError('field "source" must be "api" or "run"')
    meta_raw = body.get("meta") or {}
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256
        for k, v in meta_raw.items()
    ) or len(meta_raw) > 16:
        raise UsageError('field "meta" must be an object of at most 16 short strings')
    host = body.get("host")
    if host is not None:
        if not isinstance(host, str):
            raise UsageError('field "host" must be an IP address string')
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise UsageError(f'field "host": {host!r} is not an IP address') from None
        if not _caller(request).admin:
            own = _client_host(request)
            if host != own:
                raise Forbidden(
                    f"only the admin token may activate rules for another host ({host}); "
                    f"without it you may act for your own address {own}"
                )
    else:
        host = _client_host(request)
    if open_raw is not None:
        if svc.config.api.adhoc.admin_only and not _caller(request).admin:
            raise Forbidden("ad-hoc ports need the admin token here ([api] adhoc_admin_only)")
        result = await svc.activate_adhoc(list(open_raw), host, ttl=ttl, source=source,
                                          meta=dict(meta_raw),
                                          tokenless=not _caller(request).admin)
        return web.json_response(result, status=201)
    assert isinstance(rule, str)
    if svc.engine.rules.get(rule) is None:
        raise RuleNotFound(rule, list(svc.engine.rules))
    result = await svc.activate(rule, host, ttl=ttl, source=source, meta=dict(meta_raw),
                                tokenless=not _caller(request).admin)
    return web.json_response(result, status=201)


def _check_owner(request: web.Request, act_id: str) -> None:
    svc = request.app[SERVICE]
    act = svc.engine.get(act_id)
    if not _caller(request).admin and act.host != _client_host(request):
        raise Forbidden(f"activation {act_id} belongs to {act.host}; only the admin token may "
                        "change another host's activation")


async def delete_activation(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    act_id = request.match_info["id"]
    _check_owner(request, act_id)
    return web.json_response(await svc.deactivate(act_id))


async def refresh_activation(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    act_id = request.match_info["id"]
    body = await _json_body(request)
    if set(body) - {"ttl", "self_mapped"}:
        raise UsageError('only fields "ttl" and "self_mapped" are allowed')
    self_mapped = body.get("self_mapped")
    if self_mapped is not None and not isinstance(self_mapped, bool):
        raise UsageError(f'"self_mapped" must be true or false, got {self_mapped!r}')
    _check_owner(request, act_id)
    return web.json_response(svc.heartbeat(act_id, _ttl(body.get("ttl")), self_mapped))


async def get_activation(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    act = svc.engine.get(request.match_info["id"])
    if not _caller(request).reader and act.host != _client_host(request):
        raise Forbidden(f"activation {act.id} belongs to another host")
    return web.json_response(svc.activation_json(act))


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(__version__))


async def get_metrics(request: web.Request) -> web.Response:
    text = request.app[METRICS].render(request.app[SERVICE], request.app[STATUS_COUNTS],
                                       request.app.get(GUARD))
    return web.Response(text=text, content_type="text/plain",
                        headers={"Cache-Control": "no-store"}, charset="utf-8")


def _sse(event: Event) -> bytes:
    name = str(event.get("event", "message")).replace("\n", " ")
    return f"id: {event['seq']}\nevent: {name}\ndata: {json.dumps(event)}\n\n".encode()


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every activation and mapping change, as it happens."""
    svc = request.app[SERVICE]
    caller = _caller(request)
    since_raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    since: int | None = None
    if since_raw is not None:
        try:
            since = int(since_raw)
        except ValueError:
            raise UsageError(f"Last-Event-ID/since must be an event number, got {since_raw!r}"
                             ) from None
    try:
        sub = svc.hub.subscribe(caller.key(), admin=caller.admin)
    except TooManySubscribers as exc:
        raise TooMany(f"{exc}; close one first") from None
    try:
        return await _stream_events(request, sub, since)
    finally:
        svc.hub.unsubscribe(sub)


async def _stream_events(request: web.Request, sub: Subscriber,
                         since: int | None) -> web.StreamResponse:
    """The stream itself. Events wait in the subscriber's bounded queue (the oldest dropped,
    ``event: lost``); the socket's send buffer is fixed at ``SSE_SEND_BUFFER`` (the kernel
    would grow it to megabytes for a client that stops reading); a client that takes nothing
    for ``sse_write_timeout`` seconds (those buffers full) is a slow consumer: its stream is
    closed, so it holds neither memory nor a place in the stream pool."""
    svc = request.app[SERVICE]
    heartbeat = request.app[SETTINGS].sse_heartbeat
    write_timeout = request.app[SETTINGS].sse_write_timeout

    async def write(data: bytes) -> None:
        try:
            await asyncio.wait_for(resp.write(data), write_timeout)
        except TimeoutError:
            _refused_log("slow event stream", "event stream to %s closed: it took nothing "
                         "for %gs", _caller(request).key(), write_timeout)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("slow consumer") from None

    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SEND_BUFFER)
    hello = {"seq": svc.hub.seq, "event": "hello", "version": __version__,
             "instance": svc.tag, "heartbeat": heartbeat}
    chunks = [b"retry: 3000\n\n",
              f"event: hello\ndata: {json.dumps(hello)}\n\n".encode()]
    if since is not None:
        chunks.extend(_sse(e) for e in svc.hub.since(since))
    try:
        await write(b"".join(chunks))
        while not sub.closed:
            if not await sub.wait(heartbeat):
                await write(b": keep-alive\n\n")
                continue
            events, dropped = sub.take()
            out = bytearray()
            if dropped:
                lost = {"dropped": dropped, "hint": "re-read /api/v1/status"}
                out += f"event: lost\ndata: {json.dumps(lost)}\n\n".encode()
            for ev in events:
                out += _sse(ev)
            if out:
                await write(bytes(out))
    except ConnectionError:
        pass  # the client went away
    return resp


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
    return _error(404, f"no such endpoint: {request.method} {request.path}")


async def _close_streams(app: web.Application) -> None:
    app[SERVICE].hub.close_all()


def _local_names() -> frozenset[str]:
    names = {"localhost"}
    try:
        host = socket.gethostname().lower().rstrip(".")
    except OSError:
        return frozenset(names)
    if host:
        short = host.split(".")[0]
        names |= {host, short, f"{short}.local"}
    return frozenset(names)


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
        allowed_hosts=_local_names() | frozenset(
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
