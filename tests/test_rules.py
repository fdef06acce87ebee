"""Rule modes are enums (core/rules.py): the config's strings become them, a script's strings
are accepted, anything else is refused with the value named; JSON shows the plain strings."""

from __future__ import annotations

import json

import pytest

from igdtrigger.config import parse_config
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import parse_port_spec
from igdtrigger.core.rules import External, Rule, Share


def test_config_modes_become_enums_and_json_shows_strings() -> None:
    cfg = parse_config({"rules": [{"name": "g", "trigger": ["udp/1"], "open": ["udp/2"],
                                   "share": "latest", "external": "any"}]})
    (rule,) = cfg.rules
    assert rule.share is Share.LATEST and rule.external is External.ANY
    assert json.loads(json.dumps(rule.to_json()))["share"] == "latest"
    assert cfg.gateway.backend == "auto" and cfg.api.zeroconf == "auto"


def test_a_script_may_name_modes_as_strings_but_not_unknown_ones() -> None:
    ports = parse_port_spec("udp/2")
    assert Rule("g", (), ports, share="latest").share is Share.LATEST  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'newest'"):
        Rule("g", (), ports, share="newest")  # type: ignore[arg-type]


@pytest.mark.parametrize(("section", "key", "value"), [
    ("gateway", "backend", "upnpc"), ("gateway", "protocol", "igd"), ("api", "zeroconf", "yes"),
])
def test_an_unknown_mode_is_refused_naming_field_and_value(section: str, key: str,
                                                          value: str) -> None:
    with pytest.raises(ConfigError, match=f"{section}.{key}.*'{value}'"):
        parse_config({section: {key: value}})
