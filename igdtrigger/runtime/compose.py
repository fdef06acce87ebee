"""The one place configuration becomes detectors and gateways (the simulated router included).

Only this module names concrete backends (``gateway.select``, ``gateway.upnp.*``,
``gateway.natpmp.*``, the concrete detectors) and ``sim``; ``cli/``, ``api/`` and the rest of
``runtime/`` reach them through the functions here. Every concrete import is inside the function
that needs it: ``igdtrigger run`` imports this module on its start-up path (``--wait-process``,
the standalone holder) and pays only for what it uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from igdtrigger.config import Config
from igdtrigger.detect.base import Detector
from igdtrigger.gateway.base import Gateway, RouterChange
from igdtrigger.netutil import default_gateway

if TYPE_CHECKING:
    from igdtrigger.detect.hostmap import HostMap as HostMap
    from igdtrigger.detect.nfttrack import KernelTracking as KernelTracking
    from igdtrigger.detect.process import Matcher as Matcher
    from igdtrigger.gateway.upnp.pinhole import FirewallClient as FirewallClient
    from igdtrigger.gateway.upnp.ssdpwatch import NotifyWatcher as NotifyWatcher
    from igdtrigger.sim.router import SimulatedIgdServer as SimulatedIgdServer

__all__ = [
    "FirewallClient",
    "HostMap",
    "KernelTracking",
    "Matcher",
    "NotifyWatcher",
    "SimulatedIgdServer",
    "build_detectors",
    "build_gateway",
    "firewall_client",
    "forget_connection",
    "gateway_from_config",
    "host_map",
    "ipv6_addresses",
    "kernel_tracking",
    "nat_pmp_candidates",
    "notify_watcher",
    "prime_location",
    "process_scan",
    "remember_router",
    "remembered_router",
    "set_lost_state_handler",
    "simulated_router",
    "start_simulator",
    "tracking_for",
    "tracking_table",
    "wire_detectors",
]

OnCall = Callable[[str, float, bool], None]


def build_detectors(config: Config) -> list[Detector]:
    """The configured detectors, in order. Without ``[detect] methods`` in the config the socket
    table only stands in for conntrack (it sees less, and polls)."""
    det = config.detect
    detectors: list[Detector] = []
    if "conntrack" in det.methods:
        # concrete: imported on use, `run` loads compose (see the module docstring)
        from igdtrigger.detect.conntrack import ConntrackDetector

        detectors.append(ConntrackDetector())
    if "sockets" in det.methods:
        # concrete: imported on use, `run` loads compose (see the module docstring)
        from igdtrigger.detect.sockets import SocketTableDetector

        sockets = SocketTableDetector(det.socket_interval)
        if not det.explicit and "conntrack" in det.methods:
            sockets.standby_for = "conntrack"
        detectors.append(sockets)
    if "process" in det.methods:
        # concrete: imported on use, `run` loads compose (see the module docstring)
        from igdtrigger.detect.process import ProcessDetector

        names = [n for rule in config.rules for n in rule.process]
        detectors.append(ProcessDetector(names, det.process_interval))
    return detectors


def wire_detectors(detectors: list[Detector], *, wants: Callable[..., bool],
                   ports: object, follows: Callable[..., bool]) -> None:
    """Give each detector the filters it takes (flows no rule cares about are dropped before
    they cost anything): ``wanted`` the engine's predicate, ``ports`` its port ranges,
    ``follows`` the service's predicate for flows it tracks."""
    for det in detectors:
        if hasattr(det, "wanted"):
            det.wanted = wants
        if hasattr(det, "ports"):
            det.ports = ports
        if hasattr(det, "follows"):
            det.follows = follows


def build_gateway(url: str | None, *, backend: str = "auto", protocol: str = "upnp",
                  discover_timeout: float = 2.0, on_call: OnCall | None = None) -> Gateway:
    """The gateway for ``[gateway] protocol`` and ``backend`` (``gateway.select.build_gateway``)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.select import build_gateway as select

    return select(url, backend=backend, protocol=protocol, discover_timeout=discover_timeout,
                  on_call=on_call)


def gateway_from_config(config: Config, *, on_call: OnCall | None = None,
                        protocol: str | None = None) -> Gateway:
    """The gateway ``config.gateway`` names (``protocol`` overrides its protocol)."""
    gw = config.gateway
    return build_gateway(None if gw.simulate else gw.url, backend=gw.backend,
                         protocol=protocol or gw.protocol, discover_timeout=gw.discover_timeout,
                         on_call=on_call)


ROUTER_FILE = "router-location"  # in the state directory: the last router a standalone run used
_MAX_URL = 2048


def remembered_router(state_dir: Path) -> str | None:
    """The router's description URL a standalone ``run`` found last (``<state_dir>/
    router-location``), when it still stands: an ``http://`` URL on this machine's default
    gateway now (the rule a discovered location is held to, so another network's router, or a
    LAN host, is never asked); else None: discover."""
    try:
        text = (state_dir / ROUTER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError):
        return None
    if not text.startswith("http://") or len(text) > _MAX_URL or any(c.isspace() for c in text):
        return None
    try:
        host = urllib.parse.urlsplit(text).hostname
    except ValueError:
        return None
    return text if host is not None and host == default_gateway() else None


def remember_router(state_dir: Path, location: str) -> None:
    """Keep ``location`` (a discovered UPnP description URL) for the next standalone ``run``
    (:func:`remembered_router`); best effort, written whole (rename) or not at all."""
    path = state_dir / ROUTER_FILE
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8").strip() == location:
            return
    tmp = path.with_name(f".{ROUTER_FILE}.{os.getpid()}")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(location + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def prime_location(gateway: Gateway, location: str) -> None:
    """The UPnP backends of ``gateway`` try ``location`` first at their next ``connect`` and
    discover at once when it is not usable (``gateway.select.prime_location``)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.select import prime_location as select

    select(gateway, location)


def simulated_router() -> SimulatedIgdServer:
    """The built-in simulated router on loopback (an async context manager; not started)."""
    # the simulator (aiohttp) is for `serve --simulate` and the tests only
    from igdtrigger.sim.router import SimulatedIgdServer

    return SimulatedIgdServer()


async def start_simulator(config: Config) -> tuple[Config, SimulatedIgdServer]:
    """Start the simulated router; ``config`` pointed at it (it speaks UPnP only)."""
    sim = simulated_router()
    await sim.start()
    gw = dataclasses.replace(config.gateway, url=sim.url, protocol="upnp")
    return dataclasses.replace(config, gateway=gw), sim


def nat_pmp_candidates(router_ip: str) -> list[tuple[str, Gateway]]:
    """PCP and NAT-PMP clients for ``router_ip``, in the order they are preferred."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.natpmp.backend import NatPmpGateway, PcpGateway

    return [("pcp", PcpGateway(router_ip)), ("nat-pmp", NatPmpGateway(router_ip))]


def set_lost_state_handler(gateway: Gateway, handler: Callable[[str], None]) -> None:
    """Call ``handler(reason)`` when the router shows it lost its mappings (a reboot)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.select import set_lost_state_handler as select

    select(gateway, handler)


def forget_connection(gateway: Gateway, location: str | None = None) -> None:
    """Drop what ``gateway`` knows of the router (at ``location``): the next call reconnects."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.select import forget_connection as select

    select(gateway, location)


def notify_watcher(location: str, local_address: str, on_change: Callable[[RouterChange], None],
                   *, root_uuid: str = "") -> NotifyWatcher:
    """A listener for the router's SSDP NOTIFYs (not started)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.upnp.ssdpwatch import NotifyWatcher

    return NotifyWatcher(location, local_address, on_change, root_uuid=root_uuid)


def firewall_client(location: Callable[[], str | None], *, on_call: OnCall | None = None,
                    timeout: float | None = None) -> FirewallClient:
    """The router's IPv6 firewall (WANIPv6FirewallControl) at the UPnP ``location()``."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.upnp.pinhole import FirewallClient

    if timeout is None:
        return FirewallClient(location, on_call=on_call)
    return FirewallClient(location, on_call=on_call, timeout=timeout)


def ipv6_addresses(client: object) -> list[str]:
    """This machine's global IPv6 addresses on the interface of ``client``'s IPv6 default route
    (none for anything but a ``FirewallClient``, or without such a route)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.gateway.upnp.pinhole import FirewallClient, global_ipv6_addresses

    iface = client.interface() if isinstance(client, FirewallClient) else None
    return global_ipv6_addresses(iface) if iface else []


def kernel_tracking(config: Config) -> KernelTracking:
    """What makes the kernel track trigger flows for the conntrack detector (its nftables
    table, loaded by ``install()``; ``[detect] track_flows``)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.detect.nfttrack import KernelTracking

    return KernelTracking(enabled=config.detect.track_flows)


def tracking_for(config: Config, detectors: list[Detector]) -> KernelTracking | None:
    """``kernel_tracking(config)`` when a conntrack detector runs among ``detectors``, else
    ``None``."""
    if not any(d.name == "conntrack" for d in detectors):
        return None
    return kernel_tracking(config)


def tracking_table() -> str:
    """The name of the nftables table ``KernelTracking`` loads."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.detect.nfttrack import TABLE

    return TABLE


def host_map(local_address: Callable[[], str | None], *, clock: Callable[[], float]) -> HostMap:
    """The LAN hosts' IP-to-MAC map (bounds forged trigger sources per MAC address)."""
    # concrete: imported on use, `run` loads compose (see the module docstring)
    from igdtrigger.detect.hostmap import HostMap

    return HostMap(local_address, clock=clock)


def process_scan(names: list[str]) -> tuple[Matcher, Callable[[Matcher], set[str]],
                                             Callable[[Matcher, int], tuple[set[str], set[str]]]]:
    """``run --wait-process``'s tools: a matcher for ``names``, the default process scanner,
    and the scan of one process's descendants (Linux)."""
    # only `run --wait-process` scans processes (psutil)
    from igdtrigger.detect.process import Matcher, default_scanner, scan_family

    return Matcher(names), default_scanner(), scan_family
