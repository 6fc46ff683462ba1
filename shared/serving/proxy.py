"""The ASGI reverse proxy in front of `tabby serve`: HTTP (streaming both ways) and websockets, on one aiohttp session.

Why our own: asgi-proxy-lib builds a new HTTP client per request (~40 ms CPU), buffers uploads, merges `Set-Cookie`,
hides upstream crashes as clean endings, never passes a client's disconnect on and answers websockets with 500
(Tabby's web chat, Answer Engine and Pages run over `/subscriptions`). See the notes in proxy.md for the measurements.

What this proxy guarantees (one test each in tests/test_proxy.py):
- one `aiohttp.ClientSession` per process, made at ASGI lifespan startup, or lazily if lifespan never runs; no cookie
  jar, no automatic decompression, no environment proxies, no default headers;
- request and response bodies stream (chunked uploads too, and bodies with no length header at all, as HTTP/2 sends
  them: a body is detected from the first `http.request` message); `raw_path` and the query string go upstream
  verbatim (without `raw_path`, as on Modal, `path` is quoted again; an escaped `/` cannot come back);
  header lists are passed as lists (repeats kept, each `Set-Cookie` separate); hop-by-hop headers and the names listed
  in `Connection` are dropped both ways; `X-Forwarded-For/-Host/-Proto` are added;
- a client that goes away cancels the upstream request, before and after the response headers;
- upstream refused -> 502, connect timeout -> 504 (JSON `{"error": ...}`); a failure after the headers aborts the
  client's response (it must not look complete); a gate (Tabby starting, maintenance) answers 503 with Retry-After;
- websockets with subprotocols, close codes and reasons; compression off and `Sec-WebSocket-Extensions` dropped, so
  each side negotiates its own;
- timeouts: a short connect timeout, and an idle timeout (longest silence) instead of a total one, since chat streams
  run for minutes; websockets have none (GraphQL subscriptions idle for long and keep themselves alive). Pooled connections expire before a typical upstream idle timeout, and an idempotent request without
  a body that meets a dead pooled connection is retried once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from shared.serving import pages
from shared.serving.asgi import Message, Receive, Scope, Send, reject_websocket

log = logging.getLogger("tabby_modal.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A websocket handshake is per hop: aiohttp makes its own key/version, we pass subprotocols separately, and
# extensions (permessage-deflate) are never forwarded: each side negotiates its own.
WS_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"})
# `Expect: 100-continue` is answered by the server in front of us; upstream it would only stall the upload.
REQUEST_ONLY = frozenset({b"expect"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Errors on a pooled connection the upstream already closed: safe to retry once when nothing was sent.
STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# Close codes that must not be sent in a close frame.
UNSENDABLE = {1005: 1000, 1006: 1001, 1015: 1011}  # no status -> normal; dropped -> going away
READ_BUFSIZE = 256 * 1024
# Characters left as they are when a decoded `path` is quoted again: RFC 3986 pchar and `/`, never `%`, `?`, `#`.
PATH_SAFE = "/:@!$&'()*+,;="
KEEPALIVE = (
    10.0  # pooled connections expire before a typical upstream idle timeout (hyper: none; nginx: 75 s)
)


@dataclass(frozen=True)
class Refusal:
    """What a gate answers instead of proxying: 503 + Retry-After while Tabby starts or maintenance holds it."""

    error: str
    status: int = 503
    retry_after: int | None = 10
    kind: str = "unavailable"  # which page a browser gets (shared/serving/pages.py); JSON clients get `error`


Gate = Callable[[], Refusal | None]


class _UpstreamBroken(Exception):
    """The upstream failed after the response headers were sent: the client's response must be aborted."""


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in `Connection`: hop-by-hop as well."""
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return out


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], extra: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    drop = HOP_BY_HOP | extra | _connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def _sendable(code: int | None) -> int:
    if code is None:
        return 1000
    return UNSENDABLE.get(code, code)


class Proxy:
    """ASGI app forwarding everything to `upstream` (Tabby on 127.0.0.1). `gate()` may refuse with a 503."""

    def __init__(
        self,
        upstream: str,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 300.0,
        gate: Gate | None = None,
        keepalive_timeout: float = KEEPALIVE,
        limit: int = 1000,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.gate = gate
        self.keepalive_timeout = keepalive_timeout
        self.limit = limit
        self._client: aiohttp.ClientSession | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    # --- the shared session --------------------------------------------------------------------------------
    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.limit, keepalive_timeout=self.keepalive_timeout, enable_cleanup_closed=False
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would hand one user's cookies to the next
            auto_decompress=False,
            trust_env=False,
            # No total or connect-queue timeout: streams last minutes; sock_read is the longest silence allowed.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.connect_timeout, sock_read=self.idle_timeout
            ),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            read_bufsize=READ_BUFSIZE,
            requote_redirect_url=False,
        )

    def session(self) -> aiohttp.ClientSession:
        """The process's session; made here if lifespan did not run (or ran on another loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.closed or self._client_loop is not loop:
            self._client = self._new_session()
            self._client_loop = loop
        return self._client

    async def startup(self) -> None:
        self.session()

    async def shutdown(self) -> None:
        if self._client is not None and not self._client.closed:
            await self._client.close()
        self._client = None

    # --- ASGI entry ----------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as err:  # pragma: no cover - making a session does not fail in practice
                    await send({"type": "lifespan.startup.failed", "message": str(err)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- request parts -------------------------------------------------------------------------------------
    def url(self, scope: Scope) -> URL:
        """Tabby's URL for this request: `raw_path` as the client sent it, else `path` quoted again.

        Modal's ASGI scope has no `raw_path`. Its decoded `path` is quoted back: a literal `%` (sent as `%25`), `?`,
        `#`, spaces and non-ASCII are escaped again; what cannot come back is an escaped `/` (`%2F` reads as `/`)
        or any other character the client escaped needlessly. Tabby's routes need neither.
        """
        raw = scope.get("raw_path")
        if raw:
            path = raw.decode("latin-1").split("?", 1)[0]  # some servers leave the query in raw_path
        else:
            path = urllib.parse.quote(scope.get("path") or "/", safe=PATH_SAFE)
        query = (scope.get("query_string") or b"").decode("latin-1")
        text = f"{self.upstream}{path}" + (f"?{query}" if query else "")
        return URL(text, encoded=True)  # encoded: %2F and the query stay exactly as the client sent them

    @staticmethod
    def forwarded_headers(scope: Scope, drop: frozenset[bytes] = frozenset()) -> CIMultiDict[str]:
        """Upstream headers: a list, repeats kept, in order. (Whether a body follows is not read from them: over
        HTTP/2 a body may come with neither Content-Length nor Transfer-Encoding; see `_Exchange`.)"""
        raw: list[tuple[bytes, bytes]] = scope.get("headers") or []
        chunked = any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in raw)
        kept = strip_hop_by_hop(raw, drop | FORWARDED | REQUEST_ONLY)
        headers: CIMultiDict[str] = CIMultiDict()
        prior_for = ""
        host = ""
        for k, v in raw:
            lk = k.lower()
            if lk == b"x-forwarded-for":
                prior_for = f"{prior_for}, {v.decode('latin-1')}" if prior_for else v.decode("latin-1")
            elif lk == b"host":
                host = v.decode("latin-1")
        for k, v in kept:
            if chunked and k.lower() == b"content-length":
                continue  # both is invalid; the chunked framing wins (RFC 9112 6.3)
            headers.add(k.decode("latin-1"), v.decode("latin-1"))
        client = scope.get("client")
        if client:
            headers["X-Forwarded-For"] = f"{prior_for}, {client[0]}" if prior_for else client[0]
        elif prior_for:
            headers["X-Forwarded-For"] = prior_for
        if host:
            headers["X-Forwarded-Host"] = host
        scheme = scope.get("scheme") or "http"
        headers["X-Forwarded-Proto"] = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        return headers

    # --- HTTP ----------------------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.gate() if self.gate is not None else None
        if refusal is not None:
            await pages.answer(
                scope, send, refusal.status, refusal.error, kind=refusal.kind, retry_after=refusal.retry_after
            )
            return
        headers = self.forwarded_headers(scope)
        first = await receive()  # the body's first part (maybe empty) tells whether there is a body at all
        if first["type"] != "http.request":
            return  # http.disconnect: the client left before its request was complete
        exchange = _Exchange(receive, first)
        work = asyncio.ensure_future(self._exchange(scope, send, headers, exchange))
        watch = asyncio.ensure_future(exchange.watch())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is shutting down
            work.cancel()
            watch.cancel()
            raise
        if not work.done():
            # The client went away: cancelling the exchange closes the upstream connection, so Tabby stops too.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return
        watch.cancel()
        try:
            work.result()
        except _UpstreamBroken as err:
            if exchange.disconnected:
                return
            log.warning(
                "%s %s: upstream failed mid-response (%s): aborting", scope["method"], scope["path"], err
            )
            raise
        except OSError:
            return  # sending to the client failed: it has gone, and the upstream response is closed

    async def _exchange(
        self, scope: Scope, send: Send, headers: CIMultiDict[str], exchange: _Exchange
    ) -> None:
        method = scope["method"]
        url = self.url(scope)
        retriable = method in IDEMPOTENT and not exchange.has_body
        session = self.session()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await session.request(
                    method,
                    url,
                    headers=headers,
                    data=exchange.data(),
                    allow_redirects=False,
                    compress=None,
                    auto_decompress=False,
                )
                break
            except aiohttp.ClientConnectorError as err:
                await self._error(send, scope, 502, f"upstream refused the connection: {_describe(err)}")
                return
            except aiohttp.ConnectionTimeoutError:
                await self._error(send, scope, 504, f"upstream connect timeout ({self.connect_timeout:g}s)")
                return
            except aiohttp.ServerTimeoutError:
                await self._error(
                    send, scope, 504, f"upstream sent no response headers within {self.idle_timeout:g}s"
                )
                return
            except STALE as err:
                if retriable and attempt == 1:
                    continue  # a pooled connection the upstream had closed: one retry
                await self._error(send, scope, 502, f"upstream connection failed: {_describe(err)}")
                return
            except aiohttp.ClientError as err:
                await self._error(send, scope, 502, f"upstream error: {_describe(err)}")
                return
        complete = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": strip_hop_by_hop(resp.raw_headers),
                }
            )
            try:
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, aiohttp.ClientError) as err:
                raise _UpstreamBroken(_describe(err)) from err
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        finally:
            if complete:
                resp.release()
            else:
                resp.close()  # closes the upstream connection: Tabby drops the request

    async def _error(self, send: Send, scope: Scope, status: int, error: str) -> None:
        log.warning("%s %s -> %d: %s", scope["method"], scope["path"], status, error)
        await pages.answer(scope, send, status, error, kind="upstream")

    # --- websockets ----------------------------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        refusal = self.gate() if self.gate is not None else None
        if refusal is not None:
            await reject_websocket(
                scope, send, refusal.status, refusal.error, retry_after=refusal.retry_after
            )
            return
        headers = self.forwarded_headers(scope, WS_HANDSHAKE)
        headers.popall("Content-Length", None)
        try:
            upstream = await self.session().ws_connect(
                self.url(scope),
                protocols=scope.get("subprotocols") or (),
                headers=headers,
                autoclose=False,
                autoping=True,
                compress=0,
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            )
        except aiohttp.WSServerHandshakeError as err:
            await reject_websocket(
                scope, send, err.status or 502, f"upstream refused the websocket: {err.message}"
            )
            return
        except aiohttp.ClientConnectorError as err:
            log.warning("websocket %s -> 502: %s", scope["path"], _describe(err))
            await reject_websocket(scope, send, 502, f"upstream refused the connection: {_describe(err)}")
            return
        except (TimeoutError, aiohttp.ServerTimeoutError):
            await reject_websocket(scope, send, 504, "upstream connect timeout")
            return
        except aiohttp.ClientError as err:
            await reject_websocket(scope, send, 502, f"upstream error: {_describe(err)}")
            return
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
            down = asyncio.ensure_future(self._ws_down(upstream, send))
            up = asyncio.ensure_future(self._ws_up(upstream, receive))
            try:
                await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (down, up):
                    task.cancel()
                await asyncio.gather(down, up, return_exceptions=True)
        finally:
            if not upstream.closed:
                await upstream.close()

    @staticmethod
    async def _ws_up(upstream: aiohttp.ClientWebSocketResponse, receive: Receive) -> None:
        """Client -> Tabby, until the client leaves; its close code and reason are passed on."""
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                if message.get("text") is not None:
                    await upstream.send_str(message["text"])
                else:
                    await upstream.send_bytes(message.get("bytes") or b"")
            elif kind == "websocket.disconnect":
                code = _sendable(message.get("code", 1000))
                reason = (message.get("reason") or "").encode()
                await upstream.close(code=code, message=reason)
                return

    @staticmethod
    async def _ws_down(upstream: aiohttp.ClientWebSocketResponse, send: Send) -> None:
        """Tabby -> client, until Tabby closes; its close code and reason are passed on."""
        while True:
            msg = await upstream.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                code = _sendable(msg.data)
                reason = msg.extra or ""
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                await upstream.close(code=code)
                return
            else:  # CLOSING, CLOSED, ERROR: the upstream connection is gone without a close frame
                with contextlib.suppress(Exception):
                    await send(
                        {"type": "websocket.close", "code": 1011, "reason": "upstream connection lost"}
                    )
                return


class _Exchange:
    """The client's side of one HTTP exchange: its body as a stream, and whether it has gone away.

    Whether there is a body comes from the first `http.request` message (non-empty, or more to come), never from
    the headers: over HTTP/2 (Modal's ingress) a body needs neither Content-Length nor Transfer-Encoding. A body
    whole in that first message goes upstream as bytes (with its length); a longer one streams, chunked unless the
    client gave a length.

    ASGI delivers the body and the disconnect through the same `receive()`, which must not be awaited twice at once:
    the body generator reads it while the upload lasts, the watcher afterwards.
    """

    __slots__ = ("_body_over", "_first", "_more", "disconnected", "has_body", "receive")

    def __init__(self, receive: Receive, first: Message) -> None:
        self.receive = receive
        self._first: bytes = first.get("body") or b""
        self._more = bool(first.get("more_body"))
        self.has_body = bool(self._first) or self._more
        self.disconnected = False
        self._body_over = asyncio.Event()
        if not self._more:
            self._body_over.set()

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        """What to send upstream: nothing, the whole body, or a stream of it."""
        if not self.has_body:
            return None
        return self.body() if self._more else self._first

    async def body(self) -> AsyncIterator[bytes]:
        try:
            if self._first:
                yield self._first
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    raise ConnectionResetError("client disconnected during the upload")
                chunk = message.get("body") or b""
                if chunk:
                    yield chunk
                if not message.get("more_body"):
                    return
        finally:
            self._body_over.set()

    async def watch(self) -> None:
        """Return when the client disconnects."""
        await self._body_over.wait()
        while not self.disconnected:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]
