"""The front's life inside ``igdtrigger serve``: started after the service (its journal restored),
stopped before it.

:func:`prepare_front` builds the :class:`~igdtrigger.front.manager.FrontManager` (with the inner
DNAT forwarder when this host is the LAN's gateway, topology 1: :mod:`.dnat`) before the service
starts; :meth:`FrontHandle.start` then takes back the journal's client mappings (the inner DNAT
table becomes exactly their forwarding: a crashed run's rules are swept) and starts the
NAT-PMP/PCP server on the served interfaces.
:meth:`FrontHandle.close` stops answering clients; :meth:`FrontHandle.finish`, after the
service removed every upstream mapping, deletes the inner DNAT table and our accept rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from igdtrigger.core.model import Proto
from igdtrigger.front.dnat import DnatForwarder, make_forwarder
from igdtrigger.front.manager import FrontManager
from igdtrigger.front.pcpserver import PcpServer, start_portmap
from igdtrigger.netutil import default_gateway

if TYPE_CHECKING:
    from igdtrigger.runtime.service import Service

__all__ = ["FrontHandle", "prepare_front"]

log = logging.getLogger("igdtrigger.front")

RECONCILE_INTERVAL = 1.0


@dataclass
class FrontHandle:
    """The running front: its manager, forwarder (topology 1, else ``None``) and servers."""

    manager: FrontManager
    forwarder: DnatForwarder | None = None
    portmap: PcpServer | None = None
    _reconciler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """After ``service.start()`` (its journal restored): take back the client mappings,
        make the inner DNAT exactly their forwarding (a crashed run's rules swept), serve
        NAT-PMP/PCP. Raises ``ConfigError`` (a served interface missing) or ``OSError`` (port
        5351 taken, nft refused); the caller stops as on any start-up failure."""
        self.manager.attach()
        if self.forwarder is not None:
            await self.forwarder.restore(self.manager.mappings())
        self.portmap = await start_portmap(self.manager, self.manager.settings.interfaces)
        if self.forwarder is not None:
            self._reconciler = asyncio.create_task(self._reconcile(), name="front-dnat")

    async def _reconcile(self) -> None:
        """Every ``RECONCILE_INTERVAL`` s: the inner DNAT follows the front's live mappings (a
        mapping the engine ended by lease or idle loses its inner rule here)."""
        assert self.forwarder is not None
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self.forwarder.sync(self.manager.mappings())
            except OSError as exc:
                log.warning("front: %s", exc)

    async def close(self) -> None:
        """Stop answering clients (before the service stops)."""
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self.portmap is not None:
            await self.portmap.close()

    async def finish(self) -> None:
        """After the service stopped (upstream mappings removed): no inner rule is left."""
        await self.manager.stop()
        if self.forwarder is not None:
            try:
                await self.forwarder.close()
            except OSError as exc:
                log.warning("front: %s", exc)


def _upstream_host(url: str | None) -> str | None:
    host = urllib.parse.urlsplit(url).hostname if url else None
    return host or default_gateway()


def prepare_front(service: Service, url: str | None) -> FrontHandle | None:
    """Before ``service.start()``: the manager (and the forwarder in topology 1), seeing every
    detector observation. The detectors' prefilter lets through flows to a client mapping's
    ports too (``FrontManager.wants``), and their kernel-side port filter is off: the ports
    clients will map are not known in advance. ``None`` when ``[front]`` is not enabled;
    ``url``: the upstream router's IGD URL when configured. Raises ``ConfigError`` for a bad
    ``forward_chain``."""
    settings = service.config.front
    if not settings.enabled:
        return None
    forwarder = make_forwarder(settings.interfaces, _upstream_host(url),
                               forward_chain=settings.forward_chain)
    manager = FrontManager(service, settings, forwarder=forwarder)
    service.front_observer = manager.observe
    engine_wants = service.engine.wants

    def wants(proto: Proto, port: int) -> bool:
        return engine_wants(proto, port) or manager.wants(proto, port)

    for det in service.detectors:
        if hasattr(det, "wanted"):
            det.wanted = wants
        if hasattr(det, "ports"):
            det.ports = None
    return FrontHandle(manager, forwarder)
