"""Tabby's state: `persist`, `hydrate`, `snapshot`, `snapshots`, `verify`, `restore`, `prune`, `reset`, `inspect`.

With `--local DIR` they work on DIR/data (the data Volume) and DIR/backups (the backups Volume); without it they go
to Modal through `shared.operations.remote`. Exit codes: 0 done, 1 verify found problems, 2 bad input or refused.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from shared.cli.common import (
    EXIT_PROBLEMS,
    CommandError,
    cli,
    command_hint,
    confirm_destructive,
    emit,
    get_settings,
    handled,
    json_option,
    local_option,
    lock_line,
    require_modal_credentials,
    yes_option,
)
from shared.operations.forms import open_ops
from shared.settings import LocalDirs
from shared.state.errors import StateError
from shared.state.progress import mib
from shared.state.space import disk_full, is_disk_full
from shared.state.store.core import check_label

if TYPE_CHECKING:
    from shared.operations.interface import Operations


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """State errors and OS errors become one stderr line and exit code 2."""
    try:
        yield
    except StateError as err:
        raise CommandError(str(err)) from None
    except OSError as err:
        if is_disk_full(err):  # one not caught nearer its write: the same one line, naming the file it names
            raise CommandError(str(disk_full(Path(err.filename or "."), None, err))) from None
        raise CommandError(f"{err.strerror or err}: {err.filename}" if err.filename else str(err)) from None


# Folders a `--local DIR` holds; a DIR with none of them is not one (a typo, or the wrong folder).
STORE_PARTS = LocalDirs.STORE_PARTS
CREATORS = "`persist`, `import` and `serve` start one"


def check_local(local: str, creates: bool = False) -> None:
    """Refuse a `--local DIR` that is not a tabby-modal folder, unless the command starts one on purpose."""
    root = Path(local)
    if root.exists() and not root.is_dir():
        raise CommandError(f"--local {local}: not a directory")
    if creates:
        return
    if not root.is_dir():
        raise CommandError(f"--local {local}: no such directory ({CREATORS})")
    if not any(LocalDirs.at(root)[part].is_dir() for part in STORE_PARTS):
        raise CommandError(
            f"--local {local}: not a tabby-modal folder (no {', '.join(p + '/' for p in STORE_PARTS)} in it; "
            f"{CREATORS})"
        )


@contextlib.contextmanager
def kept_only_on_success(local: str | None, *parts: str) -> Iterator[None]:
    """A command that starts a new `--local DIR` (or the DIR/`parts` folders it writes) and then fails leaves none
    of them behind: a failed first persist on a full disk must not keep the megabytes it managed to write."""
    fresh = None  # the outermost folder of DIR's path that does not exist yet
    here = Path(local).absolute() if local is not None else None
    while here is not None and not here.exists() and here != here.parent:
        fresh, here = here, here.parent
    folders = [] if local is None or fresh is not None else [Path(local) / p for p in parts]
    new = [p.absolute() for p in folders if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in [fresh] if fresh is not None else new:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def ops_for(local: str | None, *, creates: bool = False) -> Operations:
    """The local form on DIR/data and DIR/backups, or the deployed maintenance app (credentials checked first).
    A `--local DIR` must already be a tabby-modal folder unless the command `creates` one (see `check_local`)."""
    if local is None:
        require_modal_credentials()
    else:
        check_local(local, creates)
    with _refusals():
        return open_ops(get_settings(), local)


def run_op(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run an operation; its refusals become the one-line error and exit 2."""
    with _refusals():
        return fn()


REPAIR_HINT = "what now: docs/recovery.md; `tabby-modal repair --dry-run` shows what a repair would drop and store again"


def skipped_lines(r: dict[str, Any]) -> list[str]:
    """`latest` passed over a newer snapshot whose manifest does not load: say so."""
    return [f"note: skipped newer snapshot {s['id']}: {s['problem']}" for s in r.get("skipped_newer") or []]


def left_out_lines(r: dict[str, Any]) -> list[str]:
    """A partial restore or export: every file left out, by name."""
    out = r.get("left_out") or []
    return [f"LEFT OUT {len(out)} files:"] * bool(out) + [f"  {m['path']}: {m['problem']}" for m in out]


def checked_label(label: str) -> str:
    """A `--label` the snapshot id carries as given, or exit 2 naming the allowed characters: checked before
    anything starts (a DIR made, an upload)."""
    with _refusals():
        return check_label(label)


def _require_local(local: str | None, command: str) -> None:
    if local is None:
        raise CommandError(
            f"{command} works on local folders: pass --local DIR (on Modal the server runs it)"
        )


# --- persist / hydrate ----------------------------------------------------------------------------------------


@cli.command("persist")
@click.option("--root", "root", required=True, metavar="LIVE_ROOT", help="The live TABBY_ROOT to mirror.")
@local_option
@json_option
@handled
def persist_cmd(root: str, local: str | None, as_json: bool) -> None:
    """Mirror a live TABBY_ROOT into DIR/data: DB through SQLite's backup API, changed files only, manifest last."""
    _require_local(local, "persist")
    with kept_only_on_success(local, "data"):
        ops = ops_for(local, creates=True)
        result = run_op(lambda: ops.persist(Path(root)))

    def human(r: dict[str, Any]) -> str:
        what = (
            f"{r['changed']} changed ({mib(r['copied_bytes'])}), {r['deleted']} deleted"
            if r["wrote_manifest"]
            else "nothing changed"
        )
        return f"persisted: {what}; {r['files']} files, {mib(r['bytes'])} ({r['seconds']:.3f}s)"

    emit(result, as_json, human)


@cli.command("hydrate")
@click.option("--root", "root", required=True, metavar="LIVE_ROOT", help="Where to lay the state down.")
@local_option
@json_option
@handled
def hydrate_cmd(root: str, local: str | None, as_json: bool) -> None:
    """Lay DIR/data's last persisted state down at LIVE_ROOT, checked against its manifest first."""
    _require_local(local, "hydrate")
    if Path(root).exists() and not Path(root).is_dir():
        raise CommandError(f"--root {root}: not a directory")
    ops = ops_for(local)
    result = run_op(lambda: ops.hydrate(Path(root)))

    def human(r: dict[str, Any]) -> str:
        if r["fresh"]:
            return f"hydrated: empty data dir, {root} starts as a fresh instance"
        return f"hydrated: {r['files']} files, {mib(r['bytes'])} into {root} ({r['seconds']:.2f}s)"

    emit(result, as_json, human)


# --- snapshots --------------------------------------------------------------------------------------------------


@cli.command("snapshot")
@click.option("--label", default="manual", show_default=True, help="Label carried in the snapshot id.")
@local_option
@json_option
@handled
def snapshot_cmd(label: str, local: str | None, as_json: bool) -> None:
    """Take a snapshot of the data dir into the backups store (deduplicated; unchanged files cost nothing)."""
    checked_label(label)
    ops = ops_for(local)
    with kept_only_on_success(local, "backups"):  # a first snapshot that fails leaves no backups/ behind
        result = run_op(lambda: ops.snapshot(label))

    def human(r: dict[str, Any]) -> str:
        return (
            f"snapshot {r['id']}: {r['files']} files, {mib(r['bytes'])}; "
            f"new: {r['new_blobs']} blobs, {mib(r['new_bytes'])} ({r['consistency']}, {r['seconds']:.2f}s)"
        )

    emit(result, as_json, human)


@cli.command("snapshots")
@local_option
@json_option
@handled
def snapshots_cmd(local: str | None, as_json: bool) -> None:
    """List snapshots, oldest first, and the store's size."""
    ops = ops_for(local)
    result = run_op(ops.snapshots)

    def human(r: dict[str, Any]) -> str:
        lines = []
        for s in r["snapshots"]:
            if "problem" in s:
                lines.append(f"{s['id']}  UNREADABLE: {s['problem']}")
            else:
                lines.append(
                    f"{s['id']:<48} {s['time']}  {s['files']:>7} files  {mib(s['bytes']):>12}  {s['consistency']}"
                )
        lines.append(f"{r['count']} snapshots; store holds {r['blobs']} blobs, {mib(r['bytes'])}")
        return "\n".join(lines)

    emit(result, as_json, human)


@cli.command("verify")
@click.argument("snapshot", required=False)
@click.option(
    "--sample", type=float, default=None, metavar="FRACTION", help="Re-hash only this share of blobs."
)
@local_option
@json_option
@handled
def verify_cmd(snapshot: str | None, sample: float | None, local: str | None, as_json: bool) -> None:
    """Re-hash blobs, check every manifest's blobs exist, restore-drill each database (exit 1 on problems)."""
    ops = ops_for(local)
    result = run_op(lambda: ops.verify(snapshot, sample))

    def human(r: dict[str, Any]) -> str:
        head = (
            f"{'ok' if r['ok'] else 'PROBLEMS'}: {r['snapshots']} snapshots, "
            f"{r['blobs_checked']}/{r['blobs']} blobs re-hashed, {r['databases_drilled']} databases drilled"
        )
        packs = [f"  pack {n}: {why}" for n, why in (r.get("bad_packs") or {}).items()]
        lines = [head, *(f"  {p['snapshot']}  {p['path']}: {p['problem']}" for p in r["problems"]), *packs]
        return "\n".join([*lines, *([REPAIR_HINT] if not r["ok"] else [])])

    emit(result, as_json, human)
    if not result["ok"]:
        raise SystemExit(EXIT_PROBLEMS)


@cli.command("restore")
@click.argument("snapshot")
@yes_option
@click.option(
    "--force", is_flag=True, help="Even if a server seems to be running or the safety snapshot fails."
)
@click.option("--partial", is_flag=True, help="Restore what is intact, naming each file left out (exit 1).")
@local_option
@json_option
@handled
def restore_cmd(
    snapshot: str, yes: bool, force: bool, partial: bool, local: str | None, as_json: bool
) -> None:
    """Replace the data dir with SNAPSHOT (or `latest`): verified first, a safety snapshot taken, staged, swapped."""
    settings = get_settings()
    confirm_destructive(settings, f"restore {snapshot}", yes)
    ops = ops_for(local)
    with kept_only_on_success(local, "data"):
        result = run_op(
            lambda: ops.restore(snapshot, force=force, confirm=settings.data_volume, partial=partial)
        )

    def human(r: dict[str, Any]) -> str:
        safety = f"; safety snapshot {r['safety_snapshot']}" if r.get("safety_snapshot") else ""
        text = f"restored {r['restored']}: {r['files']} files, {mib(r['bytes'])}{safety}"
        return "\n".join([*skipped_lines(r), text, *left_out_lines(r)])

    emit(result, as_json, human)
    if result.get("left_out"):
        raise SystemExit(EXIT_PROBLEMS)


@cli.command("prune")
@click.option("--keep-last", type=int, default=None, help="Newest snapshots kept (default: settings).")
@click.option("--keep-daily", type=int, default=None, help="Days with one snapshot kept (default: settings).")
@click.option(
    "--keep-weekly", type=int, default=None, help="ISO weeks with one snapshot kept (default: settings)."
)
@click.option("--dry-run", is_flag=True, help="Only list what would go.")
@yes_option
@local_option
@json_option
@handled
def prune_cmd(
    keep_last: int | None,
    keep_daily: int | None,
    keep_weekly: int | None,
    dry_run: bool,
    yes: bool,
    local: str | None,
    as_json: bool,
) -> None:
    """Forget snapshots outside the retention rules (never the newest), then delete unreferenced blobs."""
    settings = get_settings()
    last = settings.keep_last if keep_last is None else keep_last
    daily = settings.keep_daily if keep_daily is None else keep_daily
    weekly = settings.keep_weekly if keep_weekly is None else keep_weekly
    if not dry_run:
        confirm_destructive(settings, "prune", yes)
    ops = ops_for(local)
    result = run_op(
        lambda: ops.prune(
            last, daily, weekly, dry_run, confirm=settings.data_volume, keep_safety=settings.keep_safety
        )
    )

    def human(r: dict[str, Any]) -> str:
        verb = "would remove" if r["dry_run"] else "removed"
        lines = [f"{verb} {s}" for s in r["removed"]]
        lines.append(
            f"{verb} {len(r['removed'])} snapshots and {r['blobs_removed']} blobs ({mib(r['bytes_freed'])}); "
            f"kept {len(r['kept'])}"
        )
        return "\n".join(lines)

    emit(result, as_json, human)


@cli.command("reset")
@click.option("--scope", type=click.Choice(["all", "auth", "index"]), required=True, help="What to delete.")
@yes_option
@click.option(
    "--force", is_flag=True, help="Even if a server seems to be running or the safety snapshot fails."
)
@local_option
@json_option
@handled
def reset_cmd(scope: str, yes: bool, force: bool, local: str | None, as_json: bool) -> None:
    """Delete all state, `auth` (ee/: users, tokens, settings) or `index` (index/, repositories/), after a snapshot."""
    settings = get_settings()
    confirm_destructive(settings, f"reset --scope {scope}", yes)
    ops = ops_for(local)
    result = run_op(lambda: ops.reset(scope, force=force, confirm=settings.data_volume))

    def human(r: dict[str, Any]) -> str:
        return (
            f"reset {r['scope']}: removed {r['removed_files']} files ({mib(r['removed_bytes'])}); "
            f"safety snapshot {r['safety_snapshot'] or 'none (nothing to keep)'}"
        )

    emit(result, as_json, human)


@cli.command("inspect")
@click.option("--snapshot", "snapshot", default=None, metavar="ID", help="Inspect a snapshot instead.")
@local_option
@json_option
@handled
def inspect_cmd(snapshot: str | None, local: str | None, as_json: bool) -> None:
    """What is in the data dir (or a snapshot): dirs, database users/owner/tables, last persist, snapshots."""
    ops = ops_for(local)
    result = run_op(lambda: ops.inspect(snapshot))

    def human(r: dict[str, Any]) -> str:
        db = r["db"]
        lines = [
            f"{r.get('snapshot') or r.get('data_dir')}: {r['files']} files, {mib(r['bytes'])}, {r['inodes']} inodes"
            + (f" ({r['packs']} packs)" if r.get("packs") else "")
        ]
        if cut := r.get("interrupted"):  # first: the figures below describe a mix, not a state
            lines.insert(0, f"INTERRUPTED: this data dir holds {cut['describe']}: {cut['next']}")
        for top, d in r["dirs"].items():
            lines.append(f"  {top + '/':<16} {d['files']:>7} files  {mib(d['bytes']):>12}")
        if db.get("present"):
            lines.append(
                f"db {db.get('path')}: integrity {db['integrity']}, {db['users']} users, "
                f"owner {'yes' if db['owner'] else 'no'}, schema {db['schema_version']}, {len(db['tables'])} tables"
            )
        else:
            lines.append("db: none (a fresh instance)")
        last = r.get("last_persist")
        if last and last.get("age_seconds") is not None:
            lines.append(f"last persist {last['time']} ({last['age_seconds']:.0f}s ago)")
        snaps = r.get("snapshots")
        if snaps:
            lines.append(f"snapshots: {snaps['count']}, store {mib(snaps['bytes'])}")
        for key, held in (r.get("locks") or {}).items():
            if held:
                state = "" if held.get("live") else f"; stale, `{command_hint('unlock', local)}` breaks it"
                lines.append(f"{lock_line(key, held)}{state}")
        return "\n".join(lines)

    emit(result, as_json, human)
