"""Value types shared by every layer: protocols, port ranges, flows, mappings.

Pure data, no I/O. Parsing of the user-facing spellings (``"udp/27015"``, ``"tcp/10-20"``,
``"both/3074"``, ``"10m"``) is ``core.ports``' (re-exported here) so the config, the CLI
and the API agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from igdtrigger.core.ports import (
    MAX_TTL,
    IPAddress,
    PortRange,
    Proto,
    compress_ports,
    format_duration,
    parse_duration,
    parse_port_spec,
)

__all__ = [
    "MAX_TTL", "Flow", "FlowEnded", "FlowLive", "FlowsListed", "IPAddress", "MappingKey",
    "MappingSpec", "PinholeSpec", "PortRange", "ProcessSeen", "Proto", "RouterMapping",
    "compress_ports", "format_duration", "parse_duration", "parse_port_spec",
]


@dataclass(frozen=True, slots=True)
class Flow:
    """A new outbound flow seen by a detector: ``src`` (a LAN host) to ``dst``:``dport``."""

    proto: Proto
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int


@dataclass(frozen=True, slots=True)
class FlowLive:
    """A detector's later look at a flow: it still exists (or, for one that began before the
    detector started, its first look).

    ``connected``: a connection that holds while silent (TCP ESTABLISHED in conntrack, a connected
    socket in the socket table). ``idle``: seconds since its last packet when the detector knows a
    packet went by since its previous look; ``None`` = no packet seen since (no news).
    """

    flow: Flow
    connected: bool
    idle: float | None = None


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """A flow a detector reported is gone. ``closed``: its endpoints just closed it (TCP
    FIN/RST, a socket closed), so its last packet was now; otherwise it lapsed silently (a
    conntrack entry timing out long after its last packet)."""

    flow: Flow
    closed: bool = False


@dataclass(frozen=True, slots=True)
class FlowsListed:
    """A flow detector's first full look at the table is done (conntrack's start-up dump, the
    socket table's first poll): every flow living now has been reported. An activation that was
    held by a connection before a restart and is not held again by now has lost it."""

    detector: str


@dataclass(frozen=True, slots=True)
class ProcessSeen:
    """A process detector's poll: names of the watched executables running on this host now."""

    names: frozenset[str]


@dataclass(frozen=True, slots=True, order=True)
class MappingKey:
    """What identifies a port mapping on the router: protocol and external port."""

    proto: Proto
    external_port: int

    def __str__(self) -> str:
        return f"{self.proto.value.lower()}/{self.external_port}"


@dataclass(frozen=True, slots=True)
class MappingSpec:
    """A mapping igdtrigger wants the router to hold."""

    proto: Proto
    external_port: int
    internal_client: str
    internal_port: int
    description: str
    external_any: bool = False  # the router may give another external port on a conflict

    @property
    def key(self) -> MappingKey:
        """The mapping's identity on the router: its protocol and external port."""
        return MappingKey(self.proto, self.external_port)


@dataclass(frozen=True, slots=True)
class RouterMapping:
    """A mapping as the router reports it."""

    proto: Proto
    external_port: int
    internal_client: str
    internal_port: int
    description: str
    enabled: bool = True
    lease_remaining: int | None = None  # seconds; 0 = permanent; None = not reported

    @property
    def key(self) -> MappingKey:
        """The mapping's identity on the router: its protocol and external port."""
        return MappingKey(self.proto, self.external_port)


@dataclass(frozen=True, slots=True, order=True)
class PinholeSpec:
    """An inbound IPv6 pinhole igdtrigger wants: ``proto``/``port`` to this machine's
    ``address`` (no NAT on IPv6: the router's firewall lets it through, nothing is translated)."""

    address: str
    proto: Proto
    port: int

    def __str__(self) -> str:
        return f"{self.proto.value.lower()}/[{self.address}]:{self.port}"
