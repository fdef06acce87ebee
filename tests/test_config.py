"""Config parsing: the contract's TOML, and one clear error per kind of bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from igdtrigger.config import load_config, parse_config
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import PortRange, Proto, parse_duration, parse_port_spec

CONTRACT = """
[gateway]
url = "http://192.168.1.1:5000/rootDesc.xml"
lease = "1h"

[api]
listen = "127.0.0.1:8731"

[[rules]]
name = "demo"
trigger = ["udp/27015", "tcp/27015-27030"]
open = ["udp/40000-40010", "both/3074"]
idle_timeout = "10m"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_contract_example_parses(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, CONTRACT))
    assert cfg.gateway.url == "http://192.168.1.1:5000/rootDesc.xml"
    assert cfg.gateway.lease == 3600
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 8731)
    (rule,) = cfg.rules
    assert rule.name == "demo"
    assert rule.trigger == (PortRange(Proto.UDP, 27015, 27015), PortRange(Proto.TCP, 27015, 27030))
    assert rule.open == (
        PortRange(Proto.UDP, 40000, 40010),
        PortRange(Proto.TCP, 3074, 3074),
        PortRange(Proto.UDP, 3074, 3074),
    )
    assert rule.idle_timeout == 600
    assert rule.port_count() == 13


def test_defaults_when_sections_missing() -> None:
    cfg = parse_config({"rules": [{"name": "x", "open": ["tcp/5000"]}]})
    assert cfg.gateway.url is None
    assert cfg.gateway.lease == 3600
    assert cfg.rules[0].idle_timeout == 600
    assert cfg.rules[0].trigger == ()


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('[[rules]]\nname="a"\nopen=["udp/70000"]', "rules[0].open[0]", "70000 is outside 1-65535"),
        ('[[rules]]\nname="a"\nopen=["tcp/10-5"]', "rules[0].open[0]", "runs backwards"),
        ('[[rules]]\nname="a"\nopen=["xyz/1"]', "rules[0].open[0]", "not a port spec"),
        ('[[rules]]\nname="a"\nopen=["udp/1"]\ntrigger=["udp/0"]', "rules[0].trigger[0]",
         "outside"),
        ('[[rules]]\nname="a"\nopen=["udp/1"]\n[[rules]]\nname="a"\nopen=["udp/2"]',
         "rules[1].name", "duplicate rule name 'a'"),
        ('[[rules]]\nname="a"\nopen=["udp/1"]\ncolour="red"', "rules[0]", "unknown key 'colour'"),
        ('[gatway]\nurl="http://x"', "config.toml", "unknown key 'gatway'"),
        ('[[rules]]\nname="a"\nopen=["udp/1"]\nidle_timeout="soon"', "rules[0].idle_timeout",
         "not a duration"),
        ('[[rules]]\nname="a b"\nopen=["udp/1"]', "rules[0].name", "not a rule name"),
        ('[[rules]]\nname="a"', "rules[0].open", "missing"),
        ('[gateway]\nurl="192.168.1.1"', "gateway.url", "not an http:// URL"),
        ('[gateway]\nlease="5s"', "gateway.lease", "outside 30s-7d"),
        ('[api]\nlisten="localhost"', "api.listen", "HOST:PORT"),
        ("rules = [", "config.toml", "invalid TOML"),
        ('[[rules]]\nname="a"\nopen=["tcp/1-2000"]', "rules[0].open", "privileged ports"),
    ],
)
def test_bad_config_names_file_field_and_value(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert where in msg
    assert what in msg
    assert err.value.exit_code == 2
    assert "\n" not in msg


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_config_search_uses_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "igdtrigger").mkdir()
    (tmp_path / "igdtrigger" / "config.toml").write_text(
        '[[rules]]\nname="found"\nopen=["udp/5000"]\n')
    monkeypatch.delenv("IGDTRIGGER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_config().rules[0].name == "found"


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), (90, 90), ("90s", 90), ("10m", 600),
                                               ("2h", 7200), ("1d", 86400), ("1.5m", 90)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-5", "10 minutes", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - message checked elsewhere
        parse_duration(bad)


def test_port_spec_both_and_case() -> None:
    assert parse_port_spec("BOTH/3074") == (PortRange(Proto.TCP, 3074, 3074),
                                            PortRange(Proto.UDP, 3074, 3074))
    assert len(parse_port_spec("udp/40000-40010")[0]) == 11


def test_a_privileged_port_named_explicitly_is_allowed() -> None:
    cfg = parse_config({"rules": [{"name": "web", "open": ["tcp/80", "tcp/443", "udp/1024-2000"]}]})
    assert [str(r) for r in cfg.rules[0].open] == ["tcp/80", "tcp/443", "udp/1024-2000"]


@pytest.mark.parametrize(("data", "field", "says"), [
    ({"rules": [{"name": "a", "open": ["udp/40000"], "idle_timeout": float("inf")}]},
     "rules[0].idle_timeout", "inf is outside 1s to 7d"),
    ({"rules": [{"name": "a", "open": ["udp/40000"], "idle_timeout": float("nan")}]},
     "rules[0].idle_timeout", "nan is outside"),
    ({"rules": [{"name": "a", "open": ["udp/40000"], "idle_timeout": "100000d"}]},
     "rules[0].idle_timeout", "outside 1s to 7d"),
    ({"rules": [{"name": "a", "open": ["udp/40000"], "idle_timeout": "500ms"}]},
     "rules[0].idle_timeout", "0.5s is outside 1s"),
    ({"gateway": {"check_interval": "1ms"}}, "gateway.check_interval", "0.001s is outside 500ms"),
    ({"gateway": {"verify_interval": float("inf")}}, "gateway.verify_interval", "inf"),
    ({"gateway": {"discover_timeout": "100000d"}}, "gateway.discover_timeout", "outside"),
    ({"api": {"adhoc_max_ttl": "10ms"}}, "api.adhoc_max_ttl", "outside"),
    ({"rules": [{"name": "a", "open": ["udp/2000-65535"]}]}, "rules[0].open",
     "opens 63536 ports; at most 4096 per rule"),
    ({"rules": [{"name": f"r{i}", "open": [f"both/{10000 + i * 2000}-{11999 + i * 2000}"]}
                for i in range(5)]}, "rules[4].open", "together open 20000 ports"),
])
def test_values_that_make_no_sense_are_refused_naming_the_key(
        data: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.field == field
    assert says in str(err.value)


def test_largest_sane_values_are_accepted() -> None:
    cfg = parse_config({"gateway": {"check_interval": "500ms", "verify_interval": "1d"},
                        "rules": [{"name": "a", "open": ["both/40000-42047"],
                                   "idle_timeout": "7d"}]})
    assert cfg.rules[0].port_count() == 4096
