"""The code stays typed (mypy --strict) and lint-clean (ruff): checked with the tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_mypy_strict() -> None:
    cmd = [sys.executable, "-m", "mypy", "--strict", "-p", "igdtrigger", "-p", "bench"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff not installed")
def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "igdtrigger", "tests", "bench"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
