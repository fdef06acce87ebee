"""The package face: ``from igdtrigger import Client, load_config, <errors>`` works, and
``import igdtrigger`` alone stays light (the launcher hook's start-up time depends on it)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import igdtrigger
from igdtrigger.cli.client import Client
from igdtrigger.config import load_config
from igdtrigger.core import errors
from igdtrigger.core.version import __version__


def test_the_face_names_the_client_the_loader_and_the_errors() -> None:
    assert igdtrigger.Client is Client and igdtrigger.load_config is load_config
    assert igdtrigger.IgdTriggerError is errors.IgdTriggerError
    for name in igdtrigger.__all__:
        assert getattr(igdtrigger, name) is not None
    with pytest.raises(AttributeError):
        _ = igdtrigger.Engine


def test_import_igdtrigger_loads_nothing_until_a_name_is_used() -> None:
    code = ("import sys, igdtrigger\n"
            "heavy = [m for m in sys.modules if m.startswith(('igdtrigger.', 'aiohttp', "
            "'zeroconf', 'tomllib'))]\n"
            "print(heavy)\n"
            "igdtrigger.UsageError\n"
            "print('igdtrigger.core.errors' in sys.modules, 'igdtrigger.config' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["[]", "True False"]


def test_the_version_is_the_one_pyproject_publishes() -> None:
    # `igdtrigger --version`, /api/v1/status and the metrics read igdtrigger.core.version; the
    # wheel's metadata reads pyproject.toml: the two strings are written apart and must agree.
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    assert tomllib.loads(pyproject.read_text())["project"]["version"] == __version__
    assert igdtrigger.__version__ == __version__
