"""NAT-PMP (RFC 6886) and PCP (RFC 6887) server codec: requests parsed, responses built (sans-I/O).

The mirror of the client codec in :mod:`igdtrigger.gateway.natpmp.codec` (its constants are
reused: port, versions, opcodes, option codes, the 1100-byte bound). No socket, no clock: the
caller passes the packet's source address and the epoch, and sends what comes back.

:func:`parse_request` turns one datagram into a request dataclass, or a :class:`Rejected` that
carries the error response to send (``None``: drop silently, as the RFCs say for responses and
runts). The checks follow RFC 6887 §8.3 in its order:

* under 2 octets, or a response (PCP R bit / NAT-PMP opcode >= 128): dropped;
* version 0 is NAT-PMP, version 2 PCP; any other version gets PCP's UNSUPP_VERSION in a
  version-2 response (our highest, so the client can fall back, §9);
* an unknown opcode: UNSUPP_OPCODE (PCP 4, NAT-PMP 5; PEER is not offered: 4);
* over 1100 octets, not a multiple of 4, or too short for its opcode: MALFORMED_REQUEST;
* a client address field other than the packet's source: ADDRESS_MISMATCH (a NAT between the
  client and us, §8.3);
* options: an unknown mandatory option (code < 128) UNSUPP_OPTION; a known one with a bad
  length, repeated, or on the wrong opcode MALFORMED_OPTION; FILTER is not offered
  (UNSUPP_OPTION); optional options (>= 128) are skipped;
* MAP: protocol other than TCP/UDP (or 0 "all" outside a delete) UNSUPP_PROTOCOL; internal port
  0 (all ports) outside a delete: UNSUPP_PROTOCOL as well (we map single ports only).

Error response lifetimes (§7.4): long-lived errors (the request will never work) 1800 s,
short-lived ones (the network or the table may change) 30 s.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from igdtrigger.core.model import Proto
from igdtrigger.gateway.natpmp.codec import (
    NONCE_LEN,
    PCP_HEADER,
    PCP_MAP_PAYLOAD,
    PCP_MAX_PACKET,
    PCP_VERSION,
    PMP_VERSION,
    PcpOp,
    PcpOption,
    PmpOp,
    decode_ip16,
    encode_ip16,
)

__all__ = [
    "LONG_ERROR_LIFETIME",
    "SHORT_ERROR_LIFETIME",
    "PcpAnnounceRequest",
    "PcpMapRequest",
    "PcpResult",
    "PmpAddressRequest",
    "PmpMapRequest",
    "PmpResult",
    "Rejected",
    "Request",
    "build_pcp_announce_response",
    "build_pcp_map_response",
    "build_pmp_address_response",
    "build_pmp_map_response",
    "error_lifetime",
    "map_conflict",
    "parse_request",
]

LONG_ERROR_LIFETIME = 1800
SHORT_ERROR_LIFETIME = 30


class PmpResult(enum.IntEnum):
    """NAT-PMP result codes (RFC 6886 §3.5); the texts are the client codec's ``PMP_RESULTS``."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    NO_RESOURCES = 4
    UNSUPP_OPCODE = 5


class PcpResult(enum.IntEnum):
    """PCP result codes (RFC 6887 §7.4); names as the client codec's ``PCP_RESULTS``."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


_SHORT_LIVED = frozenset({PcpResult.NETWORK_FAILURE, PcpResult.NO_RESOURCES,
                          PcpResult.USER_EX_QUOTA, PcpResult.CANNOT_PROVIDE_EXTERNAL,
                          PcpResult.EXCESSIVE_REMOTE_PEERS})


def error_lifetime(result: PcpResult) -> int:
    """How long (s) a client should expect the same error (RFC 6887 §7.4's two classes)."""
    return SHORT_ERROR_LIFETIME if result in _SHORT_LIVED else LONG_ERROR_LIFETIME


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PmpAddressRequest:
    """NAT-PMP opcode 0: what is the external address?"""


@dataclass(frozen=True, slots=True)
class PmpMapRequest:
    """NAT-PMP opcode 1 (UDP) / 2 (TCP). ``lifetime`` 0 deletes; with internal port 0 too it
    deletes every mapping of the client for that protocol (RFC 6886 §3.4)."""

    proto: Proto
    internal_port: int
    external_port: int  # suggested; 0 = any
    lifetime: int


@dataclass(frozen=True, slots=True)
class PcpAnnounceRequest:
    """PCP ANNOUNCE (opcode 0): the client checks the server's epoch."""

    client_ip: str
    raw: bytes  # the request, echoed in the response's header fields


@dataclass(frozen=True, slots=True)
class PcpMapRequest:
    """PCP MAP (opcode 1). ``proto`` is ``None`` for protocol 0 (all protocols: delete only).
    ``third_party``: the THIRD_PARTY option's address (a mapping for another host).
    ``external_ip``: the suggested external address ("" when unspecified: all zeros)."""

    lifetime: int
    client_ip: str
    nonce: bytes
    protocol: int
    proto: Proto | None
    internal_port: int
    external_port: int
    external_ip: str
    prefer_failure: bool = False
    third_party: str | None = None

    @property
    def internal_client(self) -> str:
        """The host the mapping is for: THIRD_PARTY's address, else the client's."""
        return self.third_party or self.client_ip


Request = PmpAddressRequest | PmpMapRequest | PcpAnnounceRequest | PcpMapRequest


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request that is not served: ``response`` to send (``None``: drop silently), ``result``
    (the code sent, -1 when dropped) and ``reason`` (for the log and the counters)."""

    response: bytes | None
    result: int
    reason: str


def _u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("!H", data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("!I", data, offset)[0])


def _unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return True


# --- NAT-PMP ----------------------------------------------------------------------------------


def pmp_error(opcode: int, result: PmpResult, epoch: int) -> bytes:
    """The 8-byte NAT-PMP error reply (version, opcode+128, result, epoch), as miniupnpd sends."""
    return struct.pack("!BBHI", PMP_VERSION, (opcode & 0x7F) | 0x80, result, epoch)


def _parse_pmp(data: bytes, epoch: int) -> Request | Rejected:
    op = data[1]
    if op == PmpOp.ADDRESS:
        return PmpAddressRequest()
    if op not in (PmpOp.MAP_UDP, PmpOp.MAP_TCP):
        return Rejected(pmp_error(op, PmpResult.UNSUPP_OPCODE, epoch), PmpResult.UNSUPP_OPCODE,
                        f"NAT-PMP opcode {op} is not supported")
    if len(data) < 12:
        # RFC 6886 has no "malformed" code: a short mapping request is dropped (miniupnpd too).
        return Rejected(None, -1, f"{len(data)}-byte NAT-PMP mapping request (needs 12)")
    proto = Proto.UDP if op == PmpOp.MAP_UDP else Proto.TCP
    internal, external, lifetime = _u16(data, 4), _u16(data, 6), _u32(data, 8)
    if internal == 0 and lifetime != 0:
        return Rejected(pmp_error(op, PmpResult.NOT_AUTHORIZED, epoch), PmpResult.NOT_AUTHORIZED,
                        "NAT-PMP mapping request for internal port 0 (allowed only to delete)")
    return PmpMapRequest(proto, internal, external, lifetime)


def build_pmp_address_response(epoch: int, external_ip: str | None) -> bytes:
    """Opcode 128 reply: SUCCESS with the IPv4 external address; NETWORK_FAILURE (RFC 6886 §3.2:
    "the NAT gateway does not have a DHCP-allocated IP address") when it is unknown or IPv6."""
    try:
        addr = ipaddress.ip_address(external_ip or "")
    except ValueError:
        addr = None
    if not isinstance(addr, ipaddress.IPv4Address) or addr.is_unspecified:
        return struct.pack("!BBHI4s", PMP_VERSION, 128, PmpResult.NETWORK_FAILURE, epoch,
                           b"\x00" * 4)
    return struct.pack("!BBHI4s", PMP_VERSION, 128, PmpResult.SUCCESS, epoch, addr.packed)


def build_pmp_map_response(req: PmpMapRequest, epoch: int, result: PmpResult,
                           external_port: int = 0, lifetime: int = 0) -> bytes:
    """Opcode 129/130 reply (16 bytes). On error the ports are echoed and the lifetime is 0."""
    op = PmpOp.MAP_UDP if req.proto is Proto.UDP else PmpOp.MAP_TCP
    if result is not PmpResult.SUCCESS:
        external_port, lifetime = req.external_port, 0
    return struct.pack("!BBHIHHI", PMP_VERSION, op | 0x80, result, epoch, req.internal_port,
                       external_port, min(lifetime, 0xFFFFFFFF))


# --- PCP --------------------------------------------------------------------------------------


def _pcp_header(opcode: int, result: PcpResult, lifetime: int, epoch: int) -> bytes:
    return struct.pack("!BBBBII12x", PCP_VERSION, (opcode & 0x7F) | 0x80, 0, result,
                       min(lifetime, 0xFFFFFFFF), epoch)


def _pcp_error(data: bytes, result: PcpResult, epoch: int, reason: str) -> Rejected:
    """An error response: the header, plus the opcode's payload copied from the request when it
    is all there (§8.3: "fields from the request copied into the response"), padded to 4."""
    opcode = data[1] & 0x7F
    body = b""
    if opcode == PcpOp.MAP and len(data) >= PCP_HEADER + PCP_MAP_PAYLOAD:
        body = data[PCP_HEADER:PCP_HEADER + PCP_MAP_PAYLOAD]
    return Rejected(_pcp_header(opcode, result, error_lifetime(result), epoch) + body,
                    result, reason)


def _pcp_options(data: bytes, offset: int, opcode: int, epoch: int,
                 found: dict[int, bytes]) -> Rejected | None:
    """Read the options from ``offset`` into ``found``; an error response, or ``None``."""
    while offset < len(data):
        if offset + 4 > len(data):
            return _pcp_error(data, PcpResult.MALFORMED_OPTION, epoch, "truncated option header")
        code, _, length = struct.unpack_from("!BBH", data, offset)
        end = offset + 4 + length
        if end > len(data):
            return _pcp_error(data, PcpResult.MALFORMED_OPTION, epoch,
                              f"option {code} runs past the end of the request")
        value = data[offset + 4:end]
        offset = end + (-length) % 4
        if code >= 128:
            continue  # optional to process (§7.3): we know none, so skip
        if code == PcpOption.FILTER:
            return _pcp_error(data, PcpResult.UNSUPP_OPTION, epoch,
                              "FILTER option is not supported (mappings accept any peer)")
        if code not in (PcpOption.THIRD_PARTY, PcpOption.PREFER_FAILURE):
            return _pcp_error(data, PcpResult.UNSUPP_OPTION, epoch,
                              f"option {code} is not supported")
        want = 16 if code == PcpOption.THIRD_PARTY else 0
        if length != want or code in found or opcode != PcpOp.MAP:
            why = ("repeated" if code in found else f"length {length}, expected {want}"
                   if length != want else "not valid with this opcode")
            return _pcp_error(data, PcpResult.MALFORMED_OPTION, epoch,
                              f"{PcpOption(code).name} option {why}")
        found[code] = value
    return None


def _parse_pcp(data: bytes, source: str, epoch: int) -> Request | Rejected:
    opcode = data[1]
    if opcode not in (PcpOp.ANNOUNCE, PcpOp.MAP):
        what = "PEER" if opcode == PcpOp.PEER else f"opcode {opcode}"
        return _pcp_error(data, PcpResult.UNSUPP_OPCODE, epoch, f"PCP {what} is not supported")
    need = PCP_HEADER + (PCP_MAP_PAYLOAD if opcode == PcpOp.MAP else 0)
    if len(data) > PCP_MAX_PACKET or len(data) % 4 or len(data) < need:
        return _pcp_error(data, PcpResult.MALFORMED_REQUEST, epoch,
                          f"{len(data)}-byte request (a multiple of 4, {need}-{PCP_MAX_PACKET})")
    client_ip = decode_ip16(data[8:24])
    if client_ip != _canonical(source):
        return _pcp_error(data, PcpResult.ADDRESS_MISMATCH, epoch,
                          f"client address field {client_ip} is not the source {source} "
                          "(a NAT between the client and this server?)")
    lifetime = _u32(data, 4)
    if opcode == PcpOp.ANNOUNCE:
        bad = _pcp_options(data, PCP_HEADER, opcode, epoch, {})
        return bad or PcpAnnounceRequest(client_ip, bytes(data))
    found: dict[int, bytes] = {}
    bad = _pcp_options(data, need, opcode, epoch, found)
    if bad is not None:
        return bad
    p = PCP_HEADER
    protocol, internal, external = data[p + 12], _u16(data, p + 16), _u16(data, p + 18)
    proto = Proto.from_number(protocol)
    deleting = lifetime == 0
    if (proto is None and not (protocol == 0 and deleting)) or (internal == 0 and not deleting):
        what = (f"protocol {protocol}" if proto is None and protocol else
                "all protocols" if proto is None else "all ports (internal port 0)")
        return _pcp_error(data, PcpResult.UNSUPP_PROTOCOL, epoch,
                          f"MAP for {what} is not supported (single TCP/UDP ports only)")
    third = found.get(PcpOption.THIRD_PARTY)
    suggested = decode_ip16(data[p + 20:p + 36])
    return PcpMapRequest(
        lifetime=lifetime, client_ip=client_ip, nonce=bytes(data[p:p + NONCE_LEN]),
        protocol=protocol, proto=proto, internal_port=internal, external_port=external,
        external_ip="" if _unspecified(suggested) else suggested,
        prefer_failure=PcpOption.PREFER_FAILURE in found,
        third_party=decode_ip16(third) if third is not None else None)


def _canonical(address: str) -> str:
    try:
        addr = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def parse_request(data: bytes, source: str, epoch: int) -> Request | Rejected:
    """One datagram from ``source`` (its IP address) -> a request, or a :class:`Rejected`
    whose ``response`` (if any) is to be sent back. ``epoch``: the server's epoch (seconds),
    written into error responses. Never raises, whatever the bytes."""
    data = bytes(data)
    if len(data) < 2:
        return Rejected(None, -1, f"{len(data)}-byte datagram")
    version, op = data[0], data[1]
    if op & 0x80:
        return Rejected(None, -1, "a response, not a request")
    if version == PMP_VERSION:
        return _parse_pmp(data, epoch)
    if version != PCP_VERSION:
        head = data[:2] + b"\x00" * 2
        return Rejected(_pcp_header(head[1], PcpResult.UNSUPP_VERSION,
                                    error_lifetime(PcpResult.UNSUPP_VERSION), epoch),
                        PcpResult.UNSUPP_VERSION, f"version {version} (this server speaks "
                        f"NAT-PMP {PMP_VERSION} and PCP {PCP_VERSION})")
    return _parse_pcp(data, source, epoch)


def build_pcp_announce_response(epoch: int) -> bytes:
    """ANNOUNCE response: SUCCESS, lifetime 0, the epoch (also the unsolicited one sent to
    224.0.0.1:5350 on start, §14.1.3)."""
    return _pcp_header(PcpOp.ANNOUNCE, PcpResult.SUCCESS, 0, epoch)


def build_pcp_map_response(req: PcpMapRequest, epoch: int, result: PcpResult, *,
                           lifetime: int | None = None, external_port: int | None = None,
                           external_ip: str = "") -> bytes:
    """MAP response. Success: the assigned port, address and lifetime (default 0). Error: the
    request's suggestion echoed and ``lifetime`` when given (how long the error will last, as
    :func:`map_conflict` tells), else the error class's lifetime (§7.4). Options processed
    (THIRD_PARTY, PREFER_FAILURE) are included, as §7.3 asks."""
    if result is not PcpResult.SUCCESS:
        lifetime = error_lifetime(result) if lifetime is None else lifetime
        external_port, external_ip = req.external_port, req.external_ip
    port = req.external_port if external_port is None else external_port
    try:
        ext16 = encode_ip16(external_ip) if external_ip else b"\x00" * 16
    except ValueError:
        ext16 = b"\x00" * 16
    out = _pcp_header(PcpOp.MAP, result, max(0, min(lifetime or 0, 0xFFFFFFFF)), epoch)
    out += req.nonce + struct.pack("!B3xHH", req.protocol, req.internal_port, port) + ext16
    if req.third_party is not None:
        out += struct.pack("!BBH", PcpOption.THIRD_PARTY, 0, 16) + encode_ip16(req.third_party)
    if req.prefer_failure:
        out += struct.pack("!BBH", PcpOption.PREFER_FAILURE, 0, 0)
    return out


def map_conflict(req: PcpMapRequest, existing: Iterable[tuple[bytes | None, float]],
                 ) -> int | None:
    """RFC 6887 §11.3 (the Simple Threat Model of §18.1, a home router's): "if the internal
    port, protocol, and internal address match an existing explicit dynamic mapping, but the
    mapping nonce does not match, the request MUST be rejected with a NOT_AUTHORIZED error
    with the lifetime of the error indicating duration of that existing mapping".

    ``existing``: ``(nonce, lifetime s)`` of every live mapping of ``req``'s internal address,
    protocol and internal port, whatever made it: a UPnP IGD or NAT-PMP mapping has no nonce
    (``None``), so it matches no PCP nonce. Returns the NOT_AUTHORIZED error's lifetime (the
    longest such mapping's, whole seconds, at least 1), or ``None`` when ``req`` may go on: a
    new mapping, or one of them has the request's nonce (a renewal or delete of its own; one
    another app made since, on another external port, stays apart). A delete of every mapping
    (internal port 0) is never refused here: it removes the ones with the request's nonce.

    So a PCP client never takes over (renews, re-points or deletes) a mapping that an app
    made over UPnP or NAT-PMP, or another PCP client with its own nonce; it may retry once the
    error's lifetime has passed. (miniupnpd instead replaces a rule that forwards to the same
    internal address and port, whoever made it, ``pcpserver.c`` ``CreatePCPMap_NAT``: with one
    table and no owner per rule it cannot tell; this front knows each mapping's owner.)
    """
    if req.internal_port == 0:
        return None
    mappings = list(existing)
    if any(nonce == req.nonce for nonce, _life in mappings):
        return None  # its own mapping (another app's on another external port stays apart)
    others = [life for _nonce, life in mappings]
    if not others:
        return None
    longest = max(others)  # the error lasts until the last of them is gone
    return max(1, int(min(longest, 0xFFFFFFFF))) if math.isfinite(longest) else 0xFFFFFFFF
