"""systemd's notify protocol (``Type=notify``): one datagram per message to ``$NOTIFY_SOCKET``.

``READY=1`` once serving, ``STATUS=…`` for ``systemctl status``, ``WATCHDOG=1`` every half
``$WATCHDOG_USEC`` from a task on the event loop (a stuck loop stops the pings and systemd
restarts the service), ``STOPPING=1`` on the way out. Without ``$NOTIFY_SOCKET`` every call is a
no-op. An address starting with ``@`` is an abstract socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

__all__ = [
    "Notifier",
]


class Notifier:
    """systemd's ``sd_notify`` protocol over ``$NOTIFY_SOCKET`` (sd_notify(3)); every call is a
    no-op returning False when the socket is not set."""
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if addr.startswith("@"):
            self.address = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdecimal() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        """Is ``$NOTIFY_SOCKET`` set (a systemd ``Type=notify`` unit)?"""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False when disabled or the send failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1`` (startup finished), with an optional status line."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=``: the line ``systemctl status`` shows."""
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1`` (shutdown began), with an optional status line."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` at half the interval systemd asked for, until cancelled."""
        if self.address is None or self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
