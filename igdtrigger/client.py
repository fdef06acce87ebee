"""A small blocking client for the service's HTTP API (stdlib only: it loads fast).

Used by the CLI and the launcher wrapper, where start-up time matters more than features.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_PORT, ApiConfig, default_state_dir
from .errors import ApiError, ServiceBusy, ServiceUnavailable, UsageError

if TYPE_CHECKING:
    from .config import Config

DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
AUTO = "auto"
LOCAL_PROBE_TIMEOUT = 0.3


@dataclass(frozen=True, slots=True)
class Resolved:
    url: str
    how: str  # "argument", "environment", "config", "local", "zeroconf", "default"

    @property
    def trusted(self) -> bool:
        """May the admin token read from a local file be sent there? Not to a service that
        merely advertised itself on the LAN (anyone can), unless it is on loopback."""
        return self.how != "zeroconf" or is_loopback_url(self.url)


def is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url if "://" in url else "http://" + url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_server(server: str | None, config: Config | None = None, *,
                   discover_timeout: float = 1.5) -> Resolved:
    """Which service to talk to.

    ``--server URL`` > ``$IGDTRIGGER_SERVER`` > a config file whose ``[api] listen`` is not the
    default > a service answering on this host's default address > zeroconf
    (``_igdtrigger._tcp``, ``discover_timeout`` seconds) > ``http://127.0.0.1:8731``.
    ``--server auto`` (or ``IGDTRIGGER_SERVER=auto``) skips straight to zeroconf.
    """
    auto = False
    if server and server != AUTO:
        return Resolved(server, "argument")
    if server == AUTO:
        auto = True
    else:
        env = os.environ.get("IGDTRIGGER_SERVER", "").strip()
        if env == AUTO:
            auto = True
        elif env:
            return Resolved(env, "environment")
    if not auto and config is not None and config.source != "<defaults>":
        api = config.api
        default = ApiConfig()
        if (api.host, api.port) != (default.host, default.port):
            return Resolved(api.url, "config")
    if not auto and _answers("127.0.0.1", DEFAULT_PORT, LOCAL_PROBE_TIMEOUT):
        return Resolved(DEFAULT_SERVER, "local")
    try:
        from .discovery import browse

        found = browse(discover_timeout)
    except Exception as exc:  # no multicast here, zeroconf missing...: fall back
        print(f"igdtrigger: zeroconf discovery failed ({exc}); trying {DEFAULT_SERVER}",
              file=sys.stderr)
        found = []
    if found:
        return Resolved(found[0].url, "zeroconf")
    return Resolved(DEFAULT_SERVER, "default")


def read_token(state_dir: Path | None = None) -> str | None:
    """The admin token: ``$IGDTRIGGER_TOKEN``, else the service's token file if readable."""
    if env := os.environ.get("IGDTRIGGER_TOKEN"):
        return env.strip()
    for d in (state_dir, default_state_dir(), Path("/var/lib/igdtrigger")):
        if d is None:
            continue
        try:
            text = (d / "api-token").read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def pick_token(explicit: str | None, state_dir: Path | None, trusted: bool,
               ) -> tuple[str | None, bool]:
    """``(token, guessed)``: ``--token``, else ``$IGDTRIGGER_TOKEN``, else (only for a trusted
    server) a token file on this machine, which may be another service's: ``guessed``."""
    if explicit:
        return explicit, False
    if env := os.environ.get("IGDTRIGGER_TOKEN"):
        return env.strip(), False
    if not trusted:
        return None, False
    token = read_token(state_dir)
    return token, token is not None


class Client:
    """``token_guessed``: the token came from a file on this machine and may belong to another
    service (a second instance, a container's): when the service answers 401 to it, ask again
    without it, as any client would be heard."""

    def __init__(self, server: str | None = None, *, token: str | None = None,
                 timeout: float = 10.0, token_guessed: bool = False) -> None:
        url = server or os.environ.get("IGDTRIGGER_SERVER") or DEFAULT_SERVER
        if "://" not in url:
            url = "http://" + url
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port
        except ValueError as exc:  # "http://[bad", a port above 65535
            raise UsageError(f"--server {url!r}: {exc}; expected http://HOST:PORT") from None
        if parsed.scheme != "http" or not parsed.hostname:
            raise UsageError(f"--server {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.host = parsed.hostname
        self.port = port or DEFAULT_PORT
        self.token = token
        self.token_guessed = token_guessed
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        try:
            return self._request(method, path, body, timeout=timeout)
        except ApiError as exc:
            if exc.status != 401 or not self.token or not self.token_guessed:
                raise
            self.token = None  # not this service's token: be an ordinary client
            return self._request(method, path, body, timeout=timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 *, timeout: float | None = None) -> Any:
        wait = timeout or self.timeout
        conn = http.client.HTTPConnection(self.host, self.port, timeout=wait)
        headers = {"Accept": "application/json", "Connection": "close"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=payload, headers=headers)
        except OSError as exc:
            conn.close()
            raise ServiceUnavailable(
                f"no igdtrigger service at {self.url} ({exc}); start it with `igdtrigger serve` "
                "or pass --server"
            ) from None
        try:
            resp = conn.getresponse()
            raw = resp.read(4 * 1024 * 1024)
        except TimeoutError:
            raise ServiceBusy(
                f"the igdtrigger service at {self.url} took the request but did not answer "
                f"within {wait:g}s (busy, or waiting on a slow router)"
            ) from None
        except (ConnectionError, OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(
                f"no igdtrigger service at {self.url} ({exc}); start it with `igdtrigger serve` "
                "or pass --server"
            ) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise ServiceUnavailable(
                f"{self.url} answered {resp.status} with something that is not igdtrigger's "
                "JSON; is --server right?"
            ) from None
        if resp.status >= 400:
            msg = f"HTTP {resp.status}"
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                msg = str(data["error"].get("message", msg))
            raise ApiError(resp.status, msg)
        return data
