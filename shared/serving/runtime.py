"""The server at run time, the same on Modal and for `tabby-modal serve --local`:

    maintenance lock?  -> refuse to start: every request gets 503 with the reason
    hydrate            -> the data dir (the /data Volume) laid down as Tabby's local working root
    start Tabby        -> `tabby serve` on 127.0.0.1, requests get 503 + Retry-After until its port answers
    serve              -> OwnerGuard(Proxy) in front of it
    persist            -> every `persist_interval` s, then the commit hook (on Modal: `volume.commit()`)
    stop               -> stop Tabby, persist once more, commit

Tabby's root lives on local disk, never on the Volume (SQLite WAL and Tantivy locks on a network filesystem are
unverified), and the mirror copies it consistently. Nothing here raises out of `start()`: a failure is logged and
served as a 503 carrying the reason, so a broken start does not turn into a crash loop of GPU containers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.serving.guard import OwnerGuard
from shared.serving.proxy import ASGIApp, Proxy, Refusal
from shared.serving.supervisor import Supervisor, TabbyStartError, build_command, build_env, find_tabby
from shared.settings import Settings

log = logging.getLogger("tabby_modal.server")

MODAL_LIVE_ROOT = Path("/var/lib/tabby")  # container-local disk
STARTUP_MARGIN = 600  # Modal's startup budget = Tabby's + this, for hydrating /data before Tabby starts
MAINTENANCE_RECHECK = 15.0
RETRY_STARTING = 10
RETRY_MAINTENANCE = 60

MaintenanceCheck = Callable[[], str | None]


class TabbyServer:
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
        grace: float = 10.0,
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
        self.grace = grace
        self.state = "new"  # new, maintenance, hydrating, starting, ready, failed, stopping, stopped
        self.reason: str | None = None
        self.supervisor: Supervisor | None = None
        self.last_persist: dict[str, Any] | None = None
        self.persist_count = 0
        self._hydrated = False
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
                enabled=lambda: self.state == "ready",
            )
        return self._app

    def gate(self) -> Refusal | None:
        """None when Tabby serves; otherwise the 503 to answer. Called on every request: cheap."""
        state = self.state
        if state == "ready":
            sup = self.supervisor
            if sup is not None and sup.exited():
                self.state, self.reason = "failed", "tabby exited unexpectedly; see the server logs"
                log.error("tabby exited unexpectedly while serving")
                return Refusal(f"Tabby is not running: {self.reason}", retry_after=None)
            return None
        if state == "maintenance":
            self._recheck_maintenance()
            return Refusal(
                f"maintenance in progress ({self.reason}); Tabby starts when it ends",
                retry_after=RETRY_MAINTENANCE,
            )
        if state in ("new", "hydrating", "starting"):
            what = "restoring its state" if state == "hydrating" else "loading its models"
            return Refusal(f"Tabby is starting ({what}); retry shortly", retry_after=RETRY_STARTING)
        if state == "failed":
            return Refusal(f"Tabby failed to start: {self.reason}", retry_after=None)
        return Refusal("the server is stopping", retry_after=RETRY_STARTING)

    # --- start ---------------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Maintenance check, hydrate, start Tabby, wait for its port, start the persister. True when serving."""
        with self._start_lock:
            if self.state not in ("new", "maintenance") or self._stopping.is_set():
                return self.state == "ready"
            reason = self._maintenance_reason()
            if reason:
                self.state, self.reason = "maintenance", reason
                log.warning("maintenance lock held (%s): not starting Tabby", reason)
                return False
            self.state = "hydrating"
            try:
                from shared.state import mirror

                started = time.monotonic()
                result = mirror.hydrate(self.data_dir, self.live_root)
                self._epoch = result.get("epoch")
                self._hydrated = True
                log.info(
                    "hydrated %s from %s: %s (%.2fs)",
                    self.live_root,
                    self.data_dir,
                    "fresh instance" if result.get("fresh") else f"{result.get('files')} files",
                    time.monotonic() - started,
                )
            except Exception as err:
                return self._fail(f"hydrating {self.live_root} from {self.data_dir} failed: {err}")
            if self._stopping.is_set():
                return False
            self.state = "starting"
            self.supervisor = Supervisor(
                build_command(self.settings, self.tabby_bin),
                build_env(self.settings, self.live_root, self.jwt_secret),
                port=self.settings.internal_port,
                startup_timeout=self.settings.startup_timeout,
                grace=self.grace,
                cwd=self.live_root,
            )
            try:
                self.supervisor.start()
                self.supervisor.wait_ready(cancel=self._stopping)
            except TabbyStartError as err:
                return self._fail(err.reason)  # its last log lines are in the log just above
            self._persister = threading.Thread(target=self._persist_loop, name="persister", daemon=True)
            self._persister.start()
            self.state = "ready"
            return True

    def start_in_background(self) -> threading.Thread:
        """Start in a thread, so the proxy can answer 503 "starting" meanwhile (local serve)."""
        self._starter = threading.Thread(target=self.start, name="tabby-start", daemon=True)
        self._starter.start()
        return self._starter

    def _fail(self, reason: str) -> bool:
        if not self._stopping.is_set():
            self.state, self.reason = "failed", reason
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

    # --- persist -------------------------------------------------------------------------------------------
    def persist_now(self) -> dict[str, Any] | None:
        """One persist of the live root into the data dir, then the commit hook. Never raises: logs instead."""
        if not self._hydrated:
            return None  # never mirror a root we did not hydrate: it would replace the data with nothing
        from shared.state import mirror

        with self._persist_lock:
            try:
                result = mirror.persist(self.live_root, self.data_dir, commit=self.commit, epoch=self._epoch)
            except Exception as err:
                log.error("persist failed: %s", err)
                return None
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

    def _persist_loop(self) -> None:
        interval = self.settings.persist_interval
        while not self._stopping.wait(interval):  # the wait doubles as the timer and the stop signal
            self.persist_now()

    # --- stop ----------------------------------------------------------------------------------------------
    def stop(self) -> dict[str, Any] | None:
        """Stop Tabby (SIGTERM to its group, then SIGKILL), persist once more, commit. Idempotent."""
        with self._stop_lock:
            if self.state == "stopped":
                return self.last_persist
            self._stopping.set()  # a start in progress gives up at its next step (wait_ready polls it)
            with self._start_lock:  # ...and is over once this is acquired
                self.state = "stopping"
            if self._persister is not None:
                self._persister.join()
            if self.supervisor is not None:
                self.supervisor.stop()
            if self._starter is not None and self._starter.ident is not None:
                self._starter.join()
            result = self.persist_now() if self._hydrated else None
            self.state = "stopped"
            log.info("stopped")
            return result


# --- Modal wiring ---------------------------------------------------------------------------------------------


def lease_check(settings: Settings) -> MaintenanceCheck:
    """The maintenance-lock check: the live maintenance lease in the leases modal.Dict, described, or None."""
    from shared.state.lease import maintenance_reason

    return lambda: maintenance_reason(settings)


def for_modal(settings: Settings, commit: Callable[[], None] | None) -> TabbyServer:
    """The server as the Modal container runs it: /data mounted, local root on container disk, secrets in env."""
    import os

    tabby = find_tabby(settings.tabby_bin) or "/opt/tabby/bin/tabby"
    if not os.environ.get("TABBY_WEBSERVER_JWT_TOKEN_SECRET"):
        log.warning("TABBY_WEBSERVER_JWT_TOKEN_SECRET is not set: browser logins end with each container")
    return TabbyServer(
        settings,
        data_dir=Path(settings.data_mount),
        live_root=MODAL_LIVE_ROOT,
        tabby_bin=tabby,
        jwt_secret=None,  # already in the environment, from the Modal secret
        setup_token=settings.setup_token.get_secret_value() if settings.setup_token else None,
        commit=commit,
        maintenance_check=lease_check(settings),
    )


def function_options(settings: Settings, *, volume: Any = None, secret: Any = None) -> dict[str, Any]:
    """Keyword arguments for the server's `app.cls(...)` (the image is the caller's). Builds no network call."""
    import modal

    if volume is None:
        volume = modal.Volume.from_name(
            settings.data_volume, create_if_missing=True, environment_name=settings.modal_environment
        )
    if secret is None:
        secret = modal.Secret.from_name(settings.secret_name, environment_name=settings.modal_environment)
    return {
        "gpu": settings.gpu_spec(),
        "volumes": {settings.data_mount: volume},
        "secrets": [secret],
        "max_containers": 1,  # one SQLite writer, one writer of /data
        "scaledown_window": settings.scaledown_window,
        "timeout": settings.request_timeout,  # per request: an ASGI input is one HTTP request
        "startup_timeout": settings.startup_timeout + STARTUP_MARGIN,
        "env": settings.container_env(),
    }
