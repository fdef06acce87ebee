"""The router HTTP exchange on a blocking socket (``http.http_exchange``, the miniupnpc backend's
check before an add, on its worker thread) answers what the asyncio one (``http_request``) does:
the same reply, or the same error type, for the same bytes from the router."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence

import pytest

from igdtrigger.core.errors import GatewayError, GatewayTimeout, GatewayUnreachable
from igdtrigger.gateway.upnp.http import MAX_HEADERS, HttpReply, http_exchange, http_request

BODY = b"<?xml version='1.0'?><reply/>"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)

# (what the router sends, in pieces; the reply's body, or the error type)
CASES: dict[str, tuple[Sequence[bytes], bytes | type[GatewayError]]] = {
    "content-length": ((OK + BODY,), BODY),
    "content-length-split": ((OK[:10], OK[10:] + BODY[:4], BODY[4:]), BODY),
    "chunked-split-mid-chunk": ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"
                                 + BODY[:3], BODY[3:5] + b"\r\n%x\r\n" % (len(BODY) - 5)
                                 + BODY[5:] + b"\r\n0\r\n\r\n"), BODY),
    "until-close": ((b"HTTP/1.0 200 OK\r\n\r\n", BODY), BODY),
    "100-continue-first": ((b"HTTP/1.1 100 Continue\r\n\r\n", OK + BODY), BODY),
    "not-http": ((b"SSH-2.0-OpenSSH\r\n\r\n",), GatewayUnreachable),
    "closed-in-headers": ((b"HTTP/1.1 200 OK\r\nContent-Le",), GatewayUnreachable),
    "closed-in-body": ((OK + BODY[:5],), GatewayUnreachable),
    "headers-too-large": ((b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEADERS + 10),),
                          GatewayUnreachable),
    "body-too-large": ((b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",),
                       GatewayUnreachable),
}


class Router:
    """Sends scripted bytes to each connection, then closes it (or holds it ``linger`` s)."""

    def __init__(self) -> None:
        self.pieces: Sequence[bytes] = ()
        self.linger = 0.0
        self.server: asyncio.Server | None = None
        self.url = ""
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            for piece in self.pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
            await asyncio.sleep(self.linger)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    r = Router()
    r.server = await asyncio.start_server(r.handle, "127.0.0.1", 0)
    port = r.server.sockets[0].getsockname()[1]
    r.url = f"http://127.0.0.1:{port}/ctl"
    yield r
    r.server.close()
    for task in list(r.handlers):
        task.cancel()
    await asyncio.gather(*r.handlers, return_exceptions=True)
    await r.server.wait_closed()


async def both(url: str, timeout: float = 2.0) -> list[HttpReply | GatewayError]:
    out: list[HttpReply | GatewayError] = []
    for blocking in (False, True):
        try:
            if blocking:
                out.append(await asyncio.to_thread(http_exchange, url, "POST", body=b"x",
                                                   timeout=timeout))
            else:
                out.append(await http_request(url, "POST", body=b"x", timeout=timeout))
        except GatewayError as exc:
            out.append(exc)
    return out


@pytest.mark.parametrize("case", list(CASES))
async def test_the_blocking_exchange_answers_what_the_asyncio_one_does(
        router: Router, case: str) -> None:
    router.pieces, expect = CASES[case]
    for got in await both(router.url):
        if isinstance(expect, bytes):
            assert isinstance(got, HttpReply), got
            assert (got.status, got.body) == (200, expect)
        else:
            assert type(got) is expect, got


async def test_a_whole_reply_is_taken_without_waiting_for_the_router_to_close(
        router: Router) -> None:
    router.pieces, router.linger = (OK + BODY,), 5.0  # ignores Connection: close
    for got in await both(router.url, timeout=1.0):
        assert isinstance(got, HttpReply) and got.body == BODY


async def test_silence_is_a_timeout_and_a_closed_port_unreachable(router: Router) -> None:
    router.pieces, router.linger = (), 5.0
    for got in await both(router.url, timeout=0.2):
        assert isinstance(got, GatewayTimeout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: refused
        for got in await both(f"http://127.0.0.1:{closed}/ctl"):
            assert type(got) is GatewayUnreachable
