"""Files written whole or not at all, and streaming sha256.

Every publishing write goes: temp file in the same directory, write, fsync, rename over the final name, fsync the
directory. A crash leaves either the old file, the new one, or a stray temp file (named with `TMP_MARK`, which every
walker skips and the cleaners remove), never a torn file under the final name.

Every write writes all its bytes or raises: short writes are looped over, a kernel copy that stops early is finished
with plain writes (so the real error surfaces), and the size written is checked against the file. A full disk
(ENOSPC, EDQUOT, EFBIG) becomes `DiskFull` (shared.state.space builds its one line: which mount, how much was
needed, how much is free).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import io
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from shared.state.errors import HashMismatch
from shared.state.space import room_for, short_write

CHUNK = 1 << 20
TMP_MARK = ".tmtmp-"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# No space, no quota, or past a file size limit (RLIMIT_FSIZE, the filesystem's maximum): all "the write did not fit".


def write_all(fd: int, data: bytes | memoryview) -> int:
    """os.write until every byte of `data` is written (a write may be short near a full disk or a size limit; the
    next one then raises ENOSPC/EFBIG). Returns len(data)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise short_write(f"fd {fd}")
        view = view[n:]
    return len(data)


def is_tmp(name: str) -> bool:
    return TMP_MARK in name


def tmp_path(path: Path) -> Path:
    """A unique temp name next to `path`, so the final rename never crosses filesystems."""
    return path.with_name(f".{path.name[:100]}{TMP_MARK}{secrets.token_hex(4)}")


def sync_fs(path: Path) -> None:
    """One durability barrier for everything written on `path`'s filesystem (syncfs; sync where it is missing).

    A failing syncfs (EIO, ENOSPC: writeback found no room or a bad disk) raises: the data is not known to be on
    disk, so nothing may name it. Only "not implemented here" falls back to sync(), which reports nothing."""
    fn = _syncfs()
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if fn(fd) != 0:
            code = ctypes.get_errno()
            if code not in (errno.ENOSYS, errno.EOPNOTSUPP):
                with room_for(path):
                    raise OSError(code, f"syncfs failed: {os.strerror(code)}", str(path))
            os.sync()
    finally:
        os.close(fd)


_LIBC: dict[str, object] = {}


def _libc(name: str):  # type: ignore[no-untyped-def]
    if name not in _LIBC:
        try:
            _LIBC[name] = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
        except (OSError, AttributeError, TypeError):
            _LIBC[name] = None
    return _LIBC[name]


def _syncfs():  # type: ignore[no-untyped-def]
    return _libc("syncfs")


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing this file to disk now, without waiting (sync_file_range WRITE): the disk
    works while we copy the next files, and the closing `sync_fs` barrier has little left to wait for."""
    fn = _libc("sync_file_range")
    if fn is not None:
        fn(fd, ctypes.c_int64(0), ctypes.c_int64(0), 2)  # SYNC_FILE_RANGE_WRITE


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
            with room_for(d):  # a full disk (or inode table) refuses new directories too
                d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
        if durable:
            fsync_dir(d.parent)


_LOCAL = threading.local()


def _buffer() -> tuple[bytearray, memoryview]:
    """One reusable buffer per thread: a fresh megabyte per file costs page faults on every use."""
    got = getattr(_LOCAL, "buf", None)
    if got is None:
        buf = bytearray(CHUNK)
        got = _LOCAL.buf = (buf, memoryview(buf))
    return got


def _pump(src: BinaryIO, dst: BinaryIO | None, h: hashlib._Hash) -> int:
    buf, view = _buffer()
    total = 0
    while True:
        n = src.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            return total
        chunk = view[:n]
        h.update(chunk)
        while dst is not None and chunk:
            # A raw (unbuffered) file may take fewer bytes than given near a full disk or a size limit: write the
            # rest, so the next call raises the real error (ENOSPC, EFBIG) instead of leaving a short file.
            wrote = dst.write(chunk)
            if not wrote:
                raise short_write(getattr(dst, "name", "?"))
            chunk = chunk[wrote:]
        total += n


def _kernel_copy(src: BinaryIO, out: BinaryIO) -> int | None:
    """Copy a regular file's remaining bytes into `out` inside the kernel; None where that is not possible."""
    try:
        fd_in = src.fileno()
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
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
            # Some filesystems answer 0 instead of an error: never take that for an empty file.
            if pos == 0 and st.st_size > start:
                return None
            if os.fstat(fd_in).st_size > start + pos:
                # Stopped before the source's end (a full disk may answer 0 here): never take that for the whole
                # file. Plain writes finish it, or raise the error copy_file_range did not give.
                src.seek(start + pos)
                out.seek(pos)
                pos += _pump(src, out, hashlib.sha256())
            return pos
        pos += n


def _hash_fd(fd: int, size: int) -> str:
    """sha256 of the first `size` bytes of `fd`, read with pread (faster than mmap's page faults in a VM)."""
    h = hashlib.sha256()
    buf, view = _buffer()
    pos = 0
    while pos < size:
        n = os.preadv(fd, [buf], pos)
        if n == 0:
            break
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def _fill(src: BinaryIO, out: BinaryIO) -> tuple[int, str]:
    """Write the rest of `src` into the fresh file `out`; (size, sha256 of what `out` now holds).

    Regular files go through copy_file_range, and the hash is taken from `out` afterwards, not from `src`: if the
    source changes meanwhile (a live file), the hash still describes exactly the bytes written.
    """
    size = _kernel_copy(src, out)
    if size is not None:
        digest = _hash_fd(out.fileno(), size)
    else:
        h = hashlib.sha256()
        size = _pump(src, out, h)
        out.flush()
        digest = h.hexdigest()
    on_disk = os.fstat(out.fileno()).st_size
    if on_disk != size:  # what a manifest records must be what the file holds
        raise OSError(
            errno.EIO, f"wrote {size} bytes but the file holds {on_disk}", getattr(out, "name", "?")
        )
    return size, digest


def _remaining(src: BinaryIO, sig: tuple[int, int] | None = None) -> int | None:
    """Bytes left in `src` when it is a regular file (what a write of it needs), else None; `sig` is its
    `_stable_sig` when the caller took one (the size is read from it, not from a second look)."""
    try:
        if sig is None:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            sig = (st.st_size, st.st_mtime_ns)
        return max(sig[0] - src.tell(), 0)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _stable_sig(src: BinaryIO) -> tuple[int, int] | None:
    try:
        st = os.fstat(src.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


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


def read_upto(reader: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes of a stream (fewer only at its end)."""
    parts, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_small(path: Path, limit: int) -> bytes | None:
    """The whole content of the regular file `path` in one buffer, or None when it holds more than `limit` bytes
    (the caller streams it instead). FileNotFoundError when it is gone."""
    with open(path, "rb", buffering=0) as f:
        data = read_upto(f, limit + 1)
    return None if len(data) > limit else data


def current_umask() -> int | None:
    """The process umask, read without changing it (os.umask would race other threads); None if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def write_new_bytes(
    dst: Path, data: bytes | memoryview, *, mode: int, mtime_ns: int | None = None, umask: int | None = None
) -> None:
    """Create `dst` (it must not exist) holding `data`, with `mode` and `mtime_ns`, in a private staging tree: no
    temp name, no fsync (the caller puts one barrier over the whole tree). Few system calls, for many small files:
    with the process `umask` given (see `current_umask`), the chmod is skipped when the umask keeps `mode` as is."""
    with room_for(dst, len(data)):
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o777)
        try:
            write_all(fd, data)
            if mode & ~0o777 or umask is None or mode & umask:
                os.fchmod(fd, mode)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        except BaseException:
            os.close(fd)
            dst.unlink(missing_ok=True)
            raise
        os.close(fd)


def write_new_files(
    root: Path,
    items: Iterable[tuple[str, bytes | memoryview, int, int]],
    *,
    umask: int | None = None,
) -> None:
    """`write_new_bytes` for many small files under `root` (relative path, data, mode, mtime_ns), with the per-file
    Python work cut to the system calls: hydrate creates 200,000 of them, and this loop holds the GIL between
    calls. A full disk names `root`; a file that fails is removed again."""
    base = os.fspath(root)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    with room_for(Path(root)):
        for rel, data, mode, mtime_ns in items:
            path = f"{base}/{rel}"
            fd = os.open(path, flags, mode & 0o777)
            try:
                if os.write(fd, data) != len(data):
                    write_all(fd, memoryview(data)[os.fstat(fd).st_size :])
                if mode & ~0o777 or umask is None or mode & umask:
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)


def write_temp(
    dst: Path,
    src: BinaryIO,
    *,
    expect_sha256: str | None = None,
    mode: int | None = None,
    mtime_ns: int | None = None,
    durable: bool = True,
    writeback: bool = False,
) -> tuple[Path, int, str]:
    """Write the rest of `src` to a temp file next to `dst`, unpublished; returns (temp path, size, sha256).

    The caller renames it into place (after its own durability barrier when `durable=False`; `writeback` starts
    the disk write at once so that barrier is short). With `expect_sha256`, a mismatch raises HashMismatch and the
    temp file is gone.
    """
    ensure_dir(dst.parent, durable=durable)
    tmp = tmp_path(dst)
    size, digest = _write_new(tmp, src, expect_sha256, mode, mtime_ns, durable, writeback)
    return tmp, size, digest


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    # Inside `room_for`: the partial file is gone before the free space is measured for the message.
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_new(
    path: Path,
    src: BinaryIO,
    expect_sha256: str | None,
    mode: int | None,
    mtime_ns: int | None,
    durable: bool,
    writeback: bool = False,
) -> tuple[int, str]:
    """Create `path` (it must not exist) with the rest of `src`; on any failure it is removed again."""
    # One fstat for both: a live source that grows between two looks must not read as one that came across short.
    before = _stable_sig(src)
    needed = _remaining(src, before)
    with room_for(path, needed), _removed_on_failure(path), open(path, "x+b", buffering=0) as out:
        size, digest = _fill(src, out)
        if needed is not None and before is not None and size != needed and _stable_sig(src) == before:
            # A source that did not change while we copied must have come across whole.
            raise OSError(errno.EIO, f"copied {size} of {needed} bytes", str(path))
        if expect_sha256 is not None and digest != expect_sha256:
            raise HashMismatch(f"{path.name}: content hashes to {digest[:12]}, expected {expect_sha256[:12]}")
        if mode is not None:
            os.fchmod(out.fileno(), mode)
        if mtime_ns is not None:
            os.utime(out.fileno(), ns=(mtime_ns, mtime_ns))
        if durable:
            os.fsync(out.fileno())
        elif writeback:
            start_writeback(out.fileno())
    return size, digest


def write_private(
    dst: Path,
    src: BinaryIO,
    *,
    expect_sha256: str | None = None,
    mode: int | None = None,
    mtime_ns: int | None = None,
) -> tuple[int, str]:
    """Create `dst` in a private staging tree: no temp name, no fsync (the caller checks the tree, then puts one
    barrier before it is swapped in). `dst` must not exist; on a hash mismatch it is removed again."""
    ensure_dir(dst.parent, durable=False)
    return _write_new(dst, src, expect_sha256, mode, mtime_ns, durable=False)


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
    tmp = tmp_path(path)
    with room_for(path, len(data)), _removed_on_failure(tmp):
        ensure_dir(path.parent, durable=durable)
        with open(tmp, "xb", buffering=0) as out:
            write_all(out.fileno(), data)
            os.fchmod(out.fileno(), mode)
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
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
