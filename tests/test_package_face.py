"""The package face: ``from igdtrigger import Client, load_config, <errors>`` works, and
``import igdtrigger`` alone stays light (the launcher hook's start-up time depends on it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import igdtrigger
from igdtrigger.cli.client import Client
from igdtrigger.config import load_config
from igdtrigger.core import errors


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
