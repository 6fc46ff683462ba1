"""`tabby-modal`: the ops command. Each module below adds its own subcommands to `cli`."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Tabby on Modal: settings, deploy checks, Tabby's state and its backups."""


def main() -> None:
    # Imported here so each module registers its commands on `cli` exactly once.
    from shared.cli import setup  # noqa: F401

    for optional in ("state", "maintenance", "serve"):
        try:
            __import__(f"shared.cli.{optional}")
        except ModuleNotFoundError as err:
            if err.name != f"shared.cli.{optional}":
                raise
    cli(prog_name="tabby-modal")
