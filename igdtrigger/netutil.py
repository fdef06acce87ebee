"""Small facts about this host's network: its LAN address and default gateway."""

from __future__ import annotations

import contextlib
import socket
import urllib.parse
from typing import Any


def default_gateway() -> str | None:
    """The IPv4 default gateway, via netifaces (``netifaces-plus``), or ``None``."""
    try:
        import netifaces
    except ImportError:
        return None
    try:
        gws: Any = netifaces.gateways()
        entry = gws.get("default", {}).get(netifaces.AF_INET)
    except Exception:  # a broken interface table must not break the service
        return None
    return str(entry[0]) if entry else None


def source_address_for(host: str) -> str | None:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 1900))
        addr = str(s.getsockname()[0])
        return None if addr.startswith("0.") else addr
    return None


def guess_lan_address(gateway_url: str | None) -> str | None:
    """Our LAN address: the one that reaches the router (from its URL, else the default route)."""
    host = urllib.parse.urlsplit(gateway_url).hostname if gateway_url else None
    host = host or default_gateway()
    return source_address_for(host) if host else None
