"""``[front]``: the IGD front's settings (see :mod:`igdtrigger.front`); pure, like core/settings.

``enabled`` (bool, default false); ``interfaces`` (LAN interface names served: SSDP, the
description/control HTTP server, NAT-PMP/PCP on 5351; empty = every non-loopback interface with
a private IPv4 address); ``allow`` (miniupnpd-style lines, :mod:`igdtrigger.core.acl`; default
unprivileged ports for anyone); ``secure_mode`` (default true: a client may map only to its own
address, as miniupnpd's ``secure_mode=yes``); ``max_lease`` (longest lease granted, lease 0 gets
it and is renewed while in use; default 1h); ``idle_timeout`` (a mapping neither used nor renewed
for this long is removed; default 10m); ``max_per_client`` (live mappings per client address,
default 64); ``http_port`` (the UPnP description/control port, default 0 = any free one);
``forward_chain`` (nftables ``family table chain`` to add forward accept rules to, or unset);
``igd_version`` (2, or 1 to describe an IGDv1 for clients that know no other, as miniupnpd's
``force_igd_desc_v1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from igdtrigger.core.acl import DEFAULT_ACL, Acl, parse_acl
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.ports import format_duration, parse_duration

__all__ = ["FRONT_KEYS", "MAX_LEASE_LIMIT", "FrontConfig", "parse_front"]

MAX_LEASE_LIMIT = 604800.0  # IGDv2's longest lease


@dataclass(frozen=True, slots=True)
class FrontConfig:
    """``[front]``: each field is the key of the same name (see the module docstring)."""

    enabled: bool = False
    interfaces: tuple[str, ...] = ()
    acl: Acl = field(default_factory=lambda: parse_acl(DEFAULT_ACL))
    secure_mode: bool = True
    max_lease: float = 3600.0
    idle_timeout: float = 600.0
    max_per_client: int = 64
    http_port: int = 0
    forward_chain: str | None = None
    igd_version: int = 2  # 1: describe an IGDv1 (miniupnpd's force_igd_desc_v1)

    def to_json(self) -> dict[str, Any]:
        """For status and ``config``: the keys as written, the allow lines as text."""
        return {"enabled": self.enabled, "interfaces": list(self.interfaces),
                "allow": self.acl.to_json(), "secure_mode": self.secure_mode,
                "max_lease": self.max_lease, "idle_timeout": self.idle_timeout,
                "max_per_client": self.max_per_client, "http_port": self.http_port,
                "forward_chain": self.forward_chain, "igd_version": self.igd_version}

    def summary(self) -> str:
        """One line for ``check-config``: where it serves, the allow lines (saying when none
        allows anything: every request would be refused), the lease and idle bounds."""
        allowing = any(line.allow for line in self.acl.lines)
        return (f"UPnP IGD, NAT-PMP, PCP on "
                f"{', '.join(self.interfaces) or 'every private interface but the upstream one'}"
                f"; {len(self.acl.lines)} allow/deny line(s)"
                f"{'' if allowing else ', none allows: every client request is refused'}; "
                f"lease up to {format_duration(self.max_lease)}, idle "
                f"{format_duration(self.idle_timeout)}")


FRONT_KEYS = ("enabled", "interfaces", "allow", "secure_mode", "max_lease", "idle_timeout",
              "max_per_client", "http_port", "forward_chain", "igd_version")


def parse_front(table: object, *, source: str = "<config>") -> FrontConfig:
    """``[front]`` as a :class:`FrontConfig`; raises ``ConfigError`` naming the key."""
    def err(key: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=f"front.{key}")

    if not isinstance(table, Mapping):
        raise ConfigError(f"expected a table, got {table!r}", source=source, field="front")
    for key in table:
        if key not in FRONT_KEYS:
            raise ConfigError(f"unknown key {key!r} (allowed: {', '.join(FRONT_KEYS)})",
                              source=source, field="front")
    base = FrontConfig()

    def boolean(key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise err(key, f"expected true or false, got {value!r}")
        return value

    def duration(key: str, default: float) -> float:
        if key not in table:
            return default
        try:
            value = parse_duration(table[key])
        except ValueError as exc:
            raise err(key, str(exc)) from None
        if not 1.0 <= value <= MAX_LEASE_LIMIT:
            raise err(key, f"{value:g}s is outside 1s-7d")
        return value

    def integer(key: str, default: int, low: int, high: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise err(key, f"expected an integer {low}-{high}, got {value!r}")
        return value

    interfaces = table.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(
            isinstance(i, str) and i.strip() and len(i) <= 15 and "/" not in i
            for i in interfaces):
        raise err("interfaces", f"expected a list of interface names, got {interfaces!r}")
    lines = table.get("allow", list(DEFAULT_ACL))
    if not isinstance(lines, list):
        raise err("allow", f"expected a list of 'allow|deny <ext ports> <client net> "
                  f"<int ports>' lines, got {lines!r}")
    acl = parse_acl(lines, source=source, field="front.allow")
    chain = table.get("forward_chain")
    if chain is not None and (not isinstance(chain, str) or len(chain.split()) != 3):
        raise err("forward_chain", f"expected 'family table chain' like 'inet filter forward', "
                  f"got {chain!r}")
    return FrontConfig(
        enabled=boolean("enabled", base.enabled),
        interfaces=tuple(i.strip() for i in interfaces),
        acl=acl,
        secure_mode=boolean("secure_mode", base.secure_mode),
        max_lease=duration("max_lease", base.max_lease),
        idle_timeout=duration("idle_timeout", base.idle_timeout),
        max_per_client=integer("max_per_client", base.max_per_client, 1, 4096),
        http_port=integer("http_port", base.http_port, 0, 65535),
        forward_chain=" ".join(chain.split()) if isinstance(chain, str) else None,
        igd_version=integer("igd_version", base.igd_version, 1, 2),
    )
