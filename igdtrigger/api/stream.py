"""``GET /api/v1/events``: activation and mapping changes as server-sent events.

The stream opens with ``retry: 3000`` and an ``event: hello`` (``seq``, ``version``,
``instance``, ``heartbeat`` seconds), replays the history after ``Last-Event-ID`` (or
``?since=``), then sends each event as ``id: <seq>``/``event: <name>``/``data: <JSON>``; a
comment line every ``sse_heartbeat`` seconds keeps proxies from closing it. Events a slow client
missed are announced as ``event: lost`` (re-read the status); a client that reads nothing for
``sse_write_timeout`` seconds is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

from aiohttp import web

from igdtrigger.api.access import (
    SERVICE,
    SETTINGS,
    SSE_SEND_BUFFER,
    caller_of,
    refused_log,
)
from igdtrigger.core.errors import TooMany, TooManySubscribers, UsageError
from igdtrigger.core.version import __version__
from igdtrigger.runtime.events import Event, Subscriber

__all__ = ["get_events"]


def _sse(event: Event) -> bytes:
    name = str(event.get("event", "message")).replace("\n", " ")
    return f"id: {event['seq']}\nevent: {name}\ndata: {json.dumps(event)}\n\n".encode()


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every activation and mapping change, as it happens."""
    svc = request.app[SERVICE]
    caller = caller_of(request)
    since_raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    since: int | None = None
    if since_raw is not None:
        try:
            since = int(since_raw)
        except ValueError:
            raise UsageError(f"Last-Event-ID/since must be an event number, got {since_raw!r}"
                             ) from None
    try:
        sub = svc.hub.subscribe(caller.key(), admin=caller.admin)
    except TooManySubscribers as exc:
        raise TooMany(f"{exc}; close one first") from None
    try:
        return await _stream_events(request, sub, since)
    finally:
        svc.hub.unsubscribe(sub)


async def _stream_events(request: web.Request, sub: Subscriber,
                         since: int | None) -> web.StreamResponse:
    """The stream itself. Events wait in the subscriber's bounded queue (the oldest dropped,
    ``event: lost``); the socket's send buffer is fixed at ``SSE_SEND_BUFFER`` (the kernel
    would grow it to megabytes for a client that stops reading); a client that takes nothing
    for ``sse_write_timeout`` seconds (those buffers full) is a slow consumer: its stream is
    closed, so it holds neither memory nor a place in the stream pool."""
    svc = request.app[SERVICE]
    heartbeat = request.app[SETTINGS].sse_heartbeat
    write_timeout = request.app[SETTINGS].sse_write_timeout

    async def write(data: bytes) -> None:
        try:
            await asyncio.wait_for(resp.write(data), write_timeout)
        except TimeoutError:
            refused_log("slow event stream", "event stream to %s closed: it took nothing "
                         "for %gs", caller_of(request).key(), write_timeout)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("slow consumer") from None

    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SEND_BUFFER)
    hello = {"seq": svc.hub.seq, "event": "hello", "version": __version__,
             "instance": svc.tag, "heartbeat": heartbeat}
    chunks = [b"retry: 3000\n\n",
              f"event: hello\ndata: {json.dumps(hello)}\n\n".encode()]
    if since is not None:
        chunks.extend(_sse(e) for e in svc.hub.since(since))
    try:
        await write(b"".join(chunks))
        while not sub.closed:
            if not await sub.wait(heartbeat):
                await write(b": keep-alive\n\n")
                continue
            events, dropped = sub.take()
            out = bytearray()
            if dropped:
                lost = {"dropped": dropped, "hint": "re-read /api/v1/status"}
                out += f"event: lost\ndata: {json.dumps(lost)}\n\n".encode()
            for ev in events:
                out += _sse(ev)
            if out:
                await write(bytes(out))
    except ConnectionError:
        pass  # the client went away
    return resp
