"""Progress of long operations (persist, hydrate, snapshot, restore, verify, export, import) on stderr.

On a terminal (stderr a TTY, not CI, not a Modal container) a live rich bar with files, bytes, rate and ETA that
stays on screen, followed by a summary line. Elsewhere throttled plain lines, at most one every `interval` seconds,
that read the same in `modal` logs and CI output:

    persist: 5887/21026 files, 379.4/1844.0 MiB, 37.9 MiB/s, ETA 39s
    persist: 21026/21026 files, 1844.0/1844.0 MiB, 50.9 MiB/s, done in 36s

The ETA counts *work units* (bytes + files x per-file cost in bytes), not bytes alone: a run of many small files is
paced by creating, fsyncing and renaming each file, so a byte rate taken while big files went by says nothing of the
thousands of small ones left (a 20k-file first persist read "ETA 1s" with 15 s to go). The per-file cost is fitted
from the run itself (least squares of elapsed time on files and bytes done, once the mix of sizes has varied enough to
tell them apart; until then a prior); the rate of work units is measured over a moving window, so a run that speeds
up or slows down is followed; the clock starts when the totals are known, not when the reporter was made (a scan
before the copy is not copying).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

DEFAULT_INTERVAL = 5.0
# One file's fixed cost (create, fsync, rename, metadata) in bytes of copying, until the run shows its own: about
# what a local SSD costs (a 20k-file persist here: 0.8 ms per file at 86 MiB/s, ~70 KiB).
PRIOR_FILE_COST = 64 << 10
# 1 - correlation² of files and bytes done over the run: below this the two cannot be told apart, keep the prior.
MIN_SPREAD = 0.01
# The rate is measured over the last max(WINDOW_MIN, WINDOW_FRACTION x elapsed) seconds.
WINDOW_MIN = 5.0
WINDOW_FRACTION = 0.25
POINTS_PER_WINDOW = 500
# No ETA before this share of the work is done: one file after 2 s says nothing of the 20k to come.
MIN_DONE = 0.01
# The live bar appears once a run has lasted this long (or `interval`, if shorter): short runs stay silent.
BAR_DELAY = 1.0
MAX_FILE_COST = float(1 << 40)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 9.95:  # tenths while they matter: "ETA 0s" of a 3 s run says nothing
        return f"{max(seconds, 0.0):.1f}s"
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def on_terminal() -> bool:
    """True where a person watches stderr live: a TTY, and not CI output or a Modal container's log."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return False
    if os.environ.get("MODAL_TASK_ID") or os.environ.get("MODAL_IS_REMOTE"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Estimate:
    """Remaining time of a run from what it has done so far: files and bytes done at each moment (`record`).

    Time is modelled as `a x files + b x bytes`; `file_cost()` is a/b in bytes. Sums for the least-squares fit of
    elapsed time on (files, bytes done), each sample weighted by the time it covers, are kept as running totals, so a
    20k-file run costs O(1) per file; points are kept only for the rate window.
    """

    def __init__(self, start: float) -> None:
        self.start = start
        self._t = 0.0
        self._ff = self._fb = self._bb = self._tf = self._tb = 0.0
        self._points: deque[tuple[float, int, int]] = deque([(0.0, 0, 0)])

    def record(self, now: float, files: int, nbytes: int) -> None:
        t = now - self.start
        w = t - self._t
        if w > 0:
            f, b = float(files), nbytes / (1 << 20)  # MiB: keeps the sums in a comfortable float range
            self._ff += w * f * f
            self._fb += w * f * b
            self._bb += w * b * b
            self._tf += w * t * f
            self._tb += w * t * b
            self._t = t
        # Points closer than 1/500 of the window merge into the last one: a million-file run keeps ~1000 points.
        if len(self._points) >= 2 and t - self._points[-2][0] < self._window(t) / POINTS_PER_WINDOW:
            self._points[-1] = (t, files, nbytes)
        else:
            self._points.append((t, files, nbytes))
        # The window start only moves forward (WINDOW_FRACTION < 1): points before it are never needed again.
        edge = t - self._window(t)
        while len(self._points) > 2 and self._points[1][0] <= edge:
            self._points.popleft()

    @staticmethod
    def _window(t: float) -> float:
        return max(WINDOW_MIN, WINDOW_FRACTION * t)

    def file_cost(self) -> float:
        """One file's fixed cost in bytes of copying, fitted once files and bytes done have not kept in step."""
        ff, fb, bb = self._ff, self._fb, self._bb
        if ff <= 0 or bb <= 0:
            return PRIOR_FILE_COST
        det = ff * bb - fb * fb
        if det / (ff * bb) < MIN_SPREAD:
            return PRIOR_FILE_COST
        a = (self._tf * bb - self._tb * fb) / det  # seconds per file
        b = (ff * self._tb - fb * self._tf) / det  # seconds per MiB
        if a <= 0:
            return 0.0
        if b <= 0:
            return MAX_FILE_COST
        return min(a / b * (1 << 20), MAX_FILE_COST)

    def remaining(self, files_left: int, bytes_left: int) -> float | None:
        """Seconds the work left takes at the recent rate, as of the last `record`; None before any rate is known."""
        k = self.file_cost()
        t, files, nbytes = self._points[-1]
        t0, files0, nbytes0 = self._points[0]
        done = (nbytes - nbytes0) + k * (files - files0)
        if t - t0 <= 0 or done <= 0:
            # Nothing finished within the window (one big file in flight): the whole run's rate.
            t0, files0, nbytes0 = 0.0, 0, 0
            done = nbytes + k * files
            if t <= 0 or done <= 0:
                return None
        return (bytes_left + k * files_left) * (t - t0) / done

    def done_fraction(self, files: int, nbytes: int, total_files: int, total_bytes: int) -> float:
        k = self.file_cost()
        whole = total_bytes + k * total_files
        return min(1.0, (nbytes + k * files) / whole) if whole > 0 else 1.0

    def byte_rate(self) -> float:
        """Bytes per second over the window."""
        t, _, nbytes = self._points[-1]
        t0, _, nbytes0 = self._points[0]
        return (nbytes - nbytes0) / (t - t0) if t > t0 else 0.0

    @property
    def last(self) -> float:
        """Clock time of the last `record`."""
        return self.start + self._points[-1][0]


class Progress:
    """Count work as it is done (`add`, thread-safe) and show it: a live bar on a terminal, else a line when
    `interval` seconds have passed. `finish()` closes it with a summary line, but only if something was shown
    before, so short runs stay silent.

    `bar`: None decides by `on_terminal()` (never when `stream` is given: tests and callers that capture lines).
    """

    def __init__(
        self,
        label: str,
        *,
        total_files: int | None = None,
        total_bytes: int | None = None,
        interval: float = DEFAULT_INTERVAL,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        bar: bool | None = None,
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
        # The bar is drawn outside `_lock` (rich's refresh thread takes it through FactsColumn); this one orders
        # the workers' redraws against finish(), so no redraw lands after the summary or starts a second bar.
        self._bar_lock = threading.Lock()
        self._finished = False
        self._bar_wanted = bar if bar is not None else (stream is None and on_terminal())
        self._bar: Any = None  # the rich Progress while it is shown
        self._bar_task: Any = None
        self._bar_shown = False
        self._bar_pushed = 0.0
        # The ETA clock starts with the work: when totals are known (a scan before them is not copying).
        self._estimate = Estimate(self._start) if total_files is not None or total_bytes is not None else None

    def set_totals(self, files: int | None = None, nbytes: int | None = None) -> None:
        with self._lock:
            if files is not None:
                self.total_files = files
            if nbytes is not None:
                self.total_bytes = nbytes
            if self._estimate is None and self.files == 0 and self.bytes == 0:
                self._estimate = Estimate(self.clock())

    def add(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files += files
            self.bytes += nbytes
            now = self.clock()
            if self._estimate is None:
                self._estimate = Estimate(self._start)
            self._estimate.record(now, self.files, self.bytes)
            if self._bar_wanted:
                push = now - self._bar_pushed >= 0.1 and now - self._start >= min(BAR_DELAY, self.interval)
                if push:
                    self._bar_pushed = now
                    fraction = self._fraction()
            else:
                if now - self._last < self.interval:
                    return
                self._last = now
                line = self.line(now)
        if self._bar_wanted:
            if push:  # outside our lock: rich's refresh thread holds its own lock while it asks us (_facts)
                self._show_bar(fraction)
            return
        self._print(line)

    def line(self, now: float | None = None) -> str:
        """`label: files, bytes, rate, ETA` as of `now` (default: the clock)."""
        return f"{self.label}: {self._facts(now if now is not None else self.clock())}"

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, or None when it cannot be told (no totals, nothing done yet, or all done)."""
        est = self._estimate
        if est is None or (self.total_bytes is None and self.total_files is None):
            return None
        files_left = max((self.total_files or 0) - self.files, 0)
        bytes_left = max((self.total_bytes or 0) - self.bytes, 0)
        if not files_left and not bytes_left:
            return None
        if (
            est.done_fraction(self.files, self.bytes, self.files + files_left, self.bytes + bytes_left)
            < MIN_DONE
        ):
            return None
        left = est.remaining(files_left, bytes_left)
        if left is None:
            return None
        # Counts down between two records (a big file in flight), never below zero.
        return max(left - ((now if now is not None else self.clock()) - est.last), 0.0)

    def _facts(self, now: float) -> str:
        files = f"{self.files}/{self.total_files}" if self.total_files is not None else str(self.files)
        size = (
            f"{self.bytes / (1 << 20):.1f}/{mib(self.total_bytes)}" if self.total_bytes else mib(self.bytes)
        )
        rate = self._estimate.byte_rate() if self._estimate is not None else 0.0
        text = f"{files} files, {size}, {mib(rate)}/s"
        left = self.eta(now)
        if left is not None:
            text += f", ETA {_duration(left)}"
        return text

    def _fraction(self) -> float | None:
        if self._estimate is None or self.total_files is None or self.total_bytes is None:
            return None
        return self._estimate.done_fraction(self.files, self.bytes, self.total_files, self.total_bytes)

    def finish(self) -> None:
        with self._bar_lock:
            self._finished = True  # from here no worker's add draws (or starts) a bar
        with self._lock:
            if not self.lines and not self._bar_shown:
                return
            now = self.clock()
            line = self.line(now) + f", done in {_duration(now - self._start)}"
            fraction = self._fraction()
        with self._bar_lock:
            if self._bar is not None:
                self._draw(fraction)
                self._stop_bar()
        self._print(line)

    def _print(self, line: str) -> None:
        self.lines += 1
        stream = self.stream if self.stream is not None else sys.stderr
        print(line, file=stream, flush=True)

    # --- the live bar (a terminal) ---------------------------------------------------------------------------------

    def _show_bar(self, fraction: float | None) -> None:
        with self._bar_lock:
            if not self._finished:
                self._draw(fraction)

    def _draw(self, fraction: float | None) -> None:
        if self._bar is None:
            self._bar, self._bar_task = _rich_bar(self)
            self._bar_shown = True
            atexit.register(self._stop_bar)  # an exception past us must not leave the cursor hidden
        self._bar.update(self._bar_task, completed=fraction or 0.0, total=None if fraction is None else 1.0)

    def _stop_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.stop()
            atexit.unregister(self._stop_bar)


def _rich_bar(owner: Progress) -> tuple[Any, Any]:
    """A started rich progress display on stderr with one task for `owner`; rich is imported only here."""
    from rich.console import Console
    from rich.progress import BarColumn, ProgressColumn, TextColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class FactsColumn(ProgressColumn):
        """Files, bytes, rate and our ETA (rich's own ETA column divides bytes left by a byte rate)."""

        def render(self, task: Any) -> Text:
            with owner._lock:
                return Text(owner._facts(owner.clock()))

    bar = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        FactsColumn(),
        console=Console(file=sys.stderr, force_terminal=True),
        transient=False,  # the last frame stays on screen, above the summary line
        refresh_per_second=4,
        redirect_stdout=False,  # stdout may carry --json; only stderr is ours to redraw around
    )
    task = bar.add_task(owner.label, total=1.0)
    bar.start()
    return bar, task


class _Silent(Progress):
    def add(self, files: int = 0, nbytes: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


def silent() -> Progress:
    """A reporter that prints nothing (library calls, tests)."""
    return _Silent("", bar=False)
