"""HTTP API (aiohttp). JSON in, JSON out; every error is ``{"error": {"status", "message"}}``.

Authorisation: a request carrying the admin bearer token (``<state_dir>/api-token``) may do
anything. Any other client may only activate rules for its own address (loopback clients act for
this host) and only end its own activations. Rules decide which ports can ever be opened.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .engine import Source
from .errors import IgdTriggerError, RuleNotFound, UsageError
from .model import parse_duration
from .netutil import guess_lan_address
from .service import Service

log = logging.getLogger("igdtrigger.api")
SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
MAX_BODY = 16 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Forbidden(IgdTriggerError):
    http_status = 403


class NotReady(IgdTriggerError):
    http_status = 503


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except IgdTriggerError as exc:
        return _error(exc.http_status, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason or "error")
        raise
    except Exception:
        log.exception("API handler failed: %s %s", request.method, request.path)
        return _error(500, "internal error (see the service log)")


def _is_admin(request: web.Request) -> bool:
    svc = request.app[SERVICE]
    token = svc.api_token
    auth = request.headers.get("Authorization", "")
    if not token or not auth.startswith("Bearer "):
        return False
    return hmac.compare_digest(auth[7:].strip().encode(), token.encode())


def _client_host(request: web.Request) -> str:
    """The address a non-admin client may act for: its own; loopback means this host."""
    svc = request.app[SERVICE]
    remote = request.remote or ""
    try:
        addr = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        raise Forbidden(f"cannot tell the client's address ({remote!r})") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
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
    return str(addr)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise UsageError(f"request body larger than {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise UsageError(f"request body larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


def _ttl(value: object, field: str = "ttl") -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{field}: {exc}") from None


# --- handlers ----------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response({"ok": True, "gateway_up": svc.mapper.gateway_up})


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].status())


async def get_rules(request: web.Request) -> web.Response:
    return web.json_response({"rules": [r.to_json() for r in request.app[SERVICE].rules()]})


async def get_mappings(request: web.Request) -> web.Response:
    return web.json_response({"mappings": request.app[SERVICE].mapper.snapshot()})


async def get_activations(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    acts = sorted(svc.engine.activations.values(), key=lambda a: a.created)
    return web.json_response({"activations": [svc.activation_json(a) for a in acts]})


_POST_FIELDS = {"rule", "ttl", "host", "source", "meta"}


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
    if not isinstance(rule, str) or not rule:
        raise UsageError('field "rule" is required: the name of a configured rule')
    ttl = _ttl(body.get("ttl"))
    source_raw = body.get("source", "api")
    try:
        source = Source(source_raw)
    except ValueError:
        raise UsageError(f'field "source" must be "api" or "run", got {source_raw!r}') from None
    if source is Source.TRAFFIC:
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
        if not _is_admin(request):
            own = _client_host(request)
            if host != own:
                raise Forbidden(
                    f"only the admin token may activate rules for another host ({host}); "
                    f"without it you may act for your own address {own}"
                )
    else:
        host = _client_host(request)
    if svc.engine.rules.get(rule) is None:
        raise RuleNotFound(rule, list(svc.engine.rules))
    result = await svc.activate(rule, host, ttl=ttl, source=source, meta=dict(meta_raw))
    return web.json_response(result, status=201)


def _check_owner(request: web.Request, act_id: str) -> None:
    svc = request.app[SERVICE]
    act = svc.engine.get(act_id)
    if not _is_admin(request) and act.host != _client_host(request):
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
    if set(body) - {"ttl"}:
        raise UsageError('only field "ttl" is allowed')
    _check_owner(request, act_id)
    return web.json_response(svc.heartbeat(act_id, _ttl(body.get("ttl"))))


async def get_activation(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    act = svc.engine.get(request.match_info["id"])
    return web.json_response(svc.activation_json(act))


async def not_found(request: web.Request) -> web.Response:
    return _error(404, f"no such endpoint: {request.method} {request.path}")


def make_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[SERVICE] = service
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/api/v1/status", get_status)
    r.add_get("/api/v1/rules", get_rules)
    r.add_get("/api/v1/mappings", get_mappings)
    r.add_get("/api/v1/activations", get_activations)
    r.add_post("/api/v1/activations", post_activation)
    r.add_get("/api/v1/activations/{id}", get_activation)
    r.add_delete("/api/v1/activations/{id}", delete_activation)
    r.add_post("/api/v1/activations/{id}/refresh", refresh_activation)
    return app
