"""The service's small state files: the instance tag and the API token (mode 0600).

``<state_dir>/instance`` holds the tag that marks this service's mappings on the router (6 hex
digits); ``<state_dir>/api-token`` the admin bearer token. The journal (SQLite) is journal.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
from pathlib import Path

__all__ = ["derived_tag", "load_or_create_secret", "machine_id"]


def machine_id() -> str:
    """systemd's machine id (stable across reboots), else the host name."""
    for where in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(where).read_text().strip()
            if text:
                return text
    return socket.gethostname()


def derived_tag(state_dir: Path) -> str:
    """The instance tag a state directory gets: 6 hex digits from this machine's id and the
    directory's path, so it is the same at every start even when nothing can be written (a
    crash's leftovers are still recognised as ours), and differs between two services."""
    return hashlib.sha256(f"{machine_id()}\0{state_dir.absolute()}".encode()).hexdigest()[:6]


def load_or_create_secret(path: Path, nbytes: int, *, hexlen: int | None = None,
                          value: str | None = None) -> str | None:
    """Read a secret file, creating it (mode 0600) on first use with ``value`` (default: random).
    ``None`` if not possible."""
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    except OSError:
        return None
    value = value or secrets.token_hex(nbytes)[: hexlen or None]
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        return None
    return value
