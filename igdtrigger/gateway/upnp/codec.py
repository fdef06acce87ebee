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

import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

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

__all__ = [
    "ERROR_DESCRIPTIONS", "FIREWALL_SERVICE", "MAX_DESCRIPTION", "MAX_SOAP", "PINHOLE_MAX_LEASE",
    "SOAP_ENC", "SOAP_ENV", "UPNP_CONTROL_NS", "IgdDescription", "IgdService", "MalformedReply",
    "ServiceProbe", "UpnpFault", "build_soap", "choose_service", "escape_xml", "fault_error",
    "firewall_status", "ints", "mapping_args", "parse_description", "parse_soap_action",
    "parse_soap_arguments", "parse_soap_response", "pick", "pinhole_args", "pinhole_uid",
    "render_soap_fault", "render_soap_response", "reserved_port",
]

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
        """Preference among WAN services (lower first; unknown types last)."""
        return _SERVICE_RANK.get(self.service_type, 99)

    @property
    def version(self) -> int:
        """The service's IGD version, 1 or 2."""
        return 2 if self.service_type.endswith(":2") else 1

    @property
    def is_ppp(self) -> bool:
        """Is it a ``WANPPPConnection`` (a PPPoE uplink)?"""
        return "PPP" in self.service_type


@dataclass(frozen=True, slots=True)
class IgdDescription:
    """A parsed device description: where it was read, the root device, its WAN services."""
    location: str
    device_type: str
    friendly_name: str
    services: tuple[IgdService, ...]
    url_base: str = ""
    firewall: IgdService | None = None  # WANIPv6FirewallControl:1 (IPv6 pinholes), if offered
    root_uuid: str = ""  # UDN of the root device ("uuid:..."), lower case; "" if absent
    # X_publicStandIn of the root device: a documentation address that stands for a public
    # one (only a test device says so: ``base.counts_as_public``); "" if absent
    public_stand_in: str = ""

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
        public_stand_in=_text(_child(top, "X_publicStandIn")),
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
    public_stand_in: str = ""  # the description's (``IgdDescription.public_stand_in``)

    @property
    def connected(self) -> bool:
        """Did the service answer with status ``Connected`` (or ``Up``)?"""
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
        if counts_as_public(ext, self.public_stand_in):
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


def escape_xml(value: str) -> str:
    """``value`` as XML text or attribute value (&, <, >, " escaped)."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def build_soap(service_type: str, action: str, args: Sequence[tuple[str, str]]) -> bytes:
    """A SOAP 1.1 request body as routers expect it: no leading whitespace, all args in order."""
    inner = "".join(f"<{k}>{escape_xml(v)}</{k}>" for k, v in args)
    return (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}">'
        f'<s:Body><u:{action} xmlns:u="{escape_xml(service_type)}">{inner}</u:{action}></s:Body>'
        "</s:Envelope>\r\n"
    ).encode()


@dataclass(frozen=True, slots=True)
class UpnpFault:
    """A UPnP error answer: ``errorCode`` (``None`` when the router gave none) and
    ``errorDescription``."""

    code: int | None
    description: str

    @classmethod
    def of(cls, code: int, description: str | None = None) -> UpnpFault:
        """``code`` with ``description``, or the name ``ERROR_DESCRIPTIONS`` gives it."""
        return cls(code, description or ERROR_DESCRIPTIONS.get(code, "Action Failed"))


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


# The one UPnP fault table: names as the specs, miniupnpc's upnperrors.c and miniupnpd's
# upnpsoap.c spell them (UPnP Device Architecture, WANIPConnection:2, WANIPv6FirewallControl:1).
# ``fault_error`` names a fault without description from it; the simulator answers with it.
ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "Invalid Action", 402: "Invalid Args", 501: "Action Failed",
    600: "Argument Value Invalid", 601: "Argument Value Out of Range",
    602: "Optional Action Not Implemented", 603: "Out of Memory",
    604: "Human Intervention Required", 605: "String Argument Too Long",
    606: "Action not authorized",
    701: "PinholeSpaceExhausted", 702: "FirewallDisabled", 703: "InboundPinholeNotAllowed",
    704: "NoSuchEntry",
    713: "SpecifiedArrayIndexInvalid", 714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP", 716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry", 724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported", 726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard", 728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms", 730: "PortMappingNotFound",
    732: "WildCardNotPermittedInIntPort",
    733: "InconsistentParameters",  # WANIPConnection:2; miniupnpd's text says "...Parameter"
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
    code, desc = fault.code, fault.description or ERROR_DESCRIPTIONS.get(fault.code or 0,
                                                                  "UPnPError")
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
    """The values that parse as integers (whitespace stripped), in order; the rest dropped."""
    out = []
    for v in values:
        try:
            out.append(int(str(v).strip()))
        except ValueError:
            continue
    return out


# --- SOAP, the server's side (the simulated router answers with these) -------------------------

UPNP_CONTROL_NS = "urn:schemas-upnp-org:control-1-0"
_ACTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)


def parse_soap_action(header: str) -> tuple[str, str] | None:
    """``"urn:...:service:WANIPConnection:2#AddPortMapping"`` -> (service URN, action name).

    Quotes (double or single) are optional, as on miniupnpd. ``None`` if there is no valid action.
    """
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    namespace, sep, action = value.rpartition("#")
    if not sep or not _ACTION_NAME.fullmatch(action) or len(namespace) > 256:
        return None
    return namespace, action


def parse_soap_arguments(body: bytes) -> dict[str, str]:
    """The arguments of the action element inside a SOAP envelope, by local name.

    Namespace-agnostic, order-agnostic. An empty body means no arguments. Raises ``ValueError``
    for anything that is not a well-formed envelope, including every document with a DTD
    (entity-expansion bombs, external entities).
    """
    if not body.strip():
        return {}
    try:
        root: Element = DET.fromstring(body, forbid_dtd=True, forbid_entities=True,
                                       forbid_external=True)
    except (DefusedXmlException, ParseError) as exc:
        raise ValueError(f"unacceptable XML: {exc.__class__.__name__}") from exc
    if _local(root.tag) != "Envelope":
        raise ValueError("not a SOAP envelope")
    soap_body = _child(root, "Body")
    if soap_body is None or len(soap_body) == 0:
        raise ValueError("SOAP envelope without an action element")
    return {_local(arg.tag): arg.text or "" for arg in soap_body[0]}


def render_soap_response(namespace: str, action: str, out: Mapping[str, str]) -> bytes:
    """A success envelope the way miniupnpd writes it (``NewPortListing`` goes in CDATA)."""
    parts = []
    for name, value in out.items():
        if name == "NewPortListing":
            text = "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"
        else:
            text = escape_xml(value)
        parts.append(f"<{name}>{text}</{name}>")
    ns = escape_xml(namespace)
    inner = (f'<u:{action}Response xmlns:u="{ns}">{"".join(parts)}</u:{action}Response>'
             if parts else f'<u:{action}Response xmlns:u="{ns}"/>')
    return ('<?xml version="1.0"?>\r\n'
            f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}"><s:Body>'
            f"{inner}</s:Body></s:Envelope>\r\n").encode()


def render_soap_fault(fault: UpnpFault, style: Literal["standard", "mikrotik"] = "standard"
                      ) -> bytes:
    """A UPnPError fault. No XML declaration (miniupnpd and MikroTik both omit it); the MikroTik
    style spells the SOAP children ``faultCode``/``faultString``."""
    mikrotik = style == "mikrotik"
    code_tag = "faultCode" if mikrotik else "faultcode"
    string_tag = "faultString" if mikrotik else "faultstring"
    return (
        f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}">'
        f"<s:Body><s:Fault><{code_tag}>s:Client</{code_tag}>"
        f"<{string_tag}>UPnPError</{string_tag}><detail>"
        f'<UPnPError xmlns="{UPNP_CONTROL_NS}"><errorCode>{fault.code}</errorCode>'
        f"<errorDescription>{escape_xml(fault.description)}</errorDescription></UPnPError>"
        "</detail></s:Fault></s:Body></s:Envelope>\r\n"
    ).encode()
