"""The config parser at its limits: every bounded setting at and just past each end, the shape
of each error (which field, what is wrong), and the small value types' behaviour. Each case was
found by a mutant that no other test killed."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.config import (
    Config,
    check_state_dir,
    default_config_paths,
    default_state_dir,
    env_overrides,
    load_config,
    parse_config,
    parse_listen,
    validate_bounds,
)
from igdtrigger.core.errors import ConfigError
from igdtrigger.core.model import PortRange, Proto, parse_port_spec
from igdtrigger.core.rules import Rule
from igdtrigger.core.settings import AdhocConfig, ApiConfig

RULE = {"name": "game", "open": ["udp/27015"]}


def bad(data: dict[str, Any], field: str | None, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="c.toml")
    assert e.value.field == field, str(e.value)
    assert e.value.source == "c.toml"
    assert words in str(e.value), str(e.value)
    assert str(e.value).startswith("c.toml: " + (f"{field}: " if field else ""))


# --- [gateway] --------------------------------------------------------------------------------


@pytest.mark.parametrize(("lease", "seconds"), [(30, 30.0), (604800, 604800.0), ("7d", 604800.0)])
def test_lease_limits_accepted(lease: object, seconds: float) -> None:
    assert parse_config({"gateway": {"lease": lease}}).gateway.lease == seconds


@pytest.mark.parametrize("lease", [29, 29.9, 604801])
def test_lease_limits_refused(lease: object) -> None:
    bad({"gateway": {"lease": lease}}, "gateway.lease", "is outside 30s-7d")


def test_gateway_settings() -> None:
    g = parse_config({"gateway": {
        "url": "simulate", "discover_timeout": 5, "verify_interval": 30, "check_interval": 9,
        "check_before_add": False, "backend": "soap", "protocol": "pcp",
        "ipv6_pinholes": False}}).gateway
    assert g.simulate and g.url == "simulate"
    assert (g.discover_timeout, g.verify_interval, g.check_interval) == (5, 30, 9)
    assert (g.check_before_add, g.backend, g.protocol, g.ipv6_pinholes) == (
        False, "soap", "pcp", False)
    d = Config().gateway
    assert (d.url, d.lease, d.discover_timeout, d.verify_interval, d.check_interval) == (
        None, 3600.0, 2.0, 60.0, 2.0)
    assert (d.check_before_add, d.backend, d.protocol, d.ipv6_pinholes) == (
        True, "auto", "auto", True)
    assert parse_config({}).gateway == d
    assert not d.simulate
    assert parse_config({"gateway": {"url": " https://r/d.xml "}}).gateway.url == "https://r/d.xml"
    # URL schemes are case-insensitive (RFC 3986 3.1): a pasted upper-case one is accepted
    for url in ("HTTPS://r/d.xml", "Http://192.168.1.1:5000/rootDesc.xml"):
        assert parse_config({"gateway": {"url": url}}).gateway.url == url


@pytest.mark.parametrize(("gw", "field", "words"), [
    ({"url": "ftp://r/x"}, "gateway.url", "is not an http:// URL"),
    ({"url": "  "}, "gateway.url", "expected a non-empty string, got '  '"),
    ({"url": 5}, "gateway.url", "expected a non-empty string, got 5"),
    ({"backend": "curl"}, "gateway.backend", "'curl' is not one of auto, miniupnpc, soap"),
    ({"protocol": "smtp"}, "gateway.protocol", "'smtp' is not one of auto, upnp, natpmp, pcp"),
    ({"check_before_add": "yes"}, "gateway.check_before_add", "expected true or false, got"),
    ({"lease": "forever"}, "gateway.lease", "is not a duration"),
    ({"colour": "red"}, "gateway", "unknown key 'colour' (allowed: url, lease,"),
])
def test_gateway_errors(gw: dict[str, Any], field: str, words: str) -> None:
    bad({"gateway": gw}, field, words)


# --- [api] ------------------------------------------------------------------------------------


def test_api_limits_accepted() -> None:
    for rate in (0.001, 10000, 1):
        assert parse_config({"api": {"rate_limit": rate}}).api.rate_limit == float(rate)
    for burst in (1, 100000):
        assert parse_config({"api": {"rate_burst": burst}}).api.rate_burst == burst
    d = parse_config({}).api
    assert (d.host, d.port, d.rate_limit, d.rate_burst, d.zeroconf) == (
        "127.0.0.1", 8731, 20.0, 60, "auto")
    assert not d.public_read and d.allowed_hosts == ()


@pytest.mark.parametrize(("api", "field", "words"), [
    ({"rate_limit": 0}, "api.rate_limit", "expected requests per second in (0, 10000], got 0"),
    ({"rate_limit": 10000.5}, "api.rate_limit", "got 10000.5"),
    ({"rate_limit": True}, "api.rate_limit", "got True"),
    ({"rate_limit": "5"}, "api.rate_limit", "got '5'"),
    ({"rate_burst": 0}, "api.rate_burst", "expected an integer 1-100000, got 0"),
    ({"rate_burst": 100001}, "api.rate_burst", "got 100001"),
    ({"rate_burst": 1.0}, "api.rate_burst", "got 1.0"),
    ({"rate_burst": False}, "api.rate_burst", "got False"),
    ({"allowed_hosts": "pc.lan"}, "api.allowed_hosts", "expected a list of host names"),
    ({"allowed_hosts": ["ok", " "]}, "api.allowed_hosts", "expected a list of host names"),
    ({"allowed_hosts": [1]}, "api.allowed_hosts", "expected a list of host names"),
    ({"zeroconf": "yes"}, "api.zeroconf", "expected true, false or \"auto\", got 'yes'"),
    ({"listen": "pc:80"}, "api.listen", "host must be an IP address"),
    ({"public_read": 1}, "api.public_read", "expected true or false, got 1"),
])
def test_api_errors(api: dict[str, Any], field: str, words: str) -> None:
    bad({"api": api}, field, words)


@pytest.mark.parametrize(("value", "mode"), [(True, "on"), (False, "off"), ("auto", "auto"),
                                             ("on", "on"), ("off", "off")])
def test_zeroconf_modes(value: object, mode: str) -> None:
    assert parse_config({"api": {"zeroconf": value}}).api.zeroconf == mode


def test_api_settings() -> None:
    api = parse_config({"api": {"listen": "0.0.0.0:9000", "public_read": True,
                                "allowed_hosts": [" PC.Lan ", "nas"]}}).api
    assert (api.host, api.port, api.public_read) == ("0.0.0.0", 9000, True)
    assert api.allowed_hosts == ("pc.lan", "nas")


@pytest.mark.parametrize(("text", "want"), [
    ("8731", ("127.0.0.1", 8731)), (" 0 ", ("127.0.0.1", 0)), ("[::1]:80", ("::1", 80)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)), ("localhost:1", ("localhost", 1)),
    ("::1:80", ("::1", 80)),
])
def test_listen_forms(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize(("text", "words"), [
    ("[::1]80", "write [IPv6]:PORT"), ("pc", "write HOST:PORT"),
    ("1.2.3.4:65536", "port must be 0-65535"), ("1.2.3.4:x", "port must be 0-65535"),
    ("1.2.3.4:", "port must be 0-65535"), ("host:80", "host must be an IP address"),
    ("1.2.3.4:-1", "port must be 0-65535"),
])
def test_listen_errors(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        parse_listen(text)
    assert str(e.value).startswith(repr(text.strip()) + ": ")


@pytest.mark.parametrize(("host", "loopback", "url"), [
    ("127.0.0.1", True, "http://127.0.0.1:8731"), ("localhost", True, "http://localhost:8731"),
    ("::1", True, "http://[::1]:8731"), ("0.0.0.0", False, "http://127.0.0.1:8731"),
    ("::", False, "http://[::1]:8731"), ("192.168.1.5", False, "http://192.168.1.5:8731"),
    ("pc.lan", False, "http://pc.lan:8731"),
])
def test_api_url_and_loopback(host: str, loopback: bool, url: str) -> None:
    api = ApiConfig(host=host)
    assert api.loopback_only is loopback and api.url == url


# --- ad-hoc ports -----------------------------------------------------------------------------


def test_adhoc_defaults_and_limits() -> None:
    a = parse_config({}).api.adhoc
    assert a == AdhocConfig()
    assert (a.enabled, a.max_ports, a.max_ttl, a.per_host, a.admin_only) == (
        False, 16, 14400.0, 4, False)
    assert a.ports == (PortRange(Proto.TCP, 1024, 65535), PortRange(Proto.UDP, 1024, 65535))
    top = parse_config({"api": {"allow_adhoc": True, "adhoc_max_ports": 4096,
                                "adhoc_per_host": 1000, "adhoc_max_ttl": "7d",
                                "adhoc_admin_only": True, "adhoc_ports": ["tcp/80"]}}).api.adhoc
    assert (top.enabled, top.max_ports, top.per_host, top.max_ttl, top.admin_only) == (
        True, 4096, 1000, 604800.0, True)
    assert top.ports == parse_port_spec("tcp/80")
    low = parse_config({"api": {"adhoc_max_ports": 1, "adhoc_per_host": 1,
                                "adhoc_ports": "udp/1024-1100"}}).api.adhoc
    assert (low.max_ports, low.per_host) == (1, 1)
    assert low.ports == parse_port_spec("udp/1024-1100")


@pytest.mark.parametrize(("api", "field", "words"), [
    ({"adhoc_max_ports": 0}, "api.adhoc_max_ports", "expected an integer 1-4096, got 0"),
    ({"adhoc_max_ports": 4097}, "api.adhoc_max_ports", "got 4097"),
    ({"adhoc_max_ports": True}, "api.adhoc_max_ports", "got True"),
    ({"adhoc_max_ports": 2.0}, "api.adhoc_max_ports", "got 2.0"),
    ({"adhoc_per_host": 0}, "api.adhoc_per_host", "expected an integer 1-1000, got 0"),
    ({"adhoc_per_host": 1001}, "api.adhoc_per_host", "got 1001"),
    ({"adhoc_max_ttl": "8d"}, "api.adhoc_max_ttl", "expected a duration up to 7d, got 691200s"),
    ({"adhoc_ports": ["tcp/80-90"]}, "api.adhoc_ports", "tcp/80-90 includes privileged ports"),
    ({"adhoc_ports": ["tcp/1000-1024"]}, "api.adhoc_ports", "includes privileged ports"),
    ({"adhoc_ports": []}, "api.adhoc_ports", "must name at least one port"),
    ({"adhoc_ports": ["udp/x"]}, "api.adhoc_ports[0]", "is not a port spec"),
    ({"adhoc_ports": 5}, "api.adhoc_ports", "expected a list of port specs, got 5"),
])
def test_adhoc_errors(api: dict[str, Any], field: str, words: str) -> None:
    bad({"api": api}, field, words)


def test_adhoc_permits_only_inside_its_ranges() -> None:
    a = AdhocConfig(ports=parse_port_spec("udp/5000-5010"))
    assert a.permits(PortRange(Proto.UDP, 5000, 5010))
    assert a.permits(PortRange(Proto.UDP, 5003, 5003))
    assert not a.permits(PortRange(Proto.UDP, 4999, 5001))
    assert not a.permits(PortRange(Proto.UDP, 5010, 5011))
    assert not a.permits(PortRange(Proto.TCP, 5000, 5000))
    assert a.to_json() == {"enabled": False, "ports": ["udp/5000-5010"], "max_ports": 16,
                           "max_ttl": 14400.0, "per_host": 4, "admin_only": False}


# --- [detect] and [service] -------------------------------------------------------------------


def test_detect_settings() -> None:
    d = parse_config({"detect": {"methods": ["sockets", "sockets", "process"],
                                 "socket_interval": "50ms", "process_interval": "1h"}}).detect
    assert d.methods == ("sockets", "process") and d.explicit
    assert (d.socket_interval, d.process_interval) == (0.05, 3600.0)
    default = parse_config({}).detect
    assert default.methods == ("conntrack", "sockets", "process") and not default.explicit
    assert (default.socket_interval, default.process_interval) == (1.0, 1.0)


@pytest.mark.parametrize(("det", "field", "words"), [
    ({"methods": ["radar"]}, "detect.methods",
     "unknown detector 'radar' (known: conntrack, sockets, process)"),
    ({"methods": "sockets"}, "detect.methods", "expected a list of names, got 'sockets'"),
    ({"methods": [1]}, "detect.methods", "expected a list of names"),
    ({"socket_interval": "49ms"}, "detect.socket_interval",
     "expected a duration from 50ms to 1h, got 0.049s"),
    ({"process_interval": 3601}, "detect.process_interval", "got 3601s"),
])
def test_detect_errors(det: dict[str, Any], field: str, words: str) -> None:
    bad({"detect": det}, field, words)


def test_state_dir() -> None:
    assert parse_config({"service": {"state_dir": " /tmp/x "}}).state_dir == Path("/tmp/x")
    assert parse_config({}).state_dir is None
    bad({"service": {"state": 1}}, "service", "unknown key 'state' (allowed: state_dir)")


def test_default_state_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("IGDTRIGGER_STATE_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_state_dir() == tmp_path / "xdg" / "igdtrigger"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / ".local" / "state" / "igdtrigger"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_state_dir() == Path("/var/lib/igdtrigger")
    monkeypatch.setenv("STATE_DIRECTORY", "/run/a:/run/b")
    assert default_state_dir() == Path("/run/a")
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", "/srv/igd")
    assert default_state_dir() == Path("/srv/igd")


# --- [[rules]] --------------------------------------------------------------------------------


def test_rule_fields_and_defaults() -> None:
    cfg = parse_config({"rules": [
        {"name": "a" * 40, "open": "tcp/80", "trigger": ["udp/1", "both/5-6"],
         "idle_timeout": "90s", "process": "Game.exe", "hosts": "192.168.1.7",
         "share": "latest", "external": "any"},
        {"name": "b.c-d_e", "open": ["udp/1024-2000"]}]})
    a, b = cfg.rules
    assert a.trigger == parse_port_spec("udp/1") + parse_port_spec("both/5-6")
    assert (a.idle_timeout, a.process, a.share, a.external) == (90.0, ("Game.exe",), "latest",
                                                                "any")
    assert a.hosts == (ipaddress.ip_network("192.168.1.7/32"),)
    assert (b.trigger, b.idle_timeout, b.process, b.hosts, b.share, b.external) == (
        (), 600.0, (), (), "first", "same")
    assert cfg.rule("b.c-d_e") is b and cfg.rule("zzz") is None
    assert a.to_json() == {"name": "a" * 40, "trigger": ["udp/1", "tcp/5-6", "udp/5-6"],
                           "open": ["tcp/80"], "idle_timeout": 90.0, "process": ["Game.exe"],
                           "hosts": ["192.168.1.7/32"], "share": "latest", "external": "any"}
    assert b.port_count() == 977


@pytest.mark.parametrize(("rule", "field", "words"), [
    ({"name": "a" * 41}, "rules[0].name", "is not a rule name (1-40 letters"),
    ({"name": "-a"}, "rules[0].name", "is not a rule name"),
    ({"name": "a b"}, "rules[0].name", "is not a rule name"),
    ({"name": "adhoc:x"}, "rules[0].name", "is not a rule name"),
    ({"name": ""}, "rules[0].name", "is not a rule name"),
    ({"name": 5}, "rules[0].name", "5 is not a rule name"),
    ({"open": ["tcp/80-81"]}, "rules[0].open",
     "tcp/80-81 includes privileged ports below 1024; open those only by naming each one"),
    ({"open": ["tcp/1023-1024"]}, "rules[0].open", "includes privileged ports"),
    ({"open": None}, "rules[0].open", "missing; list port specs like"),
    ({"open": []}, "rules[0].open", "must name at least one port"),
    ({"open": ["udp/1", "udp/0"]}, "rules[0].open[1]", "port 0 is outside 1-65535"),
    ({"trigger": {"a": 1}}, "rules[0].trigger", "expected a list of port specs"),
    ({"process": ["bin/game"]}, "rules[0].process", "expected executable names like"),
    ({"process": ["a\\b"]}, "rules[0].process", "expected executable names"),
    ({"process": [" "]}, "rules[0].process", "expected executable names"),
    ({"process": ["x" * 256]}, "rules[0].process", "expected executable names"),
    ({"process": 5}, "rules[0].process", "expected executable names"),
    ({"hosts": ["192.168.1.0/24", "pc"]}, "rules[0].hosts[1]",
     "'pc' is not an IP address or network like 192.168.1.20 or 192.168.1.0/28"),
    ({"hosts": 5}, "rules[0].hosts", "expected addresses or networks, got 5"),
    ({"share": "fair"}, "rules[0].share", "'fair' is not one of first, latest"),
    ({"external": "random"}, "rules[0].external", "'random' is not one of same, any"),
    ({"idle_timeout": 0}, "rules[0].idle_timeout", "duration"),
    ({"colour": 1}, "rules[0]", "unknown key 'colour'"),
])
def test_rule_errors(rule: dict[str, Any], field: str, words: str) -> None:
    bad({"rules": [{**RULE, **rule}]}, field, words)


def test_rule_single_ports_below_1024_and_long_names_are_fine() -> None:
    cfg = parse_config({"rules": [{"name": "web", "open": ["tcp/80", "tcp/1024-1030"],
                                   "process": ["x" * 255]}]})
    assert cfg.rules[0].port_count() == 8


def test_duplicate_rule_names_point_at_both() -> None:
    bad({"rules": [RULE, {**RULE, "open": ["udp/2"]}, RULE]}, "rules[1].name",
        "duplicate rule name 'game' (also rules[0])")


def test_rules_must_be_tables() -> None:
    bad({"rules": {"name": "x"}}, "rules", "expected [[rules]] tables, got {'name': 'x'}")
    bad({"rules": ["x"]}, "rules[0]", "expected a table, got 'x'")
    bad({"gateway": 5}, "gateway", "expected a table, got 5")
    bad({"extra": 1}, None, "unknown key 'extra' (allowed: gateway, api, detect, service")


def test_long_values_are_shortened_in_errors() -> None:
    long = "x" * 100
    with pytest.raises(ConfigError) as e:
        parse_config({"gateway": {"backend": long}})
    assert long in str(e.value)  # the backend check names the value itself
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"zeroconf": long}})
    assert "'" + "x" * 56 + "..." in str(e.value) and long not in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"zeroconf": "y" * 58}})
    assert "'" + "y" * 58 + "'" in str(e.value)  # 60 characters: shown whole


# --- [launchers] ------------------------------------------------------------------------------


def test_launchers() -> None:
    cfg = parse_config({"rules": [RULE], "launchers": {"steam:730": "game",
                                                       "heroic:abc": "game"}})
    assert cfg.launchers == (("steam:730", "game"), ("heroic:abc", "game"))
    bad({"rules": [RULE], "launchers": {"epic:1": "game"}}, "launchers.epic:1",
        "key 'epic:1' must be LAUNCHER:ID with LAUNCHER one of steam, lutris, heroic")
    bad({"rules": [RULE], "launchers": {"steam:": "game"}}, "launchers.steam:", "must be")
    bad({"rules": [RULE], "launchers": {"steam": "game"}}, "launchers.steam", "must be")
    bad({"rules": [RULE], "launchers": {"lutris:x": "nope"}}, "launchers.lutris:x",
        "'nope' is not a configured rule (known rules: game)")
    bad({"launchers": {"lutris:x": "nope"}}, "launchers.lutris:x", "(known rules: none)")


# --- environment ------------------------------------------------------------------------------


def test_env_override_names() -> None:
    env = {"IGDTRIGGER_API__LISTEN": "0.0.0.0:1", "IGDTRIGGER_CONFIG": "/x",
           "OTHER__X": "1", "IGDTRIGGER_GATEWAY__LEASE": "60"}
    assert env_overrides(env) == {("api", "listen"): "0.0.0.0:1", ("gateway", "lease"): "60"}


def test_env_overrides_apply_with_toml_values(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[api]\nlisten = "127.0.0.1:1"\n')
    monkeypatch.setenv("IGDTRIGGER_API__PUBLIC_READ", "true")
    monkeypatch.setenv("IGDTRIGGER_API__ALLOWED_HOSTS", '["a", "b"]')
    monkeypatch.setenv("IGDTRIGGER_GATEWAY__URL", "simulate")
    cfg = load_config(path)
    assert cfg.api.public_read is True and cfg.api.allowed_hosts == ("a", "b")
    assert cfg.api.port == 1 and cfg.gateway.simulate
    assert cfg.source == (f"{path} + IGDTRIGGER_API__ALLOWED_HOSTS, "
                          "IGDTRIGGER_API__PUBLIC_READ, IGDTRIGGER_GATEWAY__URL")


def test_env_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    monkeypatch.setenv("IGDTRIGGER_API__RATE_BURST", "0")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (e.value.source, e.value.field) == ("environment", "IGDTRIGGER_API__RATE_BURST")
    assert str(e.value) == ("environment: IGDTRIGGER_API__RATE_BURST: expected an integer "
                            "1-100000, got 0")
    monkeypatch.delenv("IGDTRIGGER_API__RATE_BURST")
    monkeypatch.setenv("IGDTRIGGER_API__ADHOC_PORTS", '["udp/1", "udp/x"]')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.field == "IGDTRIGGER_API__ADHOC_PORTS" and "udp/x" in str(e.value)
    monkeypatch.delenv("IGDTRIGGER_API__ADHOC_PORTS")
    monkeypatch.setenv("IGDTRIGGER_RULES__NAME", "x")
    with pytest.raises(ConfigError, match="unknown section 'rules' \\(environment overrides "
                                          "exist for: gateway, api, detect, service, front\\)"):
        load_config(path)
    monkeypatch.delenv("IGDTRIGGER_RULES__NAME")
    monkeypatch.setenv("IGDTRIGGER_API__COLOUR", "x")
    with pytest.raises(ConfigError, match="unknown key 'colour' \\(allowed: listen,"):
        load_config(path)


def test_env_error_in_a_file_field_is_the_files(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[gateway]\nbackend = "curl"\n')
    monkeypatch.setenv("IGDTRIGGER_API__PUBLIC_READ", "true")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (e.value.source, e.value.field) == (str(path), "gateway.backend")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(tmp_path / "bin.toml")
    (tmp_path / "bad.toml").write_text("[api\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_rule_allows() -> None:
    r = Rule("r", (), parse_port_spec("udp/1"), hosts=(ipaddress.ip_network("10.0.0.0/8"),))
    assert r.allows("10.1.2.3") and not r.allows("11.0.0.1") and not r.allows("pc")
    assert Rule("r", (), ()).allows("anything")


def test_api_limits_are_read_and_bounded() -> None:
    api = parse_config({"api": {"max_per_host": 5, "allow": ["10.0.0.0/8"],
                                "adhoc_max_ttl": 604800}}).api
    assert api.max_per_host == 5
    assert list(api.allow) == [ipaddress.ip_network("10.0.0.0/8")]
    assert api.adhoc.max_ttl == 604800
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"adhoc_max_ttl": 604801}})
    assert e.value.field == "api.adhoc_max_ttl"
    with pytest.raises(ConfigError, match="expected an integer 1-1000, got 0") as e:
        parse_config({"api": {"max_per_host": 0}})
    assert e.value.field == "api.max_per_host"
    with pytest.raises(ConfigError, match="expected a list of host names, got 5"):
        parse_config({"api": {"allowed_hosts": 5}})
    assert parse_config({}).detect.track_flows is True
    assert parse_config({"detect": {"track_flows": False}}).detect.track_flows is False


def test_errors_name_the_file_they_come_from() -> None:
    assert parse_config({}, source="/etc/igdtrigger/config.toml").source == (
        "/etc/igdtrigger/config.toml")
    wide = {"rules": [{"name": "g", "trigger": ["udp/27015"], "open": ["udp/10000-15000"]}]}
    with pytest.raises(ConfigError, match="rule 'g' opens 5001 ports") as e:
        validate_bounds(parse_config(wide, source="/etc/igdtrigger/config.toml"))
    assert e.value.source == "/etc/igdtrigger/config.toml"
    assert e.value.field == "rules[0].open"


def test_environment_errors_say_they_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("")
    for name in ("IGDTRIGGER_RULES__NAME", "IGDTRIGGER_API__LISTN"):
        monkeypatch.setenv(name, "x")
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / "c.toml")
        assert (e.value.source, e.value.field) == ("environment", name)
        monkeypatch.delenv(name)


def test_systemd_configuration_directory_first_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", "/etc/igd-a:/etc/igd-b")
    assert Path("/etc/igd-a/config.toml") in default_config_paths()
    assert Path("/etc/igd-b/config.toml") not in default_config_paths()


def test_state_dir_this_process_may_not_enter_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests run as root, who may enter anything: the kernel's answer is faked for one
    directory, as a container's /config owned by another uid would answer."""
    import os
    state = tmp_path / "state"
    state.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != state and real(p, mode))
    with pytest.raises(ConfigError, match="cannot use the state directory: permission denied") as e:
        check_state_dir(state)
    assert e.value.source == str(state)
    assert f"{state} is owned by uid {os.geteuid()} with mode" in str(e.value)
    check_state_dir(tmp_path / "state" / "sub")  # a parent denied: created later, not refused
    check_state_dir(tmp_path)


def test_too_many_ports_over_all_rules_names_the_file_and_the_rule() -> None:
    rules = [{"name": f"g{i}", "trigger": [f"udp/{27000 + i}"],
              "open": [f"udp/{10000 + i * 4096}-{10000 + i * 4096 + 4095}"]} for i in range(5)]
    with pytest.raises(ConfigError, match="the rules together open 20480 ports") as e:
        validate_bounds(parse_config({"rules": rules}, source="/etc/igdtrigger/config.toml"))
    assert (e.value.source, e.value.field) == ("/etc/igdtrigger/config.toml", "rules[4].open")


@pytest.mark.parametrize(("nets", "field"), [
    (["192.168.1.0/24", "0.0.0.0/0"], "api.allow[1]"),
    (["::/0"], "api.allow[0]"),
    (["::ffff:0:0/96"], "api.allow[0]"),  # every IPv4 address, written as IPv6
    (["::/1"], "api.allow[0]"),  # holds ::ffff:0:0/96
])
def test_api_allow_of_every_address_is_refused(nets: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match="is every address: anyone on the Internet") as e:
        parse_config({"api": {"allow": nets}})
    assert e.value.field == field


def test_api_allow_of_lan_networks_is_kept() -> None:
    nets = ["192.168.1.0/24", "fd00::/8", "::ffff:192.168.1.0/120", "10.0.0.0/8"]
    assert list(parse_config({"api": {"allow": nets}}).api.allow) == [
        ipaddress.ip_network(n) for n in nets]
