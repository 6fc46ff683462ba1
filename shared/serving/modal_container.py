"""The server as a Modal container runs it: `for_modal` (/data mounted, Tabby's root on container disk, secrets in
the environment), the maintenance-lease check, the container's exit when the server gives up, and the keyword
arguments of the server's `app.cls(...)` (apps/server.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.serving.inference import endpoint_from_modal, split_options
from shared.serving.server import MaintenanceCheck, TabbyServer
from shared.serving.supervisor import JWT_ENV, find_tabby
from shared.settings import Settings

log = logging.getLogger("tabby_modal.server")

MODAL_LIVE_ROOT = Path("/var/lib/tabby")  # container-local disk
STARTUP_MARGIN = 600  # Modal's startup budget = Tabby's + this, for hydrating /data before Tabby starts
EXIT_FALLBACK = 120.0  # after asking Modal's runtime to shut the container down, os._exit if still alive


def exit_container(reason: str) -> None:
    """Make Modal replace this container: the way Modal's own runtime shuts a container down from inside.

    SIGINT to ourselves: the input loop's handler (modal._runtime.user_code_event_loop) cancels the loop, the
    KeyboardInterrupt unwinds through the lifecycle (ASGI lifespan shutdown, our @modal.exit hook: stop, persist,
    commit; then Modal's own Volume commit), `_container_entrypoint` catches it and the process ends; the worker
    then starts a fresh container for the next request. os._exit alone would skip those hooks and commits, so it
    is only the fallback, for a container still alive `EXIT_FALLBACK` s later.
    """
    log.error("exiting the container so that Modal starts a fresh one: %s", reason)
    fallback = threading.Timer(EXIT_FALLBACK, os._exit, args=(1,))
    fallback.daemon = True
    fallback.start()
    os.kill(os.getpid(), signal.SIGINT)


def lease_check(settings: Settings) -> MaintenanceCheck:
    """The maintenance-lock check: the live maintenance lease in the leases modal.Dict, described, or None."""
    from shared.state.locks.lease import maintenance_reason

    return lambda: maintenance_reason(settings)


def for_modal(settings: Settings, commit: Callable[[], None] | None) -> TabbyServer:
    """The server as the Modal container runs it: /data mounted, local root on container disk, secrets in env."""
    tabby = find_tabby(settings.tabby_bin) or "/opt/tabby/bin/tabby"
    if not os.environ.get(JWT_ENV):
        log.warning("%s is not set: browser logins end with each container", JWT_ENV)
    return TabbyServer(
        settings,
        data_dir=Path(settings.data_mount),
        live_root=MODAL_LIVE_ROOT,
        tabby_bin=tabby,
        jwt_secret=None,  # already in the environment, from the Modal secret
        setup_token=settings.setup_token.get_secret_value() if settings.setup_token else None,
        commit=commit,
        maintenance_check=lease_check(settings),
        on_give_up=exit_container,
        inference_endpoint=(lambda: endpoint_from_modal(settings)) if settings.inference == "split" else None,
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
        # Cores for Tabby's webserver and for our copy pools: hydrate at start and every persist pass run two
        # threads per core (shared/state/cores.py); docs/benchmarks.md has the hydrate's scaling.
        "cpu": settings.server_cpu,
        **split_options(settings),  # split mode (issue 20): no GPU, CPU and memory from settings
        "volumes": {settings.data_mount: volume},
        "secrets": [secret],
        "max_containers": 1,  # one SQLite writer, one writer of /data
        "scaledown_window": settings.scaledown_window,
        "timeout": settings.request_timeout,  # per request: an ASGI input is one HTTP request
        "startup_timeout": settings.startup_timeout + STARTUP_MARGIN,
        "env": settings.container_env(),
    }
