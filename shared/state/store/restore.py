"""Restore a snapshot into a data dir, or reset part of one, each after a safety snapshot and refused while a
server may be persisting into it.

Before its first change to the data dir each writes a durable pending marker naming what it does (`op`, the
`target` snapshot or the `scope`, the `safety` snapshot); it is cleared only once the new state is whole and
described. An interrupted run leaves the marker: hydrate, persist and snapshot refuse that data dir, inspect and
status name it, and the next restore (any snapshot: the target finishes the job, the safety snapshot goes back) or
the same reset takes it over, keeping the first run's safety snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from shared.state import database, fault_points, mirror
from shared.state.atomic import ensure_dir, fsync_dir, make_link, read_upto, sync_fs, write_private
from shared.state.errors import HashMismatch, StateError
from shared.state.interruption import worker_pool
from shared.state.mirror import Entry
from shared.state.mirror.packed import (
    PACKS_DIR,
    PackSink,
    batches,
    pack_file,
    pack_files,
    packable,
    tree_view,
)
from shared.state.paths import inside
from shared.state.store.core import Snapshot, StoreCore
from shared.state.store.snapshotting import take
from shared.state.store.verify import verify

SCOPES = {"all": ("",), "auth": ("ee/",), "index": ("index/", "repositories/")}
TMP_STAGING = "-staging-"


def _guard(store: StoreCore, data_dir: Path, action: str, force: bool) -> None:
    """Refuse to change a data dir that a live run on this host is writing (its pending marker), unless forced.
    Whether a server runs is the caller's question: Modal's container count, or DIR's serve lock locally
    (shared.operations.maintenance); a guess from the age of the last persist was wrong both ways."""
    if force or not data_dir.is_dir():
        return
    pending = mirror.pending_info(data_dir)
    if pending and mirror.pending_alive(pending):
        raise StateError(
            f"refused: {action}: a {pending.get('op')} is running in {data_dir} (pid {pending.get('pid')})"
        )


def _holds_nothing(data_dir: Path) -> bool:
    """No file at all: no plain file, and no manifest naming packed ones (an unreadable manifest may name some)."""
    if not data_dir.is_dir():
        return True
    if mirror.scan(data_dir):
        return False
    try:
        manifest = mirror.load_manifest(data_dir, copy=False)
    except StateError:
        return False
    return manifest is None or not manifest.files


def _safety(store: StoreCore, data_dir: Path, label: str, force: bool) -> str | None:
    if _holds_nothing(data_dir):
        return None
    try:
        return take(store, data_dir, label)["id"]
    except StateError as err:
        if force:
            return None
        raise StateError(
            f"refused: the safety snapshot failed ({err}); pass --force to go on without"
        ) from None


HINT = (
    "`--partial` restores what is intact and names every file it leaves out; `tabby-modal repair` drops the "
    "corrupt blobs from the store (storing again those the data dir still has) and reports which snapshots lost "
    "which files (see docs/recovery.md)"
)


def left_out(snap: Snapshot, problems: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The files a partial restore or export leaves out: those with a problem, and those a repair dropped from
    the manifest (its `repaired.lost`). StateError when a problem is not about one file (an unreadable manifest)."""
    out: dict[str, str] = {}
    for pr in problems:
        if pr["path"] not in snap.files:
            raise StateError(f"refused: snapshot {snap.id}: {pr['path']}: {pr['problem']}")
        out.setdefault(pr["path"], pr["problem"])
    for p in (snap.doc.get("repaired") or {}).get("lost") or []:
        out.setdefault(str(p), "lost in a repair (its blob was corrupt)")
    return [{"path": p, "problem": why} for p, why in sorted(out.items())]


def without(snap: Snapshot, paths: set[str]) -> Snapshot:
    """`snap` less some files (what a partial restore lays down)."""
    files = {p: e for p, e in snap.files.items() if p not in paths}
    dbs = {p: c for p, c in snap.databases.items() if p in files}
    return Snapshot(snap.id, snap.label, snap.time_unix, snap.consistency, files, dbs, snap.doc)


def restore(
    store: StoreCore,
    snapshot_id: str,
    data_dir: Path,
    *,
    force: bool = False,
    guard: bool = True,
    partial: bool = False,
) -> dict[str, Any]:
    """Replace the data dir's content with a snapshot.

    The snapshot is verified first (any problem refuses the restore with nothing written), then a safety
    snapshot of the current data dir is taken, the files are laid out in a staging dir and checked, moved into
    place, files not in the snapshot removed (with stale SQLite `-wal`/`-shm`), and a fresh persist manifest
    written. `force` skips the running-server guard and a failing safety snapshot. With `partial`, files whose
    blobs are corrupt or missing are left out (and named in `left_out`), the database laid down first; never
    without its database (a data dir without it would start as a fresh instance). `latest` names the newer
    snapshots it skipped (`skipped_newer`).
    """
    started = time.monotonic()
    data_dir = Path(data_dir)
    sid, skipped = store.resolve_noting(snapshot_id)
    snap = store.load(sid)
    if guard:  # off when the caller knows better (the maintenance app asks Modal whether a server runs)
        _guard(store, data_dir, "restore", force)
    with store.lock("restore"):
        report = verify(store, sid)
        missing = left_out(snap, report["problems"])
        if missing and not partial:
            first = report["problems"][0] if report["problems"] else missing[0]
            more = max(len(report["problems"]), len(missing)) - 1
            raise StateError(
                f"refused: snapshot {sid} fails verification: {first['path']}: {first['problem']}"
                + (f" (+{more} more)" if more else "")
                + f"; {HINT}"
            )
        dbs = [m["path"] for m in missing if m["path"] in database.DB_PATHS]
        if dbs:
            raise StateError(
                f"refused: the database {dbs[0]} of snapshot {sid} is not intact, and a restore without it "
                "would start a fresh instance: restore an older snapshot, or `tabby-modal export --partial` "
                "to take the rest"
            )
        snap = without(snap, {m["path"] for m in missing})
        prior = _unfinished(data_dir)
        # Finishing an interrupted restore or reset: the data dir is a mix, and the state before it is already in
        # that run's safety snapshot, which stays the one to go back to.
        safety = prior.get("safety") if prior else _safety(store, data_dir, "pre-restore", force)
        _lay_down(store, snap, data_dir, safety)
    return {
        "restored": sid,
        "files": len(snap.files),
        "bytes": snap.bytes,
        "safety_snapshot": safety,
        "left_out": missing,
        "skipped_newer": skipped,
        "finished": _finished(prior),
        "seconds": round(time.monotonic() - started, 4),
    }


def _unfinished(data_dir: Path) -> dict[str, Any] | None:
    """The marker of an interrupted restore or reset this run takes over (a running one was refused by _guard)."""
    return mirror.unfinished_change(data_dir) if data_dir.is_dir() else None


def _finished(prior: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: prior.get(k) for k in ("op", "target", "scope", "safety")} if prior else None


def _lay_down(store: StoreCore, snap: Snapshot, data_dir: Path, safety: str | None) -> None:
    """Lay `snap` down in a staging dir (small files into packs, the rest as files), one barrier, then swap it in
    under the writer lock after the durable pending marker: packs renamed in (no manifest names them yet), plain
    files renamed over their paths, plain files the snapshot does not have as such removed, the new manifest
    (naming the packed files), then the packs it does not name deleted and the marker cleared."""
    ensure_dir(data_dir)
    meta = data_dir / mirror.META_DIR
    for old in meta.glob(f"restore{TMP_STAGING}*") if meta.is_dir() else []:
        shutil.rmtree(old, ignore_errors=True)
    staging = meta / f"restore{TMP_STAGING}{secrets.token_hex(4)}"
    tree = staging / "tree"  # the plain files, at their paths; the sink's packs go to staging/packs
    sink = PackSink(staging)
    prog = store.progress("restore")
    prog.set_totals(len(snap.files), snap.bytes)
    cat = store.catalog()
    plain = {p: e for p, e in snap.files.items() if e.link is not None or not packable(p, e.size)}
    small = sorted((e for p, e in snap.files.items() if p not in plain), key=lambda e: e.path)
    try:
        ensure_dir(staging)

        def lay(e: Entry) -> None:
            dst = tree / e.path
            if e.link is not None:
                make_link(dst, e.link, durable=False)
                return
            with store.read_blob(cat, e.sha256) as f:
                write_private(dst, f, expect_sha256=e.sha256, mode=e.mode, mtime_ns=e.mtime_ns)
            prog.add(1, e.size)

        def pack(batch: list[Entry]) -> list[Entry]:
            # Each blob is hashed as it goes into the pack: the restore never reads what it wrote a second time.
            out = []
            for e in batch:
                with store.read_blob(cat, e.sha256) as f:
                    data = read_upto(f, e.size + 1)
                if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
                    raise HashMismatch(f"{e.path}: stored blob is corrupt")
                pack_id, off = sink.add(e.sha256 or "", data)
                out.append(replace(e, racy=False, pack=pack_id, offset=off))
            prog.add(len(batch), sum(e.size for e in batch))
            return out

        for d in sorted({os.path.dirname(p) for p in plain} - {""}):
            (tree / d).mkdir(parents=True, exist_ok=True)
        tree.mkdir(exist_ok=True)
        first = sorted(plain.values(), key=lambda e: e.path not in database.DB_PATHS)  # the database first
        packed: dict[str, Entry] = {}
        # Small blobs on one thread beside the pool's large files: a few short system calls each, and threads
        # trading the GIL after every one of them are slower than one thread (see mirror/persist.py).
        with worker_pool(mirror.WORKERS) as pool, worker_pool(1) as one:
            small_done = one.map(pack, batches(small, lambda e: e.size))
            list(pool.map(lay, first))
            for got in small_done:
                packed.update((e.path, e) for e in got)
        done = sink.finish()
        sync_fs(data_dir)  # one barrier for the packs and the staging tree before anything is swapped in
        for p, e in plain.items():
            if e.link is not None and not inside(tree, tree / p):
                raise StateError(f"refused: link {p} leaves the root")
        checks = {p: database.check_file(tree / p, "quick") for p in snap.databases if p in plain}
        for p, c in checks.items():
            if c != "ok":
                raise StateError(f"refused: {p} fails quick_check after staging ({c})")
        # From here the data dir changes, under its writer lock (a persist pass running now ends first, the next one
        # sees the new epoch); the pending marker tells readers it is mid-way.
        # The marker is durable before the first change and names the target and the safety snapshot: whatever
        # stops this run from here on (kill -9, Ctrl-C, a lost container), every reader refuses the mix and names
        # `restore <target>` (finish) or `restore <safety>` (go back), and only a restore clears it.
        with mirror.writing(data_dir):
            fault_points.reached("restore")
            mirror.write_pending(data_dir, "restore", target=snap.id, safety=safety)
            existing = mirror.scan(data_dir)
            for p in database.DB_PATHS:
                for side in database.sidecars(data_dir / p):
                    side.unlink(missing_ok=True)
            # The packs: invisible until the manifest names them (a run that dies here leaves orphans, removed
            # by the restore that finishes the job).
            if done:
                folder = data_dir / PACKS_DIR
                ensure_dir(folder)
                for pack_id, (tmp, _) in done.items():
                    os.replace(tmp, pack_file(data_dir, pack_id))
                fsync_dir(folder)
            touched = set()
            for p in sorted(plain):
                fault_points.reached("restore")
                mirror.clear_way(data_dir, p)
                ensure_dir((data_dir / p).parent)
                os.replace(tree / p, data_dir / p)
                touched.add((data_dir / p).parent)
            # Plain files the snapshot does not have as plain files: gone from it, or packed now.
            gone = [p for p in existing if p not in plain]
            for p in gone:
                fault_points.reached("restore")
                mirror.remove(data_dir, p)
            mirror.prune_empty_dirs(data_dir, gone)
            for d in touched:
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(d)
            fault_points.reached("restore")
            mirror.rebuild_manifest(data_dir, origin="restore", known=plain, checks=checks, packed=packed)
    finally:
        sink.abort()  # packs not renamed in (a failed run); the renamed ones are no longer where it looks
        shutil.rmtree(staging, ignore_errors=True)
    prog.finish()


def _reset_finishes(prior: dict[str, Any], scope: str) -> bool:
    """A reset finishes an interrupted reset of the same scope (or `all`); a half-done restore needs a restore."""
    return prior.get("op") == "reset" and scope in (prior.get("scope"), "all")


def reset(
    store: StoreCore, data_dir: Path, scope: str, *, force: bool = False, guard: bool = True
) -> dict[str, Any]:
    """Delete part of a data dir after a safety snapshot: `all`, `auth` (`ee/`: users, tokens, settings) or
    `index` (`index/`, `repositories/`). A fresh persist manifest describes what is left."""
    if scope not in SCOPES:
        raise StateError(f"unknown scope {scope!r} (all, auth or index)")
    started = time.monotonic()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise StateError(f"data dir {data_dir} does not exist")
    if guard:
        _guard(store, data_dir, "reset", force)
    with store.lock("reset"):
        prior = _unfinished(data_dir)
        if prior and not _reset_finishes(prior, scope):
            raise mirror.InterruptedChange(data_dir, prior, f"reset --scope {scope}")
        safety = prior.get("safety") if prior else _safety(store, data_dir, f"pre-reset-{scope}", force)
        prefixes = SCOPES[scope]
        with mirror.writing(data_dir):  # see _lay_down; what the data dir holds is read under the lock too
            try:
                manifest = mirror.load_manifest(data_dir)
            except StateError as err:
                # It may name packed files outside the scope: a manifest written without them would lose them.
                raise StateError(f"refused: reset: {err}; restore a snapshot instead") from None
            # Packed files under the scope simply leave the manifest (their packs go once no manifest names them).
            packed = {p: e for p, e in tree_view(data_dir, manifest).items() if e.pack is not None}
            kept = {p: e for p, e in packed.items() if not p.startswith(prefixes)}
            lacking = sorted({e.pack or "" for e in kept.values()} - set(pack_files(data_dir)))
            if lacking:
                raise StateError(
                    f"refused: reset: pack {lacking[0]} that the persist manifest names is missing from "
                    f"{data_dir}; restore a snapshot instead"
                )
            doomed = [p for p in mirror.scan(data_dir) if p.startswith(prefixes)]
            dropped = {p: e for p, e in packed.items() if p not in kept}
            freed = sum(e.size for p, e in dropped.items() if p not in doomed)
            fault_points.reached("reset")
            mirror.write_pending(data_dir, "reset", scope=scope, safety=safety)
            if scope in ("all", "auth"):
                for p in database.DB_PATHS:
                    for side in database.sidecars(data_dir / p):
                        side.unlink(missing_ok=True)
            for p in doomed:
                fault_points.reached("reset")
                freed += mirror.remove(data_dir, p)
            mirror.prune_empty_dirs(data_dir, doomed)
            fault_points.reached("reset")
            left = mirror.rebuild_manifest(data_dir, origin="reset", packed=kept)
    return {
        "scope": scope,
        "removed_files": len({*doomed, *dropped}),
        "removed_bytes": freed,
        "files_left": len(left.files),
        "safety_snapshot": safety,
        "finished": _finished(prior),
        "seconds": round(time.monotonic() - started, 4),
    }
