"""The data dir's writer lock: persist, restore and reset write the data dir one at a time on this machine.

An exclusive `fcntl.flock` on a file in the data dir's meta folder (`shared.state.mirror.WRITER_LOCK`), waited for
without a deadline and released by the kernel when the holder closes it or dies. So a restore never lands in the
middle of a persist pass, and the pass after it sees the new epoch. Where the filesystem has no flock, it goes on
without.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from shared.state.atomic import ensure_dir

# What a filesystem without flock answers: the writer goes on unlocked rather than failing.
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


@contextlib.contextmanager
def holding(path: Path) -> Iterator[None]:
    """Hold the exclusive flock on `path` (created, with its folder, if missing) for the block."""
    path = Path(path)
    ensure_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise
        yield
    finally:
        os.close(fd)  # releases the lock
