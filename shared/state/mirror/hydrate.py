"""Hydrate: lay the data dir's last persisted state down at the live root, checked in a staging dir before the
live root is touched.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from shared.state import database
from shared.state.atomic import (
    TMP_MARK,
    current_umask,
    read_small,
    write_new_bytes,
    write_new_files,
    write_private,
)
from shared.state.errors import HashMismatch, StateError
from shared.state.interruption import worker_pool
from shared.state.mirror.manifest import (
    Entry,
    load_manifest,
    pending_info,
    refuse_unfinished,
)
from shared.state.mirror.packed import batches, by_pack, pack_file, read_slices, tree_view
from shared.state.mirror.scan import (
    WORKERS,
    clear_way,
    prune_empty_dirs,
    remove,
    scan,
)
from shared.state.paths import check_tree, inside
from shared.state.progress import Progress, silent

SMALL_FILE = 1 << 20  # hydrate reads a file below this size whole, then writes it in one go


def _staging_for(live_root: Path) -> Path:
    # Beside the live root (same filesystem, so the final move is a rename), unless the root is a mount point.
    base = live_root if os.path.ismount(live_root) else live_root.parent
    return base / f".{live_root.name}{TMP_MARK}hydrate-{secrets.token_hex(4)}"


def hydrate(data_dir: Path, live_root: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Lay the last persisted state down at `live_root`, checked against the persist manifest.

    Everything is copied into a staging dir and checked (hashes, links, the database's quick_check) before
    `live_root` is touched; any failure raises StateError and leaves `live_root` as it was. An empty data dir is a
    fresh instance (`fresh: True`). With a pending marker (an interrupted persist) the data dir is taken as it
    stands: every file in it is whole, and the database is checked. An unfinished restore or reset (its marker) is
    refused: InterruptedChange names the command that finishes it. Files in `live_root` that the state does not
    have are removed, and so are stale SQLite sidecars; `models/` and lock files are left alone.
    """
    data_dir, live_root = Path(data_dir), Path(live_root)
    started = time.monotonic()
    if data_dir.is_dir():
        refuse_unfinished(data_dir, "hydrate")  # a half-done restore or reset is no state to serve
    manifest = load_manifest(data_dir, copy=False) if data_dir.is_dir() else None
    pending = pending_info(data_dir) if data_dir.is_dir() else None
    if manifest is not None and pending is None:
        entries = manifest.files
        checked = "manifest"
    else:
        entries = tree_view(data_dir, manifest) if data_dir.is_dir() else {}
        try:
            check_tree(entries, {p: e.link for p, e in entries.items() if e.link is not None})
        except StateError as err:
            raise StateError(f"hydrate refused: data dir: {err}") from None
        checked = "tree"
    epoch = manifest.epoch if manifest else None
    seq = manifest.seq if manifest else 0  # what persist(seq=...) expects to find there next
    if not entries:
        live_root.mkdir(parents=True, exist_ok=True)
        return {
            "fresh": True,
            "files": 0,
            "bytes": 0,
            "checked": checked,
            "epoch": epoch,
            "seq": seq,
            "databases": {},
        }

    prog = progress or silent()
    prog.set_totals(len(entries), sum(e.size for e in entries.values()))
    staging = _staging_for(live_root)
    staging.mkdir(parents=True)
    umask = current_umask()
    try:

        def lay(e: Entry) -> None:
            dst = staging / e.path
            if e.link is not None:
                os.symlink(e.link, dst)
                return
            src = data_dir / e.path
            if checked == "tree" and e.path in database.DB_PATHS:
                # A plain root may hold a WAL database: copy it the consistent way.
                database.backup(src, dst, private_copy=True, check="none", durable=False)
            elif e.size < SMALL_FILE and (data := read_small(src, e.size)) is not None:
                # One read, the hash from memory, one write: most of a Tabby root is small index files.
                if e.sha256 is not None and hashlib.sha256(data).hexdigest() != e.sha256:
                    raise HashMismatch(e.path)
                write_new_bytes(dst, data, mode=e.mode, mtime_ns=e.mtime_ns, umask=umask)
            else:
                with open(src, "rb", buffering=0) as f:
                    write_private(dst, f, expect_sha256=e.sha256, mode=e.mode, mtime_ns=e.mtime_ns)

        def lay_pack(group: list[Entry]) -> None:
            # One task per pack, its slices in order: one open, sequential reads, every slice's hash checked
            # before its file is created.
            fd = os.open(pack_file(data_dir, group[0].pack or ""), os.O_RDONLY | os.O_CLOEXEC)
            try:
                write_new_files(
                    staging,
                    ((e.path, data, e.mode, e.mtime_ns) for e, data in read_slices(fd, group)),
                    umask=umask,
                )
            finally:
                os.close(fd)
            prog.add(len(group), sum(e.size for e in group))

        def run(task: tuple[str, list[Entry]]) -> None:
            kind, group = task
            e = group[0]
            try:
                if kind == "pack":
                    lay_pack(group)
                    return
                for e in group:
                    lay(e)
                prog.add(len(group), sum(e.size for e in group))
            except HashMismatch:
                raise StateError(
                    f"hydrate refused: {e.path} does not match the persist manifest; live root untouched"
                ) from None
            except FileNotFoundError:
                where = f"its pack {e.pack}" if kind == "pack" else "it"
                raise StateError(
                    f"hydrate refused: {e.path} is in the persist manifest but {where} is missing; "
                    "live root untouched"
                ) from None

        for d in sorted({posixpath.dirname(p) for p in entries} - {""}):
            (staging / d).mkdir(parents=True, exist_ok=True)
        tasks: list[tuple[str, list[Entry]]] = [("pack", g) for g in by_pack(entries).values()]
        tasks += [
            ("plain", b)
            for b in batches(
                sorted((e for e in entries.values() if e.pack is None), key=lambda e: e.path),
                lambda e: e.size,
            )
        ]
        tasks.sort(key=lambda t: -sum(e.size for e in t[1]))  # the biggest first: the pool ends together
        with worker_pool(WORKERS) as pool:
            list(pool.map(run, tasks))
        for p, e in entries.items():
            if e.link is not None and not inside(staging, staging / p):
                raise StateError(f"hydrate refused: link {p} leaves the root; live root untouched")
        checks = {}
        for p in database.DB_PATHS:
            if p in entries and entries[p].link is None:
                checks[p] = database.check_file(staging / p, "quick")
                if checks[p] != "ok":
                    raise StateError(
                        f"hydrate refused: {p} fails quick_check ({checks[p]}); live root untouched"
                    )
        _swap_in(staging, live_root, entries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prog.finish()
    return {
        "fresh": False,
        "files": len(entries),
        "bytes": sum(e.size for e in entries.values()),
        "checked": checked,
        "epoch": epoch,
        "seq": seq,
        "databases": checks,
        "seconds": round(time.monotonic() - started, 4),
    }


def _swap_in(staging: Path, live_root: Path, entries: dict[str, Entry]) -> None:
    if live_root.is_dir() and not os.path.ismount(live_root) and not any(live_root.iterdir()):
        live_root.rmdir()
    if not live_root.exists():
        live_root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, live_root)
        return
    for p in database.DB_PATHS:
        for side in database.sidecars(live_root / p):
            side.unlink(missing_ok=True)
    existing = scan(live_root)
    for p in entries:
        clear_way(live_root, p)
        (live_root / p).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / p, live_root / p)
    gone = [p for p in existing if p not in entries]
    for p in gone:
        remove(live_root, p)
    prune_empty_dirs(live_root, gone)
