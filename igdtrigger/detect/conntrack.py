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

Each message is ``nlmsghdr`` + ``nfgenmsg`` + attributes; we only read ``CTA_TUPLE_ORIG``
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
  all**; a rule as small as::

      nft add table inet igdtrigger
      nft add chain inet igdtrigger out '{ type filter hook output priority 0; }'
      nft add rule inet igdtrigger out ct state new counter

  (plus the same on a ``forward`` hook for routed traffic) turns tracking on. The detector logs
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
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable

from ..errors import DetectionUnavailable
from ..model import Flow, Proto
from .base import FlowSink

__all__ = [
    "NETLINK_NETFILTER",
    "NF_NETLINK_CONNTRACK_NEW",
    "ConntrackDetector",
    "ConntrackParser",
    "ReadableBuffer",
    "Wanted",
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

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET_STATS = 5
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW  # 0x0100
CT_GET_STATS = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS  # 0x0105

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG = 1
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


# --- the detector ------------------------------------------------------------------------------

_CAP_HINT = "run as root or grant CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
_MODULE_HINT = "modprobe nf_conntrack_netlink"
_TRACKING_SHORT = ("conntrack tracks no connection in this network namespace yet, so traffic "
                   "triggers may not be seen; `igdtrigger doctor` says how to turn it on")


class ConntrackDetector:
    """New TCP/UDP flows from the kernel's conntrack NEW events (Linux, CAP_NET_ADMIN).

    ``wanted`` (settable at any time) drops flows early, before a :class:`Flow` is built; with
    ``None`` every TCP/UDP flow goes to the sink. Counters are the parser's (see
    :class:`ConntrackParser`), exposed as read-only attributes and by :meth:`counters`.
    """

    name = "conntrack"

    def __init__(
        self,
        *,
        wanted: Wanted | None = None,
        rcvbuf: int = 4 * 1024 * 1024,
        batch: int = 256,
        quiet_hint_after: float | None = 60.0,
        overrun_warn_interval: float = 10.0,
    ) -> None:
        self.parser = ConntrackParser(wanted)
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
        """Report new TCP/UDP flows to ``sink`` until cancelled."""
        sock = self._open()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        buf = bytearray(65536)
        fd = sock.fileno()
        feed = self.parser.feed
        recv_into = sock.recv_into
        batch = self.batch

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
            sock.close()

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
        if self.parser.datagrams == 0:
            log.warning("conntrack: no event in %gs; %s", self.quiet_hint_after or 0,
                        _TRACKING_SHORT)


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
