"""Zeroconf (mDNS/DNS-SD): ``serve`` advertises ``_igdtrigger._tcp.local.``; the CLI finds it.

TXT record: ``version`` (igdtrigger's), ``path`` (the API prefix, ``/api/v1``), ``token``
(``yes`` when reading status from another host needs the admin token, ``no`` when the service
has ``public_read``), ``instance`` (the service's tag) and ``ui`` (the dashboard's path).
The dashboard is also advertised as ``_http._tcp`` with ``path=/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

__all__ = [
    "BROWSE_TIMEOUT", "HTTP_TYPE", "SERVICE_TYPE", "Advertiser", "Found", "advertised_addresses",
    "browse", "txt_properties",
]

if TYPE_CHECKING:
    from zeroconf.asyncio import AsyncZeroconf

log = logging.getLogger("igdtrigger.cli.discovery")

SERVICE_TYPE = "_igdtrigger._tcp.local."
HTTP_TYPE = "_http._tcp.local."
BROWSE_TIMEOUT = 1.5


@dataclass(frozen=True, slots=True)
class Found:
    """One igdtrigger service found by mDNS: instance name, address, port, TXT properties."""
    name: str
    address: str
    port: int
    properties: dict[str, str]

    @property
    def url(self) -> str:
        """The API's base URL (IPv6 addresses bracketed)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def advertised_addresses(listen_host: str) -> list[str]:
    """The IPv4 addresses to announce for an API listening on ``listen_host``."""
    if listen_host not in ("0.0.0.0", "", "::"):
        try:
            addr = ipaddress.ip_address(listen_host)
        except ValueError:
            return []
        return [] if addr.is_loopback or addr.version != 4 else [str(addr)]
    import ifaddr  # only to advertise on every interface (a wildcard listen address)

    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 (tuple)
            addr = ipaddress.ip_address(ip.ip)
            if not addr.is_loopback and not addr.is_link_local and str(addr) not in out:
                out.append(str(addr))
    return out


def txt_properties(*, version: str, token_needed: bool, instance: str,
                   api_path: str = "/api/v1") -> dict[str, str]:
    """The TXT record a service announces: version, API path, whether a token is needed,
    instance tag, dashboard path."""
    return {"version": version, "path": api_path, "token": "yes" if token_needed else "no",
            "instance": instance, "ui": "/"}


class Advertiser:
    """Registers the service (and its dashboard) on the LAN until ``close()``."""

    def __init__(self, *, listen_host: str, port: int, version: str, instance: str,
                 token_needed: bool) -> None:
        self.listen_host = listen_host
        self.port = port
        self.properties = txt_properties(version=version, token_needed=token_needed,
                                         instance=instance)
        self.instance = instance
        self.addresses: list[str] = []
        self.server = f"igdtrigger-{instance}.local."
        self.names: list[str] = []
        self._azc: AsyncZeroconf | None = None
        self._infos: list[Any] = []
        self._pending: list[asyncio.Future[None]] = []

    async def start(self) -> bool:
        """Advertise; False (and a log line saying why) when there is nothing to announce."""
        # zeroconf only when advertising starts: `run` and `[api] zeroconf = false` never load it
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        self.addresses = advertised_addresses(self.listen_host)
        if not self.addresses:
            log.info("zeroconf: no LAN address to announce for %s; not advertising",
                     self.listen_host)
            return False
        host = socket.gethostname().split(".")[0] or "host"
        label = f"igdtrigger on {host} ({self.instance})"
        packed = [socket.inet_aton(a) for a in self.addresses]
        self._azc = AsyncZeroconf(interfaces=list(self.addresses), ip_version=IPVersion.V4Only)
        for type_, props in ((SERVICE_TYPE, self.properties), (HTTP_TYPE, {"path": "/"})):
            info = AsyncServiceInfo(type_, f"{label}.{type_}", port=self.port,
                                    properties=props, server=self.server, addresses=packed)
            # returns once the records are being probed; the announcement completes in the
            # background (~1 s), watched by _registered
            pending = await self._azc.async_register_service(info, allow_name_change=True)
            self._pending.append(asyncio.ensure_future(self._registered(pending, info)))
            self._infos.append(info)
            self.names.append(info.name)
        log.info("zeroconf: advertising %s at %s port %d", SERVICE_TYPE,
                 ", ".join(self.addresses), self.port)
        return True

    @staticmethod
    async def _registered(pending: Awaitable[Any], info: Any) -> None:
        try:
            await pending
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("zeroconf: could not announce %s: %s", info.name, exc)
        else:
            log.debug("zeroconf: announced %s", info.name)

    async def close(self) -> None:
        """Unregister the announced services and close zeroconf; safe to call twice."""
        azc, self._azc = self._azc, None
        for task in self._pending:
            task.cancel()
        self._pending.clear()
        if azc is None:
            return
        with contextlib.suppress(Exception):
            for info in self._infos:
                await azc.async_unregister_service(info)
        with contextlib.suppress(Exception):
            await azc.async_close()
        self._infos.clear()


def browse(timeout: float = BROWSE_TIMEOUT, *, first: bool = True) -> list[Found]:
    """Services of ``_igdtrigger._tcp`` answering within ``timeout`` seconds (blocking).

    With ``first`` it returns as soon as one service is resolved.
    """
    # zeroconf only when a client browses (nothing answered on loopback): see Advertiser.start
    from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

    found: dict[str, Found] = {}
    done = threading.Event()
    deadline = time.monotonic() + timeout

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            threading.Thread(target=self._resolve, args=(zc, type_, name), daemon=True).start()

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self.add_service(zc, type_, name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            found.pop(name, None)

        def _resolve(self, zc: Zeroconf, type_: str, name: str) -> None:
            left = max(0.05, deadline - time.monotonic())
            with contextlib.suppress(Exception):
                info = zc.get_service_info(type_, name, timeout=int(left * 1000))
                if info is None or not info.port:
                    return
                addrs = info.parsed_addresses(IPVersion.V4Only)
                if not addrs:
                    return
                props = {(k.decode() if isinstance(k, bytes) else str(k)):
                         (v.decode() if isinstance(v, bytes) else "")
                         for k, v in info.properties.items()}
                found[name] = Found(name, addrs[0], int(info.port), props)
                if first:
                    done.set()

    zc = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, listener=Listener())
        done.wait(timeout)
        browser.cancel()
    finally:
        zc.close()
    return sorted(found.values(), key=lambda f: f.name)
