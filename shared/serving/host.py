"""A small ASGI server on aiohttp.web, so `tabby-modal serve --local` needs nothing beyond our runtime dependencies.

On Modal, Modal's runtime hosts the ASGI app; locally this does, with what the proxy relies on: streaming request and
response bodies, `http.disconnect` when the client goes away (before or after the response headers), websockets with
subprotocols and close codes (plus the `websocket.http.response` extension to refuse a handshake with a status), the
lifespan protocol, and an aborted connection (never a clean end) when the app fails after the response headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import MutableMapping
from typing import Any

from aiohttp import WSMsgType, web

from shared.serving.proxy import ASGIApp, Message, Scope

log = logging.getLogger("tabby_modal.asgi_host")

ASGI = {"version": "3.0", "spec_version": "2.4"}


def _addr(info: Any) -> list[Any] | None:
    return [info[0], info[1]] if isinstance(info, tuple) and len(info) >= 2 else None


def _scope_base(request: web.BaseRequest, state: dict[str, Any]) -> dict[str, Any]:
    target = request.raw_path
    path, _, query = target.partition("?")
    transport = request.transport
    return {
        "asgi": ASGI,
        "http_version": f"{request.version.major}.{request.version.minor}",
        "path": request.path,
        "raw_path": path.encode("latin-1", "replace"),
        "query_string": query.encode("latin-1", "replace"),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": _addr(transport.get_extra_info("peername")) if transport else None,
        "server": _addr(transport.get_extra_info("sockname")) if transport else None,
        "state": dict(state),
    }


class _Http:
    """One HTTP exchange: `receive()` yields the body, then `http.disconnect` when the client goes away."""

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.finished = False
        self.body_done = False
        self.continued = False
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        if not self.body_done:
            if not self.continued:
                self.continued = True
                if (
                    self.request.version >= (1, 1)
                    and self.request.headers.get("Expect", "").lower() == "100-continue"
                ):
                    await self.request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self.request.writer.output_size = 0  # the response proper has not started
            try:
                chunk = await self.request.content.readany()
            except (ConnectionError, asyncio.CancelledError, RuntimeError):
                self.body_done = True
                self.gone.set()
                return {"type": "http.disconnect"}
            if not chunk:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.response is not None:
                raise RuntimeError("http.response.start sent twice")
            resp = web.StreamResponse(status=message["status"])
            for k, v in message.get("headers") or ():
                resp.headers.add(k.decode("latin-1"), v.decode("latin-1"))
            self.response = resp
            await resp.prepare(self.request)  # headers go out now: SSE clients see them at once
        elif kind == "http.response.body":
            if self.response is None:
                raise RuntimeError("http.response.body before http.response.start")
            if self.finished:
                return
            if self.gone.is_set():
                raise ConnectionResetError("client disconnected")
            body = message.get("body") or b""
            if body:
                await self.response.write(body)
            if not message.get("more_body"):
                self.finished = True
                await self.response.write_eof()

    def abort(self) -> None:
        """Close the connection without ending the body: the client sees a truncated response."""
        transport = self.request.transport
        if transport is not None:
            transport.close()


class _WebSocket:
    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.ws: web.WebSocketResponse | None = None
        self.refusal: web.Response | None = None
        self._refusal_body = bytearray()
        self.connect_sent = False
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        if self.ws is None:
            await self.gone.wait()
            return {"type": "websocket.disconnect", "code": 1006}
        msg = await self.ws.receive()
        if msg.type == WSMsgType.TEXT:
            return {"type": "websocket.receive", "text": msg.data}
        if msg.type == WSMsgType.BINARY:
            return {"type": "websocket.receive", "bytes": msg.data}
        if msg.type == WSMsgType.CLOSE:
            return {"type": "websocket.disconnect", "code": msg.data, "reason": msg.extra or ""}
        return {"type": "websocket.disconnect", "code": self.ws.close_code or 1006, "reason": ""}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            protocol = message.get("subprotocol")
            ws = web.WebSocketResponse(
                protocols=(protocol,) if protocol else (), compress=False, max_msg_size=0, autoping=True
            )
            for k, v in message.get("headers") or ():
                ws.headers.add(k.decode("latin-1"), v.decode("latin-1"))
            self.ws = ws
            await ws.prepare(self.request)
        elif kind == "websocket.send":
            if self.ws is None:
                raise RuntimeError("websocket.send before websocket.accept")
            if message.get("text") is not None:
                await self.ws.send_str(message["text"])
            else:
                await self.ws.send_bytes(message.get("bytes") or b"")
        elif kind == "websocket.close":
            if self.ws is None:
                self.refusal = web.Response(status=403, text="websocket refused")
                return
            reason = (message.get("reason") or "").encode()
            await self.ws.close(code=message.get("code", 1000), message=reason)
        elif kind == "websocket.http.response.start":
            resp = web.Response(status=message["status"])
            for k, v in message.get("headers") or ():
                if k.lower() != b"content-length":
                    resp.headers.add(k.decode("latin-1"), v.decode("latin-1"))
            self.refusal = resp
        elif kind == "websocket.http.response.body":
            self._refusal_body += message.get("body") or b""
            if self.refusal is not None and not message.get("more_body"):
                self.refusal.body = bytes(self._refusal_body)


class AsgiHost:
    """Serve an ASGI app on host:port (port 0 picks one; see `.port`). `start()` runs lifespan startup first."""

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, lifespan: bool = True
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self.lifespan = lifespan
        self.state: dict[str, Any] = {}
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._lifespan_task: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._orphans: set[asyncio.Future[Any]] = set()

    @property
    def port(self) -> int:
        if self._site is None or self._site._server is None:  # type: ignore[union-attr]
            return self._port
        sockets = self._site._server.sockets  # type: ignore[union-attr]
        return sockets[0].getsockname()[1] if sockets else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self.lifespan:
            await self._lifespan_startup()
        # handler_cancellation: aiohttp cancels our handler when the client goes away; we turn it into
        # `http.disconnect` for the app.
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._port, reuse_address=True, backlog=1024)
        try:
            await self._site.start()
        except OSError:
            await self._runner.cleanup()
            await self._lifespan_shutdown()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._orphans):
            task.cancel()
        await self._lifespan_shutdown()

    async def __aenter__(self) -> AsgiHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- lifespan ------------------------------------------------------------------------------------------
    async def _lifespan_startup(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI, "state": self.state}

        async def run() -> None:
            try:
                await self.app(scope, self._to_app.get, self._from_app.put)
            except Exception as err:  # apps without lifespan support raise: that is allowed
                log.debug("lifespan not supported by the app: %s", err)
            # Returning (or raising) without a reply also means "no lifespan"; after a reply this is never read.
            await self._from_app.put({"type": "lifespan.unsupported"})

        self._lifespan_task = asyncio.ensure_future(run())
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"ASGI lifespan startup failed: {reply.get('message', '')}")
        if reply["type"] == "lifespan.unsupported":
            self._lifespan_task = None

    async def _lifespan_shutdown(self) -> None:
        task, self._lifespan_task = self._lifespan_task, None
        if task is None or task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._from_app.get(), timeout=10)

    # --- requests ------------------------------------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if (
            request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower()
        ):
            return await self._websocket(request)
        return await self._http(request)

    def _run(self, scope: MutableMapping[str, Any], conn: _Http | _WebSocket) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self.app(scope, conn.receive, conn.send))
        self._orphans.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._orphans.discard(task)
        # An app still running when its client left finishes on its own; its outcome is of no one's concern.
        if not task.cancelled() and task.exception() is not None:
            log.debug("app task ended with %r", task.exception())

    async def _http(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = _Http(request)
        scope: Scope = {
            **_scope_base(request, self.state),
            "type": "http",
            "method": request.method,
            "scheme": "https" if request.secure else "http",
        }
        task = self._run(scope, conn)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            conn.gone.set()  # the app sees http.disconnect and winds down on its own
            raise
        except Exception as err:
            if conn.response is None:
                log.error("%s %s: app error before the response: %r", request.method, request.path, err)
                return web.Response(status=500, text="Internal Server Error")
            log.debug(
                "%s %s: app error after the response headers: abort (%r)", request.method, request.path, err
            )
            conn.abort()
            return conn.response
        if conn.response is None:
            log.error("%s %s: app returned without a response", request.method, request.path)
            return web.Response(status=500, text="Internal Server Error")
        if not conn.finished:
            conn.abort()
        return conn.response

    async def _websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = _WebSocket(request)
        protocols = request.headers.get("Sec-WebSocket-Protocol", "")
        scope: Scope = {
            **_scope_base(request, self.state),
            "type": "websocket",
            "scheme": "wss" if request.secure else "ws",
            "subprotocols": [p.strip() for p in protocols.split(",") if p.strip()],
            "extensions": {"websocket.http.response": {}},
        }
        task = self._run(scope, conn)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            conn.gone.set()
            raise
        except Exception as err:
            log.debug("websocket %s: app error: %r", request.path, err)
            if conn.ws is not None:
                await conn.ws.close(code=1011)
                return conn.ws
            return web.Response(status=500, text="Internal Server Error")
        if conn.ws is not None:
            if not conn.ws.closed:
                await conn.ws.close()
            return conn.ws
        return conn.refusal or web.Response(status=403, text="websocket refused")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
