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

from igdtrigger.core.activation import FRONT_SOURCES
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import Flow, Proto
from igdtrigger.front.manager import FrontManager
from igdtrigger.front.upnp import UpnpFront, served_addresses
from igdtrigger.runtime.service import Service

__all__ = ["FrontRunner", "build_front", "drop_front", "front_checks"]

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

    def wrap_follows(self, follows: Callable[[Flow], bool]) -> Callable[[Flow], bool]:
        """The flows a detector keeps looking at: the service's, and the front's (use)."""
        front = self.manager

        def either(flow: Flow) -> bool:
            return follows(flow) or front.follows(flow)

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
                              http_port=self.settings.http_port,
                              version=self.settings.igd_version)
        try:
            await self.upnp.start()
        except OSError as exc:
            self.upnp = None
            raise ConfigError(f"cannot serve UPnP ({exc.strerror or exc}); is another UPnP "
                              "server (miniupnpd) running here? change [front] http_port",
                              field="front") from None
        self.service.front_serving = True

    async def stop(self) -> None:
        """Stop serving (readiness off first); the service's stop removes the mappings."""
        self.service.front_serving = False
        if self.upnp is not None:
            await self.upnp.stop()
        await self.manager.stop()

    def status(self) -> dict[str, Any]:
        """The front's part of the service's status (what doctor and /metrics read)."""
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
        if getattr(det, "wanted", None) is not None:
            det.wanted = runner.wrap_prefilter(det.wanted)
        if getattr(det, "follows", None) is not None:
            det.follows = runner.wrap_follows(det.follows)
    return runner


def drop_front(service: Service) -> int:
    """``[front]`` is off: end the client mappings a crash left in the journal (removed
    upstream by the service's first pass). Returns how many."""
    engine = service.pipeline.engine
    ended = [a.id for a in engine.activations.values() if a.source in FRONT_SOURCES]
    for act_id in ended:
        engine.deactivate(act_id)
    if ended:
        log.info("front: %d client mapping(s) from before the restart ended ([front] is off)",
                 len(ended))
    return len(ended)


def front_checks(front: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``doctor``'s lines (level, name, detail, fix) about a running front, from the front's
    part of the service's status."""
    where = ", ".join(front.get("upnp") or []) or "nowhere yet"
    out = [("ok" if front.get("upnp") else "FAIL", "front",
            f"UPnP IGD at {where}; {len(front.get('mappings') or [])} client mapping(s)",
            "" if front.get("upnp") else "see the service's log ([front] interfaces)")]
    if front.get("warning"):
        out.append(("warn", "front external address", str(front["warning"]),
                    "apps behind this front are reachable only from inside the upstream "
                    "network unless the upstream's own router forwards the ports too"))
    if front.get("refused"):
        out.append(("ok", "front refusals", ", ".join(
            f"{k} {v}" for k, v in sorted(front["refused"].items())), ""))
    return out
