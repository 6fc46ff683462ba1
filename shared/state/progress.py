"""Throttled progress lines on stderr for long operations: files, bytes, rate, ETA, at most every N seconds.

Plain lines rather than a redrawn bar: they read the same in a terminal, in `modal` logs and in CI output.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

DEFAULT_INTERVAL = 5.0


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Count work as it is done (`add`, thread-safe); a line is printed when `interval` seconds have passed.

    `finish()` prints a closing line only if a progress line was printed before, so short runs stay silent.
    """

    def __init__(
        self,
        label: str,
        *,
        total_files: int | None = None,
        total_bytes: int | None = None,
        interval: float = DEFAULT_INTERVAL,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ) -> None:
        self.label = label
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.interval = interval
        self.stream = stream
        self.clock = clock
        self.files = 0
        self.bytes = 0
        self.lines = 0
        self._start = clock()
        self._last = self._start
        self._lock = threading.Lock()

    def set_totals(self, files: int | None = None, nbytes: int | None = None) -> None:
        with self._lock:
            if files is not None:
                self.total_files = files
            if nbytes is not None:
                self.total_bytes = nbytes

    def add(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files += files
            self.bytes += nbytes
            now = self.clock()
            if now - self._last < self.interval:
                return
            self._last = now
            line = self.line(now)
        self._print(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self.clock()) - self._start, 1e-9)
        rate = self.bytes / elapsed
        files = f"{self.files}/{self.total_files}" if self.total_files is not None else str(self.files)
        size = (
            f"{self.bytes / (1 << 20):.1f}/{mib(self.total_bytes)}" if self.total_bytes else mib(self.bytes)
        )
        text = f"{self.label}: {files} files, {size}, {mib(rate)}/s"
        if self.total_bytes and rate > 0 and self.bytes < self.total_bytes:
            text += f", ETA {_duration((self.total_bytes - self.bytes) / rate)}"
        return text

    def finish(self) -> None:
        with self._lock:
            if not self.lines:
                return
            line = self.line() + f", done in {_duration(self.clock() - self._start)}"
        self._print(line)

    def _print(self, line: str) -> None:
        self.lines += 1
        stream = self.stream if self.stream is not None else sys.stderr
        print(line, file=stream, flush=True)


class _Silent(Progress):
    def add(self, files: int = 0, nbytes: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


def silent() -> Progress:
    """A reporter that prints nothing (library calls, tests)."""
    return _Silent("")
