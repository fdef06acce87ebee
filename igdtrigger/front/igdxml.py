"""The IGD front's UPnP protocol, sans I/O: the device description, the service descriptions,
SOAP requests parsed and answers built, SSDP search answers and NOTIFYs.

The server side of the client codec (``gateway/upnp/codec.py``), written apart since the front
names no gateway module (tests/test_layers.py). The device is an
IGDv2 (UPnP-gw-InternetGatewayDevice-v2) with ``WANIPConnection:2``; v1 clients are answered
too: an SSDP search for a ``:1`` type gets a ``:1`` answer (UDA 1.1 §1.3.2: a device answers a
search for an earlier version with that version), and SOAP in the ``:1`` namespace is answered
in it. Requests are parsed with defusedxml (no DTD, no entities) and at most ``MAX_REQUEST``
bytes; every failure is :class:`SoapError` carrying the UPnP fault code to answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as DET

__all__ = [
    "ACTIONS",
    "CIF_SERVICE",
    "EVENTED",
    "IGD_DEVICE",
    "MAX_REQUEST",
    "SSDP_MAX_AGE",
    "V2_ONLY",
    "WANIP_SERVICE",
    "SoapError",
    "SoapRequest",
    "decimal",
    "device_description",
    "fault_body",
    "notify",
    "parse_msearch",
    "parse_soap_request",
    "port_listing",
    "response_body",
    "scpd",
    "search_answer",
    "search_response",
    "search_targets",
    "versioned",
    "wanip_actions",
]

MAX_REQUEST = 16 * 1024  # a SOAP request from a LAN client: the largest real one is ~1 KiB
SSDP_MAX_AGE = 1800  # s, CACHE-CONTROL max-age of our announcements (UDA: at least 1800)
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
WAN_DEVICE = "urn:schemas-upnp-org:device:WANDevice:2"
WANCONN_DEVICE = "urn:schemas-upnp-org:device:WANConnectionDevice:2"
WANIP_SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:2"
CIF_SERVICE = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"
CONTROL_PATH = "/ctl/IPConn"
CIF_CONTROL_PATH = "/ctl/CmnIfCfg"
SCPD_PATH = "/WANIPCn.xml"
CIF_SCPD_PATH = "/WANCfg.xml"
DESC_PATH = "/rootDesc.xml"
FAULTS = {401: "Invalid Action", 402: "Invalid Args", 501: "Action Failed",
          606: "Action not authorized", 713: "SpecifiedArrayIndexInvalid",
          714: "NoSuchEntryInArray", 716: "WildCardNotPermittedInExtPort",
          718: "ConflictInMappingEntry", 726: "RemoteHostOnlySupportsWildcard",
          728: "NoPortMapsAvailable", 730: "PortMappingNotFound",
          733: "InconsistentParameters"}

_MAPPING_IN = ("NewRemoteHost", "NewExternalPort", "NewProtocol", "NewInternalPort",
               "NewInternalClient", "NewEnabled", "NewPortMappingDescription",
               "NewLeaseDuration")
_KEY_IN = ("NewRemoteHost", "NewExternalPort", "NewProtocol")
_ENTRY_OUT = ("NewInternalPort", "NewInternalClient", "NewEnabled",
              "NewPortMappingDescription", "NewLeaseDuration")
# action -> (in arguments, out arguments); the state variable of each argument is in _VARS
ACTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "AddPortMapping": (_MAPPING_IN, ()),
    "AddAnyPortMapping": (_MAPPING_IN, ("NewReservedPort",)),
    "DeletePortMapping": (_KEY_IN, ()),
    "DeletePortMappingRange": (("NewStartPort", "NewEndPort", "NewProtocol", "NewManage"), ()),
    "GetSpecificPortMappingEntry": (_KEY_IN, _ENTRY_OUT),
    "GetGenericPortMappingEntry": (("NewPortMappingIndex",), (*_KEY_IN, *_ENTRY_OUT)),
    "GetListOfPortMappings": (("NewStartPort", "NewEndPort", "NewProtocol", "NewManage",
                               "NewNumberOfPorts"), ("NewPortListing",)),
    "GetExternalIPAddress": ((), ("NewExternalIPAddress",)),
    "GetStatusInfo": ((), ("NewConnectionStatus", "NewLastConnectionError", "NewUptime")),
    "GetConnectionTypeInfo": ((), ("NewConnectionType", "NewPossibleConnectionTypes")),
}
CIF_ACTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "GetCommonLinkProperties": ((), ("NewWANAccessType", "NewLayer1UpstreamMaxBitRate",
                                     "NewLayer1DownstreamMaxBitRate", "NewPhysicalLinkStatus")),
    "GetTotalBytesSent": ((), ("NewTotalBytesSent",)),
    "GetTotalBytesReceived": ((), ("NewTotalBytesReceived",)),
    "GetTotalPacketsSent": ((), ("NewTotalPacketsSent",)),
    "GetTotalPacketsReceived": ((), ("NewTotalPacketsReceived",)),
}
_VARS: dict[str, tuple[str, str]] = {  # argument -> (state variable, data type)
    "NewRemoteHost": ("RemoteHost", "string"),
    "NewExternalPort": ("ExternalPort", "ui2"),
    "NewProtocol": ("PortMappingProtocol", "string"),
    "NewInternalPort": ("InternalPort", "ui2"),
    "NewInternalClient": ("InternalClient", "string"),
    "NewEnabled": ("PortMappingEnabled", "boolean"),
    "NewPortMappingDescription": ("PortMappingDescription", "string"),
    "NewLeaseDuration": ("PortMappingLeaseDuration", "ui4"),
    "NewReservedPort": ("ExternalPort", "ui2"),
    "NewPortMappingIndex": ("PortMappingNumberOfEntries", "ui2"),
    "NewStartPort": ("ExternalPort", "ui2"),
    "NewEndPort": ("ExternalPort", "ui2"),
    "NewManage": ("A_ARG_TYPE_Manage", "boolean"),
    "NewNumberOfPorts": ("PortMappingNumberOfEntries", "ui2"),
    "NewPortListing": ("A_ARG_TYPE_PortListing", "string"),
    "NewExternalIPAddress": ("ExternalIPAddress", "string"),
    "NewConnectionStatus": ("ConnectionStatus", "string"),
    "NewLastConnectionError": ("LastConnectionError", "string"),
    "NewUptime": ("Uptime", "ui4"),
    "NewConnectionType": ("ConnectionType", "string"),
    "NewPossibleConnectionTypes": ("PossibleConnectionTypes", "string"),
    "NewWANAccessType": ("WANAccessType", "string"),
    "NewLayer1UpstreamMaxBitRate": ("Layer1UpstreamMaxBitRate", "ui4"),
    "NewLayer1DownstreamMaxBitRate": ("Layer1DownstreamMaxBitRate", "ui4"),
    "NewPhysicalLinkStatus": ("PhysicalLinkStatus", "string"),
    "NewTotalBytesSent": ("TotalBytesSent", "ui4"),
    "NewTotalBytesReceived": ("TotalBytesReceived", "ui4"),
    "NewTotalPacketsSent": ("TotalPacketsSent", "ui4"),
    "NewTotalPacketsReceived": ("TotalPacketsReceived", "ui4"),
}


SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENC = "http://schemas.xmlsoap.org/soap/encoding/"


def build_soap(service_type: str, element: str, args: Sequence[tuple[str, str]]) -> bytes:
    """A SOAP 1.1 envelope whose body is ``<u:element>`` with ``args`` in order (an answer's
    element is ``<action>Response``). The server side's own: the front names no gateway."""
    inner = "".join(f"<{k}>{_esc(v)}</{k}>" for k, v in args)
    return (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="{SOAP_ENV}" '
            f's:encodingStyle="{SOAP_ENC}"><s:Body><u:{element} xmlns:u="{_esc(service_type)}">'
            f"{inner}</u:{element}></s:Body></s:Envelope>\r\n").encode()


class SoapError(Exception):
    """A request to answer with UPnP fault ``code`` (``FAULTS`` names it)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(detail or FAULTS.get(code, "error"))
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SoapRequest:
    """A parsed control request: the service type as named, the action, its arguments."""

    service_type: str  # as the client named it (":1" or ":2")
    action: str
    args: dict[str, str]


def _esc(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_SERVICE_RE = re.compile(r"^urn:schemas-upnp-org:service:(WANIPConnection|WANCommonInterfaceConfig)"
                         r":([12])$")


# an "&" that starts no character or entity reference: libminiupnpc (upnpc -e "Tom & Jerry",
# every app on it) sends argument values unescaped, and miniupnpd's parser takes them as text
_BARE_AMP = re.compile(rb"&(?!#[0-9]{1,8};|#x[0-9A-Fa-f]{1,8};|[A-Za-z][A-Za-z0-9]{0,30};)")


def decimal(text: str, limit: int) -> int | None:
    """``text`` (surrounding blanks ignored) as a number of ASCII digits in 0-``limit``, else
    None: never another script's digits, and never ``int()`` of thousands of digits (over 4300
    it raises ``ValueError``, a hostile client's 500)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(limit)) + 8:
        return None
    value = int(text)
    return value if value <= limit else None


def parse_soap_request(body: bytes, soapaction: str) -> SoapRequest:
    """The action a client asks for (the ``SOAPACTION`` header and the body must agree) and
    its arguments (text of each child, by local name; a bare ``&`` is text, as miniupnpd reads
    what libminiupnpc sends unescaped). Raises :class:`SoapError`: 402 for a body
    that is too large, not XML, or uses DTDs/entities; 401 for an unknown service or action."""
    if len(body) > MAX_REQUEST:
        raise SoapError(402, f"request larger than {MAX_REQUEST} bytes")
    header = soapaction.strip().strip('"')
    service_type, sep, action = header.rpartition("#")
    if not sep or not _SERVICE_RE.match(service_type):
        raise SoapError(401, f"unknown SOAPACTION {soapaction[:120]!r}")
    body = _BARE_AMP.sub(b"&amp;", body)
    try:
        root: Element = DET.fromstring(body, forbid_dtd=True, forbid_entities=True,
                                       forbid_external=True)
    except Exception as exc:  # ParseError, DefusedXmlException, broken encodings
        raise SoapError(402, f"not a well-formed SOAP request ({type(exc).__name__})") from None
    if _local(root.tag) != "Envelope":
        raise SoapError(402, "no SOAP Envelope")
    body_el = next((c for c in root if _local(c.tag) == "Body"), None)
    call = next(iter(body_el), None) if body_el is not None else None
    if call is None or _local(call.tag) != action:
        raise SoapError(401, f"the body does not call {action!r}")
    known = ACTIONS if "WANIPConnection" in service_type else CIF_ACTIONS
    if action not in known:
        raise SoapError(401, f"no action {action!r}")
    args = {_local(c.tag): "".join(c.itertext()).strip() for c in call}
    return SoapRequest(service_type, action, args)


_CDATA_SLOT = "\x00listing\x00"


def response_body(req: SoapRequest, out: Sequence[tuple[str, str]]) -> bytes:
    """The success envelope for ``req`` with ``out`` arguments in order. ``NewPortListing`` goes
    in CDATA, as miniupnpd writes it: miniupnpc's parser does not decode entities, and reads no
    entry from an escaped listing."""
    listing = dict(out).get("NewPortListing")
    if listing is None:
        return build_soap(req.service_type, f"{req.action}Response", out)
    body = build_soap(req.service_type, f"{req.action}Response",
                      [(k, _CDATA_SLOT if k == "NewPortListing" else v) for k, v in out])
    cdata = "<![CDATA[" + listing.replace("]]>", "]]]]><![CDATA[>") + "]]>"
    return body.replace(_CDATA_SLOT.encode(), cdata.encode())


def fault_body(code: int, detail: str = "") -> bytes:
    """A SOAP fault carrying UPnPError ``code`` (sent with HTTP 500, UDA §3.2.2)."""
    desc = FAULTS.get(code, detail or "error")
    return (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{_esc(desc)}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n"
    ).encode()


def port_listing(entries: Sequence[Mapping[str, str]]) -> str:
    """GetListOfPortMappings' ``NewPortListing`` document (IGDv2 WANIPConnection §2.6.21; the
    caller's envelope escapes it)."""
    rows = "".join(
        "<p:PortMappingEntry>" + "".join(
            f"<p:{k}>{_esc(v)}</p:{k}>" for k, v in e.items()) + "</p:PortMappingEntry>"
        for e in entries)
    return ('<?xml version="1.0" encoding="UTF-8"?><p:PortMappingList '
            'xmlns:p="urn:schemas-upnp-org:gw:WANIPConnection" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="urn:schemas-upnp-org:gw:WANIPConnection '
            'http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd">' + rows
            + "</p:PortMappingList>")


def _service(stype: str, sid: str, scpd_path: str, control: str) -> str:
    return (f"<service><serviceType>{stype}</serviceType><serviceId>{sid}</serviceId>"
            f"<SCPDURL>{scpd_path}</SCPDURL><controlURL>{control}</controlURL>"
            f"<eventSubURL>{control}/evt</eventSubURL></service>")


def _device(dtype: str, name: str, udn: str, inner: str) -> str:
    return (f"<device><deviceType>{dtype}</deviceType><friendlyName>{_esc(name)}</friendlyName>"
            "<manufacturer>igdtrigger</manufacturer>"
            "<manufacturerURL>https://github.com/</manufacturerURL>"
            "<modelDescription>igdtrigger port-triggering IGD front</modelDescription>"
            "<modelName>igdtrigger</modelName><modelNumber>2</modelNumber>"
            f"<UDN>{udn}</UDN>{inner}</device>")


V2_ONLY = frozenset({"AddAnyPortMapping", "DeletePortMappingRange", "GetListOfPortMappings"})


def versioned(urn: str, version: int) -> str:
    """``urn`` (one of our ``:2`` types) at ``version`` (WANCommonInterfaceConfig stays 1)."""
    return urn if urn == CIF_SERVICE else f"{urn.rpartition(':')[0]}:{version}"


def wanip_actions(version: int) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """WANIPConnection's actions at ``version`` (v1 has no AddAny, range delete or listing)."""
    return {k: v for k, v in ACTIONS.items() if version >= 2 or k not in V2_ONLY}


def device_description(udn: str, friendly_name: str, base_url: str, config_id: int,
                       version: int = 2) -> bytes:
    """The root description: InternetGatewayDevice:2 > WANDevice:2 (WANCommonInterfaceConfig:1)
    > WANConnectionDevice:2 (WANIPConnection:2), or every ``:2`` a ``:1`` when ``version`` is 1
    (for clients that know only IGDv1, as miniupnpd's ``force_igd_desc_v1``). ``udn``:
    ``uuid:...``; the sub-devices' UDNs derive from it (the last digit changed)."""
    wanconn = _device(versioned(WANCONN_DEVICE, version), "WANConnectionDevice",
                      _sub_udn(udn, 2),
                      "<serviceList>" + _service(versioned(WANIP_SERVICE, version),
                                                 "urn:upnp-org:serviceId:WANIPConn1",
                                                 SCPD_PATH, CONTROL_PATH) + "</serviceList>")
    wan = _device(versioned(WAN_DEVICE, version), "WANDevice", _sub_udn(udn, 1),
                  "<serviceList>" + _service(CIF_SERVICE, "urn:upnp-org:serviceId:WANCommonIFC1",
                                             CIF_SCPD_PATH, CIF_CONTROL_PATH)
                  + "</serviceList><deviceList>" + wanconn + "</deviceList>")
    root = _device(versioned(IGD_DEVICE, version), friendly_name, udn,
                   "<deviceList>" + wan + "</deviceList>")
    return ('<?xml version="1.0"?>\r\n'
            f'<root xmlns="urn:schemas-upnp-org:device-1-0" configId="{config_id}">'
            "<specVersion><major>1</major><minor>1</minor></specVersion>"
            f"<URLBase>{_esc(base_url)}</URLBase>{root}</root>\r\n").encode()


def _sub_udn(udn: str, n: int) -> str:
    return f"{udn[:-1]}{n}" if udn else udn


# evented state variables (GENA, front/gena.py): WANIPConnection's, WANCommonInterfaceConfig's
EVENTED = ("PossibleConnectionTypes", "ConnectionStatus", "ExternalIPAddress",
           "PortMappingNumberOfEntries", "PhysicalLinkStatus")
_CIF_VARS = frozenset({"PhysicalLinkStatus"})  # of EVENTED, WANCommonInterfaceConfig's


def scpd(actions: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]], config_id: int) -> bytes:
    """A service description listing ``actions`` and the state variables they use."""
    parts: list[str] = []
    used: dict[str, str] = {}
    for name, (ins, outs) in actions.items():
        args = "".join(
            f"<argument><name>{a}</name><direction>{d}</direction>"
            f"<relatedStateVariable>{_VARS[a][0]}</relatedStateVariable></argument>"
            for d, group in (("in", ins), ("out", outs)) for a in group)
        parts.append(f"<action><name>{name}</name><argumentList>{args}</argumentList></action>")
        for a in (*ins, *outs):
            used[_VARS[a][0]] = _VARS[a][1]
    for v in EVENTED:  # this service's evented variables, whether an action uses them or not
        if (v in _CIF_VARS) == (actions is CIF_ACTIONS):
            used.setdefault(v, "ui2" if v == "PortMappingNumberOfEntries" else "string")
    state = "".join(f'<stateVariable sendEvents="{"yes" if v in EVENTED else "no"}">'
                    f"<name>{v}</name><dataType>{t}</dataType></stateVariable>"
                    for v, t in used.items())
    return ('<?xml version="1.0"?>\r\n'
            f'<scpd xmlns="urn:schemas-upnp-org:service-1-0" configId="{config_id}">'
            "<specVersion><major>1</major><minor>1</minor></specVersion>"
            f"<actionList>{''.join(parts)}</actionList>"
            f"<serviceStateTable>{state}</serviceStateTable></scpd>\r\n").encode()


# --- SSDP ------------------------------------------------------------------------------------

def search_targets(udn: str, version: int = 2) -> list[tuple[str, str]]:
    """(NT, USN) of every announcement (UDA 1.1 §1.2.2: root device, each device's UUID and
    type, each service type), at IGD ``version``."""
    subs = (udn, _sub_udn(udn, 1), _sub_udn(udn, 2))
    out = [("upnp:rootdevice", f"{udn}::upnp:rootdevice")]
    for u, t in zip(subs, (IGD_DEVICE, WAN_DEVICE, WANCONN_DEVICE), strict=True):
        out += [(u, u), (versioned(t, version), f"{u}::{versioned(t, version)}")]
    wanip = versioned(WANIP_SERVICE, version)
    out += [(CIF_SERVICE, f"{subs[1]}::{CIF_SERVICE}"), (wanip, f"{subs[2]}::{wanip}")]
    return out


def _version_match(st: str, ours: str) -> bool:
    """``st`` names our type at our version or an earlier one."""
    base, _, ver = ours.rpartition(":")
    sbase, _, sver = st.rpartition(":")
    return sbase == base and sver.isdecimal() and 1 <= int(sver) <= int(ver)


def search_answer(st: str, udn: str, version: int = 2) -> list[tuple[str, str]]:
    """(ST, USN) pairs to answer an M-SEARCH for ``st`` with (empty: not ours). A search for an
    earlier version of a type is answered with that version (v1 clients find the v2 device)."""
    targets = search_targets(udn, version)
    if st == "ssdp:all":
        return targets
    for nt, usn in targets:
        if st == nt:
            return [(nt, usn)]
        if nt.startswith("urn:") and _version_match(st, nt):
            return [(st, usn.replace(nt, st))]
    return []


def parse_msearch(data: bytes) -> tuple[str, int] | None:
    """(ST, MX) of a well-formed M-SEARCH (``MAN: "ssdp:discover"``), else None. Never raises;
    at most 2 KiB read."""
    if len(data) > 2048:
        return None
    lines = data.decode("latin-1").split("\r\n")
    if lines[0].split() != ["M-SEARCH", "*", "HTTP/1.1"]:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("man", "").strip('"') != "ssdp:discover" or not headers.get("st"):
        return None
    mx = headers.get("mx", "1")
    return headers["st"], int(mx) if mx.isdecimal() else 1


def search_response(st: str, usn: str, location: str, boot_id: int, config_id: int,
                    server: str) -> bytes:
    """The unicast answer to an M-SEARCH (UDA 1.1 §1.3.3)."""
    return ("HTTP/1.1 200 OK\r\n"
            f"CACHE-CONTROL: max-age={SSDP_MAX_AGE}\r\nEXT:\r\nLOCATION: {location}\r\n"
            f"SERVER: {server}\r\nST: {st}\r\nUSN: {usn}\r\n"
            f"BOOTID.UPNP.ORG: {boot_id}\r\nCONFIGID.UPNP.ORG: {config_id}\r\n\r\n").encode()


def notify(nt: str, usn: str, *, alive: bool, location: str, boot_id: int, config_id: int,
           server: str) -> bytes:
    """An ``ssdp:alive`` (or ``ssdp:byebye``) NOTIFY for multicast (UDA 1.1 §1.2.2/§1.2.4)."""
    head = (f"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nNT: {nt}\r\n"
            f"NTS: ssdp:{'alive' if alive else 'byebye'}\r\nUSN: {usn}\r\n")
    if alive:
        head += (f"CACHE-CONTROL: max-age={SSDP_MAX_AGE}\r\nLOCATION: {location}\r\n"
                 f"SERVER: {server}\r\n")
    return (head + f"BOOTID.UPNP.ORG: {boot_id}\r\nCONFIGID.UPNP.ORG: {config_id}\r\n\r\n"
            ).encode()
