"""IPv6 triggers, IPv4 mappings: which IPv4 LAN address belongs to the host behind an IPv6 flow.

A dual-stack game reaching its server over IPv6 is still a trigger: the ports to open are the
router's IPv4 port mappings, so they must point at the *same machine's* IPv4 address. For this
host's own IPv6 addresses that is our LAN address; for another LAN host (the service running on
the router) it is the IPv4 neighbour with the same link-layer (MAC) address as the IPv6 source.

``parse_neighbors`` is pure (netlink RTM_NEWNEIGH messages in, (address, MAC) pairs out) and
``HostMap`` takes its readers as arguments, so both are tested without sockets. The readers
here (``read_neighbors`` over an ``NETLINK_ROUTE`` dump, ``own_ipv6_addresses`` via netifaces)
are cheap: the dump of a home network's neighbour table takes well under a millisecond, and
both are re-read at most every few seconds, only when an IPv6 source is not yet known.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable

__all__ = [
    "NDA_DST", "NDA_LLADDR", "NETLINK_ROUTE", "NLMSG_DONE", "NLMSG_ERROR", "NLM_F_DUMP",
    "NLM_F_REQUEST", "NUD_FAILED", "NUD_INCOMPLETE", "RTM_GETNEIGH", "RTM_NEWNEIGH", "HostMap",
    "Neighbor", "own_ipv6_addresses", "parse_neighbors", "read_neighbors",
]

log = logging.getLogger("igdtrigger.detect")

Neighbor = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, bytes]

NETLINK_ROUTE = 0
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLMSG_ERROR = 2
NDA_DST = 1
NDA_LLADDR = 2
NUD_FAILED = 0x20
NUD_INCOMPLETE = 0x01
_NLMSG = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTA = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_neighbors(data: bytes) -> tuple[list[Neighbor], bool]:
    """(neighbours with a link-layer address, whether the dump is done) from one datagram.
    Malformed parts are skipped; never raises."""
    out: list[Neighbor] = []
    done = False
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            break
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            done = True
        elif mtype == RTM_NEWNEIGH and length >= _NLMSG.size + _NDMSG.size:
            family, _ifindex, state, _nflags, _ntype = _NDMSG.unpack_from(data, off + _NLMSG.size)
            addr: bytes | None = None
            mac: bytes | None = None
            a = off + _NLMSG.size + _NDMSG.size
            end = off + length
            while a + _RTA.size <= end:
                rlen, rtype = _RTA.unpack_from(data, a)
                if rlen < _RTA.size or a + rlen > end:
                    break
                value = data[a + _RTA.size:a + rlen]
                if rtype == NDA_DST:
                    addr = value
                elif rtype == NDA_LLADDR:
                    mac = value
                a += _align(rlen)
            if addr is not None and mac and not state & (NUD_FAILED | NUD_INCOMPLETE):
                with contextlib.suppress(ValueError):
                    if family == socket.AF_INET and len(addr) == 4:
                        out.append((ipaddress.IPv4Address(addr), mac))
                    elif family == socket.AF_INET6 and len(addr) == 16:
                        out.append((ipaddress.IPv6Address(addr), mac))
        off += _align(length)
    return out, done


def read_neighbors(timeout: float = 0.5) -> list[Neighbor]:
    """This network namespace's neighbour table (Linux; empty elsewhere or on any error)."""
    af_netlink = getattr(socket, "AF_NETLINK", None)
    if af_netlink is None:
        return []
    out: list[Neighbor] = []
    try:
        with socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
            sock.settimeout(timeout)
            sock.bind((0, 0))
            body = _NDMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            sock.send(_NLMSG.pack(_NLMSG.size + len(body), RTM_GETNEIGH,
                                  NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
            for _ in range(10000):
                found, done = parse_neighbors(sock.recv(65536))
                out.extend(found)
                if done:
                    break
    except OSError as exc:
        log.debug("reading the neighbour table failed: %s", exc)
    return out


def own_ipv6_addresses() -> set[ipaddress.IPv6Address]:
    """Every IPv6 address configured on this host (via netifaces)."""
    out: set[ipaddress.IPv6Address] = set()
    try:
        import netifaces  # lazily, as netutil does: without it no address is known (caught below)

        for iface in netifaces.interfaces():
            for entry in netifaces.ifaddresses(iface).get(netifaces.AF_INET6, []):
                with contextlib.suppress(ValueError, KeyError):
                    out.add(ipaddress.IPv6Address(str(entry["addr"]).split("%", 1)[0]))
    except Exception as exc:  # a broken interface table must not break the service
        log.debug("listing this host's IPv6 addresses failed: %s", exc)
    return out


class HostMap:
    """IPv6 source -> the same host's IPv4 LAN address, or None if it can't be known."""

    def __init__(
        self,
        own_ipv4: Callable[[], str | None],
        *,
        clock: Callable[[], float],
        neighbors: Callable[[], Iterable[Neighbor]] = read_neighbors,
        own_ipv6: Callable[[], set[ipaddress.IPv6Address]] = own_ipv6_addresses,
        refresh_every: float = 5.0,
    ) -> None:
        self.own_ipv4 = own_ipv4
        self.clock = clock
        self._read_neighbors = neighbors
        self._read_own = own_ipv6
        self.refresh_every = refresh_every
        self._own: set[ipaddress.IPv6Address] = set()
        self._v6_mac: dict[ipaddress.IPv6Address, bytes] = {}
        self._mac_v4: dict[bytes, ipaddress.IPv4Address] = {}
        self._addr_mac: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, bytes] = {}
        self._refreshed = -float("inf")
        self.unresolved = 0  # IPv6 triggers dropped: no IPv4 address known for their host

    def _refresh(self) -> None:
        self._refreshed = self.clock()
        self._own = self._read_own()
        v6_mac: dict[ipaddress.IPv6Address, bytes] = {}
        mac_v4: dict[bytes, ipaddress.IPv4Address] = {}
        addr_mac: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, bytes] = {}
        for addr, mac in self._read_neighbors():
            addr_mac[addr] = mac
            if isinstance(addr, ipaddress.IPv6Address):
                v6_mac[addr] = mac
            elif addr.is_private and not addr.is_loopback:
                mac_v4.setdefault(mac, addr)
        self._v6_mac, self._mac_v4, self._addr_mac = v6_mac, mac_v4, addr_mac

    def origin_of(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The link-layer address the neighbour table binds ``addr`` to (``"aa:bb:..."``), or
        None. Forged source addresses have no entry (or the forger's own MAC), so the engine
        bounds detected activations per origin. Re-reads the table at most every
        ``refresh_every`` seconds, so a flood of unknown sources costs nothing more."""
        mac = self._addr_mac.get(addr)
        if mac is None and self.clock() - self._refreshed >= self.refresh_every:
            self._refresh()
            mac = self._addr_mac.get(addr)
        return mac.hex(":") if mac else None

    def _lookup(self, addr: ipaddress.IPv6Address) -> str | None:
        if addr in self._own:
            return self.own_ipv4()
        mac = self._v6_mac.get(addr)
        v4 = self._mac_v4.get(mac) if mac is not None else None
        return str(v4) if v4 is not None else None

    def ipv4_for(self, addr: ipaddress.IPv6Address) -> str | None:
        """The IPv4 address of the LAN host owning IPv6 ``addr`` (an IPv4-mapped address directly,
        else by the neighbour table, re-read at most every ``refresh_every`` seconds), or
        ``None``."""
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        found = self._lookup(addr)
        if found is None and self.clock() - self._refreshed >= self.refresh_every:
            self._refresh()
            found = self._lookup(addr)
        if found is None:
            self.unresolved += 1
            log.debug("IPv6 trigger from %s: no IPv4 address known for that host", addr)
        return found
