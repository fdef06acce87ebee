"""Port-mapping permission lines, read like miniupnpd's ``allow``/``deny`` rules. Pure.

A line is ``allow|deny <external ports> <client network> <internal ports>``: ports are one
port or ``first-last`` (0-65535), the client network an address, ``addr/prefix`` or
``addr/netmask`` (miniupnpd's ``192.168.1.0/255.255.255.0``). Lines are tried in order and the
first whose three parts all match decides (miniupnpd's ``check_upnp_rule_against_permissions``);
a request no line matches is denied (miniupnpd allows it: here nothing opens that no line allows).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from igdtrigger.core.errors import ConfigError

__all__ = ["DEFAULT_ACL", "Acl", "AclLine", "parse_acl", "parse_acl_line"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# what a front with no lines allows: any client, unprivileged ports only
DEFAULT_ACL = ("allow 1024-65535 0.0.0.0/0 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535")


@dataclass(frozen=True, slots=True)
class AclLine:
    """One parsed line: allow or deny, external ports, client network, internal ports."""

    allow: bool
    ext_first: int
    ext_last: int
    network: IPNetwork
    int_first: int
    int_last: int
    text: str

    def matches(self, external_port: int, client: ipaddress.IPv4Address | ipaddress.IPv6Address,
                internal_port: int) -> bool:
        """All three parts match (a client of the other IP version matches nothing)."""
        return (self.ext_first <= external_port <= self.ext_last
                and self.int_first <= internal_port <= self.int_last
                and client.version == self.network.version and client in self.network)


@dataclass(frozen=True, slots=True)
class Acl:
    """The lines in order (first match wins, no match denies)."""

    lines: tuple[AclLine, ...]

    def check(self, external_port: int, client: str, internal_port: int) -> AclLine | None:
        """The first line matching (external port, client address, internal port), or None
        when no line does (then the request is denied). A client that is not an address
        matches nothing."""
        try:
            addr = ipaddress.ip_address(client)
        except ValueError:
            return None
        for line in self.lines:
            if line.matches(external_port, addr, internal_port):
                return line
        return None

    def allows(self, external_port: int, client: str, internal_port: int) -> bool:
        """The first matching line is an ``allow``."""
        line = self.check(external_port, client, internal_port)
        return line is not None and line.allow

    def to_json(self) -> list[str]:
        """The lines as written (normalised spacing)."""
        return [line.text for line in self.lines]


def _ports(text: str, what: str, line: str) -> tuple[int, int]:
    first_s, sep, last_s = text.partition("-")
    if not sep:
        last_s = first_s
    if not (first_s.isdecimal() and last_s.isdecimal()):
        raise ValueError(f"{what} {text!r} is not a port or a first-last range")
    first, last = int(first_s), int(last_s)
    if not (0 <= first <= 65535 and 0 <= last <= 65535):
        raise ValueError(f"{what} {text!r} is outside 0-65535")
    if first > last:
        raise ValueError(f"{what} {text!r} runs backwards")
    return first, last


def _network(text: str) -> IPNetwork:
    addr, sep, mask = text.partition("/")
    try:
        if sep and "." in mask:  # miniupnpd's address/netmask form
            return ipaddress.ip_network(f"{addr}/{mask}", strict=False)
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"client network {text!r} is not an address, address/prefix or "
                         "address/netmask") from None


def parse_acl_line(text: str) -> AclLine:
    """One line; raises ``ValueError`` saying what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string like {DEFAULT_ACL[0]!r}, got {text!r}")
    parts = text.split()
    if len(parts) != 4 or parts[0].lower() not in ("allow", "deny"):
        raise ValueError(f"{text!r} is not 'allow|deny <external ports> <client network> "
                         "<internal ports>'")
    ext = _ports(parts[1], "external ports", text)
    net = _network(parts[2])
    internal = _ports(parts[3], "internal ports", text)
    return AclLine(allow=parts[0].lower() == "allow", ext_first=ext[0], ext_last=ext[1],
                   network=net, int_first=internal[0], int_last=internal[1],
                   text=" ".join(parts))


def parse_acl(lines: Iterable[object], *, source: str | None = None,
              field: str | None = None) -> Acl:
    """Every line, in order; raises ``ConfigError`` naming the bad line (its index and text)."""
    parsed: list[AclLine] = []
    for i, line in enumerate(lines):
        try:
            parsed.append(parse_acl_line(line))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc), source=source,
                              field=f"{field}[{i}]" if field else f"line {i + 1}") from None
    return Acl(tuple(parsed))
