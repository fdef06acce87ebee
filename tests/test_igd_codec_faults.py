"""The UPnP codec's edges, each found by a mutant that no other test killed: the fault mapping
(every UPnP error code a router sends, for port mappings and for pinholes), SOAP faults without
an error code, a bare HTTP error, the XML hardening, service choice in descriptions, SSDP
replies that are not 200, NOTIFYs that are neither alive nor byebye, and the size limits."""

from __future__ import annotations

from typing import Any

import defusedxml.ElementTree as DET
import pytest

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
from igdtrigger.gateway.base import RouterChangeKind
from igdtrigger.gateway.upnp.codec import (
    FIREWALL_SERVICE,
    MAX_DESCRIPTION,
    MAX_SOAP,
    MalformedReply,
    UpnpFault,
    build_soap,
    fault_error,
    firewall_status,
    ints,
    mapping_args,
    parse_description,
    parse_soap_response,
    pick,
    pinhole_args,
    pinhole_uid,
    reserved_port,
)
from igdtrigger.gateway.upnp.ssdp import NotifyTracker, build_msearch, parse_ssdp, parse_ssdp_notify

GW = "192.168.1.1"
LOC = f"http://{GW}:5000/rootDesc.xml"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
WANPPP2 = "urn:schemas-upnp-org:service:WANPPPConnection:2"
DSL_IP = "urn:dslforum-org:service:WANIPConnection:1"
DSL_PPP = "urn:dslforum-org:service:WANPPPConnection:1"
L3F = "urn:schemas-upnp-org:service:Layer3Forwarding:1"
WANCIC = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"


# --- the fault mapping ----------------------------------------------------------------------

# UPnP-arch-DeviceArchitecture / WANIPConnection:2 / WANIPv6FirewallControl:1 error names
SPEC_NAMES = {
    401: "Invalid Action", 402: "Invalid Args", 501: "Action Failed",
    602: "Optional Action Not Implemented", 606: "Action not authorized",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray", 716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry", 724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported", 728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms", 730: "PortMappingNotFound",
    701: "PinholeSpaceExhausted", 702: "FirewallDisabled", 703: "InboundPinholeNotAllowed",
    704: "NoSuchEntry",
}


@pytest.mark.parametrize(("code", "name"), sorted(SPEC_NAMES.items()))
def test_a_fault_without_description_is_named_from_the_spec(code: int, name: str) -> None:
    action = "AddPinhole" if 701 <= code <= 704 else "AddPortMapping"
    err = fault_error(action, UpnpFault(code, ""))
    assert isinstance(err, ActionFailed) and err.code == code
    assert err.description == name
    assert f"{code} {name}" in str(err)


def test_the_routers_own_description_wins_over_the_spec_name() -> None:
    err = fault_error("AddPortMapping", UpnpFault(718, "in use by 192.168.1.9"))
    assert err.description == "in use by 192.168.1.9"  # type: ignore[attr-defined]


def test_unknown_code_or_none_without_description() -> None:
    err = fault_error("AddPortMapping", UpnpFault(899, ""))
    assert type(err) is ActionFailed and "899 UPnPError" in str(err)
    err = fault_error("AddPortMapping", UpnpFault(None, ""))
    assert type(err) is ActionFailed and err.code is None
    assert str(err) == "router refused AddPortMapping: UPnPError"


@pytest.mark.parametrize(("action", "code", "exc"), [
    # port mappings
    ("AddPortMapping", 606, NotAuthorized),
    ("AddPortMapping", 718, MappingConflict),
    ("AddAnyPortMapping", 729, MappingConflict),
    ("AddPortMapping", 725, LeaseRefused),
    ("DeletePortMapping", 714, NoSuchMapping),
    ("GetSpecificPortMappingEntry", 714, NoSuchMapping),
    ("DeletePortMapping", 730, NoSuchMapping),  # 730 means "already gone", not a hard error
    ("GetSpecificPortMappingEntry", 730, NoSuchMapping),
    ("AddPortMapping", 704, ActionFailed),  # a pinhole code on a mapping action: nothing special
    ("AddPortMapping", 728, TableFull),
    ("AddPortMapping", 501, ActionFailed),
    ("AddPortMapping", 716, ActionFailed),
    ("AddPortMapping", 724, ActionFailed),
    ("GetGenericPortMappingEntry", 713, NoSuchMapping),  # past the end of the table
    ("AddAnyPortMapping", 401, UnsupportedAction),
    ("AddAnyPortMapping", 602, UnsupportedAction),
    ("AddPortMapping", 402, InvalidArgs),
    # pinholes
    ("AddPinhole", 606, NotAuthorized),
    ("DeletePinhole", 704, NoSuchMapping),
    ("UpdatePinhole", 704, NoSuchMapping),
    ("AddPinhole", 701, ActionFailed),  # no room: not "no such pinhole"
    ("AddPinhole", 702, ActionFailed),  # firewall off
    ("AddPinhole", 703, ActionFailed),  # inbound pinholes refused
    ("DeletePinhole", 501, ActionFailed),
])
def test_fault_codes_map_to_one_error_each(action: str, code: int, exc: type[Exception]) -> None:
    err = fault_error(action, UpnpFault(code, "x"))
    assert type(err) is exc
    assert err.action == action and err.code == code  # type: ignore[attr-defined]


def test_606_hint_names_the_right_remedy() -> None:
    pin = str(fault_error("AddPinhole", UpnpFault(606, "x")))
    fwd = str(fault_error("AddPortMapping", UpnpFault(606, "x")))
    assert pin.endswith(PINHOLE_SELF_HINT) and SECURE_MODE_HINT not in pin
    assert fwd.endswith(SECURE_MODE_HINT) and PINHOLE_SELF_HINT not in fwd


def test_402_is_invalid_args_naming_the_lease_asked() -> None:
    """A 402 on a timed add is not yet "timed leases refused": only a lease-0 retry tells."""
    timed = fault_error("AddPortMapping", UpnpFault(402, "Invalid Args"), lease=3600)
    assert type(timed) is InvalidArgs
    assert timed.description == "Invalid Args (lease 3600s asked)"
    for lease in (0, None):
        err = fault_error("AddPortMapping", UpnpFault(402, "Invalid Args"), lease=lease)
        assert type(err) is InvalidArgs
        assert err.description == "Invalid Args"


# --- SOAP replies -----------------------------------------------------------------------------


def envelope(body: str) -> bytes:
    return ('<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
            f'envelope/"><s:Body>{body}</s:Body></s:Envelope>').encode()


def test_soap_fault_without_errorcode_is_a_fault_not_a_crash() -> None:
    body = envelope('<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError'
                    '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                    "<errorDescription>Refused by policy</errorDescription></UPnPError>"
                    "</detail></s:Fault>")
    got = parse_soap_response(500, body, "AddPortMapping")
    assert got == UpnpFault(None, "Refused by policy")
    assert isinstance(got, UpnpFault)
    err = fault_error("AddPortMapping", got)
    assert type(err) is ActionFailed
    assert str(err) == "router refused AddPortMapping: Refused by policy"


def test_soap_fault_with_nothing_inside() -> None:
    body = envelope("<s:Fault><faultcode>s:Server</faultcode></s:Fault>")
    assert parse_soap_response(500, body, "DeletePortMapping") == UpnpFault(None, "UPnPError")


def test_bare_upnperror_without_a_soap_fault() -> None:
    body = envelope("<UPnPError><errorCode> 718 </errorCode>"
                    "<errorDescription> Conflict </errorDescription></UPnPError>")
    assert parse_soap_response(500, body, "AddPortMapping") == UpnpFault(718, "Conflict")


def test_fault_error_code_that_is_not_a_number() -> None:
    body = envelope("<s:Fault><detail><UPnPError><errorCode>seven</errorCode>"
                    "</UPnPError></detail></s:Fault>")
    assert parse_soap_response(500, body, "AddPortMapping") == UpnpFault(None, "UPnPError")
    body = envelope("<s:Fault><detail><UPnPError><errorCode>-1</errorCode>"
                    "</UPnPError></detail></s:Fault>")
    assert parse_soap_response(500, body, "AddPortMapping") == UpnpFault(-1, "UPnPError")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 500, 503])
def test_bare_http_error_is_a_fault_without_a_code(status: int) -> None:
    for body in (b"", b"Bad Request", b"<html><body>Bad Request</body></html>"):
        got = parse_soap_response(status, body, "AddPortMapping")
        assert got == UpnpFault(None, f"HTTP {status} without a UPnP error")
        assert type(fault_error("AddPortMapping", got)) is ActionFailed


@pytest.mark.parametrize("status", [200, 204, 399])
def test_success_status_without_an_answer_is_malformed(status: int) -> None:
    with pytest.raises(MalformedReply, match="GetExternalIPAddress: router's reply has no "
                                             "GetExternalIPAddressResponse element"):
        parse_soap_response(status, b"", "GetExternalIPAddress")


def test_unparseable_fault_keeps_code_and_description() -> None:
    body = (b"<s:Envelope><s:Body><s:Fault><detail><u:UPnPError>"
            b'<u:errorCode attr="1">\n 729 \n</u:errorCode>'
            b"<u:ErrorDescription x='y'> ConflictWithOtherMechanisms </u:ErrorDescription>"
            b"</s:Fault>")  # unbalanced: not XML, the code is dug out
    assert parse_soap_response(500, body, "AddPortMapping") == \
        UpnpFault(729, "ConflictWithOtherMechanisms")
    no_desc = b"<Fault><errorCode>714</errorCode></Faul>"
    assert parse_soap_response(500, no_desc, "X") == UpnpFault(714, "UPnPError")
    empty_desc = b"<Fault><errorCode>714</errorCode><errorDescription>  </Faul>"
    assert parse_soap_response(500, empty_desc, "X") == UpnpFault(714, "UPnPError")


def test_response_values_by_local_name_trimmed() -> None:
    body = envelope('<u:GetExternalIPAddressResponse xmlns:u="urn:x">'
                    "<NewExternalIPAddress>\n 81.2.69.160 \n</NewExternalIPAddress>"
                    "<u:Other/></u:GetExternalIPAddressResponse>")
    assert parse_soap_response(200, body, "GetExternalIPAddress") == {
        "NewExternalIPAddress": "81.2.69.160", "Other": ""}
    # the answer to another action is not this one's
    with pytest.raises(MalformedReply):
        parse_soap_response(200, body, "GetStatusInfo")


def test_soap_size_limit() -> None:
    answer = envelope('<u:XResponse xmlns:u="urn:x"><A>1</A></u:XResponse>')
    pad = b" " * (MAX_SOAP - len(answer))
    assert parse_soap_response(200, answer + pad, "X") == {"A": "1"}  # exactly the limit
    with pytest.raises(MalformedReply, match="X: reply larger than 256 KiB"):
        parse_soap_response(200, answer + pad + b" ", "X")
    with pytest.raises(MalformedReply, match="larger than 256 KiB"):
        parse_soap_response(500, b"<errorCode>718</errorCode>" + b" " * MAX_SOAP, "X")


# --- XML hardening ----------------------------------------------------------------------------

DTD_ONLY = b'<?xml version="1.0"?><!DOCTYPE root [<!ELEMENT root ANY>]><root><device/></root>'
ENTITY = (b'<?xml version="1.0"?><!DOCTYPE root [<!ENTITY a "aaaa">]>'
          b"<root><device><friendlyName>&a;</friendlyName></device></root>")
EXTERNAL = (b'<?xml version="1.0"?><!DOCTYPE root [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b"<root><device><friendlyName>&x;</friendlyName></device></root>")


@pytest.mark.parametrize("doc", [DTD_ONLY, ENTITY, EXTERNAL])
def test_any_dtd_is_refused_before_it_is_read(doc: bytes) -> None:
    with pytest.raises(MalformedReply, match=r"uses forbidden XML features \(DTDForbidden\)"):
        parse_description(doc, LOC)
    # a SOAP answer behind a DTD is never taken for a success
    answer = doc.replace(b"<root><device>", b'<root><device><u:XResponse xmlns:u="urn:x">'
                         b"<A>1</A></u:XResponse>").replace(b"<device/>", b"<XResponse/>")
    assert b"XResponse" in answer
    with pytest.raises(MalformedReply, match="no XResponse element"):
        parse_soap_response(200, answer, "X")


def test_all_three_hardening_switches_are_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """DTDs are refused first, so entities and external references can never be reached while
    that holds; they are asked for anyway (defence in depth), and this pins that they are."""
    seen: list[dict[str, Any]] = []
    real = DET.fromstring

    def spy(text: bytes, **kw: Any) -> Any:
        seen.append(kw)
        return real(text, **kw)

    monkeypatch.setattr(DET, "fromstring", spy)
    parse_description(desc(svc(WANIP1, "/c")), LOC)
    parse_soap_response(200, envelope('<u:XResponse xmlns:u="urn:x"/>'), "X")
    assert seen == [{"forbid_dtd": True, "forbid_entities": True, "forbid_external": True}] * 2


def test_description_size_limit() -> None:
    doc = desc(svc(WANIP1, "/c"))
    pad = b" " * (MAX_DESCRIPTION - len(doc))
    assert parse_description(doc + pad, LOC).services  # exactly the limit is read
    with pytest.raises(MalformedReply, match="larger than 256 KiB; refusing to parse it"):
        parse_description(doc + pad + b" ", LOC)


def test_broken_xml_names_the_document() -> None:
    with pytest.raises(MalformedReply, match=f"device description at {LOC}: not well-formed"):
        parse_description(b"<root><device></root>", LOC)
    with pytest.raises(MalformedReply, match=": no <device> element"):
        parse_description(b"<root><URLBase>http://x/</URLBase></root>", LOC)


def test_bom_whitespace_and_trailing_bytes_are_trimmed() -> None:
    doc = b"\xef\xbb\xbf \r\n\t" + desc(svc(WANIP1, "/c")) + b"\r\n\x00garbage"
    assert [s.control_url for s in parse_description(doc, LOC).services] == \
        ["http://192.168.1.1:5000/c"]


# --- device descriptions ----------------------------------------------------------------------


def desc(services: str, *, extra_device: str = "", urlbase: str = "") -> bytes:
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">{urlbase}
 <device><deviceType> urn:schemas-upnp-org:device:InternetGatewayDevice:1 </deviceType>
  <friendlyName>Router</friendlyName>
  <serviceList>{svc(L3F, "/l3f")}</serviceList>
  <deviceList>{extra_device}<device><friendlyName>WAN</friendlyName>
   <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <deviceList><device><UDN>uuid:wcd</UDN>
    <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <serviceList>{services}</serviceList>
   </device></deviceList>
  </device></deviceList>
 </device>
</root>""".encode()


def svc(stype: str, ctl: str, sid: str = "") -> str:
    return (f"<service><serviceType>{stype}</serviceType><serviceId>{sid}</serviceId>"
            f"<controlURL>{ctl}</controlURL></service>")


def test_unrelated_services_before_the_wan_service_are_skipped() -> None:
    doc = desc(svc(WANCIC, "/cic") + "<note>vendor</note>" + svc(L3F, "/l3f2")
               + svc(WANIP1, "/ip1", "urn:upnp-org:serviceId:WANIPConn1"),
               extra_device='<device><friendlyName>Media</friendlyName><serviceList>'
                            + svc("urn:schemas-upnp-org:service:ContentDirectory:1", "/cd")
                            + "</serviceList></device>")
    d = parse_description(doc, LOC)
    assert len(d.services) == 1
    s = d.services[0]
    assert (s.service_type, s.control_url, s.service_id) == (
        WANIP1, "http://192.168.1.1:5000/ip1", "urn:upnp-org:serviceId:WANIPConn1")
    assert s.device_path == ("Router", "WAN", "uuid:wcd")
    assert d.device_type == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
    assert d.friendly_name == "Router" and d.firewall is None and d.location == LOC


def test_services_are_ranked_best_first() -> None:
    listed = [DSL_PPP, WANPPP1, DSL_IP, WANIP1, WANPPP2, WANIP2]
    d = parse_description(desc("".join(svc(t, f"/{i}") for i, t in enumerate(listed))), LOC)
    assert [s.service_type for s in d.services] == [WANIP2, WANIP1, WANPPP2, WANPPP1, DSL_IP,
                                                    DSL_PPP]
    assert [s.rank for s in d.services] == [0, 1, 2, 3, 4, 5]
    assert [s.version for s in d.services] == [2, 1, 2, 1, 1, 1]
    assert [s.is_ppp for s in d.services] == [False, False, True, True, False, True]


def test_service_without_control_url_is_skipped() -> None:
    d = parse_description(desc(svc(WANIP2, "  ") + svc(WANIP1, "/ok")), LOC)
    assert [s.service_type for s in d.services] == [WANIP1]


def test_firewall_service_is_kept_apart_and_the_first_wins() -> None:
    d = parse_description(desc(svc(FIREWALL_SERVICE, "/fw1") + svc(WANIP1, "/ip")
                               + svc(FIREWALL_SERVICE, "/fw2")), LOC)
    assert [s.service_type for s in d.services] == [WANIP1]
    assert d.firewall is not None and d.firewall.control_url == "http://192.168.1.1:5000/fw1"


@pytest.mark.parametrize(("urlbase", "ctl", "want"), [
    ("", "/ctl//IPConn?x=1", "http://192.168.1.1:5000/ctl/IPConn?x=1"),
    ("<URLBase>HTTP://10.0.0.1:1900/</URLBase>", "ctl", "http://10.0.0.1:1900/ctl"),
    ("<URLBase>https://10.0.0.1:443</URLBase>", "/c", "https://10.0.0.1:443/c"),
    ("<URLBase>not a url</URLBase>", "/c", "http://192.168.1.1:5000/c"),
    ("", "HTTPS://10.0.0.2:49000/abs", "HTTPS://10.0.0.2:49000/abs"),
])
def test_control_url_resolution(urlbase: str, ctl: str, want: str) -> None:
    d = parse_description(desc(svc(WANIP1, ctl), urlbase=urlbase), LOC)
    assert d.services[0].control_url == want


def test_urlbase_is_reported_as_given() -> None:
    d = parse_description(desc(svc(WANIP1, "/c"), urlbase="<URLBase> http://10.0.0.1/ </URLBase>"),
                          LOC)
    assert d.url_base == "http://10.0.0.1/"


# --- SOAP requests ----------------------------------------------------------------------------


def test_request_escapes_every_value() -> None:
    body = build_soap(WANIP1, "AddPortMapping",
                      [("NewPortMappingDescription", "a&b <c> \"d\"")]).decode()
    assert "<NewPortMappingDescription>a&amp;b &lt;c&gt; &quot;d&quot;" in body
    assert body.startswith('<?xml version="1.0"?>\r\n<s:Envelope')
    assert body.endswith("</s:Envelope>\r\n")
    assert f'<u:AddPortMapping xmlns:u="{WANIP1}">' in body
    assert 's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"' in body


def test_mapping_args_in_spec_order() -> None:
    assert mapping_args("udp", 4000, 4001, "192.168.1.5", "igdtrigger a b", 3600) == [
        ("NewRemoteHost", ""), ("NewExternalPort", "4000"), ("NewProtocol", "UDP"),
        ("NewInternalPort", "4001"), ("NewInternalClient", "192.168.1.5"), ("NewEnabled", "1"),
        ("NewPortMappingDescription", "igdtrigger a b"), ("NewLeaseDuration", "3600")]


@pytest.mark.parametrize(("proto", "number"), [("tcp", "6"), ("UDP", "17")])
@pytest.mark.parametrize("lease", [1, 86400])
def test_pinhole_args_limits_accepted(proto: str, number: str, lease: int) -> None:
    assert pinhole_args(proto, "2001:db8::5", 4000, lease) == [
        ("RemoteHost", ""), ("RemotePort", "0"), ("InternalClient", "2001:db8::5"),
        ("InternalPort", "4000"), ("Protocol", number), ("LeaseTime", str(lease))]


def test_pinhole_args_out_of_limits_refused() -> None:
    for lease in (0, 86401, -1):
        with pytest.raises(ValueError, match=f"pinhole lease {lease} is outside 1..86400 s"):
            pinhole_args("tcp", "2001:db8::5", 4000, lease)
    with pytest.raises(ValueError, match="TCP or UDP, not 'sctp'"):
        pinhole_args("sctp", "2001:db8::5", 4000, 60)


@pytest.mark.parametrize(("text", "uid"), [("0", 0), (" 7 ", 7), ("65535", 65535)])
def test_pinhole_uid_in_range(text: str, uid: int) -> None:
    assert pinhole_uid({"uniqueid": text}) == uid


@pytest.mark.parametrize("text", ["65536", "", "-1", "1e3", "0x10", "99999999999"])
def test_pinhole_uid_out_of_range_is_malformed(text: str) -> None:
    with pytest.raises(MalformedReply, match="no usable UniqueID"):
        pinhole_uid({"UniqueID": text})


def test_firewall_status_flags() -> None:
    assert firewall_status({"FirewallEnabled": " 1 ", "InboundPinholeAllowed": "true"}) == \
        (True, True)
    assert firewall_status({"FirewallEnabled": "YES", "InboundPinholeAllowed": "0"}) == \
        (True, False)
    assert firewall_status({"firewallenabled": "no"}) == (False, False)


def test_pick_and_ints() -> None:
    values = {"NewUpTime": "5", "NewUptime2": "6"}
    assert pick(values, "NewUptime", "NewUpTime") == "5"
    assert pick(values, "Missing", "NEWUPTIME2") == "6"
    assert pick(values, "Missing") == ""
    assert ints([" 1", 2, "x", "-3", None, "4.5"]) == [1, 2, -3]


# --- SSDP -------------------------------------------------------------------------------------


def test_msearch_request() -> None:
    assert build_msearch("upnp:rootdevice", 3) == (
        b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\n'
        b"MX: 3\r\nST: upnp:rootdevice\r\n\r\n")
    assert b"MX: 2\r\n" in build_msearch("upnp:rootdevice")


def reply(first: str = "HTTP/1.1 200 OK", **headers: str) -> bytes:
    h = {"LOCATION": LOC, "ST": "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
         "USN": "uuid:1::urn:schemas-upnp-org:device:InternetGatewayDevice:1",
         "SERVER": "miniupnpd", "BOOTID.UPNP.ORG": "7", **headers}
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in h.items() if v)]) + "\r\n\r\n").encode()


def test_search_reply_fields() -> None:
    r = parse_ssdp(reply())
    assert r is not None
    assert (r.location, r.st, r.server, r.boot_id) == (
        LOC, "urn:schemas-upnp-org:device:InternetGatewayDevice:1", "miniupnpd", "7")
    assert r.usn.startswith("uuid:1::") and r.looks_like_igd
    assert r.headers["location"] == LOC


@pytest.mark.parametrize("first", ["HTTP/1.1 404 Not Found", "HTTP/1.1 500 Internal",
                                   "HTTP/1.0 302 Found", "HTTP/2 200 OK", "M-SEARCH * HTTP/1.1",
                                   "RTSP/1.0 200 OK", ""])
def test_search_replies_that_are_not_200_are_ignored(first: str) -> None:
    assert parse_ssdp(reply(first)) is None


def test_search_reply_without_http_location_is_ignored() -> None:
    assert parse_ssdp(reply(LOCATION="ftp://192.168.1.1/x")) is None
    assert parse_ssdp(reply(LOCATION="")) is None
    ok = parse_ssdp(reply("HTTP/1.0 200 OK", LOCATION="HTTPS://192.168.1.1/x"))
    assert ok is not None and ok.location == "HTTPS://192.168.1.1/x"


def test_search_reply_size_limit() -> None:
    base = reply()
    pad = b"X-PAD: " + b"a" * (8192 - len(base) - 9) + b"\r\n"
    assert parse_ssdp(base[:-2] + pad + b"\r\n") is not None  # exactly 8 KiB
    assert parse_ssdp(base[:-2] + pad + b"\r\n\r\n") is None


def test_search_reply_nt_stands_in_for_st_and_igd_is_recognised() -> None:
    r = parse_ssdp(reply(ST="", NT="urn:schemas-upnp-org:service:WANPPPConnection:1",
                         USN="uuid:2"))
    assert r is not None and r.st.endswith("WANPPPConnection:1") and r.looks_like_igd
    other = parse_ssdp(reply(ST="urn:schemas-upnp-org:device:MediaServer:1", USN="uuid:3"))
    assert other is not None and not other.looks_like_igd
    wanip = parse_ssdp(reply(ST="upnp:rootdevice",
                             USN="uuid:4::urn:schemas-upnp-org:service:WANIPConnection:2"))
    assert wanip is not None and wanip.looks_like_igd


def notify(nts: str = "ssdp:alive", *, location: str = LOC, boot: str = "100",
           nt: str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1") -> bytes:
    lines = ["NOTIFY * HTTP/1.1", "HOST: 239.255.255.250:1900", f"NT: {nt}",
             f"USN: uuid:AbC::{nt}", f"NTS: {nts}", f"LOCATION: {location}",
             f"BOOTID.UPNP.ORG: {boot}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("nts", ["ssdp:update", "ssdp:propchange", "", "SSDP:UPDATE"])
def test_notify_that_is_neither_alive_nor_byebye_changes_nothing(nts: str) -> None:
    """UPnP 1.1 ``ssdp:update`` (a device announcing a new BOOTID in advance, or a
    NEXTBOOTID) is not the router leaving."""
    assert parse_ssdp_notify(notify(nts)) is None
    assert parse_ssdp(notify(nts)) is None
    t = NotifyTracker(GW, LOC)
    assert t.feed(notify(), GW) is None
    assert t.feed(notify(nts, boot="101"), GW) is None
    assert not t.left
    assert t.feed(notify(), GW) is None  # and the next alive is not a "back after byebye"


def test_notify_fields_and_case() -> None:
    n = parse_ssdp_notify(notify("SSDP:ALIVE"))
    assert n is not None and n.alive and n.uuid == "uuid:abc" and n.boot_id == "100"
    assert n.location == LOC and n.about_igd
    bye = parse_ssdp_notify(notify("ssdp:byebye"))
    assert bye is not None and not bye.alive and bye.location == ""
    assert parse_ssdp_notify(notify(location="ftp://x/")) is None
    assert parse_ssdp_notify(b"M-SEARCH * HTTP/1.1\r\n\r\n") is None
    assert parse_ssdp_notify(notify() + b"x" * 8192) is None
    no_usn = notify().replace(b"USN: uuid:AbC::", b"X-USN: ")
    assert parse_ssdp_notify(no_usn) is None


def test_tracker_notices_every_move_not_only_the_first() -> None:
    t = NotifyTracker(GW, LOC)
    assert t.feed(notify(), GW) is None  # the first alive is the baseline (and its UUID ours)
    second = f"http://{GW}:5001/rootDesc.xml"
    third = f"http://{GW}:5002/rootDesc.xml"
    moved = t.feed(notify(location=second), GW)
    assert moved is not None and moved.kind is RouterChangeKind.MOVED
    assert moved.location == second and LOC in moved.reason and second in moved.reason
    assert t.feed(notify(location=second), GW) is None  # the rest of the burst
    again = t.feed(notify(location=third), GW)
    assert again is not None and again.kind is RouterChangeKind.MOVED
    assert again.location == third and second in again.reason


def test_tracker_restart_by_bootid_then_quiet() -> None:
    t = NotifyTracker(GW, LOC)
    assert t.feed(notify(boot="1"), GW) is None
    change = t.feed(notify(boot="2"), GW)
    assert change is not None and change.kind is RouterChangeKind.RESTARTED
    assert "1 -> 2" in change.reason and change.location == LOC
    assert t.feed(notify(boot="2"), GW) is None
    assert t.feed(notify(boot=""), GW) is None  # a NOTIFY without BOOTID keeps the known one
    assert t.boot_id == "2"
    assert t.feed(notify(boot="3"), GW) is not None


def test_tracker_byebye_once_then_back() -> None:
    t = NotifyTracker(GW, LOC)
    bye = t.feed(notify("ssdp:byebye"), GW)
    assert bye is not None and bye.kind is RouterChangeKind.LEAVING and bye.location == LOC
    assert t.feed(notify("ssdp:byebye"), GW) is None  # one event per burst
    back = t.feed(notify(), GW)
    assert back is not None and back.kind is RouterChangeKind.RESTARTED
    assert "byebye and is back" in back.reason
    assert t.feed(notify(), GW) is None


def test_tracker_ignores_other_hosts_and_foreign_locations() -> None:
    t = NotifyTracker(GW, LOC)
    assert t.feed(notify("ssdp:byebye"), "192.168.1.66") is None
    assert t.feed(notify(location="http://192.168.1.66:5000/d.xml"), GW) is None
    assert t.location == LOC  # not learned either
    media = notify(nt="urn:schemas-upnp-org:device:MediaServer:1", location=f"http://{GW}:9/m")
    assert t.feed(media, GW) is None
    assert t.location == LOC


def test_every_malformed_reply_is_a_gateway_error() -> None:
    assert issubclass(MalformedReply, GatewayError)


# --- what the first mutation run still found ----------------------------------------------------


def test_leading_garbage_is_not_trimmed_into_a_document() -> None:
    with pytest.raises(MalformedReply, match="not well-formed"):
        parse_description(b"XX" + desc(svc(WANIP1, "/c")).lstrip(), LOC)


def test_query_of_a_control_url_is_kept_as_sent() -> None:
    d = parse_description(desc(svc(WANIP1, "/ctl?next=http://a//b")), LOC)
    assert d.services[0].control_url == "http://192.168.1.1:5000/ctl?next=http://a//b"


def test_text_split_by_a_comment_or_markup_is_joined() -> None:
    body = envelope("<s:Fault><detail><UPnPError><errorCode>7<!-- c -->18</errorCode>"
                    "<errorDescription>Conf<i>l</i>ict</errorDescription></UPnPError>"
                    "</detail></s:Fault>")
    assert parse_soap_response(500, body, "AddPortMapping") == UpnpFault(718, "Conflict")


def test_request_body_is_exact() -> None:
    assert build_soap("urn:x", "A", [("B", "1"), ("C", "2")]) == (
        b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
        b'envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        b'<u:A xmlns:u="urn:x"><B>1</B><C>2</C></u:A></s:Body></s:Envelope>\r\n')


def test_errors_keep_action_code_and_description() -> None:
    pin = fault_error("AddPinhole", UpnpFault(606, "nope"))
    assert (pin.action, pin.code, pin.description) == ("AddPinhole", 606, "nope")  # type: ignore[attr-defined]
    lease = fault_error("AddPortMapping", UpnpFault(725, "Only"), lease=60)
    assert (lease.action, lease.code) == ("AddPortMapping", 725)  # type: ignore[attr-defined]
    assert lease.description == "Only"  # type: ignore[attr-defined]


def test_types_with_whitespace_inside_are_recognised() -> None:
    doc = desc(svc("urn:schemas-upnp-org:service:\n   WANIPConnection:1", "/c")).replace(
        b"<deviceType> urn:schemas-upnp-org:device:InternetGatewayDevice:1 </deviceType>",
        b"<deviceType>urn:schemas-upnp-org:device:\n InternetGatewayDevice:1</deviceType>")
    d = parse_description(doc, LOC)
    assert [s.service_type for s in d.services] == [WANIP1]
    assert d.device_type == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


def test_no_urlbase_is_reported_empty() -> None:
    assert parse_description(desc(svc(WANIP1, "/c")), LOC).url_base == ""


def test_bare_upnperror_is_read_as_xml() -> None:
    body = envelope("<UPnPError><errorCode>seven</errorCode>"
                    "<errorDescription>odd</errorDescription></UPnPError>")
    assert parse_soap_response(500, body, "AddPortMapping") == UpnpFault(None, "odd")


def test_error_code_with_letters_is_no_code_not_a_crash() -> None:
    """'--7' once escaped as ValueError: lstrip("-") let any number of minus signs through."""
    for text in ("X7", "7X", "--7", "7-"):
        body = envelope(f"<s:Fault><detail><UPnPError><errorCode>{text}</errorCode>"
                        "</UPnPError></detail></s:Fault>")
        assert parse_soap_response(500, body, "A") == UpnpFault(None, "UPnPError"), text


def test_invalid_utf8_in_ssdp_is_tolerated() -> None:
    r = parse_ssdp(reply().replace(b"SERVER: miniupnpd", b"SERVER: \xff\xfeminiupnpd"))
    assert r is not None and r.server.endswith("miniupnpd")
    n = parse_ssdp_notify(notify().replace(b"NT: ", b"X-BAD: \xff\r\nNT: "))
    assert n is not None and n.alive


def test_missing_ssdp_headers_are_empty() -> None:
    bare = b"HTTP/1.1 200 OK\r\nLOCATION: " + LOC.encode() + b"\r\n\r\n"
    r = parse_ssdp(bare)
    assert r is not None
    assert (r.st, r.usn, r.server, r.boot_id) == ("", "", "", "")
    assert not r.looks_like_igd


def test_ssdp_size_limit_exact() -> None:
    for parse, data in ((parse_ssdp, reply()), (parse_ssdp_notify, notify())):
        head = data[:-2]
        pad = b"X-PAD: " + b"a" * (8192 - len(head) - 2 - 9) + b"\r\n"
        exact = head + pad + b"\r\n"
        assert len(exact) == 8192
        assert parse(exact) is not None
        assert parse(head + b"a" + pad + b"\r\n") is None


def test_garbage_header_lines_are_skipped_not_kept_and_do_not_stop_parsing() -> None:
    data = reply().replace(b"SERVER:", b"DEFUNCT LINE: x\r\ngarbage\r\n: empty\r\nSERVER:")
    r = parse_ssdp(data)
    assert r is not None and r.server == "miniupnpd" and r.boot_id == "7"
    assert set(r.headers) == {"location", "st", "usn", "server", "bootid.upnp.org"}


def test_notify_with_nts_first_and_missing_fields() -> None:
    first = (b"NOTIFY * HTTP/1.1\r\nNTS: ssdp:byebye\r\nUSN: uuid:1::upnp:rootdevice\r\n\r\n")
    n = parse_ssdp_notify(first)
    assert n is not None and not n.alive and n.nt == "" and n.boot_id == ""
    assert parse_ssdp_notify(b"NOTIFY * HTTP/1.1\r\nUSN: uuid:1\r\n\r\n") is None  # no NTS
    no_loc = b"NOTIFY * HTTP/1.1\r\nNTS: ssdp:alive\r\nUSN: uuid:1\r\n\r\n"
    assert parse_ssdp_notify(no_loc) is None
    upper = parse_ssdp_notify(notify(location=f"HTTP://{GW}:5000/d.xml"))
    assert upper is not None and upper.location == f"HTTP://{GW}:5000/d.xml"
    full = parse_ssdp_notify(notify())
    assert full is not None and full.nt == "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


def test_tracker_state_and_reasons_are_exact() -> None:
    t = NotifyTracker(GW, LOC)
    assert (t.boot_id, t.left, t.location) == ("", False, LOC)
    bye = t.feed(notify("ssdp:byebye"), GW)
    assert bye is not None and bye.reason == "the router announced ssdp:byebye"
    assert t.left is True
    back = t.feed(notify(), GW)
    assert back is not None and back.reason == "the router said ssdp:byebye and is back"
    assert back.location == LOC and t.left is False


@pytest.mark.parametrize("part", ["InternetGatewayDevice", "WANDevice", "WANConnectionDevice",
                                  "WANIPConnection", "WANPPPConnection",
                                  "WANCommonInterfaceConfig", "Layer3Forwarding"])
def test_notify_about_any_igd_device_or_service_counts(part: str) -> None:
    nt = f"urn:schemas-upnp-org:device:{part}:1"
    n = parse_ssdp_notify(notify(nt=nt))
    assert n is not None and n.about_igd
    t = NotifyTracker(GW, LOC, uuids=["uuid:abc"])
    moved = t.feed(notify(nt=nt, location=f"http://{GW}:5001/x.xml"), GW)
    assert moved is not None and moved.kind is RouterChangeKind.MOVED
    other = parse_ssdp_notify(notify(nt="urn:schemas-upnp-org:device:MediaServer:1"))
    assert other is not None and not other.about_igd


# --- main's one fault table: who asked and which IGD version change the remedy ---------------

CONFLICT = "another host or program holds this external port"


def test_718_remedy_depends_on_who_asked_and_the_igd_version() -> None:
    mine = fault_error("AddPortMapping", UpnpFault(718, "x"), for_self=True)
    assert type(mine) is MappingConflict
    assert str(mine).endswith(f"; {CONFLICT}, or {DEVICE_DENIED_HINT}")
    v2 = fault_error("AddPortMapping", UpnpFault(718, "x"), igd_version=2)
    assert type(v2) is MappingConflict and str(v2).endswith(f"x; {CONFLICT}")
    v1 = fault_error("AddPortMapping", UpnpFault(718, "x"), igd_version=1)
    assert str(v1).endswith(f"; {CONFLICT}, or (IGDv1) {SECURE_MODE_HINT}")
    unknown = fault_error("AddPortMapping", UpnpFault(718, "x"))
    assert str(unknown) == str(v1)
    other = fault_error("AddPortMapping", UpnpFault(729, "x"), for_self=True)
    assert type(other) is MappingConflict and str(other).endswith(f"x; {CONFLICT}")
    assert (mine.action, mine.code, mine.description) == ("AddPortMapping", 718, "x")


def test_606_for_this_device_is_a_device_denial_not_secure_mode() -> None:
    mine = fault_error("AddPortMapping", UpnpFault(606, "x"), for_self=True)
    assert type(mine) is NotAuthorized and str(mine).endswith(DEVICE_DENIED_HINT)
    other = fault_error("AddPortMapping", UpnpFault(606, "x"), for_self=False)
    assert str(other).endswith(SECURE_MODE_HINT)


def test_728_says_the_table_is_full() -> None:
    err = fault_error("AddPortMapping", UpnpFault(728, ""))
    assert type(err) is TableFull
    assert str(err) == ("router refused AddPortMapping: 728 NoPortMapsAvailable; the router's "
                        "mapping table is full")


@pytest.mark.parametrize(("values", "port"), [
    ({"NewReservedPort": "1"}, 1), ({"NewReservedPort": " 65535 "}, 65535),
    ({"NewExternalPort": "4000"}, 4000), ({"newreservedport": "5", "NewExternalPort": "6"}, 5),
])
def test_reserved_port_of_an_add_any(values: dict[str, str], port: int) -> None:
    assert reserved_port(values) == port


@pytest.mark.parametrize("text", ["0", "65536", "", "-1", "x", "1.5"])
def test_reserved_port_out_of_range_is_malformed(text: str) -> None:
    with pytest.raises(MalformedReply, match=r"AddAnyPortMapping: reply has no usable port"):
        reserved_port({"NewReservedPort": text})


def test_the_best_answering_service_is_chosen_wherever_it_is_listed() -> None:
    from igdtrigger.gateway.upnp.codec import IgdService, ServiceProbe, choose_service

    v1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
    v2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
    down = ServiceProbe(IgdService(v2, "/a", order=0), True, "Disconnected", "")
    old = ServiceProbe(IgdService(v1, "/b", order=1), True, "Connected", "81.2.69.160")
    best = ServiceProbe(IgdService(v2, "/c", order=2), True, "Connected", "81.2.69.160")
    mute = ServiceProbe(IgdService(v2, "/d", order=3), False, error="timed out")
    assert choose_service([down, old, best, mute]) is best
    assert choose_service([down, old]) is old
    assert choose_service([mute]) is None


def test_document_order_counts_firewall_services_between_wan_services() -> None:
    """Two equal WAN services with two IPv6 firewall services between them: the first listed
    is still the first chosen (the order is the position among all services read)."""
    from igdtrigger.gateway.upnp.codec import FIREWALL_SERVICE, ServiceProbe, choose_service

    doc = desc(svc(WANIP2, "/a") + svc(FIREWALL_SERVICE, "/fw1") + svc(FIREWALL_SERVICE, "/fw2")
               + svc(WANIP2, "/b"))
    a, b = parse_description(doc, LOC).services
    assert a.order < b.order
    probes = [ServiceProbe(s, True, "Connected", "81.2.69.160") for s in (b, a)]
    assert choose_service(probes).service is a  # type: ignore[union-attr]
