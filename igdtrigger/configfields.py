"""Reading one TOML table of the config: typed getters that raise ``ConfigError`` naming the
file, the field and the value, and a check that no unknown key was left over."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import PortRange, parse_duration, parse_port_spec

__all__ = ["Section", "show"]


def show(value: object) -> str:
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
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=self.field_name(key))

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def done(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in self.used:
                raise ConfigError(
                    f"unknown key {key!r} (allowed: {', '.join(allowed)})",
                    source=self.source,
                    field=self.where or None,
                )

    def duration(self, key: str, default: float) -> float:
        value = self.get(key)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {show(value)}")
        return value.strip()

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {show(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key)
        if value is None:
            return choices[0]
        if value not in choices:
            raise self.error(key, f"{show(value)} is not one of {', '.join(choices)}")
        return str(value)

    def names(self, key: str) -> tuple[str, ...]:
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
