"""What every `tabby-modal` command shares: settings, `--json`, exit codes, the two-signal rule."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from shared.settings import Settings, SettingsError, load_settings
from shared.state import interruption

EXIT_OK, EXIT_PROBLEMS, EXIT_REFUSED = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
ALLOW_DESTRUCTIVE_ENV = "TABBY_MODAL_ALLOW_DESTRUCTIVE"
NO_CREDENTIALS = "No Modal credentials: run `modal token new` or set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Tabby on Modal: settings, deploy checks, Tabby's state and its backups."""


class CommandError(Exception):
    """A refusal or bad input: printed as one line on stderr, exit code `code` (2 unless said)."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def command_hint(args: str, local: str | None) -> str:
    """`tabby-modal ARGS` spelled for the form in use: with `--local DIR` it carries `--local DIR` (the real DIR,
    quoted for the shell), so the hint runs as printed instead of asking Modal."""
    return f"tabby-modal {args}" + (f" --local {shlex.quote(local)}" if local is not None else "")


_HINT = re.compile(r"`tabby-modal ([^`]*)`")


def localize(message: str, local: str | None) -> str:
    """Every `` `tabby-modal ...` `` hint in `message` (often from the state layer, which does not know the form)
    given `--local DIR` where it lacks one."""
    if local is None:
        return message

    def spell(m: re.Match[str]) -> str:
        args = m.group(1)
        return m.group(0) if "--local" in args.split() else f"`{command_hint(args, local)}`"

    return _HINT.sub(spell, message)


def say(message: str) -> None:
    """A message for the person: always stderr, so stdout stays clean for `--json`."""
    click.echo(message, err=True)


def emit(
    result: dict[str, Any], as_json: bool, human: str | Callable[[dict[str, Any]], str] | None = None
) -> None:
    """One JSON object on stdout with `--json`; otherwise a readable rendering."""
    if as_json:
        click.echo(json.dumps(result, indent=None, sort_keys=True, default=str))
        return
    text = human(result) if callable(human) else human
    click.echo(text if text is not None else json.dumps(result, indent=2, sort_keys=True, default=str))


LOCK_NAMES = {
    "maintenance": "maintenance lease",
    "store": "store lease",
    "store_file": "store lock (backups/lock.json)",
}


def lock_line(key: str, rec: dict[str, Any]) -> str:
    """`store lease: snapshot by host:123 since ..., expires in 280s (its process is gone)`."""
    what = rec.get("describe") or rec.get("malformed") or "?"
    why = f" ({rec['why']})" if rec.get("why") else ""
    return f"{LOCK_NAMES.get(key, key)}: {what}{why}"


def get_settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as err:
        raise CommandError(str(err)) from None


def has_modal_credentials() -> bool:
    """Offline check: a token in env or ~/.modal.toml. Never touches the network."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    try:
        from modal.config import config

        return bool(config.get("token_id")) and bool(config.get("token_secret"))
    except Exception:
        return False


def require_modal_credentials() -> None:
    if not has_modal_credentials():
        raise CommandError(NO_CREDENTIALS)


def confirm_destructive(settings: Settings, action: str, yes: bool) -> None:
    """Two signals: the data volume's name typed at a prompt, or `--yes` plus TABBY_MODAL_ALLOW_DESTRUCTIVE=1."""
    if yes and os.environ.get(ALLOW_DESTRUCTIVE_ENV) == "1":
        return
    if sys.stdin.isatty() and sys.stderr.isatty():
        typed = click.prompt(
            f"{action}: type the data volume's name ({settings.data_volume}) to go on", err=True, default=""
        )
        if typed.strip() == settings.data_volume:
            return
        raise CommandError(f"refused: {action} needs the volume name {settings.data_volume!r}, got {typed!r}")
    if yes:
        raise CommandError(
            f"refused: {action} with --yes also needs {ALLOW_DESTRUCTIVE_ENV}=1 in the environment"
        )
    raise CommandError(
        f"refused: {action} is destructive; pass --yes with {ALLOW_DESTRUCTIVE_ENV}=1 (no terminal)"
    )


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")(f)


def yes_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--yes`: one of the two signals a destructive command needs (see `confirm_destructive`)."""
    return click.option(
        "--yes", is_flag=True, help=f"Confirm (off a terminal also needs {ALLOW_DESTRUCTIVE_ENV}=1)."
    )(f)


def local_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--local",
        "local",
        metavar="DIR",
        default=None,
        help="Work on local folders: DIR/data for the data Volume, DIR/backups for the backups Volume.",
    )(f)


def fail(message: str, code: int, as_json: bool) -> NoReturn:
    """The end of a refused run: `error: ...` on stderr, with `--json` also `{"ok": false, "error": ...}` on
    stdout, and the exit code. After a SIGINT/SIGTERM any way out is "interrupted", 130."""
    if interruption.requested():
        message, code = "interrupted", EXIT_INTERRUPTED
        interruption.said()
    say(f"error: {message}")
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message}, sort_keys=True))
    if interruption.requested():
        interruption.exit_now(code)  # within the 2 s a stopping caller waits
    interruption.command_ends()
    sys.exit(code)


def handled(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CommandError (and bad settings) into one stderr line and the exit code; Ctrl-C exits 130."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        local = kwargs.get("local")
        try:
            return f(*args, **kwargs)
        except CommandError as err:
            fail(localize(str(err), local if isinstance(local, str) else None), err.code, as_json)
        except SettingsError as err:
            fail(str(err), EXIT_REFUSED, as_json)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED, as_json)
        except Exception:
            if interruption.requested():  # raised while unwinding an interrupt (a worker's, a lock's)
                fail("interrupted", EXIT_INTERRUPTED, as_json)
            raise

    return wrapper
