"""Where igdtrigger's files are: the config file searched, the state directory, the service's
admin socket; and a quick read of the two config keys that say where a running service is.

Standard library ``os`` only (no ``pathlib``, ``re``, ``tomllib``): ``igdtrigger run``, a game
launcher's hook, finds a running service through this module before anything else is imported
(issue 17). ``igdtrigger.config`` and the API client build on the same functions, so there is one
answer to "which config file, which state directory, which socket".

Test isolation: ``IGDTRIGGER_STATE_DIR`` names the state directory, and when it is set the
system-wide ``/var/lib/igdtrigger`` is not looked at for a running service's admin socket or
token (a root ``serve --simulate`` on the same machine stays out of a test's way).
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "ADMIN_SOCKET",
    "STATE_DIR_ENV",
    "SYSTEM_STATE_DIR",
    "admin_socket",
    "config_paths",
    "default_state_dir",
    "service_location",
    "state_dirs",
    "token_readable",
]

ADMIN_SOCKET = "api.sock"  # the service's local admin socket, in its state directory
STATE_DIR_ENV = "IGDTRIGGER_STATE_DIR"
SYSTEM_STATE_DIR = "/var/lib/igdtrigger"


def config_paths() -> list[str]:
    """The places searched when no ``--config`` is given, in order: ``$IGDTRIGGER_CONFIG``,
    ``$XDG_CONFIG_HOME`` (or ``~/.config``)``/igdtrigger/config.toml``, systemd's
    ``$CONFIGURATION_DIRECTORY/config.toml``, ``/etc/igdtrigger/config.toml``."""
    paths: list[str] = []
    if env := os.environ.get("IGDTRIGGER_CONFIG"):
        paths.append(env)
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    paths.append(os.path.join(xdg, "igdtrigger", "config.toml"))
    if cdir := os.environ.get("CONFIGURATION_DIRECTORY"):  # systemd ConfigurationDirectory=
        paths.append(os.path.join(cdir.split(":")[0], "config.toml"))
    paths.append("/etc/igdtrigger/config.toml")
    return paths


def default_state_dir() -> str:
    """``$IGDTRIGGER_STATE_DIR``, else ``$STATE_DIRECTORY`` (systemd), else
    ``/var/lib/igdtrigger`` as root, else ``$XDG_STATE_HOME`` (or ``~/.local/state``)
    ``/igdtrigger``."""
    if env := os.environ.get(STATE_DIR_ENV):
        return env
    if env := os.environ.get("STATE_DIRECTORY"):
        return env.split(":")[0]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "state")
    return os.path.join(xdg, "igdtrigger")


def state_dirs(configured: str | None) -> list[str]:
    """Where a client looks for a running service's admin socket and token, in order: the
    config's ``[service] state_dir``, the default state directory, and ``/var/lib/igdtrigger``
    (a system service seen by a user) unless ``$IGDTRIGGER_STATE_DIR`` is set (see the module
    note: the isolation switch)."""
    out = [d for d in (configured, default_state_dir()) if d]
    if not os.environ.get(STATE_DIR_ENV):
        out.append(SYSTEM_STATE_DIR)
    return list(dict.fromkeys(out))


def admin_socket(configured: str | None) -> str | None:
    """The service's admin socket (``<state_dir>/api.sock``, first of :func:`state_dirs`) if
    this user may connect to it: the local way in that needs no token, so none can be handed to
    an impostor. Only a socket owned by the owner of its directory counts (nobody else can
    create one there)."""
    for d in state_dirs(configured):
        path = os.path.join(d, ADMIN_SOCKET)
        try:
            st, dst = os.stat(path), os.stat(d)
        except OSError:
            continue
        if (not stat.S_ISSOCK(st.st_mode) or st.st_uid != dst.st_uid
                or not os.access(path, os.R_OK | os.W_OK)):
            continue
        return path
    return None


def token_readable(configured: str | None) -> bool:
    """Could this user read the service's admin token (``<state_dir>/api-token``, any of
    :func:`state_dirs`)?"""
    return any(os.access(os.path.join(d, "api-token"), os.R_OK) for d in state_dirs(configured))


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _string_value(text: str) -> str | None:
    """A one-line TOML string without escapes (``"x"`` or ``'x'``), then only blanks or a
    comment; None for anything else (an escape, a number, a multi-line string...)."""
    quote = text[:1]
    if quote not in ('"', "'"):
        return None
    end = text.find(quote, 1)
    if end < 0:
        return None
    value, rest = text[1:end], text[end + 1:].strip()
    if (quote == '"' and "\\" in value) or (rest and not rest.startswith("#")):
        return None
    return value


def _clean_header(line: str) -> bool:
    """``[name]`` or ``[[name]]`` with a bare name, then only blanks or a comment."""
    inner = line.lstrip("[")
    end = inner.find("]")
    rest = inner[end:].lstrip("]").strip() if end > 0 else "?"
    name = inner[:end].strip()
    return bool(name) and set(name) <= _BARE_KEY and (not rest or rest.startswith("#"))


def service_location(text: str) -> tuple[str | None, str | None] | None:
    """``([api] listen, [service] state_dir)`` read from a config file's TOML text, each None
    when absent; None when this quick reading cannot be sure (dotted or quoted keys, inline
    tables, multi-line strings, escapes, a key given twice, anything unusual): the caller then
    parses the file with ``tomllib``. The file is validated in full afterwards either way (a
    value read here that the full parse would refuse is reported there)."""
    if '"""' in text or "'''" in text:
        return None  # a line inside a multi-line string could look like a table header
    table = ""
    found: dict[tuple[str, str], str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if table in ("api", "service") and not _clean_header(line):
                return None  # a line of a multi-line array, or an odd header: be sure
            if line.startswith("[["):
                table = "[["  # an array of tables: not [api] nor [service]
                continue
            end = line.find("]")
            rest = line[end + 1:].strip() if end > 0 else "?"
            name = line[1:end].strip() if end > 0 else ""
            if rest and not rest.startswith("#"):
                return None
            if not name or not set(name) <= _BARE_KEY:
                # a quoted or dotted header ("api", api.x) could name [api]: be sure instead
                if "api" in name or "service" in name:
                    return None
                table = "?"
                continue
            table = name
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key or not set(key) <= _BARE_KEY:
            if (key.startswith(("api", "service", '"', "'")) and table == "") or (
                    table in ("api", "service")):
                return None  # api.listen = ..., "listen" = ...: a full parse says
            continue
        if table == "" and key in ("api", "service"):
            return None  # api = {listen = ...}
        want = (table, key) in (("api", "listen"), ("service", "state_dir"))
        if not want:
            value = value.strip()
            if table in ("api", "service") and (
                    (value.startswith(("{", '"', "'")) and _string_value(value) is None)
                    or (value.startswith("[") and value.count("[") != value.count("]"))):
                return None  # a value running over lines: its lines could look like keys
            continue
        if (table, key) in found:
            return None
        parsed = _string_value(value.strip())
        if parsed is None:
            return None
        found[(table, key)] = parsed
    return found.get(("api", "listen")), found.get(("service", "state_dir"))
