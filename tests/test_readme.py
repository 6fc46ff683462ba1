"""Keep the README and docs/ true: the settings table, the make targets and commands they name, the runbook, links."""

import re
import subprocess
import sys

from tests.conftest import BIN, REPO

README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
EVERYTHING = README + "\n".join(DOCS.values())


def test_settings_table_matches_the_settings_class():
    sys.path.insert(0, str(REPO / "scripts"))
    from settings_table import table

    block = DOCS["settings.md"].split("<!-- settings-table")[1].split("<!-- /settings-table -->")[0]
    assert table() in block, "docs/settings.md table is stale: run python scripts/settings_table.py"


def test_quick_start_commands():
    assert "make install" in README and "make test" in README


def test_every_make_target_named_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", EVERYTHING))
    assert named, "the docs name no make targets"
    assert named <= targets, f"the docs name unknown targets: {named - targets}"


def test_every_tabby_modal_command_named_exists():
    help_text = subprocess.run(
        [str(BIN / "tabby-modal"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    commands = set(re.findall(r"^  ([a-z][a-z-]*)\s", help_text, re.M))
    named = set(re.findall(r"`tabby-modal ([a-z][a-z-]*)", EVERYTHING))
    assert named <= commands, f"the docs name unknown commands: {named - commands}"


def test_runbook_covers_every_operation_with_real_commands():
    runbook = DOCS["runbook.md"]
    for topic in (
        "Back up",
        "List",
        "Verify",
        "Restore",
        "Reset",
        "Prune",
        "self-hosted",
        "Stop and start",
        "Rotate the JWT secret",
        "unlock",
    ):
        assert topic in runbook, f"runbook lacks {topic!r}"
    import ast

    app = ast.parse((REPO / "apps/maintenance.py").read_text())
    functions = {f.name: {a.arg for a in f.args.args} for f in app.body if isinstance(f, ast.FunctionDef)}
    calls = re.findall(r"modal run -m apps\.maintenance::(\w+)([^\n]*)", runbook)
    assert len(calls) >= 7
    for name, flags in calls:
        assert name in functions, f"runbook runs unknown function {name}"
        for flag in re.findall(r"--([\w-]+)", flags):
            assert flag.replace("-", "_") in functions[name], f"{name} has no --{flag}"


def test_readme_is_a_short_path_with_links_that_resolve():
    assert len(README.splitlines()) <= 200
    for text, where in [(README, REPO), *((d, REPO / "docs") for d in DOCS.values())]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (where / target).exists(), f"broken link {target}"
