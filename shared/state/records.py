"""Small JSON records on disk (lock files, pending markers), read forgivingly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_record(path: Path) -> dict[str, Any] | None:
    """A small JSON record (lock file, pending marker): None if absent, {} if empty or unreadable."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
