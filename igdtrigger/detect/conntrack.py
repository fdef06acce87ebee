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

Filtering (:mod:`~igdtrigger.detect.ctfilter`: with ``ports`` set, a BPF filter keeps unrelated
flows from waking us) and decoding (:mod:`~igdtrigger.detect.ctnetlink`, ``ctquery``: sans-I/O)
live apart; this module owns the sockets, the follow loop and the hints.

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
import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from igdtrigger.core import trace
from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import Flow, FlowEnded, FlowLive, FlowsListed, PortRange, Proto
from igdtrigger.detect.base import FlowSink, Observation
from igdtrigger.detect.ctfilter import attach_filter, build_filter
from igdtrigger.detect.ctnetlink import (
    _NLMSGHDR_FULL,
    NETLINK_NETFILTER,
    NF_NETLINK_CONNTRACK_NEW,
    NLMSG_HDRLEN,
    SO_RCVBUFFORCE,
    TCP_CONNTRACK_CLOSE_WAIT,
    TCP_CONNTRACK_FIN_WAIT,
    ConntrackParser,
    ReadableBuffer,
    Wanted,
)
from igdtrigger.detect.ctquery import (
    CtEntry,
    _has_done,
    _reply_errno,
    decode_entries,
    decode_stats_reply,
    encode_get,
    encode_stats_request,
    first_look_idle,
    udp_idle,
)

__all__ = ["ConntrackDetector"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Followed:
    """What is remembered of a followed flow between looks."""

    deadline: float | None  # when its entry would die, as of the reference look (rounded down)
    connected: bool = False
    looked: float | None = None  # when it was last looked at


_UDP_TIMEOUT = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"
_UDP_TIMEOUT_STREAM = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"
_TCP_TIMEOUT = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_"


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


class _ParserCounter:
    """A read-only ``int`` attribute forwarding to the same name on ``self.parser``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: ConntrackDetector, owner: type | None = None) -> int:
        return int(getattr(obj.parser, self.name))

    def __set__(self, obj: ConntrackDetector, value: int) -> None:
        raise AttributeError(f"{self.name} is counted by the parser: read-only here")


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
        """The ports the parser keeps (``None``: every flow)."""
        return self.parser.wanted

    @wanted.setter
    def wanted(self, value: Wanted | None) -> None:
        self.parser.wanted = value

    # the parser's counters, read through the detector (their meaning: ``ConntrackParser``)
    datagrams = _ParserCounter()
    events_seen = _ParserCounter()
    flows_reported = _ParserCounter()
    flows_filtered = _ParserCounter()
    ignored = _ParserCounter()
    malformed = _ParserCounter()
    errors = _ParserCounter()
    overruns = _ParserCounter()  # NLMSG_OVERRUN messages plus (counted here) ENOBUFS

    def counters(self) -> dict[str, int]:
        """The parser's counters by name, plus ``enobufs``, ``followed`` and ``lookups``."""
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
        request = encode_stats_request(seq)
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
            answered, entries = decode_stats_reply(sock.recv(65536), seq)
            if answered:
                return entries

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
                if trace.ON:  # the datagram's arrival, then the flows parsed from it
                    trace.mark("recv", first=True)
                for flow in trace.marked("parsed", feed(buf, n)) if trace.ON else feed(buf, n):
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
                    sock.send(encode_stats_request(seq))
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
        log.warning("conntrack: no event in %gs; %s", self.quiet_hint_after or 0, _TRACKING_HINT)


def _read_sysctl(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
