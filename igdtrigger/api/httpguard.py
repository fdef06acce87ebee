"""The API's listening sockets, bounded: a LAN host cannot starve the service of connections or
file descriptors.

aiohttp accepts every connection and keeps an idle one for an hour by default. Here:

- a request's headers must arrive within ``header_timeout`` seconds of the connection (or of the
  previous response): aiohttp's keep-alive timer, which is not reset by a trickle of bytes, so
  half a request line is closed as surely as an idle connection;
- each client (an IPv4 address, an IPv6 /64) may hold ``per_client`` connections, and all
  clients but this machine ``total`` together; loopback and the local admin socket have a
  pool of their own (``local``), so a LAN flood never locks out ``igdtrigger status`` or the admin;
- ``total`` is also kept well under the process's file-descriptor limit
  (``RLIMIT_NOFILE``, raised to its hard limit at start): router I/O, the journal and the
  detectors always have descriptors left.

A connection past a cap is reset at once, before asyncio or aiohttp spend anything on it (our
own accept loop: a reconnecting flood costs an ``accept`` and a ``close`` per attempt); each
refusal is counted in ``refused`` (reported by status and /metrics) and logged at most once a
minute per kind. Out of descriptors anyway (EMFILE), accepting pauses for a second instead of
spinning. ``listen_socket`` makes the TCP socket itself so ``[::]`` is dual-stack where the OS
allows it (asyncio would set IPV6_V6ONLY).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igdtrigger.core import trace
from igdtrigger.netutil import host_key

__all__ = [
    "ACCEPT_BATCH", "BACKLOG", "FD_RESERVE", "PAUSE_ON_EMFILE", "Acceptor", "ConnectionGuard",
    "ConnectionLimits", "accepted_ns", "admin_socket", "describe", "listen_socket",
    "raise_fd_limit", "start_servers",
]

log = logging.getLogger("igdtrigger.api.app")

FD_RESERVE = 128  # descriptors never handed to API clients (router I/O, journal, detectors)
BACKLOG = 1024  # a reconnecting flood must not fill the queue and drop the SYNs of others
ACCEPT_BATCH = 1024  # connections accepted per readiness event (the whole backlog)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds on API connections: ``header_timeout`` seconds to send the headers (and to stay idle
    between keep-alive requests), at most ``per_client`` from one address, ``total`` from all
    non-loopback addresses together, ``local`` from loopback and the admin socket."""

    header_timeout: float = 10.0  # seconds to send a request's headers (and keep-alive idle)
    per_client: int = 32  # connections from one address (not loopback)
    total: int = 512  # connections from all addresses but loopback, together
    local: int = 128  # loopback and the admin socket: a pool of their own

    def within_fd_limit(self, soft_limit: int) -> ConnectionLimits:
        """These limits with ``total`` and ``local`` lowered so that together they use at most
        half of ``soft_limit`` descriptors (less the reserve)."""
        room = max(8, (soft_limit - FD_RESERVE) // 2)
        local = min(self.local, max(4, room // 4))
        total = min(self.total, max(4, room - local))
        return ConnectionLimits(self.header_timeout, min(self.per_client, total), total, local)


def _seccomp_filtered(status: Path = Path("/proc/self/status")) -> bool:
    """Does a seccomp filter run this process (``Seccomp: 2``)? Then a system call it forbids
    may kill us (systemd's ``SystemCallFilter=~@resources`` covers setrlimit)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("Seccomp:"):
                return line.split(":", 1)[1].strip() not in ("", "0")
    except OSError:
        pass
    return False


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's ``LimitNOFILE=`` sets both;
    under a seccomp filter we leave it to the unit, since setrlimit may be forbidden there).
    Returns the soft limit now in force (a large number where there is no such limit)."""
    try:
        import resource  # POSIX only: the ImportError below is the Windows case
    except ImportError:  # Windows
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard and not _seccomp_filtered():
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _peer_key(family: int, peer: Any) -> tuple[str, bool]:
    """(client key, local?) of a connection's peer: the admin socket and loopback are local;
    an IPv6 client is its /64 (``host_key``: privacy addresses do not multiply its share)."""
    if family == getattr(socket, "AF_UNIX", -1):
        return "unix", True
    host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host or "unknown", False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return host_key(str(addr)), addr.is_loopback


class ConnectionGuard:
    """Counts connections per client and refuses those past the limits (see the module
    docstring). ``factory(inner)`` wraps a protocol factory (aiohttp's ``Server``)."""

    def __init__(self, limits: ConnectionLimits = ConnectionLimits()) -> None:
        self.limits = limits
        self.per_client: collections.Counter[str] = collections.Counter()
        self.remote = 0  # open connections from addresses but loopback
        self.local = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self._last_log: dict[str, float] = {}

    def admit(self, client: str, local: bool) -> str | None:
        """Count a new connection; the reason it is refused, or None."""
        lim = self.limits
        if local:
            if self.local >= lim.local:
                return "local"
            self.local += 1
            return None
        if self.per_client[client] >= lim.per_client:
            return "per_client"
        if self.remote >= lim.total:
            return "total"
        self.per_client[client] += 1
        self.remote += 1
        return None

    def release(self, client: str, local: bool) -> None:
        """A connection ``admit`` let in has closed: its slot is free again."""
        if local:
            self.local -= 1
            return
        self.remote -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    def refuse(self, client: str, why: str) -> None:
        """Count a refused connection by ``why`` (an ``admit`` reason or ``"descriptors"``); running
        out of descriptors is logged, at most once a minute."""
        self.refused[why] += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_log.get(why, -3600.0) >= 60.0:
            self._last_log[why] = now
            if why == "descriptors":
                log.warning("out of file descriptors: not accepting API connections for %gs "
                            "(%d times so far; logged once a minute)", PAUSE_ON_EMFILE,
                            self.refused[why])
                return
            limit = {"local": self.limits.local, "per_client": self.limits.per_client,
                     "total": self.limits.total}[why]
            log.warning("API connection from %s refused: %s limit of %d connections reached "
                        "(%d refused so far; logged once a minute)", client,
                        why.replace("_", " "), limit, self.refused[why])


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for an admitted connection; gives its place back when it ends."""

    __slots__ = ("_client", "_guard", "_inner", "_local", "_make", "accepted_ns")

    def __init__(self, guard: ConnectionGuard, make: Callable[[], asyncio.Protocol],
                 client: str, local: bool, accepted_ns: int = 0) -> None:
        self._guard = guard
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._client = client
        self._local = local
        # when accepted (perf_counter_ns) while tracing, until the first request takes it
        self.accepted_ns = accepted_ns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner = self._make()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        inner, self._inner = self._inner, None
        self._guard.release(self._client, self._local)
        inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``::`` accepts IPv4 too where the OS allows
    (IPV6_V6ONLY off). Raises OSError."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                0 if ipaddress.ip_address(addr[0]).is_unspecified else 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def admin_socket(path: Path) -> socket.socket:
    """The local admin socket at ``path``: mode 0600 (made so by the umask while binding; no
    chmod by name afterwards, which a symlink swapped in meanwhile would redirect), so only
    this service's user (and root) can connect. A stale socket, or a symlink planted there,
    is removed, never followed; anything else there stays and binding fails. A directory
    other users may write to gets a warning: they could replace the socket (the CLI then
    refuses it, as its owner is not the directory's). Raises OSError."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
            path.unlink()
    with contextlib.suppress(OSError):
        if path.parent.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("%s can be written by other users: they could replace the admin "
                        "socket (chmod 700 it)", path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT, no FIN dance
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_ON_EMFILE = 1.0


class Acceptor:
    """Our accept loop on one listening socket: a refused connection is reset before asyncio
    makes a transport for it; an admitted one is handed to ``inner`` (aiohttp's ``Server``)."""

    def __init__(self, sock: socket.socket, guard: ConnectionGuard,
                 inner: Callable[[], asyncio.Protocol]) -> None:
        self.sock = sock
        self.guard = guard
        self.inner = inner
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:  # wait for descriptors instead of spinning
                    self.guard.refuse("?", "descriptors")
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(PAUSE_ON_EMFILE, self._resume)
                    return
                continue  # ECONNABORTED and the like: that client gave up
            client, local = _peer_key(conn.family, peer)
            why = self.guard.admit(client, local)
            if why is not None:
                self.guard.refuse(client, why)
                with contextlib.suppress(OSError):
                    if conn.family != getattr(socket, "AF_UNIX", -1):
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            conn.setblocking(False)
            accepted = time.perf_counter_ns() if trace.ON else 0
            task = self.loop.create_task(self._serve(conn, client, local, accepted))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, client: str, local: bool, accepted: int) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: _GuardedProtocol(self.guard, self.inner, client, local, accepted), conn)
        except OSError:
            self.guard.release(client, local)
            conn.close()

    def _resume(self) -> None:
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        """Stop accepting (open connections stay with aiohttp)."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def start_servers(inner: Callable[[], asyncio.Protocol], guard: ConnectionGuard,
                        socks: list[socket.socket]) -> list[Acceptor]:
    """Serve ``inner`` (aiohttp's ``Server``) on each socket through ``guard``."""
    return [Acceptor(sock, guard, inner) for sock in socks]


def accepted_ns(transport: asyncio.BaseTransport | None) -> int:
    """When the connection of ``transport`` was accepted (``perf_counter_ns``), once: 0 on its
    later requests, when not tracing (``core.trace``) or for a connection not ours."""
    proto = transport.get_protocol() if transport is not None else None
    if not isinstance(proto, _GuardedProtocol):
        return 0
    at, proto.accepted_ns = proto.accepted_ns, 0
    return at


def describe(guard: ConnectionGuard) -> dict[str, Any]:
    """For status: open connections, limits and refusals."""
    lim = guard.limits
    return {"open": guard.remote, "open_local": guard.local,
            "limits": {"per_client": lim.per_client, "total": lim.total, "local": lim.local,
                       "header_timeout": lim.header_timeout},
            "refused": dict(sorted(guard.refused.items()))}
