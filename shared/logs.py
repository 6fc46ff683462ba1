"""Log lines for people: short names, one line each, readable in Modal's log view and a terminal alike."""

from __future__ import annotations

import logging
import sys


class _ShortNames(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.removeprefix("tabby_modal.")
        return super().format(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Short readable lines on stderr (Modal's log view adds timestamps): `server: persisted ...`."""
    root = logging.getLogger("tabby_modal")
    if any(getattr(h, "_tabby_modal", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ShortNames("%(short)s: %(message)s"))
    handler._tabby_modal = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
