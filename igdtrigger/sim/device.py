"""The simulated IGD's protocol logic: SOAP actions on the mapping table, and whole HTTP
requests answered without I/O (``SimulatedRouter.handle_http``).

``SimulatedRouter`` answers actions (``call("AddPortMapping", {...}, requester=...)`` -> dict
of out-arguments or ``UpnpFault``) following miniupnpd (shared/reference/router-facts.md §1,
§4, §7); the table and knobs it works on are ``table.MappingTable``. SOAP is read and written
with the client's own codec (``gateway.upnp.codec``: ``parse_soap_action``,
``parse_soap_arguments``, ``render_soap_response``, ``render_soap_fault``), so the simulator and
the client agree on one encoding and one fault table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from igdtrigger.gateway.upnp.codec import (
    UpnpFault,
    escape_xml,
    parse_soap_action,
    parse_soap_arguments,
    render_soap_fault,
    render_soap_response,
)
from igdtrigger.sim import describe
from igdtrigger.sim.describe import (
    CIF_ACTIONS,
    FIRST_WAN_CONTROL_PATH,
    IPCONN_ACTIONS,
    ROOT_DESC_PATH,
    V2_ONLY_ACTIONS,
)
from igdtrigger.sim.table import (
    DIGITS,
    ActionRecord,
    MappingTable,
    Refused,
    normalise_ip,
    same_ip,
    spiral,
)

__all__ = ["HTML_CONTENT_TYPE", "XML_CONTENT_TYPE", "HttpResponse", "SimulatedRouter", "html_error"]

XML_CONTENT_TYPE = 'text/xml; charset="utf-8"'
HTML_CONTENT_TYPE = "text/html"

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


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What to send back for one request; the server adds the framing headers."""

    status: int
    body: bytes = b""
    content_type: str = XML_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def reason(self) -> str:
        """The status's reason phrase."""
        return _HTTP_REASONS.get(self.status, "Unknown")


def html_error(status: int, text: str) -> HttpResponse:
    """An HTML error page, as a router's web server sends one."""
    reason = _HTTP_REASONS.get(status, "Error")
    body = (f"<HTML><HEAD><Title>{status} {reason}</Title></HEAD>"
            f"<BODY>{escape_xml(text)}</BODY></HTML>")
    return HttpResponse(status, (body + "\r\n").encode(), HTML_CONTENT_TYPE)


class SimulatedRouter(MappingTable):
    """A miniupnpd-like IGD: the actions, the description documents and HTTP handling on top of
    a ``MappingTable`` (whose docstring lists the options). No I/O, no threads."""

    @property
    def service_type(self) -> str:
        """The WAN service's URN for this router's name and IGD version."""
        return f"urn:schemas-upnp-org:service:{self.service_name}:{self.igd_version}"

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

    # -- actions ---------------------------------------------------------------------------------

    def call(
        self, action: str, args: Mapping[str, str], *, requester: str = "127.0.0.1"
    ) -> dict[str, str] | UpnpFault:
        """Answer one action: out-arguments in spec order, or the fault to send."""
        requester = normalise_ip(requester)
        self.calls[action] += 1
        self._expire()
        result: dict[str, str] | UpnpFault
        armed = self._take_armed(action)
        hooked = self.action_hook(action, args) if armed is None and self.action_hook else None
        if armed is not None:
            result = armed
        elif hooked is not None:
            result = hooked
        else:
            try:
                result = self._dispatch(action, args, requester)
            except Refused as refused:
                result = refused.fault
        code = result.code if isinstance(result, UpnpFault) else None
        if code is not None:
            self.errors[code] += 1
        logged = {k: v[:256] for k, v in list(args.items())[:32]}
        self.log.append(ActionRecord(self._clock(), requester, action, logged, code))
        return result

    def _dispatch(self, action: str, args: Mapping[str, str], requester: str) -> dict[str, str]:
        if action in V2_ONLY_ACTIONS and self.igd_version < 2:
            raise Refused(401)
        handler = getattr(self, f"_do_{action}", None)
        if handler is None or (action not in IPCONN_ACTIONS and action not in CIF_ACTIONS):
            raise Refused(401)
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
            raise Refused(716)
        ext_port = self._port_arg(args, "NewExternalPort")
        int_port = self._port_arg(args, "NewInternalPort")
        proto = self._proto_arg(args)
        if ext_port == 0:
            raise Refused(716)
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
        for candidate in spiral(start, lowest, 65535):
            existing = self._table.get((proto, candidate))
            if existing is None:
                if len(self._table) >= self.max_mappings:
                    raise Refused(728)
            elif existing.internal_client != client or existing.remote_host != remote:
                continue
            self._store(proto, candidate, client, int_port, args, lease)
            return {"NewReservedPort": str(candidate)}
        raise Refused(728)

    def _do_DeletePortMapping(self, args: Mapping[str, str], requester: str) -> dict[str, str]:
        ext_port = self._port_arg(args, "NewExternalPort")
        proto = self._proto_arg(args)
        if self.unreadable:
            copy = next((e for e in self._hidden if (e.proto, e.external_port) ==
                         (proto, ext_port)), None)
            if copy is None:
                raise Refused(714)
            self._hidden.remove(copy)
            return {}
        entry = self._table.get((proto, ext_port))
        if entry is None:
            raise Refused(714)
        if self.secure_mode and not same_ip(entry.internal_client, requester):
            raise Refused(606 if self.igd_version >= 2 else 714)
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
            and (manage or same_ip(e.internal_client, requester))
        ]
        if not doomed:
            raise Refused(730)
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
            raise Refused(714)
        if entry.unseen > 0:
            entry.unseen -= 1
            raise Refused(714)
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
        if not DIGITS.fullmatch(text):
            raise Refused(402)
        index = int(text)
        if index >= len(self._table):
            raise Refused(713)
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
        if not DIGITS.fullmatch(count_text):
            raise Refused(402)
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
            raise Refused(730)
        rows = [
            '<p:PortMappingList xmlns:p="urn:schemas-upnp-org:gw:WANIPConnection" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="urn:schemas-upnp-org:gw:WANIPConnection '
            'http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd">'
        ]
        for e in entries:
            rows.append(
                "<p:PortMappingEntry>"
                f"<p:NewRemoteHost>{escape_xml(e.remote_host)}</p:NewRemoteHost>"
                f"<p:NewExternalPort>{e.external_port}</p:NewExternalPort>"
                f"<p:NewProtocol>{e.proto.value}</p:NewProtocol>"
                f"<p:NewInternalPort>{e.internal_port}</p:NewInternalPort>"
                f"<p:NewInternalClient>{escape_xml(e.internal_client)}</p:NewInternalClient>"
                "<p:NewEnabled>1</p:NewEnabled>"
                f"<p:NewDescription>{escape_xml(e.description)}</p:NewDescription>"
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

    # -- HTTP (still sans-I/O) ---------------------------------------------------------------------

    def description_xml(self) -> bytes:
        """The root description (``describe.description_xml``)."""
        return describe.description_xml(self)

    def scpd_xml(self, path: str) -> bytes | None:
        """The service description at ``path``, or ``None``."""
        return describe.scpd_xml(self.igd_version, path)

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
            return html_error(501, "eventing is not simulated")
        document = self.description_xml() if path == ROOT_DESC_PATH else self.scpd_xml(path)
        if document is None:
            return html_error(404, "Not Found")
        if method not in ("GET", "HEAD"):
            return HttpResponse(405, b"", HTML_CONTENT_TYPE, (("Allow", "GET, HEAD"),))
        return HttpResponse(200, document)

    def _handle_soap(self, headers: Mapping[str, str], body: bytes, requester: str) -> HttpResponse:
        header = headers.get("soapaction")
        if header is None:
            return html_error(400, "SOAPAction header missing")
        parsed = parse_soap_action(header)
        if parsed is None:
            return self._fault_response(UpnpFault.of(401))
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
            return self._fault_response(UpnpFault.of(402))
        result = self.call(action, args, requester=requester)
        if isinstance(result, UpnpFault):
            return self._fault_response(result)
        return HttpResponse(200, render_soap_response(namespace, action, result))

    def _fault_response(self, fault: UpnpFault) -> HttpResponse:
        return HttpResponse(500, render_soap_fault(fault, self.fault_style))
