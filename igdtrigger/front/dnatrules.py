"""One front mapping's inner forwarding rule (topology 1, :mod:`.dnat`): the :class:`DnatRule`,
its nf_tables expressions for a netlink batch (:func:`dnat_exprs`, :func:`use_exprs`: what
``nft`` itself encodes for the rule lines :mod:`.dnat` writes, so both paths load the same rule),
and the rules read back from ``nft -j`` listings (:func:`rule_of`, :func:`counted`,
:func:`items`). Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from igdtrigger import nftnl
from igdtrigger.core.model import Proto

__all__ = ["DnatRule", "accept_exprs", "counted", "dnat_exprs", "items", "rule_of", "use_exprs"]


@dataclass(frozen=True, slots=True, order=True)
class DnatRule:
    """One front mapping's inner forwarding: ``proto`` packets to ``external_port`` of this
    host, arriving on the upstream interface, go to ``client:internal_port``."""

    proto: Proto
    external_port: int
    client: str
    internal_port: int

    def __post_init__(self) -> None:
        for name, port in (("external port", self.external_port),
                           ("internal port", self.internal_port)):
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} {port} is outside 1-65535")
        if not isinstance(ipaddress.ip_address(self.client), ipaddress.IPv4Address):
            raise ValueError(f"inner DNAT needs an IPv4 client, not {self.client}")


_L4 = {Proto.UDP: 17, Proto.TCP: 6}


def dnat_exprs(wan_interface: str, rule: DnatRule) -> list[bytes]:
    """``iifname "<wan>" fib daddr type local <proto> dport <ext> dnat to <client>:<int>`` as
    nft 1.0 encodes it (``nft --debug=netlink``)."""
    return [nftnl.meta(nftnl.NFT_META_IIFNAME), nftnl.cmp(nftnl.ifname(wan_interface)),
            nftnl.fib(nftnl.NFTA_FIB_F_DADDR, nftnl.NFT_FIB_RESULT_ADDRTYPE),
            nftnl.cmp(nftnl.host32(nftnl.RTN_LOCAL)), *_port_match(rule.proto, 2,
                                                                   rule.external_port),
            nftnl.immediate(nftnl.ipv4(rule.client), nftnl.NFT_REG_1),
            nftnl.immediate(nftnl.port(rule.internal_port), nftnl.NFT_REG_2),
            nftnl.nat(nftnl.NFT_NAT_DNAT, nftnl.NFPROTO_IPV4, reg_addr=nftnl.NFT_REG_1,
                      reg_proto=nftnl.NFT_REG_2)]


def use_exprs(rule: DnatRule) -> list[list[bytes]]:
    """The ``used`` chain's two counting rules (``front.dnat.InnerDnat._use_lines``), encoded."""
    addr = nftnl.ipv4(rule.client)
    into = [*_dnat_status(), nftnl.payload(nftnl.NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
            nftnl.cmp(addr), *_port_match(rule.proto, 2, rule.internal_port), nftnl.counter()]
    out = [nftnl.payload(nftnl.NFT_PAYLOAD_NETWORK_HEADER, 12, 4), nftnl.cmp(addr),
           *_port_match(rule.proto, 0, rule.internal_port), nftnl.counter()]
    return [into, out]


def accept_exprs(wan_interface: str, rule: DnatRule, family: str) -> list[bytes] | None:
    """The accept rule in the user's ``forward_chain`` (``iifname "<wan>" ip daddr <client>
    <proto> dport <int> ct status dnat accept``) for a chain of ``family`` ``ip`` or
    ``inet`` (where nft puts ``meta nfproto ipv4`` before ``ip daddr``); ``None`` for other
    families (the ``nft`` path writes those)."""
    if family not in ("ip", "inet"):
        return None
    nfproto = [nftnl.meta(nftnl.NFT_META_NFPROTO), nftnl.cmp(bytes([nftnl.NFPROTO_IPV4]))] \
        if family == "inet" else []
    return [nftnl.meta(nftnl.NFT_META_IIFNAME), nftnl.cmp(nftnl.ifname(wan_interface)), *nfproto,
            nftnl.payload(nftnl.NFT_PAYLOAD_NETWORK_HEADER, 16, 4),
            nftnl.cmp(nftnl.ipv4(rule.client)), *_port_match(rule.proto, 2, rule.internal_port),
            *_dnat_status(), nftnl.verdict(nftnl.NF_ACCEPT)]


def _dnat_status() -> list[bytes]:
    """``ct status dnat``."""
    return [nftnl.ct(nftnl.NFT_CT_STATUS),
            nftnl.bitwise(nftnl.host32(nftnl.IPS_DST_NAT), nftnl.host32(0)),
            nftnl.cmp(nftnl.host32(0), op=nftnl.NFT_CMP_NEQ)]


def _port_match(proto: Proto, offset: int, number: int) -> list[bytes]:
    """``udp dport N`` (offset 2) / ``sport`` (0): l4proto, then the transport header."""
    return [nftnl.meta(nftnl.NFT_META_L4PROTO), nftnl.cmp(bytes([_L4[proto]])),
            nftnl.payload(nftnl.NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2),
            nftnl.cmp(nftnl.port(number))]


def items(listing: str, kind: str) -> list[dict[str, Any]]:
    """The ``kind`` objects (``"rule"``, ``"chain"``) of an ``nft -j`` listing ([] if bad)."""
    try:
        found = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return []
    return [item[kind] for item in found if isinstance(item, dict) and
            isinstance(item.get(kind), dict)]


def rule_of(rule: dict[str, Any]) -> DnatRule | None:
    """A ``prerouting`` rule of an ``nft -j`` listing as the :class:`DnatRule` it carries
    (``None``: not one of ours)."""
    proto: Proto | None = None
    port = 0
    target: dict[str, Any] = {}
    for expr in rule.get("expr", []):
        match = expr.get("match") if isinstance(expr, dict) else None
        if isinstance(match, dict):
            left = match.get("left")
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            if isinstance(payload, dict) and payload.get("field") == "dport":
                proto = Proto.__members__.get(str(payload.get("protocol", "")).upper())
                right = match.get("right")
                port = right if isinstance(right, int) else 0
        elif isinstance(expr, dict) and isinstance(expr.get("dnat"), dict):
            target = expr["dnat"]
    try:
        return DnatRule(proto, port, str(target["addr"]), int(target["port"])) \
            if proto is not None and target else None
    except (KeyError, ValueError, TypeError):
        return None


def counted(rule: dict[str, Any]) -> tuple[tuple[Proto, str, int] | None, int]:
    """A ``used`` rule's (protocol, client, internal port) and its packet count."""
    proto: Proto | None = None
    client, port, packets = "", 0, 0
    for expr in rule.get("expr", []):
        match = expr.get("match") if isinstance(expr, dict) else None
        if isinstance(match, dict) and isinstance(match.get("left"), dict):
            payload = match["left"].get("payload", {})
            right = match.get("right")
            if not isinstance(payload, dict):
                continue
            if payload.get("field") in ("saddr", "daddr") and isinstance(right, str):
                client = right
            elif payload.get("field") in ("sport", "dport") and isinstance(right, int):
                proto = Proto.__members__.get(str(payload.get("protocol", "")).upper())
                port = right
        elif isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
            packets = int(expr["counter"].get("packets", 0) or 0)
    return ((proto, client, port) if proto is not None and client and port else None), packets
