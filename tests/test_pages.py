"""What the proxy answers by itself: an HTML page for a browser navigation, the same JSON as before for API clients.

Real parts: the real OwnerGuard and Proxy, a real TabbyServer's gate, served on 127.0.0.1 and asked with aiohttp.
"""

from __future__ import annotations

import asyncio
import html
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serving.guard import COOKIE, SIGNUP_PATH, OwnerGuard, cookie_value
from shared.serving.pages import PAGES, REFRESH, wants_html
from shared.serving.proxy import Proxy
from shared.serving.server import TabbyServer
from shared.settings import load_settings
from tests.harness import free_port, serve_asgi

SETUP = "6f1c1b7e-3a52-4d0e-9a55-2f8d0c6c3c11"
# What the browsers send on a navigation (Chromium/Firefox), and what API clients send.
CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8"
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
API_ACCEPTS = [
    None,
    "*/*",
    "application/json",
    "application/json, text/plain, */*",
    "text/html, application/json",
]


def scope(accept: str | None, path: str = "/", kind: str = "http") -> dict[str, Any]:
    headers = [(b"accept", accept.encode())] if accept is not None else []
    return {"type": kind, "path": path, "headers": headers}


def test_which_requests_get_a_page():
    for accept in (CHROME, FIREFOX, "text/html", "text/*", "text/html;q=0.9, */*;q=0.1"):
        assert wants_html(scope(accept)), accept
    for accept in [
        *API_ACCEPTS,
        "",
        "application/json;q=1, text/html;q=0.5",
        "text/html;q=0",
        "text/html;q=bad",
        "image/webp,*/*",
    ]:
        assert not wants_html(scope(accept)), accept
    for path in ("/v1/health", "/v1/completions", "/v1beta/models", "/v1"):
        assert not wants_html(scope(CHROME, path)), path  # the API keeps JSON, whatever the client accepts
    assert not wants_html(scope(CHROME, "/subscriptions", "websocket"))


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


async def get(
    c: aiohttp.ClientSession, url: str, accept: str | None, **kw: Any
) -> tuple[int, Any, str | bytes]:
    headers = dict(kw.pop("headers", {}))
    if accept is not None:
        headers["Accept"] = accept
    async with c.get(url, headers=headers, allow_redirects=False, **kw) as r:
        return r.status, r.headers, await r.read()


def check_page(status: int, headers: Any, body: bytes, want_status: int, *texts: str) -> str:
    """A good page: the status, HTML, small, self-contained, phone-sized; returns its visible text."""
    assert status == want_status
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Vary"] == "Accept" and headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert len(body) < 8000, len(body)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert (
        "<script" not in page and "src=" not in page and "http://" not in page.replace("http://127.0.0.1", "")
    )
    assert "@import" not in page and "url(" not in page  # no fonts or images from elsewhere
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.split("</style>", 1)[1]))
    text = " ".join(text.split())
    for t in texts:
        assert t in text, (t, text)
    return text


def run(coro_fn, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


# --- the owner-claim guard --------------------------------------------------------------------------------------


def test_locked_instance_page_and_the_same_json_for_clients(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", SETUP)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            status, headers, body = await get(c, url + "/", CHROME)
            text = check_page(status, headers, body, 403, "This Tabby has no owner yet", "setup token")
            assert f"{url}/_setup?token=<setup token>" in text
            assert '<form method="get" action="/_setup">' in body.decode() and SETUP not in body.decode()
            assert "Refresh" not in headers and "refresh" not in body.decode().split("</style>")[0]
            for accept in API_ACCEPTS:
                status, headers, body = await get(c, url + "/", accept)
                assert status == 403 and headers["Content-Type"] == "application/json"
                assert body == (
                    b'{"error": "This Tabby instance has no owner yet: the first account to register becomes '
                    b"its owner. To claim it, open "
                    + url.encode()
                    + b"/_setup?token=<setup token> (the token "
                    b'is TABBY_MODAL_SETUP_TOKEN), then register.", "status": 403}'
                )
            status, headers, _ = await get(c, url + "/v1/health", CHROME)
            assert status == 403 and headers["Content-Type"] == "application/json"
            # The Host header is the client's: escaped, never markup.
            status, _, body = await get(c, url + "/", CHROME, headers={"Host": 'x"><b>bold</b>'})
            assert status == 403 and b"<b>bold" not in body and b"&lt;b&gt;bold" in body

    run(scenario)


def test_setup_link_pages_wrong_token_and_redirect(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", SETUP)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            status, headers, body = await get(c, f"{url}/_setup?token=<img>", CHROME)
            check_page(status, headers, body, 403, "That setup token is not right", "Claim")
            assert b"<img>" not in body
            status, headers, body = await get(c, f"{url}/_setup?token=wrong", "*/*")
            assert (status, body) == (403, b'{"error": "wrong setup token", "status": 403}')
            # Right token: the same 303 and cookie for both; a browser's body links on, a client's is empty.
            status, headers, body = await get(c, f"{url}/_setup?token={SETUP}", CHROME)
            assert status == 303 and headers["Location"] == SIGNUP_PATH
            assert headers["Set-Cookie"].startswith(f"{COOKIE}={cookie_value(SETUP)};")
            assert headers["Content-Type"] == "text/html; charset=utf-8"
            assert b'href="/auth/signup?isAdmin=true"' in body and b"Continue to sign-up" in body
            status, headers, body = await get(c, f"{url}/_setup?token={SETUP}", None)
            assert status == 303 and headers["Location"] == SIGNUP_PATH and body == b""
            assert headers["Content-Length"] == "0" and headers["Set-Cookie"].startswith(f"{COOKIE}=")

    run(scenario)


def test_unclaimable_instance_page(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", None)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            for path in ("/", f"/_setup?token={SETUP}"):
                status, headers, body = await get(c, url + path, CHROME)
                check_page(
                    status, headers, body, 403, "This Tabby cannot be claimed yet", "TABBY_MODAL_SETUP_TOKEN"
                )
                status, _, body = await get(c, url + path, "application/json")
                assert status == 403 and b"no setup token is configured" in body

    run(scenario)


# --- the runtime's gate: starting, restarting, maintenance, failures ------------------------------------------------


def make_server(tmp_path: Path, **kw: Any) -> TabbyServer:
    settings = load_settings(env_file=None, internal_port=free_port(), model_cache=str(tmp_path / "models"))
    return TabbyServer(
        settings,
        data_dir=tmp_path / "data",
        live_root=tmp_path / "live",
        tabby_bin=str(tmp_path / "no-tabby"),  # these tests never reach Tabby
        setup_token=SETUP,
        **{"jwt_secret": "00000000-0000-4000-8000-000000000000", **kw},
    )


# state, reason -> status, Retry-After, a text the page shows, whether it reloads itself
STATES: list[tuple[str, str | None, str, str | None, bool]] = [
    ("new", None, PAGES["starting"].title, "10", True),
    ("hydrating", None, PAGES["starting"].title, "10", True),
    ("starting", None, PAGES["starting"].title, "10", True),
    ("restarting", "it exited with code 3", PAGES["restarting"].title, "10", True),
    ("failed", "tabby exited with code 9 <b>x</b>", PAGES["failed"].title, None, False),
    ("gave_up", "it crashed 2 times within 600s; the server exits", PAGES["gave_up"].title, None, False),
    ("superseded", "its data dir /data was replaced", PAGES["superseded"].title, None, False),
    ("stopping", None, PAGES["stopping"].title, "10", True),
]


@pytest.mark.parametrize("state,reason,title,retry,waiting", STATES, ids=[s[0] for s in STATES])
def test_gate_pages_for_each_state(tmp_path, no_modal_env, state, reason, title, retry, waiting):
    server = make_server(tmp_path)
    server.state, server.reason = state, reason
    refusal = server.gate()
    assert refusal is not None

    async def scenario():
        async with serve_asgi(server.app()) as url, aiohttp.ClientSession() as c:
            status, headers, body = await get(c, url + "/", FIREFOX)
            text = check_page(status, headers, body, 503, title, f"Details: {refusal.error}")
            assert headers.get("Retry-After") == retry
            assert (headers.get("Refresh") == str(REFRESH)) is waiting
            assert (f'<meta http-equiv="refresh" content="{REFRESH}">' in body.decode()) is waiting
            assert ("reloads every 5 seconds" in text) is waiting
            assert "<b>x</b>" not in body.decode()  # the reason is escaped
            for accept in API_ACCEPTS:
                for path in ("/", "/v1/health"):
                    status, headers, body = await get(c, url + path, accept)
                    assert status == 503 and headers["Content-Type"] == "application/json"
                    assert headers.get("Retry-After") == retry and "Refresh" not in headers
                    assert body == f'{{"error": {_json(refusal.error)}, "status": 503}}'.encode()
            status, headers, _ = await get(c, url + "/v1/health", CHROME)
            assert headers["Content-Type"] == "application/json"

    run(scenario)


def _json(text: str) -> str:
    import json

    return json.dumps(text)


def test_maintenance_page_from_a_held_lease(tmp_path, no_modal_env):
    server = make_server(tmp_path, maintenance_check=lambda: "restore of 20260101T000000Z by alice")
    assert server.start() is False and server.state == "maintenance"

    async def scenario():
        async with serve_asgi(server.app()) as url, aiohttp.ClientSession() as c:
            status, headers, body = await get(c, url + "/", CHROME)
            check_page(
                status, headers, body, 503, "Maintenance in progress", "restore of 20260101T000000Z by alice"
            )
            assert headers["Retry-After"] == "60" and headers["Refresh"] == str(REFRESH)
            status, headers, body = await get(c, url + "/", "*/*")
            assert status == 503 and headers["Retry-After"] == "60"
            assert body == (
                b'{"error": "maintenance in progress (restore of 20260101T000000Z by alice); Tabby starts when it '
                b'ends", "status": 503}'
            )

    run(scenario)


def test_bad_jwt_secret_page(tmp_path, no_modal_env):
    server = make_server(tmp_path, jwt_secret="not-a-uuid")
    assert server.start() is False and server.state == "failed"

    async def scenario():
        async with serve_asgi(server.app()) as url, aiohttp.ClientSession() as c:
            status, headers, body = await get(c, url + "/", CHROME)
            check_page(
                status, headers, body, 503, "Tabby's JWT secret is not usable", "make rotate-jwt-secret"
            )
            assert "Retry-After" not in headers and "Refresh" not in headers and b"not-a-uuid" not in body
            status, headers, body = await get(c, url + "/", "application/json")
            assert status == 503 and b"TABBY_WEBSERVER_JWT_TOKEN_SECRET is not a UUID" in body

    run(scenario)


def test_upstream_not_answering_page(tmp_path):
    proxy = Proxy(f"http://127.0.0.1:{free_port()}", connect_timeout=2)  # nothing listens there

    async def scenario():
        async with serve_asgi(proxy) as url, aiohttp.ClientSession() as c:
            status, headers, body = await get(c, url + "/", CHROME)
            check_page(
                status, headers, body, 502, "Tabby is not answering", "upstream refused the connection"
            )
            assert headers["Refresh"] == str(REFRESH)
            status, headers, body = await get(c, url + "/", "*/*")
            assert status == 502 and headers["Content-Type"] == "application/json"
            assert body.startswith(b'{"error": "upstream refused the connection: ')

    run(scenario)
