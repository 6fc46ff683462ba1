"""Leases in a modal.Dict: the maintenance lock the server checks at start, and the store lock across containers.

A lease is one Dict entry `{op, owner, token, since, expires, host, pid, proc_start}` taken with
`put(key, value, skip_if_exists=True)`, the Dict's atomic put-if-absent: of two runs asking at once exactly one gets
it. A holder refreshes its entry while it works (a heartbeat every third of `ttl`), so a long restore keeps its
lease. The same lock model as `shared.state.locks.store_lock`: a holder on this host whose process is gone is
taken over at once; elsewhere (another Modal container) its entry expires `ttl` seconds after its last heartbeat;
both with a log line. A waiting run says who it waits for every few seconds (`shared.state.locks.waiting`, the
loop the store lock waits with too); `tabby-modal unlock` breaks leases explicitly. The store lock file a run
takes under its store lease carries the lease (`vouch()`), so a run in another container can break a dead run's
lock file as soon as that run's lease is gone.

Any object with `get(key, default)`, `put(key, value, *, skip_if_exists)` and `pop(key, default)` works as the Dict:
`modal.Dict` on Modal, `DirDict` (one JSON file per key) for `--local` runs and tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.state import interruption
from shared.state.atomic import fsync_dir, tmp_path
from shared.state.errors import StateError
from shared.state.locks.holder import iso, process_alive, say, this_process
from shared.state.locks.store_lock import Vouch
from shared.state.locks.waiting import UNLOCK_HINT, WAIT_REPORT, take_or_wait
from shared.state.records import read_record

if TYPE_CHECKING:
    from shared.settings import Settings

MAINTENANCE = "maintenance"  # held by restore and reset; the server does not start while it is held
STORE = "store"  # held by every run that writes the backups store (snapshot, prune, import, restore, reset)

log = logging.getLogger("tabby_modal.lease")

_MISSING = object()


class DictLike(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...
    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool: ...
    def pop(self, key: str, default: Any = ...) -> Any: ...


class LeaseHeld(StateError):
    """Someone else holds the lease (one line: who, what, since when, until when)."""


class DirDict:
    """A Dict in a directory, one JSON file per key, with the same atomic put-if-absent as modal.Dict.

    put-if-absent links a finished temp file to the key's name (link fails if the name exists); pop renames the
    entry away first, so of two pops only one gets the value.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad key {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str, default: Any = None) -> Any:
        record = read_record(self._path(key))
        return default if record is None else record

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self._path(key)
        tmp = tmp_path(final)
        with open(tmp, "wb") as f:
            f.write(json.dumps(value, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            if skip_if_exists:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.directory)
        return True

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        final = self._path(key)
        grabbed = tmp_path(final)
        try:
            os.rename(final, grabbed)
        except FileNotFoundError:
            if default is _MISSING:
                raise KeyError(key) from None
            return default
        record = read_record(grabbed)
        os.unlink(grabbed)
        fsync_dir(self.directory)
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # an empty Dict leaves no folder behind
        return record


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """`restore by modal-task-ab12 since 2026-11-23T10:00:00Z, expires in 3540s`."""
    now = time.time() if now is None else now
    left = _number(record.get("expires")) - now
    until = f"expires in {left:.0f}s" if left > 0 else f"expired {-left:.0f}s ago"
    return f"{who(record)}, {until}"


def who(record: dict[str, Any]) -> str:
    """`restore by modal-task-ab12 since 2026-11-23T10:00:00Z`."""
    return f"{record.get('op', '?')} by {record.get('owner', '?')} since {iso(_number(record.get('since')))}"


def why_gone(record: Any, now: float | None = None) -> str | None:
    """Why a lease's holder is gone (a short phrase for the log line), or None while it is live."""
    if not isinstance(record, dict):
        return "its entry is malformed"
    try:
        left = float(record["expires"]) - (time.time() if now is None else now)
    except (KeyError, TypeError, ValueError):
        return "its entry is malformed"
    if "pid" in record and process_alive(record) is False:
        return "its process is gone"
    return None if left > 0 else f"it expired {-left:.0f}s ago"


def is_live(record: Any, now: float | None = None) -> bool:
    """A well-formed lease that has not expired and whose process, if on this host, runs. Malformed entries count
    as gone (they can be taken over)."""
    return why_gone(record, now) is None


def holder_gone(d: DictLike, info: dict[str, Any], now: float | None = None) -> bool | None:
    """For a store lock file's record: is the lease its holder took gone (absent, expired, another run's)? None
    when the record names no lease."""
    ref = info.get("lease")
    if not isinstance(ref, dict) or not isinstance(ref.get("key"), str):
        return None
    current = d.get(ref["key"])
    return not (is_live(current, now) and current.get("token") == ref.get("token"))


def default_owner() -> str:
    """Who holds a lease: the Modal task id in a container, else host and pid."""
    task = os.environ.get("MODAL_TASK_ID")
    return task or f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """`with Lease(d, "maintenance", "restore", ttl=3600):` holds the entry for the block, refreshing it meanwhile.

    `acquire` waits up to `wait` seconds for a live holder, takes over an expired one, and otherwise raises
    LeaseHeld naming the holder. `release` removes the entry only if it is still ours.
    """

    def __init__(
        self,
        d: DictLike,
        key: str,
        op: str,
        *,
        ttl: float,
        wait: float = 0.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        poll: float = 0.5,
        report: float = WAIT_REPORT,
        on_wait: Callable[[str], None] = say,
    ) -> None:
        self.d, self.key, self.op, self.ttl, self.wait = d, key, op, ttl, wait
        self.owner = owner or default_owner()
        self.token = secrets.token_hex(8)
        self.clock = clock
        self.poll = poll
        self.report = report
        self.on_wait = on_wait
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = False
        self._hold: int | None = None  # registered with the forced exit of an interrupted run

    def record(self) -> dict[str, Any]:
        now = self.clock()
        proc = this_process()
        return {
            "op": self.op,
            "owner": self.owner,
            "token": self.token,
            "since": now,
            "expires": now + self.ttl,
            "host": proc["host"],
            "pid": proc["pid"],
            "proc_start": proc["proc_start"],
        }

    def acquire(self) -> Lease:
        take_or_wait(
            lambda: self.d.put(self.key, self.record(), skip_if_exists=True),
            lambda: self.d.get(self.key),
            lambda held: why_gone(held, self.clock()),
            self._take_over,
            wait=self.wait,
            report=self.report,
            on_wait=self.on_wait,
            waiting_line=lambda held: (
                f"waiting for the {self.key} lock held by {held.get('op', '?')} ({held.get('owner', '?')}) "
                f"since {iso(_number(held.get('since')))}"
            ),
            give_up=lambda held: LeaseHeld(
                f"{self.key} lock held: {describe(held, self.clock())}; {UNLOCK_HINT}"
            ),
            sleep=self._stop.wait,
            poll=self.poll,
        )
        self._hold = interruption.register(self._drop)
        self._start_heartbeat()
        return self

    def _take_over(self, gone: Any, why: str) -> None:
        """Remove a gone holder's entry; if a newer holder's entry was popped instead (a race), put it back."""
        popped = self.d.pop(self.key, None)
        if popped is not None and popped != gone:
            self.d.put(self.key, popped, skip_if_exists=True)
        elif popped is not None:
            what = who(popped) if isinstance(popped, dict) else repr(popped)[:80]
            log.warning("broke the %s lease of %s: %s", self.key, what, why)

    def vouch(self) -> Vouch:
        """This lease as the store lock file carries it, and how to judge another holder's lease."""
        return Vouch(
            fields={"lease": {"key": self.key, "owner": self.owner, "token": self.token}},
            gone=lambda info: holder_gone(self.d, info, self.clock()),
        )

    def held(self) -> bool:
        current = self.d.get(self.key)
        return isinstance(current, dict) and current.get("token") == self.token

    def _start_heartbeat(self) -> None:
        interval = max(self.ttl / 3, 0.05)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.held():
                        self.lost = True  # broken by `unlock`: say so at release, keep working
                        return
                    self.d.put(self.key, {**self.record(), "since": self._since})
                except Exception as err:  # a hiccup of the Dict: the next beat tries again
                    log.warning("could not refresh the %s lease (%s)", self.key, err)

        self._since = self.clock()
        self._beat = threading.Thread(target=beat, name=f"lease-{self.key}", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        interruption.unregister(self._hold)
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if not self._drop():
            self.lost = True

    def _drop(self) -> bool:
        """Remove the entry if it is ours (False when it was not: we were broken). Also what the forced exit of an
        interrupted run calls, without waiting for the heartbeat; a second call finds nothing and does nothing."""
        self._stop.set()
        current = self.d.pop(self.key, None)
        if isinstance(current, dict) and current.get("token") != self.token:
            self.d.put(self.key, current, skip_if_exists=True)  # not ours: put it back
            return False
        return True

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def status(d: DictLike, now: float | None = None) -> dict[str, Any]:
    """Both leases as `{key: {..., live, describe}}` (None when free), for `unlock` and `inspect`."""
    out: dict[str, Any] = {}
    for key in (MAINTENANCE, STORE):
        record = d.get(key)
        why = why_gone(record, now)
        if isinstance(record, dict):
            out[key] = {**record, "live": why is None, "why": why, "describe": describe(record, now)}
        else:
            out[key] = None if record is None else {"malformed": repr(record)[:80], "live": False, "why": why}
    return out


def break_leases(d: DictLike, force: bool = False, now: float | None = None) -> dict[str, Any]:
    """Remove the leases whose holders are gone, and with `force` the live ones too:
    {broken: {key: record}, held: {key: record}} (for `tabby-modal unlock`). An entry that changes between the
    look and the removal is put back and counted as held."""
    broken: dict[str, Any] = {}
    held: dict[str, Any] = {}
    for key in (MAINTENANCE, STORE):
        record = d.get(key)
        if record is None:
            continue
        if not force and is_live(record, now):
            held[key] = record
            continue
        popped = d.pop(key, None)
        if popped is not None and popped != record:
            d.put(key, popped, skip_if_exists=True)
            held[key] = popped
        elif popped is not None:
            broken[key] = popped
    return {"broken": broken, "held": held}


def break_all(d: DictLike) -> dict[str, Any]:
    """Remove both leases, whoever holds them: {broken: {key: record}}."""
    return {"broken": break_leases(d, force=True)["broken"]}


def reason(d: DictLike, now: float | None = None) -> str | None:
    """Why the server must not start now (a live maintenance lease), or None."""
    record = d.get(MAINTENANCE)
    if is_live(record, now):
        return describe(record, now)
    return None


def modal_dict(settings: Settings) -> Any:
    """The named modal.Dict holding the leases (created if missing)."""
    import modal

    return modal.Dict.from_name(
        settings.lock_dict, environment_name=settings.modal_environment, create_if_missing=True
    )


def maintenance_reason(settings: Settings) -> str | None:
    """The server's start check on Modal: the live maintenance lease, described; None when free."""
    return reason(modal_dict(settings))
