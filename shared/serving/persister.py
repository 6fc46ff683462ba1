"""The server's persister: the live root mirrored into the data dir every `persist_interval` s and at stop, then
the commit hook; a data dir replaced under the server (a forced restore or reset, another writer) supersedes it.
A persist still copying at the exit deadline (`stop()` sets `_deadline`) stops between two files.
Each pass learns what is in the live root from one change journal (`LiveTree`, inotify) opened after hydrate, not
from a full scan (a full scan every `full_scan_minutes` all the same).

A part of `TabbyServer` (shared/serving/server.py), which sets the attributes named below.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.serving.server_state import ServerState
from shared.serving.supervisor import Supervisor
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.state.mirror import LiveTree

log = logging.getLogger("tabby_modal.server")


class Persister:
    """persist_now, the periodic loop and superseding, over the server's attributes."""

    settings: Settings
    live_root: Path
    data_dir: Path
    commit: Callable[[], None] | None
    state: ServerState
    reason: str | None
    supervisor: Supervisor | None
    on_give_up: Callable[[str], None] | None
    last_persist: dict[str, Any] | None
    persist_count: int
    persist_error: str | None
    _deadline: float | None
    _seq: int | None
    _epoch: str | None
    _hydrated: bool
    _live_tree: LiveTree | None
    _stopping: threading.Event
    _persist_lock: threading.Lock

    # --- persist -------------------------------------------------------------------------------------------
    def persist_now(self, *, commit: bool = True) -> dict[str, Any] | None:
        """One persist of the live root into the data dir, then the commit hook (unless `commit` is False).
        Never raises: logs instead."""
        if not self._hydrated:
            return None  # never mirror a root we did not hydrate: it would replace the data with nothing
        from shared.state import mirror

        with self._persist_lock:
            if self.state == ServerState.SUPERSEDED:
                return None  # never over a data dir that someone else wrote: persist_error says why
            try:
                result = mirror.persist(
                    self.live_root,
                    self.data_dir,
                    commit=self.commit if commit else None,
                    epoch=self._epoch,
                    seq=self._seq,  # anyone else's persist, restore or reset since: DataDirReplaced
                    deadline=lambda: self._deadline,
                    live_tree=self._live_tree,
                )
            except mirror.PersistDeadline as err:
                self.persist_error = str(err)
                log.error(
                    "persist stopped at the exit deadline (%s): %s keeps the last complete persist's database and "
                    "index, plus whole newer files; the rest of the changes since are lost",
                    err,
                    self.data_dir,
                )
                return None
            except mirror.DataDirReplaced as err:
                self._supersede(str(err))
                return None
            except Exception as err:
                self.persist_error = str(err)
                log.error("persist failed: %s", err)
                return None
            self._seq = result.get("seq", self._seq)
        self.persist_error = None
        self._epoch = result.get("epoch", self._epoch)
        self.last_persist = result
        self.persist_count += 1
        if result.get("wrote_manifest", True):
            log.info(
                "persisted: %s changed, %s deleted, %s files (%.2fs)",
                result.get("changed"),
                result.get("deleted"),
                result.get("files"),
                result.get("seconds", 0.0),
            )
        return result

    def open_live_tree(self) -> None:
        """The change journal on the live root, once it is hydrated (hydrate may have put a new directory there)."""
        from shared.state import mirror

        self.close_live_tree()
        self._live_tree = mirror.LiveTree(
            self.live_root, full_scan_every=self.settings.full_scan_minutes * 60.0
        )

    def close_live_tree(self) -> None:
        tree, self._live_tree = self._live_tree, None
        if tree is not None:
            tree.close()

    def _supersede(self, why: str) -> None:
        """The data dir changed under us (a forced restore or reset, another writer): stop Tabby, stop persisting,
        answer 503 saying so. Its writes since the last persist are dropped: the new data wins."""
        self.persist_error = f"it was replaced under this server ({why})"
        if self.state == ServerState.SUPERSEDED:
            return
        self.state = ServerState.SUPERSEDED  # first: the watcher must not restart the Tabby we stop here
        self.reason = (
            f"its data dir {self.data_dir} was replaced (a restore, a reset or another writer), so this server "
            "stopped serving to keep the new data: start it again to serve that"
        )
        log.error("data dir replaced under the server (%s): stopped serving, not persisting", why)
        if self.supervisor is not None:
            self.supervisor.stop()
        # Serving 503 until someone notices helps nobody: the process ends (exit 1 locally; on Modal a fresh
        # container hydrates the new data). Not when the stop itself found it: that exit is under way.
        if self.on_give_up is not None and not self._stopping.is_set():
            self.on_give_up(self.reason)

    def _persist_loop(self) -> None:
        interval = self.settings.persist_interval
        while not self._stopping.wait(interval):  # the wait doubles as the timer and the stop signal
            self.persist_now()
