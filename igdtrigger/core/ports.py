"""Port ranges and durations as users spell them: ``"udp/27015"``, ``"tcp/10-20"``,
``"both/3074"``, ``"10m"``; parsed here so the config, the CLI and the API agree.

Pure, no I/O. Apart from ``core.model`` (which re-exports every name) so that what the
command line and the config need loads without the flow and mapping types: one dataclass
costs ~0.5 ms of a launcher hook's start-up (issue 17).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_TTL", "IPAddress", "PortRange", "Proto", "compress_ports", "format_duration",
    "parse_duration", "parse_port_spec",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# s: the longest activation granted (here, not in core.activation: the command line's duration
# parser checks it without loading the engine's data, issue 17)
MAX_TTL = 7 * 86400.0


class Proto(enum.StrEnum):
    """A transport protocol as UPnP IGD names it (``"TCP"``/``"UDP"``, upper case in SOAP)."""

    TCP = "TCP"
    UDP = "UDP"

    @property
    def number(self) -> int:
        """The IP protocol number (6 for TCP, 17 for UDP), as conntrack and PCP carry it."""
        return 6 if self is Proto.TCP else 17

    @classmethod
    def from_number(cls, number: int) -> Proto | None:
        """The ``Proto`` for an IP protocol number; ``None`` for any other protocol."""
        return {6: cls.TCP, 17: cls.UDP}.get(number)


_SPEC_RE = re.compile(r"^\s*(tcp|udp|both)\s*/\s*(\d{1,6})(?:\s*-\s*(\d{1,6}))?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """An inclusive range of ports of one protocol."""

    proto: Proto
    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= 65535 or not 1 <= self.last <= 65535:
            raise ValueError(f"port out of range 1-65535 in {self}")
        if self.first > self.last:
            raise ValueError(f"range {self.first}-{self.last} runs backwards")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.proto.value.lower()}/{ports}"


def parse_port_spec(text: str) -> tuple[PortRange, ...]:
    """Parse ``udp/27015``, ``tcp/27015-27030`` or ``both/3074``.

    Raises ``ValueError`` with a message that names what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string like 'udp/27015', got {text!r}")
    m = _SPEC_RE.match(text)
    if m is None:
        raise ValueError(
            f"{text!r} is not a port spec; write PROTO/PORT or PROTO/FIRST-LAST "
            "with PROTO one of tcp, udp, both (e.g. 'udp/27015', 'tcp/27015-27030')"
        )
    kind, a, b = m.group(1).lower(), int(m.group(2)), int(m.group(3) or m.group(2))
    for port in (a, b):
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is outside 1-65535")
    if a > b:
        raise ValueError(f"{text!r}: range {a}-{b} runs backwards (write {b}-{a})")
    protos = (Proto.TCP, Proto.UDP) if kind == "both" else (Proto(kind.upper()),)
    return tuple(PortRange(p, a, b) for p in protos)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HELP = "seconds, or numbers with d, h, m, s, ms (e.g. 90, '90s', '10m', '1h30m', '2h')"


def _parse_duration_text(text: str) -> float | None:
    """Seconds from ``90``, ``90s``, ``10m``, ``1h30m``, ``10m 0s``, ``1h 00m``, ``2H`` (what
    :func:`format_duration` and the dashboard print reads back), or None. Units go from
    largest to smallest, each at most once."""
    if _NUMBER_RE.match(text):
        return float(text)
    pos, total, last = 0, 0.0, math.inf
    body = text.strip()
    if not body:
        return None
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            return None
        scale = _UNIT[m.group(2).lower()]
        if scale >= last:  # "30m1h", "1h1h": a typo, not a duration
            return None
        last = scale
        total += float(m.group(1)) * scale
        pos = m.end()
    return total


def parse_duration(value: object) -> float:
    """Seconds (float, > 0) from an integer or float of seconds, or a string in the one duration
    grammar every input shares (config, CLI, API, dashboard): ``90``, ``90s``, ``10m``, ``2h``,
    ``1d``, ``1h30m``, ``10m 0s``, ``1h 0m``, ``2H``. Raises ``ValueError`` naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration ({_DURATION_HELP}), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        parsed = _parse_duration_text(value)
        if parsed is None:
            raise ValueError(f"{value!r} is not a duration; use {_DURATION_HELP}")
        seconds = parsed
    else:
        raise ValueError(f"expected a duration ({_DURATION_HELP}), got {value!r}")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be greater than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` rounded for a person: ``45s``, ``12m05s``, ``2h30m`` (negative shows ``0s``)."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def compress_ports(names: Iterable[str]) -> str:
    """``udp/40000, udp/40001, udp/40002, tcp/3074`` -> ``udp/40000-40002, tcp/3074``."""
    out: list[list[Any]] = []  # [proto, first, last]
    for name in names:
        proto, _, rest = name.partition("/")
        first, _, last = rest.partition("-")
        if not first.isdecimal() or (last and not last.isdecimal()):
            out.append([name, None, None])
            continue
        a, b = int(first), int(last or first)
        if out and out[-1][0] == proto and out[-1][2] is not None and out[-1][2] + 1 == a:
            out[-1][2] = b
        else:
            out.append([proto, a, b])
    return ", ".join(p if a is None else f"{p}/{a}" if a == b else f"{p}/{a}-{b}"
                     for p, a, b in out)
