"""Every form of the state operations has every method of `Operations` with a compatible signature, and the
`--local DIR` layout is the one `LocalDirs` describes."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from shared.operations.interface import Operations
from shared.operations.maintenance import Maintenance, for_local
from shared.operations.remote import RemoteOps
from shared.settings import LocalDirs, load_settings

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def protocol_methods() -> list[str]:
    return sorted(n for n, v in vars(Operations).items() if not n.startswith("_") and inspect.isfunction(v))


def mismatches(form: type, name: str) -> list[str]:
    """Why `form.name` cannot stand in for `Operations.name` (nothing: it can). Every call the Protocol allows must
    bind the same way: positional parameters at the same places, keywords by the same names, defaults where the
    Protocol has one, the same annotations; what the form adds must be optional."""
    impl = getattr(form, name, None)
    if not callable(impl):
        return [f"{form.__name__} has no {name}"]
    want = list(inspect.signature(getattr(Operations, name)).parameters.values())[1:]
    have = list(inspect.signature(impl).parameters.values())[1:]
    by_name = {p.name: p for p in have}
    var_kw = any(p.kind is P.VAR_KEYWORD for p in have)
    out = []
    positional = [p for p in have if p.kind in POSITIONAL]
    for i, p in enumerate(want):
        q = by_name.get(p.name)
        if q is None:
            if not (p.kind is P.KEYWORD_ONLY and var_kw):
                out.append(f"{name}: no parameter {p.name!r}")
            continue
        if p.kind in POSITIONAL and (q.kind not in POSITIONAL or positional.index(q) != i):
            out.append(f"{name}: {p.name!r} is not positional parameter {i}")
        if p.default is not P.empty and q.default is P.empty:
            out.append(f"{name}: {p.name!r} has no default")
        if p.annotation != q.annotation:
            out.append(f"{name}: {p.name!r} is {q.annotation}, not {p.annotation}")
    names = {p.name for p in want}
    for q in have:
        if q.name not in names and q.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and q.default is P.empty:
            out.append(f"{name}: extra parameter {q.name!r} has no default")
    returns = inspect.signature(impl).return_annotation
    if returns != inspect.signature(getattr(Operations, name)).return_annotation:
        out.append(f"{name}: returns {returns}")
    return out


def test_the_protocol_names_every_operation_of_the_cli() -> None:
    state = ["persist", "hydrate", "snapshot", "snapshots", "verify", "inspect", "restore", "repair", "reset"]
    more = ["prune", "export_archive", "import_archive", "locks_status", "unlock"]
    assert protocol_methods() == sorted(state + more)


@pytest.mark.parametrize("form", [Maintenance, RemoteOps])
def test_each_form_has_every_operation_with_a_compatible_signature(form: type) -> None:
    assert [m for name in protocol_methods() for m in mismatches(form, name)] == []


def test_the_check_finds_a_missing_or_incompatible_method() -> None:
    class Lacking(RemoteOps):
        unlock = None  # type: ignore[assignment]

        def restore(self, snapshot_id: str, confirm: str = "", force: bool = False) -> dict[str, Any]:  # type: ignore[override]
            return {}

        def snapshot(self, label: str, urgent: bool) -> dict[str, Any]:  # type: ignore[override]
            return {}

    assert mismatches(Lacking, "unlock") == ["Lacking has no unlock"]
    assert mismatches(Lacking, "restore") == [
        "restore: 'force' is not positional parameter 1",
        "restore: 'confirm' is not positional parameter 2",
        "restore: no parameter 'partial'",
    ]
    assert mismatches(Lacking, "snapshot") == [
        "snapshot: 'label' has no default",
        "snapshot: extra parameter 'urgent' has no default",
    ]


def test_the_local_form_works_in_the_layout_local_dirs_names(tmp_path: Path, no_modal_env: Path) -> None:
    dirs = LocalDirs.at(tmp_path)
    assert load_settings(None).local_dirs(tmp_path) == dirs
    assert (dirs.data, dirs.backups, dirs.locks, dirs.live) == tuple(
        tmp_path / n for n in ("data", "backups", "locks", "live")
    )
    assert dirs["data"] == dirs.data
    ops = for_local(load_settings(None), tmp_path)
    assert (ops.data_dir, ops.backups_dir, ops.serve_dir) == (dirs.data, dirs.backups, dirs.root)
    assert ops.locks.directory == dirs.locks  # type: ignore[attr-defined]
