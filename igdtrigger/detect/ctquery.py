"""ctnetlink requests and whole entries: sans-I/O.

:func:`encode_get` builds the look-up of one flow (or a table dump), :func:`decode_entries`
reads whole entries from GET replies, dumps and DESTROY events (``CTA_TIMEOUT``, the TCP state,
``CTA_STATUS``), :func:`encode_stats_request`/:func:`decode_stats_reply` ask for the
tracked-connection count, and :func:`udp_idle` tells a UDP flow's idleness from its entry's
remaining timeout. The message framing and NEW-event parser are
:mod:`igdtrigger.detect.ctnetlink`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from igdtrigger.core.model import Flow, Proto
from igdtrigger.detect.base import source_filter
from igdtrigger.detect.ctnetlink import (
    _BE16,
    _BE32,
    _ERRNO,
    _IPPROTO,
    _NFGENMSG,
    _NLATTR,
    _NLMSGHDR,
    _NLMSGHDR_FULL,
    _PAYLOAD,
    AF_INET,
    AF_INET6,
    AF_UNSPEC,
    CT_DELETE,
    CT_GET,
    CT_GET_STATS,
    CT_NEW,
    CTA_IP_V4_SRC,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE,
    CTA_STATS_GLOBAL_ENTRIES,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    NFGENMSG_LEN,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDRLEN,
    TCP_CONNTRACK_CLOSED,
    TCP_CONNTRACK_ESTABLISHED,
    ReadableBuffer,
    Wanted,
    _IPv4,
    _IPv6,
    _walk_orig,
)

__all__ = [
    "CtEntry", "decode_entries", "decode_stats_reply", "encode_get", "encode_stats_request",
    "first_look_idle", "udp_idle",
]


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
        """Is the TCP connection in ESTABLISHED?"""
        return self.tcp_state == TCP_CONNTRACK_ESTABLISHED

    @property
    def closed(self) -> bool:
        """Is the TCP connection in LAST_ACK, TIME_WAIT or CLOSE?"""
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
    only used for followed flows and the start-up dump, never per new flow). A ``wanted`` with
    a source-port half (``detect.base.EitherEnd``) keeps an entry by either port."""
    source = source_filter(wanted)
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
                if wanted is None or wanted(proto, dport) or (
                        source is not None and source(proto, sport)):
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
        body = _NFGENMSG.pack(AF_UNSPEC, 0, 0)
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


def encode_stats_request(seq: int) -> bytes:
    """An ``IPCTNL_MSG_CT_GET_STATS`` request (the tracked-connection count) with ``seq``."""
    return _NLMSGHDR_FULL.pack(NLMSG_HDRLEN + NFGENMSG_LEN, CT_GET_STATS, NLM_F_REQUEST, seq,
                               0) + _NFGENMSG.pack(AF_UNSPEC, 0, 0)


def decode_stats_reply(data: ReadableBuffer, seq: int) -> tuple[bool, int | None]:
    """``(answered, entries)`` from one datagram: whether it holds the answer to request
    ``seq``, and the tracked-connection count it gives (``None``: an ACK without one).
    Raises ``OSError(errno)`` when the kernel answered with an error."""
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
                return True, None
            if mtype == CT_GET_STATS:
                return True, _stats_entries(bytes(data), off + _PAYLOAD, off + mlen)
        off += (mlen + 3) & ~3
    return False, None
