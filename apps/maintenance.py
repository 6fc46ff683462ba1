"""tabby-maintenance: snapshots, verification, restore, prune and reset of Tabby's state, on CPU.

    make deploy-maintenance    # = modal deploy -m apps.maintenance
    make backup-volume         # = tabby-modal snapshot (calls the deployed `snapshot` below)

Both Volumes are mounted: the data Volume that the server mirrors Tabby's root into (/data), and the backups
Volume that holds the snapshot store (/backups). Each function is one operation, a thin call into
`shared/operations/maintenance.py`, which reloads what it reads, commits what it wrote, and holds the leases that keep the
server and other maintenance runs out of the way. Every function also runs ad hoc, e.g.

    modal run -m apps.maintenance::snapshot --label before-upgrade
    modal run -m apps.maintenance::snapshots
    modal run -m apps.maintenance::verify [--snapshot ID] [--sample 0.1]
    modal run -m apps.maintenance::inspect [--snapshot ID]
    modal run -m apps.maintenance::prune [--keep-last 7] [--dry-run] --confirm tabby-data
    modal run -m apps.maintenance::restore --snapshot ID --confirm tabby-data      # server stopped first
    modal run -m apps.maintenance::reset --scope auth --confirm tabby-data         # server stopped first
    modal run -m apps.maintenance::repair [--dry-run] --confirm tabby-data         # after verify found corruption

Destructive ones need `--confirm` with the data Volume's name (`tabby-modal` passes it after its own two-signal
check); `--force` skips the running-server check and is dangerous.
"""

import modal

from shared.image import build_image
from shared.operations import maintenance, warm
from shared.settings import load_settings

# Resolved here, on your machine; the container gets the same values through `env=` in the options.
settings = load_settings()

app = modal.App(settings.maintenance_app)
image = build_image(settings)  # the shared image: a deploy after `make warm-cache` builds nothing

data = modal.Volume.from_name(
    settings.data_volume, create_if_missing=True, environment_name=settings.modal_environment
)
backups = modal.Volume.from_name(
    settings.backups_volume, create_if_missing=True, environment_name=settings.modal_environment
)
options = maintenance.function_options(settings, data=data, backups=backups)


@app.function(image=image, **options)
def snapshot(label: str = "manual") -> dict:
    """Snapshot /data into the store. Allowed while the server runs: it takes the last complete persist."""
    return maintenance.run("snapshot", data=data, backups=backups, label=label)


@app.function(image=image, **options)
def snapshots() -> dict:
    """List snapshots and the store's size."""
    return maintenance.run("snapshots", data=data, backups=backups)


@app.function(image=image, **options)
def verify(snapshot: str = "", sample: float = 1.0) -> dict:
    """Rehash blobs (all, or a `sample` share), check manifests, restore-drill each database."""
    return maintenance.run("verify", data=data, backups=backups, snapshot=snapshot, sample=sample)


@app.function(image=image, **options)
def inspect(snapshot: str = "") -> dict:
    """What /data (or a snapshot) holds: dirs, DB users and owner, last persist; and who holds the leases."""
    return maintenance.run("inspect", data=data, backups=backups, snapshot=snapshot)


@app.function(image=image, **options)
def restore(snapshot: str, force: bool = False, confirm: str = "", partial: bool = False) -> dict:
    """Replace /data with a snapshot: verified, safety snapshot first, server stopped, maintenance lease held.
    `partial` leaves out (and names) the files whose blobs are corrupt."""
    return maintenance.run(
        "restore",
        data=data,
        backups=backups,
        snapshot=snapshot,
        force=force,
        confirm=confirm,
        partial=partial,
    )


@app.function(image=image, **options)
def repair(dry_run: bool = False, confirm: str = "") -> dict:
    """Drop corrupt blobs from the store, store again those /data still has, name what each snapshot lost."""
    return maintenance.run("repair", data=data, backups=backups, dry_run=dry_run, confirm=confirm)


@app.function(image=image, **options)
def reset(scope: str, force: bool = False, confirm: str = "") -> dict:
    """Delete `all`, `auth` (ee/) or `index` state after a safety snapshot, under the same rules as restore."""
    return maintenance.run("reset", data=data, backups=backups, scope=scope, force=force, confirm=confirm)


@app.function(image=image, **options)
def prune(
    keep_last: int = -1,
    keep_daily: int = -1,
    keep_weekly: int = -1,
    dry_run: bool = False,
    confirm: str = "",
    keep_safety: int = -1,
) -> dict:
    """Apply retention (negative counts: the settings), then delete unreferenced blobs."""
    return maintenance.run(
        "prune",
        data=data,
        backups=backups,
        keep_last=keep_last,
        keep_daily=keep_daily,
        keep_weekly=keep_weekly,
        dry_run=dry_run,
        confirm=confirm,
        keep_safety=keep_safety,
    )


@app.function(image=image, **options)
def export_archive(snapshot: str, name: str, partial: bool = False) -> dict:
    """Write a snapshot as /backups/transfer/NAME (a .tar.gz) for `tabby-modal export` to download."""
    return maintenance.run(
        "export_archive", data=data, backups=backups, snapshot=snapshot, name=name, partial=partial
    )


@app.function(image=image, **options)
def import_archive(name: str, label: str = "import") -> dict:
    """Store /backups/transfer/NAME, uploaded by `tabby-modal import`, as a snapshot; then delete it."""
    return maintenance.run("import_archive", data=data, backups=backups, name=name, label=label)


# Daily by default (TABBY_MODAL_BACKUP_SCHEDULE, UTC; empty switches it off). Schedules run for deployed apps.
@app.function(image=image, schedule=maintenance.schedule(settings), **options)
def scheduled_backup() -> dict:
    """Snapshot with the label `scheduled`, then prune by the retention settings."""
    return maintenance.run("scheduled_backup", data=data, backups=backups)


# Warm hours (TABBY_MODAL_WARM_HOURS; empty = no schedule): every 5 minutes, set the server's min_containers to what
# the hours say now (1 inside, 0 outside). A server deploy resets it; the next run sets it again.
@app.function(image=image, schedule=warm.schedule(settings), **warm.function_options(settings))
def warm_hours() -> dict:
    """Keep one server container warm inside the warm hours, none outside (Modal's update_autoscaler)."""
    return warm.run_scheduled()
