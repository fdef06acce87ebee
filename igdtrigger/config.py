"""Configuration: TOML file → validated, frozen dataclasses.

Every problem is reported as a ``ConfigError`` that names the file, the field and the value, e.g.
``/etc/igdtrigger/config.toml: rules[0].open[1]: 'udp/70000': port 70000 is outside 1-65535``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .model import PortRange, parse_duration, parse_port_spec

DEFAULT_LISTEN = "127.0.0.1:8731"
DEFAULT_PORT = 8731
DEFAULT_IDLE = 600.0
DEFAULT_LEASE = 3600.0
SIMULATE = "simulate"
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
DETECTORS = ("conntrack",)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    trigger: tuple[PortRange, ...]
    open: tuple[PortRange, ...]
    idle_timeout: float = DEFAULT_IDLE

    def port_count(self) -> int:
        return sum(len(r) for r in self.open)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trigger": [str(r) for r in self.trigger],
            "open": [str(r) for r in self.open],
            "idle_timeout": self.idle_timeout,
        }


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    url: str | None = None  # description URL; "simulate" starts the built-in simulated IGD
    lease: float = DEFAULT_LEASE
    discover_timeout: float = 2.0
    verify_interval: float = 60.0
    check_interval: float = 2.0  # one mapping checked this often: a router restart is seen fast
    check_before_add: bool = True
    backend: str = "auto"  # "auto" (miniupnpc, else our SOAP client), "miniupnpc", "soap"

    @property
    def simulate(self) -> bool:
        return self.url == SIMULATE


@dataclass(frozen=True, slots=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DetectConfig:
    methods: tuple[str, ...] = DETECTORS


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    rules: tuple[Rule, ...] = ()
    state_dir: Path | None = None
    source: str = "<defaults>"

    def rule(self, name: str) -> Rule | None:
        for r in self.rules:
            if r.name == name:
                return r
        return None


def default_config_paths() -> list[Path]:
    """The places searched when no ``--config`` is given, in order."""
    paths: list[Path] = []
    if env := os.environ.get("IGDTRIGGER_CONFIG"):
        paths.append(Path(env))
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(xdg) / "igdtrigger" / "config.toml")
    if cdir := os.environ.get("CONFIGURATION_DIRECTORY"):  # systemd ConfigurationDirectory=
        paths.append(Path(cdir.split(":")[0]) / "config.toml")
    paths.append(Path("/etc/igdtrigger/config.toml"))
    return paths


def find_config() -> Path | None:
    for p in default_config_paths():
        if p.is_file():
            return p
    return None


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path`` (or the first file found in the usual places, or the defaults)."""
    if path is None:
        found = find_config()
        if found is None:
            return Config()
        path = found
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(p)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(p)) from None
    return parse_config(data, source=str(p))


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers can be reported."""

    def __init__(self, data: object, where: str, source: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table, got {_show(data)}", source=source, field=where)
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
            raise self.error(key, f"expected a non-empty string, got {_show(value)}")
        return value.strip()

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_show(value)}")
        return value

    def ports(self, key: str, *, required: bool) -> tuple[PortRange, ...]:
        value = self.get(key)
        if value is None:
            if required:
                raise self.error(key, "missing; list port specs like [\"udp/27015\"]")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of port specs, got {_show(value)}")
        out: list[PortRange] = []
        for i, item in enumerate(value):
            try:
                out.extend(parse_port_spec(item))
            except ValueError as exc:
                raise self.error(f"{key}[{i}]", str(exc)) from None
        if required and not out:
            raise self.error(key, "must name at least one port")
        return tuple(out)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:8731``, ``[::1]:8731``, ``0.0.0.0:8731`` or a bare port."""
    text = text.strip()
    if text.isdigit():
        host, port_s = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: write [IPv6]:PORT")
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: write HOST:PORT, e.g. 127.0.0.1:8731")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{text!r}: host must be an IP address") from None
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    return host, int(port_s)


_TOP = ("gateway", "api", "detect", "service", "rules")
_GATEWAY = ("url", "lease", "discover_timeout", "verify_interval", "check_interval",
            "check_before_add", "backend")
BACKENDS = ("auto", "miniupnpc", "soap")
_API = ("listen",)
_DETECT = ("methods",)
_SERVICE = ("state_dir",)
_RULE = ("name", "trigger", "open", "idle_timeout")


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    top = _Section(data, "", source)

    gw_sec = _Section(top.get("gateway") or {}, "gateway", source)
    url = gw_sec.string("url")
    if url is not None and url != SIMULATE and not re.match(r"^https?://", url):
        raise gw_sec.error(
            "url", f"{url!r} is not an http:// URL of the router's description (or \"simulate\")"
        )
    lease = gw_sec.duration("lease", DEFAULT_LEASE)
    if not 30 <= lease <= 604800:
        raise gw_sec.error("lease", f"{lease:g}s is outside 30s-7d (IGDv2 allows at most 604800s)")
    gateway = GatewayConfig(
        url=url,
        lease=lease,
        discover_timeout=gw_sec.duration("discover_timeout", 2.0),
        verify_interval=gw_sec.duration("verify_interval", 60.0),
        check_interval=gw_sec.duration("check_interval", 2.0),
        check_before_add=gw_sec.boolean("check_before_add", True),
        backend=gw_sec.string("backend", "auto") or "auto",
    )
    if gateway.backend not in BACKENDS:
        raise gw_sec.error("backend", f"{gateway.backend!r} is not one of {', '.join(BACKENDS)}")
    gw_sec.done(_GATEWAY)

    api_sec = _Section(top.get("api") or {}, "api", source)
    listen = api_sec.string("listen", DEFAULT_LISTEN) or DEFAULT_LISTEN
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise api_sec.error("listen", str(exc)) from None
    api = ApiConfig(host=host, port=port)
    api_sec.done(_API)

    det_sec = _Section(top.get("detect") or {}, "detect", source)
    methods_raw = det_sec.get("methods")
    methods: tuple[str, ...] = DETECTORS
    if methods_raw is not None:
        if not isinstance(methods_raw, list) or not all(isinstance(m, str) for m in methods_raw):
            raise det_sec.error("methods", f"expected a list of names, got {_show(methods_raw)}")
        for m in methods_raw:
            if m not in DETECTORS:
                raise det_sec.error(
                    "methods", f"unknown detector {m!r} (known: {', '.join(DETECTORS)})"
                )
        methods = tuple(methods_raw)
    detect = DetectConfig(methods=methods)
    det_sec.done(_DETECT)

    svc_sec = _Section(top.get("service") or {}, "service", source)
    state = svc_sec.string("state_dir")
    svc_sec.done(_SERVICE)

    rules_raw = top.get("rules")
    rules: list[Rule] = []
    if rules_raw is not None:
        if not isinstance(rules_raw, list):
            raise ConfigError(
                "expected [[rules]] tables, got " + _show(rules_raw), source=source, field="rules"
            )
        seen: dict[str, int] = {}
        for i, item in enumerate(rules_raw):
            sec = _Section(item, f"rules[{i}]", source)
            name = sec.get("name")
            if not isinstance(name, str) or not _RULE_NAME.match(name):
                raise sec.error(
                    "name",
                    f"{_show(name)} is not a rule name (1-40 letters, digits, '_', '.', '-')",
                )
            if name in seen:
                raise sec.error("name", f"duplicate rule name {name!r} (also rules[{seen[name]}])")
            seen[name] = i
            rules.append(
                Rule(
                    name=name,
                    trigger=sec.ports("trigger", required=False),
                    open=sec.ports("open", required=True),
                    idle_timeout=sec.duration("idle_timeout", DEFAULT_IDLE),
                )
            )
            sec.done(_RULE)
    top.done(_TOP)
    return Config(
        gateway=gateway,
        api=api,
        detect=detect,
        rules=tuple(rules),
        state_dir=Path(state) if state else None,
        source=source,
    )


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd), else ``/var/lib/igdtrigger`` as root, else XDG state."""
    if env := os.environ.get("IGDTRIGGER_STATE_DIR"):
        return Path(env)
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/igdtrigger")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "igdtrigger"
