"""The two forms of every state operation: `--local DIR` (directories here) or remote (the deployed maintenance app)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.operations.maintenance import for_local
from shared.operations.remote import RemoteOps

if TYPE_CHECKING:
    from shared.operations.interface import Operations
    from shared.settings import Settings


def open_ops(settings: Settings, local: str | None) -> Operations:
    """`--local DIR`: the maintenance rules over DIR/data and DIR/backups; else the deployed maintenance app."""
    if local is not None:
        return for_local(settings, local)
    return RemoteOps(settings)
