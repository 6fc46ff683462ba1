"""Moving state in and out, and the leases: `export`, `import`, `unlock`.

`export` writes a snapshot as a plain .tar.gz of a Tabby root (restorable with `tar -xzf FILE -C ~/.tabby`);
`import` stores such a tarball, or one of a self-hosted `~/.tabby`, as a new snapshot ready to `restore`. Both work
with `--local DIR` and against the deployed maintenance app, streaming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from shared.cli.common import (
    EXIT_PROBLEMS,
    CommandError,
    cli,
    command_hint,
    emit,
    handled,
    json_option,
    local_option,
    lock_line,
    say,
)
from shared.cli.state import (
    checked_label,
    kept_only_on_success,
    left_out_lines,
    ops_for,
    run_op,
    skipped_lines,
)
from shared.state.progress import mib


@cli.command("export")
@click.argument("snapshot")
@click.option("--out", "out", required=True, metavar="FILE.tar.gz", help="Archive to write (must not exist).")
@click.option("--partial", is_flag=True, help="Export what is intact, naming each file left out (exit 1).")
@local_option
@json_option
@handled
def export_cmd(snapshot: str, out: str, partial: bool, local: str | None, as_json: bool) -> None:
    """Write SNAPSHOT (or `latest`) as a .tar.gz of a Tabby root: `tar -xzf FILE -C ~/.tabby` restores it."""
    if not out.endswith((".tar.gz", ".tgz")):
        raise CommandError(f"--out {out!r}: name the archive FILE.tar.gz")
    ops = ops_for(local)
    result = run_op(lambda: ops.export_archive(snapshot, Path(out), partial=partial))

    def human(r: dict[str, Any]) -> str:
        text = (
            f"exported {r['snapshot']}: {r['files']} files, {mib(r['bytes'])} -> {r['path']} "
            f"({mib(r['archive_bytes'])} compressed, sha256 {r['sha256'][:12]})"
        )
        return "\n".join([*skipped_lines(r), text, *left_out_lines(r)])

    emit(result, as_json, human)
    if result.get("left_out"):
        raise SystemExit(EXIT_PROBLEMS)


@cli.command("import")
@click.argument("archive", metavar="FILE.tar.gz")
@click.option("--label", default="import", show_default=True, help="Label carried in the snapshot id.")
@local_option
@json_option
@handled
def import_cmd(archive: str, label: str, local: str | None, as_json: bool) -> None:
    """Store a .tar.gz of a Tabby root (an export, or a self-hosted ~/.tabby) as a new snapshot."""
    checked_label(label)
    with kept_only_on_success(local, "backups"):
        ops = ops_for(local, creates=True)
        result = run_op(lambda: ops.import_archive(Path(archive), label))

    def human(r: dict[str, Any]) -> str:
        return (
            f"imported {archive} as snapshot {r['id']}: {r['files']} files, {mib(r['bytes'])}; "
            f"restore it with `{command_hint('restore ' + r['id'], local)}`"
        )

    emit(result, as_json, human)


@cli.command("unlock")
@click.option("--yes", is_flag=True, help="Also break locks whose holder may still run (it must be dead).")
@local_option
@json_option
@handled
def unlock_cmd(yes: bool, local: str | None, as_json: bool) -> None:
    """Break the store and maintenance locks a crashed run left behind.

    A holder that is provably gone (its process ended on this host, or its lease expired) is broken without
    `--yes`; one that may still run is only named, and `--yes` breaks it too (be sure its run is dead).
    """
    ops = ops_for(local)
    status = run_op(ops.locks_status)
    live = [lock_line(key, rec) for key, rec in status.items() if rec and rec.get("live")]
    if live and not yes:
        raise CommandError(
            f"lock still live: {'; '.join(live)}. If that run is dead, `tabby-modal unlock --yes` breaks it"
        )
    result = run_op(lambda: ops.unlock(force=yes))
    for key, rec in result["broken"].items():
        say(f"broke the {lock_line(key, rec)}")
    for key, rec in result.get("held", {}).items():
        say(f"left the {lock_line(key, rec)}: a run took it meanwhile")
    emit(result, as_json, "no lock was held" if not result["broken"] else "unlocked")
