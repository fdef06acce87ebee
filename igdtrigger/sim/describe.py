"""The simulated IGD's description documents: the root description and the SCPDs, from the
action signatures (which also say which actions exist: ``IPCONN_ACTIONS``, ``CIF_ACTIONS``).
Sans-I/O; the URL paths they name are the ones ``device.SimulatedRouter.handle_http`` serves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from igdtrigger.gateway.upnp.codec import escape_xml
from igdtrigger.sim.table import SIMULATED_EXTERNAL

if TYPE_CHECKING:
    from igdtrigger.sim.device import SimulatedRouter

__all__ = [
    "CIF_ACTIONS", "CIF_CONTROL_PATH", "CIF_EVENT_PATH", "CIF_SCPD_PATH", "FIRST_WAN_CONTROL_PATH",
    "IPCONN_ACTIONS", "IPCONN_CONTROL_PATH", "IPCONN_EVENT_PATH", "IPCONN_SCPD_PATH",
    "ROOT_DESC_PATH", "V2_ONLY_ACTIONS", "description_xml", "scpd_xml",
]

ROOT_DESC_PATH = "/rootDesc.xml"
IPCONN_CONTROL_PATH = "/ctl/IPConn"
FIRST_WAN_CONTROL_PATH = "/ctl/WAN0/IPConn"  # SimulatedRouter.add_first_wan
IPCONN_EVENT_PATH = "/evt/IPConn"
IPCONN_SCPD_PATH = "/WANIPCn.xml"
CIF_CONTROL_PATH = "/ctl/CmnIfCfg"
CIF_EVENT_PATH = "/evt/CmnIfCfg"
CIF_SCPD_PATH = "/WANCfg.xml"

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
_MAPPING_IN: _Args = _KEY_IN + _ENTRY_OUT  # AddPortMapping's arguments, in the spec's order
_RANGE_IN: _Args = (
    ("NewStartPort", "ExternalPort"),
    ("NewEndPort", "ExternalPort"),
    ("NewProtocol", "PortMappingProtocol"),
    ("NewManage", "A_ARG_TYPE_Manage"),
)

IPCONN_ACTIONS: dict[str, tuple[_Args, _Args]] = {
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
V2_ONLY_ACTIONS = frozenset(
    {"AddAnyPortMapping", "DeletePortMappingRange", "GetListOfPortMappings"}
)

CIF_ACTIONS: dict[str, tuple[_Args, _Args]] = {
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


def description_xml(router: SimulatedRouter) -> bytes:
    """The root description: IGD -> WANDevice -> WANConnectionDevice -> WANIPConnection.

    ``description_override`` replaces it with any document (router-facts.md layouts); its
    control URLs must start with ``/ctl/`` to reach the simulated service.
    """
    if router.description_override is not None:
        return router.description_override
    v = router.igd_version
    name = escape_xml(router.friendly_name)
    udn = router.udn

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
        f"{router.service_name}:{v}",
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
    if router.first_wan is not None:  # multi-WAN: another WANDevice listed first
        first_conn = service(f"{router.first_wan.service_name}:{v}", "WANIPConn1",
                             IPCONN_SCPD_PATH,
                             FIRST_WAN_CONTROL_PATH, IPCONN_EVENT_PATH)
        wan_dev = device("WANDevice", "-3", "", device("WANConnectionDevice", "-4",
                                                       first_conn, "")) + wan_dev
    igd = device("InternetGatewayDevice", "", "", wan_dev).replace(
        "<device>", f"<device><X_publicStandIn>{SIMULATED_EXTERNAL}</X_publicStandIn>", 1)
    return (
        '<?xml version="1.0"?>\r\n'
        '<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337">'
        "<specVersion><major>1</major><minor>1</minor></specVersion>"
        f"{igd}</root>\r\n"
    ).encode()


def scpd_xml(igd_version: int, path: str) -> bytes | None:
    """The SCPD document at ``path`` (``None``: no such document)."""
    if path == IPCONN_SCPD_PATH:
        actions = {
            k: v
            for k, v in IPCONN_ACTIONS.items()
            if igd_version >= 2 or k not in V2_ONLY_ACTIONS
        }
        return _render_scpd(actions)
    if path == CIF_SCPD_PATH:
        return _render_scpd(CIF_ACTIONS)
    return None
