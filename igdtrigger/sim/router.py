"""A simulated UPnP Internet Gateway Device, modelled on miniupnpd, served on loopback.

Real client code (the miniupnpc C library through its Python binding, our own SOAP client) talks
to it over HTTP exactly as it would talk to a router. It backs ``igdtrigger serve --simulate`` (a
newcomer with no UPnP router sees mappings open and close) and the fast test-suite.

Three layers:

* ``SimulatedRouter``: sans-I/O. It holds the port-mapping table and answers actions
  (``call("AddPortMapping", {...}, requester=...)`` -> dict of out-arguments or ``UPnPFault``) and
  whole HTTP requests (``handle_http``). Time comes from an injectable clock, so tests can expire
  leases without sleeping.
* ``SimulatedIgdServer``: a small asyncio HTTP/1.x server around a router (``Connection: close``,
  ``Content-Length`` framing, bounded sizes and time), with ``down``/``up``/``restart`` controls.
* ``run_in_thread()``: the server on its own event loop in a daemon thread, for synchronous users
  (benchmarks, scripts driving the blocking miniupnpc calls).

Behaviour follows miniupnpd (shared/reference/router-facts.md §1, §4, §7): 716 for external port
0, 718 for a port held by another client (same client: update in place, lease refreshed), IGDv2
clamps lease 0 or > 604800 to 604800 while IGDv1 treats 0 as permanent, secure mode and permission
denials are 606 on IGDv2 and 718 on IGDv1, 713/714/730/733 where miniupnpd uses them. Quirk knobs
reproduce real routers: MikroTik (725 for timed leases, ``faultCode`` spelling), ARRIS (402 for
timed leases), old DD-WRT (timed leases accepted then gone), a restart on a new port, an IGD that
is down, slow answers and injected failures.

The simulator is not a security boundary, but it parses untrusted bytes like one: requests are
bounded (64 KiB of headers, 64 KiB of body, a read deadline) and SOAP bodies go through defusedxml
with DTDs forbidden, so entity expansion and external entities are refused with a fault.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import math
import random
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit
from xml.sax.saxutils import escape as _xml_escape

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as DefusedET

from igdtrigger.core.model import Proto, RouterMapping
from igdtrigger.gateway.base import SIMULATED_EXTERNAL, counts_as_public

__all__ = [
    "CIF_CONTROL_PATH",
    "ERROR_DESCRIPTIONS",
    "FIRST_WAN_CONTROL_PATH",
    "IPCONN_CONTROL_PATH",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_LEASE_V2",
    "ROOT_DESC_PATH",
    "ActionRecord",
    "FaultStyle",
    "HttpResponse",
    "LeaseMode",
    "SimulatedIgdServer",
    "SimulatedIgdThread",
    "SimulatedRouter",
    "UPnPFault",
    "parse_soap_action",
    "parse_soap_arguments",
    "render_soap_fault",
    "render_soap_response",
    "run_in_thread",
]

T = TypeVar("T")

LeaseMode = Literal["normal", "permanent_only_725", "permanent_only_402", "drops_timed"]
FaultStyle = Literal["standard", "mikrotik"]

# --- constants -----------------------------------------------------------------------------------

ROOT_DESC_PATH = "/rootDesc.xml"
IPCONN_CONTROL_PATH = "/ctl/IPConn"
FIRST_WAN_CONTROL_PATH = "/ctl/WAN0/IPConn"  # SimulatedRouter.add_first_wan
IPCONN_EVENT_PATH = "/evt/IPConn"
IPCONN_SCPD_PATH = "/WANIPCn.xml"
CIF_CONTROL_PATH = "/ctl/CmnIfCfg"
CIF_EVENT_PATH = "/evt/CmnIfCfg"
CIF_SCPD_PATH = "/WANCfg.xml"

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
MAX_LEASE_V2 = 604800  # one week: IGDv2's ceiling, and what miniupnpd grants for lease 0

SOAP_ENVELOPE_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
UPNP_CONTROL_NS = "urn:schemas-upnp-org:control-1-0"
XML_CONTENT_TYPE = 'text/xml; charset="utf-8"'
HTML_CONTENT_TYPE = "text/html"
DEFAULT_SERVER_HEADER = "Linux/6.1 UPnP/1.1 igdtrigger-simulated/1.0"

# Names as miniupnpc's upnperrors.c / miniupnpd's upnpsoap.c spell them.
ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "Invalid Action",
    402: "Invalid Args",
    501: "Action Failed",
    600: "Argument Value Invalid",
    601: "Argument Value Out of Range",
    602: "Optional Action Not Implemented",
    603: "Out of Memory",
    604: "Human Intervention Required",
    605: "String Argument Too Long",
    606: "Action not authorized",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
    730: "PortMappingNotFound",
    732: "WildCardNotPermittedInIntPort",
    733: "InconsistentParameter",
}

_HTTP_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}

_LEASE_MODES = ("normal", "permanent_only_725", "permanent_only_402", "drops_timed")
_FAULT_STYLES = ("standard", "mikrotik")
_DIGITS = re.compile(r"\d{1,10}", re.ASCII)
_ACTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)

# --- action signatures (drive the SCPDs and document the supported actions) -----------------------

_Args = tuple[tuple[str, str], ...]  # (argument name, related state variable)

_STATE_VARIABLES: dict[str, str] = {
    "ConnectionType": "string",
    "PossibleConnectionTypes": "string",
    "ConnectionStatus": "string",
    "Uptime": "ui4",
    "LastConnectionError": "string",
    "RSIPAvailable": "boolean",
    "NATEnabled": "boolean",
    "ExternalIPAddress": "string",
    "PortMappingNumberOfEntries": "ui2",
    "PortMappingEnabled": "boolean",
    "PortMappingLeaseDuration": "ui4",
    "RemoteHost": "string",
    "ExternalPort": "ui2",
    "InternalPort": "ui2",
    "PortMappingProtocol": "string",
    "InternalClient": "string",
    "PortMappingDescription": "string",
    "A_ARG_TYPE_Manage": "boolean",
    "A_ARG_TYPE_PortListing": "string",
    "WANAccessType": "string",
    "Layer1UpstreamMaxBitRate": "ui4",
    "Layer1DownstreamMaxBitRate": "ui4",
    "PhysicalLinkStatus": "string",
    "TotalBytesSent": "ui4",
    "TotalBytesReceived": "ui4",
    "TotalPacketsSent": "ui4",
    "TotalPacketsReceived": "ui4",
}

_MAPPING_IN: _Args = (
    ("NewRemoteHost", "RemoteHost"),
    ("NewExternalPort", "ExternalPort"),
    ("NewProtocol", "PortMappingProtocol"),
    ("NewInternalPort", "InternalPort"),
    ("NewInternalClient", "InternalClient"),
    ("NewEnabled", "PortMappingEnabled"),
    ("NewPortMappingDescription", "PortMappingDescription"),
    ("NewLeaseDuration", "PortMappingLeaseDuration"),
)
_KEY_IN: _Args = (
    ("NewRemoteHost", "RemoteHost"),
    ("NewExternalPort", "ExternalPort"),
    ("NewProtocol", "PortMappingProtocol"),
)
_ENTRY_OUT: _Args = (
    ("NewInternalPort", "InternalPort"),
    ("NewInternalClient", "InternalClient"),
    ("NewEnabled", "PortMappingEnabled"),
    ("NewPortMappingDescription", "PortMappingDescription"),
    ("NewLeaseDuration", "PortMappingLeaseDuration"),
)
_RANGE_IN: _Args = (
    ("NewStartPort", "ExternalPort"),
    ("NewEndPort", "ExternalPort"),
    ("NewProtocol", "PortMappingProtocol"),
    ("NewManage", "A_ARG_TYPE_Manage"),
)

_IPCONN_ACTIONS: dict[str, tuple[_Args, _Args]] = {
    "GetConnectionTypeInfo": (
        (),
        (
            ("NewConnectionType", "ConnectionType"),
            ("NewPossibleConnectionTypes", "PossibleConnectionTypes"),
        ),
    ),
    "GetStatusInfo": (
        (),
        (
            ("NewConnectionStatus", "ConnectionStatus"),
            ("NewLastConnectionError", "LastConnectionError"),
            ("NewUptime", "Uptime"),
        ),
    ),
    "GetNATRSIPStatus": (
        (),
        (("NewRSIPAvailable", "RSIPAvailable"), ("NewNATEnabled", "NATEnabled")),
    ),
    "GetExternalIPAddress": ((), (("NewExternalIPAddress", "ExternalIPAddress"),)),
    "GetPortMappingNumberOfEntries": (
        (),
        (("NewPortMappingNumberOfEntries", "PortMappingNumberOfEntries"),),
    ),
    "GetGenericPortMappingEntry": (
        (("NewPortMappingIndex", "PortMappingNumberOfEntries"),),
        (*_KEY_IN, *_ENTRY_OUT),
    ),
    "GetSpecificPortMappingEntry": (_KEY_IN, _ENTRY_OUT),
    "AddPortMapping": (_MAPPING_IN, ()),
    "AddAnyPortMapping": (_MAPPING_IN, (("NewReservedPort", "ExternalPort"),)),
    "DeletePortMapping": (_KEY_IN, ()),
    "DeletePortMappingRange": (_RANGE_IN, ()),
    "GetListOfPortMappings": (
        (*_RANGE_IN, ("NewNumberOfPorts", "PortMappingNumberOfEntries")),
        (("NewPortListing", "A_ARG_TYPE_PortListing"),),
    ),
}
_V2_ONLY_ACTIONS = frozenset(
    {"AddAnyPortMapping", "DeletePortMappingRange", "GetListOfPortMappings"}
)

_CIF_ACTIONS: dict[str, tuple[_Args, _Args]] = {
    "GetCommonLinkProperties": (
        (),
        (
            ("NewWANAccessType", "WANAccessType"),
            ("NewLayer1UpstreamMaxBitRate", "Layer1UpstreamMaxBitRate"),
            ("NewLayer1DownstreamMaxBitRate", "Layer1DownstreamMaxBitRate"),
            ("NewPhysicalLinkStatus", "PhysicalLinkStatus"),
        ),
    ),
    "GetTotalBytesSent": ((), (("NewTotalBytesSent", "TotalBytesSent"),)),
    "GetTotalBytesReceived": ((), (("NewTotalBytesReceived", "TotalBytesReceived"),)),
    "GetTotalPacketsSent": ((), (("NewTotalPacketsSent", "TotalPacketsSent"),)),
    "GetTotalPacketsReceived": ((), (("NewTotalPacketsReceived", "TotalPacketsReceived"),)),
}


# --- value types ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UPnPFault:
    """A UPnP error answer: ``errorCode`` and ``errorDescription``."""

    code: int
    description: str

    @classmethod
    def of(cls, code: int, description: str | None = None) -> UPnPFault:
        return cls(code, description or ERROR_DESCRIPTIONS.get(code, "Action Failed"))


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What to send back for one request; the server adds the framing headers."""

    status: int
    body: bytes = b""
    content_type: str = XML_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def reason(self) -> str:
        return _HTTP_REASONS.get(self.status, "Unknown")


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """One SOAP action the router answered (for tests and the demo)."""

    at: float
    requester: str
    action: str
    args: Mapping[str, str]
    error_code: int | None  # None = success


@dataclass(slots=True)
class _Entry:
    proto: Proto
    external_port: int
    internal_client: str
    internal_port: int
    description: str
    remote_host: str
    lease: int  # granted, 0 = permanent
    expires_at: float | None  # None = permanent
    unseen: int = 0  # late_visible: look-ups still answered 714


@dataclass(slots=True)
class _ArmedFailure:
    code: int
    description: str
    remaining: int
    action: str | None


class _Refused(Exception):
    def __init__(self, code: int, description: str | None = None) -> None:
        super().__init__(code)
        self.fault = UPnPFault.of(code, description)


# --- SOAP encoding (pure functions) ---------------------------------------------------------------


def _local(tag: str) -> str:
    """``{ns}Name`` or ``prefix:Name`` -> ``Name``."""
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _escape(text: str) -> str:
    return _xml_escape(text, {'"': "&quot;"})


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
        root: ET.Element = DefusedET.fromstring(
            body, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except (DefusedXmlException, ET.ParseError) as exc:
        raise ValueError(f"unacceptable XML: {exc.__class__.__name__}") from exc
    if _local(root.tag) != "Envelope":
        raise ValueError("not a SOAP envelope")
    soap_body = next((child for child in root if _local(child.tag) == "Body"), None)
    if soap_body is None or len(soap_body) == 0:
        raise ValueError("SOAP envelope without an action element")
    return {_local(arg.tag): arg.text or "" for arg in soap_body[0]}


def render_soap_response(namespace: str, action: str, out: Mapping[str, str]) -> bytes:
    """A success envelope the way miniupnpd writes it (``NewPortListing`` goes in CDATA)."""
    head = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENVELOPE_NS}" s:encodingStyle="{SOAP_ENCODING}"><s:Body>'
    )
    ns = _escape(namespace)
    if not out:
        inner = f'<u:{action}Response xmlns:u="{ns}"/>'
    else:
        parts = []
        for name, value in out.items():
            if name == "NewPortListing":
                text = "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"
            else:
                text = _escape(value)
            parts.append(f"<{name}>{text}</{name}>")
        inner = f'<u:{action}Response xmlns:u="{ns}">{"".join(parts)}</u:{action}Response>'
    return (head + inner + "</s:Body></s:Envelope>\r\n").encode()


def render_soap_fault(fault: UPnPFault, style: FaultStyle = "standard") -> bytes:
    """A UPnPError fault. No XML declaration (miniupnpd and MikroTik both omit it); the MikroTik
    style spells the SOAP children ``faultCode``/``faultString``."""
    mikrotik = style == "mikrotik"
    code_tag = "faultCode" if mikrotik else "faultcode"
    string_tag = "faultString" if mikrotik else "faultstring"
    return (
        f'<s:Envelope xmlns:s="{SOAP_ENVELOPE_NS}" s:encodingStyle="{SOAP_ENCODING}">'
        f"<s:Body><s:Fault><{code_tag}>s:Client</{code_tag}>"
        f"<{string_tag}>UPnPError</{string_tag}><detail>"
        f'<UPnPError xmlns="{UPNP_CONTROL_NS}"><errorCode>{fault.code}</errorCode>'
        f"<errorDescription>{_escape(fault.description)}</errorDescription></UPnPError>"
        "</detail></s:Fault></s:Body></s:Envelope>\r\n"
    ).encode()


def _render_scpd(actions: Mapping[str, tuple[_Args, _Args]]) -> bytes:
    used: dict[str, None] = {}
    lines = [
        '<?xml version="1.0"?>',
        '<scpd xmlns="urn:schemas-upnp-org:service-1-0">',
        "<specVersion><major>1</major><minor>0</minor></specVersion>",
        "<actionList>",
    ]
    for name, (ins, outs) in actions.items():
        lines.append(f"<action><name>{name}</name><argumentList>")
        for direction, args in (("in", ins), ("out", outs)):
            for arg, var in args:
                used[var] = None
                lines.append(
                    f"<argument><name>{arg}</name><direction>{direction}</direction>"
                    f"<relatedStateVariable>{var}</relatedStateVariable></argument>"
                )
        lines.append("</argumentList></action>")
    lines.append("</actionList><serviceStateTable>")
    for var in used:
        lines.append(
            f'<stateVariable sendEvents="no"><name>{var}</name>'
            f"<dataType>{_STATE_VARIABLES[var]}</dataType></stateVariable>"
        )
    lines.append("</serviceStateTable></scpd>")
    return ("\r\n".join(lines) + "\r\n").encode()


def _html_error(status: int, text: str) -> HttpResponse:
    reason = _HTTP_REASONS.get(status, "Error")
    body = f"<HTML><HEAD><Title>{status} {reason}</Title></HEAD><BODY>{_escape(text)}</BODY></HTML>"
    return HttpResponse(status, (body + "\r\n").encode(), HTML_CONTENT_TYPE)


def _normalise_ip(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# --- the router (sans-I/O) ------------------------------------------------------------------------


class SimulatedRouter:
    """The mapping table and the protocol logic of a miniupnpd-like IGD. No I/O, no threads.

    Every option is also a plain attribute, so a test can flip a knob between two requests.

    Options:
        igd_version: 2 (default; ``WANIPConnection:2``) or 1.
        external_ip: what GetExternalIPAddress reports; a private or shared address (or "")
            simulates double NAT / CGNAT.
        refuse_private_wan: act like a default miniupnpd whose WAN address is not public:
            GetExternalIPAddress answers "" and AddPortMapping fails with 501.
        secure_mode: InternalClient must be the requester (606 on IGDv2, 718 on IGDv1).
        allow_low_ports: permit external/internal ports below 1024 (else 606 v2 / 718 v1).
        max_mappings: table size; a new mapping beyond it fails with 728 (v2) / 501 (v1).
        lease_mode: "normal"; "permanent_only_725" (MikroTik: non-zero lease -> 725);
            "permanent_only_402" (ARRIS: non-zero lease -> 402); "drops_timed" (old DD-WRT: a
            timed lease is accepted but the mapping is gone at once). In the quirk modes lease 0
            stays permanent, even on IGDv2.
        fault_style: "standard" (miniupnpd) or "mikrotik" (``faultCode``/``faultString``).
        latency: seconds the server waits before each answer.
        connection_status: what GetStatusInfo reports ("Connected", "Disconnected", ...).
        clock: monotonic seconds; inject a fake one to expire leases without sleeping.
        seed: seeds AddAnyPortMapping's random port choice and the device UUID.
        server_header: the ``Server:`` header the HTTP layer sends.

    Router-truth quirks (answers that are not what happened; router-facts.md §10), plain
    attributes set after construction:
        full_fault: the error code a full table answers AddPortMapping with (default 728 on
            IGDv2, 501 on IGDv1); 402 like the IGDv1 router of miniupnp/miniupnp#92.
        unreadable: AddPortMapping succeeds and installs the mapping, but
            GetSpecificPortMappingEntry answers 714 and the listing is empty; every add appends
            another copy and each DeletePortMapping removes one (miniupnpd 2.3.0-2.3.3 pf
            backend, miniupnp/miniupnp#719). ``mappings()`` shows the copies.
        forced_lease: every mapping gets this lease whatever is asked (Technicolor,
            miniupnp/miniupnp#398); GetSpecificPortMappingEntry reports it.
        delete_noop: DeletePortMapping answers success and leaves the mapping.
        lease_cap: the longest lease granted (a longer or a 0 ask gets this one, silently);
            GetSpecificPortMappingEntry reports it counting down.
        refresh_conflict: re-adding a mapping the requester already holds answers 718 and does
            not refresh its lease (lontivero/Open.NAT#14; old Tomato miniupnpd did not refresh,
            miniupnp/miniupnp#131).
        deletes_ignored: the first this-many DeletePortMapping of each mapping answer success
            and leave it (a delete that works only on a later try).
        description_limit: descriptions are stored cut to this many characters (the table
            shows the cut text).
        late_visible: a new mapping is installed a moment after the add is answered: the
            first this-many GetSpecificPortMappingEntry look-ups of it answer 714.
    """

    def __init__(
        self,
        *,
        igd_version: int = 2,
        external_ip: str = SIMULATED_EXTERNAL,
        refuse_private_wan: bool = False,
        secure_mode: bool = False,
        allow_low_ports: bool = False,
        max_mappings: int = 1024,
        lease_mode: LeaseMode = "normal",
        fault_style: FaultStyle = "standard",
        latency: float = 0.0,
        connection_status: str = "Connected",
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        server_header: str = DEFAULT_SERVER_HEADER,
        friendly_name: str = "igdtrigger simulated router",
        log_size: int = 256,
    ) -> None:
        if igd_version not in (1, 2):
            raise ValueError(f"igd_version must be 1 or 2, not {igd_version!r}")
        if lease_mode not in _LEASE_MODES:
            raise ValueError(f"lease_mode must be one of {', '.join(_LEASE_MODES)}")
        if fault_style not in _FAULT_STYLES:
            raise ValueError(f"fault_style must be one of {', '.join(_FAULT_STYLES)}")
        if max_mappings < 0:
            raise ValueError("max_mappings must be 0 or more")
        if latency < 0:
            raise ValueError("latency must be 0 or more seconds")
        self.igd_version = igd_version
        self.external_ip = external_ip
        self.refuse_private_wan = refuse_private_wan
        self.secure_mode = secure_mode
        self.allow_low_ports = allow_low_ports
        self.max_mappings = max_mappings
        self.lease_mode: LeaseMode = lease_mode
        self.fault_style: FaultStyle = fault_style
        self.description_override: bytes | None = None
        self.latency = latency
        self.connection_status = connection_status
        self.server_header = server_header
        self.friendly_name = friendly_name
        self.action_hook: Callable[[str, Mapping[str, str]], UPnPFault | None] | None = None
        """Called before each action; a returned fault is the answer (``None`` = carry on)."""

        # -- backend-contract quirks (issue 11, gateway side) --
        self.first_wan: SimulatedRouter | None = None
        """Multi-WAN (tailscale#8364): a WANDevice listed *before* this one, with its own
        WANIPConnection at ``FIRST_WAN_CONTROL_PATH`` and its own table (``add_first_wan``)."""
        self.http_hook: Callable[[str], HttpResponse | None] | None = None
        """Called with the SOAP action name before it is answered; a returned response is sent
        as it is (a bare HTTP 400, an HTML error page...)."""

        self._clock = clock
        self._rng = random.Random(seed)  # noqa: S311 - port choice and a UUID, not secrets
        self.udn = f"uuid:{uuid.UUID(int=self._rng.getrandbits(128), version=4)}"
        self._table: dict[tuple[Proto, int], _Entry] = {}
        self._armed: list[_ArmedFailure] = []
        self._started_at = clock()
        self.boot_count = 1
        self.calls: collections.Counter[str] = collections.Counter()
        """SOAP actions received, by action name (failed ones included)."""
        self.errors: collections.Counter[int] = collections.Counter()
        """Faults answered, by UPnP error code."""
        self.http_requests: collections.Counter[str] = collections.Counter()
        """HTTP requests by ``"METHOD /path"``."""
        self.log: collections.deque[ActionRecord] = collections.deque(maxlen=log_size)

        # --- router-truth quirks (issue 11, verifying effects; see the class docstring) -----
        self.full_fault: int | None = None
        self.unreadable = False
        self.forced_lease: int | None = None
        self.delete_noop = False
        self.lease_cap: int | None = None
        self.refresh_conflict = False
        self.deletes_ignored = 0
        self.description_limit: int | None = None
        self.late_visible = 0
        self.reported_client: str | None = None
        """GetSpecificPortMappingEntry reports this internal client for every entry (a router
        whose record says another host than the one it maps to)."""
        self.service_name = "WANIPConnection"
        """The WAN connection service's type name: "WANPPPConnection" for a PPPoE line (same
        actions, router-facts §3.3; use with igd_version 1: there is no WANPPPConnection:2)."""
        self._ignored: collections.Counter[tuple[Proto, int]] = collections.Counter()
        self._hidden: list[_Entry] = []  # unreadable: installed copies the router cannot show

    # -- introspection ---------------------------------------------------------------------------

    @property
    def service_type(self) -> str:
        return f"urn:schemas-upnp-org:service:{self.service_name}:{self.igd_version}"

    @property
    def uptime(self) -> int:
        return max(0, int(self._clock() - self._started_at))

    def mappings(self) -> list[RouterMapping]:
        """The live table, in insertion order, with remaining leases (0 = permanent); with
        ``unreadable``, the copies the router installed but does not report."""
        now = self._expire()
        return [
            RouterMapping(
                e.proto,
                e.external_port,
                e.internal_client,
                e.internal_port,
                e.description,
                True,
                self._remaining(e, now),
            )
            for e in (*self._table.values(), *self._hidden)
        ]

    # -- control ---------------------------------------------------------------------------------

    def fail_next(
        self,
        code: int,
        n: int = 1,
        *,
        action: str | None = None,
        description: str | None = None,
    ) -> None:
        """Answer the next ``n`` SOAP actions (only ``action`` ones, if given) with a fault."""
        if n < 1:
            raise ValueError("n must be at least 1")
        fault = UPnPFault.of(code, description)
        self._armed.append(_ArmedFailure(fault.code, fault.description, n, action))

    def add_first_wan(self, *, connection_status: str = "Disconnected",
                      external_ip: str = "") -> SimulatedRouter:
        """List a second WAN connection service *first* in the description (two WANDevices):
        by default a dead WAN that reports ``Disconnected`` and no external address but still
        accepts adds into its own table (the returned router: its ``mappings()`` is the record
        of what landed on the wrong WAN)."""
        self.first_wan = SimulatedRouter(
            igd_version=self.igd_version, external_ip=external_ip,
            connection_status=connection_status, clock=self._clock)
        return self.first_wan

    def restart(self) -> None:
        """A daemon restart: the table is gone, uptime starts again, armed failures are dropped.

        The counters and the log are kept (call ``reset_counters``). Moving to a new HTTP port is
        the server's part (``SimulatedIgdServer.restart``).
        """
        self._table.clear()
        self._hidden.clear()
        self._armed.clear()
        self._started_at = self._clock()
        self.boot_count += 1

    def reset_counters(self) -> None:
        self.calls.clear()
        self.errors.clear()
        self.http_requests.clear()
        self.log.clear()

    def clear(self) -> None:
        """Delete every mapping (like an administrator flushing the table)."""
        self._table.clear()
        self._hidden.clear()

    # -- actions ---------------------------------------------------------------------------------

    def call(
        self, action: str, args: Mapping[str, str], *, requester: str = "127.0.0.1"
    ) -> dict[str, str] | UPnPFault:
        """Answer one action: out-arguments in spec order, or the fault to send."""
        requester = _normalise_ip(requester)
        self.calls[action] += 1
        self._expire()
        result: dict[str, str] | UPnPFault
        armed = self._take_armed(action)
        hooked = self.action_hook(action, args) if armed is None and self.action_hook else None
        if armed is not None:
            result = armed
        elif hooked is not None:
            result = hooked
        else:
            try:
                result = self._dispatch(action, args, requester)
            except _Refused as refused:
                result = refused.fault
        code = result.code if isinstance(result, UPnPFault) else None
        if code is not None:
            self.errors[code] += 1
        logged = {k: v[:256] for k, v in list(args.items())[:32]}
        self.log.append(ActionRecord(self._clock(), requester, action, logged, code))
        return result

    def _take_armed(self, action: str) -> UPnPFault | None:
        for armed in self._armed:
            if armed.action is None or armed.action == action:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    self._armed.remove(armed)
                return UPnPFault(armed.code, armed.description)
        return None

    def _dispatch(self, action: str, args: Mapping[str, str], requester: str) -> dict[str, str]:
        if action in _V2_ONLY_ACTIONS and self.igd_version < 2:
            raise _Refused(401)
        handler = getattr(self, f"_do_{action}", None)
        if handler is None or (action not in _IPCONN_ACTIONS and action not in _CIF_ACTIONS):
            raise _Refused(401)
        result: dict[str, str] = handler(args, requester)
        return result

    # WANIPConnection ----------------------------------------------------------------------------

    def _do_GetExternalIPAddress(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {"NewExternalIPAddress": self._reported_external_ip()}

    def _do_GetStatusInfo(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {
            "NewConnectionStatus": self.connection_status,
            "NewLastConnectionError": "ERROR_NONE",
            "NewUptime": str(self.uptime),
        }

    def _do_GetConnectionTypeInfo(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {"NewConnectionType": "IP_Routed", "NewPossibleConnectionTypes": "IP_Routed"}

    def _do_GetNATRSIPStatus(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {"NewRSIPAvailable": "0", "NewNATEnabled": "1"}

    def _do_GetPortMappingNumberOfEntries(
        self, args: Mapping[str, str], requester: str
    ) -> dict[str, str]:
        return {"NewPortMappingNumberOfEntries": str(len(self._table))}

    def _do_AddPortMapping(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        ext_text = args.get("NewExternalPort", "").strip()
        if ext_text == "*":
            raise _Refused(716)
        ext_port = self._port_arg(args, "NewExternalPort")
        int_port = self._port_arg(args, "NewInternalPort")
        proto = self._proto_arg(args)
        if ext_port == 0:
            raise _Refused(716)
        client = self._client_arg(args, requester, required=False)
        lease = self._grant_lease(args)
        self._authorise(client, requester, ext_port, int_port)
        self._store(proto, ext_port, client, int_port, args, lease)
        return {}

    def _do_AddAnyPortMapping(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        ext_text = args.get("NewExternalPort", "").strip()
        wildcard = ext_text == "*"
        ext_port = 0 if wildcard else self._port_arg(args, "NewExternalPort")
        int_port = self._port_arg(args, "NewInternalPort")
        proto = self._proto_arg(args)
        client = self._client_arg(args, requester, required=True)
        lease = self._grant_lease(args)
        lowest = 1 if self.allow_low_ports else 1024
        self._authorise(client, requester, max(ext_port, lowest), int_port)
        remote = args.get("NewRemoteHost", "").strip()
        start = ext_port if ext_port >= lowest else self._rng.randint(lowest, 65535)
        for candidate in _spiral(start, lowest, 65535):
            existing = self._table.get((proto, candidate))
            if existing is None:
                if len(self._table) >= self.max_mappings:
                    raise _Refused(728)
            elif existing.internal_client != client or existing.remote_host != remote:
                continue
            self._store(proto, candidate, client, int_port, args, lease)
            return {"NewReservedPort": str(candidate)}
        raise _Refused(728)

    def _do_DeletePortMapping(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        ext_port = self._port_arg(args, "NewExternalPort")
        proto = self._proto_arg(args)
        if self.unreadable:
            copy = next((e for e in self._hidden if (e.proto, e.external_port) ==
                         (proto, ext_port)), None)
            if copy is None:
                raise _Refused(714)
            self._hidden.remove(copy)
            return {}
        entry = self._table.get((proto, ext_port))
        if entry is None:
            raise _Refused(714)
        if self.secure_mode and not _same_ip(entry.internal_client, requester):
            raise _Refused(606 if self.igd_version >= 2 else 714)
        if self.delete_noop:
            return {}
        if self._ignored[(proto, ext_port)] < self.deletes_ignored:
            self._ignored[(proto, ext_port)] += 1
            return {}
        del self._table[(proto, ext_port)]
        self._ignored.pop((proto, ext_port), None)
        return {}

    def _do_DeletePortMappingRange(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        first, last, proto, manage = self._range_args(args)
        doomed = [
            key
            for key, e in self._table.items()
            if e.proto is proto
            and first <= e.external_port <= last
            and (manage or _same_ip(e.internal_client, requester))
        ]
        if not doomed:
            raise _Refused(730)
        for key in doomed:
            del self._table[key]
        return {}

    def _do_GetSpecificPortMappingEntry(
        self, args: Mapping[str, str], requester: str
    ) -> dict[str, str]:
        ext_port = self._port_arg(args, "NewExternalPort")
        proto = self._proto_arg(args)
        entry = self._table.get((proto, ext_port))
        if entry is None:
            raise _Refused(714)
        if entry.unseen > 0:
            entry.unseen -= 1
            raise _Refused(714)
        return {
            "NewInternalPort": str(entry.internal_port),
            "NewInternalClient": self.reported_client or entry.internal_client,
            "NewEnabled": "1",
            "NewPortMappingDescription": entry.description,
            "NewLeaseDuration": str(self._remaining(entry, self._clock())),
        }

    def _do_GetGenericPortMappingEntry(
        self, args: Mapping[str, str], requester: str
    ) -> dict[str, str]:
        text = args.get("NewPortMappingIndex", "").strip()
        if not _DIGITS.fullmatch(text):
            raise _Refused(402)
        index = int(text)
        if index >= len(self._table):
            raise _Refused(713)
        entry = list(self._table.values())[index]
        return {
            "NewRemoteHost": entry.remote_host,
            "NewExternalPort": str(entry.external_port),
            "NewProtocol": entry.proto.value,
            "NewInternalPort": str(entry.internal_port),
            "NewInternalClient": entry.internal_client,
            "NewEnabled": "1",
            "NewPortMappingDescription": entry.description,
            "NewLeaseDuration": str(self._remaining(entry, self._clock())),
        }

    def _do_GetListOfPortMappings(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        first, last, proto, _manage = self._range_args(args)  # miniupnpd ignores NewManage here
        count_text = args.get("NewNumberOfPorts", "0").strip() or "0"
        if not _DIGITS.fullmatch(count_text):
            raise _Refused(402)
        limit = int(count_text) or 1000
        now = self._clock()
        entries = sorted(
            (
                e
                for e in self._table.values()
                if e.proto is proto and first <= e.external_port <= last
            ),
            key=lambda e: e.external_port,
        )[:limit]
        if not entries:
            raise _Refused(730)
        rows = [
            '<p:PortMappingList xmlns:p="urn:schemas-upnp-org:gw:WANIPConnection" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="urn:schemas-upnp-org:gw:WANIPConnection '
            'http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd">'
        ]
        for e in entries:
            rows.append(
                "<p:PortMappingEntry>"
                f"<p:NewRemoteHost>{_escape(e.remote_host)}</p:NewRemoteHost>"
                f"<p:NewExternalPort>{e.external_port}</p:NewExternalPort>"
                f"<p:NewProtocol>{e.proto.value}</p:NewProtocol>"
                f"<p:NewInternalPort>{e.internal_port}</p:NewInternalPort>"
                f"<p:NewInternalClient>{_escape(e.internal_client)}</p:NewInternalClient>"
                "<p:NewEnabled>1</p:NewEnabled>"
                f"<p:NewDescription>{_escape(e.description)}</p:NewDescription>"
                f"<p:NewLeaseTime>{self._remaining(e, now)}</p:NewLeaseTime>"
                "</p:PortMappingEntry>"
            )
        rows.append("</p:PortMappingList>")
        return {"NewPortListing": "\n".join(rows)}

    # WANCommonInterfaceConfig -------------------------------------------------------------------

    def _do_GetCommonLinkProperties(
        self, args: Mapping[str, str], requester: str
    ) -> dict[str, str]:
        up = self.connection_status == "Connected"
        return {
            "NewWANAccessType": "Cable",
            "NewLayer1UpstreamMaxBitRate": "1000000000",
            "NewLayer1DownstreamMaxBitRate": "1000000000",
            "NewPhysicalLinkStatus": "Up" if up else "Down",
        }

    def _do_GetTotalBytesSent(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {"NewTotalBytesSent": "0"}

    def _do_GetTotalBytesReceived(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {"NewTotalBytesReceived": "0"}

    def _do_GetTotalPacketsSent(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        return {"NewTotalPacketsSent": "0"}

    def _do_GetTotalPacketsReceived(
        self, args: Mapping[str, str], requester: str
    ) -> dict[str, str]:
        return {"NewTotalPacketsReceived": "0"}

    # helpers ------------------------------------------------------------------------------------

    def _expire(self) -> float:
        now = self._clock()
        dead = [
            k for k, e in self._table.items() if e.expires_at is not None and now >= e.expires_at
        ]
        for key in dead:
            del self._table[key]
        self._hidden = [e for e in self._hidden if e.expires_at is None or now < e.expires_at]
        return now

    @staticmethod
    def _remaining(entry: _Entry, now: float) -> int:
        if entry.expires_at is None:
            return 0
        return max(0, math.ceil(entry.expires_at - now))

    def _reported_external_ip(self) -> str:
        ip = self.external_ip.strip()
        if ip == "0.0.0.0" or (self.refuse_private_wan and not counts_as_public(ip)):
            return ""
        return ip

    @staticmethod
    def _port_arg(args: Mapping[str, str], name: str) -> int:
        text = args.get(name, "").strip()
        if not _DIGITS.fullmatch(text) or int(text) > 65535:
            raise _Refused(402)
        return int(text)

    @staticmethod
    def _proto_arg(args: Mapping[str, str]) -> Proto:
        text = args.get("NewProtocol", "").strip().upper()
        if text not in ("TCP", "UDP"):
            raise _Refused(402)
        return Proto(text)

    @staticmethod
    def _client_arg(args: Mapping[str, str], requester: str, *, required: bool) -> str:
        if "NewInternalClient" not in args and required:
            raise _Refused(402)
        text = args.get("NewInternalClient", "").strip()
        if not text:
            return requester
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise _Refused(402) from None

    def _grant_lease(self, args: Mapping[str, str]) -> int:
        text = args.get("NewLeaseDuration", "").strip() or "0"
        if not _DIGITS.fullmatch(text) or int(text) > 0xFFFFFFFF:
            raise _Refused(402)
        requested = int(text)
        if self.lease_mode == "permanent_only_725" and requested:
            raise _Refused(725)
        if self.lease_mode == "permanent_only_402" and requested:
            raise _Refused(402)
        if self.forced_lease is not None:
            return self.forced_lease
        if self.lease_cap is not None and (requested == 0 or requested > self.lease_cap):
            return self.lease_cap
        v2_clamp = self.lease_mode == "normal" and self.igd_version >= 2
        if v2_clamp and (requested == 0 or requested > MAX_LEASE_V2):
            return MAX_LEASE_V2
        return requested

    def _authorise(self, client: str, requester: str, ext_port: int, int_port: int) -> None:
        denied = 606 if self.igd_version >= 2 else 718
        if self.secure_mode and not _same_ip(client, requester):
            raise _Refused(denied)
        low_ok = self.allow_low_ports
        if int_port == 0 or (not low_ok and (ext_port < 1024 or int_port < 1024)):
            raise _Refused(denied)
        if self.refuse_private_wan and not counts_as_public(self.external_ip):
            raise _Refused(501)

    def _store(
        self,
        proto: Proto,
        ext_port: int,
        client: str,
        int_port: int,
        args: Mapping[str, str],
        lease: int,
    ) -> None:
        remote = args.get("NewRemoteHost", "").strip()
        key = (proto, ext_port)
        existing = self._table.get(key)
        if existing is not None and (
            existing.internal_client != client or existing.remote_host != remote
        ):
            raise _Refused(718)
        if existing is not None and self.refresh_conflict:
            raise _Refused(718)
        if existing is None and len(self._table) + len(self._hidden) >= self.max_mappings:
            raise _Refused(self.full_fault or (728 if self.igd_version >= 2 else 501))
        now = self._clock()
        if lease == 0:
            expires_at: float | None = None
        elif self.lease_mode == "drops_timed":
            expires_at = now  # accepted, and gone by the next look
        else:
            expires_at = now + lease
        description = args.get("NewPortMappingDescription", "")
        if self.description_limit is not None:
            description = description[: self.description_limit]
        entry = _Entry(
            proto,
            ext_port,
            client,
            int_port,
            description,
            remote,
            lease,
            expires_at,
        )
        if self.unreadable:
            self._hidden.append(entry)  # installed, never reported; a re-add is one more
            return
        if existing is None:
            entry.unseen = self.late_visible
        self._table[key] = entry  # an update keeps its place in the generic list

    def _range_args(self, args: Mapping[str, str]) -> tuple[int, int, Proto, bool]:
        first = self._port_arg(args, "NewStartPort")
        last = self._port_arg(args, "NewEndPort")
        proto = self._proto_arg(args)
        manage_text = args.get("NewManage", "").strip().lower()
        if manage_text not in ("", "0", "1", "true", "false", "yes", "no"):
            raise _Refused(402)
        if first > last:
            raise _Refused(733)
        return first, last, proto, manage_text in ("1", "true", "yes")

    # -- HTTP (still sans-I/O) ---------------------------------------------------------------------

    def description_xml(self) -> bytes:
        """The root description: IGD -> WANDevice -> WANConnectionDevice -> WANIPConnection.

        ``description_override`` replaces it with any document (router-facts.md layouts); its
        control URLs must start with ``/ctl/`` to reach the simulated service.
        """
        if self.description_override is not None:
            return self.description_override
        v = self.igd_version
        name = _escape(self.friendly_name)
        udn = self.udn

        def device(kind: str, suffix: str, services: str, children: str) -> str:
            return (
                f"<device><deviceType>urn:schemas-upnp-org:device:{kind}:{v}</deviceType>"
                f"<friendlyName>{name}</friendlyName><manufacturer>igdtrigger</manufacturer>"
                f"<modelDescription>Simulated {kind}</modelDescription>"
                f"<modelName>igdtrigger-simulated</modelName><modelNumber>{v}</modelNumber>"
                f"<serialNumber>00000000</serialNumber><UDN>{udn}{suffix}</UDN>"
                f"<serviceList>{services}</serviceList>"
                + (f"<deviceList>{children}</deviceList>" if children else "")
                + "</device>"
            )

        def service(stype: str, sid: str, scpd: str, control: str, event: str) -> str:
            return (
                f"<service><serviceType>urn:schemas-upnp-org:service:{stype}</serviceType>"
                f"<serviceId>urn:upnp-org:serviceId:{sid}</serviceId>"
                f"<SCPDURL>{scpd}</SCPDURL><controlURL>{control}</controlURL>"
                f"<eventSubURL>{event}</eventSubURL></service>"
            )

        ipconn = service(
            f"{self.service_name}:{v}",
            "WANIPConn1",
            IPCONN_SCPD_PATH,
            IPCONN_CONTROL_PATH,
            IPCONN_EVENT_PATH,
        )
        cif = service(
            "WANCommonInterfaceConfig:1",
            "WANCommonIFC1",
            CIF_SCPD_PATH,
            CIF_CONTROL_PATH,
            CIF_EVENT_PATH,
        )
        conn_dev = device("WANConnectionDevice", "-2", ipconn, "")
        wan_dev = device("WANDevice", "-1", cif, conn_dev)
        if self.first_wan is not None:  # multi-WAN: another WANDevice listed first
            first_conn = service(f"{self.first_wan.service_name}:{v}", "WANIPConn1",
                                 IPCONN_SCPD_PATH,
                                 FIRST_WAN_CONTROL_PATH, IPCONN_EVENT_PATH)
            wan_dev = device("WANDevice", "-3", "", device("WANConnectionDevice", "-4",
                                                           first_conn, "")) + wan_dev
        igd = device("InternetGatewayDevice", "", "", wan_dev)
        return (
            '<?xml version="1.0"?>\r\n'
            '<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337">'
            "<specVersion><major>1</major><minor>1</minor></specVersion>"
            f"{igd}</root>\r\n"
        ).encode()

    def scpd_xml(self, path: str) -> bytes | None:
        if path == IPCONN_SCPD_PATH:
            actions = {
                k: v
                for k, v in _IPCONN_ACTIONS.items()
                if self.igd_version >= 2 or k not in _V2_ONLY_ACTIONS
            }
            return _render_scpd(actions)
        if path == CIF_SCPD_PATH:
            return _render_scpd(_CIF_ACTIONS)
        return None

    def handle_http(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        requester: str,
    ) -> HttpResponse:
        """Answer one parsed HTTP request. ``headers`` has lower-case names."""
        path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
        self.http_requests[f"{method} {path}"] += 1
        if path.startswith("/ctl/"):
            if method != "POST":
                return HttpResponse(405, b"", HTML_CONTENT_TYPE, (("Allow", "POST"),))
            if path == FIRST_WAN_CONTROL_PATH and self.first_wan is not None:
                return self.first_wan._handle_soap(headers, body, requester)
            return self._handle_soap(headers, body, requester)
        if path.startswith("/evt/"):
            return _html_error(501, "eventing is not simulated")
        document = self.description_xml() if path == ROOT_DESC_PATH else self.scpd_xml(path)
        if document is None:
            return _html_error(404, "Not Found")
        if method not in ("GET", "HEAD"):
            return HttpResponse(405, b"", HTML_CONTENT_TYPE, (("Allow", "GET, HEAD"),))
        return HttpResponse(200, document)

    def _handle_soap(self, headers: Mapping[str, str], body: bytes, requester: str) -> HttpResponse:
        header = headers.get("soapaction")
        if header is None:
            return _html_error(400, "SOAPAction header missing")
        parsed = parse_soap_action(header)
        if parsed is None:
            return self._fault_response(UPnPFault.of(401))
        namespace, action = parsed
        hooked = self.http_hook(action) if self.http_hook is not None else None
        if hooked is not None:
            self.calls[action] += 1
            return hooked
        try:
            args = parse_soap_arguments(body)
        except ValueError:
            self.calls[action] += 1
            self.errors[402] += 1
            self.log.append(ActionRecord(self._clock(), requester, action, {}, 402))
            return self._fault_response(UPnPFault.of(402))
        result = self.call(action, args, requester=requester)
        if isinstance(result, UPnPFault):
            return self._fault_response(result)
        return HttpResponse(200, render_soap_response(namespace, action, result))

    def _fault_response(self, fault: UPnPFault) -> HttpResponse:
        return HttpResponse(500, render_soap_fault(fault, self.fault_style))


def _same_ip(a: str, b: str) -> bool:
    return _normalise_ip(a) == _normalise_ip(b)


def _spiral(start: int, low: int, high: int) -> Iterator[int]:
    """start, start+1, start-1, start+2, start-2 ... within [low, high] (miniupnpd's search)."""
    yield start
    for step in range(1, high - low + 1):
        up, down = start + step, start - step
        if up > high and down < low:
            return
        if up <= high:
            yield up
        if down >= low:
            yield down


# --- the asyncio HTTP server ---------------------------------------------------------------------


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _ProtocolError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the simulated IGD listens on loopback only (127.0.0.1 or ::1), not {host!r}"
        )


class SimulatedIgdServer:
    """A loopback HTTP server in front of a ``SimulatedRouter``.

    ``await start()`` then give ``url`` to a client (``miniupnpc.UPnP().selectigd(url)``).
    ``down()`` closes the listening socket (clients get connection refused), ``up()`` listens on
    the same port again, ``restart()`` clears the router's table and by default moves to a new
    port, as miniupnpd does with ``http_port=0``. Also an async context manager.
    """

    def __init__(
        self, router: SimulatedRouter | None = None, *, request_timeout: float = 10.0
    ) -> None:
        self.router = router if router is not None else SimulatedRouter()
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._connections: set[asyncio.Task[Any]] = set()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the simulated IGD has not been started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The root description URL, e.g. ``http://127.0.0.1:PORT/rootDesc.xml``."""
        return self.base_url + ROOT_DESC_PATH

    @property
    def control_url(self) -> str:
        return self.base_url + IPCONN_CONTROL_PATH

    @property
    def is_up(self) -> bool:
        return self._server is not None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (port 0 = pick one); returns ``url``."""
        _check_loopback(host)
        if self._server is not None:
            raise RuntimeError("the simulated IGD is already listening")
        self._host = host
        self._server = await self._listen(port)
        return self.url

    async def down(self) -> None:
        """Stop listening and drop open connections; the table is kept."""
        server, self._server = self._server, None
        await self._shut(server, set(self._connections))

    async def up(self) -> None:
        """Listen again on the same port after ``down()``."""
        if self._server is None:
            if not self._port:
                raise RuntimeError("start() the simulated IGD first")
            self._server = await self._listen(self._port)

    async def restart(self, *, new_port: bool = True) -> None:
        """Simulate a daemon restart: empty table, new uptime, and (by default) a new port."""
        self.router.restart()
        old_server, old_port = self._server, self._port
        old_connections = set(self._connections)
        if new_port:
            self._server = await self._listen(0)  # opened before the old one closes: a new port
            await self._shut(old_server, old_connections)
        else:
            self._server = None
            await self._shut(old_server, old_connections)
            self._server = await self._listen(old_port or 0)

    async def close(self) -> None:
        await self.down()

    async def __aenter__(self) -> SimulatedIgdServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _listen(self, port: int) -> asyncio.Server:
        server = await asyncio.start_server(
            self._on_connection,
            self._host,
            port,
            limit=MAX_HEADER_BYTES,
            reuse_address=True,
        )
        self._port = server.sockets[0].getsockname()[1]
        return server

    async def _shut(
        self, server: asyncio.Server | None, connections: set[asyncio.Task[Any]]
    ) -> None:
        """Stop ``server`` listening and cancel the given in-flight connections."""
        if server is None:
            return
        server.close()
        tasks = list(connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- one connection = one request --------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # down()/close() dropping a request in flight (a stop while a slow or loaded
            # machine's client still waits for its answer): the end of this connection, not an
            # error. Re-raised, asyncio's stream callback would log "Exception in callback" at
            # ERROR with a traceback (CPython 3.11 asks a cancelled task for its exception).
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        requester = _normalise_ip(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        version = "HTTP/1.1"
        failed = False
        request: _Request | None = None
        try:
            async with asyncio.timeout(self.request_timeout):
                request = await _read_request(reader, writer)
        except _ProtocolError as exc:
            response, failed = _html_error(exc.status, str(exc)), True
        except TimeoutError:
            response, failed = _html_error(408, "request not received in time"), True
        if request is None and not failed:
            return  # the client went away without a request
        if request is not None:
            version = request.version
            try:
                response = self.router.handle_http(
                    request.method,
                    request.target,
                    request.headers,
                    request.body,
                    requester=requester,
                )
            except Exception as exc:  # a bug in a hook or the router: answer, keep serving
                response = _html_error(500, f"simulator error: {exc.__class__.__name__}")
        if self.router.latency > 0:
            await asyncio.sleep(self.router.latency)
        head_only = request is not None and request.method == "HEAD"
        writer.write(_serialise(response, version, self.router.server_header, head_only))
        await writer.drain()
        if failed:
            await _linger(reader, writer)


def _serialise(response: HttpResponse, version: str, server: str, head_only: bool) -> bytes:
    lines = [
        f"{version} {response.status} {response.reason}",
        f"Content-Type: {response.content_type}",
        "Connection: close",
        f"Content-Length: {len(response.body)}",
        f"Server: {server}",
        "Ext:",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head if head_only else head + response.body


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> _Request | None:
    """Read one request; ``None`` if the peer closed before sending anything."""
    total = 0

    async def line() -> bytes:
        nonlocal total
        try:
            raw = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise _ProtocolError(400, "request line or header too long") from None
        total += len(raw)
        if total > MAX_HEADER_BYTES:
            raise _ProtocolError(400, "request headers too large")
        return raw

    first = await line()
    while first in (b"\r\n", b"\n"):  # tolerate stray blank lines before the request
        first = await line()
    if not first:
        return None
    if not first.endswith(b"\n"):
        raise _ProtocolError(400, "incomplete request line")
    parts = first.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise _ProtocolError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _ProtocolError(505 if version.startswith("HTTP/") else 400, "unsupported version")
    if not target.startswith("/") and not target.startswith("http://"):
        raise _ProtocolError(400, "malformed request target")
    request = _Request(method, target, version)
    for _ in range(MAX_HEADER_LINES + 1):
        raw = await line()
        if not raw.endswith(b"\n"):
            raise _ProtocolError(400, "connection closed inside the headers")
        text = raw.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _ProtocolError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key == "content-length" and request.headers.get(key, value) != value:
            raise _ProtocolError(400, "conflicting Content-Length headers")
        request.headers[key] = value
    else:
        raise _ProtocolError(400, "too many header lines")

    if "transfer-encoding" in request.headers:
        raise _ProtocolError(501, "chunked request bodies are not supported; send Content-Length")
    length_text = request.headers.get("content-length")
    if length_text is None:
        if method == "POST":
            raise _ProtocolError(411, "Content-Length required")
        return request
    if not _DIGITS.fullmatch(length_text):
        raise _ProtocolError(400, "invalid Content-Length")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise _ProtocolError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if request.headers.get("expect", "").lower() == "100-continue":
        writer.write(f"{version} 100 Continue\r\n\r\n".encode())
        await writer.drain()
    request.body = await reader.readexactly(length)
    return request


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an early error answer, read (and drop) what the client is still sending for a
    moment, so closing does not reset the connection before the client reads the answer."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            received = 0
            while received < 4 * MAX_BODY_BYTES:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += len(chunk)


# --- a server on its own thread (for synchronous users) ------------------------------------------


class SimulatedIgdThread:
    """A ``SimulatedIgdServer`` running on a private event loop in a daemon thread.

    The router lives on that thread: from the calling thread, touch it through ``call`` (or when
    nothing is talking to the server). Stop with ``stop()`` or use as a context manager.
    """

    def __init__(self, server: SimulatedIgdServer, host: str, port: int) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, args=(host, port), name="simulated-igd", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            try:
                self._loop.run_until_complete(self.server.start(host, port))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.server.close())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()

    @property
    def router(self) -> SimulatedRouter:
        return self.server.router

    @property
    def url(self) -> str:
        return self.server.url

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine (e.g. ``server.restart()``) on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` on the server's thread (safe access to the router) and return its result."""

        async def invoke() -> T:
            return fn()

        return self.run(invoke(), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> SimulatedIgdThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_in_thread(
    router: SimulatedRouter | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> SimulatedIgdThread:
    """Start a simulated IGD on a background thread; returns a handle with ``.url``/``.stop()``."""
    _check_loopback(host)
    return SimulatedIgdThread(SimulatedIgdServer(router), host, port)
