"""Every property of the proxy (see shared/serving/proxy.py), one test each, over real sockets on 127.0.0.1.

The proxy runs under our aiohttp-based ASGI host and under uvicorn (HTTP only: this uvicorn has no websocket
library); the upstream is the stand-in Tabby, or a purpose-built socket server where a property needs one.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serving.proxy import Proxy, Refusal
from tests.harness import TOKEN, Standin, free_port, serve_asgi

HOSTS = ["asgi_host", "uvicorn"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory):
    with Standin(tmp_path_factory.mktemp("standin-root")) as s:
        yield s


def run(scenario: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


async def until(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes exactly as given; return the whole response (the server closes: `Connection: close`)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def split_response(data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
    return int(lines[0].split()[1]), headers, body  # type: ignore[return-value]


def echo_headers(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in doc["headers"]]


# --- the shared session ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTS)
def test_one_session_per_process_made_at_lifespan(standin, kind):
    proxy = Proxy(standin.url)

    async def scenario():
        async with serve_asgi(proxy, kind) as url:
            made = proxy._client
            assert made is not None and not made.closed  # lifespan startup made it
            async with aiohttp.ClientSession() as c:
                for _ in range(20):
                    async with c.get(f"{url}/debug/json") as r:
                        assert r.status == 200
                        await r.read()
            assert proxy._client is made
            assert len(made.connector._conns) == 1  # type: ignore[union-attr]  # one pooled keep-alive connection
        assert made.closed and proxy._client is None  # lifespan shutdown closed it

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_lazy_session_when_lifespan_never_runs(standin, kind):
    proxy = Proxy(standin.url)

    async def scenario():
        async with serve_asgi(proxy, kind, lifespan=False) as url:
            assert proxy._client is None
            async with aiohttp.ClientSession() as c, c.get(f"{url}/debug/json") as r:
                assert r.status == 200
            assert proxy._client is not None
        await proxy.shutdown()

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_no_default_headers_added(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url:
            data = await raw_request(
                url, b"GET /debug/echo HTTP/1.1\r\nHost: tabby.example\r\nConnection: close\r\n\r\n"
            )
        status, _, body = split_response(data)
        names = [k for k, _ in echo_headers(json.loads(body[body.index(b"{") : body.rindex(b"}") + 1]))]
        assert status == 200
        assert sorted(names) == ["host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"]

    run(scenario)


def test_environment_proxies_are_ignored(standin, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url)) as url,
            aiohttp.ClientSession(trust_env=False) as c,
            c.get(f"{url}/debug/json") as r,
        ):
            assert r.status == 200

    run(scenario)


def test_no_cookie_jar_between_clients(standin):
    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url)) as url,
            aiohttp.ClientSession() as first,
            first.get(f"{url}/debug/cookies") as r,
        ):
            assert r.status == 200
            async with (
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as second,
                second.get(f"{url}/debug/echo") as r,
            ):
                doc = await r.json()
        assert "cookie" not in [k for k, _ in echo_headers(doc)]

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_no_automatic_decompression(standin, kind):
    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url), kind) as url,
            aiohttp.ClientSession(auto_decompress=False) as c,
            c.get(f"{url}/debug/gzip", headers={"Accept-Encoding": "gzip"}) as r,
        ):
            body = await r.read()
            assert r.headers["Content-Encoding"] == "gzip"
            assert int(r.headers["Content-Length"]) == len(body)
        assert gzip.decompress(body) == b"compressed " * 100

    run(scenario)


# --- streaming ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTS)
def test_response_streams_as_produced(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url, aiohttp.ClientSession() as c:
            started = time.monotonic()
            body = {"events": 4, "interval_ms": 300}
            async with c.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                first = await r.content.readuntil(b"\n\n")
                first_at = time.monotonic() - started
                rest = await r.read()
        assert first.startswith(b"data: ") and b"tok0" in first
        assert first_at < 0.25  # the whole stream takes >= 0.9 s
        assert rest.count(b"data: ") == 4 and rest.endswith(b"data: [DONE]\n\n")

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_chunked_upload_streams_without_buffering(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url, aiohttp.ClientSession() as c:
            before = standin.stats()["upload_bytes"]
            first = b"a" * 100_000

            async def body():
                yield first
                # The rest is sent only once the upstream has seen the first part: a proxy that buffered the
                # whole body would never forward it, and this would time out.
                await until(
                    lambda: standin.stats()["upload_bytes"] - before >= len(first), 5, "first part upstream"
                )
                for _ in range(10):
                    yield b"b" * 100_000

            async with c.post(f"{url}/debug/echo", data=body()) as r:
                doc = await r.json()
        assert doc["chunked"] is True
        assert doc["body_bytes"] == 1_100_000
        assert doc["body_sha256"] == hashlib.sha256(first + b"b" * 1_000_000).hexdigest()

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_upload_with_content_length_keeps_it(standin, kind):
    payload = b"z" * 300_000

    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url), kind) as url,
            aiohttp.ClientSession() as c,
            c.put(f"{url}/debug/echo", data=payload) as r,
        ):
            doc = await r.json()
        assert doc["chunked"] is False
        assert ("content-length", str(len(payload))) in echo_headers(doc)
        assert doc["body_sha256"] == hashlib.sha256(payload).hexdigest()

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_large_download_passes_whole(standin, kind):
    size = 20 * 1024 * 1024

    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url), kind) as url,
            aiohttp.ClientSession() as c,
            c.get(f"{url}/debug/download?bytes={size}") as r,
        ):
            n = 0
            async for chunk in r.content.iter_any():
                n += len(chunk)
        assert n == size

    run(scenario)


# --- paths and headers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTS)
def test_raw_path_and_query_verbatim(standin, kind):
    target = b"/debug/echo/a%2Fb%20c/%7Euser?q=a%20b&x=1+2&e=&flag&s=%2F"

    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url:
            data = await raw_request(
                url, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
        _, _, body = split_response(data)
        doc = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])
        assert doc["raw_path"] == target.decode()

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_repeated_request_headers_kept_in_order(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url, aiohttp.ClientSession() as c:
            headers = [("X-Tag", "one"), ("X-Other", "x"), ("X-Tag", "two"), ("Authorization", "Bearer t")]
            async with c.get(f"{url}/debug/echo", headers=headers) as r:
                doc = await r.json()
        got = echo_headers(doc)
        assert [v for k, v in got if k == "x-tag"] == ["one", "two"]
        assert ("authorization", "Bearer t") in got

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_each_set_cookie_and_repeated_response_header_kept(standin, kind):
    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url), kind) as url,
            aiohttp.ClientSession() as c,
            c.get(f"{url}/debug/cookies") as r,
        ):
            return [(k.decode().lower(), v.decode()) for k, v in r.raw_headers]

    headers = run(scenario)
    assert [v for k, v in headers if k == "set-cookie"] == [
        "a=1; Path=/; HttpOnly",
        "b=2; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
    ]
    assert [v for k, v in headers if k == "x-multi"] == ["one", "two"]


@pytest.mark.parametrize("kind", HOSTS)
def test_hop_by_hop_headers_stripped_both_ways(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url:
            data = await raw_request(
                url,
                b"GET /debug/echo HTTP/1.1\r\nHost: h\r\nConnection: close, X-Private\r\nX-Private: 1\r\n"
                b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
                b"Upgrade: h2c\r\nX-Kept: yes\r\n\r\n",
            )
            down = await raw_request(
                url, b"GET /debug/cookies HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
        _, _, body = split_response(data)
        upstream = [k for k, _ in echo_headers(json.loads(body[body.index(b"{") : body.rindex(b"}") + 1]))]
        for name in ("connection", "x-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
            assert name not in upstream
        assert "x-kept" in upstream
        _, back, _ = split_response(down)
        names = [k.lower() for k, _ in back]
        assert "keep-alive" not in names and "x-hop" not in names  # X-Hop was listed in Connection upstream
        assert "set-cookie" in names

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_forwarded_headers_added(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url, aiohttp.ClientSession() as c:
            hdrs = {
                "Host": "tabby.example.com",
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Host": "spoof",
            }
            async with c.get(f"{url}/debug/echo", headers=hdrs) as r:
                doc = await r.json()
        got = echo_headers(doc)
        assert ("host", "tabby.example.com") in got  # Host passes unchanged
        assert ("x-forwarded-for", "203.0.113.7, 127.0.0.1") in got
        assert ("x-forwarded-host", "tabby.example.com") in got
        assert ("x-forwarded-proto", "http") in got
        assert [k for k, _ in got].count("x-forwarded-host") == 1

    run(scenario)


# --- websockets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/subscriptions", "/hub"])
def test_websocket_subprotocol_and_messages_both_ways(standin, path):
    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url)) as url,
            aiohttp.ClientSession() as c,
            c.ws_connect(f"{url}{path}", protocols=["graphql-transport-ws"]) as ws,
        ):
            assert ws.protocol == "graphql-transport-ws"
            await ws.send_str(json.dumps({"type": "connection_init", "payload": {}}))
            assert json.loads((await ws.receive()).data) == {"type": "connection_ack"}
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
            await ws.send_bytes(b"\x00\x01binary")
            assert (await ws.receive()).data == b"\x00\x01binary"

    run(scenario)


def test_websocket_close_code_and_reason_from_upstream(standin):
    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url)) as url,
            aiohttp.ClientSession() as c,
            c.ws_connect(f"{url}/subscriptions", protocols=["graphql-transport-ws"]) as ws,
        ):
            await ws.send_str("close:4401:Unauthorized")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4401, "Unauthorized")

    run(scenario)


def test_websocket_close_code_from_client(standin):
    async def scenario():
        async with serve_asgi(Proxy(standin.url)) as url, aiohttp.ClientSession() as c:
            before = len(standin.stats()["ws_closes"])
            async with c.ws_connect(f"{url}/subscriptions", protocols=["graphql-transport-ws"]) as ws:
                await ws.send_str("ping-me")
                await ws.receive()
                await ws.close(code=4002, message=b"bye")
            closes = await until(lambda: standin.stats()["ws_closes"][before:], 5, "upstream close")
        assert closes[0] == [4002, "/subscriptions"]

    run(scenario)


def test_websocket_extensions_not_forwarded(standin):
    async def scenario():
        # The client asks for permessage-deflate; the upstream would accept it if the proxy forwarded that.
        async with (
            serve_asgi(Proxy(standin.url)) as url,
            aiohttp.ClientSession() as c,
            c.ws_connect(f"{url}/subscriptions", protocols=["graphql-transport-ws"], compress=15) as ws,
        ):
            await ws.send_str("x" * 1000)
            assert (await ws.receive()).data == "x" * 1000
        upstream = [k.lower() for k, _ in standin.stats()["ws_headers"]]
        assert "sec-websocket-extensions" not in upstream
        assert "sec-websocket-protocol" in upstream

    run(scenario)


# --- cancellation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTS)
def test_client_leaving_after_headers_cancels_upstream(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url:
            before = standin.stats()
            session = aiohttp.ClientSession()
            r = await session.post(
                f"{url}/v1/chat/completions", json={"events": 300, "interval_ms": 10}, headers=AUTH
            )
            for _ in range(3):
                await r.content.readuntil(b"\n\n")
            r.close()  # the client goes away at event 3 of 300
            await session.close()
            left = time.monotonic()
            await until(
                lambda: standin.stats()["chat_cancelled"] > before["chat_cancelled"], 5, "upstream cancel"
            )
            produced = standin.stats()["chat_events"] - before["chat_events"]
            assert time.monotonic() - left < 1.0
        assert produced <= 10, produced  # 3 read, a few in flight; never the 300

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_client_leaving_before_headers_cancels_upstream(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url:
            before = standin.stats()
            async with aiohttp.ClientSession() as c:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.get(f"{url}/debug/slow?ms=10000"), 0.3)
            await until(
                lambda: standin.stats()["slow_cancelled"] > before["slow_cancelled"], 5, "upstream cancel"
            )
            assert standin.stats()["slow_open"] == 0

    run(scenario)


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTS)
def test_upstream_refused_is_502_json(kind):
    async def scenario():
        async with (
            serve_asgi(Proxy(f"http://127.0.0.1:{free_port()}"), kind) as url,
            aiohttp.ClientSession() as c,
            c.get(f"{url}/v1/health") as r,
        ):
            assert r.status == 502
            assert r.headers["Content-Type"] == "application/json"
            doc = await r.json()
        assert "refused" in doc["error"]

    run(scenario)


def test_upstream_connect_timeout_is_504():
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)

    async def scenario():
        proxy = Proxy(f"http://127.0.0.1:{port}", connect_timeout=0.3)
        async with serve_asgi(proxy) as url, aiohttp.ClientSession() as c:
            started = time.monotonic()
            async with c.get(f"{url}/v1/health") as r:
                assert r.status == 504
                assert "timeout" in (await r.json())["error"]
            assert time.monotonic() - started < 3

    try:
        run(scenario)
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.parametrize("kind", HOSTS)
@pytest.mark.parametrize("endpoint", ["abort", "chat"])
def test_upstream_failing_mid_stream_aborts_the_client(standin, kind, endpoint):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url, aiohttp.ClientSession() as c:
            if endpoint == "abort":  # Content-Length 1000, 100 bytes sent, then the connection dies
                request = c.get(f"{url}/debug/abort")
            else:  # chunked SSE, dies after 2 events
                request = c.post(
                    f"{url}/v1/chat/completions", json={"events": 10, "abort_after": 2}, headers=AUTH
                )
            async with request as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()

    run(scenario)


def test_upstream_process_crash_mid_stream_aborts_the_client(tmp_path):
    with Standin(tmp_path) as s:

        async def scenario():
            async with serve_asgi(Proxy(s.url)) as url, aiohttp.ClientSession() as c:
                body = {"events": 10, "crash_after": 2, "interval_ms": 5}
                async with c.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()

        run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_gate_answers_503_with_retry_after(standin, kind):
    refusal: list[Refusal | None] = [
        Refusal("Tabby is starting (loading its models); retry shortly", retry_after=7)
    ]
    proxy = Proxy(standin.url, gate=lambda: refusal[0])

    async def scenario():
        async with (
            serve_asgi(proxy, kind) as url,
            aiohttp.ClientSession() as c,
            c.get(f"{url}/v1/health", headers=AUTH) as r,
        ):
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
            assert (await r.json())["error"].startswith("Tabby is starting")
            refusal[0] = None
            async with c.get(f"{url}/v1/health", headers=AUTH) as r:
                assert r.status == 200

    run(scenario)


def test_gate_refuses_websockets_with_its_status(standin):
    proxy = Proxy(standin.url, gate=lambda: Refusal("maintenance in progress (restore)", retry_after=60))

    async def scenario():
        async with serve_asgi(proxy) as url, aiohttp.ClientSession() as c:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await c.ws_connect(f"{url}/subscriptions", protocols=["graphql-transport-ws"])
            assert info.value.status == 503

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_idle_timeout_limits_silence_not_duration(standin, kind):
    async def scenario():
        proxy = Proxy(standin.url, idle_timeout=0.4)
        async with serve_asgi(proxy, kind) as url, aiohttp.ClientSession() as c:
            # 6 events 150 ms apart: 0.9 s in all, longer than the idle timeout, never silent that long.
            body = {"events": 6, "interval_ms": 150}
            async with c.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
                assert (await r.read()).count(b"data: ") == 7
            # One event, then 2 s of silence: cut at the idle timeout, and visibly (not a clean end).
            async with c.get(f"{url}/debug/idle?gap_ms=2000") as r:
                assert await r.content.readuntil(b"\n\n") == b"data: first\n\n"
                started = time.monotonic()
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
                assert time.monotonic() - started < 1.5

    run(scenario)


# --- stale keep-alive -----------------------------------------------------------------------------------------


class OneShotUpstream:
    """Answers the first request on each connection, then closes the connection when the next one arrives: a
    pooled keep-alive connection that the upstream has dropped."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if served:
                    break  # the dead pooled connection
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def test_stale_pooled_connection_is_retried_once_for_idempotent_requests():
    async def scenario():
        upstream = OneShotUpstream()
        async with upstream as up, serve_asgi(Proxy(up)) as url, aiohttp.ClientSession() as c:
            for _ in range(3):
                async with c.get(f"{url}/x") as r:
                    assert r.status == 200 and await r.read() == b"ok"
            assert upstream.connections == 3 and upstream.requests == 5  # two retries on fresh connections
            # A request with a body is never replayed: the client learns it failed.
            async with c.post(f"{url}/x", data=b"body") as r:
                assert r.status == 502

    run(scenario)


def test_pool_expires_connections_before_upstream_idle_timeouts():
    proxy = Proxy("http://127.0.0.1:1")

    async def scenario():
        session = proxy.session()
        assert session.connector._keepalive_timeout <= 15  # type: ignore[union-attr]
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert session.auto_decompress is False and session.trust_env is False
        assert session.timeout.total is None and session.timeout.sock_read == proxy.idle_timeout
        await proxy.shutdown()

    run(scenario)


def test_runtime_never_imports_asgi_proxy_lib():
    for path in (Path(__file__).parent.parent / "shared").glob("*.py"):
        assert "asgi_proxy" not in path.read_text().replace("asgi_proxy_lib", ""), path


@pytest.mark.parametrize("kind", HOSTS)
def test_expect_continue_is_answered_here_not_forwarded(standin, kind):
    async def scenario():
        async with serve_asgi(Proxy(standin.url), kind) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"PUT /debug/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)  # no 1 s client-side stall
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"hello")
            data = await reader.read()
            writer.close()
        status, _, body = split_response(data)
        doc = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])
        assert status == 200 and doc["body_bytes"] == 5
        assert "expect" not in [k for k, _ in echo_headers(doc)]

    run(scenario)


@pytest.mark.parametrize("kind", HOSTS)
def test_head_request(standin, kind):
    async def scenario():
        async with (
            serve_asgi(Proxy(standin.url), kind) as url,
            aiohttp.ClientSession() as c,
            c.head(f"{url}/debug/json") as r,
        ):
            assert r.status == 200 and int(r.headers["Content-Length"]) > 500
            assert await r.read() == b""
            async with c.get(f"{url}/debug/json") as again:
                assert again.status == 200  # the connection after a HEAD is still in sync

    run(scenario)


# --- scopes as Modal's runtime builds them: no raw_path, bodies without length headers (HTTP/2) -------------


class AsModal:
    """Hands the proxy the scope Modal's ASGI runtime builds: no `raw_path` and, as over HTTP/2, neither
    Content-Length nor Transfer-Encoding, while the body messages still arrive."""

    def __init__(self, app: Any, *, keep_lengths: bool = False) -> None:
        self.app = app
        self.keep_lengths = keep_lengths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = dict(scope)
            scope.pop("raw_path", None)
            if not self.keep_lengths:
                drop = (b"content-length", b"transfer-encoding")
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
        await self.app(scope, receive, send)


@pytest.mark.parametrize("kind", HOSTS)
@pytest.mark.parametrize("size", [0, 11, 3_000_000])
def test_body_without_length_headers_reaches_tabby(standin, kind, size):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def scenario():
        async with (
            serve_asgi(AsModal(Proxy(standin.url)), kind) as url,
            aiohttp.ClientSession() as c,
            c.post(f"{url}/debug/echo", data=payload) as r,
        ):
            assert r.status == 200
            return await r.json()

    doc = run(scenario)
    assert doc["body_bytes"] == size
    assert doc["body_sha256"] == hashlib.sha256(payload).hexdigest()
    if size == 11 and kind == "uvicorn":
        # uvicorn hands it over whole in the first message (more_body False): then it goes upstream with its
        # length, not chunked. (Our host always says more_body=True first.)
        assert doc["chunked"] is False and ("content-length", "11") in echo_headers(doc)


@pytest.mark.parametrize("kind", HOSTS)
def test_streamed_body_without_length_headers_streams(standin, kind):
    async def scenario():
        async with serve_asgi(AsModal(Proxy(standin.url)), kind) as url, aiohttp.ClientSession() as c:
            before = standin.stats()["upload_bytes"]

            async def body():
                yield b"a" * 100_000
                await until(lambda: standin.stats()["upload_bytes"] - before >= 100_000, 5, "first part")
                yield b"b" * 100_000

            async with c.post(f"{url}/debug/echo", data=body()) as r:
                return await r.json()

    doc = run(scenario)
    assert doc["chunked"] is True and doc["body_bytes"] == 200_000


@pytest.mark.parametrize("kind", HOSTS)
def test_path_without_raw_path_is_quoted_again(standin, kind):
    # Sent: literal %, ?, #, space, non-ASCII and sub-delims, escaped; the proxy sees them decoded.
    sent = "/debug/echo/100%25/a%3Fb%23c%20d/%C3%A9/x;y=1,z/%2541"

    async def scenario():
        async with serve_asgi(AsModal(Proxy(standin.url)), kind) as url:
            data = await raw_request(
                url, f"GET {sent}?q=%25 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
            )
        _, _, body = split_response(data)
        return json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])

    assert run(scenario)["raw_path"] == sent + "?q=%25"


@pytest.mark.parametrize("kind", HOSTS)
def test_escaped_slash_cannot_come_back_without_raw_path(standin, kind):
    """Documented limit: a decoded path has lost the difference between `%2F` and `/`."""

    async def scenario():
        async with serve_asgi(AsModal(Proxy(standin.url)), kind) as url:
            data = await raw_request(
                url, b"GET /debug/echo/a%2Fb HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
        _, _, body = split_response(data)
        return json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])

    assert run(scenario)["raw_path"] == "/debug/echo/a/b"


@pytest.mark.parametrize("kind", HOSTS)
def test_client_leaving_before_its_body_cancels_nothing_upstream(standin, kind):
    """The client sends its headers, then leaves before any of its body: the first `receive()` is an
    `http.disconnect`, so nothing is sent upstream, and nothing hangs."""

    async def scenario():
        async with serve_asgi(AsModal(Proxy(standin.url), keep_lengths=True), kind) as url:
            before = standin.stats()["requests"]
            host, port = url.removeprefix("http://").split(":")
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /debug/echo HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
            await writer.drain()
            writer.close()
            await asyncio.sleep(0)  # let the server see the close
            async with aiohttp.ClientSession() as c, c.get(f"{url}/debug/json") as r:
                assert r.status == 200  # the proxy still serves
            return standin.stats()["requests"] - before

    assert run(scenario) == 2  # /debug/stats and /debug/json: the abandoned POST never reached Tabby
