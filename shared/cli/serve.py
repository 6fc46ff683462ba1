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
from typing import Any

import click

from shared.cli.common import CommandError, cli, get_settings, handled, say
from shared.settings import Settings

INSTALL_HINT = (
    "install Tabby (https://tabby.tabbyml.com/docs/quick-start/installation/) and put `tabby` on PATH, "
    "or set TABBY_BIN=/path/to/tabby"
)


def local_jwt_secret(settings: Settings, root: Path) -> str:
    """TABBY_MODAL_JWT_SECRET, else one kept in DIR/jwt-secret (made once), so browser logins survive restarts."""
    from shared.state.atomic import write_bytes

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
    write_bytes(path, (value + "\n").encode(), mode=0o600)
    return value


def unwritable(path: Path, err: OSError) -> str:
    return f"cannot write in {path}: {err.strerror or err}; serve --local needs a DIR it can write to"


def writable_dir(path: Path) -> None:
    """Create `path` if missing and write a file there, or raise CommandError saying it cannot."""
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise CommandError(unwritable(path, err)) from None


def no_setup_token_line() -> str:
    """Said once at start without TABBY_MODAL_SETUP_TOKEN: the owner claim is impossible until it is set, and only
    a restart reads it, so say it before anyone tries (the guard's 403 says it again)."""
    return (
        "serve: no setup token, so nobody can claim this Tabby as its owner: add the line "
        f"TABBY_MODAL_SETUP_TOKEN={uuid.uuid4()} to .env and restart"
    )


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
    from shared.operations import local_server
    from shared.serving.supervisor import find_tabby
    from shared.state.errors import StateError
    from shared.state.locks.serve_lock import ServeLock

    settings = get_settings()
    tabby = find_tabby(settings.tabby_bin)
    if tabby is None:
        raise CommandError(f"Tabby not found ({settings.tabby_bin!r}): {INSTALL_HINT}")
    dirs = settings.local_dirs(local)
    port = settings.local_port if port is None else port
    if (wrong := local_server.layout_error(dirs["root"])) is not None:
        raise CommandError(wrong)
    # DIR is ours for the whole run, taken before anything in it is touched: a second `serve` refuses here.
    owner = ServeLock(dirs["root"])
    try:
        owner.acquire(port=port)
    except StateError as err:
        raise CommandError(f"refused: {err}; stop it first") from None
    except OSError as err:  # DIR read-only, a file, not ours...: taking the lock is the first write
        raise CommandError(unwritable(dirs["root"], err)) from None
    _end_orphan(owner)
    try:
        # Persist and hydrate write there: find out now, not at the first persist. (A missing DIR/live is made by
        # hydrate, in DIR, which the lock just proved writable; making it here would look like a hydrate.)
        writable_dir(dirs["data"])
        if dirs["live"].exists():
            writable_dir(dirs["live"])
        from shared.state import mirror

        cut = mirror.unfinished_change(dirs["data"]) if dirs["data"].is_dir() else None
        if cut is not None and not mirror.pending_alive(cut):  # a running one: its lease makes Tabby wait
            raise CommandError(str(mirror.InterruptedChange(dirs["data"], cut, "serve", f" --local {local}")))
        code = _run(settings, dirs, tabby, host, port, owner)
    finally:
        owner.release()
    raise SystemExit(code)


def _end_orphan(owner: Any) -> None:
    """A Tabby left running by a `serve` of DIR that died (SIGKILL): end its process group before starting."""
    from shared.state.locks.serve_lock import end_orphan, tabby_of

    found = tabby_of(owner.previous)
    if found is not None:
        how = end_orphan(found)
        say(f"serve: ended the Tabby (pid {found['pid']}) left running by a `serve` that died: {how}")


def _run(settings: Settings, dirs: dict[str, Path], tabby: str, host: str, port: int, owner: Any) -> int:
    from shared.logs import setup_logging
    from shared.serving.local_machine import for_local

    dirs["data"].mkdir(parents=True, exist_ok=True)
    server = for_local(settings, dirs, tabby, local_jwt_secret(settings, dirs["root"]), owner.note_tabby)
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
    if not server.setup_token and not has_user(server.data_dir / "ee" / "db.sqlite"):  # an owner needs none
        say(no_setup_token_line())
    code = 0
    try:
        starter = server.start_in_background()
        started = loop.run_in_executor(None, starter.join)
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            if server.state == "ready":
                say(f"serve: ready at {url}")
                if server.setup_token and not has_user(server.live_root / "ee" / "db.sqlite"):
                    # The real link: this terminal can read .env anyway, and a placeholder cannot be opened.
                    say(f"serve: no owner yet: open {url}/_setup?token={server.setup_token} and register")
                await stopped
                # Tabby kept crashing, or the data dir was replaced under it (a `restore --force`): exit 1.
                if server.state in ("gave_up", "superseded"):
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
