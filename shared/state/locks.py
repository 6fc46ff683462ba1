"""The snapshot store's lock: one mutating run at a time (snapshot, restore, reset, prune), so prune never deletes
blobs that a running snapshot has written but not yet named in a manifest.

The lock is a file in the backups dir created with O_EXCL, holding who took it (pid, host, process start time, op,
time). A crashed run's lock is stale when its pid is dead on this host (or reused by another process), or, for a
holder on another host, when it is older than the TTL; a stale lock is broken under a second O_EXCL file so two
waiters cannot both break it and then both take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from shared.state.atomic import StateError, fsync_dir, read_record

LOCK_NAME = "lock.json"
BREAKING_NAME = "lock.json.breaking"
BREAKING_TTL = 60.0  # a breaker needs milliseconds; older means it crashed mid-break
UNREADABLE_GRACE = 10.0  # an empty lock file is a holder between create and write, unless it is this old
POLL = 0.1


class LockHeld(StateError):
    """Another run holds the store lock."""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc, or None where there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def this_process() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "proc_start": stat[1] if stat else None,
        "time": time.time(),
    }


def process_alive(info: dict[str, Any]) -> bool | None:
    """True/False for a process recorded on this host (pid reuse and zombies count as dead); None for another host."""
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state in ("Z", "X"):
        return False
    recorded = info.get("proc_start")
    return recorded is None or recorded == start


def _read(path: Path) -> dict[str, Any] | None:
    """The holder's record; {} when the file exists but is empty or unreadable; None when there is no file."""
    return read_record(path)


def read_lock(directory: Path) -> dict[str, Any] | None:
    """Who holds the store lock in `directory` (None if nobody)."""
    return _read(Path(directory) / LOCK_NAME)


def is_stale(path: Path, info: dict[str, Any], ttl: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if not info:
        try:
            return now - path.stat().st_mtime > UNREADABLE_GRACE
        except FileNotFoundError:
            return True
    alive = process_alive(info)
    if alive is not None:
        return not alive
    t = info.get("time")
    return not isinstance(t, int | float) or now - t > ttl


def _create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return True


def _break_stale(directory: Path, seen: dict[str, Any], ttl: float) -> None:
    """Remove the lock we judged stale, unless it changed meanwhile; serialised by the breaking file."""
    lock, breaking = directory / LOCK_NAME, directory / BREAKING_NAME
    if not _create(breaking, {**this_process(), "token": secrets.token_hex(8)}):
        other = _read(breaking)
        if other is not None and is_stale(breaking, other, BREAKING_TTL):
            breaking.unlink(missing_ok=True)
        return
    try:
        current = _read(lock)
        if current is not None and current == seen and is_stale(lock, current, ttl):
            lock.unlink(missing_ok=True)
    finally:
        breaking.unlink(missing_ok=True)


def break_lock(directory: Path) -> dict[str, Any] | None:
    """Remove the store lock whoever holds it; returns the holder's record. Only when you know that run is gone."""
    directory = Path(directory)
    info = read_lock(directory)
    (directory / LOCK_NAME).unlink(missing_ok=True)
    (directory / BREAKING_NAME).unlink(missing_ok=True)
    return info


class StoreLock:
    """`with StoreLock(dir, "prune"):` holds the lock; waits up to `wait` seconds for a live holder, breaks stale ones."""

    def __init__(self, directory: Path, op: str, *, ttl: float = 3600, wait: float = 30.0) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.op = op
        self.ttl = ttl
        self.wait = wait
        self.token = secrets.token_hex(8)
        self.held = False

    def acquire(self) -> StoreLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            if _create(self.path, {**this_process(), "op": self.op, "token": self.token}):
                self.held = True
                return self
            info = _read(self.path)
            if info is None:
                continue
            if is_stale(self.path, info, self.ttl):
                _break_stale(self.directory, info, self.ttl)
                continue
            if time.monotonic() >= deadline:
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.get("time", 0)))
                raise LockHeld(
                    f"store busy: {info.get('op', '?')} by pid {info.get('pid')} on {info.get('host')} "
                    f"since {since}; if that run died, remove {self.path}"
                )
            time.sleep(POLL)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = _read(self.path)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(self.directory)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
