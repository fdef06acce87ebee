"""The IGD front's UPnP server: SSDP search answers and NOTIFYs, the device description, SOAP.

LAN apps find it as an InternetGatewayDevice:2 (v1 searches answered too, see
:mod:`igdtrigger.front.igdxml`) on the served interfaces and ask for port mappings as they would
ask a router; every mapping request goes to :class:`~igdtrigger.front.manager.FrontManager`
(policy, leases, the upstream router), whose refusals become the standard faults: 606 (the allow
lines), 718 (another client's address in secure mode, as miniupnpd answers; a live mapping of
another client), 716 (wildcard external port), 714 (no such mapping), 713 (index past the end),
728 (no port left), 501 (the upstream router did not map it), 402 (bad arguments); never 725:
leases are ours to give.

Bounded: SOAP bodies at most ``igdxml.MAX_REQUEST`` bytes, connections per LAN host and in all
through :class:`~igdtrigger.api.httpguard.ConnectionGuard` (headers within 5 s), SSDP answers per
sender rate-limited, datagrams over 2 KiB ignored. No DNS: every address is a literal (a
``NewInternalClient`` that is not an IPv4 literal is 402).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import logging
import random
import socket
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from igdtrigger.api.httpguard import (
    Acceptor,
    ConnectionGuard,
    ConnectionLimits,
    listen_socket,
    start_servers,
)
from igdtrigger.core import trace
from igdtrigger.core.model import Proto
from igdtrigger.core.version import __version__
from igdtrigger.front import igdxml as X
from igdtrigger.front.gena import GenaError, Subscriptions
from igdtrigger.front.manager import (
    ClientRequest,
    FrontManager,
    FrontMapping,
    FrontProtocol,
    Grant,
    Refusal,
    RefusalKind,
)
from igdtrigger.netutil import default_gateway

__all__ = ["FAULT_FOR", "ServedAddress", "UpnpFront", "served_addresses"]

log = logging.getLogger("igdtrigger.front")

SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
FRONT_LIMITS = ConnectionLimits(header_timeout=5.0, per_client=8, total=128, local=16)
SEARCHES_PER_SECOND = 10  # per sender; more are ignored
SEARCHES_TOTAL_PER_SECOND = 100  # from every sender together (forged senders: no amplifier)
MAX_SENDERS = 1024  # senders remembered for that rate limit
MAX_LISTING = 1000  # GetListOfPortMappings entries at most
BODY_TIMEOUT = 5.0  # s to send a SOAP body once the headers are in
CONFIG_ID = 1  # the description's version (UDA 1.1 CONFIGID.UPNP.ORG): bumped when it changes
# GetListOfPortMappings' entry names where they differ from the actions' (IGDv2 WANIPConnection
# A_ARG_TYPE_PortListing, as miniupnpd writes them and miniupnpc's portlistingparse reads them)
_LISTING_NAMES = {"NewPortMappingDescription": "NewDescription",
                  "NewLeaseDuration": "NewLeaseTime"}
FAULT_FOR = {RefusalKind.NOT_AUTHORIZED: 606, RefusalKind.OTHER_CLIENT: 718,
             RefusalKind.CONFLICT: 718, RefusalKind.NO_RESOURCES: 728,
             RefusalKind.UPSTREAM: 501, RefusalKind.NO_SUCH: 714}


@dataclass(frozen=True, slots=True)
class ServedAddress:
    """One served interface's IPv4 address and network."""

    interface: str
    address: str
    network: ipaddress.IPv4Network


def served_addresses(names: tuple[str, ...]) -> list[ServedAddress]:
    """The IPv4 addresses of the named interfaces (empty ``names``: every non-loopback interface
    with a private address, but not the one towards the default gateway: the upstream side is
    never served). Raises ``OSError`` naming an interface that does not exist or has no IPv4
    address."""
    import netifaces  # lazy, as netutil: only when the front starts

    wanted = list(names) or [i for i in netifaces.interfaces() if i != "lo"]
    upstream = None if names else default_gateway()
    out: list[ServedAddress] = []
    for name in wanted:
        if name not in netifaces.interfaces():
            raise OSError(f"[front] interfaces: no interface {name!r}")
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            net = ipaddress.IPv4Network(f"{entry['addr']}/{entry.get('netmask', '32')}",
                                        strict=False)
            addr = ipaddress.IPv4Address(entry["addr"])
            towards_upstream = upstream is not None and ipaddress.ip_address(upstream) in net
            if names or (addr.is_private and not addr.is_loopback and not towards_upstream):
                out.append(ServedAddress(name, str(addr), net))
        if names and not any(s.interface == name for s in out):
            raise OSError(f"[front] interfaces: {name!r} has no IPv4 address")
    return out


def _udn(tag: str) -> str:
    """A stable UDN per instance; its last hex digit 0 (the sub-devices use 1 and 2)."""
    digest = hashlib.sha256(f"igdtrigger-front {tag}".encode()).hexdigest()
    return f"uuid:{uuid.UUID(digest[:31] + '0')}"


def _port(args: Mapping[str, str], name: str, *, zero: bool = False) -> int:
    text = args.get(name, "").strip()
    value = X.decimal(text, 65535)
    if value is None or value < (0 if zero else 1):
        raise X.SoapError(402, f"{name} {text[:20]!r} is not a port")
    return value


def _proto(args: Mapping[str, str]) -> Proto:
    text = args.get("NewProtocol", "").strip().upper()
    if text not in ("TCP", "UDP"):
        raise X.SoapError(402, f"NewProtocol {text[:20]!r} is not TCP or UDP")
    return Proto(text)


def _remote_host(args: Mapping[str, str]) -> None:
    if args.get("NewRemoteHost", "").strip() not in ("", "*"):
        raise X.SoapError(726, "only the wildcard remote host is supported")


class UpnpFront:
    """The UPnP IGD server on the served addresses. ``start`` raises ``OSError`` when a socket
    cannot be had; ``stop`` says byebye and closes everything."""

    def __init__(self, manager: FrontManager, addresses: list[ServedAddress], *, tag: str,
                 http_port: int = 0, ssdp_port: int = SSDP_PORT, version: int = 2,
                 notify_to: tuple[str, int] = (SSDP_GROUP, SSDP_PORT),
                 wall: Callable[[], float] = time.time) -> None:
        self.manager = manager
        self.addresses = addresses
        self.http_port = http_port
        self.ssdp_port = ssdp_port
        self.notify_to = notify_to
        self.udn = _udn(tag)
        self.version = version  # the IGD version described and announced (1 or 2)
        self.boot_id = int(wall()) & 0x7FFFFFFF
        self.server = f"Linux/1 UPnP/1.1 igdtrigger/{__version__}"
        self.guard = ConnectionGuard(FRONT_LIMITS)
        self.ports: dict[str, int] = {}  # served address -> its HTTP port
        self.serving = False
        self.faults: collections.Counter[int] = collections.Counter()
        self._runner: web.AppRunner | None = None
        self._acceptors: list[Acceptor] = []
        self._ssdp: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._searches: dict[str, tuple[float, int]] = {}
        self.events = Subscriptions({X.CONTROL_PATH: self._wanip_state,
                                     X.CIF_CONTROL_PATH: self._cif_state})

    # --- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (HTTP on each served address, SSDP on the group port) and announce."""
        app = web.Application(client_max_size=X.MAX_REQUEST)
        app.router.add_get(X.DESC_PATH, self._description)
        app.router.add_get(X.SCPD_PATH, self._scpd)
        app.router.add_get(X.CIF_SCPD_PATH, self._scpd)
        app.router.add_post(X.CONTROL_PATH, self._control)
        app.router.add_post(X.CIF_CONTROL_PATH, self._control)
        for path in (X.CONTROL_PATH, X.CIF_CONTROL_PATH):
            app.router.add_route("SUBSCRIBE", f"{path}/evt", self._subscribe)
            app.router.add_route("UNSUBSCRIBE", f"{path}/evt", self._subscribe)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=FRONT_LIMITS.header_timeout)
        await self._runner.setup()
        assert self._runner.server is not None
        try:
            for served in self.addresses:
                sock = listen_socket(served.address, self.http_port)
                self.ports[served.address] = sock.getsockname()[1]
                self._acceptors += await start_servers(self._runner.server, self.guard, [sock])
            self._ssdp = await self._open_ssdp()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._announce())
        self._spawn(self.events.run())
        self.serving = True
        log.info("front: UPnP IGD serving on %s", ", ".join(self.locations()))

    async def stop(self) -> None:
        """Say byebye and close every socket and task."""
        was = self.serving
        self.serving = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if was:
            self._send_notifies(alive=False)
        if self._ssdp is not None:
            self._ssdp.close()
            self._ssdp = None
        for acc in self._acceptors:
            acc.close()
        self._acceptors = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def locations(self) -> list[str]:
        """The description URL on each served address."""
        return [self._location(a.address) for a in self.addresses if a.address in self.ports]

    def _location(self, address: str) -> str:
        return f"http://{address}:{self.ports.get(address, 0)}{X.DESC_PATH}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- SSDP ----------------------------------------------------------------------------------

    async def _open_ssdp(self) -> asyncio.DatagramTransport:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(AttributeError, OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("0.0.0.0", self.ssdp_port))
            for served in self.addresses:
                mreq = socket.inet_aton(SSDP_GROUP) + socket.inet_aton(served.address)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                except OSError as exc:  # loopback has no multicast: unicast searches still work
                    log.info("front: no SSDP multicast on %s (%s): unicast M-SEARCH only",
                             served.interface, exc.strerror)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _SsdpProtocol(self), sock=sock)
        return transport

    def _served_for(self, sender: str) -> ServedAddress | None:
        try:
            addr = ipaddress.IPv4Address(sender)
        except ValueError:
            return None
        for served in self.addresses:
            if addr in served.network or str(addr) == served.address:
                return served
        return None

    def on_search(self, data: bytes, sender: tuple[str, int]) -> None:
        """An SSDP datagram: answer an M-SEARCH for one of our types from a served network."""
        parsed = X.parse_msearch(data)
        served = self._served_for(sender[0])
        if parsed is None or served is None or not self._within_rate(sender[0]) \
                or not self._within_rate(""):  # "": every sender together
            return
        st, mx = parsed
        answers = X.search_answer(st, self.udn, self.version)
        if not answers:
            return
        delay = random.uniform(0.0, min(max(mx, 0), 5) * 0.02)  # noqa: S311 (jitter)
        location = self._location(served.address)
        datagrams = [X.search_response(t, usn, location, self.boot_id, CONFIG_ID, self.server)
                     for t, usn in answers]
        asyncio.get_running_loop().call_later(delay, self._send_to, datagrams, sender)

    def _within_rate(self, host: str) -> bool:
        now = time.monotonic()
        start, count = self._searches.get(host, (now, 0))
        if now - start >= 1.0:
            start, count = now, 0
        if count >= (SEARCHES_TOTAL_PER_SECOND if host == "" else SEARCHES_PER_SECOND):
            return False
        if host not in self._searches and len(self._searches) >= MAX_SENDERS:
            self._searches.clear()
        self._searches[host] = (start, count + 1)
        return True

    def _send_to(self, datagrams: list[bytes], dest: tuple[str, int]) -> None:
        if self._ssdp is None:
            return
        for dgram in datagrams:
            with contextlib.suppress(OSError):
                self._ssdp.sendto(dgram, dest)

    async def _announce(self) -> None:
        """ssdp:alive at start and every half max-age (UDA 1.1 §1.2.2)."""
        while True:
            self._send_notifies(alive=True)
            await asyncio.sleep(X.SSDP_MAX_AGE / 2 - random.uniform(0, 60))  # noqa: S311

    def _send_notifies(self, *, alive: bool) -> None:
        for served in self.addresses:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            except OSError:
                return
            with sock:
                try:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                    socket.inet_aton(served.address))
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL,
                                    struct.pack("b", 2))
                    for nt, usn in X.search_targets(self.udn, self.version):
                        sock.sendto(X.notify(nt, usn, alive=alive,
                                             location=self._location(served.address),
                                             boot_id=self.boot_id, config_id=CONFIG_ID,
                                             server=self.server), self.notify_to)
                except OSError as exc:
                    log.debug("front: NOTIFY on %s failed: %s", served.interface, exc)

    # --- HTTP ----------------------------------------------------------------------------------

    def _base_url(self, request: web.Request) -> str:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host = sockname[0] if sockname else self.addresses[0].address
        return f"http://{host}:{self.ports.get(host, sockname[1] if sockname else 0)}/"

    async def _description(self, request: web.Request) -> web.Response:
        body = X.device_description(self.udn, "igdtrigger IGD front", self._base_url(request),
                                    CONFIG_ID, self.version)
        return web.Response(body=body, content_type="text/xml", charset="utf-8",
                            headers={"SERVER": self.server})

    async def _scpd(self, request: web.Request) -> web.Response:
        actions = (X.wanip_actions(self.version) if request.path == X.SCPD_PATH
                   else X.CIF_ACTIONS)
        return web.Response(body=X.scpd(actions, CONFIG_ID), content_type="text/xml",
                            charset="utf-8")

    async def _control(self, request: web.Request) -> web.Response:
        if trace.ON:
            trace.mark("soap", first=True)
        client = request.remote or ""
        if self._served_for(client) is None:  # routed in from elsewhere (the WAN side)
            return self._fault(606, f"{client} is not on a served network")
        if request.content_length is not None and request.content_length > X.MAX_REQUEST:
            return self._fault(402, "request too large")
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
        except web.HTTPRequestEntityTooLarge:
            return self._fault(402, "request too large")
        except (TimeoutError, ConnectionError):
            return self._fault(402, "request body not sent in time")
        try:
            req = X.parse_soap_request(body, request.headers.get("SOAPACTION", ""))
            out = await self.dispatch(req, client)
        except X.SoapError as exc:
            return self._fault(exc.code, exc.detail)
        return web.Response(body=X.response_body(req, out), content_type="text/xml",
                            charset="utf-8", headers={"SERVER": self.server, "EXT": ""})

    def _fault(self, code: int, detail: str) -> web.Response:
        self.faults[code] += 1
        return web.Response(status=500, body=X.fault_body(code, detail),
                            content_type="text/xml", charset="utf-8")

    # --- GENA events (front/gena.py) -----------------------------------------------------------

    def _wanip_state(self) -> dict[str, str]:
        info = self.manager.service.gateway.info
        up = self.manager.service.pipeline.mapper.gateway_up
        return {"PossibleConnectionTypes": "IP_Routed",
                "ConnectionStatus": "Connected" if up else "Disconnected",
                "ExternalIPAddress": info.external_address.strip()
                if info is not None and info.external_known else "",
                "PortMappingNumberOfEntries": str(len(self.manager.mappings()))}

    def _cif_state(self) -> dict[str, str]:
        return {"PhysicalLinkStatus": "Up" if self.manager.service.pipeline.mapper.gateway_up
                else "Down"}

    async def _subscribe(self, request: web.Request) -> web.Response:
        service = request.path.removesuffix("/evt")
        h = request.headers
        if self._served_for(request.remote or "") is None:
            return web.Response(status=403)
        try:
            if request.method == "UNSUBSCRIBE":
                self.events.unsubscribe(h.get("SID", ""), request.remote or "")
                return web.Response(status=200)
            sid, seconds = self.events.subscribe(
                service, request.remote or "", h.get("CALLBACK", ""), h.get("NT", ""),
                h.get("SID", ""), h.get("TIMEOUT", ""))
        except GenaError as exc:
            return web.Response(status=exc.status, text=str(exc))
        return web.Response(status=200, headers={"SID": sid, "TIMEOUT": f"Second-{seconds}",
                                                 "SERVER": self.server})

    # --- SOAP actions --------------------------------------------------------------------------

    async def dispatch(self, req: X.SoapRequest, client: str) -> list[tuple[str, str]]:
        """The out arguments of ``req`` from ``client``; raises ``igdxml.SoapError``."""
        a = req.args
        m = self.manager
        if self.version < 2 and req.action in X.V2_ONLY:
            raise X.SoapError(401, f"{req.action} is an IGDv2 action ([front] igd_version = 1)")
        match req.action:
            case "AddPortMapping" | "AddAnyPortMapping":
                return await self._add(req, client)
            case "DeletePortMapping":
                _remote_host(a)
                refusal = await m.delete(FrontProtocol.UPNP, client,
                                         _port(a, "NewExternalPort"), _proto(a))
                if refusal is not None:
                    raise X.SoapError(714 if refusal.kind is RefusalKind.NO_SUCH else 606,
                                      refusal.reason)
                return []
            case "GetSpecificPortMappingEntry":
                _remote_host(a)
                found = m.lookup(_port(a, "NewExternalPort"), _proto(a))
                if found is None:
                    raise X.SoapError(714)
                return self._entry(found)[3:]
            case "GetGenericPortMappingEntry":
                text = a.get("NewPortMappingIndex", "")
                if not (text.strip().isascii() and text.strip().isdigit()):
                    raise X.SoapError(402, "NewPortMappingIndex is not a number")
                index = X.decimal(text, MAX_LISTING * 1000)  # None: past any end there is
                listed = m.mappings()
                if index is None or index >= len(listed):
                    raise X.SoapError(713)
                return self._entry(listed[index])
            case "GetListOfPortMappings":
                listed = self._in_range(a, client)[:self._count(a)]
                return [("NewPortListing", X.port_listing(
                    [{_LISTING_NAMES.get(k, k): v for k, v in self._entry(e)} for e in listed]))]
            case "DeletePortMappingRange":
                for e in self._in_range(a, client):
                    await m.delete(FrontProtocol.UPNP, client, e.grant.external_port,
                                   e.request.proto)
                return []
            case "GetExternalIPAddress":
                return [("NewExternalIPAddress", await m.external_address() or "")]
            case "GetStatusInfo":
                up = m.service.pipeline.mapper.gateway_up
                return [("NewConnectionStatus", "Connected" if up else "Disconnected"),
                        ("NewLastConnectionError", "ERROR_NONE"),
                        ("NewUptime", str(m.epoch()))]
            case "GetConnectionTypeInfo":
                return [("NewConnectionType", "IP_Routed"),
                        ("NewPossibleConnectionTypes", "IP_Routed")]
            case "GetCommonLinkProperties":
                up = m.service.pipeline.mapper.gateway_up
                return [("NewWANAccessType", "Ethernet"), ("NewLayer1UpstreamMaxBitRate", "0"),
                        ("NewLayer1DownstreamMaxBitRate", "0"),
                        ("NewPhysicalLinkStatus", "Up" if up else "Down")]
            case _ if req.action in X.CIF_ACTIONS:  # traffic counters: not ours to know
                return [(X.CIF_ACTIONS[req.action][1][0], "0")]
        raise X.SoapError(401)

    async def _add(self, req: X.SoapRequest, client: str) -> list[tuple[str, str]]:
        a = req.args
        _remote_host(a)
        external = _port(a, "NewExternalPort", zero=True)
        anyport = req.action == "AddAnyPortMapping"
        if external == 0 and not anyport:
            raise X.SoapError(716)
        internal = _port(a, "NewInternalPort")
        proto = _proto(a)
        target = a.get("NewInternalClient", "").strip() or client
        try:
            target = str(ipaddress.IPv4Address(target))  # a literal: never a name to look up
        except ValueError:
            raise X.SoapError(402, f"NewInternalClient {target[:40]!r} is not an IPv4 "
                              "address") from None
        if a.get("NewEnabled", "1").strip().lower() not in ("1", "true", "yes"):
            raise X.SoapError(402, "disabled port mappings are not supported")
        lease_s = a.get("NewLeaseDuration", "0").strip() or "0"
        lease = X.decimal(lease_s, 604800)
        if lease is None:
            raise X.SoapError(402, f"NewLeaseDuration {lease_s[:20]!r} is not 0-604800")
        result = await self.manager.add(ClientRequest(
            protocol=FrontProtocol.UPNP, client=client, internal_client=target,
            internal_port=internal, external_port=external, proto=proto,
            lease=float(lease), description=a.get("NewPortMappingDescription", ""),
            allow_alternative=anyport))
        if isinstance(result, Refusal):
            raise X.SoapError(FAULT_FOR[result.kind], result.reason)
        assert isinstance(result, Grant)
        return [("NewReservedPort", str(result.external_port))] if anyport else []

    def _lease_left(self, m: FrontMapping) -> int:
        """Seconds until it ends if nothing uses it (the lease, or sooner idle_timeout: a
        client renewing then keeps it); 0 for a lease-0 mapping (held while in use)."""
        if m.request.lease == 0:
            return 0
        act = self.manager.service.pipeline.engine.activations.get(m.activation_id)
        end = min(m.lease_end, act.expires) if act is not None else m.lease_end
        return max(1, int(end - self.manager.clock()))

    def _entry(self, m: FrontMapping) -> list[tuple[str, str]]:
        r = m.request
        return [("NewRemoteHost", ""), ("NewExternalPort", str(m.grant.external_port)),
                ("NewProtocol", r.proto.value), ("NewInternalPort", str(r.internal_port)),
                ("NewInternalClient", r.internal_client), ("NewEnabled", "1"),
                ("NewPortMappingDescription", r.description),
                ("NewLeaseDuration", str(self._lease_left(m)))]

    def _in_range(self, a: Mapping[str, str], client: str) -> list[FrontMapping]:
        """GetListOfPortMappings/DeletePortMappingRange's selection (IGDv2 §2.5.17-18): the
        mappings of ``NewProtocol`` in ``NewStartPort``-``NewEndPort``, only the requester's
        unless ``NewManage`` (and secure mode is off). 733 for a range that runs backwards,
        730 when none."""
        first, last = _port(a, "NewStartPort", zero=True), _port(a, "NewEndPort", zero=True)
        if first > last:
            raise X.SoapError(733, "NewStartPort is above NewEndPort")
        proto = _proto(a)
        manage = a.get("NewManage", "0").strip().lower() in ("1", "true", "yes") \
            and not self.manager.settings.secure_mode
        found = [m for m in self.manager.mappings()
                 if m.request.proto is proto and first <= m.grant.external_port <= last
                 and (manage or m.request.internal_client == client)]
        if not found:
            raise X.SoapError(730)
        return found

    @staticmethod
    def _count(a: Mapping[str, str]) -> int:
        count = X.decimal(a.get("NewNumberOfPorts", "0"), MAX_LISTING)
        return count if count else MAX_LISTING


class _SsdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, front: UpnpFront) -> None:
        self.front = front

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.front.on_search(data, addr)
