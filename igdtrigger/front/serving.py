"""The IGD front inside ``igdtrigger serve``: the manager and the protocol servers, started
after the service (its journal restored) and stopped before it (its stop removes every upstream
mapping the front's clients held).

``serve`` calls :func:`build_front` when ``[front] enabled`` (else :func:`drop_front` ends any
client mapping a crash left in the journal), then :meth:`FrontRunner.start` and
:meth:`FrontRunner.stop`. Until ``start`` succeeds ``/readyz`` answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from igdtrigger.core.activation import FRONT_SOURCES
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import Flow, Proto
from igdtrigger.detect.base import EitherEnd
from igdtrigger.front.dnat import ForwardDrop, read_forward_drops
from igdtrigger.front.manager import FrontManager
from igdtrigger.front.pcpserver import PcpServer, PortMapService
from igdtrigger.front.topology import (
    make_forwarder,
    topology_checks,
    topology_status,
    upstream_host,
)
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
        # front/dnat.py: topology 1 (this host routes the LAN): the inner DNAT forwarder
        self.forwarder = make_forwarder(self.settings.interfaces,
                                        upstream_host(service.config.gateway.url),
                                        forward_chain=self.settings.forward_chain)
        self.manager = FrontManager(service, self.settings, forwarder=self.forwarder)
        self.upnp: UpnpFront | None = None
        self.portmap: PcpServer | None = None  # NAT-PMP/PCP (front/pcpserver.py)
        self._reconciler: asyncio.Task[None] | None = None
        self.forward_drops: list[ForwardDrop] | None = []  # forward chains that would drop
        service.front_observer = self.manager.observe
        service.front_serving = False
        service.front_status = self.status
        # a flow detector that stops can no longer say when the connections it reported end
        service.supervisor.on_release.append(self.manager.release_flows)
        self.manager.attach()

    def wrap_prefilter(self, wanted: Callable[[Proto, int], bool]) -> Callable[[Proto, int], bool]:
        """A detector prefilter that also lets through flows on the front's ports."""
        front = self.manager

        def either(proto: Proto, port: int) -> bool:
            return wanted(proto, port) or front.wants(proto, port)

        return EitherEnd(either, front.wants)  # s14d: a mapped port as the source port too

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
        if self.forwarder is not None:  # the journal's mappings' inner rules, the rest swept
            try:
                await self.forwarder.restore(self.manager.mappings())
            except OSError as exc:
                raise ConfigError(f"this host routes the LAN, so the front forwards with "
                                  f"nftables, but: {exc}", field="front") from None
            self.forward_drops = await asyncio.to_thread(
                read_forward_drops, forward_chain=self.settings.forward_chain)
            for drop in self.forward_drops or []:
                log.warning("front: %s", drop.text)
        self._reconciler = asyncio.create_task(self._reconcile(), name="front-reconcile")
        self.portmap = PcpServer(PortMapService(self.manager), [a.address for a in addresses])
        try:
            await self.portmap.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve NAT-PMP/PCP ({exc.strerror or exc}); is another "
                              "NAT-PMP server (miniupnpd) running here?", field="front") from None
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

    async def _reconcile(self) -> None:
        """Every second: the mappings a live connection holds (a silent established TCP flow,
        a connected socket) are in use (:meth:`FrontManager.tick`); in topology 1 the inner
        DNAT follows the live mappings (one the engine ended by lease or idle loses its inner
        rule here), and packets the kernel counted to or from a mapping's internal port are use
        of it (either direction, every packet, also of flows the detectors saw only once or
        not at all: one past the followed-flow caps, one that began before the mapping)."""
        said = ""
        while True:
            await asyncio.sleep(1.0)
            self.manager.tick()
            if self.forwarder is None:
                continue
            try:
                async with self.manager.settled():  # not while an add is deciding: its
                    mappings = self.manager.mappings()  # rule is in, its mapping not yet
                    await self.forwarder.sync(mappings)
                for m in await self.forwarder.used(mappings):  # kernel-counted traffic is use
                    self.manager.counted(m)
                said = ""
            except OSError as exc:
                if str(exc) != said:  # once per distinct failure, not every second
                    log.warning("front: %s", exc)
                said = str(exc)

    async def stop(self) -> None:
        """Stop serving (readiness off first); the service's stop removes the mappings."""
        self.service.front_serving = False
        if self.upnp is not None:
            await self.upnp.stop()
        if self.portmap is not None:
            await self.portmap.close()
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self.forwarder is not None:  # no inner rule, no table of ours is left (one nft
            try:  # transaction, before the manager would remove the rules one by one)
                await self.forwarder.close()
            except OSError as exc:
                log.warning("front: %s", exc)
        await self.manager.stop()

    def status(self) -> dict[str, Any]:
        """The front's part of the service's status (what doctor and /metrics read)."""
        out = self.manager.status()
        out["topology"] = topology_status(self.forwarder, self.forward_drops)
        out["upnp"] = self.upnp.locations() if self.upnp is not None else []
        if self.upnp is not None and self.upnp.faults:
            out["upnp_faults"] = {str(k): v for k, v in sorted(self.upnp.faults.items())}
        out["natpmp_pcp"] = ([f"{a}:{p}" for a, p in self.portmap.bound]
                             if self.portmap is not None else [])
        if self.portmap is not None and self.portmap.service.counters:
            out["natpmp_pcp_requests"] = dict(sorted(self.portmap.service.counters.items()))
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
        if getattr(det, "ports", None) is not None:  # clients' ports are not known in advance:
            det.ports = None  # no kernel-side port filter, the prefilter above decides
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
    pmp = ", ".join(front.get("natpmp_pcp") or []) or "nowhere"
    out = [("ok" if front.get("upnp") else "FAIL", "front",
            f"UPnP IGD at {where}; NAT-PMP/PCP on {pmp}; "
            f"{len(front.get('mappings') or [])} client mapping(s)",
            "" if front.get("upnp") else "see the service's log ([front] interfaces)")]
    if front.get("warning"):
        out.append(("warn", "front external address", str(front["warning"]),
                    "apps behind this front are reachable only from inside the upstream "
                    "network unless the upstream's own router forwards the ports too"))
    out.extend(topology_checks(front.get("topology") or {}))
    if front.get("refused"):
        out.append(("ok", "front refusals", ", ".join(
            f"{k} {v}" for k, v in sorted(front["refused"].items())), ""))
    return out
