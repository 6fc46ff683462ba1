"""The snapshot store's lock: one mutating run at a time (snapshot, restore, reset, prune), so prune never deletes
blobs that a running snapshot has written but not yet named in a manifest.

The lock is a file in the backups dir created with O_EXCL, holding who took it (pid, host, process start time, op,
time) and, when the run holds a lease (`shared.state.locks.lease`, set with `vouched_by`), that lease's key and token.
One model for every lock of the store (this file and the leases alike): a holder on this host whose process is gone
(or whose pid was reused) is broken at once, with a log line; a holder elsewhere (another Modal container: no pid
to check) is broken when its lease says it is gone (the lease entry is absent, expired or another run's), and
without a lease to ask, when it is older than the TTL. A stale lock is broken under a second O_EXCL file so two
waiters cannot both break it and then both take it. A waiting run says who it waits for every few seconds; one
that gives up names `tabby-modal unlock --yes`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.state import interruption
from shared.state.atomic import fsync_dir
from shared.state.errors import StateError
from shared.state.locks.holder import iso, process_alive, say, this_process
from shared.state.locks.waiting import UNLOCK_HINT, WAIT_REPORT, take_or_wait
from shared.state.records import read_record

LOCK_NAME = "lock.json"
BREAKING_NAME = "lock.json.breaking"
BREAKING_TTL = 60.0  # a breaker needs milliseconds; older means it crashed mid-break
UNREADABLE_GRACE = 10.0  # an empty lock file is a holder between create and write, unless it is this old
POLL = 0.1

log = logging.getLogger("tabby_modal.locks")


class LockHeld(StateError):
    """Another run holds the store lock."""


def _read(path: Path) -> dict[str, Any] | None:
    """The holder's record; {} when the file exists but is empty or unreadable; None when there is no file."""
    return read_record(path)


def read_lock(directory: Path) -> dict[str, Any] | None:
    """Who holds the store lock in `directory` (None if nobody)."""
    return _read(Path(directory) / LOCK_NAME)


@dataclass(frozen=True)
class Vouch:
    """The lease under which a run takes the store lock: `fields` go into the lock file (so others can ask about
    this holder), `gone(record)` answers for another holder from its fields (True: its lease is gone, expired or
    someone else's; False: it is live; None: no lease to ask)."""

    fields: dict[str, Any]
    gone: Callable[[dict[str, Any]], bool | None]


_VOUCH: contextvars.ContextVar[Vouch | None] = contextvars.ContextVar("store_lock_vouch", default=None)


@contextlib.contextmanager
def vouched_by(vouch: Vouch) -> Iterator[None]:
    """Store locks taken inside the block carry this lease and judge other holders by theirs."""
    token = _VOUCH.set(vouch)
    try:
        yield
    finally:
        _VOUCH.reset(token)


def current_vouch() -> Vouch | None:
    return _VOUCH.get()


def why_stale(
    path: Path | None, info: dict[str, Any], ttl: float, now: float | None = None, vouch: Vouch | None = None
) -> str | None:
    """Why the holder recorded in `info` is gone (a short phrase for the log line), or None while it may be live.
    `path` is the lock file (its age tells an empty record's writer from a crashed one); None for a copy."""
    now = time.time() if now is None else now
    if not info:
        if path is None:
            return "its lock file is empty"
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            return "its lock file vanished"
        return f"its lock file has been empty for {age:.0f}s" if age > UNREADABLE_GRACE else None
    alive = process_alive(info)
    if alive is not None:
        return None if alive else "its process is gone"
    if vouch is not None and isinstance(info.get("lease"), dict):
        try:
            gone = vouch.gone(info)
        except Exception as err:  # the lease store is unreachable: fall back to the TTL below
            log.warning("could not ask the lease about the store lock's holder (%s)", err)
            gone = None
        if gone is not None:
            return "its lease is gone or expired" if gone else None
    t = info.get("time")
    if not isinstance(t, int | float):
        return "its record has no time"
    return f"it is older than {ttl:.0f}s" if now - t > ttl else None


def is_stale(
    path: Path, info: dict[str, Any], ttl: float, now: float | None = None, vouch: Vouch | None = None
) -> bool:
    return why_stale(path, info, ttl, now, vouch) is not None


def describe(info: dict[str, Any]) -> str:
    """`snapshot by pid 123 on host since 2026-01-01T00:00:00Z` (the file lock's holder)."""
    if not info:
        return "a run that has not written its record yet"
    return (
        f"{info.get('op', '?')} by pid {info.get('pid')} on {info.get('host')} since {iso(info.get('time'))}"
    )


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


def _break_stale(directory: Path, seen: dict[str, Any], ttl: float, vouch: Vouch | None = None) -> bool:
    """Remove the lock we judged stale, unless it changed meanwhile; serialised by the breaking file. True if it
    went (with a log line naming the holder and why)."""
    lock, breaking = directory / LOCK_NAME, directory / BREAKING_NAME
    if not _create(breaking, {**this_process(), "token": secrets.token_hex(8)}):
        other = _read(breaking)
        if other is not None and is_stale(breaking, other, BREAKING_TTL):
            breaking.unlink(missing_ok=True)
        return False
    try:
        current = _read(lock)
        why = why_stale(lock, current, ttl, vouch=vouch) if current is not None else None
        if current is not None and current == seen and why is not None:
            lock.unlink(missing_ok=True)
            log.warning("broke the store lock file of %s: %s", describe(current), why)
            return True
        return False
    finally:
        breaking.unlink(missing_ok=True)


def status(directory: Path, ttl: float, vouch: Vouch | None = None) -> dict[str, Any] | None:
    """The file lock for `inspect`/`unlock`: None when free, else its record with `live`, `describe`, `why`."""
    path = Path(directory) / LOCK_NAME
    info = _read(path)
    return None if info is None else judged(info, ttl, vouch, path)


def judged(
    info: dict[str, Any], ttl: float, vouch: Vouch | None = None, path: Path | None = None
) -> dict[str, Any]:
    """A lock file's record with `live`, `describe` and `why` (the reason it is stale, or None)."""
    why = why_stale(path, info, ttl, vouch=vouch)
    return {**info, "live": why is None, "describe": describe(info), "why": why}


def parse(raw: bytes) -> dict[str, Any]:
    """A lock file's bytes as its record ({} when empty or unreadable, as `read_lock` does)."""
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def break_if_stale(directory: Path, ttl: float, vouch: Vouch | None = None) -> dict[str, Any] | None:
    """Remove the file lock if its holder is provably gone; returns the holder's record if it went."""
    directory = Path(directory)
    info = _read(directory / LOCK_NAME)
    if info is not None and _break_stale(directory, info, ttl, vouch):
        return info
    return None


def break_lock(directory: Path) -> dict[str, Any] | None:
    """Remove the store lock whoever holds it; returns the holder's record. Only when you know that run is gone."""
    directory = Path(directory)
    info = read_lock(directory)
    (directory / LOCK_NAME).unlink(missing_ok=True)
    (directory / BREAKING_NAME).unlink(missing_ok=True)
    return info


class StoreLock:
    """`with StoreLock(dir, "prune"):` holds the lock; waits up to `wait` seconds for a live holder (saying so every
    `report` seconds), breaks stale ones. Inside `vouched_by(...)` the lock carries that lease."""

    def __init__(
        self,
        directory: Path,
        op: str,
        *,
        ttl: float = 3600,
        wait: float = 30.0,
        report: float = WAIT_REPORT,
        on_wait: Callable[[str], None] = say,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.op = op
        self.ttl = ttl
        self.wait = wait
        self.report = report
        self.on_wait = on_wait
        self.token = secrets.token_hex(8)
        self.held = False
        self._hold: int | None = None  # registered with the forced exit of an interrupted run

    def acquire(self) -> StoreLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        vouch = current_vouch()
        mine = {**this_process(), "op": self.op, "token": self.token, **(vouch.fields if vouch else {})}

        def take() -> bool:
            if not _create(self.path, mine):
                return False
            self.held = True
            self._hold = interruption.register(self._drop)
            return True

        take_or_wait(
            take,
            lambda: _read(self.path),
            lambda info: why_stale(self.path, info, self.ttl, vouch=vouch),
            lambda info, _why: _break_stale(self.directory, info, self.ttl, vouch),
            wait=self.wait,
            report=self.report,
            on_wait=self.on_wait,
            waiting_line=lambda info: (
                f"waiting for the store lock held by {info.get('op', '?')} (pid {info.get('pid')} on "
                f"{info.get('host')}) since {iso(info.get('time'))}"
            ),
            give_up=lambda info: LockHeld(f"store busy: {describe(info)}; {UNLOCK_HINT}"),
            sleep=time.sleep,
            poll=POLL,
        )
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        interruption.unregister(self._hold)
        self._drop()

    def _drop(self) -> None:
        """Remove the lock file if it is still ours: idempotent, so an interrupted run's forced exit and its own
        release may both call it."""
        info = _read(self.path)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(self.directory)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
