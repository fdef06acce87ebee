"""Port specs, ranges and durations at their edges (the spellings users write in config, CLI
and API requests), each found by a mutant that no other test killed."""

from __future__ import annotations

import pytest

from igdtrigger.core.model import (
    MappingKey,
    MappingSpec,
    PinholeSpec,
    PortRange,
    Proto,
    RouterMapping,
    compress_ports,
    format_duration,
    parse_duration,
    parse_port_spec,
)


@pytest.mark.parametrize(("text", "want"), [
    ("udp/27015", [(Proto.UDP, 27015, 27015)]),
    ("TCP/1-65535", [(Proto.TCP, 1, 65535)]),
    (" both / 3074 - 3075 ", [(Proto.TCP, 3074, 3075), (Proto.UDP, 3074, 3075)]),
    ("Udp/65535", [(Proto.UDP, 65535, 65535)]),
    ("udp/1", [(Proto.UDP, 1, 1)]),
    ("udp/000080", [(Proto.UDP, 80, 80)]),
])
def test_port_specs_parse(text: str, want: list[tuple[Proto, int, int]]) -> None:
    assert [(r.proto, r.first, r.last) for r in parse_port_spec(text)] == want


@pytest.mark.parametrize(("text", "words"), [
    ("udp/0", "port 0 is outside 1-65535"),
    ("udp/65536", "port 65536 is outside 1-65535"),
    ("udp/1-65536", "port 65536 is outside 1-65535"),
    ("udp/0-5", "port 0 is outside 1-65535"),
    ("udp/20-10", "range 20-10 runs backwards (write 10-20)"),
    ("sctp/5", "is not a port spec"),
    ("udp/1234567", "is not a port spec"),
    ("udp/", "is not a port spec"),
    ("udp/5x", "is not a port spec"),
    ("udp 5", "is not a port spec"),
    ("", "is not a port spec"),
])
def test_bad_port_specs_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="^" + repr(text).replace("(", r"\(").replace(
            ")", r"\)").replace("[", r"\[")) as e:
        parse_port_spec(text)
    assert words in str(e.value)


def test_non_string_port_spec() -> None:
    with pytest.raises(ValueError, match="expected a string like 'udp/27015', got 27015"):
        parse_port_spec(27015)  # type: ignore[arg-type]


def test_port_range_behaves_like_a_set_of_ports() -> None:
    r = PortRange(Proto.UDP, 10, 12)
    assert list(r) == [10, 11, 12] and len(r) == 3
    assert 10 in r and 12 in r and 9 not in r and 13 not in r
    assert "11" not in r and 11.0 not in r  # only int ports
    assert str(r) == "udp/10-12" and str(PortRange(Proto.TCP, 7, 7)) == "tcp/7"
    assert len(PortRange(Proto.TCP, 1, 65535)) == 65535
    assert PortRange(Proto.TCP, 5, 6) < PortRange(Proto.UDP, 1, 2)  # ordered: protocol first


@pytest.mark.parametrize(("first", "last", "words"), [
    (0, 5, "out of range"), (5, 65536, "out of range"), (65536, 65536, "out of range"),
    (-1, 5, "out of range"), (6, 5, "runs backwards"),
])
def test_port_range_refuses_impossible_ranges(first: int, last: int, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PortRange(Proto.UDP, first, last)


def test_port_range_limits_are_valid() -> None:
    assert len(PortRange(Proto.UDP, 1, 1)) == 1
    assert len(PortRange(Proto.UDP, 65535, 65535)) == 1


def test_protocol_numbers() -> None:
    assert (Proto.TCP.number, Proto.UDP.number) == (6, 17)
    assert Proto.from_number(6) is Proto.TCP and Proto.from_number(17) is Proto.UDP
    assert Proto.from_number(1) is None and Proto.from_number(132) is None


@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0),
    ("1d", 86400.0), ("250ms", 0.25), (" 1.5 h ", 5400.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -5, "0", "0s", "0m", True, False, None, [], "ten",
                                   "10 minutes", "-5s", "5w"])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-3, "0s"), (59.4, "59s"), (59.6, "1m00s"), (60, "1m00s"), (61, "1m01s"),
    (3599, "59m59s"), (3600, "1h00m"), (3660, "1h01m"), (90061, "25h01m"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_keys_and_their_text() -> None:
    spec = MappingSpec(Proto.UDP, 4000, "192.168.1.5", 4001, "d")
    assert spec.key == MappingKey(Proto.UDP, 4000) and not spec.external_any
    seen = RouterMapping(Proto.TCP, 80, "192.168.1.5", 80, "d")
    assert seen.key == MappingKey(Proto.TCP, 80) and seen.enabled
    assert seen.lease_remaining is None
    assert str(MappingKey(Proto.TCP, 80)) == "tcp/80"
    assert str(PinholeSpec("2001:db8::5", Proto.UDP, 9)) == "udp/[2001:db8::5]:9"


@pytest.mark.parametrize(("names", "shown"), [
    (["udp/40000", "udp/40001", "udp/40002", "tcp/3074"], "udp/40000-40002, tcp/3074"),
    (["udp/1", "udp/3", "udp/4"], "udp/1, udp/3-4"),  # a gap starts a new range
    (["udp/5", "tcp/6"], "udp/5, tcp/6"),  # the next port of another protocol
    (["udp/10-12", "udp/13", "udp/14-20"], "udp/10-20"),  # ranges join ranges
    (["udp/10-12", "udp/12"], "udp/10-12, udp/12"),  # an overlap is shown as it is
    (["udp/9", "udp/8"], "udp/9, udp/8"),  # the order given is kept
    (["both/7", "both/8"], "both/7-8"),
    (["pinhole", "udp/1", "udp/x", "udp/2", "udp/3-y", "udp/4"],
     "pinhole, udp/1, udp/x, udp/2, udp/3-y, udp/4"),  # not a port: shown alone, never joined
    ([], ""),
    (["udp/65535"], "udp/65535"),
])
def test_compress_ports_as_status_shows_them(names: list[str], shown: str) -> None:
    assert compress_ports(names) == shown
