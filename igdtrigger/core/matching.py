"""Matching flows to rules: which rules a (protocol, port) triggers or opens, which addresses
are LAN sources and remote destinations, and the record of a followed live flow. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from igdtrigger.core.model import IPAddress, Proto
from igdtrigger.core.rules import Rule

__all__ = ["Live", "RuleIndex", "is_lan_source", "is_remote_destination", "process_index"]

_BIG_RANGE = 4096  # ranges wider than this are scanned instead of indexed port by port
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def is_lan_source(addr: IPAddress) -> bool:
    """True for a private (RFC 1918, ULA) or link-local address: a LAN host may trigger a rule.
    Loopback, unspecified and multicast addresses never do."""
    return (addr.is_private or addr.is_link_local) and not (
        addr.is_loopback or addr.is_unspecified or addr.is_multicast
    )


def is_remote_destination(addr: IPAddress) -> bool:
    """A destination beyond the LAN: not private, loopback, link-local, multicast or broadcast."""
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local:
        return False
    if isinstance(addr, ipaddress.IPv4Address) and addr == _BROADCAST:
        return False
    return not addr.is_private


@dataclass(slots=True)
class Live:
    """A live matching flow the engine follows (see ``Engine.on_flow_live``)."""

    host: str  # the LAN host it counts for (its source, or an inbound flow's destination)
    acts: list[str]  # activation ids it feeds
    trigger: bool  # a trigger flow (else inbound use)
    connected: bool = False
    muted: bool = False  # its activation was deactivated by hand: it no longer re-triggers


class RuleIndex:
    """Maps (protocol, destination port) to the rules it triggers: a dict lookup per flow.
    ``opened=True`` indexes the ports rules open instead (inbound use)."""

    def __init__(self, rules: Iterable[Rule], *, opened: bool = False) -> None:
        self._exact: dict[tuple[Proto, int], tuple[Rule, ...]] = {}
        self._wide: list[tuple[Proto, int, int, Rule]] = []
        for rule in rules:
            for rng in (rule.open if opened else rule.trigger):
                if len(rng) > _BIG_RANGE:
                    self._wide.append((rng.proto, rng.first, rng.last, rule))
                    continue
                for port in rng:
                    key = (rng.proto, port)
                    have = self._exact.get(key, ())
                    if rule not in have:
                        self._exact[key] = (*have, rule)

    def match(self, proto: Proto, port: int) -> tuple[Rule, ...]:
        """The rules whose trigger ports include ``proto``/``port`` (``()``: none)."""
        found = self._exact.get((proto, port), ())
        if self._wide:
            extra = tuple(
                r for p, a, b, r in self._wide if p is proto and a <= port <= b and r not in found
            )
            if extra:
                return found + extra
        return found


def process_index(rules: Iterable[Rule]) -> dict[str, tuple[Rule, ...]]:
    """Executable name, lowercased, to the rules it holds (a rule's ``process`` names)."""
    index: dict[str, tuple[Rule, ...]] = {}
    for rule in rules:
        for name in rule.process:
            key = name.lower()
            index[key] = (*index.get(key, ()), rule)
    return index
