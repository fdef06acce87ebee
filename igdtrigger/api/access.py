"""Who is calling and what may they do: the API's roles, callers, settings and HTTP errors.

``Access`` is a route's role (public, read, act); ``Caller`` what a request carries (its
address, loopback, the admin token or the local admin socket, inside ``[api] allow``);
``ApiSettings`` the knobs ``make_app`` takes. The rules themselves are in api/app.py's module
docstring (README "Who may do what").
"""

from __future__ import annotations

import collections
import enum
import hmac
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from igdtrigger.api.httpguard import ConnectionGuard
from igdtrigger.api.metrics import Metrics
from igdtrigger.api.ratelimit import RateLimiter
from igdtrigger.core.matching import is_lan_source
from igdtrigger.netutil import Network, host_key
from igdtrigger.runtime.service import Service

__all__ = [
    "ACCESS",
    "ADMIN_SOCKET",
    "BODY_TIMEOUT",
    "CALLER",
    "GUARD",
    "LIMITER",
    "MAX_BODY",
    "METRICS",
    "PAGE_DEFAULT",
    "PAGE_MAX",
    "SERVICE",
    "SETTINGS",
    "SSE_HEARTBEAT",
    "SSE_SEND_BUFFER",
    "SSE_WRITE_TIMEOUT",
    "STATUS_COUNTS",
    "UNSAFE_METHODS",
    "WRONG_AUTH",
    "Access",
    "ApiSettings",
    "Caller",
    "Handler",
    "caller_of",
    "error_response",
    "host_allowed",
    "local_names",
    "make_caller",
    "origin_matches",
    "refused_log",
]

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
    """What an endpoint requires: ``public`` (anyone), ``read`` (the token, loopback, or a LAN
    client with ``[api] public_read``), ``act`` (the token, or a LAN client acting for itself)."""

    PUBLIC = "public"
    READ = "read"
    ACT = "act"


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The ``[api]`` settings the access checks read: ``sse_heartbeat`` and ``sse_write_timeout`` in
    seconds; ``allow`` the networks whose clients count as LAN (empty: private and link-local
    addresses); ``allowed_hosts`` the extra ``Host`` names this service answers to."""

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
    """Who is asking, decided once per request by ``make_caller``."""

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


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   ) -> web.Response:
    """The API's error shape: ``{"error": {"status", "message"}}``."""
    return web.json_response({"error": {"status": status, "message": message}}, status=status,
                             headers=headers)


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


def caller_of(request: web.Request) -> Caller:
    """The ``Caller`` the guard middleware stored on ``request``, or a fresh one (``make_caller``)
    on a route without the guard."""
    caller = request.get(CALLER)
    if caller is None:  # route without the guard (tests calling handlers directly)
        caller = make_caller(request)
    return caller


def make_caller(request: web.Request) -> Caller:
    """Decide who ``request`` comes from: the local admin socket is an admin on loopback; else its
    address, whether it carries the admin token, and whether ``ApiSettings.is_lan`` lets it act
    (and read, with ``public_read``) without one."""
    if _over_admin_socket(request):
        return Caller("127.0.0.1", True, True, True, True)
    address, loopback = _remote_address(request)
    settings = request.app[SETTINGS]
    admin = _has_admin_token(request)
    lan = loopback or (bool(address) and settings.is_lan(address))
    reader = admin or loopback or (settings.public_read and lan)
    return Caller(address, loopback, admin, reader, lan)


def host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
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


def origin_matches(origin: str, host_header: str) -> bool:
    """Is ``origin`` (a browser's ``Origin`` header) an http(s) URL of the same host and port as
    ``host_header``? A cross-site page fails: CSRF protection for unsafe methods."""
    parsed = urllib.parse.urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return False
    return parsed.netloc.lower() == host_header.strip().lower()


def local_names() -> frozenset[str]:
    """The names this host answers to in ``Host`` without the token: ``localhost``, its host
    name, the name's first label and ``<label>.local``."""
    names = {"localhost"}
    try:
        host = socket.gethostname().lower().rstrip(".")
    except OSError:
        return frozenset(names)
    if host:
        short = host.split(".")[0]
        names |= {host, short, f"{short}.local"}
    return frozenset(names)


# the API's log: lines about requests are written under this name whichever module writes them
log = logging.getLogger("igdtrigger.api.app")
_REFUSED_LOG = RateLimiter(1 / 60, 1, max_clients=256)  # one line per kind and minute


def refused_log(kind: str, msg: str, *args: object) -> None:
    """Log a refused or malformed request (a ``logging`` format and its ``args``) once per
    ``kind`` and minute: a flood must not flood the journal too."""
    if _REFUSED_LOG.take(kind) == 0.0:
        log.warning(msg + " (further ones of this kind are not logged for a minute)", *args)
