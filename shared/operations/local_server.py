"""The local server (`tabby-modal serve --local DIR`) seen from outside: who serves DIR, probing, stop and start.

`serve --local DIR` holds DIR/serve.lock for its whole life with a record {pid, host, started, port}
(shared/state/locks/serve_lock.py). `status --local DIR` reads it; `upgrade --local DIR` stops that process (SIGTERM: Tabby
stops and the state is persisted), then starts a new one in the background with another Tabby binary, its output in
DIR/serve.log: the local form of a deploy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shared.state.errors import StateError
from shared.state.locks.serve_lock import holder

LOG_FILE = "serve.log"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] not in "ZX"
    except (OSError, IndexError):
        return True


def layout_error(root: Path) -> str | None:
    """Why `root` cannot be a `--local DIR` (a file, /dev/null, DIR/data or its metadata folder a file), or None.
    A missing DIR is fine: the commands create it."""
    from shared.state.mirror import META_DIR

    root = Path(root)
    for part in ("", "data", "backups", "live", "locks", f"data/{META_DIR}"):
        path = root / part
        if path.exists() and not path.is_dir():
            what = f"DIR/{part}" if part else "DIR"
            return f"{path} is not a directory: --local DIR needs {what} to be a folder"
    return None


def running(root: Path) -> dict[str, Any] | None:
    """The `serve` holding DIR ({pid, host, started, port, url}), or None when nobody serves it."""
    record = holder(Path(root))
    if not record or not record.get("pid"):
        return None
    port = record.get("port")
    return {**record, "url": f"http://127.0.0.1:{port}" if port else None}


def tabby_bin_of(pid: int) -> str | None:
    """The Tabby binary a running `serve` was started with (TABBY_BIN in its environment; Linux /proc)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = dict(e.decode(errors="replace").split("=", 1) for e in env if b"=" in e)
    return found.get("TABBY_MODAL_TABBY_BIN") or found.get("TABBY_BIN")


def probe(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET url/ (the proxy answers 503 while Tabby starts), or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return None


def stop(root: Path, timeout: float = 60.0) -> dict[str, Any] | None:
    """SIGTERM the running serve of DIR and wait until it has exited (it persists on the way out)."""
    doc = running(root)
    if doc is None:
        return None
    doc = {**doc, "tabby_bin": tabby_bin_of(doc["pid"])}
    os.kill(doc["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(doc["pid"]):
        if time.monotonic() > deadline:
            raise StateError(f"serve --local (pid {doc['pid']}) did not stop within {timeout:.0f}s")
        time.sleep(0.05)
    return doc


def start(
    root: Path, *, tabby_bin: str, port: int, env: dict[str, str] | None = None, image: str | None = None
) -> subprocess.Popen[bytes]:
    """Start `tabby-modal serve --local DIR` in its own session with TABBY_BIN=tabby_bin, output to DIR/serve.log."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {}), "TABBY_BIN": tabby_bin}
    child_env.pop("TABBY_MODAL_TABBY_BIN", None)  # TABBY_BIN names the binary for this run
    if image:
        child_env["TABBY_MODAL_TABBY_IMAGE"] = image
    log = open(root / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            [_cli(), "serve", "--local", str(root), "--port", str(port)],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()


def _cli() -> str:
    """The `tabby-modal` next to this Python (the venv's)."""
    here = Path(sys.executable).parent / "tabby-modal"
    return str(here) if here.exists() else "tabby-modal"


def wait_ready(root: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> dict[str, Any]:
    """Wait until the new serve holds DIR and its proxy answers with something other than 503.
    StateError when it exits first (the reason is the last lines of DIR/serve.log) or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StateError(f"serve --local exited with code {proc.returncode}: {log_tail(root)}")
        doc = running(root)
        if doc is not None and doc["url"] and (proc is None or doc["pid"] == proc.pid):
            status = probe(doc["url"])
            if status is not None and status != 503:
                return {**doc, "http_status": status}
        if time.monotonic() > deadline:
            raise StateError(f"serve --local was not ready within {timeout:.0f}s: {log_tail(root)}")
        time.sleep(0.05)


def log_tail(root: Path, lines: int = 3) -> str:
    try:
        text = (Path(root) / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "no log"
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) or "empty log"
