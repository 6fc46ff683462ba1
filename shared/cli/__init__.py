"""`tabby-modal`, the ops command: setup and checks, Tabby's state and backups, `serve --local`, on this machine
or on Modal. Each module below adds its own subcommands to `cli`; the work itself is done in `shared.operations`."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Tabby on Modal: settings, deploy checks, Tabby's state and its backups."""


def main() -> None:
    # Imported here so each module registers its commands on `cli` exactly once.
    from shared.cli import maintenance, serve, setup, state, status, upgrade, warm  # noqa: F401

    cli(prog_name="tabby-modal")
