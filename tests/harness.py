"""Test plumbing for the server tests: the stand-in Tabby as a process or as a `tabby` on PATH, ports, polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

STANDIN = Path(__file__).resolve().parent / "standin_tabby.py"
TOKEN = "standin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005, what: str = "condition"
) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def tabby_wrapper(directory: Path) -> Path:
    """An executable `tabby` in `directory` that runs the stand-in with this Python."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tabby"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    path.chmod(0o755)
    return path


def standin_command(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(STANDIN),
        "serve",
        "--model",
        "TabbyML/StarCoder-1B",
        "--chat-model",
        "TabbyML/Qwen2-1.5B-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


class Standin:
    """The stand-in running as a plain process (for proxy tests): `with Standin(tmp) as s: s.url`."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.port = free_port()
        self.env = {**os.environ, "TABBY_ROOT": str(root), "STANDIN_CHILD": "0", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Standin:
        self.proc = subprocess.Popen(
            standin_command(self.port), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        poll(lambda: port_open(self.port) or self.proc.poll() is not None, 15, what="stand-in port")
        assert self.proc.poll() is None, "stand-in exited"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/debug/stats", timeout=5) as r:
            return json.loads(r.read())


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, kind: str = "asgi_host", *, lifespan: bool = True) -> AsyncIterator[str]:
    """Serve an ASGI app on 127.0.0.1 with our local host (uvicorn as `serve --local` runs it: httptools,
    websockets) or plain uvicorn (h11, its defaults); yields its base URL."""
    if kind == "asgi_host":
        from shared.serving.host import AsgiHost

        host = AsgiHost(app, "127.0.0.1", 0, lifespan=lifespan)
        await host.start()
        try:
            yield host.url
        finally:
            await host.stop()
        return
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on" if lifespan else "off",
        log_level="critical",
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


# --- Reading a data dir the way hydrate does: small files live in packs (shared.state.mirror.packed) ----------


def mirrored(data: Path) -> dict[str, Any]:
    """What the data dir holds, by path (its manifest's entries; the tree as it stands under a pending marker)."""
    from shared.state import mirror
    from shared.state.mirror.packed import tree_view

    m = mirror.load_manifest(data)
    if m is not None and mirror.pending_info(data) is None:
        return m.files
    return tree_view(data, m)


def mirrored_bytes(data_dir: Path, path: str) -> bytes:
    """The bytes of the file at `path` of a data dir, packed or plain (checked against the manifest's sha256).
    FileNotFoundError when the data dir does not hold it."""
    from shared.state.mirror.packed import read_entry

    e = mirrored(Path(data_dir)).get(path)
    if e is None or e.link is not None:
        raise FileNotFoundError(path)
    if e.pack is None:
        return (Path(data_dir) / path).read_bytes()
    return read_entry(Path(data_dir), e)


def mirrored_names(data_dir: Path, folder: str) -> set[str]:
    """The names of the files directly in `folder` of a data dir."""
    prefix = folder.rstrip("/") + "/"
    return {
        p[len(prefix) :]
        for p in mirrored(Path(data_dir))
        if p.startswith(prefix) and "/" not in p[len(prefix) :]
    }


def damage_mirrored(data_dir: Path, path: str, how: str) -> None:
    """Damage one file of a data dir where it really lives: `flip` a byte, `missing` (a packed file: its pack goes)."""
    from shared.state.mirror.packed import pack_file

    e = mirrored(Path(data_dir))[path]
    if e.pack is None:
        f, off = Path(data_dir) / path, 0
    else:
        f, off = pack_file(Path(data_dir), e.pack), e.offset
    if how == "missing":
        f.unlink()
        return
    os.chmod(f, 0o644)
    with open(f, "r+b") as out:
        out.seek(off)
        b = out.read(1)
        out.seek(off)
        out.write(bytes([b[0] ^ 0xFF]))


def mirrored_hashes(data_dir: Path) -> dict[str, str]:
    """sha256 of every file a data dir holds (links as `->target`), packed or plain, by path."""
    import hashlib

    out = {}
    for p, e in mirrored(Path(data_dir)).items():
        out[p] = (
            "->" + e.link if e.link is not None else hashlib.sha256(mirrored_bytes(data_dir, p)).hexdigest()
        )
    return out


def volume_files(data_dir: Path) -> int:
    """Files (not directories) really in the data dir, ours included: what a Modal Volume counts."""
    return sum(len(files) for _, _, files in os.walk(data_dir))
