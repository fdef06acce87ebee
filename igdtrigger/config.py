"""Configuration: TOML file → validated, frozen dataclasses.

Every problem is reported as a ``ConfigError`` that names the file, the field and the value, e.g.
``/etc/igdtrigger/config.toml: rules[0].open[1]: 'udp/70000': port 70000 is outside 1-65535``.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from igdtrigger.configfields import Section, show
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.frontconfig import FRONT_KEYS, parse_front  # front: [front]
from igdtrigger.core.policy import hides_privileged
from igdtrigger.core.ports import format_duration
from igdtrigger.core.rules import DEFAULT_IDLE, EXTERNAL_MODES, SHARE_MODES, External, Rule, Share
from igdtrigger.core.settings import (
    BACKENDS,
    DEFAULT_BURST,
    DEFAULT_LEASE,
    DEFAULT_LISTEN,
    DEFAULT_MAX_PER_HOST,
    DEFAULT_RATE,
    DETECTORS,
    PROTOCOLS,
    SIMULATE,
    ZEROCONF_MODES,
    AdhocConfig,
    ApiConfig,
    Config,
    DetectConfig,
    GatewayConfig,
)
from igdtrigger.paths import config_paths
from igdtrigger.paths import default_state_dir as _default_state_dir

__all__ = [
    "ENV_PREFIX",
    "LAUNCHERS",
    "MAX_CONFIG_BYTES",
    "MAX_RULE_PORTS",
    "MAX_TOTAL_PORTS",
    "Config",
    "check_state_dir",
    "default_config_paths",
    "default_state_dir",
    "env_overrides",
    "find_config",
    "load_config",
    "parse_config",
    "parse_listen",
    "validate_bounds",
]

ENV_PREFIX = "IGDTRIGGER_"
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


def default_config_paths() -> list[Path]:
    """The places searched when no ``--config`` is given, in order (``paths.config_paths``)."""
    return [Path(p) for p in config_paths()]


def find_config() -> Path | None:
    """The first path of :func:`default_config_paths` that exists, or None. Raises
    ``ConfigError`` when one cannot even be looked at (a directory this user may not enter:
    e.g. a container's ``/config`` owned by another uid)."""
    for p in default_config_paths():
        try:
            # a directory or FIFO where the config should be (docker makes a directory of a
            # bind mount whose host file is missing) is that config, refused by name, never
            # passed over for the next place or the defaults
            if p.exists():
                return p
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}{_access_hint(p)}",
                              source=str(p)) from None
    return None


_STATE_FIX = "set IGDTRIGGER_STATE_DIR (service.state_dir) to a directory this user owns"


def check_state_dir(path: Path) -> None:
    """Raise ``ConfigError`` (naming the directory, its owner and mode, and who we are) when
    ``serve`` could not keep its state in ``path``: it exists but this process may not enter
    and read it (a container's ``/config`` volume owned by another uid, say). A directory that
    can be read but not written (a read-only volume, a disk remounted read-only after errors)
    is not refused: the journal is read from a private copy and the service serves from memory,
    saying why."""
    for probe in (path, *path.parents):
        try:
            exists = probe.exists()
        except OSError as exc:
            raise ConfigError(f"cannot use the state directory: {exc.strerror}"
                              f"{_access_hint(path / 'x', _STATE_FIX)}", source=str(path)) from None
        if exists:
            if not os.access(probe, os.R_OK | os.X_OK) and probe == path:
                raise ConfigError("cannot use the state directory: permission denied"
                                  f"{_access_hint(path / 'x', _STATE_FIX)}", source=str(path))
            return


def _access_hint(path: Path, fix: str = "make the file readable, e.g. a bind-mounted config "
                 "file with mode 0644") -> str:
    """Why this process may not read ``path`` (owner and mode of the first directory it cannot
    enter, and who we are), for a one-line error."""
    if not hasattr(os, "geteuid"):
        return ""
    for parent in [*reversed(path.parents), path]:
        try:
            st = parent.stat()
        except OSError:
            return ""
        if parent != path and not os.access(parent, os.X_OK):
            return (f" ({parent} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:04o} "
                    f"and this process runs as uid {os.geteuid()} without CAP_DAC_OVERRIDE; run "
                    f"as uid {st.st_uid}, or {fix})")
    return ""


MAX_CONFIG_BYTES = 1 << 20


def _refuse_special(p: Path, mode: int) -> NoReturn:
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise ConfigError(f"not a regular file ({kind}); give the path of a TOML file", source=str(p))


def _read_config_file(p: Path) -> bytes:
    """The bytes of a config file. A FIFO (which would block until a writer comes), a device
    or a socket is refused, and so is a file over ``MAX_CONFIG_BYTES``: ``ConfigError``."""
    try:
        with open(p, "rb", opener=lambda f, flags: os.open(f, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(mode := os.fstat(fh.fileno()).st_mode):
                _refuse_special(p, mode)
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:  # a Unix socket cannot be opened at all (ENXIO): say what it is
        if exc.errno == errno.ENXIO and stat.S_ISSOCK(mode := os.stat(p).st_mode):
            _refuse_special(p, mode)
        raise
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file",
                          source=str(p))
    return raw


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path`` (or the first file found in the usual places, or the defaults), with the
    ``IGDTRIGGER_*`` environment over it. Raises ``ConfigError`` naming the file, the field
    and the value."""
    overrides = env_overrides()
    if path is None:
        found = find_config()
        if found is None:
            if not overrides:
                return Config()
            return _parse_with_env({}, overrides, source="<environment>")
        path = found
    p = Path(path)
    if not str(path).strip():
        raise ConfigError("an empty path names no config file", source=repr(str(path)))
    try:
        raw = _read_config_file(p)
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}{_access_hint(p)}",
                          source=str(p)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(p)) from None
    return _parse_with_env(data, overrides, source=str(p))


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[tuple[str, str], str]:
    """``IGDTRIGGER_<SECTION>__<KEY>=value`` variables, e.g. ``IGDTRIGGER_API__LISTEN``.

    Only names with ``__`` are overrides (``IGDTRIGGER_CONFIG`` etc. are not). Precedence:
    command line > environment > file > defaults.
    """
    env = os.environ if environ is None else environ
    out: dict[tuple[str, str], str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        out[(section.lower(), key.lower())] = value
    return out


def _env_value(text: str) -> Any:
    """A TOML value if the text is one (``true``, ``10``, ``["a"]``, ``"x"``), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _parse_with_env(
    data: Mapping[str, Any], overrides: Mapping[tuple[str, str], str], *, source: str
) -> Config:
    if not overrides:
        return parse_config(data, source=source)
    merged: dict[str, Any] = dict(data)
    env_fields: dict[str, str] = {}
    for (section, key), text in sorted(overrides.items()):
        name = _env_name(section, key)
        if section not in _ENV_SECTIONS:
            raise ConfigError(
                f"unknown section {section!r} (environment overrides exist for: "
                f"{', '.join(_ENV_SECTIONS)})", source="environment", field=name)
        if key not in _ENV_SECTIONS[section]:
            raise ConfigError(
                f"unknown key {key!r} (allowed: {', '.join(_ENV_SECTIONS[section])})",
                source="environment", field=name)
        table = merged.get(section)
        table = dict(table) if isinstance(table, Mapping) else {}
        table[key] = _env_value(text)
        merged[section] = table
        env_fields[f"{section}.{key}"] = name
    try:
        config = parse_config(merged, source=source)
    except ConfigError as exc:
        field_ = exc.field or ""
        env_name = env_fields.get(field_) or next(
            (n for f, n in env_fields.items() if field_.startswith(f + "[")), None)
        if env_name is None:
            raise
        prefix = ": ".join(p for p in (exc.source, exc.field) if p) + ": "
        text = str(exc)
        raise ConfigError(text[len(prefix):] if text.startswith(prefix) else text,
                          source="environment", field=env_name) from None
    env_note = ", ".join(sorted(env_fields.values()))
    return replace(config, source=f"{source} + {env_note}" if source != "<environment>"
                   else f"<environment: {env_note}>")


def _adhoc(sec: Section) -> AdhocConfig:
    base = AdhocConfig()
    ports = (sec.ports("adhoc_ports", required=True) if sec.get("adhoc_ports") is not None
             else base.ports)
    for rng in ports:
        if hides_privileged(rng):
            raise sec.error("adhoc_ports", f"{rng} includes privileged ports below 1024; allow "
                            "those only by naming each one (e.g. \"tcp/80\")")
    limits: dict[str, int] = {}
    for key, default, top in (("adhoc_max_ports", base.max_ports, 4096),
                              ("adhoc_per_host", base.per_host, 1000)):
        value = sec.get(key)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise sec.error(key, f"expected an integer 1-{top}, got {show(value)}")
        limits[key] = value
    max_ttl = sec.duration("adhoc_max_ttl", base.max_ttl)
    if not 0 < max_ttl <= 7 * 86400:
        raise sec.error("adhoc_max_ttl", f"expected a duration up to 7d, got {max_ttl:g}s")
    return AdhocConfig(enabled=sec.boolean("allow_adhoc", False), ports=ports,
                       max_ports=limits["adhoc_max_ports"], max_ttl=max_ttl,
                       per_host=limits["adhoc_per_host"],
                       admin_only=sec.boolean("adhoc_admin_only", False))


def _api_allow(sec: Section) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``[api] allow``: the LAN. A network of every address (``0.0.0.0/0``, ``::/0``, also
    ``::ffff:0:0/96``, every IPv4 address written as IPv6) would let the whole Internet act
    without the token: refused."""
    nets = sec.networks("allow")
    for i, net in enumerate(nets):
        if net.prefixlen == 0 or (isinstance(net, ipaddress.IPv6Network)
                                  and net.supernet_of(ipaddress.IPv6Network("::ffff:0:0/96"))):
            raise sec.error(f"allow[{i}]", f"{net} is every address: anyone on the Internet "
                            "could open ports without the token; name your LAN's networks, "
                            "like 192.168.1.0/24")
    return nets


def _max_per_host(sec: Section) -> int:
    value = sec.get("max_per_host")
    if value is None:
        return DEFAULT_MAX_PER_HOST
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise sec.error("max_per_host", f"expected an integer 1-1000, got {show(value)}")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:8731``, ``[::1]:8731``, ``0.0.0.0:8731`` or a bare port."""
    text = text.strip()
    if text.isdecimal():
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
    if not port_s.isdecimal() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    return host, int(port_s)


_TOP = ("gateway", "api", "detect", "service", "rules", "launchers", "front")
_GATEWAY = ("url", "lease", "discover_timeout", "verify_interval", "check_interval",
            "check_before_add", "backend", "protocol", "ipv6_pinholes")
_API = ("listen", "public_read", "rate_limit", "rate_burst", "allowed_hosts", "zeroconf",
        "allow_adhoc", "adhoc_ports", "adhoc_max_ports", "adhoc_max_ttl", "adhoc_per_host",
        "adhoc_admin_only", "allow", "max_per_host")
_DETECT = ("methods", "socket_interval", "process_interval", "track_flows")
_SERVICE = ("state_dir",)
_RULE = ("name", "trigger", "open", "idle_timeout", "process", "hosts", "share", "external")
# sections whose keys IGDTRIGGER_<SECTION>__<KEY> may override
_ENV_SECTIONS: dict[str, tuple[str, ...]] = {
    "gateway": _GATEWAY, "api": _API, "detect": _DETECT, "service": _SERVICE,
    "front": FRONT_KEYS,  # front: IGDTRIGGER_FRONT__ENABLED=true etc. (docker)
}


_Mode = TypeVar("_Mode", bound=str)


def _one_of(sec: Section, key: str, choices: tuple[_Mode, ...]) -> _Mode:
    """A string key that must be one of ``choices`` (the first when absent or empty)."""
    value = sec.string(key) or choices[0]
    for choice in choices:
        if choice == value:
            return choice
    raise sec.error(key, f"{value!r} is not one of {', '.join(choices)}")


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validated :class:`Config` from a parsed TOML table. Raises ``ConfigError`` naming
    ``source``, the field and the value."""
    top = Section(data, "", source)

    gw_sec = Section(top.get("gateway") or {}, "gateway", source)
    url = gw_sec.string("url")
    if url is not None and url != SIMULATE and not re.match(r"^https?://", url, re.IGNORECASE):
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
        backend=_one_of(gw_sec, "backend", BACKENDS),
        protocol=_one_of(gw_sec, "protocol", PROTOCOLS),
        ipv6_pinholes=gw_sec.boolean("ipv6_pinholes", True),
    )
    gw_sec.done(_GATEWAY)

    api_sec = Section(top.get("api") or {}, "api", source)
    listen = api_sec.string("listen", DEFAULT_LISTEN) or DEFAULT_LISTEN
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise api_sec.error("listen", str(exc)) from None
    rate = api_sec.get("rate_limit")
    if rate is None:
        rate = DEFAULT_RATE
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 10000:
        raise api_sec.error("rate_limit", f"expected requests per second in (0, 10000], got "
                            f"{show(rate)}")
    burst = api_sec.get("rate_burst")
    if burst is None:
        burst = DEFAULT_BURST
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 100000:
        raise api_sec.error("rate_burst", f"expected an integer 1-100000, got {show(burst)}")
    hosts_raw = api_sec.get("allowed_hosts")
    if hosts_raw is None:
        hosts_raw = []
    if not isinstance(hosts_raw, list) or not all(
            isinstance(h, str) and h.strip() for h in hosts_raw):
        raise api_sec.error("allowed_hosts",
                            f"expected a list of host names, got {show(hosts_raw)}")
    zc_raw = api_sec.get("zeroconf")
    if zc_raw is None or isinstance(zc_raw, bool):
        zc_raw = {None: "auto", True: "on", False: "off"}[zc_raw]
    zc = next((m for m in ZEROCONF_MODES if m == zc_raw), None)
    if zc is None:
        raise api_sec.error("zeroconf", f"expected true, false or \"auto\", got {show(zc_raw)}")
    api = ApiConfig(
        host=host,
        port=port,
        public_read=api_sec.boolean("public_read", False),
        rate_limit=float(rate),
        rate_burst=burst,
        allowed_hosts=tuple(h.strip().lower() for h in hosts_raw),
        zeroconf=zc,
        adhoc=_adhoc(api_sec),
        allow=_api_allow(api_sec),
        max_per_host=_max_per_host(api_sec),
    )
    api_sec.done(_API)

    det_sec = Section(top.get("detect") or {}, "detect", source)
    methods_raw = det_sec.get("methods")
    methods: tuple[str, ...] = DETECTORS
    if methods_raw is not None:
        if not isinstance(methods_raw, list) or not all(isinstance(m, str) for m in methods_raw):
            raise det_sec.error("methods", f"expected a list of names, got {show(methods_raw)}")
        for m in methods_raw:
            if m not in DETECTORS:
                raise det_sec.error(
                    "methods", f"unknown detector {m!r} (known: {', '.join(DETECTORS)})"
                )
        methods = tuple(dict.fromkeys(methods_raw))
    intervals = {}
    for key in ("socket_interval", "process_interval"):
        intervals[key] = det_sec.duration(key, 1.0)
        if not 0.05 <= intervals[key] <= 3600:
            raise det_sec.error(key, f"expected a duration from 50ms to 1h, got "
                                     f"{intervals[key]:g}s")
    detect = DetectConfig(methods=methods, explicit=methods_raw is not None,
                          socket_interval=intervals["socket_interval"],
                          process_interval=intervals["process_interval"],
                          track_flows=det_sec.boolean("track_flows", True))
    det_sec.done(_DETECT)

    svc_sec = Section(top.get("service") or {}, "service", source)
    state = svc_sec.string("state_dir")
    svc_sec.done(_SERVICE)

    rules_raw = top.get("rules")
    rules: list[Rule] = []
    if rules_raw is not None:
        if not isinstance(rules_raw, list):
            raise ConfigError(
                "expected [[rules]] tables, got " + show(rules_raw), source=source, field="rules"
            )
        seen: dict[str, int] = {}
        for i, item in enumerate(rules_raw):
            sec = Section(item, f"rules[{i}]", source)
            name = sec.get("name")
            if not isinstance(name, str) or not _RULE_NAME.match(name):
                raise sec.error(
                    "name",
                    f"{show(name)} is not a rule name (1-40 letters, digits, '_', '.', '-')",
                )
            if name in seen:
                raise sec.error("name", f"duplicate rule name {name!r} (also rules[{seen[name]}])")
            seen[name] = i
            open_ports = sec.ports("open", required=True)
            for rng in open_ports:
                if hides_privileged(rng):
                    raise sec.error(
                        "open",
                        f"{rng} includes privileged ports below 1024; open those only by naming "
                        "each one (e.g. \"tcp/80\"), never inside a range",
                    )
            rules.append(
                Rule(
                    name=name,
                    trigger=sec.ports("trigger", required=False),
                    open=open_ports,
                    idle_timeout=sec.duration("idle_timeout", DEFAULT_IDLE),
                    process=sec.names("process"),
                    hosts=sec.networks("hosts"),
                    share=Share(sec.choice("share", SHARE_MODES)),
                    external=External(sec.choice("external", EXTERNAL_MODES)),
                )
            )
            sec.done(_RULE)
    launchers = _launchers(top.get("launchers"), source, {r.name for r in rules})
    front = parse_front(top.get("front") or {}, source=source)  # front: the IGD front
    top.done(_TOP)
    config = Config(
        front=front,
        gateway=gateway,
        api=api,
        detect=detect,
        rules=tuple(rules),
        state_dir=Path(state) if state else None,
        source=source,
        launchers=launchers,
    )
    validate_bounds(config)
    return config


# Bounds every value must keep to (seconds unless said); each is in the config reference.
MAX_RULE_PORTS = 4096  # mappings one rule may open (a "both/" port counts twice)
MAX_TOTAL_PORTS = 16384  # mappings all rules together may open
_DURATION_BOUNDS: dict[str, tuple[float, float]] = {
    "gateway.discover_timeout": (0.1, 60.0),
    "gateway.verify_interval": (1.0, 86400.0),
    "gateway.check_interval": (0.5, 86400.0),
    "api.adhoc_max_ttl": (1.0, 7 * 86400.0),
    "rules.idle_timeout": (1.0, 7 * 86400.0),
}


def _bound_text(lo: float, hi: float) -> str:
    low = f"{lo * 1000:g}ms" if lo < 1 else format_duration(lo)
    return f"{low} to {format_duration(hi) if hi < 86400 else f'{hi / 86400:g}d'}"


def validate_bounds(config: Config) -> None:
    """Refuse values that parse but make no sense: ``inf``, ``nan``, a ``100000d`` idle timeout,
    a 1 ms check interval, a rule larger than a router can hold. Raises ``ConfigError`` naming
    the key (``rules[2].idle_timeout``)."""

    def check(field: str, bounds: str, value: float) -> None:
        lo, hi = _DURATION_BOUNDS[bounds]
        if not (math.isfinite(value) and lo <= value <= hi):
            shown = f"{value:g}s" if math.isfinite(value) else repr(value)
            raise ConfigError(f"{shown} is outside {_bound_text(lo, hi)}",
                              source=config.source, field=field)

    gw = config.gateway
    for key in ("discover_timeout", "verify_interval", "check_interval"):
        check(f"gateway.{key}", f"gateway.{key}", getattr(gw, key))
    check("api.adhoc_max_ttl", "api.adhoc_max_ttl", config.api.adhoc.max_ttl)
    total = 0
    for i, rule in enumerate(config.rules):
        check(f"rules[{i}].idle_timeout", "rules.idle_timeout", rule.idle_timeout)
        count = rule.port_count()
        if count > MAX_RULE_PORTS:
            raise ConfigError(
                f"rule {rule.name!r} opens {count} ports; at most {MAX_RULE_PORTS} per rule (each "
                "is a mapping the router must hold and igdtrigger must renew; split the range or "
                "open only what the game uses)", source=config.source, field=f"rules[{i}].open")
        total += count
        if total > MAX_TOTAL_PORTS:
            raise ConfigError(
                f"the rules together open {total} ports; at most {MAX_TOTAL_PORTS}",
                source=config.source, field=f"rules[{i}].open")


LAUNCHERS = ("steam", "lutris", "heroic")


def _launchers(raw: object, source: str, rule_names: set[str]) -> tuple[tuple[str, str], ...]:
    """``[launchers]``: ``"steam:730" = "cs2"`` maps what ``run --infer`` finds to a rule."""
    if raw is None:
        return ()
    sec = Section(raw, "launchers", source)
    out: list[tuple[str, str]] = []
    for key in list(sec.data):
        kind, sep, ident = key.partition(":")
        if not sep or kind not in LAUNCHERS or not ident:
            raise sec.error(key, f"key {key!r} must be LAUNCHER:ID with LAUNCHER one of "
                            f"{', '.join(LAUNCHERS)} (e.g. \"steam:730\")")
        rule = sec.get(key)
        if not isinstance(rule, str) or rule not in rule_names:
            known = ", ".join(sorted(rule_names)) or "none"
            raise sec.error(key, f"{show(rule)} is not a configured rule (known rules: {known})")
        out.append((f"{kind}:{ident}", rule))
    return tuple(out)


def default_state_dir() -> Path:
    """``$IGDTRIGGER_STATE_DIR``, else ``$STATE_DIRECTORY`` (systemd), else
    ``/var/lib/igdtrigger`` as root, else XDG state (``paths.default_state_dir``)."""
    return Path(_default_state_dir())
