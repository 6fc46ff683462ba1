"""`tabby-modal upgrade --image tabbyml/tabby:X.Y.Z [--local DIR] [--token T]` and `upgrade --rollback`.

Refuses an unpinned tag; snapshots `pre-upgrade-<old>-to-<new>` and verifies it; deploys the new image (locally:
restarts `serve --local DIR` with TABBY_BIN, the new binary); waits for readiness and runs the smoke checks; on a
failure restores the snapshot and brings the old image back. The new tag is written to ./.env only when it works.
Exit 0 upgraded (or rolled back on request), 1 the upgrade failed and was rolled back, 2 bad input or refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from shared.cli.common import (
    EXIT_PROBLEMS,
    CommandError,
    cli,
    confirm_destructive,
    emit,
    get_settings,
    handled,
    json_option,
    local_option,
    require_modal_credentials,
    say,
    yes_option,
)
from shared.cli.state import run_op
from shared.operations import local_server, upgrade
from shared.operations.maintenance import for_local
from shared.settings import SettingsError, load_settings


@cli.command("upgrade")
@click.option(
    "--image", default=None, metavar="IMAGE", help="The new pinned image, e.g. tabbyml/tabby:0.33.0."
)
@click.option(
    "--rollback", is_flag=True, help="Undo the last recorded upgrade: old image, pre-upgrade snapshot."
)
@click.option("--token", default=None, help="A Tabby auth token for the smoke checks (else readiness only).")
@click.option(
    "--old-tabby-bin", default=None, metavar="PATH", help="--local: the Tabby binary to roll back to."
)
@yes_option
@local_option
@json_option
@handled
def upgrade_cmd(
    image: str | None,
    rollback: bool,
    token: str | None,
    old_tabby_bin: str | None,
    yes: bool,
    local: str | None,
    as_json: bool,
) -> None:
    """Upgrade Tabby with a verified snapshot first and an automatic rollback (see `--rollback`)."""
    settings = get_settings()
    if rollback == bool(image):
        raise CommandError("give --image IMAGE (a pinned tag) or --rollback")
    if image:
        try:
            load_settings(tabby_image=image)
        except SettingsError as err:
            raise CommandError(f"--image {image}: {str(err).split(': ', 1)[1]}") from None
    if os.environ.get(upgrade.IMAGE_VAR):
        say(f"note: {upgrade.IMAGE_VAR} is set in your environment and overrides .env: update it too")
    confirm_destructive(settings, "rollback" if rollback else f"upgrade to {image}", yes)
    if local is not None:
        binaries = {}
        run = local_server.running(settings.local_dirs(local)["root"])
        old_bin = old_tabby_bin or (local_server.tabby_bin_of(run["pid"]) if run else None)
        if image:
            binaries[image] = run_op(lambda: upgrade.check_binary(settings.tabby_bin))
            if old_bin:
                binaries[settings.tabby_image] = old_bin
        ops = for_local(settings, local)
        recorder: Any = upgrade.LocalRecorder(settings.local_dirs(local)["backups"])
        if rollback:
            previous = (recorder.read().get("current") or {}).get("previous_image")
            if previous:
                binaries[previous] = run_op(lambda: upgrade.check_binary(old_tabby_bin or settings.tabby_bin))
        port = (run or {}).get("port")
        target: Any = upgrade.LocalTarget(settings, local, binaries, port=port)
    else:
        require_modal_credentials()
        from shared.operations.remote import RemoteOps

        ops = RemoteOps(settings)
        recorder = upgrade.VolumeRecorder(ops.backups)
        target = upgrade.ModalTarget(settings)
    job = upgrade.Upgrade(
        settings, ops=ops, target=target, recorder=recorder, env_file=Path(".env"), token=token, say=say
    )
    result = run_op(job.rollback if rollback else lambda: job.upgrade(image or ""))

    def human(r: dict[str, Any]) -> str:
        if rollback:
            return f"rolled back to {r['to']} with snapshot {r['snapshot']}"
        if r["upgraded"]:
            return f"upgraded {r['from']} -> {r['to']}; pre-upgrade snapshot {r['snapshot']}"
        back = "and rolled back" if not r.get("rollback_failures") else "and the rollback failed too"
        return f"upgrade to {r['to']} FAILED ({r['failures'][0]}) {back}; {r['from']} runs on snapshot {r['snapshot']}"

    emit(result, as_json, human)
    if (not rollback and not result["upgraded"]) or result.get("rollback_failures"):
        raise SystemExit(EXIT_PROBLEMS)
