"""The owner-claim guard: locked while Tabby's database has no user, opened by the setup token, off for good after."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serving import guard as guard_mod
from shared.serving.guard import COOKIE, SIGNUP_PATH, OwnerGuard, cookie_value, has_user
from shared.serving.proxy import Proxy
from tests.harness import TOKEN, Standin, serve_asgi
from tests.standin_tabby import migrate, register_user

SETUP = "6f1c1b7e-3a52-4d0e-9a55-2f8d0c6c3c11"


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A stand-in for the proxy: 200 "hello" for HTTP, an echo for websockets."""
    if scope["type"] == "http":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"hello"})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        msg = await receive()
        await send({"type": "websocket.send", "text": msg.get("text")})
        await send({"type": "websocket.close", "code": 1000})


def make_db(path: Path, users: int = 0, table: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
        if table:
            conn.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, email TEXT)")
            for i in range(users):
                conn.execute("INSERT INTO users(email) VALUES (?)", (f"u{i}@example.com",))
    conn.close()


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # a browser's jar: keeps cookies for 127.0.0.1


def run(coro_fn, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


# --- the database check ---------------------------------------------------------------------------------------


def test_has_user_absent_file_is_never_created(tmp_path):
    db = tmp_path / "ee/db.sqlite"
    assert has_user(db) is False
    assert not db.exists() and not db.parent.exists()


def test_has_user_without_table_or_rows(tmp_path):
    db = tmp_path / "db.sqlite"
    make_db(db, table=False)
    assert has_user(db) is False
    make_db(db, users=0)
    assert has_user(db) is False
    make_db(db, users=1)
    assert has_user(db) is True


def test_has_user_reads_a_live_wal_database(tmp_path):
    db = tmp_path / "db.sqlite"
    make_db(db)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO users(email) VALUES ('owner@example.com')")  # committed, only in -wal
    try:
        assert has_user(db) is True
    finally:
        writer.close()


def test_has_user_means_tabbys_owner_id_1(tmp_path):
    """Tabby's owner is users.id 1, made admin at sign-up; while no admin exists Tabby lets anyone sign up as admin,
    so other users (no id 1) or a non-admin id 1 leave the guard locked."""
    db = tmp_path / "ee/db.sqlite"
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn)  # Tabby 0.32's real `users` table
    add = "INSERT INTO users(id, email, is_admin, auth_token) VALUES (?, ?, ?, ?)"
    try:
        conn.execute(add, (2, "dev@example.com", 0, "auth_2"))
        assert has_user(db) is False  # a user, but not the owner
        conn.execute(add, (1, "first@example.com", 0, "auth_1"))
        assert has_user(db) is False  # id 1 but not an admin: not how Tabby makes its owner
        conn.execute("DELETE FROM users")
        assert register_user(conn, "owner@example.com")[0::2] == (3, True)  # AUTOINCREMENT: id 3, admin
        assert has_user(db) is False
    finally:
        conn.close()
    with Standin(tmp_path / "fresh") as tabby:  # the stand-in's sign-up: the first registrant is id 1, admin
        fresh = tmp_path / "fresh/ee/db.sqlite"
        assert has_user(fresh) is False
        req = urllib.request.Request(tabby.url + "/debug/register", data=b'{"email": "me@example.com"}')
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["id"] == 1
        assert has_user(fresh) is True


# --- locked ---------------------------------------------------------------------------------------------------


def test_locked_refuses_everything_with_claim_instructions(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", SETUP)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            for path in ("/", "/v1/health", "/metrics", "/graphql"):
                async with c.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 403
                    doc = await r.json()
                    assert "no owner yet" in doc["error"]
                    assert f"{url}/_setup?token=" in doc["error"]
                    assert SETUP not in doc["error"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await c.ws_connect(url + "/subscriptions")
            assert info.value.status == 403

    run(scenario)


def test_setup_token_sets_cookie_and_redirects_to_owner_signup(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", SETUP)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession(cookie_jar=jar()) as c:
            async with c.get(f"{url}/_setup?token=wrong", allow_redirects=False) as r:
                assert r.status == 403
            async with c.get(f"{url}/_setup?token={SETUP}", allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"] == SIGNUP_PATH == "/auth/signup?isAdmin=true"
                cookie = r.headers["Set-Cookie"]
            assert cookie.startswith(f"{COOKIE}={cookie_value(SETUP)};")
            assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
            assert SETUP not in cookie  # a MAC of the token, never the token
            # The session now carries the cookie: everything passes, websockets too.
            async with c.get(f"{url}/auth/signup?isAdmin=true") as r:
                assert r.status == 200 and await r.text() == "hello"
            async with c.ws_connect(url + "/subscriptions") as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "hi"
            async with aiohttp.ClientSession() as other, other.get(f"{url}/") as r:
                assert r.status == 403  # another browser without the cookie
            forged = {"Cookie": f"{COOKIE}=deadbeef"}
            async with aiohttp.ClientSession() as other, other.get(f"{url}/", headers=forged) as r:
                assert r.status == 403

    run(scenario)


def test_cookie_is_secure_behind_https(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", SETUP)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            headers = {"X-Forwarded-Proto": "https"}
            async with c.get(f"{url}/_setup?token={SETUP}", headers=headers, allow_redirects=False) as r:
                assert "; Secure" in r.headers["Set-Cookie"]

    run(scenario)


def test_without_a_setup_token_the_message_says_how_to_set_one(tmp_path):
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", None)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            for path in ("/", f"/_setup?token={SETUP}"):
                async with c.get(url + path, allow_redirects=False) as r:
                    assert r.status == 403
                    error = (await r.json())["error"]
                    assert "no setup token is configured" in error
                    assert "TABBY_MODAL_SETUP_TOKEN" in error and "make secrets" in error

    run(scenario)


def test_guard_waits_for_tabby_when_disabled(tmp_path):
    ready = [False]
    g = OwnerGuard(hello, tmp_path / "ee/db.sqlite", SETUP, enabled=lambda: ready[0])

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            async with c.get(url + "/") as r:
                assert r.status == 200  # passed on: the proxy's gate answers while Tabby is not up
            ready[0] = True
            async with c.get(url + "/") as r:
                assert r.status == 403

    run(scenario)


# --- unlocking and cost ---------------------------------------------------------------------------------------


def test_first_user_switches_the_guard_off_for_good(tmp_path, monkeypatch):
    db = tmp_path / "ee/db.sqlite"
    make_db(db)
    calls: list[float] = []
    real = guard_mod.has_user

    def counting(path: Path) -> bool:
        calls.append(time.monotonic())
        return real(path)

    monkeypatch.setattr(guard_mod, "has_user", counting)
    g = OwnerGuard(hello, db, SETUP, recheck=0.2)

    async def scenario():
        async with serve_asgi(g) as url, aiohttp.ClientSession() as c:
            for _ in range(50):
                async with c.get(url + "/") as r:
                    assert r.status == 403
            assert len(calls) <= 2  # cached while locked: re-read at most every `recheck`
            make_db(db, users=1)
            deadline = time.monotonic() + 3
            while True:
                async with c.get(url + "/") as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < deadline, "guard did not open"
                await asyncio.sleep(0.02)
            n = len(calls)
            with sqlite3.connect(db) as conn:
                conn.execute("DELETE FROM users")
            conn.close()
            for _ in range(20):
                async with c.get(url + "/") as r:
                    assert r.status == 200  # off for good: a later empty table does not lock it again
            assert len(calls) == n  # and no more database reads

    run(scenario)


def test_end_to_end_claim_through_the_proxy(tmp_path):
    """Stand-in Tabby behind Guard(Proxy): locked, claimed with the token, a user registered, then open for all."""
    with Standin(tmp_path / "root") as tabby:
        g = OwnerGuard(Proxy(tabby.url), tmp_path / "root/ee/db.sqlite", SETUP, recheck=0.05)

        async def scenario():
            async with serve_asgi(g) as url:
                async with aiohttp.ClientSession() as c, c.get(url + "/v1/health") as r:
                    assert r.status == 403
                async with aiohttp.ClientSession(cookie_jar=jar()) as owner:
                    async with owner.get(f"{url}/_setup?token={SETUP}") as r:  # follows the redirect
                        assert r.status == 200 and "stand-in /auth/signup" in await r.text()
                    async with owner.post(f"{url}/debug/register", json={"email": "me@example.com"}) as r:
                        token = (await r.json())["auth_token"]
                deadline = time.monotonic() + 3
                async with aiohttp.ClientSession() as ide:  # no cookie: open once the guard re-reads the DB
                    while True:
                        async with ide.get(
                            url + "/v1/health", headers={"Authorization": f"Bearer {token}"}
                        ) as r:
                            if r.status == 200:
                                assert json.loads(await r.text())["model"] == "TabbyML/StarCoder-1B"
                                break
                            assert r.status == 403 and time.monotonic() < deadline
                        await asyncio.sleep(0.01)

        run(scenario)
