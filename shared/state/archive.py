"""Export a snapshot as a plain `.tar.gz` of a Tabby root, and import such a tarball as a new snapshot.

This moves users between self-hosted Tabby and Modal: `tar -xzf FILE -C ~/.tabby` restores an export by hand (the
database is the snapshot's single consistent file, no `-wal`), and a tarball of a self-hosted `~/.tabby` imports
as a snapshot ready to `restore`. Both stream: no file is held in memory whole.

- Export reads blobs through the store's verifying readers: a blob that does not hash to its manifest entry stops
  the export, and the half-written archive is removed. The archive appears only complete (temp file + rename).
- Import accepts members at the top (`ee/db.sqlite`) or under one top folder (`.tabby/ee/db.sqlite`). A database
  archived with its `-wal` (a copy of a running install) is taken through SQLite's backup API so its committed
  transactions are kept. Paths, links and the database are checked by the store; a refused import leaves the store
  as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from shared.state import database
from shared.state.atomic import fsync_dir, tmp_path
from shared.state.errors import HashMismatch, StateError
from shared.state.mirror import Entry
from shared.state.progress import Progress, silent
from shared.state.space import room_for
from shared.state.store import Store, restore, verify

# Top-level names of a Tabby root: a single top folder with one of these names is content, not a wrapper.
TABBY_TOP = frozenset({"ee", "index", "events", "repositories", "models", "dataset", "config.toml"})
DB_FAMILY = {db + s: db for db in database.DB_PATHS for s in ("", *database.SIDECAR_SUFFIXES)}


class HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an archive path that exists (unless `overwrite`) or whose folder does not."""
    if out.exists() and not overwrite:
        raise StateError(f"{out} exists: choose another --out or remove it first")
    if not out.parent.is_dir():
        raise StateError(f"{out.parent} is not a directory")


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[HashingWriter]:
    """A hashing writer over a temp file beside `out`, published (fsync, rename) when the block ends; if the block
    raises, the temp file is removed and `out` is untouched."""
    tmp = tmp_path(out)
    try:
        with room_for(out), open(tmp, "wb") as raw:
            sink = HashingWriter(raw)
            yield sink
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mode = entry.mode & 0o7777
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link
    else:
        info.size = entry.size
    return info


def export_snapshot(
    store: Store,
    snapshot_id: str,
    out: Path,
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
    partial: bool = False,
) -> dict[str, Any]:
    """Write snapshot `snapshot_id` (or `latest`) to `out` as a .tar.gz; the file appears only when complete.

    With `partial` the snapshot is verified first and the files whose blobs are corrupt or missing are left out
    (named in `left_out`), the database first in the archive. Without it a corrupt blob refuses the export.
    Returns {snapshot, path, files, bytes, archive_bytes, sha256, left_out, skipped_newer, seconds}.
    """
    started = time.monotonic()
    out = Path(out)
    check_out(out, overwrite)
    sid, skipped = store.resolve_noting(snapshot_id)
    snap = store.load(sid)
    missing: list[dict[str, str]] = []
    paths = None
    if partial:
        missing = restore.left_out(snap, verify.verify(store, sid)["problems"])
        gone = {m["path"] for m in missing}
        paths = sorted(
            (p for p in snap.files if p not in gone), key=lambda p: (p not in database.DB_PATHS, p)
        )
    prog = progress or silent()
    prog.set_totals(len(snap.files), snap.bytes)
    files = nbytes = 0
    try:
        with (
            written_whole(out) as sink,
            tarfile.open(fileobj=sink, mode="w|gz", format=tarfile.PAX_FORMAT) as tar,  # type: ignore[call-overload]
        ):
            for entry, reader in store.iter_files(snap.id, paths):
                tar.addfile(_tarinfo(entry), reader)
                files += 1
                nbytes += entry.size
                prog.add(1, entry.size)
    except (HashMismatch, FileNotFoundError) as err:
        raise StateError(f"refused: export of {snap.id}: {err}; nothing written. {restore.HINT}") from None
    prog.finish()
    return {
        "left_out": missing,
        "skipped_newer": skipped,
        "snapshot": snap.id,
        "path": str(out),
        "files": files,
        "bytes": nbytes,
        "archive_bytes": sink.bytes,
        "sha256": sink.sha.hexdigest(),
        "seconds": round(time.monotonic() - started, 3),
    }


def _member_paths(tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str]:
    """All members, and the prefix to strip (`''`, or `top/` when everything sits under one wrapper folder)."""
    members = tar.getmembers()
    names = [m.name.removeprefix("./").rstrip("/") for m in members]
    tops = {n.split("/", 1)[0] for n in names if n and n != "."}
    if len(tops) == 1:
        (top,) = tops
        wrapper = all(n == top or n.startswith(top + "/") for n in names if n and n != ".")
        only_dir = all(m.isdir() for m, n in zip(members, names, strict=True) if n == top)
        if wrapper and only_dir and top and top not in TABBY_TOP:
            return members, top + "/"
    return members, ""


def _relpath(member: tarfile.TarInfo, prefix: str) -> str | None:
    name = member.name.removeprefix("./")
    if prefix and not name.rstrip("/").startswith(prefix.rstrip("/")):
        return name  # outside the wrapper: the store's path check names it
    name = name.removeprefix(prefix) if prefix else name
    return name.rstrip("/") or None


def _link_target(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tarfile.TarInfo:
    """The regular file a hard-link member shares its content with: a member of the archive, inside its root."""
    name = member.linkname
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise StateError(f"import refused: {member.name}: hard link to {name!r} leaves the archive's root")
    try:
        target = tar.getmember(name)
    except KeyError:
        raise StateError(
            f"import refused: {member.name}: hard link to {name!r}, which is not in the archive"
        ) from None
    if not target.isfile():
        raise StateError(f"import refused: {member.name}: hard link to {name!r}, which is not a regular file")
    return target


def _entries(tar: tarfile.TarFile, work: Path, prog: Progress) -> Iterator[tuple[Entry, IO[bytes] | None]]:
    members, prefix = _member_paths(tar)
    family: dict[str, dict[str, tarfile.TarInfo]] = {}
    dbs: dict[str, tarfile.TarInfo] = {}
    for m in members:
        path = _relpath(m, prefix)
        if path is None or m.isdir():
            continue
        mtime_ns = int(m.mtime * 1_000_000_000)
        if path in DB_FAMILY and path != DB_FAMILY[path]:
            family.setdefault(DB_FAMILY[path], {})[path] = m  # a sidecar: its DB needs the backup API
            continue
        if path in DB_FAMILY and m.isfile():
            dbs[path] = m  # streamed as it is unless a -wal turns up later in the archive
            continue
        if m.issym():
            yield Entry(path, mode=0o777, link=m.linkname), None
            continue
        if not (m.isfile() or m.islnk()):
            raise StateError(f"import refused: {m.name}: not a regular file or symlink")
        size = _link_target(tar, m).size if m.islnk() else m.size
        reader = tar.extractfile(m)
        if reader is None:
            raise StateError(f"import refused: {m.name}: no content")
        with reader:
            yield Entry(path, size, mtime_ns, m.mode & 0o7777), reader
        prog.add(1, size)
    for db, parts in sorted(family.items()):
        if db not in dbs:
            raise StateError(f"import refused: {sorted(parts)[0]} without its database {db}")
        main = parts[db] = dbs.pop(db)
        if not main.isfile():
            raise StateError(f"import refused: {main.name}: the database is not a regular file")
        # The DB with its -wal or hot -journal goes to a private folder; opening it there once lets SQLite recover
        # (replay committed WAL frames, roll back a half-done transaction); the backup API then makes one
        # consistent, checked file of it.
        here = work / db.replace("/", "_")
        here.mkdir()
        for path, m in parts.items():
            if path.endswith("-shm"):
                continue  # an index into the -wal, rebuilt by SQLite
            if not m.isfile():
                raise StateError(f"import refused: {m.name}: not a regular file")
            src = tar.extractfile(m)
            assert src is not None
            with room_for(here, m.size), src, open(here / Path(path).name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            with contextlib.closing(sqlite3.connect(here / Path(db).name)) as conn:
                conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError as err:
            raise StateError(f"import refused: {db}: {err}") from None
        copy = work / (db.replace("/", "_") + ".copy")
        database.backup(here / Path(db).name, copy, private_copy=True, check="full", durable=False)
        with open(copy, "rb") as f:
            yield Entry(db, copy.stat().st_size, int(main.mtime * 1_000_000_000), main.mode & 0o7777), f
        prog.add(1, copy.stat().st_size)
    for db, m in sorted(dbs.items()):  # no sidecars: the file is the database, byte for byte
        reader = tar.extractfile(m)
        assert reader is not None
        with reader:
            yield Entry(db, m.size, int(m.mtime * 1_000_000_000), m.mode & 0o7777), reader
        prog.add(1, m.size)


def import_archive(
    store: Store, archive: Path, *, label: str = "import", progress: Progress | None = None
) -> dict[str, Any]:
    """Store a .tar(.gz) of a Tabby root as a new snapshot; the same result dict as `Store.snapshot`."""
    archive = Path(archive)
    if not archive.is_file():
        raise StateError(f"{archive}: no such file")
    prog = progress or silent()
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError, EOFError) as err:
        first = str(err).splitlines()[0].rstrip(":") if str(err) else type(err).__name__
        raise StateError(f"{archive}: not a readable tar archive ({first})") from None
    with tar, tempfile.TemporaryDirectory(prefix="tabby-modal-import-") as work:
        try:
            result = store.import_entries(_entries(tar, Path(work), prog), label=label)
        except (tarfile.TarError, EOFError, sqlite3.DatabaseError) as err:
            raise StateError(f"import refused: {archive}: {' '.join(str(err).split())}") from None
    prog.finish()
    return {**result, "archive": str(archive)}
