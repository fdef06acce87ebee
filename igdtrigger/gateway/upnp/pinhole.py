"""IPv6 inbound pinholes through UPnP IGDv2's ``WANIPv6FirewallControl:1``.

There is no NAT on IPv6: a host's global address is reachable as it is, and what keeps inbound
traffic out is the router's firewall. A pinhole lets one protocol/port through to one address.

The rule every router enforces (miniupnpd's ``PinholeVerification``, the IGDv2 spec's
recommendation, miniupnp#731): the request must come *over IPv6, from the very address* the
pinhole is for. So requests go to the router's IPv6 address (the IPv6 default route's next hop,
usually link-local), on the port of its description URL, with the source address bound to the
address being opened. Machine-local, so pinholes are only ever for the machine igdtrigger runs on.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from igdtrigger.core.errors import GatewayNotFound, GatewayUnreachable
from igdtrigger.core.model import PinholeSpec
from igdtrigger.core.pinhole import FirewallInfo
from igdtrigger.gateway.upnp.codec import (
    FIREWALL_SERVICE,
    UpnpFault,
    fault_error,
    firewall_status,
    parse_description,
    parse_soap_response,
    pinhole_args,
    pinhole_uid,
)
from igdtrigger.gateway.upnp.http import DEFAULT_REQUESTER, Requester, soap_request
from igdtrigger.netutil import default_route

__all__ = [
    "FirewallClient", "FirewallInfo", "global_ipv6_addresses", "is_pinhole_address", "router_ipv6",
]


def router_ipv6() -> tuple[str, str] | None:
    """The IPv6 default route's next hop and its interface (netifaces), or ``None``."""
    return default_route(ipv6=True)


def global_ipv6_addresses(interface: str) -> list[str]:
    """This machine's global unicast IPv6 addresses on ``interface`` (no link-local, no ULA:
    those are not reachable from the internet, so a pinhole to them opens nothing useful)."""
    try:
        import netifaces  # lazily, as netutil does: without it there are no addresses to use
    except ImportError:
        return []
    try:
        entries: Any = netifaces.ifaddresses(interface).get(netifaces.AF_INET6, [])
    except Exception:
        return []
    out: list[str] = []
    for entry in entries:
        text = str(entry.get("addr", "")).split("%", 1)[0]
        try:
            addr = ipaddress.IPv6Address(text)
        except ValueError:
            continue
        if is_pinhole_address(addr) and str(addr) not in out:
            out.append(str(addr))
    return out


def is_pinhole_address(addr: ipaddress.IPv6Address) -> bool:
    """Can a pinhole to ``addr`` be reached from the internet (global unicast, not mapped IPv4)?"""
    return bool(addr.is_global and not addr.is_multicast and addr.ipv4_mapped is None)


class FirewallClient:
    """Speaks WANIPv6FirewallControl:1 to the router from this machine's IPv6 addresses."""

    def __init__(self, location: Callable[[], str | None], *, timeout: float = 3.0,
                 router: Callable[[], tuple[str, str] | None] = router_ipv6,
                 on_call: Callable[[str, float, bool], None] | None = None,
                 requester: Requester = DEFAULT_REQUESTER) -> None:
        self.location = location
        self.requester = requester  # what HTTP goes through (``http.Requester``)
        self.timeout = timeout
        self.router = router
        self.on_call = on_call
        self.info: FirewallInfo | None = None

    def interface(self) -> str | None:
        """The interface of the IPv6 default route, or ``None``."""
        r = self.router()
        return r[1] if r else None

    async def connect(self) -> FirewallInfo:
        """Find the firewall service and ask its status. Raises ``GatewayNotFound`` with the
        reason when there is nothing to talk to (no UPnP description, no service, no IPv6)."""
        self.info = None
        location = self.location()
        if not location:
            raise GatewayNotFound("the router is not spoken to over UPnP IGD, which IPv6 "
                                  "pinholes need (NAT-PMP/PCP gateway or none found yet)")
        reply = await self.requester.request(location, timeout=self.timeout)
        if reply.status != 200:
            raise GatewayUnreachable(f"description {location} answered HTTP {reply.status}")
        svc = parse_description(reply.body, location).firewall
        if svc is None:
            raise GatewayNotFound(f"the router's description {location} offers no "
                                  f"{FIREWALL_SERVICE.rsplit(':', 2)[-2]} service (IPv6 "
                                  "pinholes need an IGDv2 router with IPv6 enabled)")
        route = self.router()
        if route is None:
            raise GatewayNotFound("this machine has no IPv6 default route: no IPv6 to open")
        addr, iface = route
        parts = urllib.parse.urlsplit(svc.control_url)
        port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        scoped = ipaddress.IPv6Address(addr).is_link_local
        connect_to = f"{addr}%{iface}" if scoped else addr
        info = FirewallInfo(location, f"http://[{addr}]:{port}{path}", connect_to, False, False)
        self.info = info
        values = await self._action(info, "GetFirewallStatus", [], source=None)
        enabled, inbound = firewall_status(values)
        self.info = FirewallInfo(location, info.control_url, connect_to, enabled, inbound)
        return self.info

    async def _action(self, info: FirewallInfo, action: str, args: list[tuple[str, str]], *,
                      source: str | None) -> dict[str, str]:
        t0 = time.perf_counter()
        ok = False
        try:
            reply = await soap_request(self.requester, info.control_url, FIREWALL_SERVICE,
                                       action, args, timeout=self.timeout,
                                       connect_to=info.connect_to, local_addr=source)
            result = parse_soap_response(reply.status, reply.body, action)
            if isinstance(result, UpnpFault):
                raise fault_error(action, result)
            ok = True
            return result
        except GatewayUnreachable:
            self.info = None  # find it again next time
            raise
        finally:
            if self.on_call is not None:
                self.on_call(action, time.perf_counter() - t0, ok)

    def _ready(self) -> FirewallInfo:
        if self.info is None:
            raise GatewayUnreachable("the router's IPv6 firewall service is not connected")
        return self.info

    async def add(self, spec: PinholeSpec, lease: int) -> int:
        """Open (or extend: same arguments return the same pinhole) and return its UniqueID."""
        info = self._ready()
        values = await self._action(
            info, "AddPinhole", pinhole_args(spec.proto.value, spec.address, spec.port, lease),
            source=spec.address)
        return pinhole_uid(values)

    async def update(self, spec: PinholeSpec, uid: int, lease: int) -> None:
        """``UpdatePinhole``: a new lease (seconds) for pinhole ``uid``."""
        await self._action(self._ready(), "UpdatePinhole",
                           [("UniqueID", str(uid)), ("NewLeaseTime", str(lease))],
                           source=spec.address)

    async def delete(self, spec: PinholeSpec, uid: int) -> None:
        """``DeletePinhole`` for pinhole ``uid``."""
        await self._action(self._ready(), "DeletePinhole", [("UniqueID", str(uid))],
                           source=spec.address)

