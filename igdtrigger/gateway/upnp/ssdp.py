"""SSDP, sans I/O: M-SEARCH requests, search replies, NOTIFY announcements and what they say
about the router we use (``NotifyTracker``: the one reading of SSDP announcements, UPnP Device
Architecture 2.0 §1.2-§1.3; ``ssdpwatch`` feeds it from a socket, ``soap.discover`` sends the
searches).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from igdtrigger.gateway.base import RouterChange, RouterChangeKind

__all__ = [
    "SEARCH_TARGETS", "SSDP_ADDR", "NotifyTracker", "SsdpNotify", "SsdpReply", "build_msearch",
    "parse_ssdp", "parse_ssdp_notify",
]


SSDP_ADDR = ("239.255.255.250", 1900)
SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
    "upnp:rootdevice",
)


def build_msearch(st: str, mx: int = 2) -> bytes:
    """An SSDP M-SEARCH for search target ``st``; ``mx``: seconds a device may wait to answer."""
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        "HOST: 239.255.255.250:1900\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {st}\r\n"
        "\r\n"
    ).encode()


@dataclass(frozen=True, slots=True)
class SsdpReply:
    """An answer to M-SEARCH: the description ``location``, search target, USN, server."""
    location: str
    st: str
    usn: str
    server: str
    boot_id: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def looks_like_igd(self) -> bool:
        """Does it name an InternetGatewayDevice or a WAN connection service?"""
        text = f"{self.st} {self.usn}"
        return any(k in text for k in ("InternetGatewayDevice", "WANIPConnection",
                                       "WANPPPConnection"))


def _headers(lines: Iterable[str]) -> dict[str, str]:
    """Header lines by lower-case name; garbage lines (async-upnp-client "DEFUNCT") skipped."""
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            headers[name.strip().lower()] = value.strip()
    return headers


def parse_ssdp(data: bytes) -> SsdpReply | None:
    """A search response or NOTIFY; ``None`` for anything else (never raises)."""
    if len(data) > 8192:
        return None
    try:
        text = data.decode("utf-8", "replace")
    except Exception:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    first = lines[0].strip().upper()
    if not (first.startswith("HTTP/1.") and " 200" in first) and not first.startswith("NOTIFY"):
        return None
    headers = _headers(lines[1:])
    if headers.get("nts", "ssdp:alive").lower() != "ssdp:alive":
        return None
    location = headers.get("location", "")
    if not re.match(r"^https?://", location, re.IGNORECASE):
        return None
    return SsdpReply(
        location=location,
        st=headers.get("st") or headers.get("nt", ""),
        usn=headers.get("usn", ""),
        server=headers.get("server", ""),
        boot_id=headers.get("bootid.upnp.org", ""),
        headers=headers,
    )


@dataclass(frozen=True, slots=True)
class SsdpNotify:
    """An SSDP NOTIFY (``ssdp:alive`` or ``ssdp:byebye``) as a router multicasts it."""

    alive: bool
    nt: str
    usn: str
    location: str  # empty for byebye
    boot_id: str

    @property
    def uuid(self) -> str:
        """The device UUID of the USN (lower case)."""
        return self.usn.split("::", 1)[0].strip().lower()

    @property
    def about_igd(self) -> bool:
        """Is the notification about an IGD or one of its WAN services?"""
        text = f"{self.nt} {self.usn}"
        return any(k in text for k in _IGD_PARTS)


_IGD_PARTS = ("InternetGatewayDevice", "WANDevice", "WANConnectionDevice", "WANIPConnection",
              "WANPPPConnection", "WANCommonInterfaceConfig", "Layer3Forwarding")


def parse_ssdp_notify(data: bytes) -> SsdpNotify | None:
    """A NOTIFY datagram; ``None`` for anything else or anything malformed (never raises)."""
    if len(data) > 8192 or not data[:7].upper().startswith(b"NOTIFY "):
        return None
    text = data.decode("utf-8", "replace")
    headers = _headers(text.replace("\r\n", "\n").split("\n")[1:])
    nts = headers.get("nts", "").lower()
    if nts not in ("ssdp:alive", "ssdp:byebye") or not headers.get("usn"):
        return None
    location = headers.get("location", "")
    if nts == "ssdp:alive" and not re.match(r"^https?://", location, re.IGNORECASE):
        return None
    return SsdpNotify(alive=nts == "ssdp:alive", nt=headers.get("nt", ""), usn=headers["usn"],
                      location=location if nts == "ssdp:alive" else "",
                      boot_id=headers.get("bootid.upnp.org", ""))


class NotifyTracker:
    """Sans-I/O: turns the gateway's NOTIFY stream into restart/move events.

    Only the connected IGD's own root device counts: datagrams from ``gateway_ip`` about IGD
    devices and services whose USN carries one of its UUIDs (``uuids``: the root device's UDN
    from its description; more are learned from announcements at ``location``). A router that
    announces two IGD roots at two locations every round (one per WAN, or a second UPnP stack)
    therefore moves nothing; a media server on the same box, or any other host, cannot trigger
    anything. The first alive sets the baseline; a burst of NOTIFYs (one per device and
    service) yields one event. Without any known UUID (no description UDN, nothing heard at
    ``location`` yet), a NOTIFY at another location is not trusted to be ours.
    """

    MAX_UUIDS = 16  # one per device of the IGD: root, WANDevice, WANConnectionDevice
    MAX_LOCATIONS = 4  # URLs our root was announced at (one device, several descriptions)

    def __init__(self, gateway_ip: str, location: str | None = None,
                 uuids: Iterable[str] = ()) -> None:
        self.gateway_ip = gateway_ip
        self.location = location or ""
        self.uuids: set[str] = {u.strip().lower() for u in uuids if u.strip()}
        self.boot_id = ""
        self.left = False  # a byebye was seen and no alive since
        # every URL our root was announced at: a root served at two URLs (an IGD:1 and an
        # IGD:2 description of one device) announces both every round, which is no move
        self.seen: list[str] = [self.location] if self.location else []

    def follow(self, location: str) -> None:
        """We now use ``location`` (after a move): remembered, and compared against."""
        self.location = location
        self._saw(location)

    def _saw(self, location: str) -> None:
        if location and location not in self.seen:
            self.seen = [*self.seen, location][-self.MAX_LOCATIONS:]

    def _ours(self, msg: SsdpNotify) -> bool:
        if msg.uuid in self.uuids:
            return True
        # nothing known yet (no location, no UUID): the first alive sets the baseline
        baseline = not self.location and not self.uuids
        if msg.alive and (baseline or (self.location and msg.location == self.location)):
            if len(self.uuids) < self.MAX_UUIDS:
                self.uuids.add(msg.uuid)  # the same description: the same IGD's devices
            return True
        return False

    def feed(self, data: bytes, source_ip: str) -> RouterChange | None:
        """One datagram from ``source_ip``: the change it shows (byebye, moved, rebooted), or
        ``None``. Only the default gateway's own IGD counts."""
        if source_ip != self.gateway_ip:
            return None
        msg = parse_ssdp_notify(data)
        if msg is None or not msg.about_igd:
            return None
        if not msg.alive:
            if self.left or (self.uuids and msg.uuid not in self.uuids):
                return None
            self.left = True
            return RouterChange(RouterChangeKind.LEAVING, "the router announced ssdp:byebye",
                                self.location)
        if urllib.parse.urlsplit(msg.location).hostname != self.gateway_ip:
            return None  # a description on another host: not the gateway's own IGD
        if not self._ours(msg):
            return None  # another IGD root on the router (a second WAN, a second stack)
        change: RouterChange | None = None
        if self.location and msg.location not in (self.location, *self.seen):
            change = RouterChange(RouterChangeKind.MOVED,
                                  f"the router now announces its IGD at {msg.location} "
                                  f"(was {self.location})", msg.location)
        elif self.boot_id and msg.boot_id and msg.boot_id != self.boot_id:
            change = RouterChange(RouterChangeKind.RESTARTED,
                                  f"the router rebooted (BOOTID.UPNP.ORG {self.boot_id} -> "
                                  f"{msg.boot_id})", msg.location)
        elif self.left:
            change = RouterChange(RouterChangeKind.RESTARTED,
                                  "the router said ssdp:byebye and is back", msg.location)
        self.left = False
        if change is not None or not self.location:
            self.location = msg.location
        self._saw(msg.location)
        if msg.boot_id:
            self.boot_id = msg.boot_id
        return change
