"""The protocol codecs (UPnP IGD SOAP/SSDP, NAT-PMP/PCP): what a user would notice, each case
found by a mutant that survived every other test (issue 19: `python -m bench.mutation igd
pmp`)."""

from __future__ import annotations

import struct

import pytest

from igdtrigger.core.errors import ActionFailed, MalformedReply, NotAuthorized
from igdtrigger.core.model import Proto
from igdtrigger.gateway.base import RouterChangeKind
from igdtrigger.gateway.natpmp.codec import (
    PCP_RESULTS,
    EpochTracker,
    PcpOption,
    ProtocolUnsupported,
    build_pmp_map_request,
    decode_ip16,
    decode_pmp_reply,
    encode_ip16,
    match_pcp_announce,
    match_pmp_address,
    match_pmp_map,
    parse_pcp_reply,
    parse_pmp_reply,
    pcp_error,
    pmp_error,
)
from igdtrigger.gateway.upnp.codec import (
    UpnpFault,
    parse_description,
    parse_soap_action,
    parse_soap_response,
    render_soap_fault,
    render_soap_response,
)
from igdtrigger.gateway.upnp.ssdp import NotifyTracker

from .test_igd_codec import LOC, WANIP2, desc, svc
from .test_pmp_codec_edges import CLIENT, option, pcp_header, pcp_map_payload
from .test_ssdp_notify import GW, UUID, notify

# --- UPnP: device description ------------------------------------------------------------------


def test_a_description_with_a_dtd_is_refused_naming_what_was_read() -> None:
    doc = b"<?xml version='1.0'?><!DOCTYPE r [<!ENTITY a 'x'>]><root><device/></root>"
    with pytest.raises(MalformedReply) as e:
        parse_description(doc, LOC)
    assert str(e.value).startswith(
        f"unusable reply to device description at {LOC}: uses forbidden XML")


def test_the_root_udn_is_kept_in_lower_case() -> None:
    """NOTIFY USNs are compared in lower case: a router writing its UDN in capitals in the
    description is still recognised in its announcements."""
    doc = desc(svc(WANIP2, "/ctl"), head="").replace(
        b"<device><deviceType>", b"<device><UDN>uuid:4C7AE4A8-79F2</UDN><deviceType>", 1)
    assert parse_description(doc, LOC).root_uuid == "uuid:4c7ae4a8-79f2"


# --- UPnP: the NOTIFY tracker ------------------------------------------------------------------


def test_a_root_announced_at_two_urls_is_one_move_not_one_per_round() -> None:
    """Started from the description's UDN only (no location yet): the first URL heard is the
    baseline, the second a move; after that both are known and announcing them changes
    nothing."""
    a, b = f"http://{GW}:5000/rootDesc.xml", f"http://{GW}:5000/rootDesc2.xml"
    t = NotifyTracker(GW, uuids=[UUID])
    assert t.feed(notify(location=a), GW) is None
    change = t.feed(notify(location=b), GW)
    assert change is not None and change.kind is RouterChangeKind.MOVED
    for _ in range(3):
        assert t.feed(notify(location=a), GW) is None
        assert t.feed(notify(location=b), GW) is None


# --- NAT-PMP / PCP ---------------------------------------------------------------------------


def test_a_pcp_map_reply_with_options_still_reads_the_external_address() -> None:
    """miniupnpd echoes THIRD_PARTY and PREFER_FAILURE after the MAP payload."""
    data = (pcp_header() + pcp_map_payload(ext="11.22.33.1")
            + option(PcpOption.THIRD_PARTY, encode_ip16("192.168.77.11")))
    r = parse_pcp_reply(data, "MAP TCP 4000")
    assert r.external_ip == "11.22.33.1"
    assert decode_ip16(r.option(PcpOption.THIRD_PARTY) or b"") == "192.168.77.11"


def test_a_pcp_reply_too_short_for_its_header_names_the_request() -> None:
    with pytest.raises(MalformedReply) as e:
        parse_pcp_reply(pcp_header()[:8], "MAP UDP 27015")
    assert str(e.value).startswith("unusable reply to MAP UDP 27015: 8-byte reply is too short")
    with pytest.raises(MalformedReply) as e:
        parse_pcp_reply(pcp_header()[:8])
    assert str(e.value).startswith("unusable reply to PCP request: ")


def test_an_unusable_nat_pmp_reply_and_a_refusal_name_the_request() -> None:
    wrong = struct.pack("!BBHI", 1, 129, 0, 77) + bytes(8)  # version 1
    with pytest.raises(MalformedReply) as e:
        parse_pmp_reply(wrong, "map UDP 27015")
    assert str(e.value).startswith("unusable reply to map UDP 27015: reply has version 1")
    refused = pmp_error("map UDP 27015", 2)
    assert isinstance(refused, NotAuthorized) and refused.action == "map UDP 27015"


def test_a_pcp_address_mismatch_keeps_the_result_text_and_the_hint_apart() -> None:
    err = pcp_error("MAP UDP 27015", 12, client_ip=CLIENT)
    assert isinstance(err, NotAuthorized)
    assert err.description == PCP_RESULTS[12]
    assert err.hint.startswith("the router saw another source address")


def test_an_unknown_pcp_result_has_an_empty_hint() -> None:
    err = pcp_error("MAP UDP 27015", 99)
    assert type(err) is ActionFailed and err.hint == ""
    assert str(err) == "router refused MAP UDP 27015: 99 unknown result code"


@pytest.mark.parametrize(("elapsed", "server", "lost"), [
    (148.3, 160, False),  # the server ran 160 s while we saw 148.3: within 1/16 + 2 s
    (147.9, 160, True),
    (160.0, 148, False),  # we saw 160 s, the server 148: within tolerance
    (160.0, 147, True),
    (160.0, 150, False),
])
def test_pcp_epoch_tolerance_is_rfc_6887s(elapsed: float, server: int, lost: bool) -> None:
    """RFC 6887 §8.5: state is lost when client and server time advanced by more than
    2 s + 1/16 apart (either way)."""
    t = EpochTracker("pcp")
    t.observe(1000, 0.0)
    assert t.observe(1000 + server, elapsed) is lost


# --- UPnP: the device side (what the simulated router sends, as miniupnpd and MikroTik do) -----

ENV = ('<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
       's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">')


def test_a_fault_is_written_as_miniupnpd_writes_it() -> None:
    assert render_soap_fault(UpnpFault(718, "ConflictInMappingEntry")) == (
        ENV + "<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError"
        '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        "<errorCode>718</errorCode><errorDescription>ConflictInMappingEntry</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n").encode()


def test_a_mikrotik_fault_spells_its_soap_children_in_camel_case() -> None:
    body = render_soap_fault(UpnpFault(606, "Action not authorized & <logged>"), "mikrotik")
    assert b"<faultCode>s:Client</faultCode><faultString>UPnPError</faultString>" in body
    assert (b"<errorDescription>Action not authorized &amp; &lt;logged&gt;</errorDescription>"
            in body)
    assert parse_soap_response(500, body, "AddPortMapping") == UpnpFault(
        606, "Action not authorized & <logged>")


def test_a_fault_without_a_description_takes_the_standard_name() -> None:
    assert UpnpFault.of(718) == UpnpFault(718, "ConflictInMappingEntry")
    assert UpnpFault.of(799) == UpnpFault(799, "Action Failed")
    assert UpnpFault.of(718, "taken") == UpnpFault(718, "taken")


def test_a_response_is_written_as_miniupnpd_writes_it() -> None:
    ns = "urn:schemas-upnp-org:service:WANIPConnection:2"
    body = render_soap_response(ns, "GetExternalIPAddress", {"NewExternalIPAddress": "1.2.3.4"})
    assert body == ('<?xml version="1.0"?>\r\n' + ENV + "<s:Body>"
                    f'<u:GetExternalIPAddressResponse xmlns:u="{ns}"><NewExternalIPAddress>1.2.3.4'
                    "</NewExternalIPAddress></u:GetExternalIPAddressResponse>"
                    "</s:Body></s:Envelope>\r\n").encode()
    empty = render_soap_response(ns, "AddPortMapping", {})
    assert f'<u:AddPortMappingResponse xmlns:u="{ns}"/></s:Body>'.encode() in empty


def test_a_port_listing_goes_in_cdata_even_when_it_holds_the_cdata_end() -> None:
    listing = "<p:PortMappingList><x>]]></x></p:PortMappingList>"
    body = render_soap_response("urn:x", "GetListOfPortMappings",
                                {"NewPortListing": listing, "Other": "a<b"})
    assert b"<NewPortListing><![CDATA[<p:PortMappingList><x>]]]]><![CDATA[></x>" in body
    assert b"<Other>a&lt;b</Other>" in body
    assert parse_soap_response(200, body, "GetListOfPortMappings") == {
        "NewPortListing": listing, "Other": "a<b"}


@pytest.mark.parametrize(("header", "parsed"), [
    ('"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"',
     ("urn:schemas-upnp-org:service:WANIPConnection:2", "AddPortMapping")),
    ("urn:x:service:WANIPConnection:1#GetStatusInfo", ("urn:x:service:WANIPConnection:1",
                                                       "GetStatusInfo")),
    ("  ' urn:a#b#DeletePortMapping '  ", ("urn:a#b", "DeletePortMapping")),
    ('"urn:x#"', None),
    ("urn:x#Bad-Name", None),
    ("no action", None),
    ('"', None),
    ("urn:" + "x" * 300 + "#AddPortMapping", None),
])
def test_the_soapaction_header_names_a_service_and_an_action(
        header: str, parsed: tuple[str, str] | None) -> None:
    assert parse_soap_action(header) == parsed


def test_after_following_a_move_a_third_url_is_a_move_again() -> None:
    a, b, c = (f"http://{GW}:5000/{n}.xml" for n in ("a", "b", "c"))
    t = NotifyTracker(GW, a, uuids=[UUID])
    t.follow(b)
    assert t.feed(notify(location=b), GW) is None
    change = t.feed(notify(location=c), GW)
    assert change is not None and change.kind is RouterChangeKind.MOVED
    assert change.location == c


# --- NAT-PMP / PCP: the reply matchers (what the transport offers each datagram to) -----------


def pmp_reply(op: int, result: int = 0, *, version: int = 0, rest: bytes = b"") -> bytes:
    return struct.pack("!BBHI", version, op, result, 77) + rest


def test_a_short_nat_pmp_address_success_is_refused_naming_the_request() -> None:
    match = match_pmp_address("external address")
    with pytest.raises(MalformedReply) as e:
        match(pmp_reply(128))  # 8 bytes: no address
    assert str(e.value).startswith("unusable reply to external address: 8-byte success reply")
    assert match(pmp_reply(128, rest=bytes([11, 22, 33, 44]))) is not None
    assert match(pmp_reply(129, rest=bytes(8))) is None  # another opcode's reply


def test_a_datagram_of_another_version_is_ignored_unless_it_is_pcps_unsupp_version() -> None:
    match = match_pmp_address("external address")
    assert match(pmp_reply(128, 1, version=1)) is None
    with pytest.raises(ProtocolUnsupported):
        match(pmp_reply(128, 1, version=2))
    # PCP's result is its fourth byte; the third is reserved and ignored on receipt
    with pytest.raises(ProtocolUnsupported):
        match(struct.pack("!BBBBI", 2, 128, 0xFF, 1, 0))


def test_a_nat_pmp_request_is_not_read_as_a_reply() -> None:
    req = decode_pmp_reply(build_pmp_map_request(Proto.UDP, 4000, 4000, 7200))
    assert req is not None and not req.complete
    assert req.internal_port is None and req.external_port is None


def test_the_8_bit_port_bug_names_the_request_and_both_ports() -> None:
    match = match_pmp_map("map UDP 4000", 1, 4000, deleting=False)
    cut = pmp_reply(129, rest=struct.pack("!HHI", 4000 & 0xFF, 4000, 7200))
    with pytest.raises(MalformedReply) as e:
        match(cut)
    assert str(e.value).startswith(
        "unusable reply to map UDP 4000: reply names internal port 160, not 4000; old miniupnpd")


def test_an_unusable_pcp_announce_reply_names_the_request() -> None:
    match = match_pcp_announce("PCP announce")
    with pytest.raises(MalformedReply) as e:
        match(struct.pack("!BBBBI", 2, 128, 0, 0, 120))  # 8 bytes: no epoch
    assert str(e.value).startswith("unusable reply to PCP announce: 8-byte reply")


def test_pcp_replies_of_another_version_or_too_short_name_the_request() -> None:
    with pytest.raises(MalformedReply) as e:
        parse_pcp_reply(struct.pack("!BBBBI", 3, 129, 0, 0, 0) + bytes(16), "MAP TCP 1")
    assert str(e.value).startswith("unusable reply to MAP TCP 1: reply has version 3")
    with pytest.raises(MalformedReply) as e:
        parse_pcp_reply(b"\x02\x81\x00", "MAP TCP 1")
    assert str(e.value).startswith("unusable reply to MAP TCP 1: 3-byte reply is too short")


@pytest.mark.parametrize("result", [2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 99])
def test_every_pcp_refusal_names_the_request(result: int) -> None:
    err = pcp_error("MAP UDP 27015", result, third_party="192.168.77.11", client_ip=CLIENT)
    assert isinstance(err, ActionFailed) and err.action == "MAP UDP 27015"
    assert str(err).startswith(f"router refused MAP UDP 27015: {result} ")


@pytest.mark.parametrize(("code", "name"), [
    (600, "Argument Value Invalid"), (601, "Argument Value Out of Range"),
    (603, "Out of Memory"), (604, "Human Intervention Required"),
    (605, "String Argument Too Long"),  # UPnP Device Architecture's control errors
    (715, "WildCardNotPermittedInSrcIP"), (726, "RemoteHostOnlySupportsWildcard"),
    (727, "ExternalPortOnlySupportsWildcard"), (732, "WildCardNotPermittedInIntPort"),
])
def test_a_fault_without_a_description_is_named_as_upnp_names_it(code: int, name: str) -> None:
    assert UpnpFault.of(code) == UpnpFault(code, name)
