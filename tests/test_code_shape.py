"""The code's shape (issue 40): a STAT stage or a demo step calls the library, never a command's `main()` with a
stand-in arguments object."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stat_jax"


def _calls_to_main(path: Path) -> list[str]:
    """`x.main(...)` / `main(...)` calls in a file, as 'file:line'."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name == "main":
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_stages_and_demo_steps_call_no_command_main():
    files = sorted((PACKAGE / "stat").rglob("*.py")) + sorted((PACKAGE / "demo").rglob("*.py"))
    assert files
    calls = [c for f in files for c in _calls_to_main(f)]
    assert calls == [], f"a stage calls a command's main(): {calls}"


def test_the_scan_finds_a_call_to_main(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("from stat_jax.train import sft\n\ndef stage(c):\n    return sft.main(c, None)\n")
    assert _calls_to_main(f) == ["probe.py:4"]


# Layers, lowest first: a module may import its own layer and the ones below, never one above.
LAYERS = [
    {"errors", "progress", "hardware", "config", "validity", "sharding", "supervisor", "distributed", "lengths", "data",
     "models"},
    {"teacher", "rollout", "eval"},
    {"train"},
    {"stat"},
    {"demo", "cli", "preflight"},
]


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if module.startswith("stat_jax.") else None
    top = top.removesuffix(".py") if top else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stat_jax"):
            names = [node.module] if node.module != "stat_jax" else [f"stat_jax.{a.name}" for a in node.names]
            out += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("stat_jax.")]
    return out


@pytest.mark.parametrize("lower", ["teacher", "rollout", "lengths.py", "distributed.py", "eval", "data", "models"])
def test_no_lower_layer_imports_a_higher_one(lower):
    files = [PACKAGE / lower] if lower.endswith(".py") else sorted((PACKAGE / lower).rglob("*.py"))
    upward = []
    for f in files:
        own = _layer(f"stat_jax.{f.relative_to(PACKAGE).parts[0]}")
        for module, line in _imports(f):
            layer = _layer(module)
            if layer is not None and own is not None and layer > own:
                upward.append(f"{f.relative_to(PACKAGE)}:{line} imports {module}")
    assert upward == [], upward


# Functions allowed over 80 lines, each with why (issue 40's rule): none other may grow past it.
LONG_FUNCTIONS: dict[str, str] = {}  # "path:function": why it may be longer


def test_no_function_over_80_lines_unless_listed_with_why():
    long = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{f.relative_to(PACKAGE).as_posix()}:{node.name}")
    assert sorted(long) == sorted(LONG_FUNCTIONS), long


def test_the_demo_is_a_configuration_of_pipelines_in_under_500_lines():
    lines = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in (PACKAGE / "demo").rglob("*.py"))
    assert lines < 500, lines
