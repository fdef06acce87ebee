"""Listen to the gateway's SSDP NOTIFYs: a reboot (new BOOTID.UPNP.ORG, byebye then alive) or
an IGD that moved to a new URL is known the moment the router announces itself again, instead of
at the next periodic check.

The parsing and the decisions are in ``igd.NotifyTracker`` (sans-I/O); this module only owns the
socket. Listening is best effort: when port 1900 cannot be joined (another program holds it
without SO_REUSEADDR, no multicast on the interface), the periodic check still catches restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import urllib.parse
from collections.abc import Callable

from igdtrigger.gateway.base import RouterChange
from igdtrigger.gateway.upnp.ssdp import SSDP_ADDR, NotifyTracker

__all__ = [
    "MAX_DATAGRAM", "NotifyWatcher",
]

log = logging.getLogger("igdtrigger.gateway")

MAX_DATAGRAM = 8192


class _NotifyProtocol(asyncio.DatagramProtocol):
    def __init__(self, tracker: NotifyTracker, on_change: Callable[[RouterChange], None]) -> None:
        self.tracker = tracker
        self.on_change = on_change
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.received += 1
        try:
            change = self.tracker.feed(data[:MAX_DATAGRAM], str(addr[0]))
        except Exception:  # a hostile datagram must never stop the listener
            log.debug("ignoring an SSDP datagram from %s", addr[0], exc_info=True)
            return
        if change is not None:
            self.on_change(change)


def _open_socket(iface_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("", SSDP_ADDR[1]))
        mreq = struct.pack("4s4s", socket.inet_aton(SSDP_ADDR[0]), socket.inet_aton(iface_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NotifyWatcher:
    """Owns the multicast socket for one gateway; ``close()`` releases it."""

    def __init__(self, location: str, local_address: str,
                 on_change: Callable[[RouterChange], None], *, root_uuid: str = "") -> None:
        """``root_uuid``: the connected IGD's root UDN (``GatewayInfo.root_uuid``): only its
        announcements count (``igd.NotifyTracker``)."""
        self.location = location
        self.local_address = local_address
        self.gateway_ip = urllib.parse.urlsplit(location).hostname or ""
        self.tracker = NotifyTracker(self.gateway_ip, location,
                                     [root_uuid] if root_uuid else ())
        self.on_change = on_change
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _NotifyProtocol | None = None

    def follow(self, location: str) -> bool:
        """The IGD is now used at ``location`` (it moved). On the same router: keep listening,
        remembering every URL its root was announced at (no move back and forth between two
        of them), and True; on another host: False (a new watcher is needed)."""
        if urllib.parse.urlsplit(location).hostname != self.gateway_ip:
            return False
        self.location = location
        self.tracker.follow(location)
        return True

    @property
    def listening(self) -> bool:
        """Has the watcher joined the SSDP group?"""
        return self._transport is not None

    async def start(self) -> bool:
        """Join the SSDP group on our LAN address; False (logged) if that is not possible."""
        try:
            sock = _open_socket(self.local_address)
            loop = asyncio.get_running_loop()
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _NotifyProtocol(self.tracker, self.on_change), sock=sock)
        except OSError as exc:
            log.info("not listening to the router's SSDP announcements (%s); router restarts "
                     "are still caught by the periodic check", exc)
            return False
        self._transport = transport
        self._protocol = protocol
        log.debug("listening to SSDP NOTIFYs from %s on %s", self.gateway_ip,
                  self.local_address)
        return True

    def close(self) -> None:
        """Leave the group and close the socket."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
