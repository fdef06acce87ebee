"""The code stays typed (mypy --strict) and lint-clean (ruff): checked with the tests.

The tests themselves are type-checked like the package (issue 16). The commands are the ones
.pre-commit-config.yaml runs (checked below), so a commit hook and CI agree.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MYPY = ["mypy", "--strict", "-p", "igdtrigger", "-p", "bench", "-p", "tests"]
RUFF = ["ruff", "check", "igdtrigger", "tests", "bench"]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_mypy_strict() -> None:
    r = subprocess.run([sys.executable, "-m", *MYPY], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff not installed")
def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", *RUFF], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pre_commit_runs_the_same_checks_as_ci() -> None:
    # A commit hook that checks less than CI (or other paths) lets through what CI then fails.
    text = (ROOT / ".pre-commit-config.yaml").read_text()
    for cmd in (MYPY, RUFF):
        assert f"entry: .venv/bin/python -m {' '.join(cmd)}\n" in text, " ".join(cmd)
    assert "stages: [manual]" in text and "-m pytest" in text


def test_changelog_has_this_version_and_an_unreleased_section() -> None:
    # Keep a Changelog: a release's entry is written before it ships, not reconstructed after.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    entry = rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$"
    assert re.search(entry, text, re.M), f"CHANGELOG.md has no dated entry for {version}"
