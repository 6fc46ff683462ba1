"""The lock `tabby-modal serve --local DIR` holds on DIR for its whole life: one server per DIR.

`fcntl.flock` on `DIR/serve.lock`, taken before anything touches DIR (before the hydrate) and released by the
kernel when the process ends, however it ends: a crashed or SIGKILLed server never leaves a stale lock. The file
holds a record of the holder (pid, host, start time, port) for the messages; it is read only while the lock is
held, so an old record in a free file means nothing.

Who else looks: a second `serve` refuses at once naming the holder; `restore`/`reset --local DIR` refuse while it
is held and go ahead as soon as it is free (a clean stop frees it at exit). On Modal the same rule comes from the
platform instead: the server runs in at most one container (`max_containers=1`, deployed with `--strategy
recreate`), a restore or reset holds the maintenance lease the server checks before it hydrates, and refuses while
the server app has a running container.

flock has no "test" call, so `holder()` takes a shared lock for an instant; `ServeLock.acquire()` retries for a
moment (`wait`) so such a look never makes a starting server refuse.

Tabby runs in its own process group (so a stop reaches its llama-servers), which also means it outlives a `serve`
killed with SIGKILL: the orphan keeps Tabby's port, and the next `serve` could not start it. So the record also
names the running Tabby (`note_tabby`: its pid, which is its process group, and its start time from
/proc/<pid>/stat), and a record left in a free lock file is read once: `orphan()` is that Tabby if it still runs
(same host, same pid AND same start time: a reused pid is never taken for it), `end_orphan()` stops its group
(SIGTERM, SIGKILL after a grace). The next `serve` does that before it starts; `status --local DIR` reports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from shared.state.errors import StateError
from shared.state.locks.holder import proc_pgrp, proc_stat

log = logging.getLogger("tabby_modal.serve_lock")

LOCK_NAME = "serve.lock"
ACQUIRE_WAIT = 0.2  # a `holder()` look holds a shared lock for microseconds; a real holder holds it for hours
ORPHAN_GRACE = 10.0  # seconds an orphan Tabby gets to stop on SIGTERM before SIGKILL


class DirInUse(StateError):
    """DIR is held by a running `serve`; `record` describes it (pid, host, started, port)."""

    def __init__(self, root: Path, record: dict[str, Any]) -> None:
        self.root, self.record = root, record
        super().__init__(f"{root} is in use by {describe(record)}")


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


def describe(record: dict[str, Any]) -> str:
    """`serve` (pid 123 on host, port 8000, since 2026-01-01T00:00:00Z)."""
    if not record.get("pid"):
        return "another `serve` (it has not written its record yet)"
    bits = [f"pid {record['pid']} on {record.get('host') or '?'}"]
    if record.get("port"):
        bits.append(f"port {record['port']}")
    if record.get("started"):
        bits.append(f"since {record['started']}")
    return f"`serve` ({', '.join(bits)})"


def _busy(err: OSError) -> bool:
    return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _read_record(path: Path) -> dict[str, Any]:
    """The holder's record; {} while it is being written (or unreadable)."""
    for _ in range(20):
        try:
            doc = json.loads(path.read_bytes() or b"null")
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            return doc
        time.sleep(0.005)  # the holder writes it right after taking the lock
    return {}


def holder(root: Path) -> dict[str, Any] | None:
    """The record of the `serve` holding DIR's lock, or None when nobody does. Changes nothing."""
    path = lock_path(root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if not _busy(err):
                raise
            return _read_record(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refusal(root: Path, action: str, record: dict[str, Any]) -> str:
    """The one line a restore or reset refuses with while `record`'s server holds DIR."""
    return (
        f"refused: {action} while {describe(record)} serves {root}: stop it first (--force skips this check: "
        "the server then stops serving at its next persist and its writes since the last one are lost)"
    )


class ServeLock:
    """The exclusive lock on DIR, held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = lock_path(self.root)
        self.record: dict[str, Any] = {}
        self.previous: Any = None  # the record found in the free lock file at acquire
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, port: int | None = None, wait: float = ACQUIRE_WAIT) -> ServeLock:
        """Take the lock or raise DirInUse naming the holder. Creates DIR and the lock file, nothing else."""
        if self._fd is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: Tabby (a child) must not inherit the lock and keep DIR locked after we are gone.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if not _busy(err):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise DirInUse(self.root, _read_record(self.path)) from None
                time.sleep(0.01)
        # The record of the last holder, if it died without releasing: it may name a Tabby still running.
        try:
            self.previous = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except (OSError, ValueError):
            self.previous = None
        self.record = {
            "op": "serve",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "port": port,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.record).encode() + b"\n", 0)
        self._fd = fd
        return self

    def note_tabby(self, pid: int) -> None:
        """Record the Tabby this `serve` just started (pid = its process group, and its start time), so the next
        `serve` can end it if this one dies without stopping it."""
        if self._fd is None:
            return
        stat = proc_stat(pid)
        self.record = {**self.record, "tabby": {"pid": pid, "proc_start": stat[1] if stat else None}}
        data = json.dumps(self.record).encode() + b"\n"
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        """Free DIR (also done by the kernel when the process ends)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> ServeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def tabby_of(record: Any) -> dict[str, Any] | None:
    """The Tabby a dead holder's record names, if it still runs: same host, and the live process at that pid has
    the recorded start time (a pid reused by another process never matches); None otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get("tabby"), dict):
        return None
    tabby = record["tabby"]
    pid, start = tabby.get("pid"), tabby.get("proc_start")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 1:
        return None
    if not isinstance(start, int):
        return None  # never judged by the pid alone
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X") or stat[1] != start:
        return None
    return {"pid": pid, "proc_start": start, "port": record.get("port"), "serve_pid": record.get("pid")}


def orphan(root: Path) -> dict[str, Any] | None:
    """A Tabby left running by a `serve` of DIR that died (see `tabby_of`); None while a `serve` holds DIR."""
    path = lock_path(root)
    if holder(root) is not None:
        return None
    try:
        record = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    return tabby_of(record)


def end_orphan(found: dict[str, Any], grace: float = ORPHAN_GRACE) -> str:
    """Stop an orphan Tabby's process group: SIGTERM, then SIGKILL after `grace`. Returns how it ended."""
    pgid = found["pid"]

    def members() -> list[int]:
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = proc_pgrp(int(name))
                if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                    out.append(int(name))
        return out

    def still_ours() -> bool:  # the group leader is the recorded process (not a reused pid)
        stat = proc_stat(pgid)
        return stat is not None and stat[1] == found["proc_start"] and stat[0] not in ("Z", "X")

    if not still_ours():
        return "already gone"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not members():
            return "stopped on SIGTERM"
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and members():
        time.sleep(0.02)
    return f"killed (SIGKILL after {grace:.0f}s)"
