"""NAT-PMP (RFC 6886) and PCP (RFC 6887) codec: sans-I/O.

Pure functions that build request bytes and parse reply bytes into dataclasses, the result-code
tables with the one mapping from a result code to the package's error (``pmp_error``,
``pcp_error``), the epoch check (``EpochTracker``) and the reply matchers the transport offers
each datagram to (``match_*``: ``None`` for a datagram that is not the awaited reply).

The parsers raise only ``MalformedReply`` (an ``ActionFailed``) or ``ProtocolUnsupported``,
never ``struct.error``/``IndexError``, whatever the bytes. The simulated router
(``igdtrigger.sim``) uses the same tables and field layouts to answer.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from igdtrigger.core.errors import (
    ActionFailed,
    GatewayError,
    MalformedReply,
    MappingConflict,
    NetworkFailure,
    NotAuthorized,
    ProtocolUnsupported,
    TableFull,
)
from igdtrigger.core.model import Proto

__all__ = [
    "ANNOUNCE_GROUP", "ANNOUNCE_PORT", "DEFAULT_PERMANENT_LIFETIME", "DOUBLE_NAT_HINT",
    "MAX_LIFETIME", "NONCE_LEN", "PCP_HEADER", "PCP_MAP_PAYLOAD", "PCP_MAX_PACKET",
    "PCP_RESULTS", "PCP_VERSION", "PMP_RESULTS", "PMP_VERSION", "SERVER_PORT",
    "EpochTracker", "MalformedReply", "NetworkFailure", "PcpOp", "PcpOption", "PcpReply",
    "PmpOp", "PmpReply", "ProtocolUnsupported",
    "build_pcp_announce", "build_pcp_map", "build_pmp_address_request", "build_pmp_map_request",
    "check_pcp_reply", "check_pmp_reply", "decode_ip16", "decode_pcp_reply", "decode_pmp_reply",
    "encode_ip16", "match_pcp_announce", "match_pcp_map", "match_pmp_address", "match_pmp_map",
    "parse_pcp_reply", "parse_pmp_reply", "pcp_error", "pmp_error", "pmp_map_opcode",
]

SERVER_PORT = 5351
ANNOUNCE_GROUP = "224.0.0.1"
ANNOUNCE_PORT = 5350
PMP_VERSION = 0
PCP_VERSION = 2
PCP_MAX_PACKET = 1100
MAX_LIFETIME = 0xFFFFFFFF
DEFAULT_PERMANENT_LIFETIME = 86400

DOUBLE_NAT_HINT = (
    "the router has no public WAN address (double NAT or carrier-grade NAT?): mappings on it "
    "would not be reachable from the internet; map ports on the upstream router instead"
)


# --- shared helpers ----------------------------------------------------------------------------


def _u16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 2], "big")


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 4], "big")


def encode_ip16(address: str) -> bytes:
    """An address as PCP's 16-byte field (IPv4 as ``::ffff:a.b.c.d``). Raises ``ValueError``."""
    addr = ipaddress.ip_address(address)
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def decode_ip16(raw: bytes) -> str:
    """PCP's 16-byte address field as text (IPv4-mapped addresses as plain IPv4)."""
    if len(raw) != 16:
        return ""
    addr = ipaddress.IPv6Address(raw)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def _check_port(name: str, port: int, low: int = 0) -> None:
    if not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"{name} {port!r} is outside {low}-65535")


def _check_lifetime(lifetime: int) -> None:
    if not isinstance(lifetime, int) or not 0 <= lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime {lifetime!r} is outside 0-{MAX_LIFETIME}")


# --- NAT-PMP codec -----------------------------------------------------------------------------


class PmpOp(enum.IntEnum):
    """NAT-PMP opcodes (RFC 6886 §3.2, §3.3)."""
    ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


PMP_RESULTS: dict[int, str] = {
    0: "Success",
    1: "Unsupported Version",
    2: "Not Authorized/Refused",
    3: "Network Failure",
    4: "Out of resources",
    5: "Unsupported opcode",
}


def pmp_map_opcode(proto: Proto) -> PmpOp:
    """The NAT-PMP map opcode for ``proto``."""
    return PmpOp.MAP_UDP if proto is Proto.UDP else PmpOp.MAP_TCP


@dataclass(frozen=True, slots=True)
class PmpReply:
    """A decoded NAT-PMP reply. Fields a short error reply lacks are ``None``."""

    version: int
    opcode: int  # the request's opcode (reply opcode minus 128)
    result: int
    epoch: int | None = None
    external_ip: str | None = None  # address replies
    internal_port: int | None = None  # mapping replies
    external_port: int | None = None
    lifetime: int | None = None
    complete: bool = True  # every field of the reply's opcode was present

    @property
    def result_text(self) -> str:
        """The RFC's name for the result code."""
        return PMP_RESULTS.get(self.result, "unknown result code")


def build_pmp_address_request() -> bytes:
    """Public address request (opcode 0)."""
    return struct.pack("!BB", PMP_VERSION, PmpOp.ADDRESS)


def build_pmp_map_request(proto: Proto, internal_port: int, external_port: int,
                          lifetime: int) -> bytes:
    """Mapping request. ``lifetime`` 0 with ``external_port`` 0 deletes the mapping."""
    _check_port("internal port", internal_port)
    _check_port("suggested external port", external_port)
    _check_lifetime(lifetime)
    return struct.pack("!BBHHHI", PMP_VERSION, pmp_map_opcode(proto), 0, internal_port,
                       external_port, lifetime)


def decode_pmp_reply(data: bytes) -> PmpReply | None:
    """Decode what is there, without judging completeness; ``None`` below 4 bytes."""
    data = bytes(data)
    if len(data) < 4:
        return None
    version, op = data[0], data[1]
    if version != PMP_VERSION:
        # Another protocol's reply (a PCP server answering UNSUPP_VERSION): result byte only.
        result = data[3] if version == PCP_VERSION else _u16(data, 2)
        return PmpReply(version, op & 0x7F, result, complete=False)
    opcode, result = op & 0x7F, _u16(data, 2)
    epoch = _u32(data, 4) if len(data) >= 8 else None
    if not op & 0x80:
        return PmpReply(version, opcode, result, epoch, complete=False)
    if opcode == PmpOp.ADDRESS:
        ip = socket.inet_ntoa(data[8:12]) if len(data) >= 12 else None
        return PmpReply(version, opcode, result, epoch, external_ip=ip, complete=ip is not None)
    if opcode in (PmpOp.MAP_UDP, PmpOp.MAP_TCP):
        return PmpReply(
            version, opcode, result, epoch,
            internal_port=_u16(data, 8) if len(data) >= 10 else None,
            external_port=_u16(data, 10) if len(data) >= 12 else None,
            lifetime=_u32(data, 12) if len(data) >= 16 else None,
            complete=len(data) >= 16,
        )
    return PmpReply(version, opcode, result, epoch, complete=False)


def parse_pmp_reply(data: bytes, action: str = "NAT-PMP request") -> PmpReply:
    """Parse a NAT-PMP reply; raise ``MalformedReply`` unless it is a usable reply.

    Error replies may be short (miniupnpd and TP-Link send 8 bytes); a success must be whole.
    A PCP server's version-2 reply raises ``ProtocolUnsupported``.
    """
    reply = decode_pmp_reply(data)
    if reply is None:
        raise MalformedReply(action, f"{len(data)}-byte reply is too short for NAT-PMP")
    check_pmp_reply(reply, action, len(data))
    return reply


def check_pmp_reply(reply: PmpReply, action: str, length: int) -> None:
    """Raise for a decoded reply that cannot be used (wrong version, not a reply, short)."""
    if reply.version != PMP_VERSION:
        if reply.version == PCP_VERSION and reply.result == 1:
            raise ProtocolUnsupported(
                "router speaks PCP but not NAT-PMP (it answered UNSUPP_VERSION): use PCP",
                code=1, server_version=reply.version)
        raise MalformedReply(action, f"reply has version {reply.version}, not NAT-PMP's 0")
    if reply.epoch is None and reply.result == 0:
        raise MalformedReply(action, f"{length}-byte reply is too short for NAT-PMP")
    if reply.result == 0 and reply.opcode not in (0, 1, 2):
        raise MalformedReply(action, f"success reply for unknown opcode {reply.opcode}")
    if reply.result == 0 and not reply.complete:
        raise MalformedReply(
            action, f"{length}-byte success reply is short (expected "
            f"{12 if reply.opcode == 0 else 16} bytes)",
            "a router bug (seen on FRITZ!Box); use UPnP IGD with this router")


def pmp_error(action: str, result: int) -> GatewayError:
    """The error for a NAT-PMP result code other than 0."""
    text = PMP_RESULTS.get(result, "unknown result code")
    if result == 1:
        return ProtocolUnsupported(
            f"router does not speak NAT-PMP version 0 ({action}: result 1 {text})", code=1)
    if result == 5:
        return ProtocolUnsupported(
            f"router does not support this NAT-PMP opcode ({action}: result 5 {text})", code=5)
    if result == 2:
        return NotAuthorized(
            action, result, text,
            "NAT-PMP is disabled on the router, or a permission rule forbids this port "
            "(miniupnpd: allow/deny lines; ports below 1024 are usually denied)")
    if result == 3:
        return NetworkFailure(action, result, text, DOUBLE_NAT_HINT)
    if result == 4:
        return TableFull(action, result, text,
                         "the router's mapping table is full or no external port is free")
    return ActionFailed(action, result, text)


# --- PCP codec ---------------------------------------------------------------------------------


class PcpOp(enum.IntEnum):
    """PCP opcodes (RFC 6887 §19.2)."""
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class PcpOption(enum.IntEnum):
    """PCP option codes (RFC 6887 §13, §19.4)."""
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


PCP_RESULTS: dict[int, str] = {  # RFC 6887 §7.4
    0: "SUCCESS", 1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE", 5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION", 7: "NETWORK_FAILURE",
    8: "NO_RESOURCES", 9: "UNSUPP_PROTOCOL", 10: "USER_EX_QUOTA", 11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH", 13: "EXCESSIVE_REMOTE_PEERS",
}

PCP_HEADER = 24
PCP_MAP_PAYLOAD = 36
NONCE_LEN = 12


@dataclass(frozen=True, slots=True)
class PcpReply:
    """A decoded PCP reply. MAP fields are ``None`` when the reply carries no MAP payload."""

    version: int
    opcode: int
    result: int
    lifetime: int = 0
    epoch: int | None = None
    nonce: bytes | None = None
    protocol: int | None = None
    internal_port: int | None = None
    external_port: int | None = None
    external_ip: str | None = None
    options: tuple[tuple[int, bytes], ...] = field(default_factory=tuple)
    complete: bool = True

    @property
    def result_text(self) -> str:
        """The RFC's name for the result code."""
        return PCP_RESULTS.get(self.result, "unknown result code")

    def option(self, code: int) -> bytes | None:
        """The first option ``code``'s payload, or ``None``."""
        for c, value in self.options:
            if c == code:
                return value
        return None


def _pcp_option(code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("!BBH", code, 0, len(value)) + value + b"\x00" * pad


def build_pcp_announce(client_ip: str) -> bytes:
    """ANNOUNCE request (opcode 0, lifetime 0)."""
    return struct.pack("!BBHI", PCP_VERSION, PcpOp.ANNOUNCE, 0, 0) + encode_ip16(client_ip)


def build_pcp_map(
    nonce: bytes,
    proto: Proto,
    internal_port: int,
    external_port: int,
    lifetime: int,
    client_ip: str,
    *,
    external_ip: str = "0.0.0.0",
    third_party: str | None = None,
    prefer_failure: bool = False,
) -> bytes:
    """MAP request. ``lifetime`` 0 deletes (with the nonce that created the mapping)."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"PCP nonce must be {NONCE_LEN} bytes, not {len(nonce)}")
    _check_port("internal port", internal_port, 1)
    _check_port("suggested external port", external_port)
    _check_lifetime(lifetime)
    out = struct.pack("!BBHI", PCP_VERSION, PcpOp.MAP, 0, lifetime) + encode_ip16(client_ip)
    out += nonce + struct.pack("!B3xHH", proto.number, internal_port, external_port)
    out += encode_ip16(external_ip)
    if third_party is not None:
        out += _pcp_option(PcpOption.THIRD_PARTY, encode_ip16(third_party))
    if prefer_failure:
        out += _pcp_option(PcpOption.PREFER_FAILURE, b"")
    return out


def _pcp_options(data: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    end = min(len(data), PCP_MAX_PACKET)
    while offset + 4 <= end and len(out) < 64:
        code, _, length = struct.unpack_from("!BBH", data, offset)
        if offset + 4 + length > end:
            break  # truncated option: ignore the rest
        out.append((code, data[offset + 4:offset + 4 + length]))
        offset += 4 + length + (-length) % 4
    return tuple(out)


def decode_pcp_reply(data: bytes) -> PcpReply | None:
    """Decode what is there, without judging completeness; ``None`` below 4 bytes."""
    data = bytes(data)
    if len(data) < 4:
        return None
    version, op = data[0], data[1]
    if version != PCP_VERSION:
        # NAT-PMP (version 0) servers put a 16-bit result at offset 2; PCP uses byte 3.
        result = _u16(data, 2) if version == PMP_VERSION else data[3]
        epoch = _u32(data, 4) if version == PMP_VERSION and len(data) >= 8 else None
        return PcpReply(version, op & 0x7F, result, epoch=epoch, complete=False)
    opcode, result = op & 0x7F, data[3]
    if not op & 0x80:
        return PcpReply(version, opcode, result, complete=False)
    lifetime = _u32(data, 4) if len(data) >= 8 else 0
    epoch = _u32(data, 8) if len(data) >= 12 else None
    if len(data) < PCP_HEADER:
        return PcpReply(version, opcode, result, lifetime, epoch, complete=False)
    if opcode != PcpOp.MAP:
        return PcpReply(version, opcode, result, lifetime, epoch,
                        options=_pcp_options(data, PCP_HEADER))
    if len(data) < PCP_HEADER + PCP_MAP_PAYLOAD:
        return PcpReply(version, opcode, result, lifetime, epoch, complete=False)
    p = PCP_HEADER
    return PcpReply(
        version, opcode, result, lifetime, epoch,
        nonce=data[p:p + NONCE_LEN],
        protocol=data[p + 12],
        internal_port=_u16(data, p + 16),
        external_port=_u16(data, p + 18),
        external_ip=decode_ip16(data[p + 20:p + 36]),
        options=_pcp_options(data, p + PCP_MAP_PAYLOAD),
    )


def parse_pcp_reply(data: bytes, action: str = "PCP request") -> PcpReply:
    """Parse a PCP reply; raise ``MalformedReply`` unless it is usable.

    A NAT-PMP-only server's UNSUPP_VERSION answer (8 or 12 bytes, version 0) raises
    ``ProtocolUnsupported``: fall back to NAT-PMP.
    """
    reply = decode_pcp_reply(data)
    if reply is None:
        raise MalformedReply(action, f"{len(data)}-byte reply is too short for PCP")
    check_pcp_reply(reply, action, len(data))
    return reply


def check_pcp_reply(reply: PcpReply, action: str, length: int) -> None:
    """Raise for a decoded reply that cannot be used (other version, not a reply, short)."""
    if reply.version != PCP_VERSION:
        if reply.result == 1:
            what = "NAT-PMP" if reply.version == PMP_VERSION else f"version {reply.version}"
            raise ProtocolUnsupported(
                f"router does not speak PCP version 2 (it answered in {what} with "
                "UNSUPP_VERSION): use NAT-PMP", code=1, server_version=reply.version)
        raise MalformedReply(action, f"reply has version {reply.version}, not PCP's 2")
    if reply.epoch is None and reply.result == 0:
        raise MalformedReply(action, f"{length}-byte reply is too short for PCP")
    if reply.result == 0 and not reply.complete:
        raise MalformedReply(action, f"{length}-byte success reply is short")


_PCP_HINTS: dict[int, str] = {
    3: "the router could not parse our request (a router bug, or a middlebox mangled it)",
    6: "the router could not parse an option of our request",
    8: "the router's mapping table is full or no external port is free",
    9: "the router cannot map this protocol",
    10: "this host has used up its mapping quota on the router",
    13: "the router limits remote peers",
}


def pcp_error(action: str, result: int, *, third_party: str | None = None,
              client_ip: str = "") -> GatewayError:
    """The error for a PCP result code other than SUCCESS."""
    text = PCP_RESULTS.get(result, "unknown result code")
    if result == 1:
        return ProtocolUnsupported(f"router does not speak PCP version 2 ({action}: {text})",
                                   code=1)
    if result == 4:
        return ProtocolUnsupported(f"router does not support this PCP opcode ({action}: {text})",
                                   code=4)
    if result == 2:
        return NotAuthorized(
            action, result, text,
            "PCP is disabled on the router, a permission rule forbids this port (miniupnpd: "
            "allow/deny lines; ports below 1024 are usually denied), or the mapping belongs "
            "to another client")
    if result == 12:
        return NotAuthorized(
            action, result, text,
            f"the router saw another source address than our PCP client address "
            f"{client_ip or '?'}: another NAT sits between this host and the router, or "
            "client_ip is wrong; run igdtrigger on a host directly on the router's LAN")
    if result == 5 and third_party is not None:
        return NotAuthorized(
            action, result, text,
            f"the router refuses mappings for another host ({third_party}, PCP THIRD_PARTY): "
            f"allow them on the router (miniupnpd: pcp_allow_thirdparty=yes) or run "
            f"igdtrigger on {third_party}")
    if result == 7:
        return NetworkFailure(action, result, text, DOUBLE_NAT_HINT)
    if result == 11:
        return MappingConflict(action, result, text,
                               "the external port is taken by another host or program")
    if result in (8, 10):  # NO_RESOURCES, USER_EX_QUOTA: the same kind as NAT-PMP 4, 728
        return TableFull(action, result, text, _PCP_HINTS[result])
    return ActionFailed(action, result, text, _PCP_HINTS.get(result, ""))


# --- epoch checks ------------------------------------------------------------------------------


class EpochTracker:
    """The RFC's check that the server kept its state between two replies.

    ``observe(epoch, now)`` returns True when the new epoch shows a loss of state:
    NAT-PMP (RFC 6886 §3.6): the epoch is more than 2 s below the previous one plus 7/8 of
    the client time elapsed since. PCP (RFC 6887 §8.5): the epoch went back by more than 1 s,
    or client and server clocks advanced inconsistently.
    """

    def __init__(self, rule: Literal["nat-pmp", "pcp"]) -> None:
        self.rule = rule
        self.server: int | None = None
        self.client = 0.0

    def reset(self) -> None:
        """Forget the last epoch (a new server, or after a reconnect)."""
        self.server = None

    def observe(self, epoch: int, now: float) -> bool:
        """Record ``epoch`` seen at ``now`` (seconds); True when it shows the server lost state."""
        prev_server, prev_client = self.server, self.client
        self.server, self.client = epoch, now
        if prev_server is None:
            return False
        elapsed = max(0.0, now - prev_client)
        if self.rule == "nat-pmp":
            return epoch < prev_server + elapsed * 7 / 8 - 2
        if epoch + 1 < prev_server:
            return True
        server_delta = epoch - prev_server
        return (elapsed + 2 < server_delta - server_delta / 16
                or server_delta + 2 < elapsed - elapsed / 16)


# --- reply matchers (what the transport offers each datagram to) ---------------------------------


def _pmp_reply_for(action: str, data: bytes, opcode: int) -> PmpReply | None:
    """A NAT-PMP reply to ``opcode``, or ``None``; a PCP server's UNSUPP_VERSION raises."""
    reply = decode_pmp_reply(data)
    if reply is None:
        return None
    if reply.version != PMP_VERSION:
        if reply.version == PCP_VERSION and reply.result == 1:
            check_pmp_reply(reply, action, len(data))
        return None
    return reply if reply.opcode == opcode else None


def match_pmp_address(action: str) -> Callable[[bytes], PmpReply | None]:
    """The matcher for an external address request's reply."""

    def match(data: bytes) -> PmpReply | None:
        reply = _pmp_reply_for(action, data, PmpOp.ADDRESS)
        if reply is not None:
            check_pmp_reply(reply, action, len(data))
        return reply

    return match


def match_pmp_map(action: str, opcode: int, internal_port: int,
                  deleting: bool) -> Callable[[bytes], PmpReply | None]:
    """The matcher for a mapping request's reply (``opcode``: ``pmp_map_opcode(proto)``):
    same opcode and internal port, and (for a
    success) a lifetime of the same kind (0 when deleting), so a late duplicate of the other
    operation on this mapping is not taken."""

    def match(data: bytes) -> PmpReply | None:
        reply = _pmp_reply_for(action, data, opcode)
        if reply is None:
            return None
        if reply.internal_port is not None and reply.internal_port != internal_port:
            if reply.result == 0 and reply.internal_port == internal_port & 0xFF:
                raise MalformedReply(
                    action, f"reply names internal port {reply.internal_port}, not "
                    f"{internal_port}",
                    "old miniupnpd bug (ports cut to 8 bits): the mapping may exist under "
                    "other ports; update the router's firmware or use UPnP IGD")
            return None
        if reply.result == 0 and reply.lifetime is not None \
                and deleting != (reply.lifetime == 0):
            return None
        check_pmp_reply(reply, action, len(data))
        return reply

    return match


def _pcp_reply_for(action: str, data: bytes, opcode: int) -> PcpReply | None:
    """A PCP reply to ``opcode``, or ``None``; a NAT-PMP server's UNSUPP_VERSION raises."""
    reply = decode_pcp_reply(data)
    if reply is None:
        return None
    if reply.version != PCP_VERSION:
        if reply.result == 1:
            check_pcp_reply(reply, action, len(data))
        return None
    return reply if reply.opcode == opcode else None


def match_pcp_announce(action: str) -> Callable[[bytes], PcpReply | None]:
    """The matcher for an ANNOUNCE request's reply."""

    def match(data: bytes) -> PcpReply | None:
        reply = _pcp_reply_for(action, data, PcpOp.ANNOUNCE)
        if reply is not None:
            check_pcp_reply(reply, action, len(data))
        return reply

    return match


def match_pcp_map(action: str, nonce: bytes, proto: Proto, internal_port: int,
                  deleting: bool) -> Callable[[bytes], PcpReply | None]:
    """The matcher for a MAP request's reply: same nonce, protocol and internal port; an
    error reply without the MAP payload is taken (it cannot tell whose it is)."""

    def match(data: bytes) -> PcpReply | None:
        reply = _pcp_reply_for(action, data, PcpOp.MAP)
        if reply is None:
            return None
        if reply.nonce is None:
            check_pcp_reply(reply, action, len(data))
            return reply
        if reply.nonce != nonce or reply.protocol != proto.number \
                or reply.internal_port != internal_port:
            return None
        if reply.result == 0 and deleting != (reply.lifetime == 0):
            return None  # a late duplicate of the other operation on this mapping
        return reply

    return match
