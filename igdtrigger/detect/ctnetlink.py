"""ctnetlink codec: sans-I/O encoding and decoding of conntrack netlink messages.

Each message is ``nlmsghdr`` + ``nfgenmsg`` + attributes (linux/netlink.h,
linux/netfilter/nfnetlink_conntrack.h). For NEW events only ``CTA_TUPLE_ORIG``
(``CTA_TUPLE_IP`` + ``CTA_TUPLE_PROTO``) is read: the originator's address and ports, on a
Linux router the LAN host for forwarded flows. Only TCP and UDP become a :class:`Flow`.

The parser (:class:`ConntrackParser`, :func:`parse_messages`) takes the bytes of a datagram and
returns flows, never raises on bad input (it counts malformed messages instead), and has a
fast path that decodes the whole canonical original tuple with one ``struct.unpack_from``. An
optional ``wanted(proto, dport)`` prefilter drops uninteresting flows before any address object
or :class:`Flow` is built (one with a ``source(proto, sport)`` half, ``detect.base.EitherEnd``,
also keeps flows by their source port). Whole entries and requests are
:mod:`igdtrigger.detect.ctquery`; the detector (:mod:`igdtrigger.detect.conntrack`) owns the
sockets.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

from igdtrigger.core.model import Flow, Proto

__all__ = [
    "AF_INET",
    "AF_INET6",
    "CT_DELETE",
    "CT_GET",
    "CT_GET_STATS",
    "CT_NEW",
    "NETLINK_NETFILTER",
    "NFGENMSG_LEN",
    "NF_NETLINK_CONNTRACK_NEW",
    "NLMSG_HDRLEN",
    "SOL_NETLINK",
    "SO_RCVBUFFORCE",
    "ConntrackParser",
    "ReadableBuffer",
    "Wanted",
    "parse_messages",
]

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
AF_UNSPEC = 0

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
_H4 = (_H4_ORIG, _H4_IP, _H4_SRC, _H4_DST, _H_PROTO, _H_NUM, _H_SPORT, _H_DPORT)
_H6 = (_H6_ORIG, _H6_IP, _H6_SRC, _H6_DST, _H_PROTO, _H_NUM, _H_SPORT, _H_DPORT)

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
        """Every counter by name (see the class docstring); they only grow."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "wanted"}

    def feed(self, data: ReadableBuffer, size: int | None = None) -> list[Flow]:
        """Decode the first ``size`` bytes (default: all) of one datagram."""
        end = len(data)
        if size is not None and 0 <= size < end:
            end = size
        wanted = self.wanted
        # front: a flow refused on its dport is kept on its sport too (detect/base.EitherEnd)
        source: Wanted | None = getattr(wanted, "source", None)
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
                ip: type[_IPv4] | type[_IPv6] | None = None
                src: int | bytes
                dst: int | bytes
                if fam == AF_INET and a + 52 <= mend:
                    oh, iph, sh, src, dh, dst, ph, nh, num, sph, sport, dph, dport = fast4(data, a)
                    heads, ip = _H4, _IPv4
                elif fam == AF_INET6 and a + 76 <= mend:
                    oh, iph, sh, src, dh, dst, ph, nh, num, sph, sport, dph, dport = fast6(data, a)
                    heads, ip = _H6, _IPv6
                if ip is not None and (oh, iph, sh, dh, ph, nh, sph, dph) == heads:
                    decoded = True
                    proto = protos.get(num)
                    if proto is None:
                        ignored += 1
                    elif wanted is not None and not wanted(proto, dport) and (
                            source is None or not source(proto, sport)):  # front: sport
                        filtered += 1
                    else:
                        flows.append(Flow(proto, ip(src), ip(dst), sport, dport))
                if not decoded:
                    status, num, tup = _walk_orig(data, a, mend)
                    if status == 1:
                        ignored += 1
                    elif tup is None:
                        malformed += 1
                    else:
                        proto = protos[num]
                        tfam, src, dst, sport, dport = tup
                        if wanted is not None and not wanted(proto, dport) and (
                                source is None or not source(proto, sport)):  # front: sport
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
