"""Linux conntrack detector: new-flow events from netfilter over ctnetlink, on the stdlib.

How it works
------------
The kernel's connection tracker announces every connection it *confirms* (the first packet of a
flow got through) as an ``IPCTNL_MSG_CT_NEW`` message on the ``NETLINK_NETFILTER`` (12) socket
family, multicast group ``NFNLGRP_CONNTRACK_NEW`` (group 1, i.e. bind bitmask
``NF_NETLINK_CONNTRACK_NEW = 0x1``; UPDATE is group 2 / mask 0x2, DESTROY group 3 / mask 0x4).
We bind a raw ``AF_NETLINK`` socket to that group, register it with ``loop.add_reader`` and read
datagrams as they come: event-driven, no thread, no polling, no third-party netlink library.

A NEW event carries ``NLM_F_CREATE|NLM_F_EXCL``; UPDATE events are ``IPCTNL_MSG_CT_NEW`` messages
too but only go to group 2, which we do not join, and each event is its own datagram. A flow the
firewall drops before it is confirmed (at POSTROUTING / INPUT) is never announced.

How a flow holds its activation (issue 18)
------------------------------------------
A NEW event says a flow began; the port-triggering timer must run from the flow's *last* packet.
Conntrack announces no packets, and its DESTROY comes long after the traffic stopped (an
unreplied UDP flow lingers ``nf_conntrack_udp_timeout`` = 30 s, a replied one 120 s, a closed
TCP connection sits in TIME_WAIT for 120 s), and UPDATE events only mark state changes. So for
each flow the engine follows (only matching ones: ``follows(flow)``), the detector reads that
one entry every ``poll_interval`` (``IPCTNL_MSG_CT_GET`` of its original tuple) and reads:

* ``CTA_TIMEOUT``: the entry's remaining lifetime in whole seconds, which every packet resets to
  the protocol's timeout (UDP: ``nf_conntrack_udp_timeout``, or ``..._stream`` once replied).
  ``now + CTA_TIMEOUT`` is when the entry would die; when that moved later by more than the
  1 s rounding since the reference look, a packet certainly went by: reported as a
  :class:`FlowLive` whose ``idle`` is the timeout minus what is left.
* ``CTA_PROTOINFO_TCP_STATE``: ESTABLISHED is a connection that holds however silent;
  LAST_ACK, TIME_WAIT and CLOSE mean it was closed (:class:`FlowEnded`, ``closed=True``).
  FIN_WAIT and CLOSE_WAIT are a half-closed connection: one side sent FIN, the other may still
  send data for minutes. It no longer holds by itself (its FIN counts as a packet, the idle
  timer starts), but it is still followed, so its packets keep refreshing the activation as
  a UDP flow's do (each packet resets the entry's timeout).
* no entry (``ENOENT``): the flow is gone (:class:`FlowEnded`).

At start one table dump (``NLM_F_DUMP``) reports the flows that began earlier as
:class:`FlowLive`, their idleness estimated from ``CTA_TIMEOUT`` and the namespace's UDP
timeouts (a half-closed TCP connection's from its state's timeout, FIN_WAIT or CLOSE_WAIT).
The cost per non-matching flow is unchanged (one NEW event, dropped by ``wanted``);
a followed flow costs one request and one reply per poll. Subscribing to DESTROY events
instead would double the events read for *every* flow.

Filtering in the kernel
-----------------------
With ``ports`` set (the rules' trigger and opened ports), the event socket carries a classic BPF
filter (``SO_ATTACH_FILTER``, as libnetfilter_conntrack's ``nfct_filter`` does) that drops a NEW
event whose canonical original tuple names a TCP/UDP destination port outside them, and events of
other protocols, before it is queued to us: a busy network's unrelated flows never wake the
process. Anything the filter cannot read with certainty (another layout, another message type)
is let through to the parser, which applies ``wanted`` as before. The filter runs in the context
of whoever created the flow (a packet's softirq), a few dozen instructions per event.

Each message is ``nlmsghdr`` + ``nfgenmsg`` + attributes; for NEW events we only read
``CTA_TUPLE_ORIG``
(``CTA_TUPLE_IP`` + ``CTA_TUPLE_PROTO``), which gives the originator's address and ports: on a
Linux router the LAN host for forwarded flows. Only TCP and UDP become a :class:`Flow`.

The parser (:class:`ConntrackParser`, :func:`parse_messages`) does no I/O: it takes the bytes of
a datagram and returns flows, never raises on bad input (it counts malformed messages instead),
and has a fast path that decodes the whole canonical original tuple with one
``struct.unpack_from``. An optional ``wanted(proto, dport)`` prefilter drops uninteresting flows
before any address object or :class:`Flow` is built.

What the kernel must be doing for events to appear
--------------------------------------------------
* Conntrack only tracks a network namespace's traffic when something there needs it: NAT or
  masquerade, an nftables rule using ``ct`` (``ct state new``...), an iptables ``-m conntrack``
  / ``-m state`` rule. A Linux box doing NAT for a LAN tracks every forwarded flow already (and
  events show the LAN host as the source). On a host with no such rule there are **no events at
  all**. The service loads its own small table for that (``inet igdtrigger``, see
  :mod:`igdtrigger.detect.nfttrack`; ``[detect] track_flows``), matching only the trigger and
  opened ports, and removes it at stop. The detector logs
  a hint once if no event has arrived after ``quiet_hint_after`` seconds, and ``check()`` logs
  one when the tracker holds no connection at all.
* Loopback traffic is tracked like any other once tracking is on (observed on Linux 6.18).
* Events need ``nf_conntrack_netlink`` (``modprobe nf_conntrack_netlink``) and
  ``net.netfilter.nf_conntrack_events`` not 0 (2, the default since Linux 6.0, means "only when a
  listener exists"). Subscribing needs ``CAP_NET_ADMIN`` in the namespace's owning user
  namespace. Everything is per network namespace: run the service in the namespace that routes.
* When we fall behind, the kernel drops events and the next ``recv`` fails with ``ENOBUFS``; we
  count it, warn (rate-limited) and keep reading. A large ``SO_RCVBUF`` (``SO_RCVBUFFORCE`` when
  privileged) makes that rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import Flow, FlowEnded, FlowLive, FlowsListed, PortRange, Proto
from igdtrigger.detect.base import FlowSink, Observation

__all__ = [
    "NETLINK_NETFILTER",
    "NF_NETLINK_CONNTRACK_NEW",
    "ConntrackDetector",
    "ConntrackParser",
    "CtEntry",
    "ReadableBuffer",
    "Wanted",
    "decode_entries",
    "encode_get",
    "parse_messages",
]

log = logging.getLogger(__name__)

ReadableBuffer = bytes | bytearray | memoryview
Wanted = Callable[[Proto, int], bool]
"""Prefilter: ``wanted(proto, dport)`` is False for flows nobody cares about (dropped early)."""

# --- constants (linux/netlink.h, linux/netfilter/nfnetlink*.h) ---------------------------------

NETLINK_NETFILTER = 12
NF_NETLINK_CONNTRACK_NEW = 0x00000001  # bind() bitmask for group NFNLGRP_CONNTRACK_NEW (= 1)
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33  # not exported by the socket module

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_CT_GET_STATS = 5
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW  # 0x0100
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET  # 0x0101
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE  # 0x0102 (DESTROY events)
CT_GET_STATS = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS  # 0x0105

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG = 1
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
IPS_SEEN_REPLY = 0x2
# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
TCP_CONNTRACK_ESTABLISHED = 3
TCP_CONNTRACK_FIN_WAIT, TCP_CONNTRACK_CLOSE_WAIT = 4, 5
# LAST_ACK TIME_WAIT CLOSE: closed both ways (FIN_WAIT 4 and CLOSE_WAIT 5 are half-closed: the
# other direction may still carry data, so the flow is still followed, without holding)
TCP_CONNTRACK_CLOSED = frozenset({6, 7, 8})
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_STATS_GLOBAL_ENTRIES = 1

AF_INET = 2
AF_INET6 = 10

NLMSG_HDRLEN = 16
NFGENMSG_LEN = 4
_PAYLOAD = NLMSG_HDRLEN + NFGENMSG_LEN  # first attribute of an nfnetlink message

_IPPROTO: dict[int, Proto] = {6: Proto.TCP, 17: Proto.UDP}

# --- precompiled structs -----------------------------------------------------------------------

_NLMSGHDR = struct.Struct("=IHH")  # nlmsg_len, nlmsg_type, nlmsg_flags (seq and pid unused)
_NLMSGHDR_FULL = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")  # nla_len, nla_type (host byte order)
_ERRNO = struct.Struct("=i")
_BE16 = struct.Struct("!H")
_BE32 = struct.Struct("!I")
_V6 = struct.Struct("16s")

# Fast path: the kernel always lays out CTA_TUPLE_ORIG the same way (ctnetlink_dump_tuples):
#   ORIG{ IP{ SRC, DST }, PROTO{ NUM u8+pad, SRC_PORT be16+pad, DST_PORT be16+pad } }
# so one big-endian unpack gets the addresses and ports, and the eight attribute headers (host
# byte order) come out as 32-bit words we compare against constants computed the same way. Any
# other layout (zones, old kernels without NLA_F_NESTED, hand-built messages) takes the generic
# walker, which gives the same answers.
_FAST4 = struct.Struct("!IIIIIIIIBxxxIHxxIHxx")  # 52 bytes
_FAST6 = struct.Struct("!III16sI16sIIBxxxIHxxIHxx")  # 76 bytes


def _hdr_word(length: int, nla_type: int) -> int:
    value: int = _BE32.unpack(_NLATTR.pack(length, nla_type))[0]
    return value


_N = NLA_F_NESTED
_H4_ORIG = _hdr_word(52, _N | CTA_TUPLE_ORIG)
_H4_IP = _hdr_word(20, _N | CTA_TUPLE_IP)
_H4_SRC = _hdr_word(8, CTA_IP_V4_SRC)
_H4_DST = _hdr_word(8, CTA_IP_V4_DST)
_H6_ORIG = _hdr_word(76, _N | CTA_TUPLE_ORIG)
_H6_IP = _hdr_word(44, _N | CTA_TUPLE_IP)
_H6_SRC = _hdr_word(20, CTA_IP_V6_SRC)
_H6_DST = _hdr_word(20, CTA_IP_V6_DST)
_H_PROTO = _hdr_word(28, _N | CTA_TUPLE_PROTO)
_H_NUM = _hdr_word(5, CTA_PROTO_NUM)
_H_SPORT = _hdr_word(6, CTA_PROTO_SRC_PORT)
_H_DPORT = _hdr_word(6, CTA_PROTO_DST_PORT)

_IPv4 = ipaddress.IPv4Address
_IPv6 = ipaddress.IPv6Address

_Tuple = tuple[int, int | bytes, int | bytes, int, int]  # (family, src, dst, sport, dport)


def _walk_orig(data: ReadableBuffer, start: int, end: int) -> tuple[int, int, _Tuple | None]:
    """Generic decode of a CT_NEW message's attributes in ``[start, end)``.

    Returns ``(status, ipproto, tuple)`` with status 0 = ok, 1 = not TCP/UDP, 2 = malformed.
    """
    unpack = _NLATTR.unpack_from
    a = start
    while a + 4 <= end:
        alen, atype = unpack(data, a)
        if alen < 4 or a + alen > end:
            return 2, 0, None
        if atype & NLA_TYPE_MASK == CTA_TUPLE_ORIG:
            return _walk_tuple(data, a + 4, a + alen)
        a += (alen + 3) & ~3
    return 2, 0, None


def _walk_tuple(data: ReadableBuffer, start: int, end: int) -> tuple[int, int, _Tuple | None]:
    unpack = _NLATTR.unpack_from
    fam = 0
    src: int | bytes | None = None
    dst: int | bytes | None = None
    num = sport = dport = -1
    a = start
    while a + 4 <= end:
        alen, atype = unpack(data, a)
        if alen < 4 or a + alen > end:
            return 2, 0, None
        t = atype & NLA_TYPE_MASK
        if t in (CTA_TUPLE_IP, CTA_TUPLE_PROTO):
            b, bend = a + 4, a + alen
            while b + 4 <= bend:
                blen, btype = unpack(data, b)
                if blen < 4 or b + blen > bend:
                    return 2, 0, None
                bt = btype & NLA_TYPE_MASK
                if t == CTA_TUPLE_IP:
                    if bt in (CTA_IP_V4_SRC, CTA_IP_V4_DST):
                        if blen < 8 or fam == AF_INET6:
                            return 2, 0, None
                        fam = AF_INET
                        v4: int = _BE32.unpack_from(data, b + 4)[0]
                        if bt == CTA_IP_V4_SRC:
                            src = v4
                        else:
                            dst = v4
                    elif bt in (CTA_IP_V6_SRC, CTA_IP_V6_DST):
                        if blen < 20 or fam == AF_INET:
                            return 2, 0, None
                        fam = AF_INET6
                        v6: bytes = _V6.unpack_from(data, b + 4)[0]
                        if bt == CTA_IP_V6_SRC:
                            src = v6
                        else:
                            dst = v6
                elif bt == CTA_PROTO_NUM:
                    if blen < 5:
                        return 2, 0, None
                    num = data[b + 4]
                elif bt in (CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT):
                    if blen < 6:
                        return 2, 0, None
                    port: int = _BE16.unpack_from(data, b + 4)[0]
                    if bt == CTA_PROTO_SRC_PORT:
                        sport = port
                    else:
                        dport = port
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    if num < 0:
        return 2, 0, None
    if num not in _IPPROTO:
        return 1, num, None
    if src is None or dst is None or sport < 0 or dport < 0:
        return 2, num, None
    return 0, num, (fam, src, dst, sport, dport)


class ConntrackParser:
    """Sans-I/O decoder of ctnetlink datagrams into :class:`Flow` objects, with counters.

    ``feed(data)`` walks every ``nlmsghdr`` in one datagram and never raises on bad bytes. The
    counters only grow; read them for metrics:

    * ``datagrams``: buffers fed;
    * ``events_seen``: ``IPCTNL_MSG_CT_NEW`` messages;
    * ``flows_reported``: flows returned; ``flows_filtered``: TCP/UDP flows ``wanted`` refused;
    * ``ignored``: well-formed CT_NEW messages for other protocols (ICMP, SCTP, GRE...);
    * ``other``: messages of other types (other subsystems, NLMSG_NOOP/DONE, ACKs);
    * ``malformed``: messages (or datagram tails) that could not be decoded;
    * ``errors``: NLMSG_ERROR messages carrying an error; ``overruns``: NLMSG_OVERRUN messages
      plus (counted by the detector) ENOBUFS from ``recv``.
    """

    __slots__ = (
        "datagrams",
        "errors",
        "events_seen",
        "flows_filtered",
        "flows_reported",
        "ignored",
        "malformed",
        "other",
        "overruns",
        "wanted",
    )

    def __init__(self, wanted: Wanted | None = None) -> None:
        self.wanted = wanted
        self.datagrams = 0
        self.events_seen = 0
        self.flows_reported = 0
        self.flows_filtered = 0
        self.ignored = 0
        self.other = 0
        self.malformed = 0
        self.errors = 0
        self.overruns = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__ if name != "wanted"}

    def feed(self, data: ReadableBuffer, size: int | None = None) -> list[Flow]:
        """Decode the first ``size`` bytes (default: all) of one datagram."""
        end = len(data)
        if size is not None and 0 <= size < end:
            end = size
        wanted = self.wanted
        hdr = _NLMSGHDR.unpack_from
        fast4 = _FAST4.unpack_from
        fast6 = _FAST6.unpack_from
        protos = _IPPROTO
        flows: list[Flow] = []
        events = filtered = ignored = other = malformed = errors = overruns = 0
        off = 0
        while off + NLMSG_HDRLEN <= end:
            mlen, mtype, _flags = hdr(data, off)
            mend = off + mlen
            if mlen < NLMSG_HDRLEN or mend > end:
                malformed += 1  # length field lies: nothing after it can be trusted
                off = end
                break
            if mtype == CT_NEW:
                events += 1
                if mlen < _PAYLOAD:
                    malformed += 1
                    off += (mlen + 3) & ~3
                    continue
                fam = data[off + NLMSG_HDRLEN]
                a = off + _PAYLOAD
                decoded = False
                if fam == AF_INET and a + 52 <= mend:
                    oh, iph, sh, s4, dh, d4, ph, nh, num, sph, sport, dph, dport = fast4(data, a)
                    if (
                        oh == _H4_ORIG
                        and iph == _H4_IP
                        and sh == _H4_SRC
                        and dh == _H4_DST
                        and ph == _H_PROTO
                        and nh == _H_NUM
                        and sph == _H_SPORT
                        and dph == _H_DPORT
                    ):
                        decoded = True
                        proto = protos.get(num)
                        if proto is None:
                            ignored += 1
                        elif wanted is not None and not wanted(proto, dport):
                            filtered += 1
                        else:
                            flows.append(Flow(proto, _IPv4(s4), _IPv4(d4), sport, dport))
                elif fam == AF_INET6 and a + 76 <= mend:
                    oh, iph, sh, s6, dh, d6, ph, nh, num, sph, sport, dph, dport = fast6(data, a)
                    if (
                        oh == _H6_ORIG
                        and iph == _H6_IP
                        and sh == _H6_SRC
                        and dh == _H6_DST
                        and ph == _H_PROTO
                        and nh == _H_NUM
                        and sph == _H_SPORT
                        and dph == _H_DPORT
                    ):
                        decoded = True
                        proto = protos.get(num)
                        if proto is None:
                            ignored += 1
                        elif wanted is not None and not wanted(proto, dport):
                            filtered += 1
                        else:
                            flows.append(Flow(proto, _IPv6(s6), _IPv6(d6), sport, dport))
                if not decoded:
                    status, num, tup = _walk_orig(data, a, mend)
                    if status == 1:
                        ignored += 1
                    elif tup is None:
                        malformed += 1
                    else:
                        proto = protos[num]
                        tfam, src, dst, sport, dport = tup
                        if wanted is not None and not wanted(proto, dport):
                            filtered += 1
                        elif tfam == AF_INET:
                            flows.append(Flow(proto, _IPv4(src), _IPv4(dst), sport, dport))
                        else:
                            flows.append(Flow(proto, _IPv6(src), _IPv6(dst), sport, dport))
            elif mtype == NLMSG_ERROR:
                if mlen < NLMSG_HDRLEN + 4:
                    malformed += 1
                elif _ERRNO.unpack_from(data, off + NLMSG_HDRLEN)[0] != 0:
                    errors += 1
                else:
                    other += 1  # an ACK
            elif mtype == NLMSG_OVERRUN:
                overruns += 1
            else:
                other += 1  # NLMSG_NOOP, NLMSG_DONE, other subsystems and message types
            off += (mlen + 3) & ~3
        if off < end:
            malformed += 1  # trailing bytes too short to hold a header
        self.datagrams += 1
        self.events_seen += events
        if flows:
            self.flows_reported += len(flows)
        if filtered:
            self.flows_filtered += filtered
        if ignored or other or malformed or errors or overruns:
            self.ignored += ignored
            self.other += other
            self.malformed += malformed
            self.errors += errors
            self.overruns += overruns
        return flows


def parse_messages(data: ReadableBuffer, wanted: Wanted | None = None) -> list[Flow]:
    """Flows (TCP/UDP, IPv4/IPv6) announced by the CT_NEW messages of one netlink datagram."""
    return ConntrackParser(wanted).feed(data)


# --- whole entries: GET replies, dumps, DESTROY events -----------------------------------------


@dataclass(frozen=True, slots=True)
class CtEntry:
    """One conntrack entry as a GET reply, a dump or an event carries it.

    ``timeout``: seconds left before the kernel drops it (``CTA_TIMEOUT``; every packet resets
    it), ``None`` if absent; ``status``: ``CTA_STATUS`` bits; ``tcp_state``: ``enum
    tcp_conntrack`` (3 = ESTABLISHED), ``None`` for UDP; ``destroyed``: a DESTROY event.
    """

    flow: Flow
    timeout: int | None
    status: int
    tcp_state: int | None
    destroyed: bool = False

    @property
    def established(self) -> bool:
        return self.tcp_state == TCP_CONNTRACK_ESTABLISHED

    @property
    def closed(self) -> bool:
        return self.tcp_state in TCP_CONNTRACK_CLOSED


def _attr_u32(data: ReadableBuffer, a: int, alen: int) -> int | None:
    if alen < 8:
        return None
    value: int = _BE32.unpack_from(data, a + 4)[0]
    return value


def _tcp_state(data: ReadableBuffer, start: int, end: int) -> int | None:
    """``CTA_PROTOINFO`` { ``CTA_PROTOINFO_TCP`` { ``CTA_PROTOINFO_TCP_STATE`` u8 } }."""
    unpack = _NLATTR.unpack_from
    a = start
    while a + 4 <= end:
        alen, atype = unpack(data, a)
        if alen < 4 or a + alen > end:
            return None
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            b, bend = a + 4, a + alen
            while b + 4 <= bend:
                blen, btype = unpack(data, b)
                if blen < 4 or b + blen > bend:
                    return None
                if btype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE and blen >= 5:
                    return data[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return None


def decode_entries(data: ReadableBuffer, wanted: Wanted | None = None) -> list[CtEntry]:
    """The TCP/UDP entries in one datagram of ctnetlink messages (``CT_NEW`` as GET replies,
    dumps and NEW events carry them, ``CT_DELETE`` as DESTROY events do), skipping those
    ``wanted`` refuses. Never raises: what cannot be decoded is skipped (the slow, generic walk;
    only used for followed flows and the start-up dump, never per new flow)."""
    out: list[CtEntry] = []
    end = len(data)
    off = 0
    unpack = _NLATTR.unpack_from
    while off + NLMSG_HDRLEN <= end:
        mlen, mtype, _flags = _NLMSGHDR.unpack_from(data, off)
        mend = off + mlen
        if mlen < NLMSG_HDRLEN or mend > end:
            break
        if mtype in (CT_NEW, CT_DELETE) and mlen >= _PAYLOAD:
            status, num, tup = _walk_orig(data, off + _PAYLOAD, mend)
            if status == 0 and tup is not None:
                proto = _IPPROTO[num]
                fam, src, dst, sport, dport = tup
                if wanted is None or wanted(proto, dport):
                    ip = _IPv4 if fam == AF_INET else _IPv6
                    timeout: int | None = None
                    bits = 0
                    tcp: int | None = None
                    a = off + _PAYLOAD
                    while a + 4 <= mend:
                        alen, atype = unpack(data, a)
                        if alen < 4 or a + alen > mend:
                            break
                        t = atype & NLA_TYPE_MASK
                        if t == CTA_TIMEOUT:
                            timeout = _attr_u32(data, a, alen)
                        elif t == CTA_STATUS:
                            bits = _attr_u32(data, a, alen) or 0
                        elif t == CTA_PROTOINFO and proto is Proto.TCP:
                            tcp = _tcp_state(data, a + 4, a + alen)
                        a += (alen + 3) & ~3
                    out.append(CtEntry(Flow(proto, ip(src), ip(dst), sport, dport), timeout,
                                       bits, tcp, destroyed=mtype == CT_DELETE))
        off += (mlen + 3) & ~3
    return out


def _nla(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLATTR.pack(length, atype) + payload + bytes(-length % 4)


def encode_get(flow: Flow | None, seq: int) -> bytes:
    """An ``IPCTNL_MSG_CT_GET`` request: of the entry whose original tuple is ``flow``'s, or,
    with ``None``, a dump of the whole table (both address families)."""
    if flow is None:
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
        flags = NLM_F_REQUEST | NLM_F_DUMP
    else:
        v4 = flow.src.version == 4
        base = CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC
        ips = _nla(base, flow.src.packed) + _nla(base + 1, flow.dst.packed)
        ports = (_nla(CTA_PROTO_NUM, bytes([flow.proto.number]))
                 + _nla(CTA_PROTO_SRC_PORT, _BE16.pack(flow.sport))
                 + _nla(CTA_PROTO_DST_PORT, _BE16.pack(flow.dport)))
        orig = _nla(NLA_F_NESTED | CTA_TUPLE_IP, ips) + _nla(NLA_F_NESTED | CTA_TUPLE_PROTO, ports)
        body = (_NFGENMSG.pack(AF_INET if v4 else AF_INET6, 0, 0)
                + _nla(NLA_F_NESTED | CTA_TUPLE_ORIG, orig))
        flags = NLM_F_REQUEST
    return _NLMSGHDR_FULL.pack(NLMSG_HDRLEN + len(body), CT_GET, flags, seq, 0) + body


def _reply_errno(data: ReadableBuffer, seq: int) -> int | None:
    """The errno of an NLMSG_ERROR for ``seq`` in ``data`` (0 = an ACK), else None."""
    off = 0
    while off + NLMSG_HDRLEN + 4 <= len(data):
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR_FULL.unpack_from(data, off)
        if mlen < NLMSG_HDRLEN:
            break
        if mtype == NLMSG_ERROR and mseq == seq:
            return -int(_ERRNO.unpack_from(data, off + NLMSG_HDRLEN)[0])
        off += (mlen + 3) & ~3
    return None


def _has_done(data: ReadableBuffer) -> bool:
    off = 0
    while off + NLMSG_HDRLEN <= len(data):
        mlen, mtype, _flags = _NLMSGHDR.unpack_from(data, off)
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            return True
        if mlen < NLMSG_HDRLEN:
            return True
        off += (mlen + 3) & ~3
    return False


@dataclass(slots=True)
class _Followed:
    """What is remembered of a followed flow between looks."""

    deadline: float | None  # when its entry would die, as of the reference look (rounded down)
    connected: bool = False
    looked: float | None = None  # when it was last looked at


_UDP_TIMEOUT = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"
_UDP_TIMEOUT_STREAM = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"
_TCP_TIMEOUT = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_"


def udp_idle(left: int, udp_timeout: int, udp_stream: int) -> float:
    """How long ago a UDP flow last saw a packet, from its entry's remaining timeout ``left``
    (whole seconds, rounded down). Every packet resets the entry to ``udp_timeout`` (30 s), or
    to ``udp_stream`` (120 s) once replies came for over 2 s; when either is possible the
    smaller idleness is taken (a flow is not declared idle early)."""
    full = udp_stream if left > udp_timeout else udp_timeout
    return float(max(0, full - left - 1))


def first_look_idle(entry: CtEntry, udp_timeout: int, udp_stream: int) -> float | None:
    """:func:`udp_idle` of an entry found by the start-up dump (``None``: cannot be told)."""
    if entry.timeout is None or entry.flow.proto is not Proto.UDP:
        return None
    return udp_idle(entry.timeout, udp_timeout, udp_stream)


# --- the kernel-side prefilter (classic BPF) ---------------------------------------------------

SO_ATTACH_FILTER = 26
_BPF_MAXINSNS = 4096
_ACCEPT = 0xFFFFFFFF
_DROP = 0
_LD_W, _LD_H, _LD_B, _LD_MEM, _ST = 0x20, 0x28, 0x30, 0x60, 0x02
_JA, _JEQ, _JGT, _JGE, _RET = 0x05, 0x15, 0x25, 0x35, 0x06
_INSN = struct.Struct("=HBBI")  # struct sock_filter


def _be16_of_host(value: int) -> int:
    """What a BPF half-word load (big-endian) reads from a host-order u16 field."""
    swapped: int = _BE16.unpack(struct.pack("=H", value))[0]
    return swapped


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def build_filter(ports: list[PortRange]) -> list[tuple[int, int, int, int]] | None:
    """A classic BPF program (``(code, jt, jf, k)`` instructions) for the NEW-event socket:
    accept a message unless it is a CT_NEW in the kernel's canonical layout (the parser's fast
    path) whose protocol is not TCP/UDP or whose destination port is outside ``ports``.
    ``None`` when the ports need more instructions than a filter may have."""
    by_proto = {p: _merge([(r.first, r.last) for r in ports if r.proto is p]) for p in Proto}
    prog: list[tuple[int, int, int, int]] = []

    def accept_unless_eq(k: int) -> None:  # if A != k: accept
        prog.append((_JEQ, 1, 0, k))
        prog.append((_RET, 0, 0, _ACCEPT))

    def tuple_block(heads: list[tuple[int, int]], num_at: int, dport_at: int) -> None:
        for off, word in heads:
            prog.append((_LD_W, 0, 0, off))
            accept_unless_eq(word)
        prog.append((_LD_B, 0, 0, num_at))
        prog.append((_ST, 0, 0, 1))
        prog.append((_LD_H, 0, 0, dport_at))
        prog.append((_ST, 0, 0, 0))

    prog.append((_LD_H, 0, 0, 4))  # nlmsg_type
    accept_unless_eq(_be16_of_host(CT_NEW))
    prog.append((_LD_B, 0, 0, NLMSG_HDRLEN))  # nfgen_family
    v6_jump = len(prog)
    prog.append((_JEQ, 0, 0, AF_INET6))  # jt patched below
    accept_unless_eq(AF_INET)
    a = _PAYLOAD
    tuple_block([(a, _H4_ORIG), (a + 4, _H4_IP), (a + 8, _H4_SRC), (a + 16, _H4_DST),
                 (a + 24, _H_PROTO), (a + 28, _H_NUM), (a + 36, _H_SPORT), (a + 44, _H_DPORT)],
                a + 32, a + 48)
    to_check = len(prog)
    prog.append((_JA, 0, 0, 0))  # k patched below
    v6_at = len(prog)
    tuple_block([(a, _H6_ORIG), (a + 4, _H6_IP), (a + 8, _H6_SRC), (a + 28, _H6_DST),
                 (a + 48, _H_PROTO), (a + 52, _H_NUM), (a + 60, _H_SPORT), (a + 68, _H_DPORT)],
                a + 56, a + 72)
    check_at = len(prog)
    prog[to_check] = (_JA, 0, 0, check_at - to_check - 1)
    prog[v6_jump] = (_JEQ, v6_at - v6_jump - 1, 0, AF_INET6)
    for proto in Proto:
        prog.append((_LD_MEM, 0, 0, 1))
        skip_at = len(prog)
        prog.append((_JEQ, 1, 0, proto.number))
        prog.append((_JA, 0, 0, 0))  # not this protocol: to the next section (patched)
        prog.append((_LD_MEM, 0, 0, 0))
        for first, last in by_proto[proto]:
            prog.append((_JGE, 0, 2, first))  # below: try the next range
            prog.append((_JGT, 1, 0, last))  # above: try the next range
            prog.append((_RET, 0, 0, _ACCEPT))
        prog.append((_RET, 0, 0, _DROP))
        prog[skip_at + 1] = (_JA, 0, 0, len(prog) - skip_at - 2)
    prog.append((_RET, 0, 0, _DROP))  # neither TCP nor UDP
    if len(prog) > _BPF_MAXINSNS or any(jt > 255 or jf > 255 for _, jt, jf, _ in prog):
        return None
    return prog


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """``SO_ATTACH_FILTER`` (no privilege needed); raises OSError."""
    code = ctypes.create_string_buffer(b"".join(_INSN.pack(*i) for i in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(code))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# --- the detector ------------------------------------------------------------------------------

_CAP_HINT = "run as root or grant CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
_MODULE_HINT = "modprobe nf_conntrack_netlink"
_TRACKING_SHORT = ("conntrack tracks no connection in this network namespace yet, so traffic "
                   "triggers may not be seen; `igdtrigger doctor` says how to turn it on")
_TRACKING_HINT = (
    "conntrack only tracks flows in a network namespace when a rule needs it (NAT/masquerade, "
    "an nftables 'ct' rule, iptables -m conntrack/state); a NAT router does this already, and "
    "the service loads its own small table for it unless [detect] track_flows = false (it "
    "needs CAP_NET_ADMIN; `igdtrigger doctor` says whether it is loaded)"
)


class ConntrackDetector:
    """New TCP/UDP flows from the kernel's conntrack NEW events (Linux, CAP_NET_ADMIN).

    ``wanted`` (settable at any time) drops flows early, before a :class:`Flow` is built; with
    ``None`` every TCP/UDP flow goes to the sink. Counters are the parser's (see
    :class:`ConntrackParser`), exposed as read-only attributes and by :meth:`counters`.
    """

    name = "conntrack"
    holds_flows = True  # its flows hold activations: when it stops, the service releases them

    def __init__(
        self,
        *,
        wanted: Wanted | None = None,
        rcvbuf: int = 4 * 1024 * 1024,
        batch: int = 256,
        quiet_hint_after: float | None = 60.0,
        overrun_warn_interval: float = 10.0,
        poll_interval: float = 1.0,
    ) -> None:
        self.parser = ConntrackParser(wanted)
        self.poll_interval = poll_interval
        # injected like ``wanted``: is this flow followed (held) by the engine? None: no holds
        self.follows: Callable[[Flow], bool] | None = None
        # injected like ``wanted``: every port ``wanted`` may accept; set, the kernel drops the
        # rest before we are woken (see "Filtering in the kernel")
        self.ports: list[PortRange] | None = None
        self.kernel_filter = False  # whether the filter is attached
        self.followed: dict[Flow, _Followed] = {}
        self.udp_timeouts = (30, 120)  # the namespace's, read when run() starts
        # a half-closed TCP entry's timeout by state (FIN_WAIT, CLOSE_WAIT), read likewise
        self.half_closed_timeouts = {TCP_CONNTRACK_FIN_WAIT: 120, TCP_CONNTRACK_CLOSE_WAIT: 60}
        self.lookups = 0  # GET requests sent for followed flows
        self._seq = 0
        self.dumped = 0  # entries the start-up dump reported
        self.rcvbuf = rcvbuf
        self.batch = max(1, batch)
        self.quiet_hint_after = quiet_hint_after
        self.tracking_managed = False  # the service makes the kernel track flows (nfttrack)
        self.overrun_warn_interval = overrun_warn_interval
        self.rcvbuf_actual = 0  # what the kernel granted (it reports twice the requested size)
        self.enobufs = 0  # recv() failures with ENOBUFS (also counted in ``overruns``)
        self._last_overrun_warn = float("-inf")
        self._overruns_warned = 0

    # --- counters ------------------------------------------------------------------------------

    @property
    def wanted(self) -> Wanted | None:
        return self.parser.wanted

    @wanted.setter
    def wanted(self, value: Wanted | None) -> None:
        self.parser.wanted = value

    @property
    def datagrams(self) -> int:
        return self.parser.datagrams

    @property
    def events_seen(self) -> int:
        return self.parser.events_seen

    @property
    def flows_reported(self) -> int:
        return self.parser.flows_reported

    @property
    def flows_filtered(self) -> int:
        return self.parser.flows_filtered

    @property
    def ignored(self) -> int:
        return self.parser.ignored

    @property
    def malformed(self) -> int:
        return self.parser.malformed

    @property
    def errors(self) -> int:
        return self.parser.errors

    @property
    def overruns(self) -> int:
        return self.parser.overruns

    def counters(self) -> dict[str, int]:
        out = self.parser.counters()
        out["enobufs"] = self.enobufs
        out["followed"] = len(self.followed)
        out["lookups"] = self.lookups
        return out

    # --- following live flows ------------------------------------------------------------------

    def look(self, flow: Flow, entry: CtEntry | None, now: float) -> Observation | None:
        """What a look at a followed flow means (sans-I/O): ``entry`` is its conntrack entry
        now (``None``: gone). Updates what is remembered of it."""
        seen = self.followed.get(flow)
        if seen is None:
            return None
        if entry is None or entry.closed:
            del self.followed[flow]
            return FlowEnded(flow, closed=entry is not None)
        connected = entry.established
        idle: float | None = None
        previous, seen.looked = seen.looked, now
        if entry.timeout is not None:
            deadline = now + entry.timeout
            if seen.deadline is None or deadline < seen.deadline - 1.0:
                seen.deadline = deadline  # the reference (or a new state's shorter timeout)
            elif deadline > seen.deadline + 1.0:  # beyond rounding: a packet reset the timeout
                seen.deadline = deadline
                idle = (udp_idle(entry.timeout, *self.udp_timeouts)
                        if flow.proto is Proto.UDP else 0.0)
                if previous is not None:  # the packet came after the previous look, whatever
                    idle = min(idle, now - previous)  # timeout the estimate assumed (a changed
                    # sysctl, an nft ct timeout policy, an assured flow's stream timeout)
        changed = connected != seen.connected
        seen.connected = connected
        if idle is not None or changed:
            return FlowLive(flow, connected, idle)
        return None

    def follow(self, flow: Flow, now: float, timeout: int | None = None) -> None:
        """Start looking at ``flow`` on each poll (the engine follows it); ``timeout``: its
        entry's remaining timeout now, when known."""
        if flow not in self.followed:
            self.followed[flow] = _Followed(None if timeout is None else now + timeout)

    def _lookup(self, sock: socket.socket, flows: list[Flow]) -> list[CtEntry | None]:
        """Each flow's entry now (``None``: gone), by one GET each (the kernel answers before
        send returns). An answer that is neither the entry nor ENOENT counts as gone: a hold
        nobody can confirm must not keep ports open. OSError (the socket failed) propagates:
        the detector stops and the service releases every hold."""
        out: list[CtEntry | None] = []
        for flow in flows:
            self.lookups += 1
            self._seq = seq = self._seq % 0x7FFF0000 + 1
            sock.send(encode_get(flow, seq))
            for _ in range(16):  # skip anything stale (a reply to a request that timed out)
                data = sock.recv(65536)
                if len(data) >= NLMSG_HDRLEN and _NLMSGHDR_FULL.unpack_from(data)[3] == seq:
                    break
            entries = decode_entries(data)
            if entries and entries[0].flow == flow:
                out.append(entries[0])
            else:
                code = _reply_errno(data, seq)
                if code != errno.ENOENT:
                    log.debug("conntrack: lookup of %s answered %s", flow,
                              os.strerror(code) if code else "something unreadable")
                out.append(None)
        return out

    def _dump(self, sock: socket.socket) -> list[CtEntry]:
        """Every wanted entry in the table now (the start-up dump)."""
        sock.send(encode_get(None, 0x7FFFFFFE))
        entries: list[CtEntry] = []
        while True:
            data = sock.recv(1 << 20)
            entries.extend(decode_entries(data, self.wanted))
            if not data or _has_done(data):
                return entries

    def _first_looks(self, entries: list[CtEntry]) -> list[Observation]:
        out: list[Observation] = []
        for e in entries:
            if e.closed:
                continue
            idle = first_look_idle(e, *self.udp_timeouts)
            full = self.half_closed_timeouts.get(e.tcp_state or 0)
            if full is not None and e.timeout is not None:  # half-closed: still carries data
                idle = float(max(0, full - e.timeout - 1))
            if e.established or idle is not None:
                out.append(FlowLive(e.flow, e.established, idle))
        self.dumped += len(out)
        return out

    # --- socket-free path ----------------------------------------------------------------------

    def feed(self, data: ReadableBuffer, size: int | None = None) -> list[Flow]:
        """Parse one datagram exactly as :meth:`run` does, updating the counters."""
        return self.parser.feed(data, size)

    # --- checks --------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``DetectionUnavailable`` unless conntrack events can be received here."""
        sock = self._open(probe_timeout=2.0)
        sock.close()

    def _open(self, probe_timeout: float | None = None) -> socket.socket:
        """A socket subscribed to conntrack NEW events, or ``DetectionUnavailable``.

        With ``probe_timeout`` also asks ctnetlink for its statistics (proves the subsystem and
        our privilege, and tells whether anything is tracked at all).
        """
        if not sys.platform.startswith("linux"):
            raise DetectionUnavailable(
                f"conntrack detection needs Linux (netfilter conntrack); this is {sys.platform}"
            )
        af_netlink = getattr(socket, "AF_NETLINK", None)
        if af_netlink is None:
            raise DetectionUnavailable("this Python has no AF_NETLINK sockets")
        try:
            sock = socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise DetectionUnavailable(
                f"cannot open a netfilter netlink socket ({exc.strerror}); the kernel needs "
                "CONFIG_NETFILTER_NETLINK and conntrack (modprobe nf_conntrack_netlink)"
            ) from exc
        try:
            self._subscribe(sock)
            if probe_timeout is not None:
                self._probe(sock, probe_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _subscribe(self, sock: socket.socket) -> None:
        try:
            sock.bind((0, NF_NETLINK_CONNTRACK_NEW))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise DetectionUnavailable(
                    f"not allowed to subscribe to conntrack events; {_CAP_HINT}"
                ) from exc
            raise DetectionUnavailable(
                f"cannot subscribe to conntrack events ({exc.strerror}); {_MODULE_HINT}"
            ) from exc
        try:  # beyond net.core.rmem_max: needs CAP_NET_ADMIN, which we need anyway
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            except OSError as exc:
                log.debug("conntrack: cannot raise SO_RCVBUF: %s", exc)
        self.rcvbuf_actual = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _probe(self, sock: socket.socket, timeout: float) -> None:
        seq = (os.getpid() ^ id(self)) & 0x7FFFFFFF or 1
        request = _NLMSGHDR_FULL.pack(
            NLMSG_HDRLEN + NFGENMSG_LEN, CT_GET_STATS, NLM_F_REQUEST, seq, 0
        ) + _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
        sock.settimeout(timeout)
        try:
            sock.send(request)
            entries = self._probe_reply(sock, seq)
        except TimeoutError as exc:
            raise DetectionUnavailable(
                f"ctnetlink did not answer a statistics request; {_MODULE_HINT}"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise DetectionUnavailable(f"ctnetlink refused us; {_CAP_HINT}") from exc
            raise DetectionUnavailable(
                f"ctnetlink is not available ({exc.strerror}); {_MODULE_HINT}"
            ) from exc
        sock.setblocking(False)
        events = _read_sysctl("/proc/sys/net/netfilter/nf_conntrack_events")
        if events == 0:
            raise DetectionUnavailable(
                "conntrack events are disabled in this network namespace; "
                "sysctl -w net.netfilter.nf_conntrack_events=2"
            )
        if entries == 0:
            # the details and the fix: doctor (check_tracking); a service that makes the
            # kernel track flows itself (nfttrack) says what it did instead
            log.log(logging.DEBUG if self.tracking_managed else logging.WARNING, "%s",
                    _TRACKING_SHORT)

    @staticmethod
    def _probe_reply(sock: socket.socket, seq: int) -> int | None:
        """Wait for our reply; the tracked-connection count, or OSError(errno) from the kernel."""
        while True:
            data = sock.recv(65536)
            off = 0
            while off + NLMSG_HDRLEN <= len(data):
                mlen, mtype, _flags, mseq, _pid = _NLMSGHDR_FULL.unpack_from(data, off)
                if mlen < NLMSG_HDRLEN or off + mlen > len(data):
                    break
                if mseq == seq:
                    if mtype == NLMSG_ERROR and mlen >= NLMSG_HDRLEN + 4:
                        code = -_ERRNO.unpack_from(data, off + NLMSG_HDRLEN)[0]
                        if code:
                            raise OSError(code, os.strerror(code))
                        return None
                    if mtype == CT_GET_STATS:
                        return _stats_entries(data, off + _PAYLOAD, off + mlen)
                off += (mlen + 3) & ~3

    # --- run -----------------------------------------------------------------------------------

    async def run(self, sink: FlowSink) -> None:
        """Report new TCP/UDP flows to ``sink`` until cancelled; with ``follows`` set, also
        follow the ones the engine holds (see the module docstring)."""
        sock = self._open()
        sock.setblocking(False)
        if self.ports is not None:
            prog = build_filter(self.ports)
            try:
                if prog is None:
                    raise OSError(errno.E2BIG, "too many port ranges for a socket filter")
                attach_filter(sock, prog)
                self.kernel_filter = True
            except OSError as exc:
                log.info("conntrack: no kernel-side prefilter (%s); filtering in Python", exc)
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        poller: asyncio.Task[None] | None = None
        if self.follows is not None:
            poller = asyncio.create_task(self._follow_loop(sink), name="conntrack-follow")

            def poller_done(task: asyncio.Task[None]) -> None:
                exc = None if task.cancelled() else task.exception()
                if exc is not None and not failed.done():  # holds could no longer be ended
                    failed.set_exception(DetectionUnavailable(
                        f"conntrack: following live flows failed: {exc}"))

            poller.add_done_callback(poller_done)
        buf = bytearray(65536)
        fd = sock.fileno()
        feed = self.parser.feed
        recv_into = sock.recv_into
        batch = self.batch
        follows = self.follows

        def on_readable() -> None:
            for _ in range(batch):
                try:
                    n = recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self._on_overrun(loop.time())
                        continue
                    if not failed.done():
                        failed.set_exception(
                            DetectionUnavailable(f"conntrack netlink socket failed: {exc}")
                        )
                    loop.remove_reader(fd)
                    return
                for flow in feed(buf, n):
                    try:
                        sink(flow)
                        if follows is not None and follows(flow):
                            self.follow(flow, time.monotonic())
                    except Exception:
                        log.exception("conntrack: flow sink raised; flow %s dropped", flow)

        hint: asyncio.TimerHandle | None = None
        if self.quiet_hint_after is not None:
            hint = loop.call_later(self.quiet_hint_after, self._quiet_hint)
        loop.add_reader(fd, on_readable)
        log.debug("conntrack: listening for NEW events (SO_RCVBUF=%d)", self.rcvbuf_actual)
        try:
            await failed
        finally:
            loop.remove_reader(fd)
            if hint is not None:
                hint.cancel()
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await poller
            sock.close()

    async def _follow_loop(self, sink: FlowSink) -> None:
        """The start-up dump, then a look at each followed flow every ``poll_interval``."""
        follows = self.follows
        assert follows is not None
        self.udp_timeouts = (_read_sysctl(_UDP_TIMEOUT) or 30,
                             _read_sysctl(_UDP_TIMEOUT_STREAM) or 120)
        for state, name in ((TCP_CONNTRACK_FIN_WAIT, "fin_wait"),
                            (TCP_CONNTRACK_CLOSE_WAIT, "close_wait")):
            self.half_closed_timeouts[state] = (_read_sysctl(_TCP_TIMEOUT + name)
                                                or self.half_closed_timeouts[state])
        req = self._open_requests()
        try:
            try:
                entries = await asyncio.to_thread(self._dump, req)
            except OSError as exc:
                log.warning("conntrack: cannot read the table at start (%s): flows that began "
                            "earlier hold nothing until their next new flow", exc)
                entries = []
            now = time.monotonic()
            timeouts = {e.flow: e.timeout for e in entries}
            for obs in self._first_looks(entries):
                self._report(sink, obs)
                if isinstance(obs, FlowLive) and follows(obs.flow):
                    self.follow(obs.flow, now, timeouts.get(obs.flow))
            self._report(sink, FlowsListed(self.name))
            while True:
                await asyncio.sleep(self.poll_interval)
                for flow in [f for f in self.followed if not follows(f)]:
                    del self.followed[flow]  # the engine let it go (capped, lapsed, muted)
                if not self.followed:
                    continue
                flows = list(self.followed)
                found = await asyncio.to_thread(self._lookup, req, flows)
                now = time.monotonic()
                for flow, entry in zip(flows, found, strict=True):
                    news = self.look(flow, entry, now)
                    if news is not None:
                        self._report(sink, news)
        finally:
            req.close()

    @staticmethod
    def _report(sink: FlowSink, obs: Observation) -> None:
        try:
            sink(obs)
        except Exception:
            log.exception("conntrack: flow sink raised; %s dropped", obs)

    def _open_requests(self) -> socket.socket:
        """A plain (unsubscribed) ctnetlink socket for GET requests, blocking with a timeout."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        sock.settimeout(2.0)
        return sock

    def _on_overrun(self, now: float) -> None:
        self.enobufs += 1
        self.parser.overruns += 1
        if now - self._last_overrun_warn >= self.overrun_warn_interval:
            lost_since = self.enobufs - self._overruns_warned
            self._last_overrun_warn = now
            self._overruns_warned = self.enobufs
            log.warning(
                "conntrack: kernel dropped events because we fell behind (ENOBUFS x%d, %d in "
                "total, SO_RCVBUF=%d); some new flows were missed, continuing",
                lost_since,
                self.enobufs,
                self.rcvbuf_actual,
            )

    def _quiet_hint(self) -> None:
        if self.parser.datagrams != 0:
            return
        if self.kernel_filter:  # unrelated flows never reach us: ask whether anything is tracked
            try:
                sock = self._open_requests()
                try:
                    seq = 0x7FFF0001
                    sock.send(_NLMSGHDR_FULL.pack(NLMSG_HDRLEN + NFGENMSG_LEN, CT_GET_STATS,
                                                  NLM_F_REQUEST, seq, 0)
                              + _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0))
                    entries = self._probe_reply(sock, seq)
                finally:
                    sock.close()
            except OSError:
                entries = None
            if entries:
                return
            log.warning("conntrack: tracking no connection after %gs; %s",
                        self.quiet_hint_after or 0, _TRACKING_HINT)
            return
        log.warning(
            "conntrack: no event in %gs; %s", self.quiet_hint_after or 0, _TRACKING_HINT
        )


def _stats_entries(data: bytes, start: int, end: int) -> int | None:
    a = start
    while a + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, a)
        if alen < 4 or a + alen > end:
            return None
        if atype & NLA_TYPE_MASK == CTA_STATS_GLOBAL_ENTRIES and alen >= 8:
            entries: int = _BE32.unpack_from(data, a + 4)[0]
            return entries
        a += (alen + 3) & ~3
    return None


def _read_sysctl(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
