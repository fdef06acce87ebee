"""The API edge talks to the ``Service`` façade only (issue 16): no handler, middleware or the
metrics writer reaches past it into the pipeline's parts (engine, mapper, pinhole keeper,
journal, the gateway object or the detector supervisor). Checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

from igdtrigger.runtime.service import Service

API = Path(__file__).resolve().parent.parent / "igdtrigger" / "api"
# Attributes of the service that are its insides, not its face.
INSIDES = ("pipeline", "engine", "mapper", "pinholes", "journal", "gateway", "supervisor")


def _reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """``x.<inside>`` where ``x`` is a name bound to the service (``svc``, ``service``) or an
    ``app[SERVICE]`` lookup."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr not in INSIDES:
            continue
        base = node.value
        named = isinstance(base, ast.Name) and base.id in ("svc", "service")
        looked_up = (isinstance(base, ast.Subscript) and isinstance(base.slice, ast.Name)
                     and base.slice.id == "SERVICE")
        if named or looked_up:
            found.append((node.lineno, node.attr))
    return found


def test_the_api_reaches_no_part_of_the_pipeline() -> None:
    bad = [f"{path.name}:{line}: .{attr}"
           for path in sorted(API.rglob("*.py"))
           for line, attr in _reaches(ast.parse(path.read_text(encoding="utf-8")))]
    assert not bad, f"the API reaches past the Service façade: {bad}"


def test_the_check_sees_a_reach_past_the_facade() -> None:
    # a check over nothing cannot fail: the patterns it looks for are found when present
    code = ("def f(request, svc):\n"
            "    svc.pipeline.engine.activations\n"
            "    request.app[SERVICE].mapper.applied\n"
            "    svc.tallies()\n")
    assert sorted(_reaches(ast.parse(code))) == [(2, "pipeline"), (3, "mapper")]


def test_the_facade_no_longer_exposes_the_parts() -> None:
    # tests and runtime reach them as svc.pipeline.*; the façade keeps what the API needs
    for name in ("engine", "mapper", "pinholes", "journal"):
        assert not hasattr(Service, name), name
    assert callable(Service.tallies) and isinstance(Service.gateway_info, property)
