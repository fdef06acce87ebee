"""Mutation score of the pure core and the protocol codecs (not a test; slow, not in CI).

    .venv/bin/python -m bench.mutation [MODULE ...] [--max-children N] [--tables] [--no-run]
                                       [--sample N [--seed S]]

MODULE is one of engine, model, config, igd, pmp, conntrack (default: all, one at a time),
each the files that module was split into (``PARTS``: the engine with its activation, desired
set, matching, origins and timers; model with the rules and the port policy; the config
parser with its fields and settings; the UPnP codec with SSDP; the NAT-PMP/PCP codec; the
ctnetlink parser, query codec and socket filter). Runs ``mutmut run`` (configured in
pyproject.toml's ``[tool.mutmut]``: which files, which fast tests) on that module's mutants
only, then prints, per module, the mutants killed out of those that count, and writes the
survivors' names to ``mutants/survivors-MODULE.txt``.

Equivalent mutants, listed by name with the reason in ``bench/mutation.toml``'s
``[equivalent]`` (and ``[message_only]``), are left out of the score (and counted in the line
printed). ``--mutmut ARGS...`` runs mutmut itself with that configuration (``--mutmut show
NAME`` prints one mutant as a diff).

``--tables`` mutates the module-level tables that mutmut leaves alone (the UPnP fault names,
the service ranking, the NAT-PMP/PCP result texts and hints, the conntrack protocol numbers):
each entry is removed, then changed, in turn, and the edge tests (run in this process) must
fail.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import os
import random
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "mutation.toml"

# mutmut 3.8 reads pyproject.toml's [tool.mutmut] (the files, the tests); run as a module of
# this interpreter so that the venv's mutmut is the one used.
MUTMUT = [sys.executable, "-c",
          "import sys; from mutmut.__main__ import cli; sys.argv[0] = 'mutmut'; sys.exit(cli())"]


@dataclass(frozen=True)
class Part:
    """One covered unit (a module as it was before the rehousing, now split into files)."""

    paths: tuple[str, ...]  # the files, relative to the repository

    @property
    def modules(self) -> list[str]:
        return [p.removesuffix(".py").replace("/", ".") for p in self.paths]

    def globs(self) -> list[str]:
        """mutmut's names for this part's mutants (``mod.x_func__mutmut_N``,
        ``mod.xǁClassǁmethod__mutmut_N``)."""
        return [f"{module}.*" for module in self.modules]


PARTS = {
    "engine": Part(("igdtrigger/core/engine.py", "igdtrigger/core/activation.py",
                    "igdtrigger/core/desired.py", "igdtrigger/core/matching.py",
                    "igdtrigger/core/origins.py", "igdtrigger/core/timers.py")),
    "model": Part(("igdtrigger/core/model.py", "igdtrigger/core/ports.py",
                   "igdtrigger/core/rules.py", "igdtrigger/core/policy.py")),
    "config": Part(("igdtrigger/config.py", "igdtrigger/configfields.py",
                    "igdtrigger/core/settings.py")),
    "igd": Part(("igdtrigger/gateway/upnp/codec.py", "igdtrigger/gateway/upnp/ssdp.py")),
    "pmp": Part(("igdtrigger/gateway/natpmp/codec.py",)),
    "conntrack": Part(("igdtrigger/detect/ctnetlink.py", "igdtrigger/detect/ctfilter.py",
                       "igdtrigger/detect/ctquery.py")),
}


def equivalent() -> dict[str, str]:
    """Mutants that cannot change behaviour, or change only an error message's words, by name,
    with the reason (``bench/mutation.toml``'s ``[equivalent]`` and ``[message_only]``; only
    there: names move with the code, and that list was re-derived after the rehousing). Left
    out of the score."""
    with open(CONFIG, "rb") as f:
        conf = tomllib.load(f)
    return {**conf.get("equivalent", {}), **conf.get("message_only", {})}


def run_mutmut(part: Part, max_children: int, names: list[str] | None = None) -> None:
    globs = names or part.globs()
    cmd = [*MUTMUT, "run", "--max-children", str(max_children), *globs]
    subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    if any(status == "not checked" and any(fnmatch.fnmatchcase(name, g) for g in globs)
           for name, status in results().items()):
        # mutmut 3.8 stops after generating the mutants on a first run in a fresh tree
        subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)


def results() -> dict[str, str]:
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            found[name] = status
    return found


def sample(part: Part, size: int, seed: int) -> list[str]:
    """A reproducible random sample of the part's mutants (an estimate in minutes, not hours)."""
    found = results()
    globs = part.globs()  # parses the file: once, not per mutant
    if not any(fnmatch.fnmatchcase(k, g) for k in found for g in globs):
        subprocess.run([*MUTMUT, "run", "--max-children", "1", "nothing.at.all"], cwd=ROOT,
                       check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # generates the mutants (then complains)
        found = results()
    names = sorted(k for k in found if any(fnmatch.fnmatchcase(k, g) for g in globs))
    return sorted(random.Random(seed).sample(names, min(size, len(names))))


def score(name: str, part: Part, found: dict[str, str],
          only: list[str] | None = None) -> tuple[int, int]:
    globs = only or part.globs()
    skip = equivalent()
    part_names = {k: v for k, v in found.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}
    mine = {k: v for k, v in part_names.items() if k not in skip}
    counts = Counter(mine.values())
    killed = counts["killed"] + counts["timeout"]
    total = sum(n for status, n in counts.items() if status not in ("skipped", "not checked"))
    survivors = sorted(k for k, v in mine.items() if v not in ("killed", "timeout", "skipped"))
    (ROOT / "mutants").mkdir(exist_ok=True)
    (ROOT / "mutants" / f"survivors-{name}.txt").write_text("".join(f"{s}\n" for s in survivors))
    pct = 100 * killed / total if total else 0.0
    counts["equivalent or message-only (excluded)"] = len(part_names) - len(mine)
    detail = ", ".join(f"{n} {s}" if n else s for s, n in sorted(counts.items())
                       if s != "killed" and (n or s.startswith("a random")))
    print(f"{name:10} {killed:5d} / {total:5d} killed  {pct:5.1f}%   ({detail})", flush=True)
    return killed, total


# --- module-level tables ------------------------------------------------------------------------

# (module, table, tests that must notice)
TABLES: list[tuple[str, str, list[str]]] = [
    ("igdtrigger.gateway.upnp.codec", "ERROR_DESCRIPTIONS", ["tests/test_igd_codec_faults.py",
                                                          "tests/test_mutation_codecs.py"]),
    ("igdtrigger.gateway.upnp.codec", "_SERVICE_RANK", ["tests/test_igd_codec_faults.py"]),
    ("igdtrigger.gateway.upnp.ssdp", "_IGD_PARTS", ["tests/test_igd_codec_faults.py",
                                                  "tests/test_ssdp_notify.py"]),
    ("igdtrigger.gateway.natpmp.codec", "PMP_RESULTS", ["tests/test_pmp_codec_edges.py"]),
    ("igdtrigger.gateway.natpmp.codec", "PCP_RESULTS", ["tests/test_pmp_codec_edges.py"]),
    ("igdtrigger.gateway.natpmp.codec", "_PCP_HINTS", ["tests/test_pmp_codec_edges.py"]),
    ("igdtrigger.detect.ctnetlink", "_IPPROTO", ["tests/test_conntrack_parse_edges.py"]),
]

def _mutate(module: Any, name: str, index: int, op: str) -> Any:
    """Apply one table mutant; return what undoes it. Dicts change in place; a tuple is
    replaced on the module (read as a global at call time)."""
    table = getattr(module, name)
    if isinstance(table, tuple):
        items = list(table)
        if op == "drop":
            del items[index]
        else:
            items[index] = "X"
        setattr(module, name, tuple(items))
        return lambda: setattr(module, name, table)
    key = list(table)[index]
    old = dict(table)
    if op == "drop":
        del table[key]
    else:
        value = table[key]
        table[key] = "X" if isinstance(value, str) else value + 1

    def undo() -> None:
        table.clear()
        table.update(old)
    return undo


def table_mutants() -> tuple[int, int]:
    """Each entry of each table removed, then changed; the tests run in this process."""
    import pytest
    killed = total = 0
    survivors: list[str] = []
    sys.path.insert(0, str(ROOT))
    for module, table_name, tests in TABLES:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            clean = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
        if clean != pytest.ExitCode.OK:
            raise SystemExit(f"{tests} fail without any mutant: fix them first")
        mod = importlib.import_module(module)
        entries = list(getattr(mod, table_name))
        for i, key in enumerate(entries):
            for op in ("drop", "change"):
                undo = _mutate(mod, table_name, i, op)
                try:
                    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
                finally:
                    undo()
                total += 1
                if code == pytest.ExitCode.TESTS_FAILED:
                    killed += 1
                else:
                    survivors.append(f"{module}.{table_name}[{key!r}] {op}")
    (ROOT / "mutants").mkdir(exist_ok=True)
    (ROOT / "mutants" / "survivors-tables.txt").write_text("".join(f"{s}\n" for s in survivors))
    pct = 100 * killed / total if total else 0.0
    print(f"{'tables':10} {killed:5d} / {total:5d} killed  {pct:5.1f}%", flush=True)
    for line in survivors:
        print(f"  survived: {line}")
    return killed, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modules", nargs="*", choices=[*PARTS, []], metavar="MODULE")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--tables", action="store_true", help="mutate module-level tables too")
    ap.add_argument("--no-run", action="store_true", help="only print the last run's scores")
    ap.add_argument("--sample", type=int, metavar="N",
                    help="run and score a random sample of N mutants per module (an estimate)")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--mutmut", nargs=argparse.REMAINDER, metavar="ARGS",
                    help="run mutmut itself with this configuration (e.g. show NAME)")
    args = ap.parse_args(argv)
    if args.mutmut is not None:
        return subprocess.run([*MUTMUT, *args.mutmut], cwd=ROOT, check=False).returncode
    names = args.modules or list(PARTS)
    picked = {n: sample(PARTS[n], args.sample, args.seed) if args.sample else None
              for n in names}
    if not args.no_run:
        for name in names:
            run_mutmut(PARTS[name], args.max_children, picked[name])
    found = results()
    for name in names:
        score(name, PARTS[name], found, picked[name])
    if args.tables:
        table_mutants()
    return 0


if __name__ == "__main__":
    sys.exit(main())
