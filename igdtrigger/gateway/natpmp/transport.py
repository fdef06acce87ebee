"""The NAT-PMP/PCP transport: one connected UDP socket to ``gateway:5351``.

Requests are retransmitted after 250 ms, then 500 ms, 1 s, ... (RFC 6886 §3.1; RFC 6887 §8.1.1
allows the same doubling) within a bounded total (2 s by default, so a caller never waits
longer than it asked); a reply is taken only from the gateway address and only when it matches
an outstanding request, so requests for different mappings can be in flight together
(pipelining, at most ``max_in_flight`` in the backends). miniupnpd answers one request at a
time (about 4 ms per mapping in the lab, nftables work): a window much above 16 queues
requests past the 250 ms retransmission timer, and the duplicates cost the router more work
(one run with 64 in flight lost a mapping that way).

Also the listener for the router's unsolicited announcements (NAT-PMP address change, PCP
ANNOUNCE) on 224.0.0.1:5350.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TypeVar

from igdtrigger.core.errors import (
    ConfigError,
    GatewayError,
    GatewayTimeout,
    GatewayUnreachable,
    socket_fault,
)
from igdtrigger.gateway.natpmp.codec import SERVER_PORT

__all__ = ["DatagramClient", "Matcher", "listen_announcements"]

log = logging.getLogger("igdtrigger.gateway.natpmp.transport")
T = TypeVar("T")

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
        """Is the socket open?"""
        return self._transport is not None and not self._transport.is_closing()

    @property
    def in_flight(self) -> int:
        """Requests waiting for an answer."""
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
        """Close the socket; every waiting request fails with ``GatewayUnreachable``."""
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


async def listen_announcements(group: str, port: int, iface_ip: str,
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
