"""The errors of the state engine: one line each, fit for the CLI (exit 2 where it is a refusal)."""

from __future__ import annotations

from pathlib import Path


class StateError(ValueError):
    """Bad input or a refused state operation. The message is one line, fit for the CLI."""


class HashMismatch(StateError):
    """Bytes did not hash to the sha256 they were promised to have: nothing was published."""


class DiskFull(StateError):
    """A write did not fit on its disk. The message (built by `disk_full` alone) names the mount point, what was
    being written, how much it needed and how much is free; what the failed write had begun is removed."""

    def __init__(self, message: str, *, path: Path, needed: int | None, free: int | None) -> None:
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free
