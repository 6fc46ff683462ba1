"""`tabby-modal`, the ops command: setup and checks, Tabby's state and backups, `serve --local`, on this machine
or on Modal. `cli` (the click group) lives in `common`; each command module adds its own subcommands to it, and
`main` imports them all. The work itself is done in `shared.operations`."""

from __future__ import annotations

import os
import sys

if os.path.basename(sys.argv[0]) == "tabby-modal":  # the entry point: signals handled before the slow imports
    from shared.state.interruption import install

    install()

import click

from shared.cli.common import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Every way out is one `error:` line and an exit code: 2 for bad input (also click's usage errors, with
    `{"ok": false, ...}` on stdout under `--json`), 130 for Ctrl-C."""
    from shared.cli.common import EXIT_INTERRUPTED, EXIT_REFUSED, fail
    from shared.state import interruption

    interruption.install()  # SIGINT and SIGTERM: exit 130 within 2 s, locks released (see shared.state.interruption)
    as_json = "--json" in sys.argv[1:]
    try:
        # Imported here so each module registers its commands on `cli` exactly once.
        from shared.cli import maintenance, repair, serve, setup, state, status, upgrade, warm  # noqa: F401

        interruption.command_starts()
        code = cli.main(prog_name="tabby-modal", standalone_mode=False)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED, as_json)
    except click.exceptions.Abort as err:  # click's form of Ctrl-C (or end of input at a prompt)
        if isinstance(err.__context__, KeyboardInterrupt):
            fail("interrupted", EXIT_INTERRUPTED, as_json)
        fail("aborted: no input", EXIT_REFUSED, as_json)
    except click.exceptions.NoArgsIsHelpError as err:  # bare `tabby-modal`: the help, as `-h` prints it
        click.echo(err.ctx.get_help() if err.ctx is not None else "")
        sys.exit(0)
    except click.UsageError as err:
        hint = f" (see `{err.ctx.command_path} -h`)" if err.ctx is not None else ""
        message = " ".join(err.format_message().split()).rstrip(".")  # click's choice lists span lines
        fail(f"{message}{hint}", EXIT_REFUSED, as_json)
    except click.ClickException as err:
        fail(err.format_message(), err.exit_code, as_json)
    except Exception:
        if interruption.requested():  # an error raised while unwinding an interrupt: still just "interrupted"
            fail("interrupted", EXIT_INTERRUPTED, as_json)
        raise
    interruption.command_ends()
    sys.exit(code if isinstance(code, int) else 0)
