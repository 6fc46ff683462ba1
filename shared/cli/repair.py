"""`repair`: what to run after `verify` found corrupt blobs (see docs/recovery.md).

It rewrites packs without their corrupt blobs, deletes corrupt loose blobs, stores again a lost blob that the data
dir still has (by sha256), and rewrites each snapshot that still lost files without them, naming them. It changes
the store, so it follows the two-signal rule like prune; `--dry-run` writes nothing and says what would happen.
"""

from __future__ import annotations

from typing import Any

import click

from shared.cli.common import (
    EXIT_PROBLEMS,
    cli,
    confirm_destructive,
    emit,
    get_settings,
    handled,
    json_option,
    local_option,
    yes_option,
)
from shared.cli.state import ops_for, run_op


@cli.command("repair")
@click.option("--dry-run", is_flag=True, help="Only say what would be dropped, stored again and lost.")
@yes_option
@local_option
@json_option
@handled
def repair_cmd(dry_run: bool, yes: bool, local: str | None, as_json: bool) -> None:
    """Drop corrupt blobs from the store, store again those the data dir still has, name what each snapshot lost."""
    settings = get_settings()
    if not dry_run:
        confirm_destructive(settings, "repair", yes)
    ops = ops_for(local)
    result = run_op(lambda: ops.repair(dry_run=dry_run, confirm=settings.data_volume))

    def human(r: dict[str, Any]) -> str:
        would = "would " if r["dry_run"] else ""
        lines = [
            f"{r['corrupt_blobs']} corrupt blobs; {would}store again {len(r['stored_again'])} from the data dir, "
            f"{would}rewrite {len(r['packs_rewritten'])} packs"
        ]
        lines += [f"  stored again {s['sha256'][:12]} from {s['path']}" for s in r["stored_again"]]
        for sid, paths in r["lost"].items():
            lines.append(f"snapshot {sid} {would}lose {len(paths)} files:")
            lines += [f"  {p}" for p in paths]
        for sid, paths in r["missing"].items():
            lines.append(
                f"snapshot {sid}: {len(paths)} files have no blob (kept: a pack index is unreadable)"
            )
            lines += [f"  {p}" for p in paths]
        lines += [f"pack {n}: unreadable index ({why})" for n, why in r["bad_packs"].items()]
        lines += [f"snapshot {sid}: manifest unreadable, left as it is" for sid in r["unreadable"]]
        if not r["lost"] and not r["missing"]:
            lines.append(f"no snapshot {'would lose' if r['dry_run'] else 'lost'} a file")
        return "\n".join(lines)

    emit(result, as_json, human)
    if result["lost"] or result["missing"] or result["bad_packs"] or result["unreadable"]:
        raise SystemExit(EXIT_PROBLEMS)
