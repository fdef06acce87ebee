"""A small blocking client for the service's HTTP API (stdlib only: it loads fast).

Used by the CLI and the launcher wrapper, where start-up time matters more than features: one
HTTP/1.1 request per connection written on a plain socket (``http.client`` would load
``email`` and ``ssl``, ~20 ms of a launcher hook's start-up, issue 17), the answer read to a
bound (``MAX_ANSWER`` bytes of body).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from igdtrigger.cli.entry import request_bytes
from igdtrigger.core.errors import ApiError, ServiceBusy, ServiceUnavailable, UsageError
from igdtrigger.core.settings import DEFAULT_PORT, ApiConfig
from igdtrigger.paths import ADMIN_SOCKET, admin_socket, state_dirs

if TYPE_CHECKING:  # the shapes only: `run`'s start-up imports no more than it did
    from collections.abc import Callable

    from igdtrigger.config import Config
    from igdtrigger.runtime.views import ActivationView, HealthView, StatusView

__all__ = [
    "ADMIN_SOCKET",
    "AUTO",
    "DEFAULT_SERVER",
    "LOCAL_PROBE_TIMEOUT",
    "MAX_ANSWER",
    "Client",
    "Resolved",
    "connected_peer_uid",
    "is_loopback_url",
    "local_access",
    "local_admin_socket",
    "pick_token",
    "read_token",
    "resolve_server",
    "token_owner",
]

DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
AUTO = "auto"
LOCAL_PROBE_TIMEOUT = 0.3


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where the service is: its ``url``, and ``how`` that was decided (argument, environment,
    config, local, zeroconf, default)."""
    url: str
    how: str  # "argument", "environment", "config", "local", "zeroconf", "default"

    @property
    def trusted(self) -> bool:
        """May the admin token read from a local file be sent there? Not to a service that
        merely advertised itself on the LAN (anyone can), unless it is on loopback."""
        return self.how != "zeroconf" or is_loopback_url(self.url)


def is_loopback_url(url: str) -> bool:
    """Does ``url`` (scheme optional) name this machine (``localhost`` or a loopback address)?"""
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
        # mDNS browsing only when nothing answers on loopback (zeroconf costs ~100 ms to load)
        from igdtrigger.cli.discovery import browse

        found = browse(discover_timeout)
    except Exception as exc:  # no multicast here, zeroconf missing...: fall back
        print(f"igdtrigger: zeroconf discovery failed ({exc}); trying {DEFAULT_SERVER}",
              file=sys.stderr)
        found = []
    if found:
        return Resolved(found[0].url, "zeroconf")
    return Resolved(DEFAULT_SERVER, "default")


def _state_dirs(state_dir: Path | None) -> list[Path]:
    return [Path(d) for d in state_dirs(str(state_dir) if state_dir else None)]


def local_admin_socket(state_dir: Path | None = None) -> Path | None:
    """The service's admin socket (``<state_dir>/api.sock``) if this user may connect to it
    (``paths.admin_socket``: owned by its directory's owner, the local way in that needs no
    token)."""
    if not hasattr(socket, "AF_UNIX"):
        return None
    found = admin_socket(str(state_dir) if state_dir else None)
    return Path(found) if found is not None else None


def token_owner(state_dir: Path | None = None) -> int | None:
    """The owner (uid) of the token file ``read_token`` reads: the service's user."""
    for d in _state_dirs(state_dir):
        try:
            return (d / "api-token").stat().st_uid
        except OSError:
            continue
    return None


def _proc_hex_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    if len(raw) == 16:  # four little-endian 32-bit words
        return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return None


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _unmapped(addr: _Address) -> _Address:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def connected_peer_uid(sock: socket.socket, proc: Path = Path("/proc/net")) -> int | None:
    """The uid of the process that holds the other end of ``sock``, a TCP connection on this
    machine (Linux ``/proc/net/tcp``/``tcp6``: the kernel's word, so it cannot be faked; an
    accepted connection carries its listener's owner). None when it cannot be told. Asked of
    the connection itself, after connecting: whichever address a name such as ``localhost``
    resolved to, and whoever took the port since anyone looked, the answer is about the
    process that will read what is sent."""
    try:
        mine, theirs = sock.getsockname(), sock.getpeername()
        want_local = (_unmapped(ipaddress.ip_address(str(theirs[0]).split("%")[0])),
                      int(theirs[1]))
        want_remote = (_unmapped(ipaddress.ip_address(str(mine[0]).split("%")[0])),
                       int(mine[1]))
    except (OSError, ValueError, IndexError, TypeError):
        return None
    for attempt in range(5):  # the listener's side may take a moment to show up
        found, readable = _find_connection(proc, want_local, want_remote)
        if found is not None or not readable:
            return found
        time.sleep(0.01 * (attempt + 1))
    return None


def _find_connection(proc: Path, local: tuple[_Address, int],
                     remote: tuple[_Address, int]) -> tuple[int | None, bool]:
    """(uid of the socket at ``local`` connected to ``remote``, was any table readable?)"""
    readable = False
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] == "0A":  # 0A: LISTEN
                continue
            try:
                if (_proc_endpoint(fields[1]) == local
                        and _proc_endpoint(fields[2]) == remote):
                    return int(fields[7]), True
            except ValueError:
                continue
    return None, readable


def _proc_endpoint(text: str) -> tuple[_Address, int] | None:
    addr_hex, _, port_hex = text.partition(":")
    addr = _proc_hex_address(addr_hex)
    return (_unmapped(addr), int(port_hex, 16)) if addr is not None else None


def read_token(state_dir: Path | None = None) -> str | None:
    """The admin token: ``$IGDTRIGGER_TOKEN``, else the service's token file if readable."""
    if env := os.environ.get("IGDTRIGGER_TOKEN"):
        return env.strip()
    for d in _state_dirs(state_dir):
        try:
            text = (d / "api-token").read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def local_access(where: Resolved, state_dir: Path | None) -> tuple[Path | None, int | None]:
    """(the admin socket to use, the uid a loopback listener must run as to get the token)
    for the service ``where`` names: the socket only for the service this host runs by
    default or by its config (an explicit ``--server`` may name another instance)."""
    sock = None
    if where.how in ("local", "default", "config") and is_loopback_url(where.url):
        sock = local_admin_socket(state_dir)
    return sock, token_owner(state_dir)


MAX_ANSWER = 4 * 1024 * 1024  # bytes of an answer's body read at most (more: not our JSON)
_MAX_HEAD = 64 * 1024  # bytes of status line and headers


class _BadAnswer(Exception):
    """What came back is not an HTTP answer (or it was cut short)."""


def _unix_socket(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _host_header(host: str, port: int) -> str:
    """The ``Host`` header's value: IPv6 literals in brackets, IDNA for other scripts."""
    try:
        name = host.encode("ascii").decode()
    except UnicodeError:
        name = host.encode("idna").decode()
    if ":" in name:
        name = f"[{name}]"
    return name if port == 80 else f"{name}:{port}"


def _deadline_recv(sock: socket.socket) -> Callable[[], bytes]:
    """``sock.recv`` bounded, all calls together, by ``sock``'s timeout at the first call
    (seconds; none set: unbounded). Raises ``TimeoutError`` once that time is spent."""
    limit = sock.gettimeout()
    if limit is None:
        return lambda: sock.recv(65536)
    end = time.monotonic() + limit

    def recv() -> bytes:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        return sock.recv(65536)

    return recv


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """``(status, body)`` of one HTTP/1.1 answer on ``sock`` (``Connection: close`` was
    asked: the body ends at its ``Content-Length``, its last chunk or the end of the stream;
    at most ``MAX_ANSWER`` bytes of it are kept). The socket's timeout bounds the whole answer,
    not each read: a listener trickling a byte at a time cannot hold a game's start. Raises
    ``_BadAnswer``, ``OSError`` (``TimeoutError`` when the service goes quiet or is too slow)."""
    recv = _deadline_recv(sock)
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > _MAX_HEAD:
            raise _BadAnswer("an answer whose headers never end")
        chunk = recv()
        if not chunk:
            raise _BadAnswer("the connection closed before an answer" if not buf
                             else "the answer was cut short")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    body = buf[end + 4:]
    version, _, rest = head[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise _BadAnswer(f"not an HTTP answer: {head[0][:60]!r}")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    chunked = "chunked" in fields.get("transfer-encoding", "").lower()
    length = fields.get("content-length")
    want = MAX_ANSWER + 1
    if length is not None and not chunked:
        if not length.isdigit():
            raise _BadAnswer(f"a Content-Length of {length[:20]!r}")
        want = min(int(length), MAX_ANSWER)
    while len(body) < want:
        chunk = recv()
        if not chunk:
            if length is not None and not chunked:
                raise _BadAnswer(f"the answer was cut short ({len(body)} of {length} bytes)")
            break
        body += chunk
    return int(code), _dechunked(bytes(body)) if chunked else bytes(body[:MAX_ANSWER])


def _dechunked(raw: bytes) -> bytes:
    """The body of a ``Transfer-Encoding: chunked`` answer (at most ``MAX_ANSWER`` bytes).
    Raises ``_BadAnswer`` for a malformed or unfinished one."""
    out = bytearray()
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        try:
            size = int(raw[pos:eol].split(b";")[0], 16) if eol >= 0 else -1
        except ValueError:
            size = -1
        if size < 0 or (size and eol + 2 + size > len(raw)):
            raise _BadAnswer("a chunked answer cut short or malformed")
        if size == 0 or len(out) >= MAX_ANSWER:
            return bytes(out[:MAX_ANSWER])
        out += raw[eol + 2:eol + 2 + size]
        pos = eol + 4 + size


def pick_token(explicit: str | None, state_dir: Path | None, trusted: bool,
               ) -> tuple[str | None, bool]:
    """``(token, guessed)``: ``--token``, else ``$IGDTRIGGER_TOKEN``, else (only for a trusted
    server) a token file on this machine, which may be another service's: ``guessed``."""
    if explicit:
        return _token_checked(explicit, "--token"), False
    if env := os.environ.get("IGDTRIGGER_TOKEN"):
        return _token_checked(env.strip(), "$IGDTRIGGER_TOKEN"), False
    if not trusted:
        return None, False
    token = read_token(state_dir)
    return token, token is not None


def _token_checked(token: str, source: str) -> str:
    """``token`` if it can be an admin token (printable ASCII without blanks: it travels in an
    HTTP header); else a UsageError naming ``source``, never echoing the secret."""
    if not all(33 <= ord(c) <= 126 for c in token):
        raise UsageError(f"{source}: an admin token is printable ASCII without blanks (the "
                         "service's api-token file in its state directory holds it)")
    return token


_HEX = frozenset("0123456789abcdefABCDEF:.")


def _ip_literal(host: str) -> bool:
    """A dotted-quad IPv4 address (``127.0.0.1``) or an IPv6 literal's characters."""
    parts = host.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        return True
    return ":" in host and set(host) <= _HEX


def _bad_host(host: str) -> str:
    """Why ``host`` (from a URL) cannot be connected to, or "": blanks and control characters
    (http.client refuses them), a name IDNA cannot encode (a label over 63 characters, a name
    over 253)."""
    if not host.strip() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in host):
        return "the host name has blanks or control characters"
    if _ip_literal(host):  # nothing for IDNA to refuse (its codec costs ~1 ms to load)
        return ""
    try:
        encoded = host.encode("idna")
    except UnicodeError as exc:
        return f"not a host name ({exc})"
    if len(encoded) > 253:
        return "the host name is longer than 253 characters"
    return ""


class Client:
    """``admin_socket``: talk to the service over its local admin socket (no token needed);
    else over TCP, where the admin token goes to a loopback service only when the kernel says
    the process at the other end of that connection runs as the token file's owner
    (``token_uid``, Linux), so an impostor on the port never sees it. ``token_guessed``: the
    token came from a file on this machine and may be another service's (a second instance,
    a container's): when the service answers 401 to it, ask again without it, as any client
    would be heard."""

    def __init__(self, server: str | None = None, *, token: str | None = None,
                 timeout: float = 10.0, admin_socket: Path | None = None,
                 token_uid: int | None = None, token_guessed: bool = False) -> None:
        url = server or os.environ.get("IGDTRIGGER_SERVER") or DEFAULT_SERVER
        given = url
        if "://" not in url:
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:(?!\d)", url):  # unix:/x, mailto:, not host:port
                raise UsageError(f"--server {given!r}: expected http://HOST:PORT")
            url = "http://" + url
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port
        except ValueError as exc:  # "http://[bad", a port above 65535
            raise UsageError(f"--server {given!r}: {exc}; expected http://HOST:PORT") from None
        if parsed.scheme != "http" or not parsed.hostname:
            raise UsageError(f"--server {given!r}: expected http://HOST:PORT")
        if why := _bad_host(parsed.hostname):
            raise UsageError(f"--server {given!r}: {why}; expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.host = parsed.hostname
        self.port = port or DEFAULT_PORT
        self.token = token
        self.token_guessed = token_guessed
        self.timeout = timeout
        self.admin_socket = admin_socket
        self.token_uid = token_uid

    def _connect(self, wait: float) -> socket.socket:
        """A connection to the service: its admin socket, else TCP. Raises ``OSError``."""
        if self.admin_socket is not None:
            return _unix_socket(self.admin_socket, wait)
        return socket.create_connection((self.host, self.port), timeout=wait)

    def _check_token_recipient(self, sock: socket.socket) -> None:
        """Drop the token (with a warning) when the process at the other end of ``sock`` is
        not the service's user: checked on this very connection (see ``connected_peer_uid``),
        so another address of the name or a process that took the port a moment ago never
        receives it."""
        if not self.token or self.token_uid is None or not is_loopback_url(self.url):
            return
        uid = connected_peer_uid(sock)
        if uid is not None and uid != self.token_uid:
            peer = sock.getpeername()
            print(f"igdtrigger: the process listening on {peer[0]}:{peer[1]} runs as uid "
                  f"{uid}, not as the service's user (uid {self.token_uid}, the owner of its "
                  "token file): the admin token is not sent to it", file=sys.stderr)
            self.token = None

    def health(self) -> HealthView:
        """``GET /healthz``. Raises ``ApiError`` (503: a dead or stuck scheduler, named),
        ``ServiceUnavailable``, ``ServiceBusy``."""
        return cast("HealthView", self.request("GET", "/healthz"))

    def status(self) -> StatusView:
        """``GET /api/v1/status`` (the read role). Raises ``ApiError`` (401 without it),
        ``ServiceUnavailable``, ``ServiceBusy``."""
        return cast("StatusView", self.request("GET", "/api/v1/status"))

    def activate(self, body: dict[str, Any], *, timeout: float | None = None,
                 ) -> ActivationView:
        """``POST /api/v1/activations`` with ``body`` (``rule`` or ``open``, ``ttl``, ``host``,
        ``source``, ``meta``). Raises ``ApiError`` (400/403/404/429), ``ServiceUnavailable``."""
        return cast("ActivationView", self.request("POST", "/api/v1/activations", body,
                                                   timeout=timeout))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        """One API call (``timeout`` in seconds): the decoded JSON answer. Raises ``ApiError``,
        ``ServiceUnavailable`` or ``ServiceBusy``. A guessed token refused with 401 is dropped and
        the call retried once without it (not over the admin socket)."""
        try:
            return self._request(method, path, body, timeout=timeout)
        except ApiError as exc:
            if (exc.status != 401 or not self.token or not self.token_guessed
                    or self.admin_socket is not None):
                raise
            self.token = None  # not this service's token: be an ordinary client
            return self._request(method, path, body, timeout=timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 *, timeout: float | None = None) -> Any:
        wait = timeout or self.timeout
        headers = {"Accept": "application/json", "Connection": "close"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        sock = None
        try:
            sock = self._connect(wait)
            host = "localhost"
            if self.admin_socket is None:
                host = _host_header(self.host, self.port)
                self._check_token_recipient(sock)
                if self.token:
                    headers["Authorization"] = f"Bearer {self.token}"
            sock.sendall(request_bytes(method, path, host, headers, payload))
        except OSError as exc:
            if sock is not None:
                sock.close()
            if self.admin_socket is not None:  # stale socket file (a killed service): TCP
                self.admin_socket = None
                return self._request(method, path, body, timeout=timeout)
            raise ServiceUnavailable(
                f"no igdtrigger service at {self.url} ({exc}); start it with `igdtrigger serve` "
                "or pass --server"
            ) from None
        return self._answer(sock, wait)

    def answer(self, sock: socket.socket) -> Any:
        """The decoded JSON answer to a request already written on ``sock`` (the console entry
        point's, :mod:`igdtrigger.cli.entry`); ``sock`` is closed. Raises as ``request``."""
        sock.settimeout(self.timeout)
        return self._answer(sock, self.timeout)

    def _answer(self, sock: socket.socket, wait: float) -> Any:
        try:
            status, raw = _read_answer(sock)
        except TimeoutError:
            raise ServiceBusy(
                f"the igdtrigger service at {self.url} took the request but did not answer "
                f"within {wait:g}s (busy, or waiting on a slow router)"
            ) from None
        except (OSError, _BadAnswer) as exc:
            raise ServiceUnavailable(
                f"no igdtrigger service at {self.url} ({exc}); start it with `igdtrigger serve` "
                "or pass --server"
            ) from None
        finally:
            sock.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise ServiceUnavailable(
                f"{self.url} answered {status} with something that is not igdtrigger's "
                "JSON; is --server right?"
            ) from None
        if status >= 400:
            msg = f"HTTP {status}"
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                msg = str(data["error"].get("message", msg))
            raise ApiError(status, msg)
        return data
