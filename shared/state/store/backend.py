"""Where the store keeps its objects: the `Backend` interface and `DirectoryBackend` (a local folder or a mounted
Volume), with the object names (`blobs/ab/<sha256>`, `packs/ab/<id>`, `snapshots/<id>.json`).

Durability order: packs and blobs are written under temp names, one `syncfs` makes their bytes durable, they are
renamed into place, a second `syncfs` makes the names durable; only then may a manifest name them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from shared.state.atomic import ensure_dir, fsync_dir, sync_fs, write_bytes, write_stream, write_temp
from shared.state.packs import PACK_TARGET, PackSlice, PackWriter, parse_pack_index
from shared.state.paths import check_relpath


def blob_name(sha256: str) -> str:
    # One level of fan-out: 256 directories at most (a Volume counts every directory against its inode budget).
    return f"blobs/{sha256[:2]}/{sha256}"


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def snapshot_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.json"


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

    def set_aside(self, name: str, to: str) -> None:
        """Move object `name` to `to` (a corrupt loose blob out of `blobs/`, so its name can be written again)."""
        ...


class DirectoryBackend:
    """A plain directory: a local folder, or a mounted Modal Volume (the caller commits it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._pending: list[tuple[Path, Path]] | None = None  # (temp, final) inside a batch
        self._names: set[Path | str] = set()
        self._mutex = threading.Lock()
        self._writers: list[PackWriter] = []  # open packs of the current batch
        self._free: list[PackWriter] = []  # ... that no thread is adding to
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
                # A failing barrier raises (DiskFull on ENOSPC): then no name appears and the temps go.
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
            w = PackWriter(self.root)
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
        return PackSlice(open(self._path(name), "rb", buffering=0), offset, length)  # type: ignore[return-value]

    def pack_index(self, name: str) -> list[tuple[str, int, int]]:
        with open(self._path(name), "rb") as f:
            return parse_pack_index(f, os.fstat(f.fileno()).st_size)

    def set_aside(self, name: str, to: str) -> None:
        dst = self._path(to)
        ensure_dir(dst.parent)
        os.replace(self._path(name), dst)
        fsync_dir(dst.parent)

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
