"""Which service the CLI talks to, and what `serve` advertises (no multicast here: the lab test
tests/lab/test_lab_zeroconf.py does the real thing between two namespaces)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from igdtrigger.cli import client
from igdtrigger.cli import main as cli
from igdtrigger.cli.discovery import Found, advertised_addresses, txt_properties
from igdtrigger.config import parse_config
from igdtrigger.core.errors import ConfigError

LAN_SERVICE = Found("igdtrigger on nas._igdtrigger._tcp.local.", "192.168.1.5", 8731,
                    {"path": "/api/v1"})


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Controls what the resolver sees: a local service or not, and what mDNS finds."""
    state: dict[str, Any] = {"local": False, "found": [], "browsed": 0}

    def browse(timeout: float = 1.5, *, first: bool = True) -> list[Found]:
        state["browsed"] += 1
        state["timeout"] = timeout
        return list(state["found"])

    monkeypatch.setattr("igdtrigger.cli.discovery.browse", browse)
    monkeypatch.setattr(client, "_answers", lambda host, port, timeout: state["local"])
    monkeypatch.delenv("IGDTRIGGER_SERVER", raising=False)
    return state


def test_explicit_server_wins(net: dict[str, Any]) -> None:
    r = client.resolve_server("http://10.0.0.2:9000", None)
    assert (r.url, r.how) == ("http://10.0.0.2:9000", "argument")
    assert net["browsed"] == 0


def test_environment_then_config(net: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"api": {"listen": "127.0.0.1:9999"}}, source="x.toml")
    monkeypatch.setenv("IGDTRIGGER_SERVER", "http://10.0.0.3:8731")
    assert client.resolve_server(None, cfg).how == "environment"
    monkeypatch.delenv("IGDTRIGGER_SERVER")
    r = client.resolve_server(None, cfg)
    assert (r.url, r.how) == ("http://127.0.0.1:9999", "config")
    assert net["browsed"] == 0


def test_local_service_before_zeroconf(net: dict[str, Any]) -> None:
    net["local"] = True
    net["found"] = [LAN_SERVICE]
    r = client.resolve_server(None, parse_config({}, source="x.toml"))  # default listen
    assert (r.url, r.how) == ("http://127.0.0.1:8731", "local")
    assert net["browsed"] == 0


def test_zeroconf_then_localhost(net: dict[str, Any]) -> None:
    net["found"] = [LAN_SERVICE]
    r = client.resolve_server(None, None, discover_timeout=0.7)
    assert (r.url, r.how) == ("http://192.168.1.5:8731", "zeroconf")
    assert net["timeout"] == 0.7
    net["found"] = []
    r = client.resolve_server(None, None)
    assert (r.url, r.how) == ("http://127.0.0.1:8731", "default")


def test_server_auto_skips_config_and_local(net: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    net["local"] = True
    net["found"] = [LAN_SERVICE]
    cfg = parse_config({"api": {"listen": "127.0.0.1:9999"}}, source="x.toml")
    assert client.resolve_server("auto", cfg).how == "zeroconf"
    monkeypatch.setenv("IGDTRIGGER_SERVER", "auto")
    assert client.resolve_server(None, cfg).how == "zeroconf"


def test_discovery_failure_falls_back(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def broken(timeout: float = 1.5, *, first: bool = True) -> list[Found]:
        raise OSError("no multicast route")

    monkeypatch.setattr("igdtrigger.cli.discovery.browse", broken)
    monkeypatch.setattr(client, "_answers", lambda host, port, timeout: False)
    monkeypatch.delenv("IGDTRIGGER_SERVER", raising=False)
    assert client.resolve_server(None, None).how == "default"
    assert "zeroconf discovery failed (no multicast route)" in capsys.readouterr().err


def test_token_file_is_not_sent_to_a_discovered_service(
        net: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "api-token").write_text("secret-admin-token\n")
    monkeypatch.setenv("IGDTRIGGER_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("IGDTRIGGER_TOKEN", raising=False)
    args = argparse.Namespace(server=None, token=None, timeout=None)
    net["local"] = True
    assert cli._client(args).token == "secret-admin-token"  # this host's own service
    net["local"] = False
    net["found"] = [LAN_SERVICE]
    c = cli._client(args)
    assert c.url == "http://192.168.1.5:8731" and c.token is None  # anyone can advertise
    args.token = "given"
    assert cli._client(args).token == "given"  # an explicit token is the user's decision
    assert client.Resolved("http://127.0.0.1:8731", "zeroconf").trusted


def test_advertised_addresses_and_txt() -> None:
    assert advertised_addresses("127.0.0.1") == []
    assert advertised_addresses("192.168.1.5") == ["192.168.1.5"]
    assert advertised_addresses("::1") == []
    everything = advertised_addresses("0.0.0.0")
    assert all(not a.startswith("127.") for a in everything)
    assert txt_properties(version="1.2", token_needed=True, instance="abc") == {
        "version": "1.2", "path": "/api/v1", "token": "yes", "instance": "abc", "ui": "/"}
    assert txt_properties(version="1", token_needed=False, instance="x")["token"] == "no"


@pytest.mark.parametrize(("raw", "mode"), [(None, "auto"), (True, "on"), (False, "off"),
                                           ("auto", "auto")])
def test_zeroconf_config(raw: object, mode: str) -> None:
    api = {"listen": "0.0.0.0:8731"} | ({} if raw is None else {"zeroconf": raw})
    cfg = parse_config({"api": api})
    assert cfg.api.zeroconf == mode
    assert not cfg.api.loopback_only
    assert parse_config({}).api.loopback_only


def test_zeroconf_config_error_names_field() -> None:
    with pytest.raises(ConfigError, match=r"x.toml: api.zeroconf: .*'sometimes'"):
        parse_config({"api": {"zeroconf": "sometimes"}}, source="x.toml")
