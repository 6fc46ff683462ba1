"""Is this machine ready to deploy? Offline checks first; online ones only with credentials."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import uuid
from typing import Any

from shared.settings import Settings, SettingsError, load_settings

# One function per app that exists once the app is deployed (and carries its web URL where it has one).
APP_PROBES = {
    "warmer_app": ("check_models", False),
    "server_app": ("Tabby", True),
    "maintenance_app": ("snapshots", False),
}


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail}


def offline_checks(credentials: bool) -> tuple[list[dict[str, Any]], Settings | None]:
    checks = []
    settings: Settings | None = None
    try:
        settings = load_settings()
        checks.append(_check("settings", True, "valid"))
    except SettingsError as err:
        checks.append(_check("settings", False, str(err)))
    version = importlib.metadata.version("modal")
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3])
    checks.append(_check("modal", (1, 6, 4) <= parts < (2,), f"modal {version} (need >=1.6.4,<2)"))
    checks.append(
        _check("python", sys.version_info >= (3, 11), f"Python {platform.python_version()} (need >=3.11)")
    )
    checks.append(
        _check(
            "credentials",
            credentials,
            "token found"
            if credentials
            else "none: run `modal token new` or set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET",
        )
    )
    return checks, settings


def online_checks(settings: Settings) -> list[dict[str, Any]]:
    """Ask Modal what exists: the secret, both volumes, and which apps are deployed (with URLs)."""
    import modal
    from modal.exception import NotFoundError

    env = settings.modal_environment
    checks = []
    secrets = {s.name for s in modal.Secret.objects.list(environment_name=env or "")}
    checks.append(
        _check(
            "secret",
            settings.secret_name in secrets,
            settings.secret_name
            + (" exists" if settings.secret_name in secrets else " missing: run `make secrets`"),
        )
    )
    volumes = {v.name for v in modal.Volume.objects.list(environment_name=env or "")}
    for field in ("data_volume", "backups_volume"):
        name = getattr(settings, field)
        # Both volumes are created on first deploy (create_if_missing), so missing is a note, not a failure.
        checks.append(
            _check(
                field, True, name + (" exists" if name in volumes else " not created yet (deploy creates it)")
            )
        )
    for field, (obj, web) in APP_PROBES.items():
        app_name = getattr(settings, field)
        try:
            if web:
                cls = modal.Cls.from_name(app_name, obj, environment_name=env)
                url = cls().web.get_web_url()
                detail = f"{app_name} deployed at {url}"
            else:
                modal.Function.from_name(app_name, obj, environment_name=env).hydrate()
                detail = f"{app_name} deployed"
            checks.append(_check(field, True, detail))
        except NotFoundError:
            checks.append(_check(field, True, f"{app_name} not deployed"))
    if settings.inference == "split":
        checks.append(inference_check(settings))
    return checks


def inference_check(settings: Settings) -> dict[str, Any]:
    """Split mode (issue 20): the server app must carry the Inference class, or Tabby has no models."""
    import modal
    from modal.exception import NotFoundError

    env = settings.modal_environment
    try:
        url = modal.Cls.from_name(settings.server_app, "Inference", environment_name=env)().web.get_web_url()
    except NotFoundError:
        return _check(
            "inference",
            False,
            f"{settings.server_app} has no Inference class: deploy with TABBY_MODAL_INFERENCE=split "
            "(`make deploy-server`)",
        )
    return _check("inference", True, f"{settings.server_app}.Inference deployed at {url}")


def create_secret(settings: Settings) -> str:
    """Create the Modal secret with fresh UUIDs unless it exists. Returns what happened; never the values."""
    import modal

    env = settings.modal_environment
    existing = {s.name for s in modal.Secret.objects.list(environment_name=env or "")}
    if settings.secret_name in existing:
        return f"secret {settings.secret_name} already exists: left unchanged"
    modal.Secret.objects.create(
        settings.secret_name,
        {
            # Without a fixed secret Tabby mints a new one per start and logs everyone out.
            "TABBY_WEBSERVER_JWT_TOKEN_SECRET": str(uuid.uuid4()),
            # Unlocks the owner claim on a fresh instance (shared/serving/guard.py).
            "TABBY_MODAL_SETUP_TOKEN": str(uuid.uuid4()),
            # Split mode: the key Tabby sends to the inference endpoint (shared/serving/inference.py).
            "TABBY_MODAL_INFERENCE_KEY": str(uuid.uuid4()),
        },
        environment_name=env,
    )
    return (
        f"secret {settings.secret_name} created with TABBY_WEBSERVER_JWT_TOKEN_SECRET, TABBY_MODAL_SETUP_TOKEN and "
        "TABBY_MODAL_INFERENCE_KEY "
        "(values not shown: read the setup token in Modal's dashboard, Secrets)"
    )
