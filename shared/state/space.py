"""Room on a disk: the mount point and free space under a path, and the one `DiskFull` line of the state engine
(`disk full on /mnt (writing /mnt/x): needs ..., ... free (no space left)`) that every full-disk write becomes."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from shared.state.errors import DiskFull

# No space, no quota, or past a file size limit (RLIMIT_FSIZE, the filesystem's maximum): all "the write did not fit".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_CAUSES = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "quota exceeded",
    errno.EFBIG: "file size limit reached",
}


def _existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would hold it)."""
    p = _existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on `path`'s filesystem (statvfs f_bavail), None if unknown."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _amount(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB ({n} bytes)"


def disk_full(
    path: Path, needed: int | None = None, err: OSError | None = None, *, cause: str | None = None
) -> DiskFull:
    """The one `DiskFull` error of the state engine: `disk full on /mnt (writing /mnt/x/y): needs 2.9 MiB
    (3000000 bytes), 2.3 MiB (2396160 bytes) free (no space left)`. `needed` is what the failed write (or run)
    still had to write, when known."""
    path = Path(os.path.abspath(path))
    free = free_bytes(path)
    need = f"needs {_amount(needed)}" if needed is not None else "needs more room"
    have = f"{_amount(free)} free" if free is not None else "free space unknown"
    if cause is None:
        cause = (
            _CAUSES.get(err.errno, err.strerror or "write failed")
            if err is not None
            else "write stopped short"
        )
    return DiskFull(
        f"disk full on {mount_point(path)} (writing {path}): {need}, {have} ({cause})",
        path=path,
        needed=needed,
        free=free,
    )


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


@contextlib.contextmanager
def room_for(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full-disk OSError raised inside the block into `DiskFull` naming `path` (a DiskFull raised deeper,
    with a more precise path, passes through as it is)."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        raise disk_full(path, needed, err) from None


def short_write(what: Path | str) -> OSError:
    """A write that made no progress (0 bytes): what a full disk looks like where no errno is given."""
    return OSError(errno.ENOSPC, "write made no progress", str(what))
