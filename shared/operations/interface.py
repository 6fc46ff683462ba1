"""`Operations`: the state operations every form offers, whatever runs them.

Two forms implement it: `shared.operations.maintenance.Maintenance` (the rules over two directories: `--local DIR`
on this machine, the mounted Volumes in the maintenance app on Modal) and `shared.operations.remote.RemoteOps` (the
deployed maintenance app, called from here). `shared.operations.forms.open_ops()` picks one for the CLI. Results
are JSON-serialisable dicts; refusals are `StateError` (one line). tests/test_operations_interface.py checks that
each form has every method with a compatible signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Operations(Protocol):
    """What `tabby-modal`'s state commands call; a form may accept more (optional) arguments than these."""

    def persist(self, root: Path) -> dict[str, Any]:
        """Mirror the live root `root` into the data dir (the remote form refuses: the server persists there)."""
        ...

    def hydrate(self, root: Path) -> dict[str, Any]:
        """Lay the data dir's last persisted state down at `root` (the remote form refuses, as for persist)."""
        ...

    def snapshot(self, label: str = "manual") -> dict[str, Any]:
        """{id, label, time, files, bytes, new_blobs, new_bytes, consistency, databases, seconds}."""
        ...

    def snapshots(self) -> dict[str, Any]:
        """{snapshots: [{id, label, time, consistency, files, bytes} or {id, problem}], count, blobs, bytes}."""
        ...

    def verify(self, snapshot_id: str | None = None, sample: float | None = None) -> dict[str, Any]:
        """{ok, problems: [{snapshot, path, problem}], snapshots, blobs, blobs_checked, ...}."""
        ...

    def inspect(self, snapshot_id: str | None = None) -> dict[str, Any]:
        """{db, dirs, files, bytes, inodes, last_persist, snapshots, locks, ...} of the data dir or a snapshot."""
        ...

    def restore(
        self, snapshot_id: str, force: bool = False, confirm: str = "", partial: bool = False
    ) -> dict[str, Any]:
        """{restored, files, bytes, safety_snapshot, left_out, skipped_newer, seconds}."""
        ...

    def repair(self, dry_run: bool = False, confirm: str = "") -> dict[str, Any]:
        """{dry_run, corrupt_blobs, stored_again, packs_rewritten, lost: {snapshot: [path]}, ...}."""
        ...

    def reset(self, scope: str, force: bool = False, confirm: str = "") -> dict[str, Any]:
        """{scope, removed_files, removed_bytes, files_left, safety_snapshot, seconds}."""
        ...

    def prune(
        self,
        keep_last: int,
        keep_daily: int,
        keep_weekly: int,
        dry_run: bool = False,
        confirm: str = "",
        keep_safety: int = ...,
    ) -> dict[str, Any]:
        """{dry_run, kept, removed, blobs_removed, bytes_freed, ...}."""
        ...

    def export_archive(
        self, snapshot_id: str, out: Path, *, overwrite: bool = False, partial: bool = False
    ) -> dict[str, Any]:
        """Write a snapshot as a .tar.gz at `out` (on this machine, whichever form runs it)."""
        ...

    def import_archive(self, path: Path, label: str = "import") -> dict[str, Any]:
        """Store a .tar(.gz) of a Tabby root (a file on this machine) as a new snapshot."""
        ...

    def locks_status(self) -> dict[str, Any]:
        """Both leases and the store's lock file: {key: record with live/why/describe, store_file: ...}."""
        ...

    def unlock(self, force: bool = False) -> dict[str, Any]:
        """Break the leases and lock file whose holders are gone (`force`: the live ones too)."""
        ...
