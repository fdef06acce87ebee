"""Rules: which trigger traffic opens which ports, for which hosts, and how they are shared.

A :class:`Rule` is what one ``[[rules]]`` table of the config becomes (``igdtrigger.config``
parses and validates it); the engine matches flows and requests against rules. Pure data.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any

from igdtrigger.core.ports import PortRange

__all__ = [
    "ADHOC_PREFIX",
    "DEFAULT_IDLE",
    "EXTERNAL_MODES",
    "SHARE_MODES",
    "External",
    "Rule",
    "Share",
]

DEFAULT_IDLE = 600.0  # s: a rule's idle_timeout unless the config names one
ADHOC_PREFIX = "adhoc:"  # ad-hoc activations' rule names; ':' is never in a configured name


class Share(enum.StrEnum):
    """Two hosts want one rule's ports: the first keeps them (as routers do), or the latest
    takes them from the same rule's older activations (never from another rule's)."""

    FIRST = "first"
    LATEST = "latest"


class External(enum.StrEnum):
    """``same``: the external port is the internal one; ``any``: the router may pick another
    external port when the one asked for is taken (IGDv2 AddAnyPortMapping, PCP/NAT-PMP)."""

    SAME = "same"
    ANY = "any"


SHARE_MODES: tuple[str, ...] = tuple(m.value for m in Share)  # the first is the default
EXTERNAL_MODES: tuple[str, ...] = tuple(m.value for m in External)


@dataclass(frozen=True, slots=True)
class Rule:
    """One trigger rule: ``trigger`` ports (outbound traffic that activates it), ``open`` ports
    (mapped to the activating host), ``idle_timeout`` seconds, ``process`` names holding it on
    this host, ``hosts`` allowed (empty: any), ``share`` and ``external`` modes (strings are
    accepted and converted: ``Rule(..., share="latest")``)."""

    name: str
    trigger: tuple[PortRange, ...]
    open: tuple[PortRange, ...]
    idle_timeout: float = DEFAULT_IDLE
    process: tuple[str, ...] = ()  # executables whose presence holds the rule on this host
    hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # empty: any host
    share: Share = Share.FIRST
    external: External = External.SAME

    def __post_init__(self) -> None:
        # a plain string names a mode too (ValueError for one that is not)
        if not isinstance(self.share, Share):
            object.__setattr__(self, "share", Share(self.share))
        if not isinstance(self.external, External):
            object.__setattr__(self, "external", External(self.external))

    def allows(self, host: str) -> bool:
        """Is ``host`` (an IP address as text) one this rule may open ports to?"""
        if not self.hosts:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self.hosts)

    def port_count(self) -> int:
        """How many mappings it opens (one per port and protocol)."""
        return sum(len(r) for r in self.open)

    def to_json(self) -> dict[str, Any]:
        """The rule as ``GET /api/v1/rules`` and the status show it (ports as specs, seconds)."""
        return {
            "name": self.name,
            "trigger": [str(r) for r in self.trigger],
            "open": [str(r) for r in self.open],
            "idle_timeout": self.idle_timeout,
            "process": list(self.process),
            "hosts": [str(n) for n in self.hosts],
            "share": self.share.value,
            "external": self.external.value,
        }
