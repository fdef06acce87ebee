"""A small blocking client for the service's HTTP API (stdlib only: it loads fast).

Used by the CLI and the launcher wrapper, where start-up time matters more than features.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from .config import DEFAULT_PORT, default_state_dir
from .errors import ApiError, ServiceUnavailable, UsageError

DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"


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


class Client:
    def __init__(self, server: str | None = None, *, token: str | None = None,
                 timeout: float = 10.0) -> None:
        url = server or os.environ.get("IGDTRIGGER_SERVER") or DEFAULT_SERVER
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise UsageError(f"--server {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.host = parsed.hostname
        self.port = parsed.port or DEFAULT_PORT
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        headers = {"Accept": "application/json", "Connection": "close"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(4 * 1024 * 1024)
        except (TimeoutError, ConnectionError, OSError) as exc:
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
