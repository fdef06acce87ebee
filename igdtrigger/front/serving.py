"""The IGD front inside ``igdtrigger serve``: the manager and the protocol servers, started
after the service (its journal restored) and stopped before it (its stop removes every upstream
mapping the front's clients held).

``serve`` calls :func:`build_front` when ``[front] enabled`` (else :func:`drop_front` ends any
client mapping a crash left in the journal), then :meth:`FrontRunner.start` and
:meth:`FrontRunner.stop`. Until ``start`` succeeds ``/readyz`` answers 503.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from igdtrigger.core.engine import FRONT_SOURCES
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import Proto
from igdtrigger.front.manager import FrontManager
from igdtrigger.front.upnp import UpnpFront, served_addresses
from igdtrigger.runtime.service import Service

__all__ = ["FrontRunner", "build_front", "drop_front"]

log = logging.getLogger("igdtrigger.front")


class FrontRunner:
    """The front's parts for one service: ``manager`` and the UPnP server (``upnp``, set by
    :meth:`start`); NAT-PMP/PCP join here."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.config.front
        self.manager = FrontManager(service, self.settings)
        self.upnp: UpnpFront | None = None
        service.front_observer = self.manager.observe
        service.front_serving = False
        service.front_status = self.status
        self.manager.attach()

    def wrap_prefilter(self, wanted: Callable[[Proto, int], bool]) -> Callable[[Proto, int], bool]:
        """A detector prefilter that also lets through flows on the front's ports."""
        front = self.manager

        def either(proto: Proto, port: int) -> bool:
            return wanted(proto, port) or front.wants(proto, port)

        return either

    async def start(self) -> None:
        """Serve on ``[front] interfaces``; raises ``ConfigError`` when one is missing or a
        socket cannot be had (port in use, no permission)."""
        try:
            addresses = served_addresses(self.settings.interfaces)
        except (OSError, ImportError) as exc:
            raise ConfigError(str(exc), field="front.interfaces") from None
        if not addresses:
            raise ConfigError("no interface with a private IPv4 address to serve; name them "
                              "in [front] interfaces", field="front.interfaces")
        self.upnp = UpnpFront(self.manager, addresses, tag=self.service.tag,
                              http_port=self.settings.http_port)
        try:
            await self.upnp.start()
        except OSError as exc:
            self.upnp = None
            raise ConfigError(f"cannot serve UPnP ({exc.strerror or exc}); is another UPnP "
                              "server (miniupnpd) running here? change [front] http_port",
                              field="front") from None
        self.service.front_serving = True

    async def stop(self) -> None:
        self.service.front_serving = False
        if self.upnp is not None:
            await self.upnp.stop()
        await self.manager.stop()

    def status(self) -> dict[str, Any]:
        out = self.manager.status()
        out["upnp"] = self.upnp.locations() if self.upnp is not None else []
        if self.upnp is not None and self.upnp.faults:
            out["upnp_faults"] = {str(k): v for k, v in sorted(self.upnp.faults.items())}
        if (warning := self.manager.double_nat()) is not None:
            out["warning"] = (f"apps asking this front for their external address get the "
                              f"upstream router's; {warning}")
        return out


def build_front(service: Service, detectors: Iterable[Any]) -> FrontRunner:
    """The front for ``service``; detectors' prefilters also pass the front's ports."""
    runner = FrontRunner(service)
    for det in detectors:
        if hasattr(det, "wanted") and det.wanted is not None:
            det.wanted = runner.wrap_prefilter(det.wanted)
    return runner


def drop_front(service: Service) -> int:
    """``[front]`` is off: end the client mappings a crash left in the journal (removed
    upstream by the service's first pass). Returns how many."""
    ended = [a.id for a in service.engine.activations.values() if a.source in FRONT_SOURCES]
    for act_id in ended:
        service.engine.deactivate(act_id)
    if ended:
        log.info("front: %d client mapping(s) from before the restart ended ([front] is off)",
                 len(ended))
    return len(ended)
