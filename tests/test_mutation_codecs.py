"""The protocol codecs (UPnP IGD SOAP/SSDP, NAT-PMP/PCP): what a user would notice, each case
found by a mutant that survived every other test (issue 19: `python -m bench.mutation igd
pmp`)."""

from __future__ import annotations

import struct

import pytest

from igdtrigger.core.errors import ActionFailed, MalformedReply, NotAuthorized
from igdtrigger.gateway.base import RouterChangeKind
from igdtrigger.gateway.natpmp.codec import (
    PCP_RESULTS,
    EpochTracker,
    PcpOption,
    decode_ip16,
    encode_ip16,
    parse_pcp_reply,
    parse_pmp_reply,
    pcp_error,
    pmp_error,
)
from igdtrigger.gateway.upnp.codec import parse_description
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
