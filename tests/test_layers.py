"""The tree is the architecture (issue 16): the import rules between layers, checked on the source.

Every module under ``igdtrigger/`` is parsed with :mod:`ast` (nothing is imported), and every
``import``/``from ... import`` in it counts: top level, inside functions, under
``if TYPE_CHECKING``. Layers, lowest first::

    core            pure: rules, engine, policy, errors (imports nothing else of the package)
    config (+ configfields), netutil   the config loader and shared low-level helpers
    gateway, detect, sim   backends behind gateway/base and detect/base; the simulated router
    runtime         the I/O pipeline (core, config, netutil and the two ``base`` interfaces only;
                    runtime/compose.py is the one place that names concrete backends and sim)
    api             the HTTP edge
    cli             the command-line edge
    igdtrigger/__init__, __main__   the package face

Also: no module over 600 lines, ``__all__`` in every public module (naming only what the
module binds), no run of six identical lines repeated inside ``igdtrigger/``, ``time.time()``
only through an injected clock in ``core/`` and ``runtime/``, and a comment on every import
made inside a function (why it is not at the top).
Each test lists every violation it finds, with file and line, in its failure message.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PKG = "igdtrigger"
SRC = Path(__file__).resolve().parent.parent / PKG

MAX_LINES = 600
DUP_RUN = 6

# The one module allowed to name concrete backends and the simulator.
COMPOSE = "runtime.compose"
# The top-level modules below the backends: the config loader (and what it splits into) and
# the shared low-level network helpers. A new top-level module must be placed here (or in a
# layer's folder): test_the_parser_sees_the_tree names it until it is.
SHARED = ("config", "configfields", "netutil", "nftcmd", "nftnl", "paths")
# What runtime/ may import besides itself.
RUNTIME_ALLOWED = ("core", *SHARED, "gateway.base", "detect.base")
# Layer ranks: an import may go to the same rank or lower, never higher.
RANK = {
    "core": 0,
    **dict.fromkeys(SHARED, 1),
    "gateway": 2,
    "detect": 2,
    "sim": 2,
    "runtime": 3,
    "api": 4,
    "front": 4,  # the IGD front (issue 14): an edge like api/ (its HTTP guard is api's)
    "cli": 5,
    "": 6,  # the package itself: igdtrigger/__init__.py and __main__.py
    "__main__": 6,
}


@dataclass(frozen=True)
class Import:
    importer: str  # module name below the package, e.g. "runtime.mapper" ("" is the package)
    target: str  # the same for what it imports
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.line}"


def _modname(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_modname(p): p for p in sorted(SRC.rglob("*.py"))}


MODULES = _sources()


def _is_package(mod: str) -> bool:
    path = MODULES.get(mod)
    return path is not None and path.name == "__init__.py"


def _resolve_from(mod: str, node: ast.ImportFrom) -> str | None:
    """The absolute dotted name (with the package prefix) a ``from`` import reads from."""
    if node.level == 0:
        return node.module
    base = [PKG, *mod.split(".")] if mod else [PKG]
    if not _is_package(mod):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, node.module] if node.module else base)


def _local(name: str | None) -> str | None:
    """``igdtrigger.x.y`` -> ``x.y``; ``igdtrigger`` -> ``""``; anything else -> None."""
    if name is None:
        return None
    if name == PKG:
        return ""
    if name.startswith(PKG + "."):
        return name[len(PKG) + 1 :]
    return None


def _imports() -> list[Import]:
    found: list[Import] = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _local(alias.name)
                    if target is not None:
                        found.append(Import(mod, target, path, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _local(_resolve_from(mod, node))
                if target is None:
                    continue
                subs = [f"{target}.{a.name}" if target else a.name for a in node.names]
                modules = [s for s in subs if s in MODULES]
                if modules:  # `from igdtrigger.gateway import upnp` names the module itself
                    found.extend(Import(mod, s, path, node.lineno) for s in modules)
                if len(modules) < len(subs):
                    found.append(Import(mod, target, path, node.lineno))
    return found


IMPORTS = _imports()


def _area(mod: str) -> str:
    return mod.split(".", 1)[0]


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def _is_concrete(target: str) -> bool:
    """A concrete backend or the simulator (what only runtime/compose.py may name)."""
    if _within(target, "sim"):
        return True
    if any(_within(target, p) for p in ("gateway.select", "gateway.upnp", "gateway.natpmp")):
        return True
    return _within(target, "detect") and target not in ("detect", "detect.base")


def _report(bad: list[Import], rule: str) -> str:
    lines = [f"{rule}: {len(bad)} import(s)"]
    lines += [f"  {b.where()}: {b.importer or PKG} imports {b.target or PKG}" for b in bad]
    return "\n".join(lines)


def test_the_parser_sees_the_tree() -> None:
    # A rule checked over nothing cannot fail: the walk must find the layers and their imports.
    assert {"core", "runtime", "gateway", "detect", "api", "cli", "sim"} <= {
        _area(m) for m in MODULES
    }
    assert len(IMPORTS) > 100
    unplaced = sorted({_area(m) for m in MODULES} - RANK.keys())
    assert not unplaced, f"modules outside the known layers (place them in RANK): {unplaced}"


def test_relative_imports_resolve_to_the_module_they_name() -> None:
    # The tree uses absolute imports today; a relative one added later must not slip through.
    def resolve(mod: str, code: str) -> str | None:
        node = ast.parse(code).body[0]
        assert isinstance(node, ast.ImportFrom)
        return _local(_resolve_from(mod, node))

    assert resolve("runtime.mapper", "from . import journal") == "runtime"
    assert resolve("runtime.mapper", "from .journal import Journal") == "runtime.journal"
    assert resolve("runtime.mapper", "from ..gateway.upnp import codec") == "gateway.upnp"
    assert resolve("runtime", "from .mapper import Mapper") == "runtime.mapper"  # a package
    assert resolve("core.engine", "from ..config import Config") == "config"
    assert resolve("cli.main", "from igdtrigger.sim.router import X") == "sim.router"
    assert resolve("cli.main", "from aiohttp import web") is None


CODECS = ("gateway.upnp.codec", "gateway.upnp.ssdp", "gateway.natpmp.codec")


def _may_name_concrete(imp: Import) -> bool:
    if imp.importer == COMPOSE:
        return True
    area, target_area = _area(imp.importer), _area(imp.target)
    if area == target_area:  # a backend's own modules, e.g. gateway/upnp/soap -> upnp/codec
        return True
    # the simulated router reuses the upnp and natpmp codecs instead of parsing SOAP again
    if area == "sim" and target_area == "gateway":
        return True
    # the IGD front serves the protocols the backends speak: it shares their sans-I/O codecs
    # (no sockets, no backend), never a backend itself
    return area == "front" and imp.target in CODECS


# Each rule: (what it says, does this import break it). One test per rule runs it on the tree.
RULES: dict[str, tuple[str, Callable[[Import], bool]]] = {
    "core": (
        "core/ must import only core/",
        lambda i: _area(i.importer) == "core" and _area(i.target) != "core",
    ),
    "runtime": (
        f"runtime/ may import runtime/ and {', '.join(RUNTIME_ALLOWED)}",
        lambda i: _area(i.importer) == "runtime"
        and i.importer != COMPOSE
        and _area(i.target) != "runtime"
        and not any(_within(i.target, ok) for ok in RUNTIME_ALLOWED),
    ),
    "concrete": (
        "only runtime/compose.py names gateway.select, gateway.upnp/natpmp, detect.<x>, sim",
        lambda i: _is_concrete(i.target) and not _may_name_concrete(i),
    ),
    "edges": (  # implied by "concrete"; apart so that its failure names the edge that broke it
        "api/ and cli/ go through runtime/compose or runtime/service",
        lambda i: _area(i.importer) in ("api", "cli")
        and (_within(i.target, "sim") or (_is_concrete(i.target) and _area(i.target) == "gateway")),
    ),
    "upward": (
        "imports go down only: core < config,netutil < gateway,detect,sim < runtime < api < cli"
        " < the package face",
        lambda i: i.importer != i.target
        and RANK.get(_area(i.importer), -1) < RANK.get(_area(i.target), len(RANK)),
    ),
}


def _check(rule: str) -> None:
    says, breaks = RULES[rule]
    bad = [i for i in IMPORTS if breaks(i)]
    assert not bad, _report(bad, says)


def test_core_imports_nothing_else_of_the_package() -> None:
    _check("core")


def test_runtime_imports_only_core_config_netutil_and_the_base_interfaces() -> None:
    _check("runtime")


def test_only_compose_names_concrete_backends_and_the_simulator() -> None:
    _check("concrete")


def test_api_and_cli_never_import_a_concrete_gateway_or_the_simulator() -> None:
    _check("edges")


def test_nothing_imports_upward() -> None:
    _check("upward")


def _imp(importer: str, target: str) -> Import:
    return Import(importer, target, SRC / "x.py", 1)


# (importer, target) -> the rules it breaks; everything else must let it pass.
CASES: dict[tuple[str, str], set[str]] = {
    ("core.engine", "core.model"): set(),
    ("core.engine", "config"): {"core", "upward"},
    ("core.traits", "gateway.base"): {"core", "upward"},
    ("runtime.mapper", "gateway.base"): set(),
    ("runtime.mapper", "detect.base"): set(),
    ("runtime.mapper", "configfields"): set(),
    ("runtime.service", "gateway.upnp.codec"): {"runtime", "concrete"},
    ("runtime.service", "detect.conntrack"): {"runtime", "concrete"},
    ("runtime.service", ""): {"runtime", "upward"},  # `from igdtrigger import __version__`
    ("runtime.compose", "gateway.select"): set(),
    ("runtime.compose", "sim.router"): set(),
    ("runtime.compose", "api.app"): {"upward"},  # compose is past the runtime rule, not this one
    ("cli.serve", "runtime.compose"): set(),
    ("cli.serve", "api.app"): set(),
    ("cli.serve", "gateway.select"): {"concrete", "edges"},
    ("cli.run", "detect.process"): {"concrete"},
    ("api.app", "sim.router"): {"concrete", "edges"},
    ("api.app", "cli.client"): {"upward"},
    ("gateway.upnp.soap", "gateway.upnp.codec"): set(),
    ("gateway.upnp.soap", "runtime.mapper"): {"upward"},
    ("gateway.select", "sim.router"): {"concrete"},
    ("sim.router", "gateway.upnp.codec"): set(),
    ("sim.router", "runtime.journal"): {"upward"},
    ("detect.conntrack", "detect.nfttrack"): set(),
    ("detect.conntrack", "gateway.upnp.codec"): {"concrete"},
}


def test_each_rule_catches_what_it_forbids_and_only_that() -> None:
    # The tree may obey every rule one day: this keeps the rules able to fail.
    wrong = [
        f"{imp} breaks {got or 'nothing'}, expected {want or 'nothing'}"
        for imp, want in CASES.items()
        if (got := {name for name, (_, breaks) in RULES.items() if breaks(_imp(*imp))}) != want
    ]
    assert not wrong, wrong


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(SRC.parent)): n
        for p in MODULES.values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    names.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for h in node.handlers:
                    visit(h.body)

    visit(tree.body)
    return names


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        value: ast.expr | None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            if isinstance(value, (ast.List, ast.Tuple)):
                return [
                    e.value
                    for e in value.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
            return []
    return None


def _exports_something(tree: ast.Module) -> bool:
    """An ``__init__`` that binds public names (imports, defs, assignments) is a public face."""
    return any(not n.startswith("_") for n in _top_level_names(tree) if n != "annotations")


def test_every_public_module_declares_all_and_binds_what_it_lists() -> None:
    missing: list[str] = []
    unbound: list[str] = []
    for mod, path in MODULES.items():
        leaf = path.stem
        if any(part.startswith("_") for part in mod.split(".") if part) or leaf == "__main__":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if leaf == "__init__" and not _exports_something(tree):
            continue
        declared = _declared_all(tree)
        where = str(path.relative_to(SRC.parent))
        if declared is None:
            missing.append(where)
            continue
        bound = _top_level_names(tree)
        unbound += [f"{where}: {name}" for name in declared if name not in bound]
    assert not missing, f"public modules without __all__ ({len(missing)}): {missing}"
    assert not unbound, f"__all__ names a name the module does not bind: {unbound}"


def _import_lines(path: Path) -> set[int]:
    """Lines of the module-level import statements (those under ``if``/``try`` included)."""
    lines: set[int] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return lines


def test_no_run_of_six_identical_lines_is_repeated() -> None:
    # Lines compared stripped of indentation; blank lines are skipped (as `duplicates` reads
    # them), and so are module-level import statements: ruff's isort fixes their order, so two
    # modules that need the same stdlib modules would "repeat" a block without any logic in it.
    # Imports inside functions stay in: they are part of the code around them.
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    windows: dict[str, list[tuple[str, ...]]] = {}
    for path in MODULES.values():
        text = path.read_text(encoding="utf-8").splitlines()
        skip = _import_lines(path)
        lines = [(n, s) for n, raw in enumerate(text, 1) if (s := raw.strip()) and n not in skip]
        where = str(path.relative_to(SRC.parent))
        windows[where] = []
        for k in range(len(lines) - DUP_RUN + 1):
            window = tuple(s for _, s in lines[k : k + DUP_RUN])
            windows[where].append(window)
            seen[window].append(f"{where}:{lines[k][0]}")
    repeated = {w for w, places in seen.items() if len(places) > 1}
    # A longer run is reported once, at its first window.
    runs = [
        f"{' ~ '.join(seen[w])}: {w[0]!r}"
        for where, ws in windows.items()
        for k, w in enumerate(ws)
        if w in repeated and (k == 0 or ws[k - 1] not in repeated)
        and seen[w][0].startswith(where + ":")
    ]
    runs = list(dict.fromkeys(runs))
    assert not runs, (
        f"runs of {DUP_RUN}+ identical lines repeated ({len(runs)}):\n  " + "\n  ".join(runs)
    )


def test_core_and_runtime_read_the_wall_clock_only_through_an_injected_clock() -> None:
    # `time.time()` called in core/ or runtime/ is a clock nobody can inject; naming
    # `time.time` as a default clock (not calling it) is how the clock gets injected.
    bad: list[str] = []
    for mod, path in MODULES.items():
        if _area(mod) not in ("core", "runtime"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "time"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "time"
            ):
                bad.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "time":
                bad += [
                    f"{path.relative_to(SRC.parent)}:{node.lineno} (from time import time)"
                    for a in node.names
                    if a.name == "time"
                ]
    assert not bad, f"time.time() called outside an injected clock ({len(bad)}): {bad}"


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return list({id(n): n for n in found}.values())  # nested functions are walked twice


def test_every_in_function_import_says_why() -> None:
    # Issue 16: in-function imports only where start-up time needs them (the `run` hook path),
    # each with a comment: on its line, or above the run of imports it belongs to.
    bad: list[str] = []
    for path in MODULES.values():
        text = path.read_text(encoding="utf-8").splitlines()
        for node in _function_imports(ast.parse("\n".join(text))):
            line = node.lineno
            while line > 1 and text[line - 2].strip().startswith(("import ", "from ")):
                line -= 1  # up to the first import of a consecutive block
            above = text[line - 2].strip() if line > 1 else ""
            if "#" not in text[node.lineno - 1] and not above.startswith("#"):
                bad.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: "
                           f"{text[node.lineno - 1].strip()}")
    assert not bad, f"in-function imports without a comment saying why ({len(bad)}):\n  " + (
        "\n  ".join(sorted(bad)))
