"""The mutation-testing setup agrees with itself: a bare `mutmut run` and `python -m
bench.mutation` mutate the same files, and every module a score is printed for is mutated."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench.mutation import CONFIG, PARTS, equivalent

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_mutates_exactly_the_scored_files_and_each_exists() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        mutmut = tomllib.load(f)["tool"]["mutmut"]
    scored = {p for part in PARTS.values() for p in part.paths}
    assert set(mutmut["only_mutate"]) == scored
    assert all((ROOT / p).is_file() for p in scored)
    assert not {"equivalent", "message_only"} & set(mutmut)  # one list, in bench/mutation.toml
    tests = [t for t in mutmut["pytest_add_cli_args_test_selection"] if not t.startswith("-")]
    assert all((ROOT / t).is_file() for t in tests)


def test_every_excluded_mutant_names_a_scored_file_and_gives_a_reason() -> None:
    modules = {m for part in PARTS.values() for m in part.modules}
    excluded = equivalent()
    assert CONFIG.is_file() and excluded
    for name, reason in excluded.items():
        assert name.rpartition(".x")[0] in modules, name
        assert reason.strip(), name
