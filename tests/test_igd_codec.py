"""Our tolerant UPnP IGD codec against the description and SOAP quirks of real routers
(router-facts.md §2-§5). Each test is named after the quirk it covers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igdtrigger.core.errors import (
    ActionFailed,
    InvalidArgs,
    LeaseRefused,
    MappingConflict,
    NoSuchMapping,
    NotAuthorized,
)
from igdtrigger.gateway.upnp.codec import (
    MalformedReply,
    UpnpFault,
    build_soap,
    fault_error,
    firewall_status,
    mapping_args,
    parse_description,
    parse_soap_response,
    pinhole_uid,
)
from igdtrigger.gateway.upnp.ssdp import build_msearch, parse_ssdp

LOC = "http://192.168.1.1:5000/rootDesc.xml"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"


def desc(services: str, *, head: str = "", tail: str = "", root_ns: str =
         "urn:schemas-upnp-org:device-1-0", dtype: str =
         "urn:schemas-upnp-org:device:InternetGatewayDevice:1") -> bytes:
    return f"""<?xml version="1.0"?>
<root xmlns="{root_ns}">{head}
 <device><deviceType>{dtype}</deviceType><friendlyName>Router</friendlyName>
  <deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <deviceList><device>
    <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <serviceList>{services}</serviceList>
   </device></deviceList>
  </device></deviceList>
 </device>{tail}
</root>""".encode()


def svc(stype: str, ctl: str) -> str:
    return f"<service><serviceType>{stype}</serviceType><controlURL>{ctl}</controlURL></service>"


def test_miniupnpd_layout_relative_urls_no_urlbase() -> None:
    d = parse_description(desc(svc(WANIP2, "/ctl/IPConn")), LOC)
    assert [(s.service_type, s.control_url) for s in d.services] == [
        (WANIP2, "http://192.168.1.1:5000/ctl/IPConn")]
    assert d.services[0].version == 2


def test_urlbase_with_trailing_slash_sky_sr102() -> None:
    d = parse_description(desc(svc(WANPPP1, "/uuid:c03e/WANPPPConnection:1"),
                               head="<URLBase>http://192.168.0.1:5431/</URLBase>"), LOC)
    assert d.services[0].control_url == "http://192.168.0.1:5431/uuid:c03e/WANPPPConnection:1"


def test_urlbase_after_device_mikrotik() -> None:
    d = parse_description(desc(svc(WANIP1, "/upnp/control/abcdefghij/wanipconn-7"),
                               tail="<URLBase>http://10.0.0.1:2828</URLBase>"), LOC)
    assert d.services[0].control_url == "http://10.0.0.1:2828/upnp/control/abcdefghij/wanipconn-7"


def test_whitespace_wrapped_types_dlink_netgear() -> None:
    d = parse_description(desc(f"<service><serviceType>\n  {WANIP1}\n</serviceType>"
                               "<controlURL> /WANIPConnection </controlURL></service>"), LOC)
    assert d.services[0].service_type == WANIP1
    assert d.services[0].control_url == "http://192.168.1.1:5000/WANIPConnection"


def test_query_string_control_url_draytek() -> None:
    d = parse_description(desc(svc(WANPPP1, "/upnp?control=WANPPPConn1")), LOC)
    assert d.services[0].control_url == "http://192.168.1.1:5000/upnp?control=WANPPPConn1"


def test_relative_control_url_without_slash() -> None:
    d = parse_description(desc(svc(WANIP1, "ctl/IPConn")), LOC)
    assert d.services[0].control_url == "http://192.168.1.1:5000/ctl/IPConn"


def test_absolute_control_url_on_other_port_tplink() -> None:
    d = parse_description(desc(svc(WANIP1, "http://192.168.0.1:1910/ipc")), LOC)
    assert d.services[0].control_url == "http://192.168.0.1:1910/ipc"


def test_legacy_dslforum_namespace_huawei_and_tr064_root() -> None:
    d = parse_description(desc(svc("urn:dslforum-org:service:WANPPPConnection:1",
                                   "/ctrlt/WANPPPConnection_1"),
                               root_ns="urn:dslforum-org:device-1-0",
                               dtype="urn:dslforum-org:device:InternetGatewayDevice:1"), LOC)
    assert d.services[0].service_type == "urn:dslforum-org:service:WANPPPConnection:1"
    assert d.services[0].is_ppp


def test_nonstandard_wanppp2_livebox_and_ranking() -> None:
    d = parse_description(desc(svc("urn:schemas-upnp-org:service:WANPPPConnection:2", "/p")
                               + svc(WANIP1, "/i")), LOC)
    assert [s.service_type for s in d.services] == [
        WANIP1, "urn:schemas-upnp-org:service:WANPPPConnection:2"]


def test_vendor_namespaced_elements_before_devicetype() -> None:
    head = ('<pnpx:X_hardwareId xmlns:pnpx="http://schemas.microsoft.com/windows/pnpx/2005/11">'
            "VEN_0000&amp;DEV_0000</pnpx:X_hardwareId><modelNumber/>")
    d = parse_description(desc(svc(WANIP1, "/i"), head=head), LOC)
    assert len(d.services) == 1


def test_leading_whitespace_and_trailing_garbage() -> None:
    d = parse_description(b"\n\t  " + desc(svc(WANIP1, "/i")) + b"\x00\x00junk", LOC)
    assert len(d.services) == 1


def test_non_igd_description_has_no_services() -> None:
    d = parse_description(desc(svc("urn:schemas-upnp-org:service:AVTransport:1", "/av")), LOC)
    assert d.services == ()


@pytest.mark.parametrize("bad", [
    b"<root><device>",  # truncated
    b"not xml at all",
    b"<?xml version='1.0'?><!DOCTYPE r [<!ENTITY a 'x'>]><root><device/></root>",  # DTD
    b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><root>&x;</root>',  # XXE
    b"<root/>",  # no device
])
def test_malformed_or_hostile_description_is_a_clear_error(bad: bytes) -> None:
    with pytest.raises(MalformedReply, match=r"device description|forbidden|not well-formed"):
        parse_description(bad, LOC)


def test_billion_laughs_refused_quickly() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">' + b"".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'.encode()
        for i in range(8)) + b"]><root>&i;</root>"
    with pytest.raises(MalformedReply, match="forbidden"):
        parse_description(bomb, LOC)


def test_oversized_description_refused() -> None:
    with pytest.raises(MalformedReply, match="larger than"):
        parse_description(b"<root>" + b" " * (300 * 1024) + b"</root>", LOC)


# --- SOAP ---------------------------------------------------------------------------------------


def test_request_body_starts_with_declaration_and_keeps_arg_order() -> None:
    body = build_soap(WANIP1, "AddPortMapping",
                      mapping_args("udp", 40000, 40000, "192.168.1.5", "a & b <c>", 3600))
    assert body.startswith(b'<?xml version="1.0"?>')  # MikroTik 5.26: no leading whitespace
    text = body.decode()
    names = ["NewRemoteHost", "NewExternalPort", "NewProtocol", "NewInternalPort",
             "NewInternalClient", "NewEnabled", "NewPortMappingDescription", "NewLeaseDuration"]
    assert [text.index(f"<{n}>") for n in names] == sorted(text.index(f"<{n}>") for n in names)
    assert "<NewProtocol>UDP</NewProtocol>" in text  # upper case: TP-Link ER605
    assert "<NewRemoteHost></NewRemoteHost>" in text  # empty, never 0.0.0.0 (MikroTik)
    assert "a &amp; b &lt;c&gt;" in text  # escaped (miniupnpc does not)


def test_success_self_closing_miniupnpd() -> None:
    body = (b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
            b'envelope/"><s:Body><u:AddPortMappingResponse xmlns:u="' + WANIP1.encode()
            + b'"/></s:Body></s:Envelope>')
    assert parse_soap_response(200, body, "AddPortMapping") == {}


def test_success_with_attributes_and_other_prefixes_draytek() -> None:
    body = (b'<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/">'
            b'<SOAP-ENV:Body><m:GetExternalIPAddressResponse xmlns:m="x">'
            b'<NewExternalIPAddress dt:dt="string" xmlns:dt="y">11.2.3.4</NewExternalIPAddress>'
            b"</m:GetExternalIPAddressResponse></SOAP-ENV:Body></SOAP-ENV:Envelope>")
    assert parse_soap_response(200, body, "GetExternalIPAddress") == {
        "NewExternalIPAddress": "11.2.3.4"}


def test_bogus_response_namespace_ee_smart_hub() -> None:
    body = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            b'<u:DeletePortMappingResponse xmlns:u="DeletePortMapping">'
            b"</u:DeletePortMappingResponse>"
            b"</s:Body></s:Envelope>")
    assert parse_soap_response(200, body, "DeletePortMapping") == {}


def fault(code: int, desc: str, tags: tuple[str, str] = ("faultcode", "faultstring")) -> bytes:
    return (f'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
            f"<{tags[0]}>s:Client</{tags[0]}><{tags[1]}>UPnPError</{tags[1]}><detail>"
            f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
            f"<errorDescription>{desc}</errorDescription></UPnPError></detail></s:Fault>"
            "</s:Body></s:Envelope>").encode()


def test_fault_without_xml_declaration_miniupnpd() -> None:
    assert parse_soap_response(500, fault(718, "ConflictInMappingEntry"), "AddPortMapping") == \
        UpnpFault(718, "ConflictInMappingEntry")


def test_fault_capitalised_faultcode_mikrotik_725() -> None:
    got = parse_soap_response(500, fault(725, "OnlyPermanentLeasesSupported",
                                         ("faultCode", "faultString")), "AddPortMapping")
    assert got == UpnpFault(725, "OnlyPermanentLeasesSupported")


def test_fault_without_faultcode_fritz_cable() -> None:
    body = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
            b"<detail><UPnPError><errorCode>714</errorCode></UPnPError></detail></s:Fault>"
            b"</s:Body></s:Envelope>")
    got = parse_soap_response(500, body, "DeletePortMapping")
    assert isinstance(got, UpnpFault)
    assert got.code == 714


def test_fault_with_corrupt_bytes_archer_c8() -> None:
    body = (b'<SOAP-ENV:Envelope><SOAP-ENV:Body><SOAP-ENV:Fault><detail><UPnPError>'
            b"<errorCode>401</errorCode>"
            b"<errorDescription>Invalid Actio\xff\xfe*\x01rrorDescription>"
            b"</UPnPError></detail></SOAP-ENV:Fault>")
    got = parse_soap_response(500, body, "GetListOfPortMappings")
    assert isinstance(got, UpnpFault)
    assert got.code == 401


def test_html_error_page_is_an_http_fault() -> None:
    got = parse_soap_response(501, b"<html><body>unable to perform</body></html>",
                              "AddPortMapping")
    assert got == UpnpFault(None, "HTTP 501 without a UPnP error")


def test_200_without_response_element_is_malformed() -> None:
    with pytest.raises(MalformedReply, match="no AddPortMappingResponse"):
        parse_soap_response(200, b"<a/>", "AddPortMapping")


@pytest.mark.parametrize(("code", "exc"), [
    (606, NotAuthorized), (718, MappingConflict), (729, MappingConflict), (725, LeaseRefused),
    (714, NoSuchMapping), (501, ActionFailed)])
def test_fault_codes_map_to_errors(code: int, exc: type[Exception]) -> None:
    assert isinstance(fault_error("AddPortMapping", UpnpFault(code, "x")), exc)


def test_402_alone_is_not_a_lease_refusal() -> None:
    """A 402 may be ARRIS refusing timed leases or an IGDv1 router whose table is full
    (miniupnp#92): it is InvalidArgs; only a lease-0 retry that works says "leases refused"
    (base.add_with_lease_fallback, tests/test_backend_contract.py)."""
    for lease in (3600, 0):
        err = fault_error("AddPortMapping", UpnpFault(402, "Invalid Args"), lease=lease)
        assert isinstance(err, InvalidArgs)
        assert not isinstance(err, LeaseRefused)


def test_secure_mode_606_says_what_to_do() -> None:
    assert "run igdtrigger on the host" in str(fault_error("AddPortMapping",
                                                           UpnpFault(606, "x")))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(100, 599))
def test_soap_parser_never_raises_anything_else(data: bytes, status: int) -> None:
    with contextlib.suppress(MalformedReply):
        parse_soap_response(status, data, "AddPortMapping")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_description_parser_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(MalformedReply):
        parse_description(data, LOC)


FAULT = ('<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
         "<detail><UPnPError><errorCode>{}</errorCode></UPnPError></detail></s:Fault></s:Body>"
         "</s:Envelope>")


def test_fault_code_in_unicode_digits_is_no_crash() -> None:
    """'²' is a digit to str.isdigit() but not to int(): it used to escape as ValueError."""
    for text, code in (("²", None), ("-²", None), ("٧١٨", 718), ("7¹8", None)):
        out = parse_soap_response(500, FAULT.format(text).encode(), "AddPortMapping")
        assert isinstance(out, UpnpFault) and out.code == code, text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12), st.sampled_from(["AddPortMapping", "AddPinhole", "GetStatusInfo"]))
def test_fault_with_any_error_code_text_is_a_fault(text: str, action: str) -> None:
    body = FAULT.format(text.replace("&", "&amp;").replace("<", "&lt;")).encode(
        "utf-8", "surrogatepass")
    with contextlib.suppress(MalformedReply):
        out = parse_soap_response(500, body, action)
        assert isinstance(out, UpnpFault)
        fault_error(action, out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(100, 599))
def test_pinhole_replies_give_a_valid_id_or_a_clear_error(data: bytes, status: int) -> None:
    """A router's AddPinhole answer: a UniqueID within 0..65535, a fault, or MalformedReply."""
    with contextlib.suppress(MalformedReply):
        out = parse_soap_response(status, data, "AddPinhole")
        if isinstance(out, dict):
            assert 0 <= pinhole_uid(out) <= 65535
            firewall_status(out)  # whatever it holds, never an exception


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["UniqueID", "uniqueid", "FirewallEnabled",
                                        "InboundPinholeAllowed", "Other"]),
                       st.text(max_size=12)))
def test_pinhole_values_never_raise_anything_else(values: dict[str, str]) -> None:
    with contextlib.suppress(MalformedReply):
        assert 0 <= pinhole_uid(values) <= 65535
    enabled, inbound = firewall_status(values)
    assert isinstance(enabled, bool) and isinstance(inbound, bool)


# --- SSDP ---------------------------------------------------------------------------------------


def test_msearch_has_quoted_man_and_blank_line() -> None:
    m = build_msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1")
    assert b'MAN: "ssdp:discover"\r\n' in m
    assert m.endswith(b"\r\n\r\n")


def test_ssdp_reply_no_space_after_colon_arris() -> None:
    r = parse_ssdp(b"HTTP/1.1 200 OK\r\nCache-Control:max-age=300\r\n"
                   b"Location:http://192.168.1.254:5000/devdescr.xml\r\nSERVER:NT/5.0 UPnP/1.0\r\n"
                   b"ST:urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nUSN:uuid:x\r\n"
                   b"EXT:\r\n\r\n")
    assert r is not None
    assert r.location == "http://192.168.1.254:5000/devdescr.xml"
    assert r.looks_like_igd


def test_ssdp_garbage_header_lines_and_empty_server_sagemcom() -> None:
    r = parse_ssdp(b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.0.1:49153/69692b70/gatedesc0b.xml"
                   b"\r\nSERVER: \r\nDEFUNCT\r\nST: urn:schemas-upnp-org:device:"
                   b"InternetGatewayDevice:1\r\n\r\n")
    assert r is not None
    assert r.server == ""


def test_ssdp_notify_alive_and_byebye() -> None:
    alive = (b"NOTIFY * HTTP/1.1\r\nNT: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n"
             b"NTS: ssdp:alive\r\nLOCATION: http://192.168.1.1:5000/rootDesc.xml\r\n"
             b"BOOTID.UPNP.ORG: 7\r\n\r\n")
    r = parse_ssdp(alive)
    assert r is not None
    assert r.boot_id == "7"
    assert parse_ssdp(alive.replace(b"ssdp:alive", b"ssdp:byebye")) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_ssdp_parser_never_raises(data: bytes) -> None:
    parse_ssdp(data)


@pytest.mark.parametrize(("location", "source", "gateway", "ok"), [
    ("http://192.168.1.1:5000/rootDesc.xml", "192.168.1.1", "192.168.1.1", True),
    ("http://192.168.1.1:5000/rootDesc.xml", "192.168.1.66", "192.168.1.1", True),  # CARP VIP
    ("http://192.168.1.66:5000/x.xml", "192.168.1.66", "192.168.1.1", True),  # replies for self
    ("http://127.0.0.1:8731/api/v1/status", "192.168.1.66", "192.168.1.1", False),  # SSRF
    ("http://10.0.0.5/x.xml", "192.168.1.66", "192.168.1.1", False),  # points elsewhere
    ("http://router.lan:5000/x.xml", "192.168.1.1", "192.168.1.1", False),  # DNS name
    ("http://224.0.0.1/x", "224.0.0.1", None, False),
])
def test_ssdp_location_guard(location: str, source: str, gateway: str | None,
                             ok: bool) -> None:
    from igdtrigger.gateway.upnp.soap import location_allowed

    assert location_allowed(location, source, gateway) is ok
