"""UPnP IGD protocol, sans I/O: device descriptions, SOAP requests and responses, SSDP.

Tolerant of what real routers send (router-facts.md §2-§5): namespace-agnostic parsing by local
name, whitespace inside text nodes, URLBase anywhere (or absent, or with a trailing slash),
relative/absolute/query-string control URLs, WANIPConnection:1/:2, WANPPPConnection:1/:2 and the
legacy ``urn:dslforum-org`` types, SOAP faults with any prefix or capitalisation, attributes on
value elements, garbage around the error code. Strict where it matters: XML is parsed with
defusedxml (no DTDs, no entities), sizes are bounded, and every failure is a ``GatewayError``
subclass with a message that names the problem.

Shared by every UPnP backend (issue 11): ``fault_error`` is the one UPnP fault table (miniupnpc's
errors reach it through ``upnp.miniupnpc_code``), ``choose_service`` the one WAN service choice
(fed by ``soap.find_wan_service``), ``NotifyTracker`` the one reading of SSDP announcements.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from igdtrigger.core.errors import (
    DEVICE_DENIED_HINT,
    PINHOLE_SELF_HINT,
    SECURE_MODE_HINT,
    ActionFailed,
    GatewayError,
    InvalidArgs,
    LeaseRefused,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
    TableFull,
    UnsupportedAction,
)
from igdtrigger.core.errors import (
    MalformedReply as MalformedReply,  # the one class, re-exported here
)
from igdtrigger.core.pinhole import PINHOLE_MAX_LEASE
from igdtrigger.gateway.base import counts_as_public

MAX_DESCRIPTION = 256 * 1024
MAX_SOAP = 256 * 1024
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENC = "http://schemas.xmlsoap.org/soap/encoding/"

# Connection services we can map ports through, best first (tailscale/miniupnpc order).
_SERVICE_RANK = {
    "urn:schemas-upnp-org:service:WANIPConnection:2": 0,
    "urn:schemas-upnp-org:service:WANIPConnection:1": 1,
    "urn:schemas-upnp-org:service:WANPPPConnection:2": 2,  # non-standard (Orange Livebox)
    "urn:schemas-upnp-org:service:WANPPPConnection:1": 3,
    "urn:dslforum-org:service:WANIPConnection:1": 4,
    "urn:dslforum-org:service:WANPPPConnection:1": 5,
}


# IPv6 inbound pinholes (IGDv2): a separate service next to the connection services.
FIREWALL_SERVICE = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _text(el: Element | None) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


def _child(el: Element, name: str) -> Element | None:
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def _parse_xml(data: bytes, what: str, limit: int) -> Element:
    if len(data) > limit:
        raise MalformedReply(what, f"larger than {limit // 1024} KiB; refusing to parse it")
    # Some routers put whitespace or a BOM before the declaration; some send bytes after the
    # root element. Trim both so the parser sees one document.
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    end = text.rfind(b">")
    if end >= 0:
        text = text[: end + 1]
    try:
        root: Element = DET.fromstring(text, forbid_dtd=True, forbid_entities=True,
                                       forbid_external=True)
    except DefusedXmlException as exc:
        raise MalformedReply(what, f"uses forbidden XML features ({type(exc).__name__})") from None
    except Exception as exc:  # ParseError and the odd ValueError from broken encodings
        raise MalformedReply(what, f"not well-formed XML: {exc}") from None
    return root


@dataclass(frozen=True, slots=True)
class IgdService:
    """A WAN connection service found in a device description."""

    service_type: str
    control_url: str
    service_id: str = ""
    device_path: tuple[str, ...] = ()  # friendly names / UDNs down to the owning device
    order: int = 0  # position in the description (document order), 0 first

    @property
    def rank(self) -> int:
        return _SERVICE_RANK.get(self.service_type, 99)

    @property
    def version(self) -> int:
        return 2 if self.service_type.endswith(":2") else 1

    @property
    def is_ppp(self) -> bool:
        return "PPP" in self.service_type


@dataclass(frozen=True, slots=True)
class IgdDescription:
    location: str
    device_type: str
    friendly_name: str
    services: tuple[IgdService, ...]
    url_base: str = ""
    firewall: IgdService | None = None  # WANIPv6FirewallControl:1 (IPv6 pinholes), if offered
    root_uuid: str = ""  # UDN of the root device ("uuid:..."), lower case; "" if absent

    def miniupnpc_service(self) -> IgdService | None:
        """The service miniupnpc's description parser uses: the first
        ``urn:schemas-upnp-org:service:WANIPConnection:*`` or ``WANPPPConnection:*`` in
        document order, connected or not (miniupnpc ``igd_desc_parse.c`` IGDendelt, "first";
        ``GetUPNPUrls`` builds the control URL from it)."""
        usable = [s for s in self.services if s.service_type.startswith((
            "urn:schemas-upnp-org:service:WANIPConnection:",
            "urn:schemas-upnp-org:service:WANPPPConnection:"))]
        return min(usable, key=lambda s: s.order) if usable else None


def _resolve(base: str, url: str) -> str:
    url = url.strip()
    if not url:
        return ""
    if re.match(r"^https?://", url, re.IGNORECASE):
        return url
    if not url.startswith("/"):
        url = "/" + url  # goupnp: relative without a leading slash means from the root
    parts = urllib.parse.urlsplit(base)
    path, _, query = url.partition("?")
    path = re.sub(r"/{2,}", "/", path)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def parse_description(data: bytes, location: str) -> IgdDescription:
    """Find every WAN connection service in a root device description."""
    root = _parse_xml(data, f"device description at {location}", MAX_DESCRIPTION)
    url_base = ""
    for el in root.iter():
        if _local(el.tag) == "URLBase":
            url_base = _text(el)
            break
    base = url_base if re.match(r"^https?://", url_base, re.IGNORECASE) else location
    services: list[IgdService] = []
    firewalls: list[IgdService] = []

    def walk(device: Element, path: tuple[str, ...]) -> None:
        name = _text(_child(device, "friendlyName")) or _text(_child(device, "UDN"))
        here = (*path, name)
        slist = _child(device, "serviceList")
        if slist is not None:
            for svc in slist:
                if _local(svc.tag) != "service":
                    continue
                stype = re.sub(r"\s+", "", _text(_child(svc, "serviceType")))
                if stype not in _SERVICE_RANK and stype != FIREWALL_SERVICE:
                    continue
                ctl = _resolve(base, _text(_child(svc, "controlURL")))
                if ctl:
                    found = IgdService(stype, ctl, _text(_child(svc, "serviceId")), here,
                                       len(services) + len(firewalls))
                    (firewalls if stype == FIREWALL_SERVICE else services).append(found)
        dlist = _child(device, "deviceList")
        if dlist is not None:
            for sub in dlist:
                if _local(sub.tag) == "device":
                    walk(sub, here)

    top = _child(root, "device")
    if top is None:
        raise MalformedReply(f"device description at {location}", "no <device> element")
    walk(top, ())
    services.sort(key=lambda s: s.rank)
    return IgdDescription(
        location=location,
        device_type=re.sub(r"\s+", "", _text(_child(top, "deviceType"))),
        friendly_name=_text(_child(top, "friendlyName")),
        services=tuple(services),
        url_base=url_base,
        firewall=firewalls[0] if firewalls else None,
        root_uuid=_text(_child(top, "UDN")).lower(),
    )


@dataclass(frozen=True, slots=True)
class ServiceProbe:
    """What one WAN connection service said when asked GetStatusInfo and GetExternalIPAddress
    (``answered`` False: it failed to answer; ``error`` says how)."""

    service: IgdService
    answered: bool
    status: str = ""  # NewConnectionStatus: "Connected", "Disconnected", "Up", ...
    external_address: str = ""  # NewExternalIPAddress ("" when unknown)
    error: str = ""

    @property
    def connected(self) -> bool:
        return self.answered and self.status.strip().lower() in ("connected", "up")

    @property
    def score(self) -> int:
        """0 connected with a public external address, 1 connected with a usable (non-empty,
        specified) one, 2 connected without one, 3 not connected, 4 no answer."""
        if not self.answered:
            return 4
        if not self.connected:
            return 3
        ext = self.external_address.strip()
        if counts_as_public(ext):
            return 0
        return 1 if ext and ext != "0.0.0.0" else 2


def choose_service(probes: Sequence[ServiceProbe]) -> ServiceProbe | None:
    """The one service choice every UPnP backend makes: the connected WAN service with a
    usable external address first, then by service type (WANIPConnection:2 first), then by
    document order. ``None`` when no service answered. A disconnected service that accepts
    adds is never chosen over a connected one: mappings there are useless (tailscale#8364,
    router-facts §10 "multi-WAN")."""
    answered = [p for p in probes if p.answered]
    if not answered:
        return None
    return min(answered, key=lambda p: (p.score, p.service.rank, p.service.order))


# --- SOAP --------------------------------------------------------------------------------------


def _esc(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def build_soap(service_type: str, action: str, args: Sequence[tuple[str, str]]) -> bytes:
    """A SOAP 1.1 request body as routers expect it: no leading whitespace, all args in order."""
    inner = "".join(f"<{k}>{_esc(v)}</{k}>" for k, v in args)
    return (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}">'
        f'<s:Body><u:{action} xmlns:u="{_esc(service_type)}">{inner}</u:{action}></s:Body>'
        "</s:Envelope>\r\n"
    ).encode()


@dataclass(frozen=True, slots=True)
class UpnpFault:
    code: int | None
    description: str


_ERRCODE_RE = re.compile(rb"<(?:\w+:)?errorCode[^>]*>\s*(-?\d+)\s*<", re.IGNORECASE)
_ERRDESC_RE = re.compile(rb"<(?:\w+:)?errorDescription[^>]*>([^<]{0,200})", re.IGNORECASE)


def parse_soap_response(status: int, body: bytes, action: str) -> dict[str, str] | UpnpFault:
    """Out-arguments of a successful action, or the fault. Raises ``MalformedReply``."""
    if len(body) > MAX_SOAP:
        raise MalformedReply(action, f"reply larger than {MAX_SOAP // 1024} KiB")
    try:
        root: Element | None = _parse_xml(body, f"{action} reply", MAX_SOAP)
    except MalformedReply:
        root = None
    if root is not None:
        for el in root.iter():
            name = _local(el.tag)
            if name == "Fault" or name == "UPnPError":
                code_el = next((e for e in el.iter() if _local(e.tag) == "errorCode"), None)
                desc_el = next((e for e in el.iter() if _local(e.tag) == "errorDescription"),
                               None)
                code_s = _text(code_el)
                digits = code_s[1:] if code_s.startswith("-") else code_s
                code = int(code_s) if digits.isdecimal() else None
                return UpnpFault(code, _text(desc_el) or "UPnPError")
            if name == f"{action}Response":
                return {_local(c.tag): _text(c) for c in el}
    # Not parseable (garbage bytes, truncated, unbalanced tags): dig the error code out.
    m = _ERRCODE_RE.search(body)
    if m is not None:
        d = _ERRDESC_RE.search(body)
        desc = d.group(1).decode("utf-8", "replace").strip() if d else "UPnPError"
        return UpnpFault(int(m.group(1)), desc or "UPnPError")
    if status >= 400:
        return UpnpFault(None, f"HTTP {status} without a UPnP error")
    raise MalformedReply(action, f"router's reply has no {action}Response element")


_NAMES = {
    401: "Invalid Action", 402: "Invalid Args", 501: "Action Failed",
    602: "Optional Action Not Implemented",
    606: "Action not authorized", 713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray", 716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry", 724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported", 728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms", 730: "PortMappingNotFound",
    701: "PinholeSpaceExhausted", 702: "FirewallDisabled", 703: "InboundPinholeNotAllowed",
    704: "NoSuchEntry",
}

_CONFLICT_HINT = "another host or program holds this external port"


def fault_error(action: str, fault: UpnpFault, *, lease: int | None = None,
                for_self: bool | None = None, igd_version: int | None = None) -> GatewayError:
    """The one UPnP fault table: turn a fault into our error type, for every UPnP backend (our
    SOAP client, and miniupnpc once ``upnp.miniupnpc_code`` has turned its text into the code).

    The same condition has different codes by vendor and version (router-facts §0), so the type
    says what we can act on and the hint what the user can do. ``lease``: the lease asked (an
    add), only described here (a 402 is not "timed leases refused" until a lease-0 retry works:
    ``base.add_with_lease_fallback``). ``for_self``: the mapping's internal client is the host
    asking: a 606/718 then is a router denying UPnP to this device (FRITZ!Box), not secure mode.
    ``igd_version``: 1 or 2 when known (718 is a secure-mode denial only on IGDv1).
    """
    code, desc = fault.code, fault.description or _NAMES.get(fault.code or 0, "UPnPError")
    if code == 606 and "Pinhole" in action:
        return NotAuthorized(action, code, desc, PINHOLE_SELF_HINT)
    if code == 704 and "Pinhole" in action:
        return NoSuchMapping(action, code, desc)
    if code == 606:
        return NotAuthorized(action, code, desc,
                             DEVICE_DENIED_HINT if for_self else SECURE_MODE_HINT)
    if code == 718:
        if for_self:
            return MappingConflict(action, code, desc, f"{_CONFLICT_HINT}, or {DEVICE_DENIED_HINT}")
        if igd_version == 2:
            return MappingConflict(action, code, desc, _CONFLICT_HINT)
        # IGDv1 miniupnpd also answers 718 for secure-mode/permission denials (router-facts §0).
        return MappingConflict(action, code, desc,
                               f"{_CONFLICT_HINT}, or (IGDv1) {SECURE_MODE_HINT}")
    if code == 729:
        return MappingConflict(action, code, desc, _CONFLICT_HINT)
    if code == 725:
        return LeaseRefused(action, code, desc)
    if code == 402:
        asked = f" (lease {lease}s asked)" if lease else ""
        return InvalidArgs(action, code, desc + asked)
    if code in (713, 714, 730):
        return NoSuchMapping(action, code, desc)
    if code in (401, 602):
        return UnsupportedAction(action, code, desc)
    if code == 728:
        return TableFull(action, code, desc, "the router's mapping table is full")
    return ActionFailed(action, code, desc)


# --- SSDP --------------------------------------------------------------------------------------

SSDP_ADDR = ("239.255.255.250", 1900)
SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
    "upnp:rootdevice",
)


def build_msearch(st: str, mx: int = 2) -> bytes:
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
    location: str
    st: str
    usn: str
    server: str
    boot_id: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def looks_like_igd(self) -> bool:
        text = f"{self.st} {self.usn}"
        return any(k in text for k in ("InternetGatewayDevice", "WANIPConnection",
                                       "WANPPPConnection"))


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
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            continue  # garbage header lines (async-upnp-client "DEFUNCT")
        headers[name.strip().lower()] = value.strip()
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
        return self.usn.split("::", 1)[0].strip().lower()

    @property
    def about_igd(self) -> bool:
        text = f"{self.nt} {self.usn}"
        return any(k in text for k in _IGD_PARTS)


_IGD_PARTS = ("InternetGatewayDevice", "WANDevice", "WANConnectionDevice", "WANIPConnection",
              "WANPPPConnection", "WANCommonInterfaceConfig", "Layer3Forwarding")


def parse_ssdp_notify(data: bytes) -> SsdpNotify | None:
    """A NOTIFY datagram; ``None`` for anything else or anything malformed (never raises)."""
    if len(data) > 8192 or not data[:7].upper().startswith(b"NOTIFY "):
        return None
    text = data.decode("utf-8", "replace")
    headers: dict[str, str] = {}
    for line in text.replace("\r\n", "\n").split("\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            headers[name.strip().lower()] = value.strip()
    nts = headers.get("nts", "").lower()
    if nts not in ("ssdp:alive", "ssdp:byebye") or not headers.get("usn"):
        return None
    location = headers.get("location", "")
    if nts == "ssdp:alive" and not re.match(r"^https?://", location, re.IGNORECASE):
        return None
    return SsdpNotify(alive=nts == "ssdp:alive", nt=headers.get("nt", ""), usn=headers["usn"],
                      location=location if nts == "ssdp:alive" else "",
                      boot_id=headers.get("bootid.upnp.org", ""))


class RouterChangeKind(enum.StrEnum):
    RESTARTED = "restarted"  # new BOOTID, or back after a byebye: its mappings are probably gone
    MOVED = "moved"  # the IGD's description is at a new URL (new port after a reboot)
    LEAVING = "leaving"  # ssdp:byebye: going down


@dataclass(frozen=True, slots=True)
class RouterChange:
    kind: RouterChangeKind
    reason: str
    location: str


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


def mapping_args(proto: str, external_port: int, internal_port: int, client: str,
                 description: str, lease: int) -> list[tuple[str, str]]:
    """AddPortMapping's eight IN arguments, in spec order, NewRemoteHost empty (not 0.0.0.0)."""
    return [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", proto.upper()),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", client),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", str(lease)),
    ]


def pinhole_args(proto: str, client: str, port: int, lease: int) -> list[tuple[str, str]]:
    """AddPinhole's six IN arguments: any remote host and port, to ``client``:``port``.

    ``Protocol`` is the IANA number (6, 17), not a name; ``LeaseTime`` is 1..86400."""
    number = {"TCP": 6, "UDP": 17}.get(proto.upper())
    if number is None:
        raise ValueError(f"pinholes are made for TCP or UDP, not {proto!r}")
    if not 1 <= lease <= PINHOLE_MAX_LEASE:
        raise ValueError(f"pinhole lease {lease} is outside 1..{PINHOLE_MAX_LEASE} s")
    return [
        ("RemoteHost", ""),
        ("RemotePort", "0"),
        ("InternalClient", client),
        ("InternalPort", str(port)),
        ("Protocol", str(number)),
        ("LeaseTime", str(lease)),
    ]


def reserved_port(values: dict[str, str]) -> int:
    """The external port of an AddAnyPortMapping answer (``NewReservedPort``; some routers
    say ``NewExternalPort``), 1..65535. Raises ``MalformedReply``."""
    text = pick(values, "NewReservedPort", "NewExternalPort").strip()
    if not text.isdecimal() or not 0 < int(text) < 65536:
        raise MalformedReply("AddAnyPortMapping", f"reply has no usable port ({text[:20]!r})")
    return int(text)


def pinhole_uid(values: dict[str, str]) -> int:
    """The ``UniqueID`` of an AddPinhole answer (0..65535). Raises ``MalformedReply``."""
    text = pick(values, "UniqueID").strip()
    if not text.isdecimal() or int(text) > 65535:
        raise MalformedReply("AddPinhole", f"reply has no usable UniqueID ({text[:20]!r})")
    return int(text)


def firewall_status(values: dict[str, str]) -> tuple[bool, bool]:
    """GetFirewallStatus: (firewall enabled, inbound pinholes allowed)."""
    def flag(name: str) -> bool:
        return pick(values, name).strip().lower() in ("1", "true", "yes")
    return flag("FirewallEnabled"), flag("InboundPinholeAllowed")


def pick(values: dict[str, str], *names: str) -> str:
    """The first present of several spellings (``NewUptime`` / ``NewUpTime``)."""
    lowered = {k.lower(): v for k, v in values.items()}
    for n in names:
        if n.lower() in lowered:
            return lowered[n.lower()]
    return ""


def ints(values: Iterable[Any]) -> list[int]:
    out = []
    for v in values:
        try:
            out.append(int(str(v).strip()))
        except ValueError:
            continue
    return out
