"""Request bodies, validated once at the API boundary into typed requests.

``parse_activation(body)`` turns the JSON object of ``POST /api/v1/activations`` into an
``ActivationRequest``, ``parse_refresh(body)`` that of ``POST .../refresh`` into a
``RefreshRequest``; anything malformed raises ``UsageError`` (HTTP 400) naming the field.
Durations are seconds (a number, or a string such as ``"90s"``, ``"2h"``; at most 7 days).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from igdtrigger.core.activation import Source
from igdtrigger.core.errors import UsageError
from igdtrigger.core.model import parse_duration

__all__ = [
    "ActivationRequest",
    "RefreshRequest",
    "check_refresh_fields",
    "parse_activation",
    "parse_refresh",
    "parse_ttl",
    "short",
]

POST_FIELDS = frozenset({"rule", "open", "ttl", "host", "source", "meta"})
MAX_OPEN_SPECS = 64
MAX_META = 16  # entries; keys up to 64 characters, values up to 256


@dataclass(frozen=True, slots=True)
class ActivationRequest:
    """Activate ``rule`` (a configured rule) or ``open`` (ad-hoc port specs, one of the two)
    for ``host`` (``None``: the caller's own address) for ``ttl`` seconds (``None``: the
    rule's idle timeout)."""

    rule: str | None
    open: tuple[str, ...] | None
    ttl: float | None
    source: Source
    host: str | None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    """Extend an activation by ``ttl`` seconds (``None``: its own ttl); ``self_mapped``: its
    host maps the ports itself (True), or no longer (False)."""

    ttl: float | None
    self_mapped: bool | None


def short(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (for echoing client input in an error)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_ttl(value: object, name: str = "ttl") -> float | None:
    """A duration field in seconds; ``None`` when absent. Raises ``UsageError``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 10**9:
        raise UsageError(f"{name}: {short(str(value))} seconds is out of range (at most 7d)")
    try:
        return parse_duration(value)
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"{name}: {short(str(exc))}") from None


def _open_specs(open_raw: object, rule: object) -> tuple[str, ...] | None:
    if open_raw is None:
        if not isinstance(rule, str) or not rule:
            raise UsageError('field "rule" is required: the name of a configured rule (or '
                             '"open" with ad-hoc ports, when [api] allow_adhoc is on)')
        return None
    if rule is not None:
        raise UsageError('give either "rule" (a configured rule) or "open" (ad-hoc ports), '
                         'not both')
    if not isinstance(open_raw, list) or not all(isinstance(p, str) for p in open_raw) \
            or len(open_raw) > MAX_OPEN_SPECS:
        raise UsageError('field "open" must be a list of port specs like ["udp/34197"]')
    return tuple(open_raw)


def _source(raw: object) -> Source:
    try:
        if not isinstance(raw, str):
            raise ValueError(raw)
        source = Source(raw)
    except ValueError:
        raise UsageError(f'field "source" must be "api" or "run", got {raw!r}') from None
    if source is Source.TRAFFIC or raw not in ("api", "run"):
        raise UsageError('field "source" must be "api" or "run"')
    return source


def _meta(raw: object) -> dict[str, str]:
    meta = raw or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256
        for k, v in meta.items()
    ) or len(meta) > MAX_META:
        raise UsageError(f'field "meta" must be an object of at most {MAX_META} short strings')
    return dict(meta)


def _host(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise UsageError('field "host" must be an IP address string')
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise UsageError(f'field "host": {raw!r} is not an IP address') from None


def parse_activation(body: Mapping[str, Any]) -> ActivationRequest:
    """``POST /api/v1/activations``'s body. Raises ``UsageError`` naming the bad field."""
    unknown = set(body) - POST_FIELDS
    if unknown:
        raise UsageError(
            f"unknown field(s) {', '.join(sorted(unknown))} (allowed: "
            f"{', '.join(sorted(POST_FIELDS))})"
        )
    rule = body.get("rule")
    specs = _open_specs(body.get("open"), rule)
    ttl = parse_ttl(body.get("ttl"))  # checked in this order: the first bad field is named
    source = _source(body.get("source", "api"))
    meta = _meta(body.get("meta"))
    host = _host(body.get("host"))
    return ActivationRequest(rule=rule if specs is None else None, open=specs, ttl=ttl,
                             source=source, host=host, meta=meta)


def check_refresh_fields(body: Mapping[str, Any]) -> bool | None:
    """The refresh body's fields and ``self_mapped`` (the shape; ``ttl`` is checked by
    ``parse_refresh``, after the activation was found). Raises ``UsageError``."""
    if set(body) - {"ttl", "self_mapped"}:
        raise UsageError('only fields "ttl" and "self_mapped" are allowed')
    self_mapped = body.get("self_mapped")
    if self_mapped is not None and not isinstance(self_mapped, bool):
        raise UsageError(f'"self_mapped" must be true or false, got {self_mapped!r}')
    return self_mapped


def parse_refresh(body: Mapping[str, Any]) -> RefreshRequest:
    """``POST /api/v1/activations/{id}/refresh``'s body. Raises ``UsageError``."""
    self_mapped = check_refresh_fields(body)
    return RefreshRequest(parse_ttl(body.get("ttl")), self_mapped)
