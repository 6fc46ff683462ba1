"""Setting up: `config`, `doctor`, `secrets`, `check-credentials`."""

from __future__ import annotations

from typing import Any

import click
from pydantic import SecretStr

from shared.cli.common import (
    EXIT_PROBLEMS,
    CommandError,
    cli,
    emit,
    get_settings,
    handled,
    has_modal_credentials,
    json_option,
    require_modal_credentials,
    say,
)
from shared.operations import doctor
from shared.settings import Settings, env_name, sources


def _config_rows(settings: Settings) -> list[dict[str, Any]]:
    src = sources()
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = "********"
        rows.append(
            {
                "name": name,
                "env": env_name(name),
                "value": value,
                "source": src[name],
                "doc": field.description,
            }
        )
    return rows


@cli.command("config")
@json_option
@click.option(
    "--get", "field", metavar="NAME", help="Print one setting's raw value (for scripts and the Makefile)."
)
@handled
def config_cmd(as_json: bool, field: str | None) -> None:
    """Print the resolved settings and where each came from (default, env, .env); secrets redacted."""
    settings = get_settings()
    if field is not None:
        if field not in Settings.model_fields or field in ("jwt_secret", "setup_token", "inference_key"):
            raise CommandError(f"unknown setting {field!r}")
        value = getattr(settings, field)
        click.echo("" if value is None else value)
        return
    rows = _config_rows(settings)

    def table(_: dict[str, Any]) -> str:
        width = max(len(r["env"]) for r in rows)
        return "\n".join(f"{r['env']:<{width}}  {r['value']!s:<32}  ({r['source']})" for r in rows)

    emit(
        {"settings": {r["name"]: {"value": r["value"], "source": r["source"]} for r in rows}}, as_json, table
    )


@cli.command("check-credentials", hidden=True)
@handled
def check_credentials_cmd() -> None:
    """Exit 2 at once, with one line, when no Modal credentials are configured (Makefile guard)."""
    require_modal_credentials()


@cli.command("doctor")
@json_option
@click.option("--offline", is_flag=True, help="Skip the checks that talk to Modal.")
@handled
def doctor_cmd(as_json: bool, offline: bool) -> None:
    """Check settings, modal, Python and credentials; with credentials also the secret, volumes and apps."""
    credentials = has_modal_credentials()
    checks, settings = doctor.offline_checks(credentials)
    if credentials and settings is not None and not offline:
        checks += doctor.online_checks(settings)
    ok = all(c["ok"] for c in checks)

    def table(_: dict[str, Any]) -> str:
        return "\n".join(f"{'ok ' if c['ok'] else 'BAD'}  {c['check']:<16} {c['detail']}" for c in checks)

    emit({"ok": ok, "checks": checks}, as_json, table)
    if not ok:
        raise SystemExit(EXIT_PROBLEMS)


@cli.command("secrets")
@handled
def secrets_cmd() -> None:
    """Create the Modal secret with a fresh JWT secret and setup token, only if it does not exist."""
    require_modal_credentials()
    say(doctor.create_secret(get_settings()))
