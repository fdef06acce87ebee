"""NAT-PMP (RFC 6886) and PCP (RFC 6887) backends.

Three layers:

* Codecs: pure functions that build request bytes and parse reply bytes into dataclasses. The
  parsers raise only ``MalformedReply`` (an ``ActionFailed``) or ``ProtocolUnsupported``, never
  ``struct.error``/``IndexError``, whatever the bytes.
* ``DatagramClient``: a connected UDP socket to ``gateway:5351``. Requests are retransmitted
  after 250 ms, then 500 ms, 1 s, ... within a bounded total (2 s by default); a reply is taken
  only from the gateway address and only when it matches an outstanding request, so requests
  for different mappings can be in flight together (pipelining, at most ``max_in_flight``).
  miniupnpd answers one request at a time (about 4 ms per mapping in the lab, nftables work):
  a window much above 16 queues requests past the 250 ms retransmission timer, and the
  duplicates cost the router more work (one run with 64 in flight lost a mapping that way).
* ``NatPmpGateway`` and ``PcpGateway``: the ``Gateway`` protocol.

Behaviour that differs from UPnP IGD:

* Lifetime 0 means *delete* in both protocols. ``add(spec, 0)`` (UPnP's "permanent") is sent as
  ``permanent_lifetime`` (86400 s by default) and the granted lifetime is returned, so the
  mapper renews it like any timed lease.
* Neither protocol can list or look up mappings. ``get()`` and ``list()`` report this client's
  own table of the mappings it was granted (until they expire, are deleted, or the router is
  seen to lose its state); they never show mappings made by other hosts or programs.
  ``delete()`` of a mapping this client does not hold raises ``NoSuchMapping`` without asking,
  unless it was ``adopt()``-ed: a mapping an earlier run of ours left (after a crash), taken up
  from the journal so that it can be deleted. NAT-PMP deletes name only the protocol and internal
  port (from the host that asks, RFC 6886 §3.4; miniupnpd 2.3.1 natpmp.c deletes only rules
  whose description starts "NAT-PMP", so never a UPnP or PCP mapping). PCP deletes must carry
  the nonce that created the mapping (RFC 6887 §11.1, §15; miniupnpd 2.3.1 keeps it as the
  rule's description "PCP MAP <nonce>" and answers NOT_AUTHORIZED to a delete with another one):
  with a ``nonce_key`` (kept in the journal) the nonce is derived from it and the mapping's
  protocol, internal client and port, so a later run reproduces it; the journal records it too.
* NAT-PMP maps ports only to the host that asks. PCP maps for another host with the
  THIRD_PARTY option, which routers refuse unless allowed (miniupnpd ``pcp_allow_thirdparty``).
* With ``exact_port`` (default) a mapping whose external port the router moved (the port is
  taken) is deleted again and reported as ``MappingConflict``; unless the spec says
  ``external_any``: then the assigned port is kept and returned in ``Granted`` (VPN gateways
  ignore the suggested port and pick their own, yimingliu/py-natpmp#12, gluetun#1882).
* Every reply's epoch is checked (RFC 6886 §3.6, RFC 6887 §8.5). When the router lost its state,
  the client's table is emptied, ``epoch_resets`` counts it and ``on_lost_state(reason)`` runs:
  re-apply every mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from igdtrigger.core.errors import (
    ActionFailed,
    ConfigError,
    GatewayError,
    GatewayTimeout,
    GatewayUnreachable,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
    TableFull,
    socket_fault,
)
from igdtrigger.core.errors import (
    MalformedReply as MalformedReply,  # re-exported: one class for all
)
from igdtrigger.core.errors import NetworkFailure as NetworkFailure
from igdtrigger.core.errors import ProtocolUnsupported as ProtocolUnsupported
from igdtrigger.core.model import MappingKey, MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import Capability, GatewayInfo, Granted, counts_as_public

log = logging.getLogger("igdtrigger.gateway.natpmp.backend")
T = TypeVar("T")

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


# --- errors ------------------------------------------------------------------------------------


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
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class PcpOption(enum.IntEnum):
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


PCP_RESULTS: dict[int, str] = {
    0: "SUCCESS",
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
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
        return PCP_RESULTS.get(self.result, "unknown result code")

    def option(self, code: int) -> bytes | None:
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
        self.server = None

    def observe(self, epoch: int, now: float) -> bool:
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


# --- transport ---------------------------------------------------------------------------------

Matcher = Callable[[bytes], T | None]


class _Pending:
    __slots__ = ("future", "match")

    def __init__(self, match: Callable[[bytes], object | None],
                 future: asyncio.Future[object]) -> None:
        self.match = match
        self.future = future


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DatagramClient) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.owner._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner._error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost()


class DatagramClient:
    """A connected UDP socket to one server, with RFC 6886 retransmission and reply matching.

    ``request`` sends a payload, resends it after ``initial_timeout`` and then at doubling
    intervals until ``total_timeout`` has passed, and returns what ``match`` made of the first
    datagram it accepted. ``match`` returns ``None`` for datagrams that are not the reply;
    it may raise a ``GatewayError``, which then ends the request. Datagrams are offered to
    every outstanding request, so requests may overlap.
    """

    def __init__(self, host: str, port: int = SERVER_PORT, *, bind_ip: str | None = None,
                 initial_timeout: float = 0.25, total_timeout: float = 2.0) -> None:
        if initial_timeout <= 0 or total_timeout <= 0:
            raise ConfigError("NAT-PMP/PCP timeouts must be greater than zero")
        try:
            self._peer = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"gateway address {host!r} is not an IP address") from None
        self.host = host
        self.port = port
        self.bind_ip = bind_ip
        self.initial_timeout = initial_timeout
        self.total_timeout = total_timeout
        self.local_address = ""
        self.local_port = 0
        self.sent = 0
        self.received = 0
        self.ignored = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: list[_Pending] = []
        self._last_error: str = ""

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def open(self) -> None:
        """Create the socket (no traffic yet); learn the local address the router sees."""
        if self.is_open:
            return
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self),
                remote_addr=(self.host, self.port),
                local_addr=(self.bind_ip, 0) if self.bind_ip else None,
                family=family,
            )
        except OSError as exc:
            raise socket_fault(exc, f"cannot open a UDP socket to {self.host}:{self.port}"
                               ) from None
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.local_address = str(sockname[0]) if sockname else ""
        self.local_port = int(sockname[1]) if sockname else 0

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail_all(GatewayUnreachable(f"connection to {self.host}:{self.port} closed"))

    async def request(self, action: str, payload: bytes, match: Matcher[T], *,
                      total_timeout: float | None = None) -> T:
        """Send ``payload`` until ``match`` accepts a reply; ``GatewayUnreachable`` if none."""
        if not self.is_open:
            await self.open()
        loop = asyncio.get_running_loop()
        total = self.total_timeout if total_timeout is None else total_timeout
        future: asyncio.Future[object] = loop.create_future()
        pending = _Pending(match, future)
        self._pending.append(pending)
        start = loop.time()
        wait = self.initial_timeout
        tries = 0
        try:
            while True:
                self._send(payload)
                tries += 1
                remaining = start + total - loop.time()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait({future}, timeout=min(wait, remaining))
                if done:
                    return future.result()  # type: ignore[return-value]  # match's T
                wait *= 2
                if loop.time() >= start + total:
                    break
        finally:
            with contextlib.suppress(ValueError):
                self._pending.remove(pending)
            if not future.done():
                future.cancel()
        why = f" (last error: {self._last_error})" if self._last_error else ""
        raise GatewayTimeout(
            f"no answer to {action} from {self.host}:{self.port} after {tries} tries in "
            f"{total:g}s{why}; the router may be down or restarting, or not run NAT-PMP/PCP",
            action=action, timeout=total)

    def _send(self, payload: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise GatewayUnreachable(f"connection to {self.host}:{self.port} is closed")
        self._transport.sendto(payload)
        self.sent += 1

    def _received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        # The socket is connected, so the kernel already drops other sources; check anyway.
        if not self._from_peer(addr):
            self.ignored += 1
            return
        self.received += 1
        taken = False
        for pending in list(self._pending):
            if pending.future.done():
                continue
            try:
                result = pending.match(data)
            except GatewayError as exc:
                pending.future.set_exception(exc)
                taken = True
                continue
            except Exception as exc:  # a codec bug must not kill the event loop's callback
                log.debug("matcher failed on %r: %r", data[:64], exc)
                continue
            if result is not None:
                pending.future.set_result(result)
                taken = True
        if not taken:
            self.ignored += 1
            log.debug("ignored %d-byte datagram from %s: %s", len(data), self.host,
                      data[:64].hex())

    def _from_peer(self, addr: tuple[str | object, ...]) -> bool:
        if len(addr) < 2 or addr[1] != self.port:
            return False
        try:
            return ipaddress.ip_address(str(addr[0]).split("%")[0]) == self._peer
        except ValueError:
            return False

    def _error(self, exc: Exception) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ConnectionRefusedError):
            self._fail_all(GatewayUnreachable(
                f"{self.host}:{self.port} refused the request (ICMP port unreachable): "
                "NAT-PMP/PCP is not enabled on the router"))

    def _lost(self) -> None:
        self._transport = None

    def _fail_all(self, exc: GatewayError) -> None:
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(exc)
                # Retrieved by the waiting request; mark it so a cancelled wait cannot leak it.
                pending.future.add_done_callback(_consume)


def _consume(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


# --- announcements -----------------------------------------------------------------------------


class _AnnounceProtocol(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, str], None]) -> None:
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.handler(data, str(addr[0]) if addr else "")


async def _listen_announcements(group: str, port: int, iface_ip: str,
                                handler: Callable[[bytes, str], None]
                                ) -> asyncio.DatagramTransport:
    """Receive the router's unsolicited announcements (NAT-PMP address change, PCP ANNOUNCE)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((group, port))
        if ipaddress.ip_address(group).is_multicast:
            mreq = socket.inet_aton(group) + socket.inet_aton(iface_ip or "0.0.0.0")
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _AnnounceProtocol(handler), sock=sock)
    except OSError:
        sock.close()
        raise
    return transport


# --- the gateways ------------------------------------------------------------------------------


@dataclass(slots=True)
class HeldMapping:
    """A mapping this client was granted."""

    spec: MappingSpec
    external_port: int  # as assigned
    external_ip: str
    lifetime: int  # granted, seconds
    granted_at: float  # clock() time
    nonce: bytes = b""  # PCP: the nonce that created it (needed to refresh or delete)

    @property
    def expires_at(self) -> float:
        return self.granted_at + self.lifetime


class _PortMapGateway:
    """What NAT-PMP and PCP share: transport, own table, epoch checks, locking."""

    protocol = ""
    _rule: Literal["nat-pmp", "pcp"] = "nat-pmp"

    def __init__(
        self,
        gateway_ip: str,
        *,
        port: int = SERVER_PORT,
        bind_ip: str | None = None,
        initial_timeout: float = 0.25,
        total_timeout: float = 2.0,
        permanent_lifetime: int = DEFAULT_PERMANENT_LIFETIME,
        exact_port: bool = True,
        max_in_flight: int = 16,
        on_lost_state: Callable[[str], None] | None = None,
        on_call: Callable[[str, float, bool], None] | None = None,
        listen_announcements: bool = False,
        announce_group: str = ANNOUNCE_GROUP,
        announce_port: int = ANNOUNCE_PORT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            ipaddress.ip_address(gateway_ip)
        except ValueError:
            raise ConfigError(f"gateway address {gateway_ip!r} is not an IP address") from None
        if not 1 <= permanent_lifetime <= MAX_LIFETIME:
            raise ConfigError(f"permanent_lifetime {permanent_lifetime} is outside "
                              f"1-{MAX_LIFETIME} (0 would delete the mapping)")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        self.gateway_ip = gateway_ip
        self.port = port
        self.permanent_lifetime = permanent_lifetime
        self.exact_port = exact_port
        self.on_lost_state = on_lost_state
        self.on_call = on_call
        self.listen_announcements = listen_announcements
        self.announce_group = announce_group
        self.announce_port = announce_port
        self.clock = clock
        self.client = DatagramClient(gateway_ip, port, bind_ip=bind_ip,
                                     initial_timeout=initial_timeout,
                                     total_timeout=total_timeout)
        self.epoch = EpochTracker(self._rule)
        self.epoch_resets = 0  # times the epoch check showed that the router lost its state
        self.announcements = 0  # unsolicited announcements received from the router
        self.lost_state = False  # set when the router lost its state; the caller may clear it
        self.last_lost_reason = ""
        self._held: dict[MappingKey, HeldMapping] = {}
        # Entries dropped when the router lost its state: not reported by get()/list(), but
        # kept so that a later delete (or PCP refresh, with the same nonce) still works.
        self._stale: dict[MappingKey, HeldMapping] = {}
        self._info: GatewayInfo | None = None
        self._connect_lock = asyncio.Lock()
        self._locks: dict[object, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._announce: asyncio.DatagramTransport | None = None
        self._announce_last = -math.inf
        self._announce_gap = 0.0
        self.nonce_key: bytes | None = None

    # -- Gateway protocol ---------------------------------------------------------------------

    @property
    def info(self) -> GatewayInfo | None:
        return self._info

    async def connect(self) -> GatewayInfo:
        if self._info is not None:
            return self._info
        async with self._connect_lock:
            if self._info is not None:
                return self._info
            if not self.client.is_open:
                await self.client.open()
            info = await self._timed("connect", self._probe())
            self._info = info
            if self.listen_announcements and self._announce is None:
                await self._start_listener(info.local_address)
            warning = info.external_warning()
            if warning is not None:
                log.warning("%s: %s", self.protocol, warning)
            log.info("using %s at %s (external address %s, we are %s)", self.protocol,
                     info.location, info.external_address or "unknown", info.local_address)
            return info

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The router always picks the external port (ADD_ANY); it cannot list its table."""
        return frozenset({Capability.ADD_ANY}) if self._info is not None else frozenset()

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """Map ``spec`` (``exact_port``: only on its own external port, else
        ``MappingConflict``). Lifetimes are always timed here: no lease fallback applies."""
        return await self._map(spec, lease, self.exact_port)

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """Map ``spec`` on whatever external port the router assigns (kept and reported in
        ``Granted.external_port``; VPN NAT-PMP gateways ignore the suggested port)."""
        return await self._map(spec, lease, False)

    async def _map(self, spec: MappingSpec, lease: int, exact: bool) -> Granted:
        raise NotImplementedError

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """This client's own entry (the protocols cannot query the router), or ``None``."""
        held = self._live(MappingKey(proto, external_port))
        return None if held is None else self._as_router_mapping(held)

    async def list(self) -> list[RouterMapping]:
        """This client's own live mappings (the protocols cannot list the router's table)."""
        out = []
        for key in sorted(self._held):
            held = self._live(key)
            if held is not None:
                out.append(self._as_router_mapping(held))
        return out

    async def close(self) -> None:
        self.client.close()
        if self._announce is not None:
            self._announce.close()
            self._announce = None
        self._info = None

    # -- leftovers of an earlier run (``base.AdoptsLeftovers``) --------------------------------

    def use_nonce_key(self, key: bytes) -> None:
        """Derive PCP mapping nonces from ``key`` (a secret kept across runs), not at random."""
        self.nonce_key = bytes(key) or None

    def mapping_nonce(self, spec: MappingSpec) -> bytes:
        """The nonce a new mapping for ``spec`` is requested with; b"" when the protocol has
        none (NAT-PMP) or it is random (no ``nonce_key``)."""
        return b""

    def adopt(self, spec: MappingSpec, nonce: bytes = b"") -> bool:
        """Take up a mapping an earlier run of ours may have left, so that ``delete()`` (or a
        refresh) can reach it; it is not reported by ``get()``/``list()``. ``nonce``: what the
        journal recorded it with (PCP). False when this protocol cannot delete it from here:
        NAT-PMP for another host than this one, PCP without its nonce."""
        if self._known(spec.key) is not None:
            return True  # this run holds it already
        if not self._adoptable(spec, nonce):
            return False
        self._stale[spec.key] = HeldMapping(spec, spec.external_port, "", 0, self.clock(),
                                            nonce)
        return True

    def _adoptable(self, spec: MappingSpec, nonce: bytes) -> bool:
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------

    def held(self) -> dict[MappingKey, HeldMapping]:
        """A copy of this client's table (live and expired entries)."""
        return dict(self._held)

    def _live(self, key: MappingKey) -> HeldMapping | None:
        held = self._held.get(key)
        if held is not None and self.clock() >= held.expires_at:
            del self._held[key]
            return None
        return held

    def _known(self, key: MappingKey) -> HeldMapping | None:
        """The entry for ``key``, live, expired or dropped after a loss of router state."""
        return self._held.get(key) or self._stale.get(key)

    def _forget(self, key: MappingKey) -> None:
        self._held.pop(key, None)
        self._stale.pop(key, None)

    def _remember(self, key: MappingKey, held: HeldMapping) -> None:
        self._stale.pop(key, None)
        self._held[key] = held

    def _as_router_mapping(self, held: HeldMapping) -> RouterMapping:
        remaining = max(1, math.ceil(held.expires_at - self.clock()))
        return RouterMapping(
            proto=held.spec.proto,
            external_port=held.external_port,
            internal_client=held.spec.internal_client,
            internal_port=held.spec.internal_port,
            description=held.spec.description,
            enabled=True,
            lease_remaining=remaining,
        )

    def _lifetime(self, lease: int) -> int:
        lease = int(lease)
        return self.permanent_lifetime if lease <= 0 else min(lease, MAX_LIFETIME)

    def _lock(self, key: object) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _ready(self) -> GatewayInfo:
        return self._info if self._info is not None else await self.connect()

    async def _timed(self, action: str, coro: Awaitable[T]) -> T:
        t0 = time.perf_counter()
        ok = False
        try:
            result = await coro
            ok = True
            return result
        except GatewayUnreachable:
            self._info = None  # probe again before the next request
            raise
        finally:
            if self.on_call is not None:
                self.on_call(action, time.perf_counter() - t0, ok)

    def _observe_epoch(self, epoch: int | None) -> None:
        if epoch is None:
            return
        prev = self.epoch.server
        if self.epoch.observe(epoch, self.clock()):
            self.epoch_resets += 1
            self._state_lost(
                f"router epoch went from {prev} to {epoch}: it restarted or lost its mappings")

    def _state_lost(self, reason: str) -> None:
        self.lost_state = True
        self.last_lost_reason = reason
        count = len(self._held)
        self._stale.update(self._held)
        self._held.clear()
        log.warning("%s: %s; %d mapping(s) must be re-applied", self.protocol, reason, count)
        if self.on_lost_state is not None:
            try:
                self.on_lost_state(reason)
            except Exception:
                log.exception("on_lost_state callback failed")

    def _set_external(self, address: str | None) -> None:
        if not address or address in ("0.0.0.0", "::") or self._info is None:
            return
        if address != self._info.external_address:
            if self._info.external_address:
                log.info("%s router's external address changed: %s -> %s", self.protocol,
                         self._info.external_address, address)
            self._info = replace(self._info, external_address=address)

    @staticmethod
    def _check_spec(spec: MappingSpec) -> None:
        for name, port in (("external", spec.external_port), ("internal", spec.internal_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name} port {port} of {spec.key} is outside 1-65535")

    async def _start_listener(self, local_ip: str) -> None:
        try:
            self._announce = await _listen_announcements(
                self.announce_group, self.announce_port, local_ip, self._announced)
        except OSError as exc:
            log.warning("cannot listen for %s announcements on %s:%d: %s", self.protocol,
                        self.announce_group, self.announce_port, exc)

    def _announced(self, data: bytes, source: str) -> None:
        if source != self.gateway_ip:
            return
        epoch: int | None = None
        address: str | None = None
        pcp = decode_pcp_reply(data)
        if pcp is not None and pcp.version == PCP_VERSION:
            if pcp.opcode != PcpOp.ANNOUNCE or pcp.result != 0 or pcp.epoch is None:
                return
            epoch = pcp.epoch
        else:
            pmp = decode_pmp_reply(data)
            if pmp is None or pmp.version != PMP_VERSION or pmp.opcode != PmpOp.ADDRESS \
                    or pmp.result != 0 or not pmp.complete:
                return
            epoch, address = pmp.epoch, pmp.external_ip
        self.announcements += 1
        resets = self.epoch_resets
        self._observe_epoch(epoch)
        self._set_external(address)
        # RFC 6886 §3.2.1 routers repeat an announcement up to 10 times, each gap twice the
        # last (0.25 s, 0.5 s, ...): a repeat of the series re-applies nothing.
        now = self.clock()
        gap = now - self._announce_last
        repeat = self.epoch_resets == resets and gap <= 2 * self._announce_gap + 1.0
        self._announce_gap = gap if repeat else 0.0
        self._announce_last = now
        if self.epoch_resets == resets and self._held and not repeat:
            # An unsolicited announcement means the router (re)started its NAT-PMP/PCP server
            # or changed address; miniupnpd with system_uptime=yes keeps its epoch across a
            # restart, so re-apply rather than trust the epoch.
            self._state_lost(f"router announced a restart or address change (epoch {epoch})")

    def _conflict(self, action: str, spec: MappingSpec, assigned: int) -> MappingConflict:
        return MappingConflict(
            action, None, f"external port {spec.external_port} is taken (the router offered "
            f"{assigned})", "another host or program holds this port")

    async def _probe(self) -> GatewayInfo:
        raise NotImplementedError


class NatPmpGateway(_PortMapGateway):
    """A router reached with NAT-PMP (RFC 6886) at ``gateway_ip:5351``.

    NAT-PMP maps ports only to the host that sends the request: a spec for another
    ``internal_client`` raises ``NotAuthorized`` without asking the router.
    """

    protocol = "nat-pmp"
    _rule = "nat-pmp"

    async def _probe(self) -> GatewayInfo:
        action = "NAT-PMP external address request"

        def match(data: bytes) -> PmpReply | None:
            reply = decode_pmp_reply(data)
            if reply is None:
                return None
            if reply.version != PMP_VERSION:
                if reply.version == PCP_VERSION and reply.result == 1:
                    check_pmp_reply(reply, action, len(data))
                return None
            if reply.opcode != PmpOp.ADDRESS:
                return None
            check_pmp_reply(reply, action, len(data))
            return reply

        reply = await self.client.request(action, build_pmp_address_request(), match)
        self._observe_epoch(reply.epoch)
        notes: tuple[str, ...] = ()
        external = ""
        if reply.result == 3:
            notes = (f"router reports NAT-PMP result 3 (Network Failure): {DOUBLE_NAT_HINT}",)
        elif reply.result:
            raise pmp_error(action, reply.result)
        elif reply.external_ip and reply.external_ip != "0.0.0.0":
            external = reply.external_ip
        if external and not counts_as_public(external):
            notes += ("external address not public",)
        return GatewayInfo(
            protocol=self.protocol,
            location=f"{self.gateway_ip}:{self.port}",
            local_address=self.client.local_address,
            external_address=external,
            server="NAT-PMP",
            notes=notes,
        )

    @staticmethod
    def _match_map(action: str, op: int, internal_port: int,
                   deleting: bool) -> Callable[[bytes], PmpReply | None]:
        def match(data: bytes) -> PmpReply | None:
            reply = decode_pmp_reply(data)
            if reply is None:
                return None
            if reply.version != PMP_VERSION:
                if reply.version == PCP_VERSION and reply.result == 1:
                    check_pmp_reply(reply, action, len(data))
                return None
            if reply.opcode != op:
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
                return None  # a late duplicate of the other operation on this mapping
            check_pmp_reply(reply, action, len(data))
            return reply

        return match

    async def _send_map(self, action: str, proto: Proto, internal_port: int,
                        external_port: int, lifetime: int) -> PmpReply:
        """One mapping request; checks the epoch, raises for an error result."""
        payload = build_pmp_map_request(proto, internal_port, external_port, lifetime)
        match = self._match_map(action, pmp_map_opcode(proto), internal_port, lifetime == 0)
        async with self._slots:
            reply = await self.client.request(action, payload, match)
        self._observe_epoch(reply.epoch)
        if reply.result:
            raise pmp_error(action, reply.result)
        return reply

    async def _map(self, spec: MappingSpec, lease: int, exact: bool) -> Granted:
        """Map ``spec`` for ``lease`` s (0: ``permanent_lifetime``); returns what was granted.
        ``exact``: another external port than the spec's is undone and a ``MappingConflict``."""
        info = await self._ready()
        self._check_spec(spec)
        action = f"NAT-PMP map {spec.key}"
        if spec.internal_client != info.local_address:
            raise NotAuthorized(
                action, None, f"NAT-PMP can only map ports to the host that asks "
                f"({info.local_address}), not to {spec.internal_client}",
                f"run igdtrigger on {spec.internal_client}, or use PCP (with third-party "
                "mappings allowed on the router) or UPnP IGD")
        lifetime = self._lifetime(lease)
        # NAT-PMP names a mapping by (protocol, internal port): one request at a time per pair.
        async with self._lock(("pmp", spec.proto, spec.internal_port)):
            reply = await self._timed(action, self._send_map(
                action, spec.proto, spec.internal_port, spec.external_port, lifetime))
            assigned, granted = reply.external_port or 0, reply.lifetime or 0
            if granted == 0:
                raise ActionFailed(action, 0, "router granted lifetime 0 (no mapping)")
            # The router replaced any earlier mapping of this internal port.
            for key in [k for k, h in self._held.items() if h.spec.proto is spec.proto
                        and h.spec.internal_port == spec.internal_port]:
                self._forget(key)
            if assigned != spec.external_port and exact and not spec.external_any:
                self._forget(spec.key)
                try:
                    await self._send_map(f"{action} (undo)", spec.proto, spec.internal_port,
                                         0, 0)
                except GatewayError as exc:
                    log.warning("%s: could not delete the mapping on port %d: %s", action,
                                assigned, exc)
                raise self._conflict(action, spec, assigned)
            external = self._info.external_address if self._info is not None else ""
            self._remember(MappingKey(spec.proto, assigned),
                           HeldMapping(spec, assigned, external, granted, self.clock()))
            if granted != lifetime:
                log.debug("%s: asked %ds, granted %ds", action, lifetime, granted)
            return Granted(assigned, granted)

    def _adoptable(self, spec: MappingSpec, nonce: bytes) -> bool:
        # The router takes a delete for the address that sends it: another host's mapping
        # (an earlier run on UPnP, say) would be mistaken for this host's own.
        return self._info is not None and spec.internal_client == self._info.local_address

    async def delete(self, proto: Proto, external_port: int) -> None:
        """Delete a mapping this client made or adopted; ``NoSuchMapping`` for any other.
        The router confirms nothing (it answers success whether or not it held one)."""
        key = MappingKey(proto, external_port)
        action = f"NAT-PMP delete {key}"
        held = self._known(key)
        if held is None:
            raise NoSuchMapping(action, None, "this client holds no such mapping",
                                "NAT-PMP cannot delete mappings made by other clients")
        await self._ready()
        async with self._lock(("pmp", proto, held.spec.internal_port)):
            await self._timed(action, self._send_map(action, proto, held.spec.internal_port,
                                                     0, 0))
            if self._known(key) is held:
                self._forget(key)


class PcpGateway(_PortMapGateway):
    """A router reached with PCP (RFC 6887) at ``gateway_ip:5351``.

    ``client_ip`` is the PCP client address field (default: the local address of the socket,
    which is what the router sees). Specs for another ``internal_client`` are sent with the
    THIRD_PARTY option. ``probe_address`` asks for the external address with one short NAT-PMP
    request in ``connect`` (PCP has no such request); MAP replies update it too.
    ``prefer_failure`` adds the PREFER_FAILURE option (miniupnpd 2.3.1 ignores it; the
    ``exact_port`` check works either way). ``nonce_key``: derive mapping nonces from this
    secret (``mapping_nonce``) so that a later run can delete what this one left; without it
    they are random.
    """

    protocol = "pcp"
    _rule = "pcp"

    def __init__(
        self,
        gateway_ip: str,
        *,
        client_ip: str | None = None,
        probe_address: bool = True,
        prefer_failure: bool = False,
        nonce_key: bytes | None = None,
        port: int = SERVER_PORT,
        bind_ip: str | None = None,
        initial_timeout: float = 0.25,
        total_timeout: float = 2.0,
        permanent_lifetime: int = DEFAULT_PERMANENT_LIFETIME,
        exact_port: bool = True,
        max_in_flight: int = 16,
        on_lost_state: Callable[[str], None] | None = None,
        on_call: Callable[[str, float, bool], None] | None = None,
        listen_announcements: bool = False,
        announce_group: str = ANNOUNCE_GROUP,
        announce_port: int = ANNOUNCE_PORT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            gateway_ip, port=port, bind_ip=bind_ip, initial_timeout=initial_timeout,
            total_timeout=total_timeout, permanent_lifetime=permanent_lifetime,
            exact_port=exact_port, max_in_flight=max_in_flight, on_lost_state=on_lost_state,
            on_call=on_call, listen_announcements=listen_announcements,
            announce_group=announce_group, announce_port=announce_port, clock=clock)
        if client_ip is not None:
            try:
                ipaddress.ip_address(client_ip)
            except ValueError:
                raise ConfigError(f"PCP client_ip {client_ip!r} is not an IP address") from None
        self.client_ip = client_ip
        self.probe_address = probe_address
        self.prefer_failure = prefer_failure
        self.nonce_key = nonce_key or None

    def mapping_nonce(self, spec: MappingSpec) -> bytes:
        """The nonce a MAP for ``spec`` is sent with: that of the mapping held or adopted for
        it, else HMAC-SHA-256 of the protocol, internal client and internal port (what a PCP
        server names a mapping by) under ``nonce_key``, cut to 12 bytes; b"" without a key."""
        known = self._known(spec.key)
        if known is not None and self._same_mapping(known, spec) and known.nonce:
            return known.nonce
        if not self.nonce_key:
            return b""
        msg = f"igdtrigger PCP MAP|{spec.proto.value}|{spec.internal_client}|" \
              f"{spec.internal_port}".encode()
        return hmac.new(self.nonce_key, msg, hashlib.sha256).digest()[:NONCE_LEN]

    def _adoptable(self, spec: MappingSpec, nonce: bytes) -> bool:
        return len(nonce) == NONCE_LEN  # without the nonce the router refuses the delete

    @staticmethod
    def _same_mapping(held: HeldMapping, spec: MappingSpec) -> bool:
        """A PCP server names a mapping by internal client, protocol and internal port."""
        return held.spec.internal_client == spec.internal_client \
            and held.spec.internal_port == spec.internal_port

    @property
    def _client_ip(self) -> str:
        return self.client_ip or self.client.local_address

    async def _probe(self) -> GatewayInfo:
        action = "PCP ANNOUNCE"

        def match(data: bytes) -> PcpReply | None:
            reply = decode_pcp_reply(data)
            if reply is None:
                return None
            if reply.version != PCP_VERSION:
                if reply.result == 1:
                    check_pcp_reply(reply, action, len(data))
                return None
            if reply.opcode != PcpOp.ANNOUNCE:
                return None
            check_pcp_reply(reply, action, len(data))
            return reply

        reply = await self.client.request(action, build_pcp_announce(self._client_ip), match)
        self._observe_epoch(reply.epoch)
        if reply.result not in (0, 4):  # UNSUPP_OPCODE still proves a PCP server
            raise pcp_error(action, reply.result, client_ip=self._client_ip)
        external = await self._probe_external() if self.probe_address else ""
        notes: tuple[str, ...] = ()
        if external and not counts_as_public(external):
            notes = ("external address not public",)
        return GatewayInfo(
            protocol=self.protocol,
            location=f"{self.gateway_ip}:{self.port}",
            local_address=self.client.local_address,
            external_address=external,
            server="PCP",
            notes=notes,
        )

    async def _probe_external(self) -> str:
        """One short NAT-PMP address request; "" when the router does not answer it."""

        def match(data: bytes) -> PmpReply | None:
            reply = decode_pmp_reply(data)
            if reply is None or reply.opcode != PmpOp.ADDRESS \
                    or reply.version not in (PMP_VERSION, PCP_VERSION):
                return None
            return reply

        try:
            reply = await self.client.request(
                "NAT-PMP external address request", build_pmp_address_request(), match,
                total_timeout=self.client.initial_timeout * 2)
        except GatewayError:
            return ""
        if reply.version != PMP_VERSION or reply.result or not reply.complete:
            return ""
        return "" if reply.external_ip in (None, "0.0.0.0") else str(reply.external_ip)

    @staticmethod
    def _match_map(action: str, nonce: bytes, proto: Proto, internal_port: int,
                   deleting: bool) -> Callable[[bytes], PcpReply | None]:
        def match(data: bytes) -> PcpReply | None:
            reply = decode_pcp_reply(data)
            if reply is None:
                return None
            if reply.version != PCP_VERSION:
                if reply.result == 1:
                    check_pcp_reply(reply, action, len(data))
                return None
            if reply.opcode != PcpOp.MAP:
                return None
            if reply.nonce is None:
                check_pcp_reply(reply, action, len(data))
                return reply  # an error without the MAP payload: cannot tell whose, take it
            if reply.nonce != nonce or reply.protocol != proto.number \
                    or reply.internal_port != internal_port:
                return None
            if reply.result == 0 and deleting != (reply.lifetime == 0):
                return None  # a late duplicate of the other operation on this mapping
            return reply

        return match

    async def _send_map(self, action: str, spec: MappingSpec, nonce: bytes, lifetime: int,
                        *, external_port: int, external_ip: str) -> PcpReply:
        """One MAP request; checks the epoch, raises for an error result."""
        third_party = spec.internal_client if spec.internal_client != self._client_ip else None
        try:
            payload = build_pcp_map(
                nonce, spec.proto, spec.internal_port, external_port, lifetime,
                self._client_ip, external_ip=external_ip or "0.0.0.0", third_party=third_party,
                prefer_failure=self.prefer_failure and lifetime > 0)
        except ValueError as exc:
            raise ConfigError(f"{action}: {exc}") from None
        match = self._match_map(action, nonce, spec.proto, spec.internal_port, lifetime == 0)
        async with self._slots:
            reply = await self.client.request(action, payload, match)
        self._observe_epoch(reply.epoch)
        if reply.result:
            if lifetime == 0 and reply.result == 8:
                # miniupnpd answers NO_RESOURCES when there is nothing to delete.
                raise NoSuchMapping(action, 8, reply.result_text,
                                    "the router has no such mapping (miniupnpd's answer)")
            raise pcp_error(action, reply.result, third_party=third_party,
                            client_ip=self._client_ip)
        if third_party is not None:
            echoed = reply.option(PcpOption.THIRD_PARTY)
            if echoed is not None and decode_ip16(echoed) != third_party:
                raise MalformedReply(action, f"THIRD_PARTY in the reply is "
                                             f"{decode_ip16(echoed)}, not {third_party}")
        return reply

    async def _map(self, spec: MappingSpec, lease: int, exact: bool) -> Granted:
        """Map ``spec`` for ``lease`` s (0: ``permanent_lifetime``); returns what was granted.
        ``exact``: another external port than the spec's is undone and a ``MappingConflict``."""
        await self._ready()
        self._check_spec(spec)
        action = f"PCP MAP {spec.key}"
        lifetime = self._lifetime(lease)
        async with self._lock(("pcp", spec.key)):
            known = self._known(spec.key)
            if known is not None and self._same_mapping(known, spec):
                nonce, ext_ip = known.nonce, known.external_ip  # refresh: same nonce
            else:
                nonce, ext_ip = self.mapping_nonce(spec) or secrets.token_bytes(NONCE_LEN), ""
            reply = await self._timed(action, self._send_map(
                action, spec, nonce, lifetime, external_port=spec.external_port,
                external_ip=ext_ip))
            assigned, granted = reply.external_port or 0, reply.lifetime
            if granted == 0:
                raise ActionFailed(action, 0, "router granted lifetime 0 (no mapping)")
            self._set_external(reply.external_ip)
            if assigned != spec.external_port and exact and not spec.external_any:
                self._forget(spec.key)
                try:
                    await self._send_map(f"{action} (undo)", spec, nonce, 0,
                                         external_port=assigned,
                                         external_ip=reply.external_ip or "")
                except GatewayError as exc:
                    log.warning("%s: could not delete the mapping on port %d: %s", action,
                                assigned, exc)
                raise self._conflict(action, spec, assigned)
            self._remember(MappingKey(spec.proto, assigned),
                           HeldMapping(spec, assigned, reply.external_ip or "", granted,
                                       self.clock(), nonce))
            if granted != lifetime:
                log.debug("%s: asked %ds, granted %ds", action, lifetime, granted)
            return Granted(assigned, granted)

    async def delete(self, proto: Proto, external_port: int) -> None:
        """Delete a mapping this client made (with its nonce); ``NoSuchMapping`` otherwise."""
        key = MappingKey(proto, external_port)
        action = f"PCP delete {key}"
        held = self._known(key)
        if held is None:
            raise NoSuchMapping(action, None, "this client holds no such mapping",
                                "PCP deletes only with the nonce that created the mapping")
        await self._ready()
        async with self._lock(("pcp", key)):
            try:
                await self._timed(action, self._send_map(
                    action, held.spec, held.nonce, 0, external_port=held.external_port,
                    external_ip=held.external_ip))
            except NoSuchMapping:
                self._forget(key)
                raise
            if self._known(key) is held:
                self._forget(key)
