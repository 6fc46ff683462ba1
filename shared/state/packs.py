"""The pack format: small blobs appended one after another in one file, then an index of them.

A pack ends with its own index (sha256, offset, length of each blob: see `pack_trailer`), protected by a checksum,
so one rename publishes a pack with its index; its name is a random id, written once and never changed. Small blobs
go to packs because a Tabby index is ~10k small files per GiB: one file, fsync and rename per blob cost far more
than the bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from shared.state.atomic import SHA256_RE, ensure_dir, start_writeback, tmp_path
from shared.state.errors import StateError
from shared.state.space import room_for

PACK_BLOB_MAX = 1 << 20  # blobs smaller than this go into packs
PACK_TARGET = 16 << 20  # a pack is closed once it holds this much
PACK_BUFFER = 1 << 20
PACK_MAGIC = b"TMPACK1\n"
PACK_FOOTER = struct.Struct(">Q32s8s")  # trailer length, sha256 of the trailer, magic


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


class PackSlice(io.RawIOBase):
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


class PackWriter:
    """One pack being filled under a temp name in `packs/`; its trailer is written by `finish()`."""

    def __init__(self, root: Path) -> None:
        ensure_dir(root / "packs", durable=False)
        self.tmp = tmp_path(root / "packs" / "pack")
        self.f = open(self.tmp, "xb", buffering=PACK_BUFFER)  # noqa: SIM115 - closed by finish() or abort()
        self.entries: list[tuple[str, int, int]] = []
        self.pos = 0

    def add(self, sha: str, data: bytes) -> None:
        with room_for(self.tmp, len(data)):  # a buffered file: a short raw write is retried, then raises
            self.f.write(data)
        self.entries.append((sha, self.pos, len(data)))
        self.pos += len(data)

    def finish(self) -> Path:
        with room_for(self.tmp, self.pos):
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
