"""Small files of the data dir in packs: a Tabby root is tens of thousands of small files (index segments, git work
trees under `repositories/`), and a Modal Volume wants under 50,000 files and one durability barrier per pass, not
two per file.

Every file below `PACK_BLOB_MAX` that is not a database is appended to a pack under `.tabby-modal/packs/` (the
snapshot store's pack format, `shared.state.packs`); the persist manifest names its pack and offset. A pack is
written once under the pass's staging dir, made durable by the pass's one barrier, renamed in, and only then named
by a manifest; nothing ever rewrites it. Packs no manifest names are deleted after the next manifest is in place.
Every read checks the slice's sha256: a pack is data like any other.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from shared.state import database
from shared.state.errors import HashMismatch
from shared.state.mirror.manifest import Entry, PersistManifest
from shared.state.mirror.scan import META_DIR, scan
from shared.state.packs import PACK_BLOB_MAX, PACK_TARGET, PackWriter

PACKS_DIR = f"{META_DIR}/packs"
T = TypeVar("T")
PACK_SUFFIX = ".pack"


# A copy task: neighbouring small files, up to this many or this many bytes (a future per file costs more than a
# small file's copy); a file of PACK_BLOB_MAX or more is a task of its own.
BATCH_FILES = 256
BATCH_BYTES = 8 << 20


def batches(items: Iterable[T], size_of: Callable[[T], int]) -> Iterator[list[T]]:
    """`items` (in path order, so neighbours share a pack) as the tasks of a copy pool: persist, hydrate, restore."""
    batch: list[T] = []
    size = 0
    for item in items:
        n = size_of(item)
        if n >= PACK_BLOB_MAX:
            yield [item]
            continue
        batch.append(item)
        size += n
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def packable(path: str, size: int) -> bool:
    """Does a file of this size at this path go into a pack? Databases never do: inspect, drills and SQLite
    itself read them at their paths."""
    return size < PACK_BLOB_MAX and path not in database.DB_PATHS


def pack_file(data_dir: Path, pack_id: str) -> Path:
    return Path(data_dir) / PACKS_DIR / f"{pack_id}{PACK_SUFFIX}"


def pack_files(data_dir: Path) -> dict[str, Path]:
    """The packs present in the data dir by id (renamed in; staged ones live elsewhere)."""
    folder = Path(data_dir) / PACKS_DIR
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    return {n[: -len(PACK_SUFFIX)]: folder / n for n in names if n.endswith(PACK_SUFFIX)}


def read_slice(fd: int, e: Entry) -> bytes:
    """The bytes of packed entry `e` from its pack's open `fd`, checked against its sha256 (HashMismatch)."""
    data = os.pread(fd, e.size, e.offset)
    if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
        raise HashMismatch(f"{e.path}: its bytes in pack {e.pack} do not match the manifest")
    return data


SPAN_MAX = 64 << 20  # read a pack's slices in one go up to this span (a pack is ~16 MiB)


_LOCAL = threading.local()


def _span(n: int) -> memoryview:
    """This thread's read buffer, at least `n` bytes: a fresh 16 MiB per pack costs a page fault per 4 KiB."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or len(buf) < n:
        buf = _LOCAL.buf = bytearray(max(n, PACK_TARGET + PACK_BLOB_MAX))
    return memoryview(buf)[:n]


def read_slices(fd: int, group: list[Entry]) -> Iterator[tuple[Entry, memoryview]]:
    """The bytes of the packed entries `group` (one pack's, in offset order) from its open `fd`, each checked
    against its sha256 before it is yielded (HashMismatch): one read for the whole span into this thread's buffer,
    no copy per slice. A slice is valid until the thread's next `read_slices`: use it before asking for more."""
    start = group[0].offset
    end = max(e.offset + e.size for e in group)
    if end - start > SPAN_MAX:
        for e in group:
            yield e, memoryview(read_slice(fd, e))
        return
    view = _span(end - start)
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], start + got)
        if n == 0:
            break
        got += n
    view = view[:got]
    for e in group:
        piece = view[e.offset - start : e.offset - start + e.size]
        if len(piece) != e.size or hashlib.sha256(piece).hexdigest() != e.sha256:
            raise HashMismatch(f"{e.path}: its bytes in pack {e.pack} do not match the manifest")
        yield e, piece


def read_packed(data_dir: Path, e: Entry) -> bytes:
    """One packed entry's bytes, checked. FileNotFoundError when its pack is gone."""
    fd = os.open(pack_file(data_dir, e.pack or ""), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_slice(fd, e)
    finally:
        os.close(fd)


def read_entry(data_dir: Path, e: Entry) -> bytes:
    """A small entry's bytes, packed or plain, checked against its sha256 when known."""
    if e.pack is not None:
        return read_packed(data_dir, e)
    data = (Path(data_dir) / e.path).read_bytes()
    if e.sha256 is not None and hashlib.sha256(data).hexdigest() != e.sha256:
        raise HashMismatch(f"{e.path}: does not match the manifest")
    return data


def by_pack(entries: dict[str, Entry]) -> dict[str, list[Entry]]:
    """Packed entries grouped by pack, each group in offset order (one sequential read per pack)."""
    out: dict[str, list[Entry]] = {}
    for e in entries.values():
        if e.pack is not None:
            out.setdefault(e.pack, []).append(e)
    for group in out.values():
        group.sort(key=lambda e: e.offset)
    return out


class PackSink:
    """The packs one run writes (a persist pass, a restore): one open pack per thread, so workers never wait on
    each other, each rolled over at PACK_TARGET. Packs are filled under `staging` (the run's private dir in
    `.tabby-modal/`, same filesystem) and named by a random id; `finish()` closes them for the caller's barrier."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[str, PackWriter, dict[str, int]]] = []
        self.done: dict[str, tuple[Path, int]] = {}  # pack id -> (closed temp file, size)

    def _writer(self) -> tuple[str, PackWriter, dict[str, int]]:
        cur = getattr(self._local, "cur", None)
        if cur is None or cur[1].pos >= PACK_TARGET:
            if cur is not None:
                self._close(cur)
            cur = (secrets.token_hex(8), PackWriter(self.staging), {})
            with self._lock:
                self._open.append(cur)
            self._local.cur = cur
        return cur

    def _close(self, cur: tuple[str, PackWriter, dict[str, int]]) -> None:
        pack_id, writer, _ = cur
        tmp = writer.finish()
        with self._lock:
            self._open.remove(cur)
            self.done[pack_id] = (tmp, tmp.stat().st_size)

    def add(self, sha: str, data: bytes) -> tuple[str, int]:
        """Append `data` (hashing to `sha`) to this thread's pack; (pack id, offset). Equal content is stored once
        per pack."""
        pack_id, writer, seen = self._writer()
        off = seen.get(sha)
        if off is None:
            off = seen[sha] = writer.pos
            writer.add(sha, data)
        return pack_id, off

    def finish(self) -> dict[str, tuple[Path, int]]:
        """Close every pack (trailers written, writeback started); pack id -> (temp file, size)."""
        for cur in list(self._open):
            self._close(cur)
        self._local = threading.local()
        return self.done

    def abort(self) -> None:
        for _, writer, _ in self._open:
            writer.abort()
        for tmp, _ in self.done.values():
            tmp.unlink(missing_ok=True)
        self._open, self.done = [], {}


def tree_view(data_dir: Path, manifest: PersistManifest | None) -> dict[str, Entry]:
    """The data dir as it stands when no manifest describes it whole (an interrupted persist, a tree written by
    hand): its plain files (hashes from the manifest where size and mtime still match, else None) and the packed
    files the manifest names (packs never change, so those are whole). A packed entry wins over a plain file at its
    path (a plain file left there is older than the manifest that packed it); where the two disagree on the shape (a
    plain file where a packed one needs a directory, or the other way round), the plain tree wins: it was written
    after that manifest."""
    nodes = scan(data_dir)
    known = manifest.files if manifest else {}
    entries: dict[str, Entry] = {}
    for p, n in nodes.items():
        k = known.get(p)
        same = (
            k is not None
            and k.link is None
            and k.pack is None
            and (k.size, k.mtime_ns) == (n.size, n.mtime_ns)
        )
        entries[p] = Entry(p, n.size, n.mtime_ns, n.mode, k.sha256 if same and k else None, link=n.link)
    plain_dirs = {d for p in nodes for d in _parents(p)}
    for e in known.values():
        if e.pack is not None and e.path not in plain_dirs and not any(d in nodes for d in _parents(e.path)):
            entries[e.path] = e
    return entries


def holdings(data_dir: Path, manifest: PersistManifest | None, pending: bool) -> dict[str, Entry]:
    """What the data dir holds, by path: its manifest's files when that manifest describes it whole (no pending
    marker), else the tree as it stands (`tree_view`). For the tools that read a data dir (inspect, restore's
    "is it empty", repair): a plain `scan` misses every packed file."""
    if manifest is not None and not pending:
        return manifest.files
    return tree_view(data_dir, manifest)


def _parents(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path
