"""The port policy (core/policy.py), pure: the same answers the config loader and the API give."""

from __future__ import annotations

import pytest

from igdtrigger.config import parse_config
from igdtrigger.core.errors import AdhocRefused, ConfigError, UsageError
from igdtrigger.core.model import PortRange, Proto
from igdtrigger.core.policy import adhoc_permitted, adhoc_ports, hides_privileged
from igdtrigger.core.settings import AdhocConfig

ON = AdhocConfig(enabled=True, max_ports=4)
RULES = parse_config({"rules": [{"name": "nas", "open": ["tcp/8000"],
                                 "hosts": ["192.168.1.5"]}]}).rules


def test_a_privileged_port_opens_only_when_named_alone() -> None:
    assert hides_privileged(PortRange(Proto.TCP, 1, 2000))
    assert not hides_privileged(PortRange(Proto.TCP, 80, 80))
    assert not hides_privileged(PortRange(Proto.TCP, 1024, 2000))
    with pytest.raises(ConfigError, match="privileged"):  # the loader asks the same question
        parse_config({"rules": [{"name": "x", "open": ["tcp/1-2000"]}]})


def test_adhoc_ports_are_checked_once_with_one_clear_error_each() -> None:
    assert adhoc_ports(["udp/34197"], "192.168.1.9", limits=ON, rules=RULES) == (
        PortRange(Proto.UDP, 34197, 34197),)
    with pytest.raises(AdhocRefused, match="outside"):
        adhoc_ports(["tcp/80"], "192.168.1.9", limits=ON, rules=RULES)
    with pytest.raises(AdhocRefused, match="overlaps rule 'nas'"):
        adhoc_ports(["tcp/8000"], "192.168.1.9", limits=ON, rules=RULES)
    assert adhoc_ports(["tcp/8000"], "192.168.1.5", limits=ON, rules=RULES)  # its own host
    with pytest.raises(AdhocRefused, match="5 ports asked"):
        adhoc_ports(["udp/40000-40004"], "192.168.1.9", limits=ON, rules=RULES)
    with pytest.raises(UsageError, match='field "open"'):
        adhoc_ports(["udp/banana"], "192.168.1.9", limits=ON, rules=RULES)
    with pytest.raises(UsageError, match="at least one port"):
        adhoc_ports([], "192.168.1.9", limits=ON, rules=RULES)


def test_a_restored_adhoc_activation_needs_the_policy_still_to_allow_it() -> None:
    ports = (PortRange(Proto.UDP, 40000, 40001),)
    assert adhoc_permitted(ON, ports)
    assert not adhoc_permitted(AdhocConfig(enabled=False), ports)
    assert not adhoc_permitted(AdhocConfig(enabled=True, max_ports=1), ports)
