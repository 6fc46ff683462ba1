"""The snapshot store (the backups Volume): deduplicated, verified, point-in-time copies of a data dir.

Layout, behind a small storage interface (`backend.Backend`; `DirectoryBackend` for a local folder or a mounted Volume):

    packs/ab/<id>              small blobs (< PACK_BLOB_MAX) appended one after another, then an index of them
    blobs/ab/<sha256>          large blobs and databases, one file each
    snapshots/<id>.json        one manifest per snapshot, written atomically after all of its blobs
    lock.json                  the store lock (shared.state.locks.store_lock), outside the Backend

Every blob is content-addressed by its sha256, wherever it lives, and stored once across snapshots. Databases stay
single files, so a drill or `inspect` reads them directly. A crash leaves orphan packs/blobs and temp files
(`.*.tmtmp-*`) for prune, never a manifest naming a missing blob. Manifests are validated before use: a path that is
absolute, has `..`, is listed twice, or a link leaving the root makes the whole snapshot refused, with nothing
written. Stores written before packs existed (every blob under `blobs/`) are read as they are.

The modules, bottom up: `packs` (the pack format), `backend` (where objects live), `core` (the read side: catalog,
manifests, listing, `iter_files`), then one per operation: `snapshotting`, `verify`, `restore` (and reset), `prune`.
`Store` below is their face: `Store.open(root).snapshot(data_dir)`.

For export/import (shared/state/archive.py) the store offers a streaming read, `iter_files()`, and two ways in:
`add_tree()` (a directory such as an extracted plain Tabby root) and `import_entries()` (a stream of entries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from shared.state.locks.store_lock import StoreLock
from shared.state.mirror import Entry
from shared.state.progress import Progress
from shared.state.store import prune, repair, restore, snapshotting, verify
from shared.state.store.backend import Backend, DirectoryBackend, blob_name, snapshot_name
from shared.state.store.core import Catalog, Snapshot, StoreCore, UnknownSnapshot

__all__ = [
    "Backend",
    "Catalog",
    "DirectoryBackend",
    "Snapshot",
    "Store",
    "UnknownSnapshot",
    "blob_name",
    "snapshot_name",
]


class Store(StoreCore):
    """Snapshots of data dirs in a Backend: the read side (`StoreCore`) and every operation. Mutating calls hold the
    store lock; reads do not need it. Each operation is documented where it is written."""

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        lock_ttl: float = 3600,
        lock_wait: float = 30.0,
        progress: Callable[[str], Progress] | None = None,
    ) -> Store:
        """A store in directory `root`, locked with a lock file in that directory."""
        root = Path(root)
        return cls(
            DirectoryBackend(root),
            lock=lambda op: StoreLock(root, op, ttl=lock_ttl, wait=lock_wait),
            progress=progress,
        )

    def snapshot(self, data_dir: Path, label: str = "manual") -> dict[str, Any]:
        """Snapshot a data dir (see `snapshotting.snapshot`)."""
        return snapshotting.snapshot(self, data_dir, label)

    def add_tree(self, root: Path, label: str = "import") -> dict[str, Any]:
        """Snapshot any Tabby-like directory as it stands (see `snapshotting.add_tree`)."""
        return snapshotting.add_tree(self, root, label)

    def import_entries(
        self,
        entries: Iterable[tuple[Entry, IO[bytes] | None]],
        *,
        label: str = "import",
        time_unix: float | None = None,
    ) -> dict[str, Any]:
        """A snapshot from a stream of (entry, reader) pairs (see `snapshotting.import_entries`)."""
        return snapshotting.import_entries(self, entries, label=label, time_unix=time_unix)

    def verify(self, snapshot_id: str | None = None, sample: float | None = None) -> dict[str, Any]:
        """Check one snapshot or all (see `verify.verify`)."""
        return verify.verify(self, snapshot_id, sample)

    def restore(
        self,
        snapshot_id: str,
        data_dir: Path,
        *,
        force: bool = False,
        guard: bool = True,
        partial: bool = False,
    ) -> dict[str, Any]:
        """Replace a data dir's content with a snapshot (see `restore.restore`)."""
        return restore.restore(self, snapshot_id, data_dir, force=force, guard=guard, partial=partial)

    def reset(self, data_dir: Path, scope: str, *, force: bool = False, guard: bool = True) -> dict[str, Any]:
        """Delete part of a data dir after a safety snapshot (see `restore.reset`)."""
        return restore.reset(self, data_dir, scope, force=force, guard=guard)

    @staticmethod
    def plan(
        snaps: list[Snapshot],
        keep_last: int,
        keep_daily: int,
        keep_weekly: int,
        keep_safety: int = prune.KEEP_SAFETY,
        pinned: frozenset[str] = frozenset(),
    ) -> set[str]:
        """Ids the retention rules keep (see `prune.plan`)."""
        return prune.plan(snaps, keep_last, keep_daily, keep_weekly, keep_safety, pinned)

    def prune(
        self,
        keep_last: int,
        keep_daily: int,
        keep_weekly: int,
        *,
        dry_run: bool = False,
        keep_safety: int = prune.KEEP_SAFETY,
        pinned: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """Forget snapshots outside the retention rules, then delete what no kept snapshot names (see `prune.prune`)."""
        return prune.prune(
            self, keep_last, keep_daily, keep_weekly, dry_run=dry_run, keep_safety=keep_safety, pinned=pinned
        )

    def repair(self, data_dir: Path, *, dry_run: bool = False) -> dict[str, Any]:
        """Drop corrupt blobs, store again those `data_dir` still has, report what each snapshot lost (see
        `repair.repair`)."""
        return repair.repair(self, Path(data_dir), dry_run=dry_run)
