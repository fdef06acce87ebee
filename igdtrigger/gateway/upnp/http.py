"""The small HTTP/1.1 client the UPnP backends talk to routers with, behind an injectable
``Requester`` (as async-upnp-client separates its ``UpnpRequester``): ``soap``, ``pinhole`` and
the miniupnpc backend's SOAP fallback send through one, so a test or the IGD front can put its
own in (an in-memory router, a recorder) without sockets.

``StreamRequester`` is the real one: one exchange per connection (``Connection: close``) over
asyncio streams, bounded in time (``timeout``) and size (16 KiB of headers, 256 KiB of body by
default), chunked bodies understood (BiPAC and friends); every failure is a ``GatewayError``.
``http_exchange`` is the same exchange on a blocking socket, for a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from igdtrigger.core.errors import GatewayError, GatewayTimeout, GatewayUnreachable, socket_fault
from igdtrigger.gateway.upnp.codec import build_soap

__all__ = [
    "DEFAULT_REQUESTER", "MAX_BODY", "MAX_HEADERS", "USER_AGENT", "HttpReply", "Requester",
    "StreamRequester", "http_exchange", "http_request", "soap_headers", "soap_request",
]

USER_AGENT = "igdtrigger/0.1 UPnP/1.1"
MAX_HEADERS = 16 * 1024
MAX_BODY = 256 * 1024


@dataclass(frozen=True, slots=True)
class HttpReply:
    """An HTTP answer: status, headers (lower-case names), body, and our local address."""
    status: int
    headers: dict[str, str]
    body: bytes
    local_address: str


def _request(url: str, method: str, body: bytes, headers: Mapping[str, str] | None
             ) -> tuple[str, int, bytes]:
    """(host, port, the request's bytes: headers and body in one write) for one exchange."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise GatewayError(f"unsupported URL {url!r} (only http:// is spoken to routers)")
    host, port = parts.hostname, parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_hdr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_hdr}", f"User-Agent: {USER_AGENT}",
             "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def http_request(url: str, method: str = "GET", *, body: bytes = b"",
                       headers: dict[str, str] | None = None, timeout: float = 3.0,
                       limit: int = MAX_BODY, connect_to: str | None = None,
                       local_addr: str | None = None) -> HttpReply:
    """One HTTP/1.1 exchange (``Connection: close``), bounded in time and size.

    ``connect_to``: the address to connect to instead of the URL's host (an IPv6 link-local
    address with its ``%zone``); ``local_addr``: the source address to send from."""
    host, port, request = _request(url, method, body, headers)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                connect_to or host, port, limit=MAX_HEADERS,
                local_addr=(local_addr, 0) if local_addr else None)
            try:
                local = str(writer.get_extra_info("sockname")[0])
                writer.write(request)
                await writer.drain()
                status, hdrs = await _read_head(reader)
                data = await _read_body(reader, hdrs, limit)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        raise _timed_out(method, url, timeout) from None
    except OSError as exc:
        raise socket_fault(exc, f"router connection failed for {url}") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise GatewayUnreachable(f"router connection failed for {url}: {exc}") from None
    return HttpReply(status, hdrs, data, local)


def _timed_out(method: str, url: str, timeout: float) -> GatewayTimeout:
    return GatewayTimeout(f"router did not answer {method} {url} within {timeout:g}s",
                          action=f"{method} {url}", timeout=timeout)


def http_exchange(url: str, method: str = "GET", *, body: bytes = b"",
                  headers: Mapping[str, str] | None = None, timeout: float = 3.0,
                  limit: int = MAX_BODY) -> HttpReply:
    """:func:`http_request` on a blocking socket, for a worker thread (the miniupnpc backend's
    check before an add, back to back with the add on its thread: no event-loop hops). The
    same bounds (``timeout`` s for the whole exchange, 16 KiB of headers, ``limit`` bytes of
    body) and the same errors: ``GatewayTimeout``, ``GatewayUnreachable``,
    ``LocalResourceError``."""
    host, port, request = _request(url, method, body, headers)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout) as sock:
            local = str(sock.getsockname()[0])
            sock.sendall(request)
            buf = b""
            while True:
                reply = _complete(buf, limit, eof=False)
                if reply is not None:
                    break
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                more = sock.recv(65536)
                if not more:
                    reply = _complete(buf, limit, eof=True)
                    if reply is None:
                        raise ValueError("connection closed before the whole response")
                    break
                buf += more
    except TimeoutError:
        raise _timed_out(method, url, timeout) from None
    except OSError as exc:
        raise socket_fault(exc, f"router connection failed for {url}") from None
    except ValueError as exc:
        raise GatewayUnreachable(f"router connection failed for {url}: {exc}") from None
    return HttpReply(reply[0], reply[1], reply[2], local)


def _complete(buf: bytes, limit: int, *, eof: bool) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) once ``buf`` holds a whole response (``eof``: the router closed
    the connection), else None; ``ValueError`` for what ``_read_head``/``_read_body`` refuse."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADERS or eof:
                raise ValueError("response headers too large" if len(buf) > MAX_HEADERS
                                 else "connection closed in the response headers")
            return None
        if end + 4 > MAX_HEADERS:
            raise ValueError("response headers too large")
        status, hdrs = _parse_head(buf[:end + 4].decode("iso-8859-1"))
        buf = buf[end + 4:]
        if status != 100:  # Expect: 100-continue answered anyway
            break
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        body = _dechunk(buf, limit)
        return None if body is None else (status, hdrs, body)
    length = hdrs.get("content-length")
    if length is not None and length.isdecimal():
        n = int(length)
        if n > limit:
            raise ValueError(f"response body of {n} bytes is larger than {limit}")
        return (status, hdrs, buf[:n]) if len(buf) >= n else None
    if len(buf) > limit:
        raise ValueError(f"response body larger than {limit} bytes")
    return (status, hdrs, buf) if eof else None


def _dechunk(buf: bytes, limit: int) -> bytes | None:
    """A whole chunked body (None: more to come)."""
    out = bytearray()
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        if len(out) + size > limit:
            raise ValueError(f"response body larger than {limit} bytes")
        if len(buf) < eol + 2 + size + 2:
            return None
        out += buf[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADERS:
            raise ValueError("response headers too large")
        status, hdrs = _parse_head(head.decode("iso-8859-1"))
        if status != 100:  # Expect: 100-continue answered anyway
            return status, hdrs


def _parse_head(text: str) -> tuple[int, dict[str, str]]:
    """The status and headers (lower-case names) of a response head; ``ValueError``."""
    first, _, rest = text.partition("\r\n")
    bits = first.split(" ", 2)
    if len(bits) < 2 or not bits[0].startswith("HTTP/") or not bits[1].isdecimal():
        raise ValueError(f"not an HTTP response: {first[:60]!r}")
    hdrs: dict[str, str] = {}
    for line in rest.split("\r\n"):
        k, sep, v = line.partition(":")
        if sep:
            hdrs[k.strip().lower()] = v.strip()
    return int(bits[1]), hdrs


async def _read_body(reader: asyncio.StreamReader, hdrs: dict[str, str], limit: int) -> bytes:
    if "chunked" in hdrs.get("transfer-encoding", "").lower():  # BiPAC and friends
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            if len(out) + size > limit:
                raise ValueError(f"response body larger than {limit} bytes")
            out += await reader.readexactly(size)
            await reader.readuntil(b"\r\n")
        return bytes(out)
    length = hdrs.get("content-length")
    if length is not None and length.isdecimal():
        n = int(length)
        if n > limit:
            raise ValueError(f"response body of {n} bytes is larger than {limit}")
        return await reader.readexactly(n)
    data = await reader.read(limit + 1)
    while len(data) <= limit:
        more = await reader.read(limit + 1 - len(data))
        if not more:
            break
        data += more
    if len(data) > limit:
        raise ValueError(f"response body larger than {limit} bytes")
    return data


class Requester(Protocol):
    """What sends one HTTP request to the router and returns its reply. ``connect_to``: the
    address to connect to instead of the URL's host (an IPv6 link-local address with its
    ``%zone``); ``local_addr``: the source address. Raises ``GatewayError`` subclasses."""

    async def request(self, url: str, method: str = "GET", *, body: bytes = b"",
                      headers: Mapping[str, str] | None = None, timeout: float = 3.0,
                      connect_to: str | None = None, local_addr: str | None = None
                      ) -> HttpReply:
        """One HTTP request (``timeout`` in seconds; ``connect_to``: an address to use instead of
        the URL's host; ``local_addr``: the source address). Raises a ``GatewayError``
        (``GatewayTimeout``, ``GatewayUnreachable``)."""


class StreamRequester:
    """The real ``Requester``: :func:`http_request` with a body limit of ``limit`` bytes."""

    def __init__(self, limit: int = MAX_BODY) -> None:
        self.limit = limit

    async def request(self, url: str, method: str = "GET", *, body: bytes = b"",
                      headers: Mapping[str, str] | None = None, timeout: float = 3.0,
                      connect_to: str | None = None, local_addr: str | None = None
                      ) -> HttpReply:
        """``Requester.request`` over asyncio streams, with the body capped at ``limit`` bytes."""
        return await http_request(url, method, body=body, headers=dict(headers or {}),
                                  timeout=timeout, limit=self.limit, connect_to=connect_to,
                                  local_addr=local_addr)


DEFAULT_REQUESTER: Requester = StreamRequester()


async def soap_request(requester: Requester, control_url: str, service_type: str, action: str,
                       args: Sequence[tuple[str, str]], *, timeout: float,
                       connect_to: str | None = None, local_addr: str | None = None
                       ) -> HttpReply:
    """POST one SOAP action (``codec.build_soap``, its ``SOAPAction`` header) to
    ``control_url``; the raw reply (``codec.parse_soap_response`` reads it)."""
    headers = soap_headers(service_type, action)
    return await requester.request(control_url, "POST",
                                   body=build_soap(service_type, action, args),
                                   headers=headers, timeout=timeout, connect_to=connect_to,
                                   local_addr=local_addr)


def soap_headers(service_type: str, action: str) -> dict[str, str]:
    """The headers of one SOAP action's POST."""
    return {"Content-Type": 'text/xml; charset="utf-8"',
            "SOAPAction": f'"{service_type}#{action}"'}
