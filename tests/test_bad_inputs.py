"""Every duration/interval/count a user can give, through every way they can give it (config
file, IGDTRIGGER_* environment, command-line flag), with 0, negative, inf, nan, 1e309, huge
and wrong-type values: refused with a message naming it, never a traceback, never accepted as
something that makes no sense (issue 12, owner variants)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from igdtrigger.cli.main import build_parser
from igdtrigger.config import Config, _parse_with_env, parse_config
from igdtrigger.core.errors import ConfigError, UsageError

KEYS = [("gateway", "lease"), ("gateway", "discover_timeout"), ("gateway", "verify_interval"),
        ("gateway", "check_interval"), ("api", "rate_limit"), ("api", "rate_burst"),
        ("api", "adhoc_max_ports"), ("api", "adhoc_max_ttl"), ("api", "adhoc_per_host"),
        ("detect", "socket_interval"), ("detect", "process_interval"),
        ("rules", "idle_timeout")]
FILE_VALUES: list[Any] = [0, -1, -0.0, math.inf, -math.inf, math.nan, 1e30, 2**63, "0s", "-5s",
                          "inf", "nan", "1e309", "100000d", "1ms", "abc", True, [1], {"a": 1},
                          "", "9999999999999999999999d"]
ENV_VALUES = ["0", "-1", "inf", "nan", "1e309", "+inf", "-inf", "1e30", '"inf"', '"nan"',
              '"100000d"', "true", "[1]", '""', "9223372036854775808", '"1ms"', "0x10"]


def _base(key: str) -> dict[str, Any]:
    data: dict[str, Any] = {"rules": [{"name": "a", "open": ["udp/5000"]}]}
    if key.startswith("adhoc"):
        data["api"] = {"allow_adhoc": True, "adhoc_ports": ["udp/6000"]}
    return data


def _value(cfg: Config, section: str, key: str) -> object:
    if section == "rules":
        return cfg.rules[0].idle_timeout
    if section == "api":
        a = cfg.api
        return {"rate_limit": a.rate_limit, "rate_burst": a.rate_burst,
                "adhoc_max_ports": a.adhoc.max_ports, "adhoc_max_ttl": a.adhoc.max_ttl,
                "adhoc_per_host": a.adhoc.per_host}[key]
    return getattr(cfg.gateway if section == "gateway" else cfg.detect, key)


def _try(fn: Callable[[], Any]) -> tuple[Any, str]:
    """(the result, "") or (None, the refusal's message)."""
    try:
        return fn(), ""
    except (ConfigError, UsageError) as exc:
        return None, str(exc)


def _sane(x: object) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            and 0 < x <= 7 * 86400 * 10)


@pytest.mark.parametrize(("section", "key"), KEYS)
def test_every_number_in_the_file_is_refused_by_name_or_sane(section: str, key: str) -> None:
    for v in FILE_VALUES:
        data = _base(key)
        if section == "rules":
            data["rules"][0][key] = v
        else:
            data.setdefault(section, {})[key] = v
        cfg, error = _try(lambda: parse_config(data))  # noqa: B023 - called at once
        if error:
            assert key in error, (v, error)
        else:
            assert _sane(_value(cfg, section, key)), (key, v)


@pytest.mark.parametrize(("section", "key"), [k for k in KEYS if k[0] != "rules"])
def test_every_number_in_the_environment_is_refused_by_name_or_sane(section: str,
                                                                    key: str) -> None:
    for v in ENV_VALUES:
        cfg, error = _try(
            lambda: _parse_with_env(_base(key), {(section, key): v},  # noqa: B023 - at once
                                    source="test"))
        if error:
            assert f"IGDTRIGGER_{section.upper()}__{key.upper()}" in error, (v, error)
        else:
            assert _sane(_value(cfg, section, key)), (key, v)


FLAGS = [(["status", "--timeout"], "timeout"), (["healthcheck", "--timeout"], "timeout"),
         (["run", "--rule", "x", "--ttl"], "ttl"),
         (["run", "--rule", "x", "--wait-start"], "wait_start"),
         (["activate", "x", "--for"], "ttl"), (["gateway", "--timeout"], "timeout"),
         (["doctor", "--timeout"], "timeout")]


@pytest.mark.parametrize(("argv", "dest"), FLAGS)
@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "1e309", "-inf", "1e30", "100000d",
                                   "abc", "-0"])
def test_every_duration_flag_is_refused_with_its_name_or_sane(argv: list[str], dest: str,
                                                              value: str) -> None:
    tail = ["--", "true"] if argv[0] == "run" else []
    ns, error = _try(lambda: build_parser().parse_args([*argv, value, *tail]))
    if error:
        assert argv[-1] in error
        return
    x = getattr(ns, dest)
    assert math.isfinite(x) and 0 <= x <= 7 * 86400, (argv, value, x)
    assert x > 0 or dest == "wait_start"


def test_a_nan_timeout_is_a_clear_error_not_a_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "igdtrigger", "status", "--server",
                          "http://127.0.0.1:9", "--timeout", "nan"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "--timeout" in out.stderr
