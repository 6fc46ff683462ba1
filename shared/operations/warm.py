"""Warm hours applied: set the server's `min_containers` through Modal's autoscaler API.

`modal.Cls.from_name(server_app, "Tabby")().update_autoscaler(min_containers=N)` overrides the deployed class's
static `min_containers` until the next deploy of the server app resets it. The maintenance app's scheduled
`warm_hours` function runs every CHECK_MINUTES minutes and sets what the schedule says for *now* (level, not edge:
a deploy, a missed run or a hand-made `tabby-modal cold` is corrected by the next run). `tabby-modal warm|cold`
set it by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared import warm_hours
from shared.state.errors import StateError

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger("tabby_modal.warm")

CHECK_MINUTES = 5  # the scheduled run's period: a window's edge takes effect within this many minutes
WARM_CONTAINERS = 1  # one server container at most anyway (one SQLite writer)


def server_instance(settings: Settings, name: str = "Tabby") -> Any:
    """The deployed `Tabby` (or split mode's `Inference`) class of the server app, instantiated (where
    `update_autoscaler` lives in modal 1.6)."""
    import modal

    cls = modal.Cls.from_name(settings.server_app, name, environment_name=settings.modal_environment)
    return cls()


def wanted(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """What the schedule says now: warm_hours.describe plus `min_containers` (None when warm hours are off)."""
    now = now or datetime.now(UTC)
    doc = warm_hours.describe(warm_hours.parse(settings.warm_hours), now)
    doc["min_containers"] = (WARM_CONTAINERS if doc["warm"] else 0) if doc["configured"] else None
    return doc


def set_min_containers(
    settings: Settings, n: int, *, instance: Callable[[Settings], Any] = server_instance
) -> dict[str, Any]:
    """Override the server's min_containers; StateError (one line) when the server is not deployed or Modal fails."""
    from modal.exception import NotFoundError

    try:
        result = instance(settings).update_autoscaler(min_containers=n)
    except NotFoundError:
        raise StateError(
            f"the server app {settings.server_app!r} is not deployed: run `make deploy-server`"
        ) from None
    except StateError:
        raise
    except Exception as err:
        raise StateError(f"update_autoscaler failed on Modal: {type(err).__name__}: {err}") from None
    applied = getattr(result, "min_containers", n)
    out = {"server_app": settings.server_app, "min_containers": n if applied is None else applied}
    if settings.inference == "split":  # split mode (issue 20): warm means a GPU replica up too
        m = max(n, settings.inference_min_containers)
        try:
            instance(settings, "Inference").update_autoscaler(min_containers=m)  # type: ignore[call-arg]
        except NotFoundError:
            raise StateError(
                f"{settings.server_app} has no Inference class: deploy it with TABBY_MODAL_INFERENCE=split "
                "(`make deploy-server`)"
            ) from None
        except Exception as err:
            raise StateError(f"update_autoscaler failed on Modal: {type(err).__name__}: {err}") from None
        out["inference_min_containers"] = m
    return out


def apply_schedule(
    settings: Settings,
    now: datetime | None = None,
    *,
    instance: Callable[[Settings], Any] = server_instance,
) -> dict[str, Any]:
    """The scheduled run: set min_containers to what the warm hours say now (nothing when they are off)."""
    doc = wanted(settings, now)
    if not doc["configured"]:
        return {**doc, "applied": False}
    result = set_min_containers(settings, doc["min_containers"], instance=instance)
    log.info(
        "warm hours %s (%s, %s): min_containers=%s; next change %s",
        "on" if doc["warm"] else "off",
        doc["schedule"],
        doc["local_time"],
        result["min_containers"],
        doc["next_change"],
    )
    return {**doc, **result, "applied": True}


def schedule(settings: Settings) -> Any:
    """The scheduled run's `modal.Cron` (every CHECK_MINUTES, on the clock), or None when warm hours are off."""
    import modal

    return modal.Cron(f"*/{CHECK_MINUTES} * * * *", timezone="UTC") if settings.warm_hours else None


def function_options(settings: Settings) -> dict[str, Any]:
    """A small CPU function: it only talks to Modal's control plane (no Volumes)."""
    return {"cpu": 0.25, "memory": 512, "timeout": 120, "max_containers": 1, "env": settings.container_env()}


def run_scheduled() -> dict[str, Any]:
    """The body of the maintenance app's `warm_hours` function, with the container's settings."""
    from shared.logs import setup_logging
    from shared.settings import load_settings

    setup_logging()
    return apply_schedule(load_settings())
