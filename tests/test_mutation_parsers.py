"""The config file parser and the conntrack message parser: what a user would notice, each case
found by a mutant that survived every other test (issue 19: `python -m bench.mutation config
conntrack`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from igdtrigger.config import default_config_paths, load_config, parse_config
from igdtrigger.core.errors import ConfigError

RULE = {"name": "game", "open": ["udp/27015"]}


# --- config: where it is looked for ------------------------------------------------------------


def test_without_xdg_the_user_config_is_under_home_dot_config_then_etc(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("IGDTRIGGER_CONFIG", "XDG_CONFIG_HOME", "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_config_paths() == [tmp_path / ".config" / "igdtrigger" / "config.toml",
                                      Path("/etc/igdtrigger/config.toml")]


# --- config: what is not a config file says what it is ------------------------------------------


def test_a_device_given_as_the_config_is_named_a_device() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("/dev/null")
    assert "not a regular file (a device)" in str(e.value)
    assert e.value.source == "/dev/null"


def test_a_socket_given_as_the_config_is_named_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        with pytest.raises(ConfigError) as e:
            load_config(path)
    assert "not a regular file (a socket)" in str(e.value)


def test_a_directory_given_as_the_config_reads_as_such_and_nothing_more(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == f"{tmp_path}: cannot read: {os.strerror(21)}"  # EISDIR


# --- config: values at their limits -------------------------------------------------------------


def test_api_max_per_host_is_at_most_1000() -> None:
    assert parse_config({"api": {"max_per_host": 1000}}).api.max_per_host == 1000
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"max_per_host": 1001}})
    assert e.value.field == "api.max_per_host"


def test_a_launcher_id_is_everything_after_the_launchers_name() -> None:
    cfg = parse_config({"rules": [RULE], "launchers": {"heroic:legendary:Fortnite": "game"}})
    assert cfg.launchers == (("heroic:legendary:Fortnite", "game"),)


def test_an_error_in_config_data_without_a_file_names_its_source_as_config() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"max_per_host": 0}})
    assert e.value.source == "<config>"
    assert str(e.value).startswith("<config>: api.max_per_host: ")
