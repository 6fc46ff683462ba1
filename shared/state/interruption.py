"""Ending a `tabby-modal` command on SIGINT or SIGTERM: within two seconds, exit 130, locks and leases released,
no traceback.

`install()` (called first thing by the `tabby-modal` entry point) turns both signals into the same path:

1. the first signal sets `ABORT` and raises `Interrupted` (a KeyboardInterrupt) in the main thread, so the command
   unwinds through its `with` blocks as after a Ctrl-C: the store lock and the leases are released there, and
   `handled()` prints `error: interrupted` and exits 130;
2. worker pools (`worker_pool`) cancel their queued work at once, and their running workers stop at their next
   `check()` instead of finishing thousands of queued files (a plain `with ThreadPoolExecutor` waits for all of
   them, on its way out and again at interpreter exit);
3. a deadline started by the first signal (from the C-level handler's wakeup byte, so also while the main thread
   is inside C code) ends the process `GRACE` seconds later if it is still there (a worker
   stuck in a large copy, a lock left held by an interrupt landing between `acquire` and `try`): it releases what
   is registered with `holding()` (the store lock file, the leases) and calls `os._exit(130)`. A second signal does
   the same at once.

What an interrupted run leaves is what a crash leaves, which every reader already handles: temp files (skipped,
and removed by the next persist or prune), a persist's pending marker (the next persist repairs the data dir), blobs
no manifest names yet (prune removes them). The data dir's writer lock is an flock: it goes with the process.

Only the `tabby-modal` process installs this: Modal containers and `serve --local` keep their own handlers, and
`ABORT` is never set there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C; also for SIGTERM, so callers see one code
GRACE = 1.0  # seconds from the first signal to the forced exit: well under the 2 s a caller may wait, on a loaded machine too

ABORT = threading.Event()  # set by the first SIGINT/SIGTERM; workers and long loops stop when they see it

T = TypeVar("T")
R = TypeVar("R")


class Interrupted(KeyboardInterrupt):
    """The run was interrupted (SIGINT, SIGTERM): raised in the main thread by the handler, in workers by
    `check()`. A KeyboardInterrupt, so every existing Ctrl-C path (exit 130, cleanup in `finally`) applies."""


def requested() -> bool:
    """Has a SIGINT/SIGTERM asked this process to stop?"""
    return ABORT.is_set()


def check() -> None:
    """Raise Interrupted if the run was interrupted: called by workers between files."""
    if ABORT.is_set():
        raise Interrupted("interrupted")


# --- what the forced exit releases --------------------------------------------------------------------------

_holds: dict[int, Callable[[], None]] = {}
_holds_lock = threading.Lock()
_ids = itertools.count()


@contextlib.contextmanager
def holding(release: Callable[[], None]) -> Iterator[None]:
    """While the block runs, the forced exit calls `release` (once, idempotent: the block's own exit may race it)."""
    key = next(_ids)
    with _holds_lock:
        _holds[key] = release
    try:
        yield
    finally:
        with _holds_lock:
            _holds.pop(key, None)


def register(release: Callable[[], None]) -> int:
    """`holding()` for a lock whose acquire and release are separate calls; `unregister(key)` at release."""
    key = next(_ids)
    with _holds_lock:
        _holds[key] = release
    return key


def unregister(key: int | None) -> None:
    if key is not None:
        with _holds_lock:
            _holds.pop(key, None)


def _release_all() -> None:
    # Newest first, as the `with` blocks would have unwound; a release that fails must not stop the others.
    if not _holds_lock.acquire(timeout=0.2):
        return
    try:
        releases = [r for _, r in sorted(_holds.items(), reverse=True)]
        _holds.clear()
    finally:
        _holds_lock.release()
    for release in releases:
        with contextlib.suppress(BaseException):
            release()


# --- the handler and the forced exit ------------------------------------------------------------------------

_said = threading.Event()  # "error: interrupted" printed once, by `handled()` or by the forced exit
_installed = False


def said() -> None:
    """The command printed its `error: interrupted` line: the forced exit does not repeat it."""
    _said.set()


def forced_exit() -> None:
    """Release what is registered, say so, and end the process now with 130 (no Python cleanup: it may hang)."""
    _release_all()
    if not _said.is_set():
        _said.set()
        with contextlib.suppress(OSError):
            os.write(2, b"error: interrupted\n")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def exit_now(code: int = EXIT_INTERRUPTED) -> NoReturn:
    """The end of an interrupted command that has unwound (its locks released, its line printed): flush and
    leave without the interpreter's teardown, which can take most of a second (thread joins, freeing every
    object) that the caller waiting for the exit does not have."""
    _release_all()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


_raised = threading.Event()
_unwind = False  # False while the process starts (imports: nothing held yet), True once a command runs


def command_starts() -> None:
    """From now on the first signal unwinds the command (its locks released on the way) instead of ending the
    process at once, as it does while it only imports modules."""
    global _unwind
    _unwind = True


_deferring = 0  # > 0 while the main thread is inside `deferred()`
_pending: str | None = None


def command_ends() -> None:
    """The command is done (its code decided): a signal now is ignored, instead of meeting the interpreter's
    teardown, which puts the default handlers back (the process then died of the signal, exit -2, with nothing
    said). Ignored, not blocked: a mask is per thread, and the signal would go to another thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _raised.is_set() or not _unwind:
        forced_exit()  # starting up (nothing to release), or a second signal while the first unwinds
    _raised.set()
    ABORT.set()
    name = signal.Signals(signum).name
    if _deferring:
        _pending = name  # raised where `deferred()` ends; the workers see ABORT meanwhile
        return
    raise Interrupted(name)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Main thread: the interrupt is not raised inside the block but where it ends. For code holding a
    threading lock (ThreadPoolExecutor.submit takes one in `Semaphore.acquire`, `Future.result` in
    `Condition.wait`): an exception landing between that lock's acquire and its release leaves it held, and every
    worker then blocks on it forever (as seen: workers stuck in `Semaphore.release`, the main thread in
    `shutdown`), or a release of a lock never taken raises `RuntimeError: release unlocked lock`."""
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None:
        name, _pending = _pending, None
        raise Interrupted(name)


def _listen(fd: int) -> None:
    """The deadline, started from the C-level signal handler's wakeup byte: it runs even while the main thread
    sits in C code (a large SQLite backup) and cannot run the Python handler yet."""
    deadline: float | None = None
    seen = 0
    while True:
        try:
            data = os.read(fd, 64) if deadline is None else _read_until(fd, deadline)
        except OSError:
            return
        for signum in data or b"":
            if signum not in (signal.SIGINT, signal.SIGTERM) or signal.getsignal(signum) is not _handler:
                continue  # not ours, or someone (serve) took the signal over: theirs to handle
            seen += 1
            ABORT.set()  # workers stop at once, even before the main thread gets to run the handler
            if deadline is None:
                deadline = time.monotonic() + GRACE
            elif seen > 1 and not _raised.is_set():
                forced_exit()  # a second signal while the main thread has not even run the first handler
        if deadline is not None and time.monotonic() >= deadline:
            forced_exit()


def _read_until(fd: int, deadline: float) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    return os.read(fd, 64) if ready else b""


def install() -> None:
    """SIGINT and SIGTERM end this process the clean way (see the module docstring). Main thread only; once."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(r, True)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    threading.Thread(target=_listen, args=(r,), name="interrupt-deadline", daemon=True).start()
    _installed = True


# --- worker pools that stop ---------------------------------------------------------------------------------


class WorkerPool:
    """A ThreadPoolExecutor whose `map` stops early: each item first checks that neither the run (`ABORT`) nor
    this pool (`stop`) was told to stop, and the main thread touches the executor only inside `deferred()`."""

    def __init__(self, workers: int) -> None:
        self.executor = ThreadPoolExecutor(workers)
        self.stop = threading.Event()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Results in the order of `items`, like Executor.map; submits everything first, as it does."""

        def guarded(item: T) -> R:
            if self.stop.is_set():
                raise Interrupted("stopped")
            check()
            return fn(item)

        futures: list[Future[R]] = []
        with deferred():
            for item in items:
                if ABORT.is_set():
                    break
                futures.append(self.executor.submit(guarded, item))
        check()
        return self._results(futures)

    def _results(self, futures: list[Future[R]]) -> Iterator[R]:
        try:
            for fut in futures:
                with deferred():
                    result = fut.result()
                yield result
        finally:
            for fut in futures:
                fut.cancel()


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[WorkerPool]:
    """`with worker_pool(n) as pool: for r in pool.map(fn, items): ...`, a drop-in for `with ThreadPoolExecutor`
    that, when the block raises (an interrupt, a failed item), cancels what has not started and waits only for
    the items already running, which stop at their next check."""
    pool = WorkerPool(workers)
    try:
        yield pool
    except BaseException:
        pool.stop.set()
        with deferred():
            pool.executor.shutdown(wait=True, cancel_futures=True)
        raise
    with deferred():
        pool.executor.shutdown(wait=True)
