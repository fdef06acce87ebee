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
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from igdtrigger.core.errors import (
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    NoSuchMapping,
)
from igdtrigger.core.model import MappingSpec, Proto, RouterMapping
from igdtrigger.gateway.base import (
    Capability,
    GatewayInfo,
    Granted,
    add_with_lease_fallback,
    counts_as_public,
    metered,
    unsupported,
)
from igdtrigger.gateway.upnp.codec import (
    IgdDescription,
    IgdService,
    ServiceProbe,
    UpnpFault,
    build_soap,
    choose_service,
    fault_error,
    mapping_args,
    parse_description,
    parse_soap_response,
    pick,
    reserved_port,
)
from igdtrigger.gateway.upnp.http import (
    DEFAULT_REQUESTER,
    HttpReply,
    Requester,
    http_exchange,
    soap_headers,
    soap_request,
)
from igdtrigger.gateway.upnp.ssdp import (
    SEARCH_TARGETS,
    SSDP_ADDR,
    SsdpReply,
    build_msearch,
    parse_ssdp,
)
from igdtrigger.netutil import default_gateway

__all__ = [
    "GET_SPECIFIC", "ChosenService", "ChosenServiceState",
    "SoapCall", "SoapGateway", "capabilities_of", "discover", "find_wan_service",
    "location_allowed", "probe_service", "read_mapping", "read_mapping_blocking", "read_table",
    "soap_call", "soap_call_blocking",
]

log = logging.getLogger("igdtrigger.gateway.upnp.soap")

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


# --- SOAP actions and the service choice ----------------------------------------------------------


async def soap_call(svc: IgdService, action: str, args: list[tuple[str, str]], *,
                    timeout: float, lease: int | None = None, for_self: bool | None = None,
                    requester: Requester = DEFAULT_REQUESTER) -> dict[str, str]:
    """One SOAP action on ``svc``: its out-arguments, or the typed error (``fault_error``).

    404/405 with an empty body: the control URL is gone (router restarted with new URLs):
    ``GatewayUnreachable``. Any other HTTP error without a UPnP fault (a bare 400) is an
    ``ActionFailed`` without a code."""
    reply = await soap_request(requester, svc.control_url, svc.service_type, action, args,
                               timeout=timeout)
    return _soap_result(svc, action, reply, lease=lease, for_self=for_self)


def soap_call_blocking(svc: IgdService, action: str, args: list[tuple[str, str]], *,
                       timeout: float) -> dict[str, str]:
    """``soap_call`` on a blocking socket (``http.http_exchange``), for a worker thread."""
    reply = http_exchange(svc.control_url, "POST",
                          body=build_soap(svc.service_type, action, args),
                          headers=soap_headers(svc.service_type, action), timeout=timeout)
    return _soap_result(svc, action, reply)


def _soap_result(svc: IgdService, action: str, reply: HttpReply, *, lease: int | None = None,
                 for_self: bool | None = None) -> dict[str, str]:
    if reply.status in (404, 405) and not reply.body.strip():
        raise GatewayUnreachable(
            f"control URL {svc.control_url} answered HTTP {reply.status}: the router "
            "may have restarted with new URLs")
    result = parse_soap_response(reply.status, reply.body, action)
    if isinstance(result, UpnpFault):
        raise fault_error(action, result, lease=lease, for_self=for_self,
                          igd_version=svc.version)
    return result


async def probe_service(svc: IgdService, timeout: float,
                        requester: Requester = DEFAULT_REQUESTER) -> ServiceProbe:
    """Ask one WAN connection service for its status and external address."""
    try:
        status = await soap_call(svc, "GetStatusInfo", [], timeout=timeout, requester=requester)
        ext = await soap_call(svc, "GetExternalIPAddress", [], timeout=timeout,
                              requester=requester)
    except GatewayError as exc:
        log.debug("service %s at %s: %s", svc.service_type, svc.control_url, exc)
        return ServiceProbe(svc, False, error=str(exc))
    return ServiceProbe(svc, True, pick(status, "NewConnectionStatus"),
                        pick(ext, "NewExternalIPAddress").strip())


@dataclass(frozen=True, slots=True)
class ChosenService:
    """The outcome of ``find_wan_service``: the description, the chosen service's probe, every
    probe, and the HTTP reply the description came in (local address, Server header)."""

    description: IgdDescription
    chosen: ServiceProbe
    probes: tuple[ServiceProbe, ...]
    reply: HttpReply

    def info(self, protocol: str, backend: str) -> GatewayInfo:
        """The ``GatewayInfo`` this choice gives, for ``protocol`` through ``backend``."""
        ext = self.chosen.external_address
        return GatewayInfo(
            protocol=protocol, location=self.description.location,
            local_address=self.reply.local_address, external_address=ext,
            service_type=self.chosen.service.service_type,
            server=self.reply.headers.get("server", ""),
            notes=() if counts_as_public(ext, self.description.public_stand_in)
            else ("external address not public",),
            control_url=self.chosen.service.control_url,
            root_uuid=self.description.root_uuid, backend=backend,
            public_stand_in=self.description.public_stand_in)


async def find_wan_service(location: str, timeout: float,
                           requester: Requester = DEFAULT_REQUESTER) -> ChosenService:
    """Fetch the description at ``location``, ask every WAN connection service, and choose one
    with ``igd.choose_service``: the one service choice of every UPnP backend (our SOAP client
    uses it, and the miniupnpc backend refuses a router where miniupnpc would use another).
    Raises ``GatewayNotFound`` (no WAN service) or ``GatewayUnreachable`` (none answers)."""
    reply = await requester.request(location, timeout=timeout)
    if reply.status != 200:
        raise GatewayUnreachable(f"description {location} answered HTTP {reply.status}")
    desc = parse_description(reply.body, location)
    if not desc.services:
        raise GatewayNotFound(
            f"{location} ({desc.device_type or 'unknown device'}) offers no WANIPConnection "
            "or WANPPPConnection service")
    probes = tuple([replace(await probe_service(svc, timeout, requester),
                            public_stand_in=desc.public_stand_in) for svc in desc.services])
    chosen = choose_service(probes)
    if chosen is None:
        raise GatewayUnreachable(f"no WAN connection service at {location} answers ("
                                 + "; ".join(p.error for p in probes) + ")")
    if len(probes) > 1:
        log.info("WAN services at %s: %s; using %s", location, ", ".join(
            f"{p.service.control_url} {p.status or 'no answer'} {p.external_address or '-'}"
            for p in probes), chosen.service.control_url)
    return ChosenService(desc, chosen, probes, reply)


def capabilities_of(desc: IgdDescription | None, svc: IgdService | None
                    ) -> frozenset[Capability]:
    """What a UPnP IGD offers: listing always, add-any on IGDv2 services, pinholes when the
    description has WANIPv6FirewallControl."""
    if svc is None:
        return frozenset()
    caps = {Capability.LIST}
    if svc.version == 2:
        caps.add(Capability.ADD_ANY)
    if desc is not None and desc.firewall is not None:
        caps.add(Capability.PINHOLES)
    return frozenset(caps)


# --- the gateway -------------------------------------------------------------------------------


class ChosenServiceState:
    """What both UPnP backends keep about the service ``find_wan_service`` chose, and what
    follows from it: capabilities, and whether a mapping is for the host asking."""

    url: str | None = None  # the description URL ``gateway.url`` pins, else found by SSDP
    _info: GatewayInfo | None = None
    _hint: str | None = None  # where the router last announced its IGD (SSDP NOTIFY)
    _service: IgdService | None = None
    description: IgdDescription | None = None

    @property
    def info(self) -> GatewayInfo | None:
        """What the last ``connect`` found, or ``None`` before it (or after ``forget``)."""
        return self._info

    @property
    def service(self) -> IgdService | None:
        """The WAN connection service in use."""
        return self._service

    def forget(self, location: str | None = None) -> None:
        """Reconnect on the next call (the router rebooted or moved); ``location``: where it
        now announces its description (used unless ``gateway.url`` pins one)."""
        self._info = None
        if location and self.url is None:
            self._hint = location

    def _take_hint(self) -> str | None:
        """The announced location to try first, once (``None`` when ``gateway.url`` pins one)."""
        if self.url is not None:
            return None
        hint, self._hint = self._hint, None
        return hint

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What the chosen service supports (empty before ``connect``)."""
        return capabilities_of(self.description, self._service) if self._info else frozenset()

    def _for_self(self, spec: MappingSpec) -> bool | None:
        info = self._info
        return None if info is None else spec.internal_client == info.local_address


class SoapGateway(ChosenServiceState):
    """A UPnP IGD spoken to directly: tolerant description parsing, SOAP over asyncio."""

    protocol = "upnp-igd"

    def __init__(self, url: str | None = None, *, discover_timeout: float = 2.0,
                 timeout: float = 3.0,
                 on_call: Callable[[str, float, bool], None] | None = None,
                 requester: Requester | None = None) -> None:
        """``requester``: what HTTP goes through (``http.Requester``; default: real sockets)."""
        self.url = url
        self.requester = requester or DEFAULT_REQUESTER
        self.discover_timeout = discover_timeout
        self.timeout = timeout
        self.on_call = on_call
        self._lock = asyncio.Lock()
        self._info: GatewayInfo | None = None
        self._hint: str | None = None
        self._service: IgdService | None = None
        self.description: IgdDescription | None = None

    async def connect(self) -> GatewayInfo:
        """Discover (or use ``url``), read the description, choose the WAN service; raises
        ``GatewayNotFound`` or ``GatewayUnreachable``."""
        if self._info is not None:
            return self._info
        if (hint := self._take_hint()) is not None:
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
        found = await find_wan_service(location, self.timeout, self.requester)
        self._service = found.chosen.service
        self.description = found.description
        self._info = found.info(self.protocol, "soap")
        return self._info

    async def _action(self, svc: IgdService, action: str, args: list[tuple[str, str]],
                      *, lease: int | None = None, for_self: bool | None = None
                      ) -> dict[str, str]:
        try:
            async with self._lock:
                return await metered(self.on_call, action, soap_call(
                    svc, action, args, timeout=self.timeout, lease=lease, for_self=for_self,
                    requester=self.requester))
        except GatewayUnreachable:
            self._info = None  # rediscover next time: new port or path after a reboot
            raise

    async def _ready(self) -> IgdService:
        if self._info is None or self._service is None:
            await self.connect()
        assert self._service is not None
        return self._service

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """``AddPortMapping``; a timed lease refused (725, or 402 on some routers) is retried
        once as permanent (``base.add_with_lease_fallback``)."""
        svc = await self._ready()

        async def once(asked: int) -> Granted:
            await self._action(svc, "AddPortMapping", mapping_args(
                spec.proto.value, spec.external_port, spec.internal_port, spec.internal_client,
                spec.description, asked), lease=asked, for_self=self._for_self(spec))
            return Granted(spec.external_port, asked)

        return await add_with_lease_fallback(once, lease)

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """IGDv2 AddAnyPortMapping: the router picks the external port if ours is taken."""
        svc = await self._ready()
        if Capability.ADD_ANY not in self.capabilities:
            raise unsupported("AddAnyPortMapping", f"{svc.service_type} has no "
                              "AddAnyPortMapping (IGDv2 only)")

        async def once(asked: int) -> Granted:
            out = await self._action(svc, "AddAnyPortMapping", mapping_args(
                spec.proto.value, spec.external_port, spec.internal_port, spec.internal_client,
                spec.description, asked), lease=asked, for_self=self._for_self(spec))
            return Granted(reserved_port(out), asked)

        return await add_with_lease_fallback(once, lease)

    async def delete(self, proto: Proto, external_port: int) -> None:
        """``DeletePortMapping``; raises ``NoSuchMapping`` when the router has none (faults 713,
        714, 730)."""
        svc = await self._ready()
        await self._action(svc, "DeletePortMapping", [
            ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
            ("NewProtocol", proto.value)])

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """``GetSpecificPortMappingEntry``: the mapping, or ``None`` when there is none."""
        svc = await self._ready()
        return await read_mapping(svc, proto, external_port, timeout=self.timeout,
                                  call=self._action)

    async def list(self, limit: int = 4096) -> list[RouterMapping]:
        """The router's table, at most ``limit`` entries."""
        svc = await self._ready()
        return await read_table(svc, limit, timeout=self.timeout, call=self._action)

    async def close(self) -> None:
        """Forget the connection (no socket is kept open)."""
        self._info = None


SoapCall = Callable[[IgdService, str, list[tuple[str, str]]], Awaitable[dict[str, str]]]


async def read_mapping(svc: IgdService, proto: Proto, external_port: int, *, timeout: float,
                       call: SoapCall | None = None) -> RouterMapping | None:
    """GetSpecificPortMappingEntry: the router's entry, or ``None`` (714 and kin). Shared by
    both UPnP backends. ``call``: how to send (a backend's serialised, metered one)."""
    send = call or (lambda s, a, args: soap_call(s, a, args, timeout=timeout))
    try:
        out = await send(svc, GET_SPECIFIC, _lookup_args(proto, external_port))
    except NoSuchMapping:
        return None
    return _mapping(proto, external_port, out)


def read_mapping_blocking(svc: IgdService, proto: Proto, external_port: int, *,
                          timeout: float) -> RouterMapping | None:
    """``read_mapping`` on a blocking socket, for a worker thread: the entry, ``None`` for "no
    such entry" (714 and kin, ``NoSuchMapping``); any other failure raises its
    ``GatewayError`` (a failed lookup is never taken for a free port)."""
    try:
        out = soap_call_blocking(svc, GET_SPECIFIC, _lookup_args(proto, external_port),
                                 timeout=timeout)
    except NoSuchMapping:
        return None
    return _mapping(proto, external_port, out)


GET_SPECIFIC = "GetSpecificPortMappingEntry"


def _lookup_args(proto: Proto, external_port: int) -> list[tuple[str, str]]:
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
            ("NewProtocol", proto.value)]


async def read_table(svc: IgdService, limit: int, *, timeout: float,
                     call: SoapCall | None = None) -> list[RouterMapping]:
    """The router's table by GetGenericPortMappingEntry, index by index, until the router
    answers an error (713 past the end; others use 714/730/402/501) or ``limit``. Rows that
    are not TCP/UDP with a port (placeholder rows, Sagemcom) are skipped. Shared by both UPnP
    backends."""
    send = call or (lambda s, a, args: soap_call(s, a, args, timeout=timeout))
    out: list[RouterMapping] = []
    for i in range(limit):
        try:
            entry = await send(svc, "GetGenericPortMappingEntry",
                               [("NewPortMappingIndex", str(i))])
        except GatewayUnreachable:
            raise
        except GatewayError:
            break  # past the end: 713 (714/730/402/501 on some routers)
        proto_s = pick(entry, "NewProtocol").upper()
        port_s = pick(entry, "NewExternalPort")
        if proto_s not in ("TCP", "UDP") or not port_s.isdecimal():
            continue
        out.append(_mapping(Proto(proto_s), int(port_s), entry))
    return out


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
