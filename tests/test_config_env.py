"""IGDTRIGGER_<SECTION>__<KEY> environment overrides (the Docker image's configuration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from igdtrigger.config import env_overrides, load_config
from igdtrigger.core.errors import ConfigError


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("IGDTRIGGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CONFIGURATION_DIRECTORY", raising=False)
    return monkeypatch


def test_only_double_underscore_names_are_overrides() -> None:
    env = {"IGDTRIGGER_API__LISTEN": "x", "IGDTRIGGER_CONFIG": "/c", "IGDTRIGGER_TOKEN": "t",
           "OTHER__THING": "y", "IGDTRIGGER_GATEWAY__URL": "simulate"}
    assert env_overrides(env) == {("api", "listen"): "x", ("gateway", "url"): "simulate"}


def test_env_without_a_file(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("IGDTRIGGER_API__LISTEN", "0.0.0.0:9000")
    clean_env.setenv("IGDTRIGGER_API__PUBLIC_READ", "true")
    clean_env.setenv("IGDTRIGGER_API__RATE_LIMIT", "2.5")
    clean_env.setenv("IGDTRIGGER_API__ALLOWED_HOSTS", '["nas.home.arpa"]')
    clean_env.setenv("IGDTRIGGER_GATEWAY__URL", "simulate")
    clean_env.setenv("IGDTRIGGER_GATEWAY__LEASE", "2h")
    clean_env.setenv("IGDTRIGGER_DETECT__METHODS", "[]")
    clean_env.setenv("IGDTRIGGER_SERVICE__STATE_DIR", "/srv/igdt")
    cfg = load_config()
    assert (cfg.api.host, cfg.api.port) == ("0.0.0.0", 9000)
    assert cfg.api.public_read is True
    assert cfg.api.rate_limit == 2.5
    assert cfg.api.allowed_hosts == ("nas.home.arpa",)
    assert cfg.gateway.simulate and cfg.gateway.lease == 7200
    assert cfg.detect.methods == ()
    assert cfg.state_dir == Path("/srv/igdt")
    assert cfg.source.startswith("<environment:") and "IGDTRIGGER_API__LISTEN" in cfg.source


def test_env_beats_the_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('[api]\nlisten = "127.0.0.1:8000"\npublic_read = true\n\n'
                 '[[rules]]\nname = "demo"\nopen = ["udp/40000"]\n')
    clean_env.setenv("IGDTRIGGER_API__LISTEN", "0.0.0.0:8731")
    cfg = load_config(f)
    assert (cfg.api.host, cfg.api.port) == ("0.0.0.0", 8731)
    assert cfg.api.public_read is True  # the rest of the file still applies
    assert [r.name for r in cfg.rules] == ["demo"]
    assert cfg.source == f"{f} + IGDTRIGGER_API__LISTEN"
    clean_env.setenv("IGDTRIGGER_CONFIG", str(f))  # found through the usual search, too
    assert load_config().api.port == 8731


@pytest.mark.parametrize(("name", "value", "message"), [
    ("IGDTRIGGER_API__LISTEN", "nowhere", "environment: IGDTRIGGER_API__LISTEN: 'nowhere'"),
    ("IGDTRIGGER_API__PUBLIC_READ", "yes", "IGDTRIGGER_API__PUBLIC_READ: expected true or false"),
    ("IGDTRIGGER_API__LISTN", "1", "IGDTRIGGER_API__LISTN: unknown key 'listn'"),
    ("IGDTRIGGER_RULES__NAME", "x", "IGDTRIGGER_RULES__NAME: unknown section 'rules'"),
    ("IGDTRIGGER_DETECT__METHODS", '["telepathy"]', "IGDTRIGGER_DETECT__METHODS: unknown"),
])
def test_bad_env_values_name_the_variable(clean_env: pytest.MonkeyPatch, name: str, value: str,
                                          message: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert message in str(info.value)
    assert info.value.exit_code == 2
