"""Reading one TOML table of the config: typed getters that raise ``ConfigError`` naming the
file, the field and the value, and a check that no unknown key was left over."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from igdtrigger.core.errors import ConfigError
from igdtrigger.core.ports import PortRange, parse_duration, parse_port_spec

__all__ = ["Section", "show"]


def show(value: object) -> str:
    """``repr(value)`` cut to 60 characters, for echoing a bad value in an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Section:
    """Reads one TOML table, remembering which keys were used so leftovers can be reported."""

    def __init__(self, data: object, where: str, source: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table, got {show(data)}", source=source, field=where)
        self.data: Mapping[str, Any] = data
        self.where = where
        self.source = source
        self.used: set[str] = set()

    def field_name(self, key: str) -> str:
        """``key``'s dotted path in the config (``gateway.lease``), as errors name it."""
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> ConfigError:
        """A ``ConfigError`` naming the file and ``key``'s dotted path (for the caller to raise)."""
        return ConfigError(message, source=self.source, field=self.field_name(key))

    def get(self, key: str) -> Any:
        """The raw value of ``key`` (``None`` when absent), marked as used."""
        self.used.add(key)
        return self.data.get(key)

    def done(self, allowed: tuple[str, ...]) -> None:
        """Raise ``ConfigError`` for the first key of the table nobody read (a typo), listing
        ``allowed``."""
        for key in self.data:
            if key not in self.used:
                raise ConfigError(
                    f"unknown key {key!r} (allowed: {', '.join(allowed)})",
                    source=self.source,
                    field=self.where or None,
                )

    def duration(self, key: str, default: float) -> float:
        """Seconds (``core.model.parse_duration``: ``90``, ``"10m"``, ``"1h30m"``), ``default`` when
        absent. Raises ``ConfigError``."""
        value = self.get(key)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def string(self, key: str, default: str | None = None) -> str | None:
        """A non-empty string, stripped; ``default`` when absent. Raises ``ConfigError``."""
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {show(value)}")
        return value.strip()

    def boolean(self, key: str, default: bool) -> bool:
        """A TOML boolean (``true``/``false``, not a string or 0/1); ``default`` when absent. Raises
        ``ConfigError``."""
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {show(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``; the first when absent. Raises ``ConfigError`` listing them."""
        value = self.get(key)
        if value is None:
            return choices[0]
        if value not in choices:
            raise self.error(key, f"{show(value)} is not one of {', '.join(choices)}")
        return str(value)

    def names(self, key: str) -> tuple[str, ...]:
        """Executable names (a string or a list: bare names up to 255 characters, no path
        separator); ``()`` when absent. Raises ``ConfigError``."""
        value = self.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v.strip()) <= 255 and "/" not in v and "\\" not in v
            for v in value
        ):
            raise self.error(key, f"expected executable names like [\"cs2\", \"game.exe\"], got "
                                  f"{show(value)}")
        return tuple(v.strip() for v in value)

    def networks(
        self, key: str
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """IP networks (a string or a list; a bare address is its /32 or /128, host bits are
        dropped); ``()`` when absent. Raises ``ConfigError`` naming the item (``key[i]``)."""
        value = self.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected addresses or networks, got {show(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise self.error(f"{key}[{i}]", f"{show(item)} is not an IP address or "
                                 "network like 192.168.1.20 or 192.168.1.0/28") from None
        return tuple(out)

    def ports(self, key: str, *, required: bool) -> tuple[PortRange, ...]:
        """Port ranges from port specs (a string or a list: ``"udp/27015"``, ``"tcp/27015-27030"``,
        ``core.model.parse_port_spec``); ``()`` when absent. ``required``: absent or empty raises.
        Raises ``ConfigError`` naming the item (``key[i]``)."""
        value = self.get(key)
        if value is None:
            if required:
                raise self.error(key, "missing; list port specs like [\"udp/27015\"]")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of port specs, got {show(value)}")
        out: list[PortRange] = []
        for i, item in enumerate(value):
            try:
                out.extend(parse_port_spec(item))
            except ValueError as exc:
                raise self.error(f"{key}[{i}]", str(exc)) from None
        if required and not out:
            raise self.error(key, "must name at least one port")
        return tuple(out)
