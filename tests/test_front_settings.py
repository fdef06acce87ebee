"""``[front]`` settings and the miniupnpd-style allow/deny lines (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from igdtrigger.config import load_config, parse_config
from igdtrigger.core.acl import parse_acl
from igdtrigger.core.errors import ConfigError


def test_first_matching_line_wins_and_no_match_denies() -> None:
    acl = parse_acl(["deny 50000-50010 192.168.1.0/24 0-65535",
                     "allow 1024-65535 192.168.1.0/255.255.255.0 1024-65535"])
    assert not acl.allows(50005, "192.168.1.20", 50005)  # the deny comes first
    assert acl.allows(50011, "192.168.1.20", 50011)
    assert not acl.allows(40000, "192.168.1.20", 80)  # internal port outside every line
    assert not acl.allows(40000, "10.0.0.5", 40000)  # no line matches: denied
    assert not acl.allows(40000, "not-an-address", 40000)
    line = acl.check(50005, "192.168.1.20", 1)
    assert line is not None and line.text.startswith("deny 50000-50010")


@pytest.mark.parametrize(("line", "says"), [
    ("allow 1024-65535 10.0.0.0/24", "is not 'allow|deny"),
    ("permit 1 10.0.0.0/24 1", "is not 'allow|deny"),
    ("allow 70000 10.0.0.0/24 1", "outside 0-65535"),
    ("allow 2000-1000 10.0.0.0/24 1", "runs backwards"),
    ("allow 1 10.0.0.0/40 1", "client network"),
    ("allow x 10.0.0.0/24 1", "not a port"),
])
def test_a_bad_line_is_named(line: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"front": {"allow": ["allow 1 0.0.0.0/0 1", line]}}, source="cfg.toml")
    assert "front.allow[1]" in str(exc.value) and says in str(exc.value)


def test_defaults_are_off_secure_and_unprivileged() -> None:
    front = parse_config({}).front
    assert not front.enabled and front.secure_mode
    assert front.max_lease == 3600 and front.idle_timeout == 600
    assert front.acl.allows(40000, "192.168.1.20", 40000)
    assert not front.acl.allows(80, "192.168.1.20", 80)


def test_the_issue_example_parses() -> None:
    front = parse_config({"front": {
        "enabled": True, "interfaces": ["br-lan"], "max_lease": "1h", "idle_timeout": "10m",
        "allow": ["allow 1024-65535 10.8.0.0/24 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"],
        "forward_chain": "inet filter forward"}}).front
    assert front.enabled and front.interfaces == ("br-lan",)
    assert front.forward_chain == "inet filter forward"
    assert front.acl.allows(2000, "10.8.0.3", 2000) and not front.acl.allows(2000, "10.9.0.3", 2000)


@pytest.mark.parametrize(("table", "field"), [
    ({"enabled": "yes"}, "front.enabled"),
    ({"max_lease": "forever"}, "front.max_lease"),
    ({"idle_timeout": "8d"}, "front.idle_timeout"),
    ({"interfaces": "br-lan"}, "front.interfaces"),
    ({"allow": "allow 1 0.0.0.0/0 1"}, "front.allow"),
    ({"forward_chain": "forward"}, "front.forward_chain"),
    ({"http_port": 70000}, "front.http_port"),
])
def test_bad_keys_are_named(table: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"front": table})
    assert field in str(exc.value)


def test_an_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown key 'lease'"):
        parse_config({"front": {"lease": 5}})


def test_environment_overrides_reach_front(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("IGDTRIGGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CONFIGURATION_DIRECTORY", raising=False)
    monkeypatch.setenv("IGDTRIGGER_FRONT__ENABLED", "true")
    monkeypatch.setenv("IGDTRIGGER_FRONT__INTERFACES", '["br-lan"]')
    monkeypatch.setenv("IGDTRIGGER_FRONT__ALLOW", '["allow 1 0.0.0.0/0"]')
    with pytest.raises(ConfigError) as exc:
        load_config(None)
    assert "IGDTRIGGER_FRONT__ALLOW" in str(exc.value)
    monkeypatch.delenv("IGDTRIGGER_FRONT__ALLOW")
    front = load_config(None).front
    assert front.enabled and front.interfaces == ("br-lan",)


@pytest.mark.parametrize(("allow", "refused"), [
    ([], True),
    (["deny 0-65535 0.0.0.0/0 0-65535"], True),
    (["allow 1024-65535 10.8.0.0/24 1024-65535"], False),
])
def test_check_config_says_the_front_can_open_ports_and_when_no_line_allows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], allow: list[str],
        refused: bool) -> None:
    """With only a [front] it said "no rules: nothing can be opened", which is false (LAN apps
    open ports through it), and nothing at all about the front or an allow list that lets
    nothing through."""
    from igdtrigger.cli.main import main

    lines = ", ".join(f'"{line}"' for line in allow)
    path = tmp_path / "front.toml"
    path.write_text(f'[front]\nenabled = true\ninterfaces = ["br-lan"]\nallow = [{lines}]\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nothing can be opened" not in out
    assert "front: UPnP IGD, NAT-PMP, PCP on br-lan" in out, out
    assert ("every client request is refused" in out) is refused, out
    assert main(["check-config", "--json", str(path)]) == 0
    assert '"front"' in capsys.readouterr().out
