"""Socket-table detector: this host's connected sockets, polled (no privileges; any OS).

Each poll lists the host's TCP and UDP sockets that have a remote address and reports every
one not seen in the previous poll as a :class:`Flow` (local address -> remote address:port)
followed by a :class:`FlowLive` (``connected``: a connected socket holds its activation however
silent it is), and every one that was there and is gone (closed, or a TCP socket past
ESTABLISHED: FIN_WAIT, CLOSE_WAIT, TIME_WAIT...) as a :class:`FlowEnded` (``closed``): the idle
timer starts then.
On Linux the table is read straight from ``/proc/net/{tcp,tcp6,udp,udp6}`` (one read per file,
no per-process scan); elsewhere through psutil's ``net_connections``.

What it cannot see:

* **UDP that only uses ``sendto``** on an unconnected socket: the socket table shows no remote
  address for it (many games' UDP traffic looks like this). Conntrack sees those flows.
* Connections that open and close between two polls (``socket_interval``, default 1 s).
* Other hosts' traffic: only this machine's sockets.

Inbound connections (a remote client connected to a port we listen on, found by its local port
being a listening port of the same protocol) are not triggers but *inbound use* (issue 18): the
readers list them turned around, the remote end first, so their :class:`Flow` reads
``remote -> this host:listening port`` exactly as conntrack's original tuple of the inbound flow
does. The engine counts one arriving on a port an activation opened as use of that activation,
and a connected one holds it until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from igdtrigger.core.errors import DetectionUnavailable
from igdtrigger.core.model import Flow, FlowEnded, FlowLive, FlowsListed, Proto
from igdtrigger.detect.base import FlowSink, Observation, source_filter

__all__ = [
    "Conn", "SocketTableDetector", "Wanted", "default_reader", "parse_proc_net", "read_proc_net",
    "read_psutil",
]

log = logging.getLogger("igdtrigger.detect")

Wanted = Callable[[Proto, int], bool]
# (proto, local address, local port, remote address, remote port); an inbound connection is
# listed turned around (its remote end first), so it reads as the flow that arrived
Conn = tuple[Proto, str, int, str, int]

_PROC_FILES = (("tcp", Proto.TCP, False), ("tcp6", Proto.TCP, True),
               ("udp", Proto.UDP, False), ("udp6", Proto.UDP, True))
_TCP_LISTEN = "0A"
# FIN_WAIT1/2 (this side closed or shut down its sending side; a closed socket whose peer never
# closes lingers there tcp_fin_timeout = 60 s as an orphan), TIME_WAIT, CLOSE, CLOSE_WAIT,
# LAST_ACK, CLOSING: the connection no longer holds (a table cannot show data still flowing the
# other way; conntrack can, see its module docstring)
_TCP_GONE = {"04", "05", "06", "07", "08", "09", "0B"}


def _hex_addr(text: str, v6: bool) -> str:
    raw = bytes.fromhex(text)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # four 32-bit words, each in host (little-endian) byte order
    fixed = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(fixed)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def parse_proc_net(text: str, proto: Proto, v6: bool) -> tuple[list[Conn], set[int]]:
    """(connected sockets, listening local ports) from one ``/proc/net/{tcp,udp}[6]`` file.
    Malformed lines are skipped; never raises."""
    conns: list[Conn] = []
    listening: set[int] = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        try:
            laddr, lport_hex = parts[1].split(":")
            raddr, rport_hex = parts[2].split(":")
            lport, rport = int(lport_hex, 16), int(rport_hex, 16)
            state = parts[3]
            if proto is Proto.TCP and state == _TCP_LISTEN:
                listening.add(lport)
                continue
            if proto is Proto.UDP and rport == 0:
                listening.add(lport)  # a bound, unconnected UDP socket: a server's, or sendto
                continue
            if rport == 0 or (proto is Proto.TCP and state in _TCP_GONE):
                continue
            conns.append((proto, _hex_addr(laddr, v6), lport, _hex_addr(raddr, v6), rport))
        except (ValueError, IndexError):
            continue
    return conns, listening


def _turned(c: Conn) -> Conn:
    """An inbound connection as the flow that arrived: the remote end first."""
    return (c[0], c[3], c[4], c[1], c[2])


def read_proc_net(root: str = "/proc/net") -> list[Conn]:
    """This host's connected sockets, from procfs (Linux); inbound ones turned around."""
    out: list[Conn] = []
    for name, proto, v6 in _PROC_FILES:
        try:
            with open(f"{root}/{name}", encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue  # no IPv6 here, say
        conns, listening = parse_proc_net(text, proto, v6)
        out.extend(_turned(c) if c[2] in listening else c for c in conns)
    return out


def read_psutil() -> list[Conn]:
    """This host's connected sockets, through psutil (macOS, Windows, BSD); inbound ones turned
    around."""
    import psutil  # a dependency only off Linux (pyproject), where this path runs

    rows: list[Any] = psutil.net_connections(kind="inet")
    listening: set[tuple[Proto, int]] = set()
    conns: list[Conn] = []
    for c in rows:
        proto = Proto.TCP if c.type == socket.SOCK_STREAM else Proto.UDP
        if not c.raddr:
            if c.laddr:
                listening.add((proto, int(c.laddr.port)))
            continue
        if proto is Proto.TCP and c.status == psutil.CONN_LISTEN:
            listening.add((proto, int(c.laddr.port)))
            continue
        if not c.laddr:
            continue
        conns.append((proto, str(c.laddr.ip), int(c.laddr.port), str(c.raddr.ip),
                      int(c.raddr.port)))
    return [_turned(c) if (c[0], c[2]) in listening else c for c in conns]


def default_reader() -> Callable[[], list[Conn]]:
    """``/proc/net`` on Linux, psutil elsewhere."""
    return read_proc_net if sys.platform.startswith("linux") else read_psutil


class SocketTableDetector:
    """Polls the socket table; reports each new connected socket once."""

    name = "sockets"
    holds_flows = True  # its flows hold activations: when it stops, the service releases them

    def __init__(self, interval: float = 1.0, *, reader: Callable[[], list[Conn]] | None = None,
                 wanted: Wanted | None = None) -> None:
        self.interval = interval
        self.reader = reader or default_reader()
        self.wanted = wanted
        self.standby_for = ""  # "conntrack": only run when that one is not active
        self._seen: set[Conn] = set()
        self.polls = 0
        self.flows_reported = 0
        self.poll_seconds = 0.0  # CPU time spent polling, all polls together

    def check(self) -> None:
        """Raises ``DetectionUnavailable`` when the socket table cannot be read here."""
        try:
            self.reader()
        except ImportError:
            raise DetectionUnavailable(
                "the socket-table detector needs psutil on this platform (pip install psutil)"
            ) from None
        except PermissionError as exc:
            raise DetectionUnavailable(
                f"cannot read the socket table ({exc}); on macOS other users' sockets need "
                "root") from None
        except Exception as exc:
            raise DetectionUnavailable(f"cannot read the socket table: {exc}") from None

    def poll(self) -> list[Flow]:
        """One look at the table: the flows that appeared since the last one."""
        return [o for o in self.look() if isinstance(o, Flow)]

    def look(self) -> list[Observation]:
        """One look at the table: each socket that appeared since the last one as a new
        :class:`Flow` and a connected :class:`FlowLive`; each that went away as a
        :class:`FlowEnded`."""
        t0 = time.thread_time()
        try:
            now = set(self.reader())
        finally:
            self.poll_seconds += time.thread_time() - t0
            self.polls += 1
        new, gone = now - self._seen, self._seen - now
        self._seen = now
        out: list[Observation] = []
        for flow in self._flows(new):
            out += (flow, FlowLive(flow, connected=True))
        out += (FlowEnded(flow, closed=True) for flow in self._flows(gone))
        return out

    def _flows(self, conns: Iterable[Conn]) -> Iterable[Flow]:
        wanted = self.wanted
        source = source_filter(wanted)  # the front's mapped ports as the local (source) port
        for proto, laddr, lport, raddr, rport in conns:
            if wanted is not None and not wanted(proto, rport) and (
                    source is None or not source(proto, lport)):
                continue
            with contextlib.suppress(ValueError):
                yield Flow(proto, ipaddress.ip_address(laddr), ipaddress.ip_address(raddr),
                           lport, rport)

    async def run(self, sink: FlowSink) -> None:
        """Read the socket table every ``interval`` seconds, reporting flows to ``sink`` (and
        ``FlowsListed`` after the first good read); raises ``DetectionUnavailable`` after 10
        failures in a row."""
        failures = 0
        listed: bool | None = False  # None: the first good look is read, not yet reported
        while True:
            try:
                seen = await asyncio.to_thread(self.look)
                failures = 0
                listed = None if listed is False else listed
            except Exception as exc:  # a transient read error must not end detection
                failures += 1
                if failures >= 10:
                    raise DetectionUnavailable(f"socket table unreadable: {exc}") from None
                log.debug("socket table poll failed: %s", exc)
                seen = []
            for obs in seen:
                if isinstance(obs, Flow):
                    self.flows_reported += 1
                sink(obs)
            if listed is None:
                listed = True  # the first good look is reported: every connected socket known
                sink(FlowsListed(self.name))
            await asyncio.sleep(self.interval)
