"""GENA eventing for the IGD front (UDA 1.1 §4): SUBSCRIBE, renewal, UNSUBSCRIBE and the
``NOTIFY`` property-change events a control point asks for.

Windows' NAT traversal API (``IUPnPNAT``, NATUPnP.dll) and other UPnP stacks subscribe to
WANIPConnection before they use it; miniupnpd sends events for the same variables
(``igdxml.EVENTED``). Bounded and LAN-only: a callback must name the subscriber's own address
(no request forgery through us), at most ``MAX_PER_HOST`` subscriptions per host and
``MAX_TOTAL`` in all, each for at most ``MAX_TIMEOUT`` seconds, events sent with a 2 s timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import yarl

__all__ = ["GenaError", "Subscriptions", "propertyset"]

log = logging.getLogger("igdtrigger.front")

MAX_PER_HOST = 4
MAX_TOTAL = 64
MAX_TIMEOUT = 1800  # s
MIN_TIMEOUT = 60  # s
SEND_TIMEOUT = 2.0  # s per event
_CALLBACK_RE = re.compile(r"<(http://[^>]{1,256})>")


class GenaError(Exception):
    """A subscription request to answer with HTTP ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(slots=True)
class _Sub:
    sid: str
    host: str
    callback: str
    service: str  # which state it follows (a key of Subscriptions.states)
    expires: float
    seq: int = 0
    sent: dict[str, str] | None = None


def propertyset(values: dict[str, str]) -> bytes:
    """The event body (UDA 1.1 §4.3.2)."""
    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    props = "".join(f"<e:property><{k}>{esc(v)}</{k}></e:property>" for k, v in values.items())
    return ('<?xml version="1.0"?>\r\n<e:propertyset xmlns:e="urn:schemas-upnp-org:event-1-0">'
            f"{props}</e:propertyset>\r\n").encode()


class Subscriptions:
    """Subscriptions to each service's evented state (``states``: service key -> a function
    giving its variables now). :meth:`run` sends the initial event of each new subscription
    and an event whenever a followed value changes (looked at every ``interval`` s)."""

    def __init__(self, states: dict[str, Callable[[], dict[str, str]]], *,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.states = states
        self.interval = interval
        self.clock = clock
        self.subs: dict[str, _Sub] = {}
        self._wake = asyncio.Event()
        self.sent = 0
        self.failed = 0

    def subscribe(self, service: str, host: str, callback: str, nt: str, sid: str,
                  timeout: str) -> tuple[str, int]:
        """A new subscription (``callback`` + ``nt``) or a renewal (``sid``); returns (SID,
        seconds granted). Raises :class:`GenaError` (400 both or neither, 412 unknown SID or
        a bad callback/NT, 503 over a bound)."""
        seconds = MAX_TIMEOUT
        if m := re.fullmatch(r"\s*Second-(\d{1,9})\s*", timeout or ""):
            seconds = min(MAX_TIMEOUT, max(MIN_TIMEOUT, int(m.group(1))))
        self._expire()
        if sid:
            if callback or nt:
                raise GenaError(400, "SID with CALLBACK or NT")
            sub = self.subs.get(sid.strip())
            if sub is None or sub.host != host or sub.service != service:
                raise GenaError(412, "no such subscription")
            sub.expires = self.clock() + seconds
            return sub.sid, seconds
        if nt.strip() != "upnp:event":
            raise GenaError(412, "NT must be upnp:event")
        urls = _CALLBACK_RE.findall(callback or "")
        url = next((u for u in urls if _host_of(u) == host), None)
        if url is None:
            raise GenaError(412, "CALLBACK must be an http:// URL on the subscriber's address")
        if len(self.subs) >= MAX_TOTAL or sum(
                1 for s in self.subs.values() if s.host == host) >= MAX_PER_HOST:
            raise GenaError(503, "too many subscriptions")
        sub = _Sub(f"uuid:{uuid.uuid4()}", host, url, service, self.clock() + seconds)
        self.subs[sub.sid] = sub
        self._wake.set()
        return sub.sid, seconds

    def unsubscribe(self, sid: str, host: str) -> None:
        """End ``host``'s subscription ``sid``; raises :class:`GenaError` 412 if none."""
        sub = self.subs.get(sid.strip())
        if sub is None or sub.host != host:
            raise GenaError(412, "no such subscription")
        del self.subs[sub.sid]

    def _expire(self) -> None:
        now = self.clock()
        for sid in [s.sid for s in self.subs.values() if s.expires <= now]:
            del self.subs[sid]

    async def run(self) -> None:
        """Send events until cancelled."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT),
                                         skip_auto_headers=("User-Agent",)) as http:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                self._wake.clear()
                self._expire()
                now_state = {k: f() for k, f in self.states.items()}
                sends = []
                for sub in list(self.subs.values()):
                    values = now_state[sub.service]
                    if sub.sent is None:
                        changed = values  # the initial event carries every variable
                    else:
                        changed = {k: v for k, v in values.items() if sub.sent.get(k) != v}
                    if changed:
                        sub.sent = dict(values)
                        sends.append(self._send(http, sub, changed))
                if sends:
                    await asyncio.gather(*sends)

    async def _send(self, http: aiohttp.ClientSession, sub: _Sub,
                    values: dict[str, str]) -> None:
        headers = {"CONTENT-TYPE": 'text/xml; charset="utf-8"', "NT": "upnp:event",
                   "NTS": "upnp:propchange", "SID": sub.sid, "SEQ": str(sub.seq)}
        sub.seq = sub.seq + 1 if sub.seq < 0xFFFFFFFF else 1
        try:
            async with http.request("NOTIFY", sub.callback, data=propertyset(values),
                                    headers=headers, allow_redirects=False) as resp:
                await resp.read()
            self.sent += 1
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.failed += 1
            log.debug("front: event to %s failed: %s", sub.callback, exc)


def _host_of(url: str) -> str:
    """The literal host of ``http://host[:port]/...`` as the HTTP client will connect to it
    ("" when not a literal IPv4 address, or with user info: ``http://<subscriber>:80@<any
    host>/`` named the subscriber to a split at the last colon while the NOTIFY went to the
    other host)."""
    try:
        parsed = yarl.URL(url)
    except ValueError:
        return ""
    host = parsed.host or ""
    if parsed.scheme != "http" or parsed.user is not None or parsed.password is not None \
            or "@" in parsed.raw_authority:
        return ""
    return host if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", host) else ""
