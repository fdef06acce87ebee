"""Settings: the frozen dataclasses a configuration becomes (``igdtrigger.config`` builds them
from TOML and the environment, and validates every value). Pure data with their defaults.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from igdtrigger.core.frontconfig import FrontConfig  # front:
from igdtrigger.core.policy import permits
from igdtrigger.core.ports import PortRange, Proto
from igdtrigger.core.rules import Rule

__all__ = [
    "BACKENDS",
    "DEFAULT_BURST",
    "DEFAULT_LEASE",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_PER_HOST",
    "DEFAULT_PORT",
    "DEFAULT_RATE",
    "DETECTORS",
    "PROTOCOLS",
    "SIMULATE",
    "ZEROCONF_MODES",
    "AdhocConfig",
    "ApiConfig",
    "Backend",
    "Config",
    "DetectConfig",
    "GatewayConfig",
    "GatewayProtocol",
    "ZeroconfMode",
]

DEFAULT_LISTEN = "127.0.0.1:8731"
DEFAULT_PORT = 8731
DEFAULT_LEASE = 3600.0
DEFAULT_RATE = 20.0
DEFAULT_BURST = 60
DEFAULT_MAX_PER_HOST = 16
SIMULATE = "simulate"
DETECTORS = ("conntrack", "sockets", "process")
# "auto": miniupnpc, else our SOAP client
Backend = Literal["auto", "miniupnpc", "soap"]
# "auto": probe all, prefer UPnP > PCP > NAT-PMP
GatewayProtocol = Literal["auto", "upnp", "natpmp", "pcp"]
# "auto": advertise when the API listens beyond loopback
ZeroconfMode = Literal["auto", "on", "off"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
PROTOCOLS: tuple[GatewayProtocol, ...] = get_args(GatewayProtocol)
ZEROCONF_MODES: tuple[ZeroconfMode, ...] = get_args(ZeroconfMode)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """``[gateway]``: which router and how to talk to it. Times in seconds: ``lease`` asked for
    each mapping (renewed before it ends), ``verify_interval`` between full read-backs,
    ``check_interval`` between single-mapping checks."""

    url: str | None = None  # description URL; "simulate" starts the built-in simulated IGD
    lease: float = DEFAULT_LEASE
    discover_timeout: float = 2.0
    verify_interval: float = 60.0
    check_interval: float = 2.0  # one mapping checked this often: a router restart is seen fast
    check_before_add: bool = True
    backend: Backend = "auto"  # "auto" (miniupnpc, else our SOAP client), "miniupnpc", "soap"
    protocol: GatewayProtocol = "auto"  # "auto": probe all, prefer UPnP > PCP > NAT-PMP
    ipv6_pinholes: bool = True  # also open the ports to this machine's IPv6 addresses (IGDv2)

    @property
    def simulate(self) -> bool:
        """``url = "simulate"``: ``serve`` starts the built-in simulated router and uses it."""
        return self.url == SIMULATE


@dataclass(frozen=True, slots=True)
class AdhocConfig:
    """Ports an API client may open without a rule (``[api] allow_adhoc``), and the limits."""

    enabled: bool = False
    ports: tuple[PortRange, ...] = (PortRange(Proto.TCP, 1024, 65535),
                                    PortRange(Proto.UDP, 1024, 65535))
    max_ports: int = 16  # per activation
    max_ttl: float = 4 * 3600.0
    per_host: int = 4  # live ad-hoc activations per host
    admin_only: bool = False

    def permits(self, rng: PortRange) -> bool:
        """Is ``rng`` inside the ``ports`` ad-hoc requests may name?"""
        return permits(self.ports, rng)

    def to_json(self) -> dict[str, Any]:
        """The ad-hoc settings as the status shows them (``max_ttl`` in seconds)."""
        return {"enabled": self.enabled, "ports": [str(r) for r in self.ports],
                "max_ports": self.max_ports, "max_ttl": self.max_ttl,
                "per_host": self.per_host, "admin_only": self.admin_only}


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """``[api]``: where the HTTP API listens, who may use it without the token, its rate limits
    (requests per second per client and burst), ad-hoc ports and per-host bounds."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    public_read: bool = False  # read-only endpoints open to the LAN without the token
    rate_limit: float = DEFAULT_RATE  # requests per second per client (token bucket refill)
    rate_burst: int = DEFAULT_BURST  # bucket size
    allowed_hosts: tuple[str, ...] = ()  # extra Host header names (DNS-rebinding protection)
    zeroconf: ZeroconfMode = "auto"  # "auto": advertise when listening beyond loopback
    adhoc: AdhocConfig = field(default_factory=AdhocConfig)
    # clients that may act without the token (and read with public_read); empty: the networks
    # of the interface(s) the API listens on
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_per_host: int = DEFAULT_MAX_PER_HOST  # live tokenless activations per client address

    @property
    def loopback_only(self) -> bool:
        """The API listens on loopback only (``localhost`` or a loopback address)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        """The URL a client on this machine reaches the API at (a wildcard listen address becomes
        loopback; IPv6 in brackets)."""
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":  # dual-stack where the OS allows; ::1 answers either way
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DetectConfig:
    """``[detect]``: the detectors to run, their polling intervals in seconds, and whether the
    kernel is made to track trigger flows (``track_flows``, the nftables table)."""

    methods: tuple[str, ...] = DETECTORS
    explicit: bool = False  # methods named in the config (else sockets stands in for conntrack)
    socket_interval: float = 1.0
    process_interval: float = 1.0
    track_flows: bool = True  # load nft table inet igdtrigger so the kernel tracks trigger flows


@dataclass(frozen=True, slots=True)
class Config:
    """A whole configuration: ``source`` names where it came from (a file path, or
    ``<defaults>``); ``state_dir`` ``None`` means the default state directory."""

    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    rules: tuple[Rule, ...] = ()
    state_dir: Path | None = None
    source: str = "<defaults>"
    launchers: tuple[tuple[str, str], ...] = ()  # ("steam:730", "cs2"): `run --infer` names
    front: FrontConfig = field(default_factory=FrontConfig)  # front: the IGD front (issue 14)

    def rule(self, name: str) -> Rule | None:
        """The configured rule called ``name``, or ``None``."""
        for r in self.rules:
            if r.name == name:
                return r
        return None
