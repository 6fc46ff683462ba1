"""The maintenance role: state operations on the two Volumes, with the rules that keep them safe.

`Maintenance` runs the state engine (`shared.state`: the store, the mirror, inspection) on two directories, the
data dir (on Modal the `/data` Volume; locally `DIR/data`) and the backups dir (`/backups`; locally `DIR/backups`),
with the rules that keep it safe; it is the local form of `shared.operations.interface.Operations`:
- **Volumes.** Each operation reloads the Volumes it reads first (a warm container would otherwise see an old
  view, e.g. miss the server's last persist) and commits exactly the Volumes it wrote, backups before data (so a
  safety snapshot is durable before the data it protects changes). Locally both are None: plain directories.
- **Leases** (`shared.state.locks.lease`, a modal.Dict): `restore` and `reset` hold the `maintenance` lease for their whole run,
  which the server checks before it starts; every run that writes the backups store holds the `store` lease, so a
  scheduled snapshot in one container and a prune in another never interleave.
- **Never two writers of /data.** `restore` and `reset` refuse while the server app has running containers
  (locally: while `serve --local DIR` holds DIR's serve lock, `shared.state.locks.serve_lock`); locally `persist` into
  DIR/data and `hydrate` into DIR's live root refuse too (one writer per DIR: the server's own persists).
- **No half-done state passes for one.** A data dir an interrupted restore or reset left (its pending marker) is
  refused by hydrate, persist and snapshot with the command that finishes it, spelled for this form.
- **Confirmation.** `restore`, `reset` and `prune` (not dry-run) need `confirm` equal to the data Volume's name:
  `tabby-modal` passes it after its two-signal check; an ad hoc `modal run` must spell it out.

Results are JSON-serialisable dicts (the same as the remote form's). Refusals are StateError (one line).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.operations import versions
from shared.state import archive, inspection, mirror
from shared.state.errors import StateError
from shared.state.locks import lease, serve_lock
from shared.state.locks import store_lock as locks
from shared.state.progress import DEFAULT_INTERVAL, Progress
from shared.state.store import Store
from shared.state.store.core import check_label
from shared.state.store.prune import KEEP_SAFETY

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger("tabby_modal.maintenance")

STORE_WAIT = 600.0  # default wait for another run's store work (the `lock_wait` setting)
TRANSFER_DIR = "transfer"  # in the backups Volume: archives on their way in or out


class VolumeLike(Protocol):
    def commit(self) -> None: ...
    def reload(self) -> None: ...


class Maintenance:
    """State operations with reload/commit discipline, leases and the server check (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        backups_dir: Path,
        *,
        locks: lease.DictLike,
        data_volume_name: str,
        lock_ttl: float,
        lock_wait: float = 30.0,
        progress_interval: float = DEFAULT_INTERVAL,
        data: VolumeLike | None = None,
        backups: VolumeLike | None = None,
        server_containers: Callable[[], int] | None = None,
        serve_dir: Path | None = None,
        store_wait: float | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.backups_dir = Path(backups_dir)
        self.progress_interval = progress_interval
        # `lock_wait`: how long the store's lock file is waited for; `store_wait`: the store lease (a run elsewhere).
        self.store = Store.open(
            self.backups_dir, lock_ttl=lock_ttl, lock_wait=lock_wait, progress=self.progress
        )
        self.locks = locks
        self.data_volume_name = data_volume_name
        self.lock_ttl = lock_ttl
        self.data = data
        self.backups = backups
        self.server_containers = server_containers
        self.serve_dir = serve_dir  # locally: the DIR whose serve lock says whether `serve --local DIR` runs
        self.store_wait = STORE_WAIT if store_wait is None else store_wait
        self.flag = f" --local {serve_dir}" if serve_dir is not None else ""  # how commands are spelled here

    # --- plumbing ---------------------------------------------------------------------------------------------

    def progress(self, label: str) -> Progress:
        """A progress reporter for a long run, printing at most every `progress_interval` seconds."""
        return Progress(label, interval=self.progress_interval)

    def _reload(self, *volumes: VolumeLike | None) -> None:
        for v in volumes:
            if v is not None:
                v.reload()

    def _commit(self, *volumes: VolumeLike | None) -> None:
        for v in volumes:
            if v is not None:
                v.commit()

    @contextlib.contextmanager
    def _lease(self, key: str, op: str, wait: float = 0.0) -> Iterator[lease.Lease]:
        held = lease.Lease(self.locks, key, op, ttl=self.lock_ttl, wait=wait)
        with held:
            yield held
        if held.lost:
            log.warning("the %s lease of this %s was broken while it ran", key, op)

    @contextlib.contextmanager
    def _writing_store(self, op: str, *, then: VolumeLike | None = None) -> Iterator[None]:
        """Hold the store lease, reload the backups Volume, and commit it at the end (also after a failure: what a
        failed run wrote is either complete or ignored by readers, and a safety snapshot must not be lost), then
        `then`, the data Volume when the run also wrote /data: its safety snapshot is published first."""
        with self._lease(lease.STORE, op, wait=self.store_wait) as held, locks.vouched_by(held.vouch()):
            self._reload(self.backups, then)
            try:
                yield
            finally:
                self._commit(self.backups, then)

    def _confirm(self, action: str, confirm: str) -> None:
        if confirm != self.data_volume_name:
            raise StateError(
                f"refused: {action} is destructive; confirm with the data volume's name "
                f"(confirm={self.data_volume_name!r}, `--confirm {self.data_volume_name}` with modal run)"
            )

    @contextlib.contextmanager
    def _spelled(self) -> Iterator[None]:
        """An unfinished restore's refusal names the commands of this form (`--local DIR` locally)."""
        try:
            yield
        except mirror.InterruptedChange as err:
            raise err.spelled(self.flag) from None

    def _not_served(self, action: str) -> None:
        """Locally: refuse while `serve --local DIR` holds DIR (it is the one writer of DIR/data and DIR/live)."""
        record = serve_lock.holder(self.serve_dir) if self.serve_dir is not None else None
        if record is not None:
            raise StateError(
                f"refused: {action} while {serve_lock.describe(record)} serves {self.serve_dir}: "
                "it is the one writer of its data and live root; stop it first"
            )

    def _server_stopped(self, action: str, force: bool) -> None:
        if self.serve_dir is not None:
            record = serve_lock.holder(self.serve_dir)
            if record is not None and not force:
                raise StateError(serve_lock.refusal(self.serve_dir, action, record))
            if record is not None:
                log.warning("%s while %s serves: --force", action, serve_lock.describe(record))
        if self.server_containers is None:
            return
        try:
            running = self.server_containers()
        except Exception as err:  # Modal unreachable or an unexpected answer: do not guess
            if force:
                log.warning("could not ask whether the server runs (%s); going on: --force", err)
                return
            raise StateError(
                f"refused: {action}: could not check whether the server runs ({err}); "
                "stop it with `make stop-server`, or pass --force if you are sure"
            ) from None
        if running and not force:
            raise StateError(
                f"refused: {action} while the server app has {running} running container(s): stop it first "
                "with `make stop-server` (--force skips this check and is dangerous: the server would persist "
                "its old state over yours)"
            )
        if running:
            log.warning("%s with %d server container(s) running: --force", action, running)

    # --- reads ------------------------------------------------------------------------------------------------

    def snapshots(self) -> dict[str, Any]:
        self._reload(self.backups)
        stats = self.store.stats()
        return {"snapshots": self.store.list(), **stats}

    def inspect(self, snapshot_id: str | None = None) -> dict[str, Any]:
        self._reload(self.data, self.backups)
        result = {**inspection.inspect(self.data_dir, self.store, snapshot_id), "locks": self._locks_status()}
        if result.get("interrupted") and (info := mirror.unfinished_change(self.data_dir)):
            finish, back = mirror.finish_commands(info, self.flag)
            result["interrupted"].update(next=mirror.next_step(info, self.flag), finish=finish, rollback=back)
        return versions.annotate(result, self.backups_dir)  # which Tabby runs / wrote this database

    def verify(self, snapshot_id: str | None = None, sample: float | None = None) -> dict[str, Any]:
        # Holds the store lease: a prune in another container must not delete blobs under a verify.
        with self._lease(lease.STORE, "verify", wait=self.store_wait):
            self._reload(self.backups)
            result = self.store.verify(snapshot_id, sample)
            if result.get("corrupt"):  # quarantined (store.quarantine): the next snapshot must see it
                self._commit(self.backups)
            return result

    # --- writes to the backups store --------------------------------------------------------------------------

    def _need_data_dir(self) -> None:
        """Refused before any lock is taken, so a run that cannot work creates nothing (no lock dirs, no store)."""
        if not self.data_dir.is_dir():
            raise StateError(f"data dir {self.data_dir} does not exist")

    def _need_store(self) -> None:
        if not self.backups_dir.is_dir():
            raise StateError(f"no snapshots yet (no backups store at {self.backups_dir})")

    def snapshot(self, label: str = "manual") -> dict[str, Any]:
        """Allowed while the server runs: it takes the last complete persist (manifest-consistent)."""
        self._need_data_dir()
        with self._writing_store("snapshot"), self._spelled():
            self._reload(self.data)
            return self.store.snapshot(self.data_dir, label)

    def prune(
        self,
        keep_last: int,
        keep_daily: int,
        keep_weekly: int,
        dry_run: bool = False,
        confirm: str = "",
        keep_safety: int = KEEP_SAFETY,
    ) -> dict[str, Any]:
        self._reload(self.backups)
        self._need_store()
        if dry_run:
            return self._prune(keep_last, keep_daily, keep_weekly, True, keep_safety)
        self._confirm("prune", confirm)
        with self._writing_store("prune"):
            return self._prune(keep_last, keep_daily, keep_weekly, False, keep_safety)

    def _prune(
        self, keep_last: int, keep_daily: int, keep_weekly: int, dry_run: bool, keep_safety: int
    ) -> dict[str, Any]:
        """The pre-upgrade snapshot of the last upgrade recorded (shared.operations.versions) is kept whatever the
        counts say: it is the way back."""
        current = versions.read(self.backups_dir)["current"] or {}
        pinned = frozenset({str(current["snapshot"])} if current.get("snapshot") else ())
        return self.store.prune(
            keep_last, keep_daily, keep_weekly, dry_run=dry_run, keep_safety=keep_safety, pinned=pinned
        )

    def scheduled(
        self, keep_last: int, keep_daily: int, keep_weekly: int, keep_safety: int = KEEP_SAFETY
    ) -> dict[str, Any]:
        """The daily job: a snapshot labelled `scheduled`, then retention."""
        snap = self.snapshot("scheduled")
        pruned = self.prune(
            keep_last, keep_daily, keep_weekly, confirm=self.data_volume_name, keep_safety=keep_safety
        )
        return {"snapshot": snap, "prune": pruned}

    def repair(self, dry_run: bool = False, confirm: str = "") -> dict[str, Any]:
        """Drop corrupt blobs from the store, store again those /data still has (see store.repair). It rewrites
        packs and manifests: confirmed like prune, except a dry run."""
        self._reload(self.backups, self.data)
        self._need_store()
        if dry_run:
            with self._lease(lease.STORE, "repair", wait=self.store_wait):
                return self.store.repair(self.data_dir, dry_run=True)
        self._confirm("repair", confirm)
        with self._writing_store("repair"):
            return self.store.repair(self.data_dir, dry_run=False)

    def export_archive(
        self, snapshot_id: str, out: Path, *, overwrite: bool = False, partial: bool = False
    ) -> dict[str, Any]:
        """Write a snapshot as a .tar.gz at `out` (see shared.state.archive); `partial` leaves out corrupt files."""
        with self._lease(lease.STORE, "export", wait=self.store_wait):
            self._reload(self.backups)
            return self._export(snapshot_id, Path(out), overwrite, partial)

    def _export(self, snapshot_id: str, out: Path, overwrite: bool, partial: bool = False) -> dict[str, Any]:
        progress = self.progress("export")
        return archive.export_snapshot(
            self.store, snapshot_id, out, progress=progress, overwrite=overwrite, partial=partial
        )

    def import_archive(
        self, path: Path, label: str = "import", *, remove_after: bool = False
    ) -> dict[str, Any]:
        """Store a .tar(.gz) of a Tabby root as a new snapshot; `remove_after` deletes the archive either way."""
        if not Path(path).is_file():
            raise StateError(f"{path}: no such file")
        with self._writing_store("import"):
            try:
                return archive.import_archive(
                    self.store, Path(path), label=label, progress=self.progress("import")
                )
            finally:
                if remove_after:
                    Path(path).unlink(missing_ok=True)

    def export_transfer(self, snapshot_id: str, name: str, partial: bool = False) -> dict[str, Any]:
        """Export into the backups Volume's transfer folder, committed, for the client to download."""
        rel, path = self._transfer(name)
        with self._lease(lease.STORE, "export", wait=self.store_wait):
            self._reload(self.backups)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                result = self._export(snapshot_id, path, overwrite=False, partial=partial)
            finally:
                self._commit(self.backups)
        return {**result, "transfer": rel}

    def import_transfer(self, name: str, label: str = "import") -> dict[str, Any]:
        """Import an archive the client uploaded to the transfer folder, then delete it."""
        _, path = self._transfer(name)
        self._reload(self.backups)
        if not path.is_file():
            raise StateError(f"no uploaded archive {name!r} in the backups volume")
        return self.import_archive(path, label, remove_after=True)

    def _transfer(self, name: str) -> tuple[str, Path]:
        if not name or "/" in name or name.startswith(".") or not name.endswith(".tar.gz"):
            raise StateError(f"bad transfer name {name!r}")
        rel = f"{TRANSFER_DIR}/{name}"
        return rel, self.backups_dir / rel

    # --- writes to /data --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing_data(self, action: str, force: bool) -> Iterator[None]:
        """The maintenance lease (the server will not start), no server running, then the store lease."""
        with self._lease(lease.MAINTENANCE, action):
            self._server_stopped(action, force)
            with self._writing_store(action, then=self.data):
                yield

    def restore(
        self, snapshot_id: str, force: bool = False, confirm: str = "", partial: bool = False
    ) -> dict[str, Any]:
        self._confirm(f"restore {snapshot_id}", confirm)
        self._reload(self.backups)
        self.store.resolve(snapshot_id)  # an unknown id is refused before any lease is taken
        with self._writing_data("restore", force), self._spelled():
            # guard: the store's recent-persist heuristic, for the form that cannot ask Modal whether a server runs
            return self.store.restore(
                snapshot_id, self.data_dir, force=force, guard=self.server_containers is None, partial=partial
            )

    def reset(self, scope: str, force: bool = False, confirm: str = "") -> dict[str, Any]:
        self._confirm(f"reset --scope {scope}", confirm)
        self._reload(self.data)
        self._need_data_dir()
        with self._writing_data(f"reset {scope}", force), self._spelled():
            return self.store.reset(self.data_dir, scope, force=force, guard=self.server_containers is None)

    # --- leases -----------------------------------------------------------------------------------------------

    def _file_lock_vouch(self) -> locks.Vouch:
        """Judges the store lock file's holder by its lease in our Dict (we hold no lease ourselves)."""
        return locks.Vouch(fields={}, gone=lambda info: lease.holder_gone(self.locks, info))

    def locks_status(self) -> dict[str, Any]:
        """Both leases and the store's lock file (`backups/lock.json`): {key: record with live/why/describe}."""
        self._reload(self.backups)
        return self._locks_status()

    def _locks_status(self) -> dict[str, Any]:
        file_lock = locks.status(self.backups_dir, self.lock_ttl, self._file_lock_vouch())
        return {**lease.status(self.locks), "store_file": file_lock}

    def unlock(self, force: bool = False) -> dict[str, Any]:
        """Break the leases and the store lock file whose holders are gone; with `force` the live ones too:
        {broken: {key: record}, held: {key: record}}."""
        self._reload(self.backups)
        result = lease.break_leases(self.locks, force)
        if force:
            gone = locks.break_lock(self.backups_dir)
        else:
            gone = locks.break_if_stale(self.backups_dir, self.lock_ttl, self._file_lock_vouch())
            still = locks.read_lock(self.backups_dir)
            if still is not None:
                result["held"]["store_file"] = still
        if gone is not None:
            result["broken"]["store_file"] = gone
            self._commit(self.backups)
        return result

    # --- local only -------------------------------------------------------------------------------------------

    def persist(self, root: Path, *, commit: Callable[[], None] | None = None) -> dict[str, Any]:
        """Mirror live root `root` into the data dir (see mirror.persist). Refused while `serve --local DIR` runs:
        its persists would find the data dir written by someone else."""
        self._not_served("persist")
        with self._spelled():
            return mirror.persist(Path(root), self.data_dir, commit=commit, progress=self.progress("persist"))

    def hydrate(self, root: Path) -> dict[str, Any]:
        """Refused into DIR (its live root above all) while `serve --local DIR` runs: Tabby works in it. A copy
        elsewhere only reads DIR/data, so it goes ahead."""
        if self.serve_dir is not None and _overlap(Path(root), self.serve_dir):
            self._not_served(f"hydrate into {root}")
        with self._spelled():
            return mirror.hydrate(self.data_dir, Path(root), progress=self.progress("hydrate"))


def _overlap(a: Path, b: Path) -> bool:
    """Is one of the two folders inside the other (or the same)?"""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def for_local(settings: Settings, local: str | Path | None) -> Maintenance:
    """The `--local DIR` form: DIR/data, DIR/backups, leases in DIR/locks, no Volumes; the server check is DIR's
    serve lock (held while `serve --local DIR` runs)."""
    dirs = settings.local_dirs(local)
    return Maintenance(
        dirs.data,
        dirs.backups,
        locks=lease.DirDict(dirs.locks),
        data_volume_name=settings.data_volume,
        lock_ttl=settings.lock_ttl,
        progress_interval=settings.progress_interval,
        serve_dir=dirs.root,
        store_wait=settings.lock_wait,
    )


def server_containers(settings: Settings) -> Callable[[], int]:
    """How many containers the server app runs now (0 if it is not deployed), asked of Modal."""

    def count() -> int:
        import modal
        from modal.exception import NotFoundError

        # Through the class (modal 1.6 refuses `Function.from_name(app, "Tabby.*")` before any call): every method
        # of `Tabby` (apps/server.py) runs on its one service function, so `web`'s stats count its containers.
        cls = modal.Cls.from_name(settings.server_app, "Tabby", environment_name=settings.modal_environment)
        try:
            return int(cls().web.get_current_stats().num_total_runners)
        except NotFoundError:  # the server app (or its class) is not deployed
            return 0

    return count


def for_modal(settings: Settings, *, data: VolumeLike, backups: VolumeLike) -> Maintenance:
    """What the maintenance app's functions run: the mounted Volumes, the leases Dict, the server check."""
    return Maintenance(
        Path(settings.data_mount),
        Path(settings.backups_mount),
        locks=lease.modal_dict(settings),
        data_volume_name=settings.data_volume,
        lock_ttl=settings.lock_ttl,
        lock_wait=60.0,
        progress_interval=settings.progress_interval,
        data=data,
        backups=backups,
        server_containers=server_containers(settings),
        store_wait=settings.lock_wait,
    )


def summary(op: str, result: dict[str, Any]) -> str:
    """One readable log line for Modal's log view: the op and the result's plain top-level figures."""
    plain = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool) or v is None}
    return f"{op}: " + ", ".join(f"{k}={v}" for k, v in sorted(plain.items()))


# --- what each function of the maintenance app runs -----------------------------------------------------------


def _verify(m: Maintenance, s: Settings, snapshot: str = "", sample: float = 1.0) -> dict[str, Any]:
    return m.verify(snapshot or None, None if sample >= 1.0 else sample)


def _prune(
    m: Maintenance,
    s: Settings,
    keep_last: int = -1,
    keep_daily: int = -1,
    keep_weekly: int = -1,
    dry_run: bool = False,
    confirm: str = "",
    keep_safety: int = -1,
) -> dict[str, Any]:
    # A negative count means "from the settings" (what `modal run ... ::prune` without flags gets).
    last = s.keep_last if keep_last < 0 else keep_last
    daily = s.keep_daily if keep_daily < 0 else keep_daily
    weekly = s.keep_weekly if keep_weekly < 0 else keep_weekly
    safety = s.keep_safety if keep_safety < 0 else keep_safety
    return m.prune(last, daily, weekly, dry_run=dry_run, confirm=confirm, keep_safety=safety)


OPERATIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "snapshot": lambda m, s, label="manual": m.snapshot(check_label(label)),
    "snapshots": lambda m, s: m.snapshots(),
    "verify": _verify,
    "inspect": lambda m, s, snapshot="": m.inspect(snapshot or None),
    "restore": lambda m, s, snapshot, force=False, confirm="", partial=False: m.restore(
        snapshot, force, confirm, partial
    ),
    "reset": lambda m, s, scope, force=False, confirm="": m.reset(scope, force, confirm),
    "prune": _prune,
    "export_archive": lambda m, s, snapshot, name, partial=False: m.export_transfer(snapshot, name, partial),
    "repair": lambda m, s, dry_run=False, confirm="": m.repair(dry_run, confirm),
    "import_archive": lambda m, s, name, label="import": m.import_transfer(name, check_label(label)),
    "scheduled_backup": lambda m, s: m.scheduled(s.keep_last, s.keep_daily, s.keep_weekly, s.keep_safety),
}


def run(op: str, *, data: VolumeLike, backups: VolumeLike, **kwargs: Any) -> dict[str, Any]:
    """The body of maintenance function `op` in its container: settings from the container's env, the Volumes
    mounted by the app, a short log line with the outcome. Refusals raise StateError (Modal re-raises it in the
    caller, and `modal run` exits non-zero)."""
    from shared.logs import setup_logging
    from shared.settings import load_settings

    setup_logging()
    settings = load_settings()
    log.info("%s: starting", op)
    try:
        result = OPERATIONS[op](for_modal(settings, data=data, backups=backups), settings, **kwargs)
    except StateError as err:
        log.error("%s refused: %s", op, err)
        raise
    log.info(summary(op, result))
    for p in result.get("problems") or []:
        log.warning("problem: %s %s: %s", p.get("snapshot"), p.get("path"), p.get("problem"))
    return result


def function_options(settings: Settings, *, data: Any, backups: Any) -> dict[str, Any]:
    """Keyword arguments shared by every maintenance function (the image is the caller's). CPU only."""
    return {
        "cpu": 2.0,  # hashing and gzip: two cores keep a snapshot I/O-bound
        "memory": 2048,
        "timeout": settings.maintenance_timeout,
        "volumes": {settings.data_mount: data, settings.backups_mount: backups},
        "max_containers": 1,  # runs of one operation queue up instead of racing (leases order the rest)
        "env": settings.container_env(),
    }


def schedule(settings: Settings) -> Any:
    """The scheduled backup's `modal.Cron` (UTC), or None when `backup_schedule` is empty (switched off)."""
    import modal

    return modal.Cron(settings.backup_schedule, timezone="UTC") if settings.backup_schedule else None
