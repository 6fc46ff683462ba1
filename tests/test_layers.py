"""The house rules: imports point one way and never form a circle, nothing outside tests/ imports tests/, and
every third-party import is declared.

    scripts, apps, shared.cli  ->  shared.operations  ->  shared.state  ->  base (settings, image, models, logs)
                                   shared.serving     ->  shared.state

Read from the source with `ast` (every import, lazy ones inside functions included, `TYPE_CHECKING` ones too),
so a test fails on an import that points up or sideways, and on any cycle between modules: a package's `__init__`
is a module like any other (a child that imports its parent package and a parent that imports the child is a
circle).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Which layers each layer may import (besides itself).
ALLOWED = {
    "base": {"base"},
    "state": {"base"},
    "serving": {"state", "base"},
    "operations": {"state", "base"},
    "cli": {"operations", "serving", "state", "base"},
    "apps": {"operations", "serving", "state", "base"},
    "scripts": {"scripts", "cli", "operations", "serving", "state", "base"},
}
# warm_hours: the stdlib-only parser that settings validates TABBY_MODAL_WARM_HOURS with.
BASE = {"shared", "shared.settings", "shared.image", "shared.models", "shared.logs", "shared.warm_hours"}
TOP_LEVEL_ALLOWED = {"settings.py", "image.py", "models.py", "logs.py", "warm_hours.py", "__init__.py"}


def layer(module: str) -> str:
    if module.startswith("apps"):
        return "apps"
    if module.startswith("scripts"):
        return "scripts"
    if module in BASE:
        return "base"
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*ROOT.glob("shared/**/*.py"), *ROOT.glob("apps/*.py"), *ROOT.glob("scripts/*.py")]
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that `path` imports (`from shared.state import mirror` counts as shared.state.mirror)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import child` is an import of the child; `from pkg import name` one of pkg itself.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in ("shared", "apps", "scripts"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = sources()
    known = set(mods)
    return {m: {i for i in imports_of(p, known) if i != m} for m, p in mods.items()}


def test_shared_top_level_holds_only_the_base_modules():
    loose = sorted(p.name for p in (ROOT / "shared").glob("*.py") if p.name not in TOP_LEVEL_ALLOWED)
    assert loose == [], f"modules at shared/ top level that belong in a subpackage: {loose}"


def test_every_import_points_down():
    wrong = []
    for mod, deps in graph().items():
        for dep in deps:
            src, dst = layer(mod), layer(dep)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{mod} -> {dep} ({src} may not import {dst})")
    assert wrong == [], "\n".join(sorted(wrong))


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "g, expect",
    [
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_cycle_finder_finds_cycles(g, expect):
    assert find_cycle(g) == expect


def test_layer_check_catches_an_upward_import(tmp_path):
    # The checker itself must see an upward import written the way our code writes them.
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from shared.operations.maintenance import for_local\n")
    deps = imports_of(src, {"shared.operations.maintenance", "shared.operations"})
    assert deps == {"shared.operations.maintenance"}
    assert "operations" not in ALLOWED["state"]


def test_the_graph_sees_a_child_importing_its_parent_package(tmp_path):
    # `from shared.cli import cli` in a command module, with shared/cli/__init__ importing that module, is a circle.
    src = tmp_path / "m.py"
    src.write_text("from shared.cli import cli\nfrom shared.state import mirror\n")
    deps = imports_of(src, {"shared.cli", "shared.state", "shared.state.mirror"})
    assert deps == {"shared.cli", "shared.state.mirror"}


def _top_level_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_nothing_outside_tests_imports_tests():
    wrong = sorted(str(p.relative_to(ROOT)) for p in sources().values() if "tests" in _top_level_imports(p))
    assert wrong == [], f"import from tests/ outside tests (run its programs instead): {wrong}"


def test_every_third_party_import_is_declared():
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {
        re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower().replace("_", "-")
        for d in [*project["project"]["dependencies"], *project["dependency-groups"]["dev"]]
    }
    dists = packages_distributions()
    # Ours, and the sibling modules that programs in tests/ and scripts/ import by file name.
    ours = {"shared", "apps", "scripts", "tests", "__future__"} | {
        p.stem for p in [*ROOT.glob("tests/*.py"), *ROOT.glob("scripts/*.py")]
    }
    missing = set()
    for path in [*sources().values(), *ROOT.glob("tests/**/*.py")]:
        for name in _top_level_imports(path) - ours - set(sys.stdlib_module_names):
            owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
            if not owners & declared:
                missing.add(f"{name} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
