"""The test doubles of `tests/` (the stand-in Tabby, the Tabby-shaped root generator), run by the benchmarks as
programs: scripts never import from tests/, they start its programs, as a user would start `tabby`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "standin_tabby.py"


def _root_cmd(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tests.tabby_root", *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def make_root(
    root: Path, *, size_mb: float, seed: int, files: int | None = None, models: bool = True
) -> dict[str, Any]:
    """A generated Tabby-like root at `root` (see tests/tabby_root.py); its JSON summary."""
    args = ["make", str(root), "--size-mb", str(size_mb), "--seed", str(seed)]
    args += ["--files", str(files)] if files is not None else []
    args += [] if models else ["--no-models"]
    return json.loads(_root_cmd(*args))


def change_root(root: Path, kind: str, seed: int) -> None:
    """What a stretch of use changes in a root: `typical` (30 s of use) or `large` (the index rewritten)."""
    _root_cmd("change", str(root), kind, "--seed", str(seed))


def standin_bin(directory: Path) -> Path:
    """An executable `tabby` in `directory` that runs the stand-in Tabby with this Python."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tabby"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
