"""Everything in examples/ is valid: rules parse and cite a source, hook command lines parse."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from igdtrigger import config as config_mod
from igdtrigger.cli.main import build_parser
from igdtrigger.config import load_config, parse_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RULE_FILES = sorted((EXAMPLES / "rules").glob("*.toml"))


def test_there_are_ready_rules() -> None:
    assert len(RULE_FILES) >= 5


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_is_valid_and_cites_its_source(path: Path) -> None:
    text = path.read_text()
    cfg = parse_config(tomllib.loads(text), source=str(path))
    assert len(cfg.rules) == 1
    assert re.search(r"^# source: .*\S", text, re.M), f"{path.name}: no '# source:' line"
    assert re.search(r"https?://\S+|shipped with", text), f"{path.name}: no URL or origin"
    assert all(r.port_count() <= 64 for r in cfg.rules)
    # what activates it: a recognisable outbound port or the program's process, or a line
    # saying why there is none (then a launcher hook or `activate` opens it)
    rule = cfg.rules[0]
    if rule.trigger or rule.process:
        assert re.search(r"^# trigger: \S", text, re.M), f"{path.name}: trigger not explained"
    else:
        assert re.search(r"^# no trigger: \S", text, re.M), f"{path.name}: no trigger, no why"


def test_publisher_port_lists() -> None:
    """Spot checks against the publishers' documentation (see each file's source)."""
    rules = {r.name: r for p in RULE_FILES
             for r in parse_config(tomllib.loads(p.read_text())).rules}
    assert [str(r) for r in rules["valheim"].open] == ["udp/2456-2458"]  # port, +1, +2
    assert [str(r) for r in rules["factorio"].open] == ["udp/34197"]
    assert [str(r) for r in rules["palworld"].open] == ["udp/8211"]
    assert [str(r) for r in rules["minecraft-bedrock"].open] == ["udp/19132-19133"]


def test_rule_names_are_unique_so_files_can_be_combined() -> None:
    combined = "\n".join(p.read_text() for p in RULE_FILES)
    cfg = parse_config(tomllib.loads(combined))
    assert len({r.name for r in cfg.rules}) == len(RULE_FILES)


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLES / "config.toml")
    assert cfg.rule("demo") is not None


# keys the example shows with another value than the default, on purpose (an alternative)
EXAMPLE_NOT_DEFAULT = {"gateway.url", "detect.methods", "service.state_dir"}
SECTIONS = {"gateway": config_mod._GATEWAY, "api": config_mod._API,
            "detect": config_mod._DETECT, "service": config_mod._SERVICE,
            "rules": config_mod._RULE}


def _example_keys() -> dict[str, str]:
    """``section.key`` -> the value examples/config.toml shows (set or commented out)."""
    section = ""
    seen: dict[str, str] = {}
    for line in (EXAMPLES / "config.toml").read_text().splitlines():
        text = line.strip()
        if m := re.fullmatch(r"#?\s*\[\[?([a-z]+)\]\]?", text):
            section = m.group(1)
        elif m := re.fullmatch(r"#?\s*([a-z0-9_]+)\s*=\s*(.*?)(\s+#.*)?", text):
            seen.setdefault(f"{section}.{m.group(1)}", m.group(2))
    return seen


def test_example_config_names_every_key_with_its_default() -> None:
    """examples/config.toml is "the full commented file": every key of every section is in
    it, and a value shown commented out is the default (a newcomer uncommenting it changes
    nothing); the README's configuration reference names every key too."""
    shown = _example_keys()
    readme = (EXAMPLES.parent / "README.md").read_text()
    rule = {"name": "x", "open": ["udp/1"]}
    base = parse_config({"rules": [rule]})
    for section, keys in SECTIONS.items():
        for key in keys:
            name = f"{section}.{key}"
            assert name in shown, f"examples/config.toml does not name {name}"
            ref = f"`{section}[].{key}`" if section == "rules" else f"`{section}.{key}`"
            assert ref in readme or f"{key} = " in readme, f"README names no {name}"
            if section == "rules" or name in EXAMPLE_NOT_DEFAULT:
                continue
            value = tomllib.loads(f"v = {shown[name]}")["v"]
            assert parse_config({section: {key: value}, "rules": [rule]}) == base, \
                f"examples/config.toml shows {name} = {shown[name]}, not the default"
    assert re.search(r'^# "steam:\d+" = "', (EXAMPLES / "config.toml").read_text(), re.M)
    assert "`launchers." in readme


def hook_command_lines() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for path in sorted((EXAMPLES / "hooks").iterdir()):
        text = path.read_text()
        if path.suffix == ".ps1":
            for call in re.finditer(r"-ArgumentList @\(([^)]*)\)", text):
                args = [a.strip().strip('"') for a in call.group(1).split(",")]
                args = [{"$Rule": "demo", "$Server": "http://127.0.0.1:8731"}.get(a, a)
                        for a in args]
                out.append((path.name, args))
            continue
        for line in text.splitlines():
            line = line.strip().strip("`.")
            m = re.match(r'^(?:"[^"]*igdtrigger\.exe"|igdtrigger)\s+(.*)$', line)
            if m is None:
                m = re.match(r"^\w+_command: igdtrigger\s+(.*)$", line)  # Lutris system.yml
            if m is None:
                continue
            args = shlex.split(m.group(1).replace("%command%", "game"))
            if args[-1] == "--":
                args.append("game")
            out.append((path.name, args))
    return out


def test_hooks_exist() -> None:
    names = {p.name for p in (EXAMPLES / "hooks").iterdir()}
    assert {"steam-launch-options.txt", "lutris.md", "heroic.md", "playnite-before.ps1",
            "playnite-after.ps1", "igdtrigger-wrap.sh"} <= names
    found = {name for name, _ in hook_command_lines()}
    assert {"steam-launch-options.txt", "lutris.md", "playnite-before.ps1",
            "playnite-after.ps1"} <= found


@pytest.mark.parametrize(("where", "args"), hook_command_lines(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_hook_command_lines_parse(where: str, args: list[str]) -> None:
    ns = build_parser().parse_args(args)
    assert ns.cmd in {"run", "activate", "deactivate"}, where
    if where.startswith("playnite"):
        assert ns.timeout == 1.0, "Playnite hooks must give up fast"
