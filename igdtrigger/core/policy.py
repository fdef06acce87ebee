"""Which ports may be opened: the privileged-port and ad-hoc rules, written once.

Pure functions (no I/O, no clock) used by the config loader (a rule's ``open`` and
``[api] adhoc_ports``), the service (an ad-hoc request, a restored ad-hoc activation) and
nothing else. Ports are ``PortRange``s; counts are ports, not ranges.

- A privileged port (below 1024) is opened only when named by itself: ``tcp/80``, never inside
  a range such as ``tcp/1-2000`` (a typo must not open the host's SSH or SMB to the internet).
- An ad-hoc request (``[api] allow_adhoc``) opens only ports inside ``adhoc_ports``, at most
  ``adhoc_max_ports`` per activation, and never a port a rule's ``hosts`` list keeps from the
  requesting host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from igdtrigger.core.errors import AdhocRefused, UsageError
from igdtrigger.core.ports import PortRange, parse_port_spec

__all__ = [
    "PRIVILEGED_BELOW",
    "AdhocLimits",
    "HostRule",
    "adhoc_permitted",
    "adhoc_ports",
    "hides_privileged",
    "overlaps",
    "permits",
]

PRIVILEGED_BELOW = 1024  # ports below this are privileged (IANA system ports)


class AdhocLimits(Protocol):
    """``[api]``'s ad-hoc settings (``config.AdhocConfig``)."""

    @property
    def enabled(self) -> bool:
        """``[api] allow_adhoc``: ad-hoc ports may be opened at all."""

    @property
    def ports(self) -> tuple[PortRange, ...]:
        """``adhoc_ports``: the only ports an ad-hoc request may name."""

    @property
    def max_ports(self) -> int:
        """``adhoc_max_ports``: the most ports one ad-hoc activation may open."""


class HostRule(Protocol):
    """A configured rule as far as the ad-hoc policy needs it (``config.Rule``)."""

    @property
    def name(self) -> str:
        """The rule's name (unique in the configuration), for error messages."""

    @property
    def hosts(self) -> Sequence[object]:
        """The networks the rule may open ports to; empty: any host."""

    @property
    def open(self) -> tuple[PortRange, ...]:
        """The ports the rule opens."""

    def allows(self, host: str) -> bool:
        """May the rule open ports to ``host`` (an IP address as text)?"""


def hides_privileged(rng: PortRange) -> bool:
    """True when ``rng`` spans ports and includes a privileged one (it must be named alone)."""
    return rng.first < PRIVILEGED_BELOW and rng.first != rng.last


def overlaps(a: PortRange, b: PortRange) -> bool:
    """True when the two ranges share a port of the same protocol."""
    return a.proto is b.proto and a.first <= b.last and b.first <= a.last


def permits(allowed: Iterable[PortRange], rng: PortRange) -> bool:
    """True when ``rng`` lies wholly inside one of ``allowed`` (same protocol)."""
    return any(r.proto is rng.proto and r.first <= rng.first and rng.last <= r.last
               for r in allowed)


def adhoc_permitted(limits: AdhocLimits, ports: tuple[PortRange, ...]) -> bool:
    """May these ad-hoc ports be open (a restored activation's, after a config change)?"""
    return (limits.enabled and sum(len(r) for r in ports) <= limits.max_ports
            and all(permits(limits.ports, r) for r in ports))


def adhoc_ports(specs: Sequence[str], host: str, *, limits: AdhocLimits,
                rules: Iterable[HostRule]) -> tuple[PortRange, ...]:
    """The ranges an ad-hoc request for ``host`` names (``["udp/34197", "tcp/8000-8001"]``),
    checked. Raises ``UsageError`` for a malformed or empty list, ``AdhocRefused`` for a port
    the policy does not allow (privileged inside a range, outside ``adhoc_ports``, reserved by
    a rule's hosts list, more than ``adhoc_max_ports``)."""
    rules = list(rules)
    ports: list[PortRange] = []
    for spec in specs:
        try:
            ranges = parse_port_spec(spec)
        except ValueError as exc:
            raise UsageError(f'field "open": {exc}') from None
        for rng in ranges:
            if hides_privileged(rng):
                raise AdhocRefused(f"{rng} includes privileged ports below "
                                   f"{PRIVILEGED_BELOW}; name each one")
            if not permits(limits.ports, rng):
                raise AdhocRefused(
                    f"{rng} is outside [api] adhoc_ports "
                    f"({', '.join(str(r) for r in limits.ports)})")
            for rule in rules:  # a rule's hosts list reserves its ports
                if not rule.allows(host) and any(overlaps(rng, r) for r in rule.open):
                    raise AdhocRefused(
                        f"{rng} overlaps rule {rule.name!r}'s ports, which its hosts list "
                        f"({', '.join(str(n) for n in rule.hosts)}) keeps from {host}")
            ports.append(rng)
    if not ports:
        raise UsageError('field "open" must name at least one port, like "udp/34197"')
    count = sum(len(r) for r in ports)
    if count > limits.max_ports:
        raise AdhocRefused(f"{count} ports asked; [api] adhoc_max_ports allows "
                           f"{limits.max_ports} per activation")
    return tuple(ports)
