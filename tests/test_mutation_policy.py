"""The port policy's edges (core/policy.py), each something a user would meet: the first and
last port an ad-hoc range allows, exactly the per-activation limit, a request touching a
rule's reserved ports by one port at either end, the other protocol of a reserved port."""

from __future__ import annotations

import pytest

from igdtrigger.config import parse_config
from igdtrigger.core.errors import AdhocRefused, UsageError
from igdtrigger.core.model import PortRange, Proto
from igdtrigger.core.policy import adhoc_permitted, adhoc_ports, hides_privileged
from igdtrigger.core.settings import AdhocConfig

LAN = "192.168.1.9"
NAS = "192.168.1.5"
WINDOW = AdhocConfig(enabled=True, max_ports=4,
                     ports=(PortRange(Proto.UDP, 40000, 40009), PortRange(Proto.TCP, 500, 500)))
RULES = parse_config({"rules": [{"name": "nas", "open": ["tcp/8000-8002"], "hosts": [NAS]},
                                {"name": "anyone", "open": ["udp/8000"]}]}).rules
WIDE = AdhocConfig(enabled=True, max_ports=16)


def udp(first: int, last: int | None = None) -> PortRange:
    return PortRange(Proto.UDP, first, first if last is None else last)


def test_a_privileged_port_is_refused_inside_a_range_and_opened_alone() -> None:
    assert hides_privileged(PortRange(Proto.UDP, 1023, 1024))  # the last privileged port
    assert not hides_privileged(PortRange(Proto.UDP, 1023, 1023))
    assert adhoc_ports(["tcp/500"], LAN, limits=WINDOW, rules=RULES) == (
        PortRange(Proto.TCP, 500, 500),)
    with pytest.raises(AdhocRefused, match="privileged"):
        adhoc_ports(["tcp/500-501"], LAN, limits=WINDOW, rules=RULES)


@pytest.mark.parametrize("spec", ["udp/40000", "udp/40009", "udp/40000-40003",
                                  "udp/40006-40009"])
def test_ports_at_either_end_of_adhoc_ports_are_allowed(spec: str) -> None:
    assert adhoc_ports([spec], LAN, limits=WINDOW, rules=RULES)


@pytest.mark.parametrize("spec", ["udp/39999", "udp/40010", "udp/39999-40000",
                                  "udp/40009-40010", "tcp/40000", "tcp/501"])
def test_a_port_one_past_adhoc_ports_or_of_the_other_protocol_is_refused(spec: str) -> None:
    with pytest.raises(AdhocRefused, match="outside"):
        adhoc_ports([spec], LAN, limits=WINDOW, rules=RULES)


def test_exactly_the_per_activation_limit_is_allowed_across_specs_one_more_is_not() -> None:
    assert adhoc_ports(["udp/40000-40001", "udp/40005", "udp/40009"], LAN, limits=WINDOW,
                       rules=RULES) == (udp(40000, 40001), udp(40005), udp(40009))
    with pytest.raises(AdhocRefused, match="5 ports asked"):
        adhoc_ports(["udp/40000-40001", "udp/40005-40007"], LAN, limits=WINDOW, rules=RULES)


@pytest.mark.parametrize("spec", ["tcp/7990-8000", "tcp/8002-8010", "tcp/8001"])
def test_a_range_touching_a_reserved_port_at_either_end_is_refused(spec: str) -> None:
    with pytest.raises(AdhocRefused, match="overlaps rule 'nas'"):
        adhoc_ports([spec], LAN, limits=WIDE, rules=RULES)
    assert adhoc_ports([spec], NAS, limits=WIDE, rules=RULES)  # the rule's own host may


@pytest.mark.parametrize("spec", ["tcp/7990-7999", "tcp/8003-8010", "udp/8000-8002"])
def test_ports_next_to_or_of_the_other_protocol_than_a_reserved_range_are_free(
        spec: str) -> None:
    assert adhoc_ports([spec], LAN, limits=WIDE, rules=RULES)


def test_a_rule_without_a_hosts_list_reserves_nothing() -> None:
    assert adhoc_ports(["udp/8000"], LAN, limits=WIDE, rules=RULES) == (udp(8000),)


def test_a_reservation_is_found_whatever_rule_comes_first() -> None:
    rules = tuple(reversed(RULES))  # a generator too: the rules are read once per port
    assert adhoc_ports(["tcp/9000", "udp/9000"], LAN, limits=WIDE,
                       rules=iter(rules)) == (PortRange(Proto.TCP, 9000, 9000), udp(9000))
    with pytest.raises(AdhocRefused, match="overlaps rule 'nas'"):
        adhoc_ports(["tcp/9000", "tcp/8000"], LAN, limits=WIDE, rules=iter(rules))


def test_a_both_spec_asks_for_each_protocol_and_counts_both() -> None:
    assert adhoc_ports(["both/40000-40001"], LAN, limits=WIDE, rules=()) == (
        PortRange(Proto.TCP, 40000, 40001), udp(40000, 40001))
    with pytest.raises(AdhocRefused, match="4 ports asked"):
        adhoc_ports(["both/40000-40001"], LAN, limits=AdhocConfig(enabled=True, max_ports=3),
                    rules=())


def test_a_malformed_spec_is_a_usage_error_naming_the_field_not_a_refusal() -> None:
    with pytest.raises(UsageError, match=r'^field "open": ') as e:
        adhoc_ports(["udp/40000", "udp/70000"], LAN, limits=WINDOW, rules=RULES)
    assert not isinstance(e.value, AdhocRefused)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_a_restored_activation_is_kept_only_while_every_port_is_still_allowed() -> None:
    assert adhoc_permitted(WINDOW, (udp(40000, 40001), udp(40008, 40009)))  # exactly 4
    assert not adhoc_permitted(WINDOW, (udp(40000, 40002), udp(40008, 40009)))  # 5
    assert not adhoc_permitted(WINDOW, (udp(40000), udp(40010)))  # one outside
    assert not adhoc_permitted(WINDOW, (udp(40010), udp(40000)))
    off = AdhocConfig(enabled=False, max_ports=4, ports=WINDOW.ports)
    assert not adhoc_permitted(off, (udp(40000),))
    assert adhoc_permitted(WINDOW, (PortRange(Proto.TCP, 500, 500),))


def test_each_refusal_says_which_ports_are_allowed_and_who_holds_a_reserved_one() -> None:
    """What the API client reads: the ad-hoc window it may ask within, the networks a rule keeps
    its ports for, and the field an empty request lacks."""
    with pytest.raises(AdhocRefused) as e:
        adhoc_ports(["udp/1"], LAN, limits=WINDOW, rules=RULES)
    assert str(e.value) == "udp/1 is outside [api] adhoc_ports (udp/40000-40009, tcp/500)"
    rules = parse_config({"rules": [{"name": "nas", "open": ["tcp/8000"],
                                     "hosts": ["192.168.1.5", "10.0.0.0/8"]}]}).rules
    with pytest.raises(AdhocRefused) as e:
        adhoc_ports(["tcp/8000"], LAN, limits=WIDE, rules=rules)
    assert "its hosts list (192.168.1.5/32, 10.0.0.0/8) keeps from 192.168.1.9" in str(e.value)
    with pytest.raises(UsageError) as u:
        adhoc_ports([], LAN, limits=WIDE, rules=rules)
    assert str(u.value).startswith('field "open" must name at least one port')
