"""The remote form of the state operations (`interface.Operations`), run by the deployed maintenance app.

`tabby-modal snapshot` (no `--local`) ends up here: each call looks the app's function up by name and runs it
remotely; the result is the same dict the local form returns. Archives travel through the backups Volume's
`transfer/` folder, streamed in blocks both ways (`batch_upload`, `read_file_into_fileobj`), never whole in memory.
The leases are read and broken straight in the Dict, so `unlock` works even when the app is not deployed.

Three Modal objects make the seam (`lookup`, `backups`, `locks`): tests hand in fakes that behave like Modal's.
"""

from __future__ import annotations

import contextlib
import io
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.operations.maintenance import TRANSFER_DIR
from shared.state import archive
from shared.state.errors import StateError
from shared.state.locks import lease
from shared.state.locks import store_lock as locks

if TYPE_CHECKING:
    from shared.settings import Settings


class RemoteOps:
    """State operations on Modal, through the maintenance app (`make deploy-maintenance`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        lookup: Callable[[str], Any] | None = None,
        backups: Any = None,
        locks: lease.DictLike | None = None,
    ) -> None:
        self.settings = settings
        self._lookup = lookup or self._modal_lookup
        self._backups = backups
        self._locks = locks

    # --- Modal objects (the seam) -----------------------------------------------------------------------------

    def _modal_lookup(self, name: str) -> Any:
        import modal

        s = self.settings
        return modal.Function.from_name(s.maintenance_app, name, environment_name=s.modal_environment)

    @property
    def backups(self) -> Any:
        if self._backups is None:
            import modal

            s = self.settings
            self._backups = modal.Volume.from_name(s.backups_volume, environment_name=s.modal_environment)
        return self._backups

    @property
    def locks(self) -> lease.DictLike:
        if self._locks is None:
            self._locks = lease.modal_dict(self.settings)
        return self._locks

    def _call(self, name: str, /, **kwargs: Any) -> Any:
        """Run function `name` of the maintenance app; Modal's failures become one-line StateErrors."""
        from modal.exception import NotFoundError

        try:
            return self._lookup(name).remote(**kwargs)
        except (StateError, OSError):
            raise  # the container's own refusal, re-raised here by Modal
        except NotFoundError:
            env = (
                f" in environment {self.settings.modal_environment!r}"
                if self.settings.modal_environment
                else ""
            )
            raise StateError(
                f"the maintenance app {self.settings.maintenance_app!r} is not deployed{env} "
                f"(or has no function {name!r}): run `make deploy-maintenance`"
            ) from None
        except Exception as err:
            raise StateError(f"maintenance {name} failed on Modal: {type(err).__name__}: {err}") from None

    # --- the operations ---------------------------------------------------------------------------------------

    def snapshot(self, label: str = "manual") -> dict[str, Any]:
        return self._call("snapshot", label=label)

    def snapshots(self) -> dict[str, Any]:
        return self._call("snapshots")

    def verify(self, snapshot_id: str | None = None, sample: float | None = None) -> dict[str, Any]:
        return self._call("verify", snapshot=snapshot_id or "", sample=1.0 if sample is None else sample)

    def inspect(self, snapshot_id: str | None = None) -> dict[str, Any]:
        return self._call("inspect", snapshot=snapshot_id or "")

    def restore(
        self, snapshot_id: str, force: bool = False, confirm: str = "", partial: bool = False
    ) -> dict[str, Any]:
        # New arguments only when used: an app deployed before they existed still serves the plain call.
        extra = {"partial": True} if partial else {}
        return self._call("restore", snapshot=snapshot_id, force=force, confirm=confirm, **extra)

    def repair(self, dry_run: bool = False, confirm: str = "") -> dict[str, Any]:
        return self._call("repair", dry_run=dry_run, confirm=confirm)

    def reset(self, scope: str, force: bool = False, confirm: str = "") -> dict[str, Any]:
        return self._call("reset", scope=scope, force=force, confirm=confirm)

    def prune(
        self,
        keep_last: int,
        keep_daily: int,
        keep_weekly: int,
        dry_run: bool = False,
        confirm: str = "",
        keep_safety: int = -1,
    ) -> dict[str, Any]:
        return self._call(
            "prune",
            keep_last=keep_last,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            dry_run=dry_run,
            confirm=confirm,
            **({"keep_safety": keep_safety} if keep_safety >= 0 else {}),
        )

    def persist(self, root: Path, **kwargs: Any) -> dict[str, Any]:
        raise StateError("persist works on local folders: pass --local DIR (on Modal the server runs it)")

    hydrate = persist

    # --- archives ---------------------------------------------------------------------------------------------

    def export_archive(
        self, snapshot_id: str, out: Path, *, overwrite: bool = False, partial: bool = False
    ) -> dict[str, Any]:
        """The app writes the archive into transfer/; we stream it down, check its sha256, then delete it there."""
        out = Path(out)
        archive.check_out(out, overwrite)
        name = f"export-{secrets.token_hex(6)}.tar.gz"
        extra = {"partial": True} if partial else {}
        result = self._call("export_archive", snapshot=snapshot_id, name=name, **extra)
        try:
            with archive.written_whole(out) as sink:
                self.backups.read_file_into_fileobj(result["transfer"], sink)
                if sink.bytes != result["archive_bytes"] or sink.sha.hexdigest() != result["sha256"]:
                    raise StateError(
                        f"download of {result['transfer']} does not match its sha256: nothing written"
                    )
        finally:
            with contextlib.suppress(Exception):
                self.backups.remove_file(result["transfer"])
        return {**result, "path": str(out)}

    def import_archive(self, path: Path, label: str = "import") -> dict[str, Any]:
        """Upload the archive to transfer/ (streamed), then the app imports and deletes it."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"{path}: no such file")
        name = f"import-{secrets.token_hex(6)}.tar.gz"
        remote = f"{TRANSFER_DIR}/{name}"
        try:
            with self.backups.batch_upload(force=True) as batch:
                batch.put_file(str(path), remote)
        except Exception as err:
            raise StateError(f"upload of {path} to the backups volume failed: {err}") from None
        try:
            result = self._call("import_archive", name=name, label=label)
        except BaseException:
            with contextlib.suppress(Exception):
                self.backups.remove_file(remote)
            raise
        return {**result, "archive": str(path)}

    # --- leases -----------------------------------------------------------------------------------------------

    def _file_lock(self) -> dict[str, Any] | None:
        """The store's lock file in the backups Volume, judged by its holder's lease in the Dict."""
        buf = io.BytesIO()
        try:
            self.backups.read_file_into_fileobj(locks.LOCK_NAME, buf)
        except FileNotFoundError:
            return None
        vouch = locks.Vouch(fields={}, gone=lambda info: lease.holder_gone(self.locks, info))
        return locks.judged(locks.parse(buf.getvalue()), self.settings.lock_ttl, vouch)

    def locks_status(self) -> dict[str, Any]:
        return {**lease.status(self.locks), "store_file": self._file_lock()}

    def unlock(self, force: bool = False) -> dict[str, Any]:
        """Break the leases and the lock file whose holders are gone; with `force` the live ones too."""
        result = lease.break_leases(self.locks, force)
        file_lock = self._file_lock()
        if file_lock is not None and (force or not file_lock["live"]):
            with contextlib.suppress(FileNotFoundError):
                self.backups.remove_file(locks.LOCK_NAME)
            result["broken"]["store_file"] = file_lock
        elif file_lock is not None:
            result["held"]["store_file"] = file_lock
        return result
