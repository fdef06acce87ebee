"""The one small interface every router protocol backend implements.

The mapper talks only to this. A backend owns its transport (miniupnpc in a worker thread, SOAP
over asyncio streams, NAT-PMP/PCP datagrams), serialises its requests so the router sees one at a
time, and translates every failure into ``igdtrigger.errors.GatewayError`` subclasses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..model import MappingSpec, Proto, RouterMapping

SIMULATED_EXTERNAL = "203.0.113.4"
"""What the built-in simulated router (``serve --simulate``, tests) reports as its external
address: in TEST-NET-3 (RFC 5737, documentation only, never routed), so the demo never shows a
real public address, and taken as public so the demo does not warn of double NAT."""


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """What a backend learned when it connected."""

    protocol: str  # "upnp-igd", "nat-pmp", "pcp", "simulated"
    location: str  # description URL, or "ip:port" for datagram protocols
    local_address: str  # our address as the router sees it (the default internal client)
    external_address: str  # "" when the router does not know it
    service_type: str = ""  # e.g. urn:schemas-upnp-org:service:WANIPConnection:2
    server: str = ""  # router's self-description, when known
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def external_reachable(self) -> bool:
        """False when the external address is private/shared/unspecified: double NAT or CGNAT.
        The simulated router's ``SIMULATED_EXTERNAL`` (a documentation address) stands for a
        public one."""
        return counts_as_public(self.external_address)


@dataclass(frozen=True, slots=True)
class Granted:
    """The router's answer to an add: the lease it granted (0 = permanent)."""

    external_port: int
    lease: int


@runtime_checkable
class Gateway(Protocol):
    """A router that can hold port mappings."""

    @property
    def info(self) -> GatewayInfo | None:
        """What ``connect`` learned, or ``None`` before it succeeded."""
        ...

    async def connect(self) -> GatewayInfo:
        """Find or reconnect to the router; cheap when already connected."""
        ...

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """Create or refresh a mapping. ``lease`` in seconds, 0 asks for a permanent one."""
        ...

    async def delete(self, proto: Proto, external_port: int) -> None:
        """Delete a mapping. Raises ``NoSuchMapping`` if the router has none."""
        ...

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """The router's entry for this port, or ``None``."""
        ...

    async def list(self) -> list[RouterMapping]:
        """Every mapping the router reports (bounded)."""
        ...

    async def close(self) -> None:
        """Release sockets and threads. The mappings stay; the mapper deletes them first."""
        ...


_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


def counts_as_public(text: str) -> bool:
    """:func:`is_public_address`, or the simulated router's ``SIMULATED_EXTERNAL``."""
    return is_public_address(text) or text.strip() == SIMULATED_EXTERNAL


def is_public_address(text: str) -> bool:
    """True for an IPv4 address that the internet can reach (miniupnpc's reserved list)."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    if addr.version == 6:
        return addr.is_global
    return not any(addr in net for net in _NOT_PUBLIC)
