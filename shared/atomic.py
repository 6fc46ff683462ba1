"""Files written whole or not at all, streaming sha256, and checks that relative paths stay inside a root.

Every publishing write goes: temp file in the same directory, write, fsync, rename over the final name, fsync the
directory. A crash leaves either the old file, the new one, or a stray temp file (named with `TMP_MARK`, which every
walker skips and the cleaners remove), never a torn file under the final name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import mmap
import os
import posixpath
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
TMP_MARK = ".tmtmp-"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_LINK_HOPS = 40


class StateError(ValueError):
    """Bad input or a refused state operation. The message is one line, fit for the CLI."""


class HashMismatch(StateError):
    """Bytes did not hash to the sha256 they were promised to have: nothing was published."""


def is_tmp(name: str) -> bool:
    return TMP_MARK in name


def tmp_path(path: Path) -> Path:
    """A unique temp name next to `path`, so the final rename never crosses filesystems."""
    return path.with_name(f".{path.name[:100]}{TMP_MARK}{secrets.token_hex(4)}")


def sync_fs(path: Path) -> None:
    """One durability barrier for everything written on `path`'s filesystem (syncfs; sync where it is missing)."""
    fn = _syncfs()
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_SYNCFS: list = []


def _syncfs():  # type: ignore[no-untyped-def]
    if not _SYNCFS:
        try:
            _SYNCFS.append(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).syncfs)
        except (OSError, AttributeError, TypeError):
            _SYNCFS.append(None)
    return _SYNCFS[0]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, durable: bool = True) -> None:
    """mkdir -p; with `durable`, fsync the parent of every directory created so the new entries survive a crash."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
        if durable:
            fsync_dir(d.parent)


def _pump(src: BinaryIO, dst: BinaryIO | None, h: hashlib._Hash) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = src.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            return total
        chunk = view[:n]
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
        total += n


def _kernel_copy(src: BinaryIO, out: BinaryIO) -> int | None:
    """Copy a regular file's remaining bytes into `out` inside the kernel; None where that is not possible."""
    try:
        fd_in = src.fileno()
        if not stat.S_ISREG(os.fstat(fd_in).st_mode):
            return None
        start = src.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    fd_out, pos = out.fileno(), 0
    while True:
        try:
            n = os.copy_file_range(fd_in, fd_out, 1 << 30, start + pos, pos)
        except OSError:
            if pos:
                raise
            return None  # unsupported here (some network and FUSE filesystems): plain reads and writes
        if n == 0:
            return pos
        pos += n


def _hash_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    if size:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            h.update(mm)
    return h.hexdigest()


def _fill(src: BinaryIO, out: BinaryIO) -> tuple[int, str]:
    """Write the rest of `src` into the fresh file `out`; (size, sha256 of what `out` now holds).

    Regular files go through copy_file_range, and the hash is taken from `out` afterwards, not from `src`: if the
    source changes meanwhile (a live file), the hash still describes exactly the bytes written.
    """
    size = _kernel_copy(src, out)
    if size is not None:
        return size, _hash_fd(out.fileno(), size)
    h = hashlib.sha256()
    size = _pump(src, out, h)
    out.flush()
    return size, h.hexdigest()


def hash_stream(src: BinaryIO) -> tuple[int, str]:
    """(size, sha256 hex) of everything left in `src`."""
    h = hashlib.sha256()
    size = _pump(src, None, h)
    return size, h.hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f)


def sha256_file(path: Path) -> str:
    return hash_file(path)[1]


def write_temp(
    dst: Path,
    src: BinaryIO,
    *,
    expect_sha256: str | None = None,
    mode: int | None = None,
    mtime_ns: int | None = None,
    durable: bool = True,
) -> tuple[Path, int, str]:
    """Write the rest of `src` to a temp file next to `dst`, unpublished; returns (temp path, size, sha256).

    The caller renames it into place (after its own durability barrier when `durable=False`). With
    `expect_sha256`, a mismatch raises HashMismatch and the temp file is gone.
    """
    ensure_dir(dst.parent, durable=durable)
    tmp = tmp_path(dst)
    try:
        with open(tmp, "x+b", buffering=0) as out:
            size, digest = _fill(src, out)
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            if durable:
                os.fsync(out.fileno())
        if expect_sha256 is not None and digest != expect_sha256:
            raise HashMismatch(f"{dst.name}: content hashes to {digest[:12]}, expected {expect_sha256[:12]}")
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest


def write_stream(
    dst: Path,
    src: BinaryIO,
    *,
    expect_sha256: str | None = None,
    mode: int | None = None,
    mtime_ns: int | None = None,
    durable: bool = True,
) -> tuple[int, str]:
    """Publish the rest of `src` at `dst` atomically; returns (size, sha256).

    With `expect_sha256`, a mismatch raises HashMismatch and nothing is published. `durable=False` skips the fsyncs
    (for scratch trees such as a container's local disk, or when the caller puts one `sync_fs` barrier after many).
    """
    tmp, size, digest = write_temp(
        dst, src, expect_sha256=expect_sha256, mode=mode, mtime_ns=mtime_ns, durable=durable
    )
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dst.parent)
    return size, digest


def copy_file(
    src: Path,
    dst: Path,
    *,
    expect_sha256: str | None = None,
    mode: int | None = None,
    mtime_ns: int | None = None,
    durable: bool = True,
) -> tuple[int, str]:
    """Copy `src` to `dst` through a temp file, hashing on the way; returns (size, sha256)."""
    with open(src, "rb", buffering=0) as f:
        return write_stream(
            dst, f, expect_sha256=expect_sha256, mode=mode, mtime_ns=mtime_ns, durable=durable
        )


def write_bytes(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Small files (manifests, markers): replace `path` with `data` atomically."""
    ensure_dir(path.parent, durable=durable)
    tmp = tmp_path(path)
    try:
        with open(tmp, "xb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def make_link(path: Path, target: str, *, durable: bool = True) -> None:
    """Create or replace the symlink `path` -> `target` atomically."""
    ensure_dir(path.parent, durable=durable)
    tmp = tmp_path(path)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


# --- Relative paths that must stay inside a root ------------------------------------------------------------


def check_relpath(path: object) -> str:
    """A manifest path: relative, posix, no `.`/`..`/empty parts, no NUL. Returns it unchanged or raises StateError."""
    if not isinstance(path, str) or not path:
        raise StateError(f"bad path {path!r}: not a non-empty string")
    if path.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", path):
        raise StateError(f"bad path {path!r}: absolute")
    if "\x00" in path or "\\" in path:
        raise StateError(f"bad path {path!r}: NUL or backslash")
    parts = path.split("/")
    if ".." in parts:
        raise StateError(f"bad path {path!r}: '..' leaves the root")
    if any(p in ("", ".") for p in parts):
        raise StateError(f"bad path {path!r}: not normalised")
    return path


def resolve_inside(links: Mapping[str, str], path: str) -> str | None:
    """Where `path` lands after following the tree's own symlinks (`links`: path -> target), or None if it leaves.

    Pure string work over the manifest, so a malicious manifest is judged before anything is written.
    """
    out: list[str] = []
    todo = [p for p in path.split("/")]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        candidate = "/".join([*out, part])
        target = links.get(candidate)
        if target is None:
            out.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS or target.startswith("/"):
            return None
        todo = target.split("/") + todo
    return "/".join(out)


def link_escapes(links: Mapping[str, str], path: str) -> bool:
    """Does the symlink at `path` point outside the root (absolute, or through `..`, or via other links)?"""
    target = links[path]
    if not target or target.startswith("/"):
        return True
    return resolve_inside(links, posixpath.join(posixpath.dirname(path), target)) is None


def check_tree(paths: Iterable[str], links: Mapping[str, str]) -> None:
    """A whole manifest's paths: each safe, none twice, none under another file or link, no link leaving the root."""
    seen: set[str] = set()
    for p in paths:
        check_relpath(p)
        if p in seen:
            raise StateError(f"bad path {p!r}: listed twice")
        seen.add(p)
    for p in seen:
        parent = posixpath.dirname(p)
        while parent:
            if parent in seen:
                raise StateError(f"bad path {p!r}: its parent {parent!r} is a file or link")
            parent = posixpath.dirname(parent)
    for p in links:
        if link_escapes(links, p):
            raise StateError(f"bad link {p!r} -> {links[p]!r}: leaves the root")


def inside(root: Path, path: Path) -> bool:
    """On disk: does `path`, with every symlink resolved, stay under `root`?"""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)
