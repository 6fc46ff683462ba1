"""The box's web ingress: HTTP requests and websockets in, ASGI inputs to a container's asgi_app, responses out.

As Modal's ingress does: one input per HTTP request or websocket (method `web` of the class), args `(scope,)`;
the request body goes to the call's data_in as `http.request` messages, the app's ASGI messages come back on its
data_out. The scope has no `raw_path` (Modal's has none). Test-only request headers, removed before the scope:

    x-box-no-length: 1            drop Content-Length and Transfer-Encoding (an HTTP/2 request body)
    x-box-disconnect: cancel      when the client goes away, cancel the input through the container heartbeat
                                  (default: send `http.disconnect` on data_in, the other path Modal takes)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import WSMsgType, web
from modal._serialization import deserialize_data_format, serialize_data_format
from modal_proto import api_pb2

ASGI = api_pb2.DATA_FORMAT_ASGI
BOX_HEADERS = (b"x-box-no-length", b"x-box-disconnect")
LABELLED = "/_web/"  # the path prefix of label-routed endpoints (see control_plane.web_base)
HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "te", "trailer"}


class Ingress:
    def __init__(self, box: Any) -> None:
        self.box = box
        self.runner: web.AppRunner | None = None
        self.disconnects: list[tuple[str, str]] = []  # (input id, path taken)
        self.pending: set[asyncio.Future] = set()  # disconnect messages on their way (kept from the GC)
        self.pending: set[asyncio.Future] = set()
        self.calls_seen = 0  # requests received
        self.labels: dict[str, asyncio.Event] = {}  # label -> set once a container serves it
        self.label_calls: dict[str, int] = {}  # label -> requests received for it
        self.target = (
            asyncio.Event()
        )  # set once a container serves web requests (Modal queues them until then)

    async def start(self) -> str:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls_seen += 1
        path = request.path
        label = path.split("/")[2] if path.startswith(LABELLED) and path.count("/") >= 2 else None
        if label is not None:  # `<web_base><label>/...` (control_plane.web_base): that label's container
            path = path[len(LABELLED) + len(label) :] or "/"
            event = self.labels.setdefault(label, asyncio.Event())
            self.label_calls[label] = self.label_calls.get(label, 0) + 1
            try:
                await asyncio.wait_for(event.wait(), 120)  # Modal holds a request while a container starts
            except TimeoutError:
                return web.Response(status=503, text=f"box: no container serves {label}")
            task, method = self.box.webs[label]
        else:
            try:
                await asyncio.wait_for(self.target.wait(), 120)
            except TimeoutError:
                return web.Response(status=503, text="box: no container serves web requests")
            task, method = self.box.web
        raw = [(k.lower(), v) for k, v in request.raw_headers]
        opts = {k: v for k, v in raw if k in BOX_HEADERS}
        headers = [(k, v) for k, v in raw if k not in BOX_HEADERS]
        if opts.get(b"x-box-no-length") == b"1":
            headers = [(k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")]
        scope: dict[str, Any] = {
            "http_version": "1.1",
            "path": path,
            "query_string": request.raw_path.partition("?")[2].encode("latin-1"),  # as sent (not decoded)
            "root_path": "",
            "headers": headers,
            "client": (request.remote or "127.0.0.1", 0),
        }
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request, task, method, scope)
        scope.update(type="http", method=request.method, scheme="https")
        call = await self.box.new_call(task, method, (scope,), {})
        feeder = asyncio.ensure_future(self.feed(request, call))
        resp: web.StreamResponse | None = None
        try:
            last = 0
            while True:
                chunks = await self.next_chunks(call, last)
                if chunks is None:  # the input ended without (the rest of) a response
                    break
                done = False
                for chunk in chunks:
                    last = chunk.index
                    msg = deserialize_data_format(chunk.data, chunk.data_format, None)
                    if msg["type"] == "http.response.start":
                        resp = web.StreamResponse(status=msg["status"])
                        for k, v in msg.get("headers", []):
                            name = k.decode("latin-1") if isinstance(k, bytes) else k
                            value = v.decode("latin-1") if isinstance(v, bytes) else v
                            if name.lower() not in HOP:
                                resp.headers.add(name, value)
                        await resp.prepare(request)
                    elif msg["type"] == "http.response.body" and resp is not None:
                        if msg.get("body"):
                            await resp.write(msg["body"])
                        if not msg.get("more_body"):
                            done = True
                if done:
                    break
        except asyncio.CancelledError:
            how = (opts.get(b"x-box-disconnect") or b"message").decode()
            self.disconnects.append((call.input_id, how))
            if how == "cancel":
                task.cancels.put_nowait(call.input_id)
            else:
                message = serialize_data_format({"type": "http.disconnect"}, ASGI)
                put = asyncio.ensure_future(call.data_in.put(ASGI, message))
                self.pending.add(put)  # a reference until it ran (the handler itself is being cancelled)
                put.add_done_callback(self.pending.discard)
            raise
        finally:
            feeder.cancel()
        if resp is None:
            item = call.output.result() if call.output.done() else None
            text = item.result.exception if item is not None else "no response"
            return web.Response(status=500, text=f"box: the input ended without a response: {text}")
        await resp.write_eof()
        return resp

    async def next_chunks(self, call: Any, last: int) -> list[Any] | None:
        """The next data_out chunks, or None once the input has its output and nothing more is coming."""
        data = asyncio.ensure_future(call.data_out.after(last))
        try:
            done, _ = await asyncio.wait([data, call.output], return_when=asyncio.FIRST_COMPLETED)
            if data in done:
                return data.result()
            with contextlib.suppress(TimeoutError):  # output first: give the last chunks a moment
                return await asyncio.wait_for(data, 1.0)
            return None
        finally:
            data.cancel()

    async def feed(self, request: web.Request, call: Any) -> None:
        async def put(message: dict[str, Any]) -> None:
            await call.data_in.put(ASGI, serialize_data_format(message, ASGI))

        async for chunk in request.content.iter_chunked(1 << 16):
            await put({"type": "http.request", "body": chunk, "more_body": True})
        await put({"type": "http.request", "body": b"", "more_body": False})

    async def websocket(
        self, request: web.Request, task: Any, method: str, scope: dict
    ) -> web.StreamResponse:
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        ]
        scope.update(type="websocket", scheme="wss", subprotocols=protocols)
        call = await self.box.new_call(task, method, (scope,), {})

        async def put(message: dict[str, Any]) -> None:
            await call.data_in.put(ASGI, serialize_data_format(message, ASGI))

        await put({"type": "websocket.connect"})
        last = 0
        ws: web.WebSocketResponse | None = None
        pump: asyncio.Future | None = None
        try:
            while True:
                chunks = await self.next_chunks(call, last)
                if chunks is None:
                    break
                for chunk in chunks:
                    last = chunk.index
                    msg = deserialize_data_format(chunk.data, chunk.data_format, None)
                    kind = msg["type"]
                    if kind == "websocket.accept" and ws is None:
                        sub = msg.get("subprotocol")
                        ws = web.WebSocketResponse(protocols=(sub,) if sub else ())
                        await ws.prepare(request)
                        pump = asyncio.ensure_future(self.client_to_app(ws, put))
                    elif kind == "websocket.send" and ws is not None:
                        if msg.get("text") is not None:
                            await ws.send_str(msg["text"])
                        else:
                            await ws.send_bytes(msg.get("bytes") or b"")
                    elif kind == "websocket.close":
                        if ws is None:
                            return web.Response(status=403, text="websocket refused")
                        await ws.close(code=msg.get("code", 1000), message=(msg.get("reason") or "").encode())
                        return ws
        finally:
            if pump is not None:
                pump.cancel()
        if ws is None:
            return web.Response(status=500, text="box: the websocket input ended without an answer")
        await ws.close()
        return ws

    async def client_to_app(self, ws: web.WebSocketResponse, put: Any) -> None:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await put({"type": "websocket.receive", "text": msg.data})
            elif msg.type == WSMsgType.BINARY:
                await put({"type": "websocket.receive", "bytes": msg.data})
        await put({"type": "websocket.disconnect", "code": ws.close_code or 1005})
