"""UPnP IGD backend of our own: SSDP and SOAP over plain asyncio streams, tolerant parsing.

Used where miniupnpc's strict description parser or service choice falls short (router-facts.md),
and as ``gateway.backend = "soap"``. Requests are serialised (the router sees one at a time),
bounded in time and size, and every failure becomes a ``GatewayError`` subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import (
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    NoSuchMapping,
    socket_fault,
)
from ..model import MappingSpec, Proto, RouterMapping
from ..netutil import default_gateway
from .base import GatewayInfo, Granted, is_public_address
from .igd import (
    SEARCH_TARGETS,
    SSDP_ADDR,
    IgdDescription,
    IgdService,
    MalformedReply,
    SsdpReply,
    UpnpFault,
    build_msearch,
    build_soap,
    fault_error,
    mapping_args,
    parse_description,
    parse_soap_response,
    parse_ssdp,
    pick,
)

log = logging.getLogger("igdtrigger.gateway.soap")

USER_AGENT = "igdtrigger/0.1 UPnP/1.1"
MAX_HEADERS = 16 * 1024
MAX_BODY = 256 * 1024


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes
    local_address: str


async def http_request(url: str, method: str = "GET", *, body: bytes = b"",
                       headers: dict[str, str] | None = None, timeout: float = 3.0,
                       limit: int = MAX_BODY, connect_to: str | None = None,
                       local_addr: str | None = None) -> HttpReply:
    """One HTTP/1.1 exchange (``Connection: close``), bounded in time and size.

    ``connect_to``: the address to connect to instead of the URL's host (an IPv6 link-local
    address with its ``%zone``); ``local_addr``: the source address to send from."""
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
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body  # one write: headers + body
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
        raise GatewayUnreachable(f"router did not answer {method} {url} within {timeout:g}s") \
            from None
    except OSError as exc:
        raise socket_fault(exc, f"router connection failed for {url}") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise GatewayUnreachable(f"router connection failed for {url}: {exc}") from None
    return HttpReply(status, hdrs, data, local)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADERS:
            raise ValueError("response headers too large")
        text = head.decode("iso-8859-1")
        first, _, rest = text.partition("\r\n")
        bits = first.split(" ", 2)
        if len(bits) < 2 or not bits[0].startswith("HTTP/") or not bits[1].isdecimal():
            raise ValueError(f"not an HTTP response: {first[:60]!r}")
        status = int(bits[1])
        if status == 100:  # Expect: 100-continue answered anyway
            continue
        hdrs: dict[str, str] = {}
        for line in rest.split("\r\n"):
            k, sep, v = line.partition(":")
            if sep:
                hdrs[k.strip().lower()] = v.strip()
        return status, hdrs


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


# --- SSDP discovery ----------------------------------------------------------------------------


class _SsdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_reply: Callable[[SsdpReply, str], None]) -> None:
        self.on_reply = on_reply

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = parse_ssdp(data)
        if reply is not None and reply.looks_like_igd:
            self.on_reply(reply, str(addr[0]))


def location_allowed(location: str, source: str, gateway: str | None) -> bool:
    """SSRF guard: trust a description URL only on the replying host or the default gateway."""
    host = urllib.parse.urlsplit(location).hostname or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name: never fetched from an unauthenticated SSDP reply
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified:
        return False
    return host in (source, gateway)


async def discover(timeout: float = 2.0, *, gateway: str | None = None,
                   settle: float = 0.1) -> list[tuple[SsdpReply, str]]:
    """Search for IGDs: unicast to the default gateway first, then multicast; several STs.

    Returns (reply, source address) for replies whose location passes ``location_allowed``,
    the default gateway's first. Finishes ``settle`` seconds after the first good reply.
    """
    gw = gateway or default_gateway()
    found: dict[str, tuple[SsdpReply, str]] = {}
    first = asyncio.Event()

    def on_reply(reply: SsdpReply, source: str) -> None:
        if not location_allowed(reply.location, source, gw):
            log.debug("ignoring SSDP reply from %s for %s", source, reply.location)
            return
        found.setdefault(reply.location, (reply, source))
        first.set()

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _SsdpProtocol(on_reply), local_addr=("0.0.0.0", 0), family=socket.AF_INET)
    try:
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        for st in SEARCH_TARGETS:
            if gw:
                transport.sendto(build_msearch(st), (gw, 1900))
        for st in SEARCH_TARGETS:
            transport.sendto(build_msearch(st), SSDP_ADDR)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await first.wait()
                await asyncio.sleep(settle)
    finally:
        transport.close()
    return sorted(found.values(), key=lambda rs: rs[1] != gw)


# --- the gateway -------------------------------------------------------------------------------


class SoapGateway:
    """A UPnP IGD spoken to directly: tolerant description parsing, SOAP over asyncio."""

    protocol = "upnp-igd"

    def __init__(self, url: str | None = None, *, discover_timeout: float = 2.0,
                 timeout: float = 3.0,
                 on_call: Callable[[str, float, bool], None] | None = None) -> None:
        self.url = url
        self.discover_timeout = discover_timeout
        self.timeout = timeout
        self.on_call = on_call
        self._lock = asyncio.Lock()
        self._info: GatewayInfo | None = None
        self._hint: str | None = None  # where the router last announced its IGD (SSDP NOTIFY)
        self._service: IgdService | None = None
        self.description: IgdDescription | None = None

    @property
    def info(self) -> GatewayInfo | None:
        return self._info

    @property
    def service(self) -> IgdService | None:
        return self._service

    def forget(self, location: str | None = None) -> None:
        """Reconnect on the next call (the router rebooted or moved); ``location``: where it
        now announces its description (used unless ``gateway.url`` pins one)."""
        self._info = None
        if location and self.url is None:
            self._hint = location

    async def connect(self) -> GatewayInfo:
        if self._info is not None:
            return self._info
        if self.url is None and self._hint is not None:
            hint, self._hint = self._hint, None
            try:
                return await self._connect_to(hint)
            except GatewayError as exc:
                log.info("router's announced IGD %s is not usable (%s): discovering", hint, exc)
        locations = [self.url] if self.url else [r.location for r, _ in
                                                 await discover(self.discover_timeout)]
        if not locations:
            raise GatewayNotFound(
                f"no UPnP router answered SSDP discovery within {self.discover_timeout:g}s; "
                "enable UPnP on the router, or set gateway.url to its description URL")
        errors: list[str] = []
        for loc in locations:
            try:
                return await self._connect_to(loc)
            except GatewayError as exc:
                errors.append(f"{loc}: {exc}")
        raise GatewayNotFound("no usable Internet Gateway Device: " + "; ".join(errors))

    async def _connect_to(self, location: str) -> GatewayInfo:
        reply = await http_request(location, timeout=self.timeout)
        if reply.status != 200:
            raise GatewayUnreachable(f"description {location} answered HTTP {reply.status}")
        desc = parse_description(reply.body, location)
        if not desc.services:
            raise GatewayNotFound(
                f"{location} ({desc.device_type or 'unknown device'}) offers no WANIPConnection "
                "or WANPPPConnection service")
        # Choose by what works: connected with a public address, then connected, then any.
        scored: list[tuple[int, int, IgdService, str]] = []
        for svc in desc.services:
            try:
                status = await self._action(svc, "GetStatusInfo", [])
                ext = await self._action(svc, "GetExternalIPAddress", [])
            except GatewayError as exc:
                log.debug("service %s at %s: %s", svc.service_type, svc.control_url, exc)
                continue
            connected = pick(status, "NewConnectionStatus").lower() in ("connected", "up")
            external = pick(ext, "NewExternalIPAddress")
            score = 0 if connected and is_public_address(external) else 1 if connected else 2
            scored.append((score, svc.rank, svc, external))
        if not scored:
            raise GatewayUnreachable(f"no WAN connection service at {location} answers")
        scored.sort(key=lambda t: (t[0], t[1]))
        _, _, svc, external = scored[0]
        self._service = svc
        self.description = desc
        self._info = GatewayInfo(
            protocol=self.protocol, location=location, local_address=reply.local_address,
            external_address=external, service_type=svc.service_type,
            server=reply.headers.get("server", ""),
            notes=() if is_public_address(external) else ("external address not public",),
        )
        return self._info

    async def _action(self, svc: IgdService, action: str, args: list[tuple[str, str]],
                      *, lease: int | None = None) -> dict[str, str]:
        body = build_soap(svc.service_type, action, args)
        headers = {"Content-Type": 'text/xml; charset="utf-8"',
                   "SOAPAction": f'"{svc.service_type}#{action}"'}
        t0 = time.perf_counter()
        ok = False
        try:
            async with self._lock:
                reply = await http_request(svc.control_url, "POST", body=body, headers=headers,
                                           timeout=self.timeout)
            if reply.status in (404, 405) and not reply.body.strip():
                raise GatewayUnreachable(
                    f"control URL {svc.control_url} answered HTTP {reply.status}: the router "
                    "may have restarted with new URLs")
            result = parse_soap_response(reply.status, reply.body, action)
            if isinstance(result, UpnpFault):
                raise fault_error(action, result, lease=lease)
            ok = True
            return result
        except GatewayUnreachable:
            self._info = None  # rediscover next time: new port or path after a reboot
            raise
        finally:
            if self.on_call is not None:
                self.on_call(action, time.perf_counter() - t0, ok)

    async def _ready(self) -> IgdService:
        if self._info is None or self._service is None:
            await self.connect()
        assert self._service is not None
        return self._service

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        svc = await self._ready()
        await self._action(svc, "AddPortMapping", mapping_args(
            spec.proto.value, spec.external_port, spec.internal_port, spec.internal_client,
            spec.description, lease), lease=lease)
        return Granted(spec.external_port, lease)

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """IGDv2 AddAnyPortMapping: the router picks the external port if ours is taken."""
        svc = await self._ready()
        out = await self._action(svc, "AddAnyPortMapping", mapping_args(
            spec.proto.value, spec.external_port, spec.internal_port, spec.internal_client,
            spec.description, lease), lease=lease)
        port = pick(out, "NewReservedPort", "NewExternalPort")
        if not port.isdecimal():
            raise MalformedReply(f"AddAnyPortMapping reply has no port ({out})")
        return Granted(int(port), lease)

    async def delete(self, proto: Proto, external_port: int) -> None:
        svc = await self._ready()
        await self._action(svc, "DeletePortMapping", [
            ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
            ("NewProtocol", proto.value)])

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        svc = await self._ready()
        try:
            out = await self._action(svc, "GetSpecificPortMappingEntry", [
                ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
                ("NewProtocol", proto.value)])
        except NoSuchMapping:
            return None
        return _mapping(proto, external_port, out)

    async def list(self, limit: int = 4096) -> list[RouterMapping]:
        svc = await self._ready()
        out: list[RouterMapping] = []
        for i in range(limit):
            try:
                entry = await self._action(svc, "GetGenericPortMappingEntry",
                                           [("NewPortMappingIndex", str(i))])
            except GatewayUnreachable:
                raise
            except GatewayError:
                break  # 713 past the end (or 714/402/500 on some routers)
            proto_s = pick(entry, "NewProtocol").upper()
            port_s = pick(entry, "NewExternalPort")
            if proto_s not in ("TCP", "UDP") or not port_s.isdecimal():
                continue
            out.append(_mapping(Proto(proto_s), int(port_s), entry))
        return out

    async def close(self) -> None:
        self._info = None


def _mapping(proto: Proto, port: int, out: dict[str, str]) -> RouterMapping:
    iport = pick(out, "NewInternalPort")
    lease = pick(out, "NewLeaseDuration")
    return RouterMapping(
        proto=proto,
        external_port=port,
        internal_client=pick(out, "NewInternalClient"),
        internal_port=int(iport) if iport.isdecimal() else 0,
        description=pick(out, "NewPortMappingDescription"),
        enabled=pick(out, "NewEnabled") not in ("0", "false"),
        lease_remaining=int(lease) if lease.isdecimal() else None,
    )
