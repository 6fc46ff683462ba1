"""Taking snapshots: of a data dir (from its persist manifest, or the tree as it stands), of any Tabby-like
directory (`add_tree`), or of a stream of entries (`import_entries`, e.g. a tar archive). Blobs first, the
manifest that names them last.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from shared.state import database, mirror
from shared.state.atomic import hash_file, read_small, read_upto
from shared.state.errors import HashMismatch, StateError
from shared.state.interruption import worker_pool
from shared.state.mirror import Entry
from shared.state.mirror.packed import by_pack, pack_file, read_slice, tree_view
from shared.state.packs import PACK_BLOB_MAX
from shared.state.paths import check_relpath, check_tree
from shared.state.store.backend import blob_name, snapshot_name
from shared.state.store.core import FORMAT, StoreCore, new_id
from shared.state.store.verify import drill

PENDING_WAIT = 30.0  # how long a snapshot waits for a persist running on this host to finish
BATCH_BYTES = 2 << 30  # data written between two durability barriers
PACK_TASK_BYTES = 4 << 20  # slices of one data-dir pack read by one task


def _chunks(items: list[Any], size_of: Callable[[Any], int] = lambda e: e.size) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    total = 0
    for item in items:
        chunk.append(item)
        total += size_of(item)
        if total >= BATCH_BYTES:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


class _Changed(Exception):
    """A data-dir file no longer matches its persist manifest (a persist is running): start over."""


def _loose(path: str, size: int) -> bool:
    """Stored as a file of its own: large blobs, and databases (drills and `inspect` read them directly)."""
    return size >= PACK_BLOB_MAX or path in database.DB_PATHS


def snapshot(store: StoreCore, data_dir: Path, label: str = "manual") -> dict[str, Any]:
    """Snapshot a data dir: one consistent persist (from its persist manifest), or, with no manifest (a plain
    Tabby root), the tree as it is with the database through the backup API.

    Returns {id, label, time, files, bytes, new_blobs, new_bytes, consistency, seconds}. `consistency` is
    `persist`, `direct` (no manifest) or `crash` (an interrupted persist left the data dir mid-way).
    """
    with store.lock("snapshot"):
        return take(store, Path(data_dir), label)


def add_tree(store: StoreCore, root: Path, label: str = "import") -> dict[str, Any]:
    """Snapshot any Tabby-like directory as it stands (e.g. an extracted archive of ~/.tabby); same result."""
    root = Path(root)
    if not root.is_dir():
        raise StateError(f"{root} is not a directory")
    with store.lock("import"):
        return _take_tree(store, root, label, "direct")


def import_entries(
    store: StoreCore,
    entries: Iterable[tuple[Entry, IO[bytes] | None]],
    *,
    label: str = "import",
    time_unix: float | None = None,
) -> dict[str, Any]:
    """Create a snapshot from a stream of (entry, reader) pairs, e.g. the members of a tar archive.

    Each entry needs `path`, `mode`, `mtime_ns` and `size` (checked against the bytes read) or `link`;
    `sha256`, if set, is checked too. Paths are validated as they arrive and the whole tree at the end (no
    absolute paths, `..`, duplicates, links leaving the root); SQLite sidecars are refused, lock files and
    `models/` skipped. The database gets a restore drill. On any refusal the blobs this call created are removed
    again: the store is left as it was. Returns the same dict as `snapshot()`.
    """
    started = time.monotonic()
    with store.lock("import"):
        files: dict[str, Entry] = {}
        skipped = new_blobs = new_bytes = 0
        cat = store.catalog()
        published: list[str] = []
        try:
            with store.backend.batch() as published:
                for entry, reader in entries:
                    path = check_relpath(entry.path)
                    if path in files:
                        raise StateError(f"bad path {path!r}: listed twice")
                    if mirror.excluded(path):
                        if path.endswith(database.SIDECAR_SUFFIXES):
                            raise StateError(
                                f"{path}: a SQLite sidecar; import a plain root with add_tree instead"
                            )
                        skipped += 1
                        continue
                    if entry.link is not None:
                        files[path] = Entry(path, mode=0o777, link=entry.link)
                        continue
                    if reader is None:
                        raise StateError(f"{path}: no content")
                    if _loose(path, entry.size):
                        sha, size, new = store.backend.write_content(reader, blob_name)
                    else:
                        data = read_upto(reader, entry.size + 1)
                        sha, size = hashlib.sha256(data).hexdigest(), len(data)
                        new = size == entry.size and not cat.has(sha) and store.backend.write_small(sha, data)
                    new_blobs += new
                    new_bytes += size if new else 0
                    if size != entry.size or (entry.sha256 and entry.sha256 != sha):
                        raise StateError(f"{path}: content does not match its size or sha256")
                    files[path] = Entry(path, size, entry.mtime_ns, entry.mode & 0o7777, sha)
                check_tree(files, {p: e.link for p, e in files.items() if e.link is not None})
            checks = {}
            for p in database.DB_PATHS:
                if p in files and files[p].link is None:
                    checks[p] = drill(store, files[p])
                    if checks[p] != "ok":
                        raise StateError(f"{p}: restore drill fails: {checks[p]}")
        except BaseException as err:
            for name in published:  # packs and blobs of this call only: nothing else names them
                store.backend.delete(name)
            if isinstance(err, StateError):
                said = str(err)
                raise StateError(
                    said if said.startswith("import refused") else f"import refused: {said}"
                ) from None
            raise
        out = _publish(store, files, checks, label, "import", {}, new_blobs, new_bytes, started, time_unix)
        return {**out, "skipped": skipped}


def take(store: StoreCore, data_dir: Path, label: str) -> dict[str, Any]:
    if not data_dir.is_dir():
        raise StateError(f"data dir {data_dir} does not exist")
    deadline = time.monotonic() + PENDING_WAIT
    for _ in range(3):
        manifest = mirror.load_manifest(data_dir)
        pending = mirror.pending_info(data_dir)
        while pending is not None and mirror.pending_alive(pending) and time.monotonic() < deadline:
            time.sleep(0.05)  # a persist on this host finishes within moments
            pending = mirror.pending_info(data_dir)
            manifest = mirror.load_manifest(data_dir)
        if pending is not None and pending.get("op") in mirror.BLOCKING_OPS:
            # A half-done restore or reset: a snapshot of that mix would later restore it as if it were a state.
            raise mirror.InterruptedChange(data_dir, pending, "snapshot")
        try:
            if manifest is None and pending is None:
                return _take_tree(store, data_dir, label, "direct")
            if pending is not None or manifest is None:
                return _take_tree(store, data_dir, label, "crash", manifest)
            return _take_manifest(store, data_dir, manifest, label)
        except _Changed:
            continue
    try:
        return _take_tree(store, data_dir, label, "crash", mirror.load_manifest(data_dir))
    except _Changed:
        raise StateError(
            f"{data_dir}: a pack its persist manifest names is gone or does not match (replaced by a persist while "
            "read, or damaged): retry; if this repeats, restore the data dir from a snapshot"
        ) from None


def _take_manifest(
    store: StoreCore, data_dir: Path, manifest: mirror.PersistManifest, label: str
) -> dict[str, Any]:
    started = time.monotonic()
    # The store's snapshot format knows no data-dir packs: where a file's bytes were is the mirror's business.
    files = {p: e.stored() for p, e in manifest.files.items()}
    cat = store.catalog()
    todo = [
        e
        for e in manifest.files.values()
        if e.link is None and not cat.has(e.sha256, loose=_loose(e.path, e.size))
    ]
    todo = list({(e.sha256, _loose(e.path, e.size)): e for e in todo}.values())
    prog = store.progress("snapshot")
    prog.set_totals(len(todo), sum(e.size for e in todo))

    def put(group: list[Entry]) -> int:
        """One plain file, or the wanted slices of one data-dir pack (one open, read in order)."""
        e = group[0]
        try:
            if e.pack is not None:
                fd = os.open(pack_file(data_dir, e.pack), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    for e in group:
                        store.backend.write_small(e.sha256 or "", read_slice(fd, e))
                finally:
                    os.close(fd)
            elif _loose(e.path, e.size):
                with open(data_dir / e.path, "rb", buffering=0) as f:
                    store.backend.write_once(blob_name(e.sha256 or ""), f, sha256=e.sha256)
            else:
                data = read_small(data_dir / e.path, e.size)
                if data is None or hashlib.sha256(data).hexdigest() != e.sha256:
                    raise _Changed()
                store.backend.write_small(e.sha256 or "", data)
        except (HashMismatch, FileNotFoundError):
            # A pack gone or a slice that does not match: a persist replaced them after we read the manifest.
            raise _Changed() from None
        size = sum(x.size for x in group)
        prog.add(len(group), size)
        return size

    tasks = [[e] for e in todo if e.pack is None]
    tasks += _pack_tasks({e.path: e for e in todo if e.pack is not None})
    written: list[int] = []
    for chunk in _chunks(tasks, size_of=lambda g: sum(e.size for e in g)):
        with store.backend.batch(), worker_pool(mirror.WORKERS) as pool:
            written += pool.map(put, chunk)
    prog.finish()
    source = {
        "persist_time": mirror.iso(manifest.time_unix),
        "persist_seq": manifest.seq,
        "epoch": manifest.epoch,
    }
    checks = {p: str(d.get("check")) for p, d in manifest.databases.items()}
    return _publish(store, files, checks, label, "persist", source, len(todo), sum(written), started)


def _pack_tasks(packed: dict[str, Entry]) -> list[list[Entry]]:
    """Packed entries as tasks: per data-dir pack, in offset order, at most PACK_TASK_BYTES each (a pack of the
    mirror is up to PACK_TARGET; smaller tasks keep every worker busy)."""
    out: list[list[Entry]] = []
    for group in by_pack(packed).values():
        task: list[Entry] = []
        size = 0
        for e in group:
            task.append(e)
            size += e.size
            if size >= PACK_TASK_BYTES:
                out.append(task)
                task, size = [], 0
        if task:
            out.append(task)
    return out


def _take_tree(
    store: StoreCore,
    root: Path,
    label: str,
    consistency: str,
    manifest: mirror.PersistManifest | None = None,
) -> dict[str, Any]:
    """The tree as it stands: every file hashed, databases copied through the backup API and fully checked.
    A data dir's tree (`manifest` given, or None when it has none) includes the packed files that manifest names
    (`tree_view`): packs are never changed, so those are whole; a pack gone or not matching raises _Changed."""
    started = time.monotonic()
    nodes = mirror.scan(root)
    packed: dict[str, Entry] = {}
    if manifest is not None:
        view = tree_view(root, manifest)
        packed = {p: e for p, e in view.items() if e.pack is not None}
        nodes = {p: n for p, n in nodes.items() if p not in packed}
    skipped = mirror.escaping_links(nodes)
    dbs = [p for p in database.DB_PATHS if p in nodes and nodes[p].link is None]
    plain = [p for p, n in nodes.items() if n.link is None and p not in dbs and p not in skipped]
    prog = store.progress("snapshot")
    prog.set_totals(
        len(plain) + len(dbs) + len(packed),
        sum(nodes[p].size for p in [*plain, *dbs]) + sum(e.size for e in packed.values()),
    )
    files: dict[str, Entry] = {
        p: Entry(p, mode=0o777, link=n.link) for p, n in nodes.items() if n.link and p not in skipped
    }
    checks: dict[str, str] = {}
    new_blobs = new_bytes = 0
    with tempfile.TemporaryDirectory(prefix="tabby-modal-snap-") as work, store.backend.batch():
        for p in dbs:
            copy = Path(work) / p.replace("/", "_")
            res = database.backup(root / p, copy, private_copy=True, check="full", durable=False)
            with open(copy, "rb") as f:
                sha, size, created = store.backend.write_content(f, blob_name)
            new_blobs += created
            new_bytes += size if created else 0
            files[p] = Entry(p, size, nodes[p].mtime_ns, nodes[p].mode, sha)
            checks[p] = res["check"]
            prog.add(1, size)

    cat = store.catalog()

    def put(p: str) -> tuple[str, Entry | None, bool, int]:
        if not _loose(p, nodes[p].size):
            try:
                data = read_small(root / p, PACK_BLOB_MAX - 1)
            except FileNotFoundError:
                return p, None, False, 0
            if data is not None:  # else it grew past the limit: a loose blob, below
                sha = hashlib.sha256(data).hexdigest()
                created = not cat.has(sha) and store.backend.write_small(sha, data)
                prog.add(1, len(data))
                return p, Entry(p, len(data), nodes[p].mtime_ns, nodes[p].mode, sha), created, len(data)
        for _ in range(3):
            try:
                size, sha = hash_file(root / p)
                name = blob_name(sha)
                created = False
                if sha not in cat.loose:
                    with open(root / p, "rb", buffering=0) as f:
                        created = store.backend.write_once(name, f, sha256=sha)
            except FileNotFoundError:
                return p, None, False, 0
            except HashMismatch:
                continue  # changed between hash and copy: once more
            prog.add(1, size)
            return p, Entry(p, size, nodes[p].mtime_ns, nodes[p].mode, sha), created, size
        raise StateError(f"{p} keeps changing while it is read; stop the writer and retry")

    for chunk in _chunks(plain, size_of=lambda p: nodes[p].size):
        with store.backend.batch(), worker_pool(mirror.WORKERS) as pool:
            for p, entry, created, size in pool.map(put, chunk):
                if entry is not None:
                    files[p] = entry
                    new_blobs += created
                    new_bytes += size if created else 0

    def put_packed(group: list[Entry]) -> tuple[int, int]:
        created = size = 0
        try:
            fd = os.open(pack_file(root, group[0].pack or ""), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Changed() from None
        try:
            for e in group:
                try:
                    data = read_slice(fd, e)
                except HashMismatch:
                    raise _Changed() from None
                if not cat.has(e.sha256) and store.backend.write_small(e.sha256 or "", data):
                    created += 1
                    size += e.size
                prog.add(1, e.size)
        finally:
            os.close(fd)
        return created, size

    for chunk in _chunks(_pack_tasks(packed), size_of=lambda g: sum(e.size for e in g)):
        with store.backend.batch(), worker_pool(mirror.WORKERS) as pool:
            for created, size in pool.map(put_packed, chunk):
                new_blobs += created
                new_bytes += size
    files.update({p: e.stored() for p, e in packed.items()})
    prog.finish()
    out = _publish(store, files, checks, label, consistency, {}, new_blobs, new_bytes, started)
    if skipped:
        out["skipped_links"] = sorted(skipped)
    return out


def _publish(
    store: StoreCore,
    files: dict[str, Entry],
    checks: dict[str, str],
    label: str,
    consistency: str,
    source: dict[str, Any],
    new_blobs: int,
    new_bytes: int,
    started: float,
    time_unix: float | None = None,
) -> dict[str, Any]:
    now = time.time() if time_unix is None else time_unix
    sid = new_id(label, now)
    while store.backend.exists(snapshot_name(sid)):
        sid = new_id(label, now)
    doc = {
        "format": FORMAT,
        "kind": "tabby-modal/snapshot",
        "id": sid,
        "label": sid.split("-", 2)[2],
        "time": mirror.iso(now),
        "time_unix": now,
        "consistency": consistency,
        "source": source,
        "host": socket.gethostname(),
        "bytes": sum(e.size for e in files.values()),
        "databases": [{"path": p, "check": c} for p, c in sorted(checks.items())],
        "files": [e.to_json() for _, e in sorted(files.items())],
    }
    store.backend.write_atomic(snapshot_name(sid), mirror.dump_json(doc))
    return {
        "id": sid,
        "label": doc["label"],
        "time": doc["time"],
        "consistency": consistency,
        "files": len(files),
        "bytes": doc["bytes"],
        "new_blobs": new_blobs,
        "new_bytes": new_bytes,
        "databases": checks,
        "seconds": round(time.monotonic() - started, 4),
    }
