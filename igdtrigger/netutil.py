"""Small facts about this host's network: its LAN address and default gateway."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.parse
from typing import Any

__all__ = [
    "Network", "default_gateway", "default_route", "guess_lan_address", "host_key",
    "interface_networks", "source_address_for",
]


def default_route(*, ipv6: bool = False) -> tuple[str, str] | None:
    """The default route's next hop (an address, without ``%zone``) and interface name, IPv4
    or ``ipv6``, via netifaces (``netifaces-plus``); ``None`` when there is no such route,
    netifaces is missing, or the routing table cannot be read."""
    try:
        import netifaces  # optional dependency: without it there is no route to read
    except ImportError:
        return None
    try:
        gws: Any = netifaces.gateways()
        entry = gws.get("default", {}).get(netifaces.AF_INET6 if ipv6 else netifaces.AF_INET)
    except Exception:  # a broken routing table must not break the service
        return None
    if not entry:
        return None
    return str(entry[0]).split("%", 1)[0], str(entry[1])


def default_gateway() -> str | None:
    """The IPv4 default gateway's address (``default_route``), or ``None``."""
    route = default_route()
    return route[0] if route else None


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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def interface_networks(listen_host: str = "") -> tuple[Network, ...]:
    """The networks (address/prefix) of this host's interfaces, loopback excluded: of the one
    interface holding ``listen_host``, or of all of them when it is a wildcard (``0.0.0.0``,
    ``::``, ``""``). Read through netifaces; empty when that is missing or fails."""
    try:
        import netifaces  # optional dependency: without it the networks are not known
    except ImportError:
        return ()
    try:
        listen = ipaddress.ip_address(listen_host) if listen_host not in ("", "localhost") \
            else None
    except ValueError:
        listen = None
    wildcard = listen is None or listen.is_unspecified
    out: list[Network] = []
    try:
        for iface in netifaces.interfaces():
            nets: list[Network] = []
            holds = False
            addrs: Any = netifaces.ifaddresses(iface)
            for family in (netifaces.AF_INET, netifaces.AF_INET6):
                for entry in addrs.get(family, []):
                    net = _entry_network(entry)
                    if net is None:
                        continue
                    holds = holds or (listen is not None and
                                      ipaddress.ip_address(_bare(entry["addr"])) == listen)
                    if not net.network_address.is_loopback:
                        nets.append(net)
            if wildcard or holds:
                out.extend(nets)
    except Exception:  # a broken interface table must not break the service
        return ()
    return tuple(dict.fromkeys(out))


def _bare(addr: str) -> str:
    return addr.split("%")[0]


def _entry_network(entry: dict[str, Any]) -> Network | None:
    addr = _bare(str(entry.get("addr", "")))
    mask = str(entry.get("netmask") or entry.get("mask") or "")
    if "/" in mask:  # netifaces gives IPv6 masks as "ffff:ffff::/64"
        mask = mask.rpartition("/")[2]
    try:
        return ipaddress.ip_network(f"{addr}/{mask}" if mask else addr, strict=False)
    except ValueError:
        return None


def host_key(host: str) -> str:
    """One client's key for per-host limits (connections, request rate, event streams,
    activations): its IPv4 address, or its IPv6 /64, since one host may use any number of
    (privacy) addresses in its prefix. A string that is not an address is its own key."""
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
