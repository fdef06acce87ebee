"""The NAT-PMP (RFC 6886) and PCP (RFC 6887) codec at its edges: every result code, every
length a reply can be cut at, field limits, option padding and the epoch rules. Each case was
found by a mutant that no other test killed."""

from __future__ import annotations

import struct

import pytest

from igdtrigger.core.errors import ActionFailed, MappingConflict, NotAuthorized, TableFull
from igdtrigger.core.model import Proto
from igdtrigger.gateway.natpmp.codec import (
    DOUBLE_NAT_HINT,
    MAX_LIFETIME,
    PCP_RESULTS,
    PMP_RESULTS,
    EpochTracker,
    MalformedReply,
    NetworkFailure,
    PcpOption,
    PcpReply,
    PmpReply,
    ProtocolUnsupported,
    build_pcp_map,
    build_pmp_map_request,
    check_pcp_reply,
    check_pmp_reply,
    decode_ip16,
    decode_pcp_reply,
    decode_pmp_reply,
    encode_ip16,
    parse_pcp_reply,
    parse_pmp_reply,
    pcp_error,
    pmp_error,
)

NONCE = bytes(range(12))
CLIENT = "192.168.77.10"


# --- addresses and field limits ---------------------------------------------------------------


def test_ip16_round_trip() -> None:
    assert encode_ip16("11.22.33.1") == bytes(10) + b"\xff\xff" + bytes([11, 22, 33, 1])
    assert decode_ip16(encode_ip16("11.22.33.1")) == "11.22.33.1"
    assert encode_ip16("2001:db8::5") == bytes.fromhex("20010db8000000000000000000000005")
    assert decode_ip16(encode_ip16("2001:db8::5")) == "2001:db8::5"
    assert decode_ip16(bytes(15)) == "" and decode_ip16(bytes(17)) == ""
    assert decode_ip16(bytes(16)) == "::"
    with pytest.raises(ValueError, match="router"):
        encode_ip16("router")


@pytest.mark.parametrize(("internal", "external"), [(0, 0), (65535, 65535), (1, 0)])
def test_pmp_ports_at_the_limits(internal: int, external: int) -> None:
    req = build_pmp_map_request(Proto.UDP, internal, external, 0)
    assert struct.unpack("!BBHHHI", req) == (0, 1, 0, internal, external, 0)


@pytest.mark.parametrize(("internal", "external", "words"), [
    (65536, 0, "internal port 65536 is outside 0-65535"),
    (-1, 0, "internal port -1 is outside 0-65535"),
    (1, 65536, "suggested external port 65536 is outside 0-65535"),
    ("80", 0, "internal port '80' is outside 0-65535"),
])
def test_pmp_ports_out_of_limits(internal: object, external: int, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        build_pmp_map_request(Proto.TCP, internal, external, 60)  # type: ignore[arg-type]


def test_lifetime_limits() -> None:
    assert build_pmp_map_request(Proto.TCP, 1, 1, MAX_LIFETIME)[-4:] == b"\xff\xff\xff\xff"
    assert MAX_LIFETIME == 2**32 - 1
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ValueError, match=f"lifetime {bad!r} is outside 0-4294967295"):
            build_pmp_map_request(Proto.TCP, 1, 1, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="lifetime"):
            build_pcp_map(NONCE, Proto.TCP, 1, 1, bad, CLIENT)  # type: ignore[arg-type]


def test_pcp_ports_at_the_limits() -> None:
    req = build_pcp_map(NONCE, Proto.UDP, 65535, 0, MAX_LIFETIME, CLIENT)
    assert struct.unpack("!HH", req[40:44]) == (65535, 0) and req[36] == 17
    assert req[4:8] == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="internal port 0 is outside 1-65535"):
        build_pcp_map(NONCE, Proto.UDP, 0, 0, 60, CLIENT)
    with pytest.raises(ValueError, match="suggested external port 65536"):
        build_pcp_map(NONCE, Proto.UDP, 1, 65536, 60, CLIENT)
    with pytest.raises(ValueError, match="PCP nonce must be 12 bytes, not 13"):
        build_pcp_map(bytes(13), Proto.UDP, 1, 1, 60, CLIENT)


def test_pcp_request_fields_and_options() -> None:
    req = build_pcp_map(NONCE, Proto.TCP, 40000, 40001, 60, "2001:db8::5",
                        external_ip="11.22.33.1", third_party="2001:db8::6")
    assert req[0:4] == bytes([2, 1, 0, 0])
    assert decode_ip16(req[8:24]) == "2001:db8::5"
    assert req[37:40] == bytes(3)
    assert decode_ip16(req[44:60]) == "11.22.33.1"
    assert req[60:64] == bytes([PcpOption.THIRD_PARTY, 0, 0, 16])
    assert decode_ip16(req[64:80]) == "2001:db8::6"
    assert len(req) == 80  # no PREFER_FAILURE unless asked
    only_pf = build_pcp_map(NONCE, Proto.TCP, 1, 1, 60, CLIENT, prefer_failure=True)
    assert only_pf[60:] == bytes([PcpOption.PREFER_FAILURE, 0, 0, 0])


# --- NAT-PMP replies --------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "text"),
                         [*sorted(PMP_RESULTS.items()), (6, "unknown result code")])
def test_pmp_result_texts(code: int, text: str) -> None:
    assert PmpReply(0, 1, code).result_text == text


def test_pmp_result_table_is_rfc_6886() -> None:
    assert PMP_RESULTS == {0: "Success", 1: "Unsupported Version", 2: "Not Authorized/Refused",
                           3: "Network Failure", 4: "Out of resources",
                           5: "Unsupported opcode"}


def map_reply(op: int = 1, result: int = 0, epoch: int = 7, iport: int = 4000,
              eport: int = 4001, life: int = 60) -> bytes:
    return struct.pack("!BBHIHHI", 0, 128 + op, result, epoch, iport, eport, life)


@pytest.mark.parametrize(("cut", "fields"), [
    (4, (None, None, None, None, False)),
    (7, (None, None, None, None, False)),
    (8, (7, None, None, None, False)),
    (10, (7, 4000, None, None, False)),
    (12, (7, 4000, 4001, None, False)),
    (15, (7, 4000, 4001, None, False)),
    (16, (7, 4000, 4001, 60, True)),
])
def test_pmp_map_reply_cut_short(cut: int, fields: tuple[object, ...]) -> None:
    r = decode_pmp_reply(map_reply(op=2)[:cut])
    assert r is not None and (r.opcode, r.result) == (2, 0)
    assert (r.epoch, r.internal_port, r.external_port, r.lifetime, r.complete) == fields


def test_pmp_address_reply_cut_short() -> None:
    full = struct.pack("!BBHI", 0, 128, 0, 9) + bytes([81, 2, 69, 160])
    r = decode_pmp_reply(full)
    assert r is not None and r.external_ip == "81.2.69.160" and r.complete and r.epoch == 9
    short = decode_pmp_reply(full[:11])
    assert short is not None and short.external_ip is None and not short.complete
    with pytest.raises(MalformedReply, match="11-byte success reply is short "
                                             r"\(expected 12 bytes\)"):
        parse_pmp_reply(full[:11])
    with pytest.raises(MalformedReply, match=r"15-byte success reply is short \(expected 16"):
        parse_pmp_reply(map_reply()[:15])


def test_pmp_other_versions_and_requests() -> None:
    pcp = decode_pmp_reply(bytes([2, 0x81, 0, 1]) + bytes(20))
    assert pcp is not None and (pcp.version, pcp.opcode, pcp.result) == (2, 1, 1)
    assert not pcp.complete
    v1 = decode_pmp_reply(bytes([1, 0x81, 0x01, 0x02]))
    assert v1 is not None and v1.result == 0x0102 and v1.opcode == 1
    request = decode_pmp_reply(struct.pack("!BBHI", 0, 1, 0, 5))
    assert request is not None and request.epoch == 5 and not request.complete
    unknown = decode_pmp_reply(struct.pack("!BBHI", 0, 128 + 9, 5, 5))
    assert unknown is not None and unknown.opcode == 9 and not unknown.complete
    assert decode_pmp_reply(b"\x00\x80\x00") is None


def test_pmp_checks_say_what_is_wrong() -> None:
    with pytest.raises(ProtocolUnsupported, match="speaks PCP but not NAT-PMP") as e:
        check_pmp_reply(PmpReply(2, 0, 1, complete=False), "a", 24)
    assert e.value.code == 1 and e.value.server_version == 2
    with pytest.raises(MalformedReply, match="reply has version 2, not NAT-PMP's 0"):
        check_pmp_reply(PmpReply(2, 0, 0, complete=False), "a", 24)
    with pytest.raises(MalformedReply, match="reply has version 1, not NAT-PMP's 0"):
        check_pmp_reply(PmpReply(1, 0, 1, complete=False), "a", 24)
    with pytest.raises(MalformedReply, match="6-byte reply is too short for NAT-PMP"):
        check_pmp_reply(PmpReply(0, 1, 0), "a", 6)
    with pytest.raises(MalformedReply, match="success reply for unknown opcode 3"):
        check_pmp_reply(PmpReply(0, 3, 0, 5), "a", 16)
    # error replies may be short and still be usable: the result code is what matters
    check_pmp_reply(PmpReply(0, 1, 2, 5, complete=False), "a", 8)
    check_pmp_reply(PmpReply(0, 9, 5, 5, complete=False), "a", 8)
    check_pmp_reply(PmpReply(0, 1, 3, None, complete=False), "a", 4)
    for op in (0, 1, 2):
        check_pmp_reply(PmpReply(0, op, 0, 5), "a", 16)
    with pytest.raises(MalformedReply, match="2-byte reply is too short for NAT-PMP"):
        parse_pmp_reply(b"\x00\x80", "probe")


@pytest.mark.parametrize(("result", "cls", "hint"), [
    (2, NotAuthorized, "ports below 1024 are usually denied"),
    (3, NetworkFailure, DOUBLE_NAT_HINT),
    (4, TableFull, "mapping table is full or no external port is free"),
])
def test_pmp_errors_carry_their_remedy(result: int, cls: type[Exception], hint: str) -> None:
    err = pmp_error("NAT-PMP map udp/1", result)
    assert type(err) is cls and hint in str(err).split("; ", 1)[1]
    assert f"{result} {PMP_RESULTS[result]}" in str(err)


def test_pmp_protocol_errors_name_the_code() -> None:
    one = pmp_error("probe", 1)
    five = pmp_error("probe", 5)
    assert isinstance(one, ProtocolUnsupported) and one.code == 1
    assert isinstance(five, ProtocolUnsupported) and five.code == 5
    assert "(probe: result 1 Unsupported Version)" in str(one)
    assert "(probe: result 5 Unsupported opcode)" in str(five)
    other = pmp_error("probe", 77)
    assert type(other) is ActionFailed and str(other) == "router refused probe: 77 unknown " \
        "result code"


# --- PCP replies ------------------------------------------------------------------------------


def pcp_header(op: int = 1, result: int = 0, life: int = 120, epoch: int = 9) -> bytes:
    return struct.pack("!BBBBII", 2, 128 + op, 0, result, life, epoch) + bytes(12)


def pcp_map_payload(proto: int = 6, iport: int = 4000, eport: int = 4001,
                    ext: str = "11.22.33.1") -> bytes:
    return NONCE + struct.pack("!B3xHH", proto, iport, eport) + encode_ip16(ext)


def option(code: int, value: bytes) -> bytes:
    return struct.pack("!BBH", code, 0, len(value)) + value + bytes(-len(value) % 4)


def test_pcp_map_reply_fields() -> None:
    r = parse_pcp_reply(pcp_header() + pcp_map_payload(17, 1, 65535, "2001:db8::1"))
    assert (r.lifetime, r.epoch, r.nonce, r.protocol) == (120, 9, NONCE, 17)
    assert (r.internal_port, r.external_port, r.external_ip) == (1, 65535, "2001:db8::1")
    assert r.options == () and r.complete and r.result_text == "SUCCESS"


@pytest.mark.parametrize("cut", [4, 8, 12, 23, 24, 59])
def test_pcp_map_reply_cut_short(cut: int) -> None:
    r = decode_pcp_reply((pcp_header() + pcp_map_payload())[:cut])
    assert r is not None and not r.complete and r.nonce is None
    assert r.lifetime == (120 if cut >= 8 else 0)
    assert r.epoch == (9 if cut >= 12 else None)
    with pytest.raises(MalformedReply):
        parse_pcp_reply((pcp_header() + pcp_map_payload())[:cut])


def test_pcp_reply_options_padding_truncation_and_limits() -> None:
    five = option(PcpOption.THIRD_PARTY, b"abcde")
    assert len(five) == 12  # padded to a multiple of 4
    data = pcp_header() + pcp_map_payload() + five + option(PcpOption.FILTER, b"") + option(
        0x80, b"\x01\x02\x03\x04")
    r = parse_pcp_reply(data)
    assert r.options == ((1, b"abcde"), (3, b""), (0x80, b"\x01\x02\x03\x04"))
    assert r.option(1) == b"abcde" and r.option(3) == b"" and r.option(2) is None
    truncated = data + struct.pack("!BBH", 9, 0, 40) + b"short"
    assert parse_pcp_reply(truncated).options == r.options  # the cut option is dropped
    many = pcp_header() + pcp_map_payload() + option(3, b"") * 100
    assert len(parse_pcp_reply(many).options) == 64
    # nothing is read past PCP's 1,100-byte maximum
    room = 1100 - 60 - 4
    edge = pcp_header() + pcp_map_payload() + option(0x81, bytes(room)) + option(3, b"")
    assert [c for c, _ in parse_pcp_reply(edge).options] == [0x81]
    over = pcp_header() + pcp_map_payload() + option(0x81, bytes(room + 4))
    assert parse_pcp_reply(over).options == ()
    fits = pcp_header() + pcp_map_payload() + option(0x81, bytes(room))
    assert [c for c, _ in parse_pcp_reply(fits).options] == [0x81]


def test_pcp_option_of_first_match() -> None:
    r = PcpReply(2, 1, 0, options=((5, b"a"), (5, b"b")))
    assert r.option(5) == b"a"


def test_pcp_announce_reply_reads_options() -> None:
    r = parse_pcp_reply(pcp_header(op=0, life=0) + option(3, b"xy"))
    assert r.opcode == 0 and r.options == ((3, b"xy"),) and r.complete and r.nonce is None


def test_pcp_other_versions_and_requests() -> None:
    pmp = decode_pcp_reply(struct.pack("!BBHI", 0, 0x80, 1, 77))
    assert pmp is not None and (pmp.version, pmp.result, pmp.epoch) == (0, 1, 77)
    assert not pmp.complete
    pmp4 = decode_pcp_reply(struct.pack("!BBH", 0, 0x80, 1))
    assert pmp4 is not None and pmp4.epoch is None and pmp4.result == 1
    v3 = decode_pcp_reply(bytes([3, 0x81, 0x07, 0x01]) + bytes(8))
    assert v3 is not None and v3.result == 1 and v3.epoch is None and v3.opcode == 1
    request = decode_pcp_reply(bytes([2, 1, 0, 0]) + bytes(56))
    assert request is not None and not request.complete and request.opcode == 1
    assert decode_pcp_reply(b"\x02\x81\x00") is None


def test_pcp_checks_say_what_is_wrong() -> None:
    with pytest.raises(ProtocolUnsupported, match="answered in NAT-PMP with UNSUPP_VERSION"):
        check_pcp_reply(PcpReply(0, 0, 1, complete=False), "a", 12)
    with pytest.raises(ProtocolUnsupported, match="answered in version 3 with") as e:
        check_pcp_reply(PcpReply(3, 0, 1, complete=False), "a", 12)
    assert e.value.server_version == 3 and e.value.code == 1
    with pytest.raises(MalformedReply, match="reply has version 0, not PCP's 2"):
        check_pcp_reply(PcpReply(0, 0, 0, complete=False), "a", 12)
    with pytest.raises(MalformedReply, match="8-byte reply is too short for PCP"):
        check_pcp_reply(PcpReply(2, 1, 0, 60, None, complete=False), "a", 8)
    with pytest.raises(MalformedReply, match="30-byte success reply is short"):
        check_pcp_reply(PcpReply(2, 1, 0, 60, 5, complete=False), "a", 30)
    check_pcp_reply(PcpReply(2, 1, 2, 60, None, complete=False), "a", 8)  # a short refusal
    with pytest.raises(MalformedReply, match="3-byte reply is too short for PCP"):
        parse_pcp_reply(b"\x02\x81\x00", "probe")


@pytest.mark.parametrize(("code", "text"),
                         [*sorted(PCP_RESULTS.items()), (14, "unknown result code")])
def test_pcp_result_texts(code: int, text: str) -> None:
    assert PcpReply(2, 1, code).result_text == text


def test_pcp_result_table_is_rfc_6887() -> None:
    assert list(PCP_RESULTS.values()) == [
        "SUCCESS", "UNSUPP_VERSION", "NOT_AUTHORIZED", "MALFORMED_REQUEST", "UNSUPP_OPCODE",
        "UNSUPP_OPTION", "MALFORMED_OPTION", "NETWORK_FAILURE", "NO_RESOURCES",
        "UNSUPP_PROTOCOL", "USER_EX_QUOTA", "CANNOT_PROVIDE_EXTERNAL", "ADDRESS_MISMATCH",
        "EXCESSIVE_REMOTE_PEERS"]
    assert list(PCP_RESULTS) == list(range(14))


@pytest.mark.parametrize(("result", "cls", "hint"), [
    (2, NotAuthorized, "or the mapping belongs to another client"),
    (3, ActionFailed, "the router could not parse our request"),
    (5, ActionFailed, ""),
    (6, ActionFailed, "could not parse an option of our request"),
    (7, NetworkFailure, DOUBLE_NAT_HINT),
    (8, TableFull, "mapping table is full or no external port is free"),
    (9, ActionFailed, "the router cannot map this protocol"),
    (10, TableFull, "used up its mapping quota"),
    (11, MappingConflict, "the external port is taken by another host or program"),
    (13, ActionFailed, "the router limits remote peers"),
    (99, ActionFailed, ""),
])
def test_pcp_errors_carry_their_remedy(result: int, cls: type[Exception], hint: str) -> None:
    err = pcp_error("PCP map tcp/1", result)
    assert type(err) is cls
    text = PCP_RESULTS.get(result, "unknown result code")
    assert err.code == result and err.description == text  # type: ignore[attr-defined]
    if hint:
        assert hint in str(err).split("; ", 1)[1]
    else:
        assert str(err) == f"router refused PCP map tcp/1: {result} {text}"


def test_pcp_protocol_errors() -> None:
    one, four = pcp_error("probe", 1), pcp_error("probe", 4)
    assert isinstance(one, ProtocolUnsupported) and one.code == 1
    assert isinstance(four, ProtocolUnsupported) and four.code == 4
    assert str(one) == "router does not speak PCP version 2 (probe: UNSUPP_VERSION)"
    assert str(four) == "router does not support this PCP opcode (probe: UNSUPP_OPCODE)"


def test_pcp_address_mismatch_and_third_party_name_the_hosts() -> None:
    mismatch = pcp_error("m", 12, client_ip="192.168.77.10")
    assert type(mismatch) is NotAuthorized
    assert "than our PCP client address 192.168.77.10: another NAT" in str(mismatch)
    assert "client address ?:" in str(pcp_error("m", 12))
    tp = pcp_error("m", 5, third_party="192.168.77.11")
    assert type(tp) is NotAuthorized
    assert "(192.168.77.11, PCP THIRD_PARTY)" in str(tp)
    assert str(tp).endswith("or run igdtrigger on 192.168.77.11")


# --- epochs -----------------------------------------------------------------------------------


def test_natpmp_epoch_boundary() -> None:
    t = EpochTracker("nat-pmp")
    assert not t.observe(100, 0.0)
    # expected at least 100 + 8 * 7/8 - 2 = 105 after 8 s
    assert not t.observe(105, 8.0)
    t2 = EpochTracker("nat-pmp")
    t2.observe(100, 0.0)
    assert t2.observe(104, 8.0)
    t3 = EpochTracker("nat-pmp")
    t3.observe(100, 10.0)
    assert not t3.observe(98, 5.0)  # the client clock went back: no time elapsed
    t3.reset()
    assert not t3.observe(0, 6.0)  # after a reset the next epoch is a new baseline


def test_pcp_epoch_rules() -> None:
    t = EpochTracker("pcp")
    assert not t.observe(100, 0.0)
    assert not t.observe(99, 0.5)  # back by 1 s: allowed
    t = EpochTracker("pcp")
    t.observe(100, 0.0)
    assert t.observe(98, 0.5)  # back by 2 s: lost state
    t = EpochTracker("pcp")
    t.observe(100, 0.0)
    assert not t.observe(116, 16.0)  # in step
    assert t.observe(200, 20.0)  # the server jumped 84 s in 4 s
    t = EpochTracker("pcp")
    t.observe(100, 0.0)
    assert t.observe(104, 40.0)  # the server advanced 4 s in 40 s
    t = EpochTracker("pcp")
    t.observe(1000, 0.0)
    # exactly on the tolerance: client 32 s, server 32 + 2 + 32/16 ... within bounds
    assert not t.observe(1034, 32.0)
    assert not t.observe(1066, 62.0)


def test_short_replies_name_the_request_and_the_real_fault() -> None:
    """What the user reads: which request got the unusable reply, and that it was cut short
    (not a made-up version)."""
    with pytest.raises(MalformedReply) as pmp:
        check_pmp_reply(PmpReply(0, 1, 0), "AddPortMapping TCP 4000", 6)
    assert str(pmp.value).startswith("unusable reply to AddPortMapping TCP 4000: 6-byte")
    short_map = (pcp_header() + pcp_map_payload())[:40]
    r = decode_pcp_reply(short_map)
    assert r is not None and r.version == 2 and not r.complete
    with pytest.raises(MalformedReply, match="40-byte success reply is short") as pcp:
        parse_pcp_reply(short_map, "MAP TCP 4000")
    assert str(pcp.value).startswith("unusable reply to MAP TCP 4000: ")


def test_pcp_epoch_back_by_two_seconds_at_once_is_lost_state() -> None:
    t = EpochTracker("pcp")
    t.observe(100, 0.0)
    assert t.observe(98, 0.0)  # no client time elapsed: only the 1 s rule can tell
    t = EpochTracker("pcp")
    t.observe(100, 0.0)
    assert not t.observe(99, 0.0)


def test_short_success_names_the_request_and_the_remedy() -> None:
    with pytest.raises(MalformedReply) as e:
        check_pmp_reply(PmpReply(0, 1, 0, 5, complete=False), "AddPortMapping UDP 4000", 12)
    assert str(e.value).startswith("unusable reply to AddPortMapping UDP 4000: 12-byte success "
                                   "reply is short (expected 16 bytes)")
    assert "use UPnP IGD with this router" in e.value.hint


def test_pcp_decode_keeps_version_opcode_and_lifetime_of_partial_replies() -> None:
    request = struct.pack("!BBBBII", 2, 1, 0, 0, 120, 9) + bytes(12)  # not a reply (no 0x80)
    r = decode_pcp_reply(request)
    assert r is not None and (r.version, r.opcode, r.complete) == (2, 1, False)
    short = decode_pcp_reply(pcp_header(op=1)[:16])
    assert short is not None and (short.version, short.opcode, short.lifetime) == (2, 1, 120)
    announce = decode_pcp_reply(pcp_header(op=0, life=77))
    assert announce is not None and (announce.opcode, announce.lifetime) == (0, 77)


def test_third_party_refusal_keeps_the_result_name() -> None:
    tp = pcp_error("MAP UDP 4000", 5, third_party="192.168.77.11")
    assert isinstance(tp, NotAuthorized)
    assert tp.description == PCP_RESULTS[5]
    assert "pcp_allow_thirdparty=yes" in tp.hint
