"""Hostile config: whatever the file holds, the result is a valid Config or a ConfigError that
names where the problem is; never another exception. And what a valid config allows is safe."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igdtrigger.config import load_config, parse_config
from igdtrigger.core.errors import ConfigError

# a longer fuzz run: IGDTRIGGER_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_config.py
EXAMPLES = int(os.environ.get("IGDTRIGGER_FUZZ_EXAMPLES", "600"))
SECTIONS = {
    "gateway": ["url", "lease", "discover_timeout", "verify_interval", "check_interval",
                "check_before_add", "backend", "protocol"],
    "api": ["listen", "public_read", "rate_limit", "rate_burst", "allowed_hosts", "zeroconf",
            "allow_adhoc", "adhoc_ports", "adhoc_max_ports", "adhoc_max_ttl", "adhoc_per_host",
            "adhoc_admin_only"],
    "detect": ["methods", "socket_interval", "process_interval"],
    "service": ["state_dir"],
}
RULE_KEYS = ["name", "trigger", "open", "idle_timeout", "process", "hosts", "share", "external"]

# values that look like what belongs there, and values that do not
plausible = st.sampled_from([
    "udp/27015", "tcp/1-65535", "both/80", "udp/0", "tcp/70000", "udp/5-3", "tcp/80-1000",
    "10m", "0s", "-5s", "1e9h", "90", "auto", "upnp", "pcp", "natpmp", "soap", "miniupnpc",
    "first", "latest", "same", "any", "conntrack", "sockets", "process", "ebpf",
    "192.168.1.0/24", "::1", "not an ip", "http://192.168.1.1:5000/rootDesc.xml", "simulate",
    "ftp://x", "0.0.0.0:8731", "[::]:1", "127.0.0.1:99999", "cs2", "a/b", "C:\\x.exe", "",
    " ", "demo", "x" * 300,
])
scalar = st.one_of(plausible, st.text(max_size=20), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True), st.booleans(), st.none())
value = st.one_of(scalar, st.lists(scalar, max_size=4), st.lists(plausible, max_size=4),
                  st.dictionaries(st.text(max_size=8), scalar, max_size=3))


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            doc[section] = {k: draw(value) for k in draw(st.lists(st.sampled_from(
                [*keys, "bogus"]), max_size=4, unique=True))}
        elif draw(st.integers(0, 9)) == 0:
            doc[section] = draw(value)  # a section that is not a table
    if draw(st.booleans()):
        rules = []
        for _ in range(draw(st.integers(0, 3))):
            rule = {k: draw(value) for k in draw(st.lists(st.sampled_from([*RULE_KEYS, "x"]),
                                                          max_size=6, unique=True))}
            if draw(st.booleans()):
                rule.setdefault("name", draw(st.sampled_from(["a", "b", "demo"])))
                rule.setdefault("open", [draw(plausible)])
            rules.append(rule)
        doc["rules"] = rules if draw(st.integers(0, 9)) else draw(value)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=6))] = draw(value)
    return doc


def check_safe(cfg: Any) -> None:
    for rule in cfg.rules:
        assert rule.open
        for rng in rule.open:
            assert 1 <= rng.first <= rng.last <= 65535
            assert rng.first >= 1024 or rng.first == rng.last, rng  # privileged: one by one
    for rng in cfg.api.adhoc.ports:
        assert rng.first >= 1024 or rng.first == rng.last
    assert cfg.gateway.lease > 0 and cfg.gateway.check_interval > 0


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_config_document_is_valid_or_a_named_error(doc: dict[str, Any]) -> None:
    try:
        cfg = parse_config(doc, source="fuzz.toml")
    except ConfigError as exc:
        text = str(exc)
    else:
        check_safe(cfg)
        return
    assert "fuzz.toml" in text and len(text) < 2000, text


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_file_bytes_load_or_fail_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        message = str(exc)
    else:
        check_safe(cfg)
        return
    assert str(path) in message


def test_a_valid_file_round_trips() -> None:
    text = Path(__file__).resolve().parent.parent.joinpath("examples", "config.toml").read_text()
    cfg = parse_config(tomllib.loads(text))
    assert cfg.rules and cfg.rules[0].name == "demo"
