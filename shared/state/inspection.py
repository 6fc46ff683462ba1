"""What is in a data dir (or a snapshot): per top-level dir sizes, the database's contents, persist age, store size.

The database is never opened where it lies (on Modal that is the mounted Volume, where even a read-only open of a
WAL database writes `-shm`): it is copied to a temp dir first and inspected there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.state import database, mirror
from shared.state.atomic import write_stream
from shared.state.errors import StateError
from shared.state.mirror.packed import holdings, pack_files
from shared.state.store import Store, blob_name


def _dirs(entries: dict[str, tuple[int, bool]]) -> dict[str, dict[str, int]]:
    """Files and bytes per top-level directory; files at the top are under '.'."""
    out: dict[str, dict[str, int]] = {}
    for path, (size, _) in sorted(entries.items()):
        top = path.split("/", 1)[0] if "/" in path else "."
        d = out.setdefault(top, {"files": 0, "bytes": 0})
        d["files"] += 1
        d["bytes"] += size
    return out


def _inodes(root: Path) -> int:
    """Files, links and directories under `root` (Volumes limit inodes, ours included)."""
    n = 0
    for _, dirs, files in os.walk(root):
        n += len(dirs) + len(files)
    return n


def _db_of_data_dir(data_dir: Path) -> dict[str, Any]:
    path = next((data_dir / p for p in database.DB_PATHS if (data_dir / p).is_file()), None)
    if path is None:
        return database.absent()
    with tempfile.TemporaryDirectory(prefix="tabby-modal-inspect-") as work:
        copy = Path(work) / "db.sqlite"
        try:
            database.backup(path, copy, private_copy=True, check="none", durable=False)
        except StateError:
            shutil.copyfile(path, copy)  # unreadable through SQLite: inspect the raw bytes to report why
        out = database.inspect_file(copy)
    return {"path": path.relative_to(data_dir).as_posix(), **out}


def _age(t: float, now: float) -> dict[str, Any]:
    return {"time": mirror.iso(t), "age_seconds": round(now - t, 1)}


def inspect(
    data_dir: Path, store: Store | None = None, snapshot_id: str | None = None, *, now: float | None = None
) -> dict[str, Any]:
    """Report on a data dir, or on one snapshot of `store`.

    Keys: `db` {integrity, users, owner (id 1, admin), tables, schema_version, migrations, ...}, `dirs`
    {top: {files, bytes}}, `files`, `bytes` (what the data dir holds, packed or plain), `inodes` (files, links and
    directories really on the Volume), `packs` (how many), `last_persist` {time, age_seconds, ...} or None,
    `snapshots` {count, bytes, blobs, newest}; and `interrupted` {op, target, scope, safety, running, describe,
    next} when an unfinished restore or reset left its marker (the tree is then no state at all).
    """
    now = time.time() if now is None else now
    snapshots = store.stats() if store is not None else None
    if snapshot_id is not None:
        if store is None:
            raise StateError("inspecting a snapshot needs a store")
        return {**_inspect_snapshot(store, snapshot_id, now), "snapshots": snapshots}
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise StateError(f"data dir {data_dir} does not exist")
    try:
        manifest = mirror.load_manifest(data_dir)
        manifest_problem = None
    except StateError as err:
        manifest, manifest_problem = None, str(err)
    pending = mirror.pending_info(data_dir)
    # What the data dir holds (most small files live in packs, which a scan does not see as files).
    held = holdings(data_dir, manifest, pending is not None)
    last = None
    if manifest is not None:
        last = {**_age(manifest.time_unix, now), "seq": manifest.seq, "origin": manifest.origin}
    if last is not None or pending is not None:
        last = {**(last or {}), "pending": pending is not None}
    out = {
        "source": "data",
        "data_dir": str(data_dir),
        "dirs": _dirs({p: (e.size, e.link is not None) for p, e in held.items()}),
        "files": len(held),
        "bytes": sum(e.size for e in held.values()),
        "inodes": _inodes(data_dir),
        "packs": len(pack_files(data_dir)),
        "db": _db_of_data_dir(data_dir),
        "last_persist": last,
        "snapshots": snapshots,
    }
    if manifest_problem:
        out["manifest_problem"] = manifest_problem
    if pending is not None and pending.get("op") in mirror.BLOCKING_OPS:
        # Whatever the database says, this tree is a mix of two states until a restore finishes the job.
        out["interrupted"] = {
            "op": pending.get("op"),
            "target": pending.get("target"),
            "scope": pending.get("scope"),
            "safety": pending.get("safety"),
            "running": mirror.pending_alive(pending),
            "describe": mirror.describe_change(pending),
            "next": mirror.next_step(pending),
            **dict(zip(("finish", "rollback"), mirror.finish_commands(pending), strict=True)),
        }
    return out


def _inspect_snapshot(store: Store, snapshot_id: str, now: float) -> dict[str, Any]:
    snap = store.load(snapshot_id)
    db: dict[str, Any] = database.absent()
    path = next((p for p in database.DB_PATHS if p in snap.files and snap.files[p].link is None), None)
    if path is not None:
        e = snap.files[path]
        with tempfile.TemporaryDirectory(prefix="tabby-modal-inspect-") as work:
            copy = Path(work) / "db.sqlite"
            with store.backend.read(blob_name(e.sha256 or "")) as f:
                write_stream(copy, f, durable=False)
            db = {"path": path, **database.inspect_file(copy)}
    dirs: set[str] = set()
    for p in snap.files:
        parts = p.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    source = snap.doc.get("source") or {}
    persisted = source.get("persist_time")
    return {
        "source": "snapshot",
        "snapshot": snap.id,
        "consistency": snap.consistency,
        "dirs": _dirs({p: (e.size, e.link is not None) for p, e in snap.files.items()}),
        "files": len(snap.files),
        "bytes": snap.bytes,
        "inodes": len(snap.files) + len(dirs),
        "db": db,
        "last_persist": {"time": persisted, "snapshot_time": mirror.iso(snap.time_unix)}
        if persisted
        else None,
        "snapshot_age": _age(snap.time_unix, now),
    }
