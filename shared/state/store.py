"""The snapshot store (the backups Volume): deduplicated, verified, point-in-time copies of a data dir.

Layout, behind a small storage interface (`Backend`; `DirectoryBackend` for a local folder or a mounted Volume):

    packs/ab/<id>              small blobs (< PACK_BLOB_MAX) appended one after another, then an index of them
    blobs/ab/<sha256>          large blobs and databases, one file each
    snapshots/<id>.json        one manifest per snapshot, written atomically after all of its blobs
    lock.json                  the store lock (shared.state.locks), outside the Backend

Every blob is content-addressed by its sha256, wherever it lives, and stored once across snapshots. A pack ends with
its own index (sha256, offset, length of each blob: see `pack_trailer`), protected by a checksum, so one rename
publishes a pack with its index; its name is a random id, written once and never changed. Small blobs go to packs
because a Tabby index is ~10k small files per GiB: one file, fsync and rename per blob cost far more than the bytes.
Databases stay single files, so a drill or `inspect` reads them directly.

Durability order: packs and blobs are written under temp names, one `syncfs` makes their bytes durable, they are
renamed into place, a second `syncfs` makes the names durable, and only then is the manifest that names them written
(itself temp + fsync + rename + dir fsync). A crash leaves orphan packs/blobs and temp files (`.*.tmtmp-*`) for prune,
never a manifest naming a missing blob. Manifests are validated before use: a path that is absolute, has `..`, is
listed twice, or a link leaving the root makes the whole snapshot refused, with nothing written.

Prune deletes loose blobs no kept snapshot names, deletes packs none of whose blobs is named, and rewrites
(repacks) a pack when at least REPACK_GARBAGE of its bytes are unnamed; below that, the unnamed blobs stay until
more of the pack is garbage (rewriting live data on every prune would cost more than the space it frees).

Stores written before packs existed (every blob under `blobs/`) are read as they are.

For export/import (shared/state/archive.py) the store offers a streaming read, `iter_files()`, and two ways in:
`add_tree()` (a directory such as an extracted plain Tabby root) and `import_entries()` (a stream of entries).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from shared.state import database, mirror
from shared.state.atomic import (
    SHA256_RE,
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
    read_small,
    read_upto,
    start_writeback,
    sync_fs,
    tmp_path,
    write_bytes,
    write_private,
    write_stream,
    write_temp,
)
from shared.state.locks import StoreLock
from shared.state.mirror import Entry
from shared.state.progress import Progress, silent

FORMAT = 1
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{4})(?:-([A-Za-z0-9._-]{1,40}))?$")
SCOPES = {"all": ("",), "auth": ("ee/",), "index": ("index/", "repositories/")}
TMP_STAGING = "-staging-"
BUSY_WINDOW = 120.0  # a persist this recent means a server may be running: restore/reset want --force
PENDING_WAIT = 30.0  # how long a snapshot waits for a persist running on this host to finish


BATCH_BYTES = 2 << 30  # data written between two durability barriers
PACK_BLOB_MAX = 1 << 20  # blobs smaller than this go into packs
PACK_TARGET = 16 << 20  # a pack is closed once it holds this much
PACK_BUFFER = 1 << 20
REPACK_GARBAGE = 0.25  # prune rewrites a pack when this fraction of its bytes is named by no kept snapshot
PACK_MAGIC = b"TMPACK1\n"
PACK_FOOTER = struct.Struct(">Q32s8s")  # trailer length, sha256 of the trailer, magic


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


def pack_trailer(entries: list[tuple[str, int, int]]) -> bytes:
    """What ends a pack: a JSON index of its blobs [[sha256, offset, length], ...], then a fixed-size footer with
    the index's length, the index's sha256 and a magic string."""
    index = json.dumps({"format": 1, "blobs": entries}, separators=(",", ":")).encode()
    return index + PACK_FOOTER.pack(len(index), hashlib.sha256(index).digest(), PACK_MAGIC)


def parse_pack_index(f: BinaryIO, size: int) -> list[tuple[str, int, int]]:
    """The blobs a pack holds, from its trailer; StateError if the trailer is missing, corrupt or inconsistent."""
    if size < PACK_FOOTER.size:
        raise StateError("pack too short for its footer")
    f.seek(size - PACK_FOOTER.size)
    length, digest, magic = PACK_FOOTER.unpack(f.read(PACK_FOOTER.size))
    data_end = size - PACK_FOOTER.size - length
    if magic != PACK_MAGIC or data_end < 0:
        raise StateError("pack footer is not ours")
    f.seek(data_end)
    raw = f.read(length)
    if hashlib.sha256(raw).digest() != digest:
        raise StateError("pack index does not match its checksum (corrupt)")
    try:
        items = json.loads(raw)["blobs"]
        out = [(str(sha), int(off), int(n)) for sha, off, n in items]
    except (ValueError, KeyError, TypeError) as err:
        raise StateError(f"pack index is malformed ({err})") from None
    for sha, off, n in out:
        if not SHA256_RE.match(sha) or off < 0 or n < 0 or off + n > data_end:
            raise StateError(f"pack index entry {sha[:12]} is out of bounds")
    return out


class _Slice(io.RawIOBase):
    """A read-only stream over `length` bytes at `offset` of an open file (a blob inside a pack)."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._off, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._f.fileno(), [memoryview(buf)[:n]], self._off + self._pos)
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class _PackWriter:
    """One pack being filled under a temp name in `packs/`; its trailer is written by `finish()`."""

    def __init__(self, root: Path) -> None:
        ensure_dir(root / "packs", durable=False)
        self.tmp = tmp_path(root / "packs" / "pack")
        self.f = open(self.tmp, "xb", buffering=PACK_BUFFER)  # noqa: SIM115 - closed by finish() or abort()
        self.entries: list[tuple[str, int, int]] = []
        self.pos = 0

    def add(self, sha: str, data: bytes) -> None:
        self.f.write(data)
        self.entries.append((sha, self.pos, len(data)))
        self.pos += len(data)

    def finish(self) -> Path:
        self.f.write(pack_trailer(self.entries))
        self.f.flush()
        os.fchmod(self.f.fileno(), 0o444)
        start_writeback(self.f.fileno())
        self.f.close()
        return self.tmp

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        self.tmp.unlink(missing_ok=True)


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

    def batch(self) -> contextlib.AbstractContextManager[list[str]]:
        """Objects written inside the block appear together when it ends, after one durability barrier instead of
        one per object; if the block raises, none appears. Not visible to `exists`/`read` before the end. Yields a
        list that holds, once the block has ended, the names it published."""
        ...

    def write_small(self, sha256: str, data: bytes) -> bool:
        """Inside a batch: add a small blob to a pack (False if this batch already holds it). The caller checked
        that `data` hashes to `sha256` and that the store does not have it yet."""
        ...

    def read_range(self, name: str, offset: int, length: int) -> BinaryIO:
        """Open `length` bytes at `offset` of an object for reading (the caller closes it)."""
        ...

    def pack_index(self, name: str) -> list[tuple[str, int, int]]:
        """The (sha256, offset, length) of each blob in a pack; StateError when its trailer is unreadable."""
        ...


class DirectoryBackend:
    """A plain directory: a local folder, or a mounted Modal Volume (the caller commits it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._pending: list[tuple[Path, Path]] | None = None  # (temp, final) inside a batch
        self._names: set[Path | str] = set()
        self._mutex = threading.Lock()
        self._writers: list[_PackWriter] = []  # open packs of the current batch
        self._free: list[_PackWriter] = []  # ... that no thread is adding to
        self._published: list[str] = []

    @contextlib.contextmanager
    def batch(self) -> Iterator[list[str]]:
        if self._pending is not None:  # nested: part of the outer batch
            yield self._published
            return
        self._pending, self._names, self._published = [], set(), []
        published = self._published
        try:
            yield published
            for w in self._writers:
                self._pending.append((w.finish(), self._path(pack_name(secrets.token_hex(16)))))
            self._writers, self._free = [], []
            if self._pending:
                # Data on disk before any final name exists: a crash leaves temp files, never a torn blob or pack.
                sync_fs(self.root)
                for tmp, final in self._pending:
                    ensure_dir(final.parent, durable=False)
                    os.replace(tmp, final)
                    published.append(final.relative_to(self.root).as_posix())
                sync_fs(self.root)  # the names, before any manifest can name them
        except BaseException:
            for w in self._writers:
                w.abort()
            for tmp, _ in self._pending:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            self._pending, self._names, self._writers, self._free = None, set(), [], []

    def write_small(self, sha256: str, data: bytes) -> bool:
        if self._pending is None:
            raise RuntimeError("write_small outside a batch")
        if not self._claim(f"pack:{sha256}"):
            return False
        with self._mutex:
            w = self._free.pop() if self._free else None
        if w is None:
            w = _PackWriter(self.root)
            with self._mutex:
                self._writers.append(w)
        try:
            w.add(sha256, data)
        except BaseException:
            with self._mutex:
                self._names.discard(f"pack:{sha256}")
            raise  # the pack is dropped with the batch
        with self._mutex:
            if w.pos < PACK_TARGET:
                self._free.append(w)
                return True
            self._writers.remove(w)
        tmp = w.finish()
        self._stage(tmp, self._path(pack_name(secrets.token_hex(16))))
        return True

    def read_range(self, name: str, offset: int, length: int) -> BinaryIO:
        return _Slice(open(self._path(name), "rb", buffering=0), offset, length)  # type: ignore[return-value]

    def pack_index(self, name: str) -> list[tuple[str, int, int]]:
        with open(self._path(name), "rb") as f:
            return parse_pack_index(f, os.fstat(f.fileno()).st_size)

    def _claim(self, path: Path | str) -> bool:
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


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


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


@dataclass
class Catalog:
    """Where each stored blob lives, as the store's listing says right now."""

    loose: dict[str, str]  # sha256 -> object name under blobs/
    packed: dict[str, tuple[str, int, int]]  # sha256 -> (pack name, offset, length)
    packs: dict[str, list[tuple[str, int, int]]]  # readable pack name -> its index
    bad_packs: dict[str, str]  # pack name -> why its index is unreadable

    def has(self, sha256: str | None, *, loose: bool = False) -> bool:
        return sha256 in self.loose or (not loose and sha256 in self.packed)


def _loose(path: str, size: int) -> bool:
    """Stored as a file of its own: large blobs, and databases (drills and `inspect` read them directly)."""
    return size >= PACK_BLOB_MAX or path in database.DB_PATHS


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
        self._pack_cache: dict[str, list[tuple[str, int, int]]] = {}  # packs never change once named
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

    def catalog(self) -> Catalog:
        """Every blob the store holds and where: loose blobs by listing, packed ones from each pack's index."""
        loose = {}
        for name in self.backend.list("blobs/"):
            base = name.rsplit("/", 1)[-1]
            if not is_tmp(name) and SHA256_RE.match(base):
                loose[base] = name
        packed: dict[str, tuple[str, int, int]] = {}
        packs: dict[str, list[tuple[str, int, int]]] = {}
        bad: dict[str, str] = {}
        for name in sorted(self.backend.list("packs/")):
            if is_tmp(name):
                continue
            index = self._pack_cache.get(name)
            if index is None:
                try:
                    index = self.backend.pack_index(name)
                except (StateError, OSError) as err:
                    bad[name] = str(err)
                    continue
                self._pack_cache[name] = index
            packs[name] = index
            for sha, off, n in index:
                packed.setdefault(sha, (name, off, n))
        return Catalog(loose, packed, packs, bad)

    def _open(self, cat: Catalog, sha256: str | None) -> BinaryIO:
        sha = sha256 or ""
        if sha in cat.loose:
            return self.backend.read(cat.loose[sha])
        if sha in cat.packed:
            name, off, n = cat.packed[sha]
            return self.backend.read_range(name, off, n)
        raise FileNotFoundError(f"missing blob {sha[:12]}")

    def _size(self, cat: Catalog, sha256: str | None) -> int:
        """Stored size of a blob, -1 when it is missing."""
        sha = sha256 or ""
        try:
            if sha in cat.loose:
                return self.backend.size(cat.loose[sha])
        except OSError:
            return -1
        return cat.packed[sha][2] if sha in cat.packed else -1

    def locate(self, sha256: str) -> tuple[str, int, int]:
        """Where a blob's bytes are: (object name, offset, length); FileNotFoundError if the store lacks it."""
        cat = self.catalog()
        if sha256 in cat.loose:
            return cat.loose[sha256], 0, self.backend.size(cat.loose[sha256])
        if sha256 in cat.packed:
            return cat.packed[sha256]
        raise FileNotFoundError(f"missing blob {sha256[:12]}")

    def open_blob(self, sha256: str) -> BinaryIO:
        """Read a stored blob by its sha256, wherever it lives (the caller closes it; bytes are not checked)."""
        return self._open(self.catalog(), sha256)

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
        cat = self.catalog()
        total = 0
        for n in [*cat.loose.values(), *cat.packs, *cat.bad_packs]:
            with contextlib.suppress(OSError):
                total += self.backend.size(n)
        ids = self.ids()
        return {
            "count": len(ids),
            "blobs": len(cat.loose.keys() | cat.packed.keys()),
            "packs": len(cat.packs) + len(cat.bad_packs),
            "bytes": total,
            "newest": ids[-1] if ids else None,
        }

    def iter_files(self, snapshot_id: str) -> Iterator[tuple[Entry, IO[bytes] | None]]:
        """Stream a snapshot's files in path order: (entry, reader) with `reader` None for symlinks.

        The reader must be consumed before the next item; it raises HashMismatch at its end if the stored bytes
        do not hash to `entry.sha256`. Entry gives path, size, mode, mtime_ns, sha256 and link (see mirror.Entry).
        Example (an exporter): for e, f in store.iter_files(sid): tar.addfile(info_for(e), f).
        """
        snap = self.load(snapshot_id)
        cat = self.catalog()
        for path in sorted(snap.files):
            entry = snap.files[path]
            if entry.link is not None:
                yield entry, None
                continue
            reader = _Verifying(self._open(cat, entry.sha256), entry)
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
            files: dict[str, Entry] = {}
            skipped = new_blobs = new_bytes = 0
            cat = self.catalog()
            published: list[str] = []
            try:
                with self.backend.batch() as published:
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
                            sha, size, new = self.backend.write_content(reader, blob_name)
                        else:
                            data = read_upto(reader, entry.size + 1)
                            sha, size = hashlib.sha256(data).hexdigest(), len(data)
                            new = (
                                size == entry.size
                                and not cat.has(sha)
                                and self.backend.write_small(sha, data)
                            )
                        new_blobs += new
                        new_bytes += size if new else 0
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
                for name in published:  # packs and blobs of this call only: nothing else names them
                    self.backend.delete(name)
                if isinstance(err, StateError):
                    raise StateError(f"import refused: {err}") from None
                raise
            out = self._publish(files, checks, label, "import", {}, new_blobs, new_bytes, started, time_unix)
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
        cat = self.catalog()
        todo = [
            e
            for e in files.values()
            if e.link is None and not cat.has(e.sha256, loose=_loose(e.path, e.size))
        ]
        todo = list({(e.sha256, _loose(e.path, e.size)): e for e in todo}.values())
        prog = self._progress("snapshot")
        prog.set_totals(len(todo), sum(e.size for e in todo))

        def put(e: Entry) -> int:
            try:
                if _loose(e.path, e.size):
                    with open(data_dir / e.path, "rb", buffering=0) as f:
                        self.backend.write_once(blob_name(e.sha256 or ""), f, sha256=e.sha256)
                else:
                    data = read_small(data_dir / e.path, e.size)
                    if data is None or hashlib.sha256(data).hexdigest() != e.sha256:
                        raise _Changed()
                    self.backend.write_small(e.sha256 or "", data)
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

        cat = self.catalog()

        def put(p: str) -> tuple[str, Entry | None, bool, int]:
            if not _loose(p, nodes[p].size):
                try:
                    data = read_small(root / p, PACK_BLOB_MAX - 1)
                except FileNotFoundError:
                    return p, None, False, 0
                if data is not None:  # else it grew past the limit: a loose blob, below
                    sha = hashlib.sha256(data).hexdigest()
                    created = not cat.has(sha) and self.backend.write_small(sha, data)
                    prog.add(1, len(data))
                    return p, Entry(p, len(data), nodes[p].mtime_ns, nodes[p].mode, sha), created, len(data)
            for _ in range(3):
                try:
                    size, sha = hash_file(root / p)
                    name = blob_name(sha)
                    created = False
                    if sha not in cat.loose:
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

    def _drill(self, entry: Entry, cat: Catalog | None = None) -> str:
        """Restore-drill a database blob into a temp dir and run integrity_check there (`cat`: a current
        catalog, to spare a listing of the store)."""
        with tempfile.TemporaryDirectory(prefix="tabby-modal-drill-") as work:
            dst = Path(work) / "db.sqlite"
            try:
                with self._open(cat or self.catalog(), entry.sha256) as f:
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
        self._pack_cache.clear()  # every pack index is read again, its checksum checked
        cat = self.catalog()
        for snap in snaps:
            for e in snap.files.values():
                if e.link is not None:
                    continue
                sha = e.sha256 or ""
                if sha not in sizes:
                    sizes[sha] = self._size(cat, sha)
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
                with self._open(cat, sha) as f:
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
                    drilled[sha] = self._drill(e, cat)
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
                    with self._open(cat, e.sha256) as f:
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
        cat = self.catalog()
        try:
            ensure_dir(staging)

            def lay(e: Entry) -> None:
                dst = staging / e.path
                if e.link is not None:
                    make_link(dst, e.link, durable=False)
                    return
                with self._open(cat, e.sha256) as f:
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
            garbage: list[str] = []  # loose blobs and packs to delete
            repack: list[str] = []  # packs to rewrite without their garbage
            temp: list[str] = []
            blobs_removed = freed = 0
            cat = self.catalog()
            if not unreadable:
                for name in self.backend.list("blobs/"):
                    if is_tmp(name):
                        temp.append(name)
                    elif name.rsplit("/", 1)[-1] not in referenced:
                        garbage.append(name)
                        blobs_removed += 1
                        with contextlib.suppress(OSError):
                            freed += self.backend.size(name)
                for name in self.backend.list("packs/"):
                    if is_tmp(name):
                        temp.append(name)
                    if name not in cat.packs:
                        continue  # a temp, or unreadable: its blobs cannot be known (verify reports them)
                    index = cat.packs[name]
                    dead = [n for sha, _, n in index if sha not in referenced]
                    total = sum(n for _, _, n in index)
                    if len(dead) == len(index):
                        garbage.append(name)
                    elif dead and sum(dead) >= REPACK_GARBAGE * total:
                        repack.append(name)
                    else:
                        continue
                    blobs_removed += len(dead)
                    freed += sum(dead)
            temp += [n for n in self.backend.list("snapshots/") if is_tmp(n)]
            if not dry_run:
                for s in drop:
                    self.backend.delete(snapshot_name(s.id))
                if repack:
                    repack = self._repack(cat, repack, referenced)
                for name in [*garbage, *repack, *temp]:
                    self.backend.delete(name)
        return {
            "dry_run": dry_run,
            "kept": sorted(keep),
            "removed": sorted(s.id for s in drop),
            "blobs_removed": blobs_removed,
            "bytes_freed": freed,
            "packs_removed": sum(n.startswith("packs/") for n in garbage),
            "packs_repacked": len(repack),
            "temp_removed": len(temp),
            "unreadable": unreadable,
            "blob_gc": not unreadable,
            "seconds": round(time.monotonic() - started, 4),
        }

    def _repack(self, cat: Catalog, packs: list[str], referenced: set[str | None]) -> list[str]:
        """Copy the still-named blobs of `packs` into new packs, durable before the old ones may be deleted; returns
        the packs rewritten.

        Each blob is re-hashed on the way: a pack holding one that does not match its name is left as it is (verify
        reports it; deleting the pack could lose the other blobs' only copy). A crash before the old packs are gone
        leaves blobs in two packs, which is harmless: the first listed is read, and prune deletes the other later."""
        done = []
        with self.backend.batch():
            for name in packs:
                keep = []
                for sha, off, n in cat.packs[name]:
                    if sha not in referenced or cat.packed.get(sha, (name,))[0] != name:
                        continue  # garbage, or the copy read is in another pack
                    with self.backend.read_range(name, off, n) as f:
                        data = f.read()
                    if hashlib.sha256(data).hexdigest() != sha:
                        break
                    keep.append((sha, data))
                else:
                    for sha, data in keep:
                        self.backend.write_small(sha, data)
                    done.append(name)
        return done
