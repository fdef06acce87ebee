"""Where the front sits (issue 14), for ``serve``, ``status`` and ``doctor``.

Topology 1, *home gateway*: this host forwards IPv4 and the route to the upstream router leaves
by an interface that is not one of ``[front] interfaces``; the upstream mapping then points at
our own upstream address and :mod:`.dnat` forwards on to the client. Topology 2, *LAN host or
home server*: the upstream mapping points at the client directly, and the upstream router must
allow that (secure mode off) unless the clients are this host's own apps.
"""

from __future__ import annotations

import enum
import logging
import urllib.parse
from collections.abc import Sequence
from typing import Any

from igdtrigger.front.dnat import (
    TABLE,
    DnatForwarder,
    ForwardDrop,
    InnerDnat,
    interface_of,
    read_forward_drops,
)
from igdtrigger.netutil import default_gateway, source_address_for

__all__ = ["Topology", "detect_topology", "local_topology", "make_forwarder",
           "topology_checks", "topology_status", "upstream_host"]

log = logging.getLogger("igdtrigger.front")


class Topology(enum.StrEnum):
    """Where igdtrigger sits (issue 14): ``gateway`` (topology 1: it routes the served LAN,
    so the upstream mapping points at its own upstream address and :class:`InnerDnat` forwards
    on) or ``host`` (topology 2: a LAN host or home server; the upstream mapping points at the
    client directly)."""

    GATEWAY = "gateway"
    HOST = "host"


def _forwarding() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def detect_topology(served: Sequence[str], upstream_host: str) -> tuple[Topology, str | None]:
    """Topology 1 when this host forwards IPv4 and the interface towards ``upstream_host``
    (the upstream router) is not one of the ``served`` LAN interfaces; also that interface's
    name (``None`` when the route is unknown)."""
    own = source_address_for(upstream_host)
    wan = interface_of(own) if own else None
    if wan is not None and _forwarding() and served and wan not in served:
        return Topology.GATEWAY, wan
    return Topology.HOST, wan


def upstream_host(url: str | None) -> str | None:
    """The upstream router's address: its IGD URL's host, else the default gateway."""
    host = urllib.parse.urlsplit(url).hostname if url else None
    return host or default_gateway()


def make_forwarder(interfaces: Sequence[str], upstream_host: str | None, *,
                   forward_chain: str | None = None) -> DnatForwarder | None:
    """The forwarder for topology 1, or ``None`` for topology 2 (see :func:`detect_topology`):
    ``interfaces`` are ``[front] interfaces``, ``upstream_host`` the upstream router's address
    (its IGD URL's host, or the default gateway). Raises ``ConfigError`` for a bad
    ``forward_chain``."""
    if not upstream_host:
        return None
    topology, wan = detect_topology(interfaces, upstream_host)
    if topology is not Topology.GATEWAY or wan is None:
        return None
    log.info("front: this host routes the LAN (%s) to the upstream router via %s: mappings "
             "point at our own upstream address, inner DNAT in table %s",
             ", ".join(interfaces), wan, TABLE)
    return DnatForwarder(InnerDnat(wan, forward_chain=forward_chain), upstream_host)


_HOST_ROUTER = ("upstream mappings point at each client directly: the upstream router must let "
                "a host map ports for another address (UPnP secure mode off; miniupnpd "
                "secure_mode=no, PCP THIRD_PARTY), unless the clients are this host's own apps; "
                "other hosts' traffic does not pass here, so their mappings stay only while "
                "they renew them")
_GATEWAY_ROUTER = ("upstream mappings point at this host's own upstream address (a secure-mode "
                   "router accepts them); the inner DNAT forwards to clients")


def _gateway_status(wan: str, address: str | None, forward_chain: str | None,
                    drops: list[ForwardDrop] | None) -> dict[str, Any]:
    return {"kind": Topology.GATEWAY.value, "upstream_interface": wan,
            "upstream_address": address, "forward_chain": forward_chain,
            "forward_drops": None if drops is None else [d.text for d in drops],
            "router": _GATEWAY_ROUTER}


def topology_status(forwarder: DnatForwarder | None,
                    drops: list[ForwardDrop] | None) -> dict[str, Any]:
    """The front's topology for ``status`` and ``doctor``: ``kind`` (``gateway``/``host``), the
    upstream interface and our address there (gateway), the forward chains that would drop
    the forwarded packets (``forward_drops``: ``None`` = could not be read), and ``router``:
    what the upstream router must allow."""
    if forwarder is None:
        return {"kind": Topology.HOST.value, "router": _HOST_ROUTER}
    return _gateway_status(forwarder.dnat.wan_interface, forwarder.upstream_address(),
                           " ".join(forwarder.dnat.forward_chain or ()) or None, drops)


def local_topology(interfaces: Sequence[str], gateway_url: str | None, *,
                   forward_chain: str | None = None) -> dict[str, Any]:
    """What ``serve`` would find on this host now (``doctor``, with or without a running
    service): :func:`topology_status`'s shape, read without touching anything (the route, the
    forwarding switch, ``nft -j list ruleset``), plus ``note`` when the two readings may
    surprise (this host forwards but no LAN interface is named; the upstream is unknown)."""
    host = upstream_host(gateway_url)
    if not host:
        return {"kind": Topology.HOST.value, "router": _HOST_ROUTER,
                "note": "no default route and no [gateway] url: the upstream router is unknown"}
    topology, wan = detect_topology(interfaces, host)
    if topology is Topology.GATEWAY and wan is not None:
        return _gateway_status(wan, source_address_for(host), forward_chain,
                               read_forward_drops(forward_chain=forward_chain))
    out: dict[str, Any] = {"kind": Topology.HOST.value, "router": _HOST_ROUTER}
    if _forwarding() and not interfaces:
        out["note"] = (f"this host forwards IPv4, but [front] interfaces names no LAN "
                       f"interface, so it is served as a LAN host; if it routes the LAN, name "
                       f"the LAN interfaces (not {wan or 'the upstream one'}) for topology 1")
    return out


def topology_checks(topology: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``doctor``'s lines (level, name, detail, fix) about the front's topology."""
    if not topology:
        return []
    kind = topology.get("kind")
    if kind != Topology.GATEWAY.value:
        out_host = [("ok", "front topology", "LAN host or home server (topology 2)",
                     str(topology.get("router", "")))]
        if topology.get("note"):
            out_host.append(("warn", "front topology", str(topology["note"]), ""))
        return out_host
    out = [("ok", "front topology",
            f"home gateway (topology 1): upstream via {topology.get('upstream_interface')} "
            f"({topology.get('upstream_address') or 'address unknown'}), inner DNAT in table "
            f"{TABLE}", "")]
    drops = topology.get("forward_drops")
    if drops is None:
        out.append(("warn", "front forwarding", "could not read the forward chains (nft)",
                    "run as root / with CAP_NET_ADMIN"))
    for text in drops or []:
        out.append(("FAIL", "front forwarding", str(text),
                    "add 'ct status dnat accept' to that chain, or set [front] forward_chain"))
    return out
