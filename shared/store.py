"""The snapshot store (the backups Volume): deduplicated, verified, point-in-time copies of a data dir.

Layout, behind a small storage interface (`Backend`; `DirectoryBackend` for a local folder or a mounted Volume):

    blobs/ab/<sha256>          file contents, content-addressed, written once and never changed
    snapshots/<id>.json        one manifest per snapshot, written atomically after all of its blobs
    lock.json                  the store lock (shared.locks), outside the Backend

A snapshot id sorts by time and carries a label: `20261123T051200Z-1a2b-nightly`. A crash leaves orphan blobs and
temp files (`.*.tmtmp-*`) for prune, never a manifest naming a missing blob. Manifests are validated before use: a path that is absolute, has
`..`, is listed twice, or a link leaving the root makes the whole snapshot refused, with nothing written.

For export/import (shared/archive.py) the store offers a streaming read, `iter_files()`, and two ways in:
`add_tree()` (a directory such as an extracted plain Tabby root) and `import_entries()` (a stream of entries).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import os
import random
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from shared import database, mirror
from shared.atomic import (
    HashMismatch,
    StateError,
    check_relpath,
    check_tree,
    ensure_dir,
    fsync_dir,
    hash_file,
    hash_stream,
    inside,
    is_tmp,
    make_link,
    sync_fs,
    write_bytes,
    write_private,
    write_stream,
    write_temp,
)
from shared.locks import StoreLock
from shared.mirror import Entry
from shared.progress import Progress, silent

FORMAT = 1
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{4})(?:-([A-Za-z0-9._-]{1,40}))?$")
SCOPES = {"all": ("",), "auth": ("ee/",), "index": ("index/", "repositories/")}
TMP_STAGING = "-staging-"
BUSY_WINDOW = 120.0  # a persist this recent means a server may be running: restore/reset want --force
PENDING_WAIT = 30.0  # how long a snapshot waits for a persist running on this host to finish


BATCH_BYTES = 2 << 30  # data written between two durability barriers


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


class UnknownSnapshot(StateError):
    """No snapshot with that id."""


class _Changed(Exception):
    """A data-dir file no longer matches its persist manifest (a persist is running): start over."""


# --- Storage interface ---------------------------------------------------------------------------------------


class Backend(Protocol):
    """Where the store keeps its objects. Names are relative posix paths such as `blobs/ab/cd/<sha>`."""

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str) -> BinaryIO:
        """Open an object for reading (the caller closes it)."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every object name under `prefix` (a folder such as `snapshots/`), temp objects included."""
        ...

    def delete(self, name: str) -> None: ...

    def write_atomic(self, name: str, data: bytes) -> None:
        """Create or replace a small object as a whole (manifests)."""
        ...

    def write_once(self, name: str, src: BinaryIO, *, sha256: str | None = None) -> bool:
        """Publish `src` under `name` unless it exists (returns False then). With `sha256`, the bytes are hashed
        as they are written and a mismatch raises HashMismatch with nothing published."""
        ...

    def write_content(self, src: BinaryIO, name_for: Callable[[str], str]) -> tuple[str, int, bool]:
        """Store a stream whose hash is not known yet under `name_for(sha256)`; returns (sha256, size, created)."""
        ...

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Objects written inside the block appear together when it ends, after one durability barrier instead of
        one per object; if the block raises, none appears. Not visible to `exists`/`read` before the end."""
        ...


class DirectoryBackend:
    """A plain directory: a local folder, or a mounted Modal Volume (the caller commits it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._pending: list[tuple[Path, Path]] | None = None  # (temp, final) inside a batch
        self._names: set[Path] = set()
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._pending is not None:  # nested: part of the outer batch
            yield
            return
        self._pending, self._names = [], set()
        try:
            yield
            if self._pending:
                # Data on disk before any final name exists: a crash leaves temp files, never a torn blob.
                sync_fs(self.root)
                for tmp, final in self._pending:
                    ensure_dir(final.parent, durable=False)
                    os.replace(tmp, final)
                sync_fs(self.root)
        except BaseException:
            for tmp, _ in self._pending:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            self._pending, self._names = None, set()

    def _claim(self, path: Path) -> bool:
        """Inside a batch: reserve a final name (False if this batch already writes it)."""
        with self._mutex:
            if path in self._names:
                return False
            self._names.add(path)
            return True

    def _stage(self, tmp: Path, path: Path) -> None:
        with self._mutex:
            assert self._pending is not None
            self._pending.append((tmp, path))

    def _path(self, name: str) -> Path:
        return self.root / check_relpath(name)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def read(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")  # the caller closes it

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        for dirpath, _, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                yield f"{rel}/{f}"

    def delete(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        # Drop fan-out directories left empty, so a rolled-back import leaves no trace.
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def write_atomic(self, name: str, data: bytes) -> None:
        write_bytes(self._path(name), data)

    def write_once(self, name: str, src: BinaryIO, *, sha256: str | None = None) -> bool:
        path = self._path(name)
        if path.is_file():
            return False
        if self._pending is None:
            write_stream(path, src, expect_sha256=sha256, mode=0o444)
            return True
        if not self._claim(path):
            return False
        try:
            tmp, _, _ = write_temp(path, src, expect_sha256=sha256, mode=0o444, durable=False, writeback=True)
        except BaseException:
            with self._mutex:
                self._names.discard(path)
            raise
        self._stage(tmp, path)
        return True

    def write_content(self, src: BinaryIO, name_for: Callable[[str], str]) -> tuple[str, int, bool]:
        batched = self._pending is not None
        tmp, size, sha = write_temp(
            self.root / "blobs" / "incoming", src, mode=0o444, durable=not batched, writeback=batched
        )
        final = self._path(name_for(sha))
        if final.is_file() or (batched and not self._claim(final)):
            tmp.unlink()
            return sha, size, False
        if batched:
            self._stage(tmp, final)
            return sha, size, True
        ensure_dir(final.parent)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return sha, size, True


def blob_name(sha256: str) -> str:
    # One level of fan-out: 256 directories at most (a Volume counts every directory against its inode budget).
    return f"blobs/{sha256[:2]}/{sha256}"


def snapshot_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.json"


def new_id(label: str, when: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40] or "manual"
    return f"{stamp}-{secrets.token_hex(2)}-{clean}"


@dataclass
class Snapshot:
    """A validated snapshot manifest."""

    id: str
    label: str
    time_unix: float
    consistency: str
    files: dict[str, Entry]
    databases: dict[str, str]  # path -> check result at snapshot time
    doc: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "time": mirror.iso(self.time_unix),
            "consistency": self.consistency,
            "files": len(self.files),
            "bytes": self.bytes,
        }


class _Verifying:
    """A read-only stream over a blob that raises HashMismatch at its end if the bytes are not what was promised."""

    def __init__(self, raw: BinaryIO, entry: Entry) -> None:
        self._raw, self._entry = raw, entry
        self._h = hashlib.sha256()
        self._n = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or self._n + n > self._entry.size:
            n = self._entry.size - self._n  # never past the recorded size, so the check below always runs
        data = self._raw.read(n) if n > 0 else b""
        self._h.update(data)
        self._n += len(data)
        if (self._n >= self._entry.size or not data) and not self._checked:
            self._checked = True
            if self._h.hexdigest() != self._entry.sha256 or self._n != self._entry.size:
                raise HashMismatch(f"{self._entry.path}: stored blob is corrupt")
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()


# --- The store -----------------------------------------------------------------------------------------------


class Store:
    """Snapshots of data dirs in a Backend. Mutating calls hold the store lock; reads do not need it."""

    def __init__(
        self,
        backend: Backend,
        *,
        lock: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
        progress: Callable[[str], Progress] | None = None,
    ) -> None:
        self.backend = backend
        self._lock = lock or (lambda op: contextlib.nullcontext())
        self._progress = progress or (lambda label: silent())

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

    # --- Reading ----------------------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Snapshot ids in time order (oldest first), as their manifest names say; unreadable ones included."""
        out = []
        for name in self.backend.list("snapshots/"):
            base = name.rsplit("/", 1)[-1]
            if base.endswith(".json") and ID_RE.match(base[:-5]):
                out.append(base[:-5])
        return sorted(out)

    def resolve(self, snapshot_id: str) -> str:
        """A full id from an id or `latest`; UnknownSnapshot when there is no such snapshot."""
        if snapshot_id == "latest":
            snaps = self.snapshots()
            if not snaps:
                raise UnknownSnapshot("no snapshots yet")
            return snaps[-1].id
        if not isinstance(snapshot_id, str) or not ID_RE.match(snapshot_id):
            raise UnknownSnapshot(f"unknown snapshot {snapshot_id!r} (see `tabby-modal snapshots`)")
        if not self.backend.exists(snapshot_name(snapshot_id)):
            raise UnknownSnapshot(f"unknown snapshot {snapshot_id!r} (see `tabby-modal snapshots`)")
        return snapshot_id

    def load(self, snapshot_id: str) -> Snapshot:
        """The validated manifest of a snapshot; StateError (one line) when it is malformed or unsafe."""
        sid = self.resolve(snapshot_id)
        where = f"snapshot {sid}"
        with self.backend.read(snapshot_name(sid)) as f:
            doc = mirror.load_json(f.read(), where)
        if doc.get("format") != FORMAT or doc.get("kind") != "tabby-modal/snapshot":
            raise StateError(f"{where}: unknown manifest format")
        if doc.get("id") != sid:
            raise StateError(f"{where}: manifest names another id {doc.get('id')!r}")
        files = mirror.parse_entries(doc.get("files"), where)
        dbs = {}
        for d in doc.get("databases") or []:
            if not isinstance(d, dict) or d.get("path") not in files:
                raise StateError(f"{where}: database entry {d!r} names no listed file")
            dbs[d["path"]] = str(d.get("check"))
        t = doc.get("time_unix")
        return Snapshot(
            id=sid,
            label=str(doc.get("label") or ""),
            time_unix=float(t) if isinstance(t, int | float) else 0.0,
            consistency=str(doc.get("consistency") or "?"),
            files=files,
            databases=dbs,
            doc=doc,
        )

    def manifest(self, snapshot_id: str) -> dict[str, Any]:
        """The raw manifest JSON of a snapshot, after validation (for export)."""
        return self.load(snapshot_id).doc

    def snapshots(self) -> list[Snapshot]:
        """Readable snapshots, oldest first (by manifest time, then id). Unreadable ones are left to `verify`."""
        out = []
        for sid in self.ids():
            with contextlib.suppress(StateError, OSError):
                out.append(self.load(sid))
        return sorted(out, key=lambda s: (s.time_unix, s.id))

    def list(self) -> list[dict[str, Any]]:
        """Summaries, oldest first; a manifest that does not load is listed with its `problem`."""
        good = {s.id: s.summary() for s in self.snapshots()}
        bad = []
        for sid in self.ids():
            if sid not in good:
                try:
                    self.load(sid)
                except (StateError, OSError) as err:
                    bad.append({"id": sid, "problem": str(err)})
        return [*good.values(), *bad]

    def stats(self) -> dict[str, Any]:
        """Number of snapshots, and blobs with their total bytes (the store's real size: blobs are shared)."""
        blobs = [n for n in self.backend.list("blobs/") if not is_tmp(n)]
        total = 0
        for n in blobs:
            with contextlib.suppress(OSError):
                total += self.backend.size(n)
        ids = self.ids()
        return {"count": len(ids), "blobs": len(blobs), "bytes": total, "newest": ids[-1] if ids else None}

    def iter_files(self, snapshot_id: str) -> Iterator[tuple[Entry, IO[bytes] | None]]:
        """Stream a snapshot's files in path order: (entry, reader) with `reader` None for symlinks.

        The reader must be consumed before the next item; it raises HashMismatch at its end if the stored bytes
        do not hash to `entry.sha256`. Entry gives path, size, mode, mtime_ns, sha256 and link (see mirror.Entry).
        Example (an exporter): for e, f in store.iter_files(sid): tar.addfile(info_for(e), f).
        """
        snap = self.load(snapshot_id)
        for path in sorted(snap.files):
            entry = snap.files[path]
            if entry.link is not None:
                yield entry, None
                continue
            reader = _Verifying(self.backend.read(blob_name(entry.sha256 or "")), entry)
            try:
                yield entry, reader  # type: ignore[misc]
            finally:
                reader.close()

    # --- Taking snapshots -------------------------------------------------------------------------------------

    def snapshot(self, data_dir: Path, label: str = "manual") -> dict[str, Any]:
        """Snapshot a data dir: one consistent persist (from its persist manifest), or, with no manifest (a plain
        Tabby root), the tree as it is with the database through the backup API.

        Returns {id, label, time, files, bytes, new_blobs, new_bytes, consistency, seconds}. `consistency` is
        `persist`, `direct` (no manifest) or `crash` (an interrupted persist left the data dir mid-way).
        """
        with self._lock("snapshot"):
            return self._snapshot(Path(data_dir), label)

    def add_tree(self, root: Path, label: str = "import") -> dict[str, Any]:
        """Snapshot any Tabby-like directory as it stands (e.g. an extracted archive of ~/.tabby); same result."""
        root = Path(root)
        if not root.is_dir():
            raise StateError(f"{root} is not a directory")
        with self._lock("import"):
            return self._take_tree(root, label, "direct")

    def import_entries(
        self,
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
        with self._lock("import"):
            created: list[str] = []
            files: dict[str, Entry] = {}
            skipped = 0
            try:
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
                    sha, size, new = self.backend.write_content(reader, blob_name)
                    if new:
                        created.append(blob_name(sha))
                    if size != entry.size or (entry.sha256 and entry.sha256 != sha):
                        raise StateError(f"{path}: content does not match its size or sha256")
                    files[path] = Entry(path, size, entry.mtime_ns, entry.mode & 0o7777, sha)
                check_tree(files, {p: e.link for p, e in files.items() if e.link is not None})
                checks = {}
                for p in database.DB_PATHS:
                    if p in files and files[p].link is None:
                        checks[p] = self._drill(files[p])
                        if checks[p] != "ok":
                            raise StateError(f"{p}: restore drill fails: {checks[p]}")
            except BaseException as err:
                for name in created:
                    self.backend.delete(name)
                if isinstance(err, StateError):
                    raise StateError(f"import refused: {err}") from None
                raise
            new_bytes = sum(self.backend.size(n) for n in created)
            out = self._publish(
                files, checks, label, "import", {}, len(created), new_bytes, started, time_unix
            )
            return {**out, "skipped": skipped}

    def _snapshot(self, data_dir: Path, label: str) -> dict[str, Any]:
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
            if manifest is None and pending is None:
                return self._take_tree(data_dir, label, "direct")
            if pending is not None or manifest is None:
                return self._take_tree(data_dir, label, "crash")
            try:
                return self._take_manifest(data_dir, manifest, label)
            except _Changed:
                continue
        return self._take_tree(data_dir, label, "crash")

    def _take_manifest(self, data_dir: Path, manifest: mirror.PersistManifest, label: str) -> dict[str, Any]:
        started = time.monotonic()
        files = {p: replace(e, racy=False) for p, e in manifest.files.items()}
        todo = [
            e for e in files.values() if e.link is None and not self.backend.exists(blob_name(e.sha256 or ""))
        ]
        todo = list({e.sha256: e for e in todo}.values())
        prog = self._progress("snapshot")
        prog.set_totals(len(todo), sum(e.size for e in todo))

        def put(e: Entry) -> int:
            try:
                with open(data_dir / e.path, "rb", buffering=0) as f:
                    self.backend.write_once(blob_name(e.sha256 or ""), f, sha256=e.sha256)
            except (HashMismatch, FileNotFoundError):
                raise _Changed() from None
            prog.add(1, e.size)
            return e.size

        written: list[int] = []
        for chunk in _chunks(todo):
            with self.backend.batch(), ThreadPoolExecutor(mirror.WORKERS) as pool:
                written += pool.map(put, chunk)
        prog.finish()
        source = {
            "persist_time": mirror.iso(manifest.time_unix),
            "persist_seq": manifest.seq,
            "epoch": manifest.epoch,
        }
        checks = {p: str(d.get("check")) for p, d in manifest.databases.items()}
        return self._publish(files, checks, label, "persist", source, len(written), sum(written), started)

    def _take_tree(self, root: Path, label: str, consistency: str) -> dict[str, Any]:
        """The tree as it stands: every file hashed, databases copied through the backup API and fully checked."""
        started = time.monotonic()
        nodes = mirror.scan(root)
        skipped = mirror.escaping_links(nodes)
        dbs = [p for p in database.DB_PATHS if p in nodes and nodes[p].link is None]
        plain = [p for p, n in nodes.items() if n.link is None and p not in dbs and p not in skipped]
        prog = self._progress("snapshot")
        prog.set_totals(len(plain) + len(dbs), sum(nodes[p].size for p in [*plain, *dbs]))
        files: dict[str, Entry] = {
            p: Entry(p, mode=0o777, link=n.link) for p, n in nodes.items() if n.link and p not in skipped
        }
        checks: dict[str, str] = {}
        new_blobs = new_bytes = 0
        with tempfile.TemporaryDirectory(prefix="tabby-modal-snap-") as work, self.backend.batch():
            for p in dbs:
                copy = Path(work) / p.replace("/", "_")
                res = database.backup(root / p, copy, private_copy=True, check="full", durable=False)
                with open(copy, "rb") as f:
                    sha, size, created = self.backend.write_content(f, blob_name)
                new_blobs += created
                new_bytes += size if created else 0
                files[p] = Entry(p, size, nodes[p].mtime_ns, nodes[p].mode, sha)
                checks[p] = res["check"]
                prog.add(1, size)

        def put(p: str) -> tuple[str, Entry | None, bool, int]:
            for _ in range(3):
                try:
                    size, sha = hash_file(root / p)
                    name = blob_name(sha)
                    created = False
                    if not self.backend.exists(name):
                        with open(root / p, "rb", buffering=0) as f:
                            created = self.backend.write_once(name, f, sha256=sha)
                except FileNotFoundError:
                    return p, None, False, 0
                except HashMismatch:
                    continue  # changed between hash and copy: once more
                prog.add(1, size)
                return p, Entry(p, size, nodes[p].mtime_ns, nodes[p].mode, sha), created, size
            raise StateError(f"{p} keeps changing while it is read; stop the writer and retry")

        for chunk in _chunks(plain, size_of=lambda p: nodes[p].size):
            with self.backend.batch(), ThreadPoolExecutor(mirror.WORKERS) as pool:
                for p, entry, created, size in pool.map(put, chunk):
                    if entry is not None:
                        files[p] = entry
                        new_blobs += created
                        new_bytes += size if created else 0
        prog.finish()
        out = self._publish(files, checks, label, consistency, {}, new_blobs, new_bytes, started)
        if skipped:
            out["skipped_links"] = sorted(skipped)
        return out

    def _publish(
        self,
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
        while self.backend.exists(snapshot_name(sid)):
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
        self.backend.write_atomic(snapshot_name(sid), mirror.dump_json(doc))
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

    # --- Verify -------------------------------------------------------------------------------------------

    def _drill(self, entry: Entry) -> str:
        """Restore-drill a database blob into a temp dir and run integrity_check there."""
        with tempfile.TemporaryDirectory(prefix="tabby-modal-drill-") as work:
            dst = Path(work) / "db.sqlite"
            try:
                with self.backend.read(blob_name(entry.sha256 or "")) as f:
                    write_stream(dst, f, expect_sha256=entry.sha256, durable=False)
            except HashMismatch:
                return "blob content does not match its sha256"
            except OSError as err:
                return f"cannot read blob: {err}"
            return database.check_file(dst, "full")

    def verify(self, snapshot_id: str | None = None, sample: float | None = None) -> dict[str, Any]:
        """Check snapshots: every manifest loads, every blob exists with the right size, blobs re-hash to their
        names (all, or a random `sample` fraction), each Tantivy meta.json's segments are present, and each
        database passes integrity_check in a restore drill. Returns {ok, problems: [{snapshot, path, problem}]}.
        """
        started = time.monotonic()
        if sample is not None and not 0 <= sample <= 1:
            raise StateError(f"--sample must be between 0 and 1, got {sample}")
        ids = [self.resolve(snapshot_id)] if snapshot_id is not None else self.ids()
        problems: list[dict[str, Any]] = []

        def problem(sid: str, path: str | None, what: str) -> None:
            problems.append({"snapshot": sid, "path": path, "problem": what})

        snaps: list[Snapshot] = []
        for sid in ids:
            try:
                snaps.append(self.load(sid))
            except (StateError, OSError) as err:
                problem(sid, snapshot_name(sid), str(err))
        refs: dict[str, list[tuple[str, str]]] = {}
        sizes: dict[str, int] = {}
        for snap in snaps:
            for e in snap.files.values():
                if e.link is not None:
                    continue
                sha = e.sha256 or ""
                if sha not in sizes:
                    try:
                        sizes[sha] = self.backend.size(blob_name(sha))
                    except OSError:
                        sizes[sha] = -1
                if sizes[sha] < 0:
                    problem(snap.id, e.path, f"missing blob {sha[:12]}")
                elif sizes[sha] != e.size:
                    problem(
                        snap.id, e.path, f"blob {sha[:12]} has {sizes[sha]} bytes, manifest says {e.size}"
                    )
                else:
                    refs.setdefault(sha, []).append((snap.id, e.path))
        chosen = sorted(refs)
        if sample is not None and sample < 1:
            k = math.ceil(len(chosen) * sample)
            chosen = sorted(random.sample(chosen, k))
        prog = self._progress("verify")
        prog.set_totals(len(chosen), sum(sizes[s] for s in chosen))

        def rehash(sha: str) -> tuple[str, str | None]:
            try:
                with self.backend.read(blob_name(sha)) as f:
                    got = hash_stream(f)[1]
            except OSError as err:
                return sha, f"cannot read blob: {err}"
            prog.add(1, sizes[sha])
            return sha, None if got == sha else "blob content does not match its sha256 (corrupt)"

        bad: set[str] = set()
        with ThreadPoolExecutor(mirror.WORKERS) as pool:
            for sha, what in pool.map(rehash, chosen):
                if what:
                    bad.add(sha)
                    for sid, path in refs[sha]:
                        problem(sid, path, what)
        prog.finish()

        drilled: dict[str, str] = {}
        meta_ok: dict[tuple[str, frozenset[str]], list[str]] = {}
        for snap in snaps:
            for p in snap.databases:
                e = snap.files[p]
                sha = e.sha256 or ""
                if sha not in refs or sha in bad:
                    continue
                if sha not in drilled:
                    drilled[sha] = self._drill(e)
                if drilled[sha] != "ok":
                    problem(snap.id, p, f"restore drill: {drilled[sha]}")
            present = frozenset(snap.files)
            for p, e in snap.files.items():
                if (
                    not mirror.is_index_meta(p)
                    or e.link is not None
                    or e.sha256 not in refs
                    or e.sha256 in bad
                ):
                    continue
                key = (e.sha256 or "", present)
                if key not in meta_ok:
                    with self.backend.read(blob_name(e.sha256 or "")) as f:
                        meta_ok[key] = mirror.meta_missing(p, f.read(), present)
                for missing in meta_ok[key][:3]:
                    problem(
                        snap.id, p, f"index meta.json names a segment that is not in the snapshot: {missing}"
                    )
        # A snapshot pruned while we looked is not a problem.
        still = set(self.ids())
        problems = [pr for pr in problems if pr["snapshot"] in still]
        return {
            "ok": not problems,
            "snapshots": len(ids),
            "blobs": len(refs),
            "blobs_checked": len(chosen),
            "bytes_checked": sum(sizes[s] for s in chosen),
            "databases_drilled": len(drilled),
            "sample": sample,
            "problems": problems,
            "seconds": round(time.monotonic() - started, 4),
        }

    # --- Restore and reset ------------------------------------------------------------------------------------

    def _guard(self, data_dir: Path, action: str, force: bool) -> None:
        """Refuse to change a data dir that a server may be persisting into, unless forced."""
        if force or not data_dir.is_dir():
            return
        pending = mirror.pending_info(data_dir)
        if pending and mirror.pending_alive(pending):
            raise StateError(
                f"refused: a {pending.get('op')} is running in {data_dir} (pid {pending.get('pid')})"
            )
        try:
            manifest = mirror.load_manifest(data_dir)
        except StateError:
            return
        if manifest is not None and manifest.origin == "persist":
            age = time.time() - manifest.time_unix
            if 0 <= age < BUSY_WINDOW:
                raise StateError(
                    f"refused: {data_dir} was persisted {age:.0f}s ago, a server may be running; "
                    f"stop it first, or pass --force to {action} anyway"
                )

    def _safety(self, data_dir: Path, label: str, force: bool) -> str | None:
        if not data_dir.is_dir() or not mirror.scan(data_dir):
            return None
        try:
            return self._snapshot(data_dir, label)["id"]
        except StateError as err:
            if force:
                return None
            raise StateError(
                f"refused: the safety snapshot failed ({err}); pass --force to go on without"
            ) from None

    def restore(
        self, snapshot_id: str, data_dir: Path, *, force: bool = False, guard: bool = True
    ) -> dict[str, Any]:
        """Replace the data dir's content with a snapshot.

        The snapshot is verified first (any problem refuses the restore with nothing written), then a safety
        snapshot of the current data dir is taken, the files are laid out in a staging dir and checked, moved into
        place, files not in the snapshot removed (with stale SQLite `-wal`/`-shm`), and a fresh persist manifest
        written. `force` skips the running-server guard and a failing safety snapshot.
        """
        started = time.monotonic()
        data_dir = Path(data_dir)
        sid = self.resolve(snapshot_id)
        snap = self.load(sid)
        if guard:  # off when the caller knows better (the maintenance app asks Modal whether a server runs)
            self._guard(data_dir, "restore", force)
        with self._lock("restore"):
            report = self.verify(sid)
            if not report["ok"]:
                first = report["problems"][0]
                more = len(report["problems"]) - 1
                raise StateError(
                    f"refused: snapshot {sid} fails verification: {first['path']}: {first['problem']}"
                    + (f" (+{more} more)" if more else "")
                )
            safety = self._safety(data_dir, "pre-restore", force)
            self._lay_down(snap, data_dir)
        return {
            "restored": sid,
            "files": len(snap.files),
            "bytes": snap.bytes,
            "safety_snapshot": safety,
            "seconds": round(time.monotonic() - started, 4),
        }

    def _lay_down(self, snap: Snapshot, data_dir: Path) -> None:
        ensure_dir(data_dir)
        meta = data_dir / mirror.META_DIR
        for old in meta.glob(f"restore{TMP_STAGING}*") if meta.is_dir() else []:
            shutil.rmtree(old, ignore_errors=True)
        staging = meta / f"restore{TMP_STAGING}{secrets.token_hex(4)}"
        prog = self._progress("restore")
        prog.set_totals(len(snap.files), snap.bytes)
        try:
            ensure_dir(staging)

            def lay(e: Entry) -> None:
                dst = staging / e.path
                if e.link is not None:
                    make_link(dst, e.link, durable=False)
                    return
                with self.backend.read(blob_name(e.sha256 or "")) as f:
                    write_private(dst, f, expect_sha256=e.sha256, mode=e.mode, mtime_ns=e.mtime_ns)
                prog.add(1, e.size)

            for d in sorted({os.path.dirname(p) for p in snap.files} - {""}):
                (staging / d).mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(mirror.WORKERS) as pool:
                list(pool.map(lay, snap.files.values()))
            sync_fs(data_dir)  # one barrier for the whole staging tree before anything is swapped in
            for p, e in snap.files.items():
                if e.link is not None and not inside(staging, staging / p):
                    raise StateError(f"refused: link {p} leaves the root")
            checks = {p: database.check_file(staging / p, "quick") for p in snap.databases}
            for p, c in checks.items():
                if c != "ok":
                    raise StateError(f"refused: {p} fails quick_check after staging ({c})")
            # From here the data dir changes: the pending marker tells readers it is mid-way.
            mirror.write_pending(data_dir, "restore")
            existing = mirror.scan(data_dir)
            for p in database.DB_PATHS:
                for side in database.sidecars(data_dir / p):
                    side.unlink(missing_ok=True)
            touched = set()
            for p in sorted(snap.files):
                mirror.clear_way(data_dir, p)
                ensure_dir((data_dir / p).parent)
                os.replace(staging / p, data_dir / p)
                touched.add((data_dir / p).parent)
            gone = [p for p in existing if p not in snap.files]
            for p in gone:
                mirror.remove(data_dir, p)
            mirror.prune_empty_dirs(data_dir, gone)
            for d in touched:
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(d)
            mirror.rebuild_manifest(data_dir, origin="restore", known=snap.files, checks=checks)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        prog.finish()

    def reset(self, data_dir: Path, scope: str, *, force: bool = False, guard: bool = True) -> dict[str, Any]:
        """Delete part of a data dir after a safety snapshot: `all`, `auth` (`ee/`: users, tokens, settings) or
        `index` (`index/`, `repositories/`). A fresh persist manifest describes what is left."""
        if scope not in SCOPES:
            raise StateError(f"unknown scope {scope!r} (all, auth or index)")
        started = time.monotonic()
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise StateError(f"data dir {data_dir} does not exist")
        if guard:
            self._guard(data_dir, "reset", force)
        with self._lock("reset"):
            safety = self._safety(data_dir, f"pre-reset-{scope}", force)
            prefixes = SCOPES[scope]
            doomed = [p for p in mirror.scan(data_dir) if p.startswith(prefixes)]
            freed = 0
            mirror.write_pending(data_dir, "reset")
            if scope in ("all", "auth"):
                for p in database.DB_PATHS:
                    for side in database.sidecars(data_dir / p):
                        side.unlink(missing_ok=True)
            for p in doomed:
                freed += mirror.remove(data_dir, p)
            mirror.prune_empty_dirs(data_dir, doomed)
            left = mirror.rebuild_manifest(data_dir, origin="reset")
        return {
            "scope": scope,
            "removed_files": len(doomed),
            "removed_bytes": freed,
            "files_left": len(left.files),
            "safety_snapshot": safety,
            "seconds": round(time.monotonic() - started, 4),
        }

    # --- Prune ------------------------------------------------------------------------------------------------

    @staticmethod
    def plan(snaps: list[Snapshot], keep_last: int, keep_daily: int, keep_weekly: int) -> set[str]:
        """Ids to keep: the newest always; the last N; the newest of each of the last N days and ISO weeks."""
        newest_first = sorted(snaps, key=lambda s: (s.time_unix, s.id), reverse=True)
        keep = {s.id for s in newest_first[: max(1, keep_last)]}
        for count, key in (
            (keep_daily, lambda d: d.date()),
            (keep_weekly, lambda d: d.isocalendar()[:2]),
        ):
            seen: set[Any] = set()
            for s in newest_first:
                k = key(dt.datetime.fromtimestamp(s.time_unix, dt.UTC))
                if k not in seen and len(seen) < count:
                    seen.add(k)
                    keep.add(s.id)
        return keep

    def prune(
        self, keep_last: int, keep_daily: int, keep_weekly: int, *, dry_run: bool = False
    ) -> dict[str, Any]:
        """Forget snapshots outside the retention rules, then delete blobs no snapshot names (and stray temp files).

        With `dry_run` nothing is written (not even the lock). Blob deletion is skipped while any manifest is
        unreadable, since its blobs cannot be known.
        """
        for name, n in (("keep-last", keep_last), ("keep-daily", keep_daily), ("keep-weekly", keep_weekly)):
            if n < 0:
                raise StateError(f"--{name} must be 0 or more, got {n}")
        started = time.monotonic()
        ctx = contextlib.nullcontext() if dry_run else self._lock("prune")
        with ctx:
            snaps = self.snapshots()
            unreadable = [sid for sid in self.ids() if sid not in {s.id for s in snaps}]
            keep = self.plan(snaps, keep_last, keep_daily, keep_weekly) if snaps else set()
            drop = [s for s in snaps if s.id not in keep]
            referenced = {e.sha256 for s in snaps if s.id in keep for e in s.files.values() if e.link is None}
            garbage: list[str] = []
            temp: list[str] = []
            if not unreadable:
                for name in self.backend.list("blobs/"):
                    if is_tmp(name):
                        temp.append(name)
                    elif name.rsplit("/", 1)[-1] not in referenced:
                        garbage.append(name)
            temp += [n for n in self.backend.list("snapshots/") if is_tmp(n)]
            freed = 0
            for name in garbage:
                with contextlib.suppress(OSError):
                    freed += self.backend.size(name)
            if not dry_run:
                for s in drop:
                    self.backend.delete(snapshot_name(s.id))
                for name in [*garbage, *temp]:
                    self.backend.delete(name)
        return {
            "dry_run": dry_run,
            "kept": sorted(keep),
            "removed": sorted(s.id for s in drop),
            "blobs_removed": len(garbage),
            "bytes_freed": freed,
            "temp_removed": len(temp),
            "unreadable": unreadable,
            "blob_gc": not unreadable,
            "seconds": round(time.monotonic() - started, 4),
        }
