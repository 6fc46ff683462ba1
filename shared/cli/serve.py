"""`tabby-modal serve --local DIR [--port P]`: Tabby and the proxy on this machine, on the same code path as Modal.

DIR/data stands for the /data Volume, DIR/live is Tabby's working root (hydrated from DIR/data at start, persisted
back every `persist_interval` seconds and at exit), and the proxy (with the owner-claim guard) listens on --port.
Ctrl-C or SIGTERM stops Tabby, persists and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import click

from shared.cli import cli
from shared.cli.common import CommandError, get_settings, handled, say
from shared.settings import Settings

INSTALL_HINT = (
    "install Tabby (https://tabby.tabbyml.com/docs/quick-start/installation/) and put `tabby` on PATH, "
    "or set TABBY_BIN=/path/to/tabby"
)


def local_jwt_secret(settings: Settings, root: Path) -> str:
    """TABBY_MODAL_JWT_SECRET, else one kept in DIR/jwt-secret (made once), so browser logins survive restarts."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = root / "jwt-secret"
    try:
        value = path.read_text().strip()
        uuid.UUID(value)
        return value
    except FileNotFoundError:
        pass
    except ValueError:
        raise CommandError(f"{path} does not hold a UUID: delete it to make a new one") from None
    value = str(uuid.uuid4())
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return value


@cli.command("serve")
@click.option(
    "--local",
    "local",
    metavar="DIR",
    required=True,
    help="DIR/data for the Volume, DIR/live for Tabby's root.",
)
@click.option("--port", type=int, default=None, help="Proxy port (default: TABBY_MODAL_LOCAL_PORT, 8000).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the proxy listens on.")
@handled
def serve_cmd(local: str, port: int | None, host: str) -> None:
    """Run Tabby behind the proxy on this machine (needs TABBY_BIN or `tabby` on PATH)."""
    from shared.serving.supervisor import find_tabby
    from shared.state.atomic import StateError
    from shared.state.serve_lock import ServeLock

    settings = get_settings()
    tabby = find_tabby(settings.tabby_bin)
    if tabby is None:
        raise CommandError(f"Tabby not found ({settings.tabby_bin!r}): {INSTALL_HINT}")
    dirs = settings.local_dirs(local)
    port = settings.local_port if port is None else port
    # DIR is ours for the whole run, taken before anything in it is touched: a second `serve` refuses here.
    owner = ServeLock(dirs["root"])
    try:
        owner.acquire(port=port)
    except StateError as err:
        raise CommandError(f"refused: {err}; stop it first") from None
    try:
        from shared.state import mirror

        cut = mirror.unfinished_change(dirs["data"]) if dirs["data"].is_dir() else None
        if cut is not None and not mirror.pending_alive(cut):  # a running one: its lease makes Tabby wait
            raise CommandError(str(mirror.InterruptedChange(dirs["data"], cut, "serve", f" --local {local}")))
        code = _run(settings, dirs, tabby, host, port)
    finally:
        owner.release()
    raise SystemExit(code)


def _run(settings: Settings, dirs: dict[str, Path], tabby: str, host: str, port: int) -> int:
    from shared.logs import setup_logging
    from shared.serving.runtime import TabbyServer
    from shared.state import lease

    dirs["data"].mkdir(parents=True, exist_ok=True)
    server = TabbyServer(
        settings,
        data_dir=dirs["data"],
        live_root=dirs["live"],
        tabby_bin=tabby,
        jwt_secret=local_jwt_secret(settings, dirs["root"]),
        setup_token=settings.setup_token.get_secret_value() if settings.setup_token else None,
        # A `restore`/`reset --local DIR` holds its lease in DIR/locks: Tabby waits (503) until it ends.
        maintenance_check=lambda: lease.reason(lease.DirDict(dirs["root"] / "locks")),
        maintenance_recheck=1.0,  # a local file read: cheap enough to look every second
    )
    setup_logging()
    from shared.serving.host import run

    return run(_serve(server, host, port))  # on uvloop


async def _serve(server, host: str, port: int) -> int:
    from shared.serving.guard import has_user
    from shared.serving.host import AsgiHost

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Tabby crashed more often than TABBY_MODAL_RESTART_LIMIT allows: stop, persist, exit 1.
    server.on_give_up = lambda reason: loop.call_soon_threadsafe(stop.set)
    web = AsgiHost(server.app(), host, port)
    try:
        await web.start()
    except OSError as err:
        raise CommandError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    url = f"http://{host}:{port}"
    say(
        f"serve: proxy on {url}; Tabby on 127.0.0.1:{server.settings.internal_port}; state in {server.data_dir}"
    )
    code = 0
    try:
        starter = server.start_in_background()
        started = loop.run_in_executor(None, starter.join)
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            if server.state == "ready":
                say(f"serve: ready at {url}")
                if not has_user(server.live_root / "ee" / "db.sqlite"):
                    say(
                        f"serve: no owner yet: open {url}/_setup?token=<TABBY_MODAL_SETUP_TOKEN> and register"
                    )
                await stopped
                if server.state == "gave_up":
                    say(f"error: {server.reason}")
                    code = 1
            elif server.state == "failed":
                say(f"error: {server.reason}")
                code = 1
            else:  # maintenance or stopping: wait for the signal (requests start Tabby once the lease goes)
                if server.state == "maintenance":
                    say(f"serve: {server.reason}: Tabby starts on the first request after it ends")
                await stopped
        stopped.cancel()
    finally:
        say("serve: stopping Tabby and persisting its state")
        persisted = await loop.run_in_executor(None, server.stop)
        await web.stop()
    if server.persist_error is not None:
        say(f"error: the last persist failed, {server.data_dir} keeps what it had: {server.persist_error}")
        return 1
    if persisted is not None:
        say(f"serve: stopped; state persisted to {server.data_dir}")
    else:
        say("serve: stopped; Tabby never ran, nothing to persist")
    return code
