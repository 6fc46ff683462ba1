"""The server's lifecycle at run time, the same on Modal and for `tabby-modal serve --local`:

    maintenance lock?  -> refuse to start: every request gets 503 with the reason
    hydrate            -> the data dir (the /data Volume) laid down as Tabby's local working root
    start Tabby        -> `tabby serve` on 127.0.0.1, requests get 503 + Retry-After until its port answers
    serve              -> OwnerGuard(Proxy) in front of it
    persist            -> every `persist_interval` s, then the commit hook (on Modal: `volume.commit()`)
    Tabby crashes      -> persist, restart it with backoff (503 "restarting" + Retry-After meanwhile); more than
                          `restart_limit` restarts within `restart_window` s: give up, persist, and `on_give_up`
                          (on Modal: the container exits and Modal starts a fresh one)
    data dir replaced  -> (a forced restore/reset, another writer) stop Tabby, never persist over it, 503 saying so,
                          and `on_give_up`: the process exits rather than answering 503 until someone looks
    stop               -> stop Tabby, persist once more, commit

Tabby's root lives on local disk, never on the Volume (SQLite WAL and Tantivy locks on a network filesystem are
unverified), and the mirror copies it consistently. Nothing here raises out of `start()`: a failure is logged and
served as a 503 carrying the reason, so a broken start does not turn into a crash loop of GPU containers.

Its parts: the states (`server_state`), the persister (`persister`), the JWT secret's check (`jwt_secret`); its
wiring on Modal (`modal_container`) and for `serve --local` (`local_machine`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.serving import tabby_config
from shared.serving.asgi import ASGIApp
from shared.serving.guard import OwnerGuard
from shared.serving.inference import Endpoint, InferenceError, split_endpoint
from shared.serving.jwt_secret import jwt_secret_problem
from shared.serving.persister import Persister
from shared.serving.proxy import Proxy, Refusal
from shared.serving.server_state import ServerState
from shared.serving.supervisor import (
    JWT_ENV,
    Supervisor,
    TabbyStartError,
    build_command,
    build_env,
)
from shared.serving.tabby_config import TabbyConfigError
from shared.settings import Settings

log = logging.getLogger("tabby_modal.server")

MAINTENANCE_RECHECK = 15.0
RETRY_STARTING = 10
RETRY_MAINTENANCE = 60
RESTART_BACKOFF = 0.5  # seconds before the first restart of a crashed Tabby; doubles with each recent restart
RESTART_BACKOFF_MAX = 30.0

MaintenanceCheck = Callable[[], str | None]
# Of the exit budget, what the final persist leaves after its last file copy: the database copy and check, the
# index metas, the manifest and our commit. Modal's own commit comes after the hook, inside Modal's ~30 s.
FINAL_RESERVE = 3.0
EARLY_PERSIST = 0.5  # seconds after SIGTERM before a Tabby still up gets a persist pass during its grace


class TabbyServer(Persister):
    """One Tabby behind the proxy, with its state hydrated from and persisted to `data_dir`."""

    def __init__(
        self,
        settings: Settings,
        *,
        data_dir: Path,
        live_root: Path,
        tabby_bin: str,
        jwt_secret: str | None = None,
        setup_token: str | None = None,
        commit: Callable[[], None] | None = None,
        maintenance_check: MaintenanceCheck | None = None,
        maintenance_recheck: float = MAINTENANCE_RECHECK,
        grace: float | None = None,
        exit_budget: float | None = None,
        on_give_up: Callable[[str], None] | None = None,
        restart_backoff: float = RESTART_BACKOFF,
        inference_endpoint: Callable[[], Endpoint] | None = None,  # split mode (issue 20)
    ) -> None:
        self.settings = settings
        # Absolute: Tabby runs with its root as working directory, where a relative TABBY_ROOT would nest.
        self.data_dir = Path(data_dir).absolute()
        self.live_root = Path(live_root).absolute()
        self.tabby_bin = tabby_bin
        self.jwt_secret = jwt_secret
        self.setup_token = setup_token
        self.commit = commit
        self.maintenance_check = maintenance_check
        self.maintenance_recheck = maintenance_recheck
        self.grace = settings.stop_grace if grace is None else grace
        self.exit_budget = settings.exit_budget if exit_budget is None else exit_budget
        self._deadline: float | None = None  # set by stop(): persists give up between two files after it
        self.on_give_up = on_give_up
        self.restart_backoff = restart_backoff
        self.inference_endpoint = inference_endpoint
        self.state = ServerState.NEW
        self.reason: str | None = None
        self.supervisor: Supervisor | None = None
        self.on_tabby_spawn: Callable[[int], None] | None = (
            None  # serve --local records Tabby's pid with its lock
        )
        self.last_persist: dict[str, Any] | None = None
        self.persist_count = 0
        self.persist_error: str | None = None  # why the last persist failed; None after a good one
        self.restarts: collections.deque[float] = collections.deque()  # monotonic times of recent restarts
        self._seq: int | None = None  # the persist manifest's number as we hydrated or last wrote it
        self._watcher: threading.Thread | None = None
        self._hydrated = False
        self._live_tree = None  # the change journal persist reads the live root through, from hydrate to stop
        self._skip_flags: frozenset[str] = frozenset()  # model flags the user's config.toml overrides
        self._epoch: str | None = None
        self._stopping = threading.Event()
        self._start_lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._persister: threading.Thread | None = None
        self._starter: threading.Thread | None = None
        self._maintenance_checked = 0.0
        self._app: ASGIApp | None = None

    # --- the ASGI app --------------------------------------------------------------------------------------
    def app(self) -> ASGIApp:
        """OwnerGuard(Proxy): the guard acts only once Tabby is up; until then the gate's 503 says why."""
        if self._app is None:
            proxy = Proxy(
                f"http://127.0.0.1:{self.settings.internal_port}",
                connect_timeout=self.settings.connect_timeout,
                idle_timeout=self.settings.idle_timeout,
                gate=self.gate,
            )
            self._app = OwnerGuard(
                proxy,
                self.live_root / "ee" / "db.sqlite",
                self.setup_token,
                enabled=lambda: self.state == ServerState.READY,
            )
        return self._app

    def gate(self) -> Refusal | None:
        """None when Tabby serves; otherwise the 503 to answer. Called on every request: cheap."""
        state = self.state
        if state == ServerState.READY:
            sup = self.supervisor
            if sup is not None and sup.exited():  # the watcher is on it: this request need not wait for it
                return Refusal(
                    "Tabby is restarting (it exited); retry shortly",
                    retry_after=RETRY_STARTING,
                    kind="restarting",
                )
            return None
        if state == ServerState.RESTARTING:
            return Refusal(
                f"Tabby is restarting ({self.reason}); retry shortly",
                retry_after=RETRY_STARTING,
                kind="restarting",
            )
        if state in (ServerState.GAVE_UP, ServerState.SUPERSEDED):
            return Refusal(f"Tabby is not running: {self.reason}", retry_after=None, kind=str(state))
        if state == ServerState.MAINTENANCE:
            self._recheck_maintenance()
            return Refusal(
                f"maintenance in progress ({self.reason}); Tabby starts when it ends",
                retry_after=RETRY_MAINTENANCE,
                kind="maintenance",
            )
        if state in (ServerState.NEW, ServerState.HYDRATING, ServerState.STARTING):
            what = "restoring its state" if state == ServerState.HYDRATING else "loading its models"
            return Refusal(
                f"Tabby is starting ({what}); retry shortly", retry_after=RETRY_STARTING, kind="starting"
            )
        if state == ServerState.FAILED:
            # jwt_secret_problem's reason starts with the variable's name: that failure has its own page.
            kind = "bad_secret" if (self.reason or "").startswith(JWT_ENV) else "failed"
            return Refusal(f"Tabby failed to start: {self.reason}", retry_after=None, kind=kind)
        return Refusal("the server is stopping", retry_after=RETRY_STARTING, kind="stopping")

    # --- start ---------------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Maintenance check, hydrate, start Tabby, wait for its port, start the persister. True when serving."""
        with self._start_lock:
            if self.state not in (ServerState.NEW, ServerState.MAINTENANCE) or self._stopping.is_set():
                return self.state == ServerState.READY
            problem = jwt_secret_problem(self.jwt_secret or os.environ.get(JWT_ENV))
            if problem:
                return self._fail(problem)  # before Tabby runs: it would exit at the first login instead
            reason = self._maintenance_reason()
            if reason:
                self.state, self.reason = ServerState.MAINTENANCE, reason
                log.warning("maintenance lock held (%s): not starting Tabby", reason)
                return False
            self.state = ServerState.HYDRATING
            try:
                from shared.state import mirror

                started = time.monotonic()
                result = mirror.hydrate(self.data_dir, self.live_root)
                self._epoch = result.get("epoch")
                self._seq = result.get("seq")
                self._hydrated = True
                self.open_live_tree()
                log.info(
                    "hydrated %s from %s: %s (%.2fs)",
                    self.live_root,
                    self.data_dir,
                    "fresh instance" if result.get("fresh") else f"{result.get('files')} files",
                    time.monotonic() - started,
                )
            except Exception as err:
                return self._fail(f"hydrating {self.live_root} from {self.data_dir} failed: {err}")
            try:
                # Split mode (issue 20): the models are on the inference endpoint, looked up at each start.
                endpoint = split_endpoint(self.settings, self.inference_endpoint)
                self._skip_flags = tabby_config.write(self.settings, self.live_root, endpoint).skip_flags
            except (TabbyConfigError, InferenceError, OSError) as err:
                return self._fail(str(err))
            if self._stopping.is_set():
                return False
            self.state = ServerState.STARTING
            self.supervisor = self._new_supervisor()
            try:
                self.supervisor.start()
                self.supervisor.wait_ready(cancel=self._stopping)
            except TabbyStartError as err:
                return self._fail(err.reason)  # its last log lines are in the log just above
            self._persister = threading.Thread(target=self._persist_loop, name="persister", daemon=True)
            self._persister.start()
            self.state = ServerState.READY
            self._watcher = threading.Thread(target=self._watch, name="tabby-watch", daemon=True)
            self._watcher.start()
            return True

    def _new_supervisor(self) -> Supervisor:
        return Supervisor(
            build_command(self.settings, self.tabby_bin, skip=self._skip_flags),
            build_env(self.settings, self.live_root, self.jwt_secret),
            port=self.settings.internal_port,
            startup_timeout=self.settings.startup_timeout,
            grace=self.grace,
            cwd=self.live_root,
            on_spawn=self.on_tabby_spawn,
        )

    def start_in_background(self) -> threading.Thread:
        """Start in a thread, so the proxy can answer 503 "starting" meanwhile (local serve)."""
        self._starter = threading.Thread(target=self.start, name="tabby-start", daemon=True)
        self._starter.start()
        return self._starter

    def _fail(self, reason: str) -> bool:
        if not self._stopping.is_set():
            self.state, self.reason = ServerState.FAILED, reason
            log.error("tabby failed to start: %s", reason)
        return False

    def _maintenance_reason(self) -> str | None:
        self._maintenance_checked = time.monotonic()
        if self.maintenance_check is None:
            return None
        try:
            return self.maintenance_check()
        except Exception as err:
            # Fail closed (maintenance may be writing /data), and look again on the next requests.
            log.warning("maintenance lock check failed: %s", err)
            return f"the maintenance lock could not be checked: {err}"

    def _recheck_maintenance(self) -> None:
        """While refused for maintenance, look again now and then (at most every `maintenance_recheck` s)."""
        if time.monotonic() - self._maintenance_checked < self.maintenance_recheck:
            return
        if self._starter is not None and self._starter.is_alive():
            return
        self._maintenance_checked = time.monotonic()
        self.start_in_background()

    # --- crash recovery ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for Tabby to exit; unless the server is stopping it, bring it back (`_recover`)."""
        while True:
            sup = self.supervisor
            if sup is None or sup.pid is None:
                return
            code = _wait_exit(sup.pid)
            if self._stopping.is_set() or self.state != ServerState.READY:
                return
            if not self._recover(sup, code):
                return

    def _recover(self, crashed: Supervisor, code: int | None) -> bool:
        """Persist, then restart Tabby after a backoff, until it serves again (True) or the restart limit is
        reached (give up: False) or the server stops. Requests get 503 "restarting" meanwhile."""
        limit, window = self.settings.restart_limit, self.settings.restart_window
        with self._start_lock:  # stop() waits for a restart step to end (each one watches `_stopping`)
            if self._stopping.is_set() or self.state != ServerState.READY:
                return False
            how = "unknown status" if code is None else f"code {code}" if code >= 0 else f"signal {-code}"
            self.state, self.reason = ServerState.RESTARTING, f"it exited with {how}"
            lines = "".join(f"\n  | {line}" for line in crashed.tail()[-20:])
            log.error("tabby exited with %s while serving; its last lines:%s", how, lines)
            crashed.stop()  # what is left of its process group (llama-server children)
            while True:
                now = time.monotonic()
                while self.restarts and now - self.restarts[0] > window:
                    self.restarts.popleft()
                if len(self.restarts) >= limit:
                    self._give_up(
                        f"tabby crashed {len(self.restarts) + 1} times within {window}s "
                        f"(TABBY_MODAL_RESTART_LIMIT={limit}, TABBY_MODAL_RESTART_WINDOW={window})"
                    )
                    return False
                self.persist_now()  # first: keep what the crashed Tabby wrote
                if self._stopping.is_set() or self.state == ServerState.SUPERSEDED:
                    return False
                delay = min(self.restart_backoff * 2 ** len(self.restarts), RESTART_BACKOFF_MAX)
                self.restarts.append(now)
                log.warning(
                    "restarting tabby in %.1fs (restart %d of at most %d within %ds)",
                    delay,
                    len(self.restarts),
                    limit,
                    window,
                )
                if self._stopping.wait(delay):
                    return False
                self.supervisor = self._new_supervisor()
                try:
                    self.supervisor.start()
                    self.supervisor.wait_ready(cancel=self._stopping)
                except TabbyStartError as err:
                    if self._stopping.is_set():
                        return False
                    self.reason = f"its restart failed: {err.reason}"
                    log.error("tabby restart failed: %s", err.reason)
                    self.supervisor.stop()
                    continue
                self.state, self.reason = ServerState.READY, None
                log.info("tabby restarted: serving again")
                return True

    def _give_up(self, why: str) -> None:
        self.state, self.reason = ServerState.GAVE_UP, f"{why}; the server exits"
        log.error("giving up on tabby: %s", why)
        self.persist_now()
        if self.on_give_up is not None:
            self.on_give_up(self.reason)

    # --- stop ----------------------------------------------------------------------------------------------
    def stop(self) -> dict[str, Any] | None:
        """Stop Tabby (SIGTERM to its group, then SIGKILL), persist once more, commit. Idempotent."""
        with self._stop_lock:
            if self.state == ServerState.STOPPED:
                return self.last_persist
            began = time.monotonic()
            # Modal gives the exit hook ~30 s: a persist still copying at this deadline stops between two files.
            self._deadline = began + max(self.exit_budget - FINAL_RESERVE, 0.0)
            self._stopping.set()  # a start in progress gives up at its next step (wait_ready polls it)
            with self._start_lock:  # ...and is over once this is acquired
                self.state = ServerState.STOPPING
            # Tabby first (it has no SIGTERM handler: it is gone in milliseconds). One that outlives EARLY_PERSIST
            # of its grace gets a persist pass meanwhile (safe while Tabby writes, like every periodic pass), so the
            # grace and the bulk of the copying overlap and the final pass copies only the rest.
            if self.supervisor is not None:
                stopper = threading.Thread(target=self.supervisor.stop, name="tabby-stop", daemon=True)
                stopper.start()
                stopper.join(EARLY_PERSIST)
                if stopper.is_alive() and self._hydrated:
                    log.info("stop: tabby still running after SIGTERM: persisting meanwhile")
                    self.persist_now(commit=False)
                stopper.join()
                log.info("stop: tabby stopped (%.2fs)", time.monotonic() - began)
            if self._persister is not None:
                self._persister.join()
            if self._watcher is not None:
                self._watcher.join(timeout=5.0)
            if self._starter is not None and self._starter.ident is not None:
                self._starter.join()
            result = None
            if self._hydrated:
                at = time.monotonic()
                result = self.persist_now()
                outcome = "done" if result is not None else f"not done ({self.persist_error})"
                log.info("stop: final persist %s (%.2fs)", outcome, time.monotonic() - at)
            self.close_live_tree()
            self.state = ServerState.STOPPED
            log.info("stopped in %.2fs (exit budget %gs)", time.monotonic() - began, self.exit_budget)
            return result


def _wait_exit(pid: int) -> int | None:
    """Block until child `pid` exits, without reaping it (its Supervisor collects it, so the pid = process group id
    cannot be reused meanwhile). Its exit code, minus the signal that killed it, or None if already reaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
