"""A simulated UPnP Internet Gateway Device, modelled on miniupnpd, served on loopback.

Real client code (the miniupnpc C library through its Python binding, our own SOAP client) talks
to it over HTTP exactly as it would talk to a router. It backs ``igdtrigger serve --simulate`` (a
newcomer with no UPnP router sees mappings open and close) and the fast test-suite.

The package by concern:

* ``sim.table``: the mapping table and the behaviour knobs (``MappingTable``; sans-I/O, with an
  injectable clock, so tests can expire leases without sleeping).
* ``sim.device``: ``SimulatedRouter``, the IGD actions on that table and whole HTTP requests
  (``handle_http``), still sans-I/O. SOAP is parsed and written with the client's codec
  (``gateway.upnp.codec``): one encoding, one fault table.
* ``sim.describe``: the root description and SCPD documents.
* here, the I/O: ``SimulatedIgdServer``, a small asyncio HTTP/1.x server around a router
  (``Connection: close``, ``Content-Length`` framing, bounded sizes and time), with
  ``down``/``up``/``restart`` controls, and ``run_in_thread()``: the server on its own event loop
  in a daemon thread, for synchronous users (benchmarks, scripts driving the blocking miniupnpc
  calls).

Behaviour follows miniupnpd (shared/reference/router-facts.md §1, §4, §7): 716 for external port
0, 718 for a port held by another client (same client: update in place, lease refreshed), IGDv2
clamps lease 0 or > 604800 to 604800 while IGDv1 treats 0 as permanent, secure mode and permission
denials are 606 on IGDv2 and 718 on IGDv1, 713/714/730/733 where miniupnpd uses them. Quirk knobs
reproduce real routers: MikroTik (725 for timed leases, ``faultCode`` spelling), ARRIS (402 for
timed leases), old DD-WRT (timed leases accepted then gone), a restart on a new port, an IGD that
is down, slow answers and injected failures.

The simulator is not a security boundary, but it parses untrusted bytes like one: requests are
bounded (64 KiB of headers, 64 KiB of body, a read deadline) and SOAP bodies go through defusedxml
with DTDs forbidden, so entity expansion and external entities are refused with a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from igdtrigger.sim.describe import IPCONN_CONTROL_PATH, ROOT_DESC_PATH
from igdtrigger.sim.device import HttpResponse, SimulatedRouter, html_error
from igdtrigger.sim.table import DIGITS, normalise_ip

__all__ = [
    "MAX_BODY_BYTES", "MAX_HEADER_BYTES", "SimulatedIgdServer", "SimulatedIgdThread",
    "run_in_thread",
]

T = TypeVar("T")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _ProtocolError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the simulated IGD listens on loopback only (127.0.0.1 or ::1), not {host!r}"
        )


class SimulatedIgdServer:
    """A loopback HTTP server in front of a ``SimulatedRouter``.

    ``await start()`` then give ``url`` to a client (``miniupnpc.UPnP().selectigd(url)``).
    ``down()`` closes the listening socket (clients get connection refused), ``up()`` listens on
    the same port again, ``restart()`` clears the router's table and by default moves to a new
    port, as miniupnpd does with ``http_port=0``. Also an async context manager.
    """

    def __init__(
        self, router: SimulatedRouter | None = None, *, request_timeout: float = 10.0
    ) -> None:
        self.router = router if router is not None else SimulatedRouter()
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._connections: set[asyncio.Task[Any]] = set()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port; raises ``RuntimeError`` before ``start``."""
        if not self._port:
            raise RuntimeError("the simulated IGD has not been started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port`` (IPv6 bracketed)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The root description URL, e.g. ``http://127.0.0.1:PORT/rootDesc.xml``."""
        return self.base_url + ROOT_DESC_PATH

    @property
    def control_url(self) -> str:
        """The WAN connection service's control URL."""
        return self.base_url + IPCONN_CONTROL_PATH

    @property
    def is_up(self) -> bool:
        """Is the server listening?"""
        return self._server is not None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (port 0 = pick one); returns ``url``."""
        _check_loopback(host)
        if self._server is not None:
            raise RuntimeError("the simulated IGD is already listening")
        self._host = host
        self._server = await self._listen(port)
        return self.url

    async def down(self) -> None:
        """Stop listening and drop open connections; the table is kept."""
        server, self._server = self._server, None
        await self._shut(server, set(self._connections))

    async def up(self) -> None:
        """Listen again on the same port after ``down()``."""
        if self._server is None:
            if not self._port:
                raise RuntimeError("start() the simulated IGD first")
            self._server = await self._listen(self._port)

    async def restart(self, *, new_port: bool = True) -> None:
        """Simulate a daemon restart: empty table, new uptime, and (by default) a new port."""
        self.router.restart()
        old_server, old_port = self._server, self._port
        old_connections = set(self._connections)
        if new_port:
            self._server = await self._listen(0)  # opened before the old one closes: a new port
            await self._shut(old_server, old_connections)
        else:
            self._server = None
            await self._shut(old_server, old_connections)
            self._server = await self._listen(old_port or 0)

    async def close(self) -> None:
        """Stop listening (``down``)."""
        await self.down()

    async def __aenter__(self) -> SimulatedIgdServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _listen(self, port: int) -> asyncio.Server:
        server = await asyncio.start_server(
            self._on_connection,
            self._host,
            port,
            limit=MAX_HEADER_BYTES,
            reuse_address=True,
        )
        self._port = server.sockets[0].getsockname()[1]
        return server

    async def _shut(
        self, server: asyncio.Server | None, connections: set[asyncio.Task[Any]]
    ) -> None:
        """Stop ``server`` listening and cancel the given in-flight connections."""
        if server is None:
            return
        server.close()
        tasks = list(connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- one connection = one request --------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # down()/close() dropping a request in flight (a stop while a slow or loaded
            # machine's client still waits for its answer): the end of this connection, not an
            # error. Re-raised, asyncio's stream callback would log "Exception in callback" at
            # ERROR with a traceback (CPython 3.11 asks a cancelled task for its exception).
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        requester = normalise_ip(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        version = "HTTP/1.1"
        failed = False
        request: _Request | None = None
        try:
            async with asyncio.timeout(self.request_timeout):
                request = await _read_request(reader, writer)
        except _ProtocolError as exc:
            response, failed = html_error(exc.status, str(exc)), True
        except TimeoutError:
            response, failed = html_error(408, "request not received in time"), True
        if request is None and not failed:
            return  # the client went away without a request
        if request is not None:
            version = request.version
            try:
                response = self.router.handle_http(
                    request.method,
                    request.target,
                    request.headers,
                    request.body,
                    requester=requester,
                )
            except Exception as exc:  # a bug in a hook or the router: answer, keep serving
                response = html_error(500, f"simulator error: {exc.__class__.__name__}")
        if self.router.latency > 0:
            await asyncio.sleep(self.router.latency)
        head_only = request is not None and request.method == "HEAD"
        writer.write(_serialise(response, version, self.router.server_header, head_only))
        await writer.drain()
        if failed:
            await _linger(reader, writer)


def _serialise(response: HttpResponse, version: str, server: str, head_only: bool) -> bytes:
    lines = [
        f"{version} {response.status} {response.reason}",
        f"Content-Type: {response.content_type}",
        "Connection: close",
        f"Content-Length: {len(response.body)}",
        f"Server: {server}",
        "Ext:",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head if head_only else head + response.body


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> _Request | None:
    """Read one request; ``None`` if the peer closed before sending anything."""
    total = 0

    async def line() -> bytes:
        nonlocal total
        try:
            raw = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise _ProtocolError(400, "request line or header too long") from None
        total += len(raw)
        if total > MAX_HEADER_BYTES:
            raise _ProtocolError(400, "request headers too large")
        return raw

    first = await line()
    while first in (b"\r\n", b"\n"):  # tolerate stray blank lines before the request
        first = await line()
    if not first:
        return None
    if not first.endswith(b"\n"):
        raise _ProtocolError(400, "incomplete request line")
    parts = first.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise _ProtocolError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _ProtocolError(505 if version.startswith("HTTP/") else 400, "unsupported version")
    if not target.startswith("/") and not target.startswith("http://"):
        raise _ProtocolError(400, "malformed request target")
    request = _Request(method, target, version)
    for _ in range(MAX_HEADER_LINES + 1):
        raw = await line()
        if not raw.endswith(b"\n"):
            raise _ProtocolError(400, "connection closed inside the headers")
        text = raw.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _ProtocolError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key == "content-length" and request.headers.get(key, value) != value:
            raise _ProtocolError(400, "conflicting Content-Length headers")
        request.headers[key] = value
    else:
        raise _ProtocolError(400, "too many header lines")

    if "transfer-encoding" in request.headers:
        raise _ProtocolError(501, "chunked request bodies are not supported; send Content-Length")
    length_text = request.headers.get("content-length")
    if length_text is None:
        if method == "POST":
            raise _ProtocolError(411, "Content-Length required")
        return request
    if not DIGITS.fullmatch(length_text):
        raise _ProtocolError(400, "invalid Content-Length")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise _ProtocolError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if request.headers.get("expect", "").lower() == "100-continue":
        writer.write(f"{version} 100 Continue\r\n\r\n".encode())
        await writer.drain()
    request.body = await reader.readexactly(length)
    return request


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an early error answer, read (and drop) what the client is still sending for a
    moment, so closing does not reset the connection before the client reads the answer."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            received = 0
            while received < 4 * MAX_BODY_BYTES:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += len(chunk)


# --- a server on its own thread (for synchronous users) ------------------------------------------


class SimulatedIgdThread:
    """A ``SimulatedIgdServer`` running on a private event loop in a daemon thread.

    The router lives on that thread: from the calling thread, touch it through ``call`` (or when
    nothing is talking to the server). Stop with ``stop()`` or use as a context manager.
    """

    def __init__(self, server: SimulatedIgdServer, host: str, port: int) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, args=(host, port), name="simulated-igd", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            try:
                self._loop.run_until_complete(self.server.start(host, port))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.server.close())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()

    @property
    def router(self) -> SimulatedRouter:
        """The simulated router's state."""
        return self.server.router

    @property
    def url(self) -> str:
        """The description URL."""
        return self.server.url

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine (e.g. ``server.restart()``) on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` on the server's thread (safe access to the router) and return its result."""

        async def invoke() -> T:
            return fn()

        return self.run(invoke(), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and its loop, and join the thread (``timeout`` seconds); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> SimulatedIgdThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(
    router: SimulatedRouter | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> SimulatedIgdThread:
    """Start a simulated IGD on a background thread; returns a handle with ``.url``/``.stop()``."""
    _check_loopback(host)
    return SimulatedIgdThread(SimulatedIgdServer(router), host, port)
