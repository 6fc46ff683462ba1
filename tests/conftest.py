"""Shared test plumbing: run `tabby-modal` as a real subprocess, with a clean, token-free environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The process env without any TABBY_MODAL_* / Modal credentials, and a Modal config file that does not exist."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TABBY_MODAL_", "MODAL_")) and k not in ("TABBY_BIN",)
    }
    env["MODAL_CONFIG_PATH"] = str(tmp / "no-modal.toml")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_cli(args: list[str], tmp: Path, cwd: Path | None = None, timeout: float = 60, **env: str):
    return subprocess.run(
        [str(BIN / "tabby-modal"), *args],
        cwd=cwd or tmp,
        env=clean_env(tmp, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def no_modal_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process: no TABBY_MODAL_* variables, no .env in cwd."""
    for key in list(os.environ):
        if key.startswith("TABBY_MODAL_") or key == "TABBY_BIN":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path
