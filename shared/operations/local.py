"""One facade for Tabby's state operations, local or remote, returning JSON-serialisable dicts.

`LocalOps` works on two directories: the data dir (on Modal the `/data` Volume; locally `DIR/data`) and the
backups dir (`/backups`; locally `DIR/backups`). `shared.operations.remote.RemoteOps` offers the same methods against the
deployed maintenance app; `shared.operations.forms.open_ops()` picks one. Errors are StateError (one line, bad input or refused).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.operations import versions
from shared.state import inspection, mirror
from shared.state.progress import DEFAULT_INTERVAL, Progress
from shared.state.store import Store
from shared.state.store.prune import KEEP_SAFETY

if TYPE_CHECKING:
    pass


class LocalOps:
    """State operations on local directories (also what the maintenance app runs on its mounted Volumes)."""

    def __init__(
        self,
        data_dir: Path,
        backups_dir: Path,
        *,
        lock_ttl: float = 3600,
        lock_wait: float = 30.0,
        progress_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.backups_dir = Path(backups_dir)
        self.progress_interval = progress_interval
        self.store = Store.open(
            self.backups_dir, lock_ttl=lock_ttl, lock_wait=lock_wait, progress=self.progress
        )

    def progress(self, label: str) -> Progress:
        """A progress reporter for a long run, printing at most every `progress_interval` seconds."""
        return Progress(label, interval=self.progress_interval)

    def persist(self, root: Path, *, commit: Callable[[], None] | None = None) -> dict[str, Any]:
        """Mirror live root `root` into the data dir (see mirror.persist)."""
        return mirror.persist(Path(root), self.data_dir, commit=commit, progress=self.progress("persist"))

    def hydrate(self, root: Path) -> dict[str, Any]:
        """Lay the data dir's last persisted state down at `root` (see mirror.hydrate)."""
        return mirror.hydrate(self.data_dir, Path(root), progress=self.progress("hydrate"))

    def snapshot(self, label: str = "manual") -> dict[str, Any]:
        """{id, label, time, files, bytes, new_blobs, new_bytes, consistency, databases, seconds}."""
        return self.store.snapshot(self.data_dir, label)

    def snapshots(self) -> dict[str, Any]:
        """{snapshots: [{id, label, time, consistency, files, bytes} or {id, problem}], count, blobs, bytes}."""
        stats = self.store.stats()
        return {"snapshots": self.store.list(), **stats}

    def verify(self, snapshot_id: str | None = None, sample: float | None = None) -> dict[str, Any]:
        """{ok, problems: [{snapshot, path, problem}], snapshots, blobs, blobs_checked, ...}."""
        return self.store.verify(snapshot_id, sample)

    def restore(
        self, snapshot_id: str, force: bool = False, guard: bool = True, partial: bool = False
    ) -> dict[str, Any]:
        """{restored, files, bytes, safety_snapshot, left_out, skipped_newer, seconds}; StateError when refused
        (nothing written). `guard=False` skips the recent-persist heuristic (for callers that asked Modal whether a
        server runs); `partial` leaves out files whose blobs are corrupt (see store.restore)."""
        return self.store.restore(snapshot_id, self.data_dir, force=force, guard=guard, partial=partial)

    def prune(
        self,
        keep_last: int,
        keep_daily: int,
        keep_weekly: int,
        dry_run: bool = False,
        keep_safety: int = KEEP_SAFETY,
    ) -> dict[str, Any]:
        """{dry_run, kept, removed, blobs_removed, bytes_freed, ...}. The pre-upgrade snapshot of the last
        upgrade recorded (shared.operations.versions) is kept whatever the counts say: it is the way back."""
        current = versions.read(self.backups_dir)["current"] or {}
        pinned = frozenset({str(current["snapshot"])} if current.get("snapshot") else ())
        return self.store.prune(
            keep_last, keep_daily, keep_weekly, dry_run=dry_run, keep_safety=keep_safety, pinned=pinned
        )

    def repair(self, dry_run: bool = False) -> dict[str, Any]:
        """{dry_run, corrupt_blobs, stored_again, packs_rewritten, lost: {snapshot: [path]}, ...}: the data dir
        is where lost blobs are looked for (see store.repair)."""
        return self.store.repair(self.data_dir, dry_run=dry_run)

    def reset(self, scope: str, force: bool = False, guard: bool = True) -> dict[str, Any]:
        """{scope, removed_files, removed_bytes, files_left, safety_snapshot, seconds}."""
        return self.store.reset(self.data_dir, scope, force=force, guard=guard)

    def inspect(self, snapshot_id: str | None = None) -> dict[str, Any]:
        """{db: {integrity, users, owner, tables, schema_version}, dirs, files, bytes, inodes, last_persist,
        snapshots: {count, bytes, blobs, newest}}."""
        return inspection.inspect(self.data_dir, self.store, snapshot_id)
