"""The local ASGI host of `tabby-modal serve --local`: uvicorn (uvloop, httptools, websockets) behind a small
start/stop interface, so the caller keeps its own event loop and signal handling. On Modal, Modal's runtime hosts it.

Uvicorn gives what the proxy relies on: streaming bodies both ways, `http.disconnect` when the client goes away,
websockets with subprotocols, close codes and the `websocket.http.response` extension, the lifespan protocol, and an
aborted connection when the app fails after the response headers. It replaced our own aiohttp-based host, which
was slower on the proxy bench (docs/proxy.md "The local host").
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn

from shared.serving.asgi import ASGIApp

T = TypeVar("T")
GRACE = 10.0  # seconds open requests get to finish on stop() before they are cancelled


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop where it is installed (most of the host's speed comes from it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class AsgiHost:
    """Serve an ASGI app on host:port (port 0 picks one; see `.port`). `start()` runs lifespan startup first and
    raises OSError when the address cannot be bound."""

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, lifespan: bool = True
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self.config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            host=host,
            port=port,
            http="httptools",
            ws="websockets-sansio",
            lifespan="auto" if lifespan else "off",  # auto: an app without lifespan support is fine
            log_config=None,  # ours (shared.logs), not uvicorn's
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACE,
        )
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._ticks: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        # Bound here, so a taken port is an OSError for the caller (uvicorn would log it and sys.exit).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.set_inheritable(True)
        except OSError:
            sock.close()
            raise
        server = uvicorn.Server(self.config)
        if not self.config.loaded:
            self.config.load()
        server.lifespan = self.config.lifespan_class(self.config)
        try:
            # startup() without serve(): serve() would take over SIGINT/SIGTERM, which belong to the caller.
            await server.startup(sockets=[sock])
        except SystemExit:
            sock.close()
            raise RuntimeError("ASGI lifespan startup failed") from None
        self._server, self._sock = server, sock
        self._ticks = asyncio.ensure_future(
            server.main_loop()
        )  # the Date header, limits; ends on should_exit

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await server.shutdown(sockets=[self._sock] if self._sock is not None else None)
        self._sock = None

    async def __aenter__(self) -> AsgiHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
