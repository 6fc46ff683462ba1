"""The server as `tabby-modal serve --local DIR` runs it: DIR/data for the Volume, DIR/live for Tabby's root, the
maintenance lease in DIR/locks. The command (shared/cli/serve.py) keeps its options, messages and exit codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared.serving.server import TabbyServer
from shared.settings import Settings


def for_local(
    settings: Settings,
    dirs: dict[str, Path],
    tabby: str,
    jwt_secret: str,
    on_tabby_spawn: Callable[[int], None],
) -> TabbyServer:
    """The server over `dirs` (settings.local_dirs(DIR), DIR/data made), Tabby's pid handed to `on_tabby_spawn`."""
    from shared.state.locks import lease

    server = TabbyServer(
        settings,
        data_dir=dirs["data"],
        live_root=dirs["live"],
        tabby_bin=tabby,
        jwt_secret=jwt_secret,
        setup_token=settings.setup_token.get_secret_value() if settings.setup_token else None,
        # A `restore`/`reset --local DIR` holds its lease in DIR/locks: Tabby waits (503) until it ends.
        maintenance_check=lambda: lease.reason(lease.DirDict(dirs["locks"])),
        maintenance_recheck=1.0,  # a local file read: cheap enough to look every second
    )
    server.on_tabby_spawn = on_tabby_spawn  # so the next `serve` can end it if this one is killed
    return server
