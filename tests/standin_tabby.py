#!/usr/bin/env python3
"""A stand-in for `tabby serve`: same flags, same start-up shape, the HTTP surface our proxy and guard care about.

Run as `python tests/standin_tabby.py serve --model ... --port P` (tests put a `tabby` wrapper on PATH that does
this with the test's Python). Like Tabby it prints a spinner while "loading models" (STANDIN_LOAD_SECONDS),
spawns a child (`llama-server`), opens a WAL SQLite at $TABBY_ROOT/ee/db.sqlite with Tabby 0.32's `users` and
`_sqlx_migrations` (49 rows, version 50; a `db.backup-YYYYMMDD.sqlite` copy first when migrations are pending), prints
"🚀 Listening at http://HOST:PORT" and only then binds its port. The owner is the user with id 1. Like axum/hyper it
drops a request's handler when the client goes away.

Environment knobs (all optional):
  STANDIN_TOKEN               bearer token accepted on /v1/* (also any users.auth_token); default "standin-token"
  STANDIN_LOAD_SECONDS        seconds of "loading" before the bind (default 0)
  STANDIN_SPINNER             "lines" (one line per frame, as in non-TTY logs) or "cr" (frames end with \\r)
  STANDIN_CRASH_AT_START=N    exit with code N while loading
  STANDIN_HANG=1              never bind (spin forever)
  STANDIN_BIND_GATE=PATH      after "Listening at", wait for PATH to exist before binding
  STANDIN_IGNORE_TERM=1       ignore SIGTERM (stop must escalate to SIGKILL)
  STANDIN_EXIT_AFTER=S        exit with code 7 S seconds after the bind (a crash while serving)
  STANDIN_CHILD=0             do not spawn the llama-server child
  STANDIN_CHILD_PIDFILE=PATH  write the child's pid there
  STANDIN_CHILD_IGNORE_TERM=1 the child ignores SIGTERM
  STANDIN_SSE_EVENTS / STANDIN_SSE_INTERVAL_MS   default chat stream shape (5 events, 10 ms apart)
  STANDIN_VERSION             the version it reports (default 0.32.0): a "new release" in upgrade tests
  STANDIN_NEW_MIGRATION=ok|fail  a new release's migration 51: `ok` applies it; `fail` alters the schema, leaves
                              sqlx's success=false row and exits 1 (a failed upgrade that changed the database)
  STANDIN_SMOKE_FAIL=completion|chat  starts and is ready, but /v1/completions answers 500 (`completion`) or the
                              chat stream is cut before its first event (`chat`): a release only smoke checks catch

Debug endpoints (no auth): /debug/stats, /debug/echo, /debug/cookies, /debug/download, /debug/slow, /debug/json,
/debug/abort, /debug/idle, /debug/register, /debug/config (the models as Tabby would resolve them from its flags and
$TABBY_ROOT/config.toml, read at start as Tabby does; invalid TOML exits with 101, Tabby's panic); chat bodies may
carry {"events", "interval_ms", "first_ms", "crash_after", "abort_after"}; a websocket text "close:<code>:<reason>"
makes the server close with that code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling module
import standin_tabby_models  # split mode, issue 20: [model.*.http] clients

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
VERSION = os.environ.get("STANDIN_VERSION", "0.32.0")
# --- Tabby 0.32's database ------------------------------------------------------------------------------------
# Written from the facts of TabbyML/tabby v0.32.0 `ee/tabby-db/migrations/*.up.sql` (not copied from them): the final
# shape, after all 49 migrations, of the tables our code and tests read.
#   users: 0002 creates id, email (NOCASE), is_admin, created_at, updated_at, auth_token, active and a NOT NULL
#   password_encrypted; 0018 re-adds password_encrypted as nullable at the end; 0019 adds avatar; 0030 adds name.
#   registration_token: 0001 (Tabby inserts row id 1 after migrating). refresh_tokens: rebuilt by 0026.
#   user_events: 0025. `_sqlx_migrations`: as sqlx 0.7 (sqlx-sqlite `ensure_migrations_table`) creates it.
SQLX_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
);
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS registration_token (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token VARCHAR(255) NOT NULL,
    created_at TIMESTAMP DEFAULT (DATETIME('now')),
    updated_at TIMESTAMP DEFAULT (DATETIME('now')),
    CONSTRAINT idx_token UNIQUE (token)
);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email VARCHAR(150) NOT NULL COLLATE NOCASE,
    is_admin BOOLEAN NOT NULL DEFAULT 0,
    created_at TIMESTAMP DEFAULT (DATETIME('now')),
    updated_at TIMESTAMP DEFAULT (DATETIME('now')),
    auth_token VARCHAR(128) NOT NULL,
    active BOOLEAN NOT NULL DEFAULT 1,
    password_encrypted VARCHAR(128),
    avatar BLOB DEFAULT NULL,
    name VARCHAR(255),
    CONSTRAINT idx_email UNIQUE (email),
    CONSTRAINT idx_auth_token UNIQUE (auth_token)
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    token VARCHAR(255) NOT NULL COLLATE NOCASE,
    expires_at TIMESTAMP NOT NULL,
    created_at TIMESTAMP DEFAULT (DATETIME('now')),
    CONSTRAINT idx_token UNIQUE (token),
    FOREIGN KEY (user_id) REFERENCES users(id)
);
CREATE TABLE IF NOT EXISTS user_events (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT (DATETIME('now')),
    payload BLOB NOT NULL,
    FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_user_events_user_id ON user_events(user_id);
CREATE INDEX IF NOT EXISTS idx_user_events_created_at ON user_events(created_at);
"""
# Tabby 0.32's migrations as sqlx names them: the version and description from each `NNNN_name.up.sql` (sqlx strips
# `.up.sql` and turns `_` into spaces). There is no 0032: 49 rows, highest version 50.
_MIGRATION_FILES = """
1 registration-token-table
2 users-table
3 invitations-table
4 refresh-tokens
5 job-runs-table
6 github-oauth-credential
7 email-setting
8 repositories-table
9 google-oauth-credential
10 server-setting
11 new-email-settings
12 remove-redirect-uri-field-oauth
13 add-smtp-port
14 password-reset
15 enterprise-license
16 merge-oauth-tables
17 add-user-completions
18 user-password-nullable
19 user-avatar
20 job-run-index
21 repository-name-index
22 github-provider
23 user-completions-created-at-index
24 github-provided-repos
25 user-events
26 clean-up-tables
27 remove-github-repository-columns-on-oauth
28 gitlab-provider
29 merged-provider-tables
30 user-name
31 web-crawler-urls
33 add-job-runs-param-column
34 add-started-at-column-in-job-runs
35 add-thread-message-table
36 web_document
37 remove-webcrawler-table
38 add-access-control-tables
39 add-notification-inbox
40 add-code-source-id-column
41 ldap-credential
42 add-file-list-attachment
43 page-section
44 add-page-sources
45 remove-deprecated-columns
46 add-disable-password-login
47 add-ingestion
48 add-branding-column
49 add-oauth-columns
50 add-repository-refs
"""
_NAMES = _MIGRATION_FILES.split()
MIGRATIONS: tuple[tuple[int, str], ...] = tuple(
    (int(v), d.replace("_", " ")) for v, d in zip(_NAMES[::2], _NAMES[1::2], strict=True)
)
OWNER_ID = 1  # Tabby's owner is the user with id 1 (tabby-db `OWNER_USER_ID`), the first registrant.


def migration_checksum(version: int, description: str) -> bytes:
    """sqlx stores the SHA-384 of each migration's SQL; the stand-in hashes a stand-in text instead (so a real Tabby
    would refuse a stand-in database as "previously applied but modified": never hand it one)."""
    return hashlib.sha384(f"stand-in migration {version} {description}".encode()).digest()


def pending_migrations(conn: sqlite3.Connection) -> str | None:
    """Why sqlx-migrate-validate would fail on this database (Tabby then backs the file up first), or None."""
    try:
        if conn.execute("SELECT version FROM _sqlx_migrations WHERE success = false LIMIT 1").fetchone():
            return "dirty"
        applied = dict(conn.execute("SELECT version, checksum FROM _sqlx_migrations").fetchall())
    except sqlite3.OperationalError:
        return "no _sqlx_migrations table"
    for version, description in MIGRATIONS:
        if version not in applied:
            return f"migration {version} not applied"
        if bytes(applied[version]) != migration_checksum(version, description):
            return f"migration {version} modified"
    return None


def migrate(conn: sqlite3.Connection) -> None:
    """What `sqlx::migrate!().run()` leaves behind: the final tables and one `_sqlx_migrations` row per migration.
    Like sqlx, refuses a dirty or modified history (Tabby then exits)."""
    conn.executescript(SQLX_MIGRATIONS)
    rows = conn.execute("SELECT version, success, checksum FROM _sqlx_migrations").fetchall()
    applied = {int(v): (bool(ok), bytes(c)) for v, ok, c in rows}
    for version, description in MIGRATIONS:
        ok, checksum = applied.get(version, (True, migration_checksum(version, description)))
        if not ok:
            raise SystemExit(
                f"migration {version} is partially applied; fix and remove row from `_sqlx_migrations`"
            )
        if checksum != migration_checksum(version, description):
            raise SystemExit(f"migration {version} was previously applied but has been modified")
    known = {v for v, _ in MIGRATIONS} | (
        {NEW_MIGRATION[0]} if os.environ.get("STANDIN_NEW_MIGRATION") else set()
    )
    for version in sorted(set(applied) - known):  # sqlx refuses a database from a newer release
        raise SystemExit(
            f"migration {version} was previously applied but is missing in the resolved migrations"
        )
    conn.execute("BEGIN")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.executemany(
        "INSERT OR IGNORE INTO _sqlx_migrations(version, description, success, checksum, execution_time)"
        " VALUES (?, ?, TRUE, ?, ?)",
        [(v, d, migration_checksum(v, d), 1_000_000 + v) for v, d in MIGRATIONS],
    )
    conn.execute("COMMIT")


NEW_MIGRATION = (51, "standin-upgrade")


def apply_new_migration(conn: sqlite3.Connection, *, fail: bool) -> None:
    """A new release's migration 51 (a no-transaction one, as sqlx runs them: each statement commits). `fail`: the
    column is added and sqlx's success=false row written, then the next statement fails."""
    version, description = NEW_MIGRATION
    if conn.execute("SELECT 1 FROM _sqlx_migrations WHERE version = ? AND success", (version,)).fetchone():
        return
    conn.execute("ALTER TABLE users ADD COLUMN standin_upgraded INTEGER")
    conn.execute(
        "INSERT OR REPLACE INTO _sqlx_migrations(version, description, success, checksum, execution_time)"
        " VALUES (?, ?, ?, ?, 0)",
        (version, description, not fail, migration_checksum(version, description)),
    )
    if fail:
        raise SystemExit(
            f"migration {version} failed: while executing migrations: no such table: standin_missing"
        )


def register_user(
    conn: sqlite3.Connection, email: str, *, password_encrypted: str | None = None, name: str | None = None
) -> tuple[int, str, bool]:
    """Tabby's sign-up on the database: while no admin exists the registrant is made admin (so the first one, id 1,
    is the owner). Returns (id, auth_token, is_admin)."""
    admin = conn.execute("SELECT EXISTS(SELECT 1 FROM users WHERE is_admin)").fetchone()[0]
    token = f"auth_{uuid.uuid4().hex}"  # tabby-db `generate_auth_token`
    cur = conn.execute(
        "INSERT INTO users(email, password_encrypted, is_admin, auth_token, name) VALUES (?, ?, ?, ?, ?)",
        (email, password_encrypted, not admin, token, name),
    )
    return int(cur.lastrowid or 0), token, not admin


STATS: dict = {
    "requests": 0,
    "chat_events": 0,
    "chat_streams": 0,
    "chat_cancelled": 0,
    "slow_open": 0,
    "slow_cancelled": 0,
    "slow_done": 0,
    "ws_closes": [],
    "ws_headers": [],
    "upload_bytes": 0,
    "child_pid": None,
}


def spin(seconds: float, style: str, hang: bool, crash: int | None) -> None:
    start = time.monotonic()
    i = 0
    end = "\r" if style == "cr" else "\n"
    while hang or crash is not None or time.monotonic() - start < seconds or i == 0:
        elapsed = time.monotonic() - start
        sys.stdout.write(f"{SPINNER[i % len(SPINNER)]} {elapsed:8.3f} s\tStarting...{end}")
        sys.stdout.flush()
        i += 1
        if crash is not None and i >= 3:
            print(f"\nERROR: failed to load model (stand-in crash at {time.monotonic():.6f})", flush=True)
            sys.exit(crash)
        time.sleep(0.08 if seconds >= 0.08 or hang else max(seconds, 0.001))
    if style == "cr":
        sys.stdout.write("\n")


def spawn_child() -> subprocess.Popen | None:
    if os.environ.get("STANDIN_CHILD", "1") == "0":
        return None
    ignore = os.environ.get("STANDIN_CHILD_IGNORE_TERM") == "1"
    code = (
        "import signal, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore else "")
        + "print('llama-server: listening (stand-in)', flush=True)\n"
        + "while True: time.sleep(60)\n"
    )
    # Same process group, stdout inherited: like Tabby's llama-server (kill_on_drop does not fire on a signal death).
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    STATS["child_pid"] = child.pid
    pidfile = os.environ.get("STANDIN_CHILD_PIDFILE")
    if pidfile:
        Path(pidfile).write_text(str(child.pid))
    return child


def open_db(root: Path) -> sqlite3.Connection:
    """As Tabby 0.32 starts its database: open (creating the file) in WAL mode; when the migration history is not
    complete, copy the file to `ee/db.backup-YYYYMMDD.sqlite` first (so a fresh root gets one too); migrate; then
    make sure the registration token row exists."""
    ee = root / "ee"
    ee.mkdir(parents=True, exist_ok=True)
    db = ee / "db.sqlite"
    conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")  # sqlx's SQLite default
    if pending_migrations(conn) is not None and db.exists():
        shutil.copyfile(db, ee / f"db.backup-{time.strftime('%Y%m%d', time.gmtime())}.sqlite")
    try:
        migrate(conn)
        new = os.environ.get("STANDIN_NEW_MIGRATION")
        if new:
            apply_new_migration(conn, fail=new == "fail")
    except SystemExit as err:
        print(f"Error: {err}", flush=True)
        raise SystemExit(1) from None
    conn.execute("INSERT OR IGNORE INTO registration_token(id, token) VALUES (1, ?)", (str(uuid.uuid4()),))
    return conn


class Standin:
    def __init__(
        self, args: argparse.Namespace, root: Path, db: sqlite3.Connection, config: dict | None = None
    ) -> None:
        self.args = args
        self.config = config or {}
        self.root = root
        self.db = db
        self.token = os.environ.get("STANDIN_TOKEN", "standin-token")
        self.sse_events = int(os.environ.get("STANDIN_SSE_EVENTS", "5"))
        self.sse_interval = float(os.environ.get("STANDIN_SSE_INTERVAL_MS", "10")) / 1000
        # [model.*.http] (and, with STANDIN_LOCAL_LLAMA=1, its own llama-servers) as Tabby talks to them.
        self.models = standin_tabby_models.ModelClients(getattr(args, "model_configs", {}), STATS)

    # --- helpers -------------------------------------------------------------------------------------------
    def authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        token = auth[7:].strip()
        return token == self.token or self.user_id(token) is not None

    def user_id(self, token: str) -> int | None:
        """The active user whose auth_token this is (as tabby-db `verify_auth_token`)."""
        row = self.db.execute("SELECT id FROM users WHERE auth_token = ? AND active", (token,)).fetchone()
        return None if row is None else int(row[0])

    def event(self, kind: str, request: web.Request) -> None:
        """Tabby logs events to `events/` and, for a signed-in user, a `user_events` row."""
        token = request.headers.get("Authorization", "")[7:].strip()
        user = self.user_id(token) if token else None
        if user is not None:
            payload = json.dumps({"kind": kind}).encode()
            self.db.execute(
                "INSERT INTO user_events(user_id, kind, payload) VALUES (?, ?, ?)", (user, kind, payload)
            )
        events = self.root / "events" / (time.strftime("%Y-%m-%d", time.gmtime()) + ".json")
        events.parent.mkdir(parents=True, exist_ok=True)
        with open(events, "a") as f:
            f.write(json.dumps({"kind": kind, "ts": time.time()}) + "\n")

    # --- middleware ----------------------------------------------------------------------------------------
    @web.middleware
    async def auth(self, request: web.Request, handler):
        STATS["requests"] += 1
        if request.path.startswith(("/v1/", "/v1beta/")) and not self.authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    # --- Tabby's routes ------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model": self.args.model,
                "chat_model": self.args.chat_model,
                "device": self.args.device,
                "arch": "x86_64",
                "version": {"build_date": "2026-01-25", "git_describe": f"v{VERSION}-standin"},
            }
        )

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        if os.environ.get("STANDIN_SMOKE_FAIL") == "completion":
            return web.json_response({"error": "stand-in: completion broken"}, status=500)
        if self.models.has("completion"):
            text = await self.models.complete(
                body.get("segments") or {}, body.get("stop_words") or [], int(body.get("max_tokens", 64))
            )
            self.event("completion", request)
            return web.json_response({"id": f"cmpl-{uuid.uuid4()}", "choices": [{"index": 0, "text": text}]})
        self.event("completion", request)
        prompt = (body.get("segments") or {}).get("prefix", "")
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4()}",
                "choices": [{"index": 0, "text": f"    return {len(prompt)}\n"}],
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        if self.models.has("chat") and "messages" in body:
            return await self.models.chat(request, body)
        events = int(body.get("events", self.sse_events))
        interval = float(body.get("interval_ms", self.sse_interval * 1000)) / 1000
        crash_after = body.get("crash_after")
        abort_after = body.get("abort_after")
        if os.environ.get("STANDIN_SMOKE_FAIL") == "chat":
            abort_after = 0
        if body.get("first_ms"):  # time to the first token
            await asyncio.sleep(float(body["first_ms"]) / 1000)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        STATS["chat_streams"] += 1
        try:
            for i in range(events):
                if crash_after is not None and i >= int(crash_after):
                    os._exit(3)
                if abort_after is not None and i >= int(abort_after):
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                STATS["chat_events"] += 1
                chunk = {"id": "chat", "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if interval:
                    await asyncio.sleep(interval)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            STATS["chat_cancelled"] += 1
            raise
        self.event("chat", request)
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="# HELP tabby_up stand-in\ntabby_up 1\n", content_type="text/plain")

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        STATS["ws_headers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
        # compress=True: like a server that does negotiate permessage-deflate when asked (the proxy must not ask).
        ws = web.WebSocketResponse(protocols=("graphql-transport-ws", "graphql-ws"), compress=True)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                try:
                    doc = json.loads(msg.data)
                except ValueError:
                    doc = None
                if isinstance(doc, dict) and doc.get("type") == "connection_init":
                    await ws.send_str(json.dumps({"type": "connection_ack"}))
                elif isinstance(doc, dict) and doc.get("type") == "ping":
                    await ws.send_str(json.dumps({"type": "pong"}))
                else:
                    await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        STATS["ws_closes"].append([ws.close_code, request.path])
        return ws

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f"<html><body>stand-in {request.path}</body></html>", content_type="text/html"
        )

    # --- debug routes --------------------------------------------------------------------------------------
    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(STATS)

    async def config_view(self, request: web.Request) -> web.Response:
        """As crates/tabby/src/serve.rs `merge_args`: a flag replaces config.toml's model; embedding only from it."""
        model = self.config.get("model", {})

        def local_id(role: str) -> str | None:
            return (model.get(role) or {}).get("local", {}).get("model_id")

        embedding = model.get("embedding", {"local": {"model_id": "Nomic-Embed-Text"}})  # Tabby's default
        return web.json_response(
            {
                "embedding_model_id": (embedding.get("local") or {}).get("model_id"),
                "embedding": embedding,
                "completion_model_id": self.args.model or local_id("completion"),
                "chat_model_id": self.args.chat_model or local_id("chat"),
                "embedding_enabled": os.environ.get("TABBY_EMBEDDING_ENABLED"),
            }
        )

    async def embed(self, request: web.Request) -> web.Response:
        """What Tabby's indexer does with each chunk: the embedding model's vector (split mode tests)."""
        if not self.models.has("embedding"):
            return web.json_response({"error": "no embedding model over HTTP"}, status=404)
        body = await request.json()
        return web.json_response({"embedding": await self.models.embed(str(body.get("content", "")))})

    async def echo(self, request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
            STATS["upload_bytes"] += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                "body_bytes": n,
                "body_sha256": h.hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
            }
        )

    async def cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="two cookies")
        resp.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "b=2; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        resp.headers["Connection"] = "keep-alive, X-Hop"
        resp.headers["X-Hop"] = "hop-by-hop"
        resp.headers["Keep-Alive"] = "timeout=5"
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        body = gzip.compress(b"compressed " * 100)
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def download(self, request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("bytes", "1048576"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = total
        await resp.prepare(request)
        block = b"x" * 65536
        left = total
        while left:
            n = min(left, len(block))
            await resp.write(block[:n])
            left -= n
        await resp.write_eof()
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        STATS["slow_open"] += 1
        try:
            await asyncio.sleep(float(request.query.get("ms", "5000")) / 1000)
        except asyncio.CancelledError:
            STATS["slow_cancelled"] += 1
            raise
        finally:
            STATS["slow_open"] -= 1
        STATS["slow_done"] += 1
        return web.json_response({"slow": True})

    async def small_json(self, request: web.Request) -> web.Response:
        items = [{"id": i, "name": f"item-{i}", "score": i * 0.5} for i in range(24)]
        return web.json_response({"items": items})

    async def abort(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"y" * 100)
        await asyncio.sleep(0.01)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def idle(self, request: web.Request) -> web.StreamResponse:
        gap = float(request.query.get("gap_ms", "1000")) / 1000
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.sleep(gap)
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    async def register(self, request: web.Request) -> web.Response:
        """Sign-up without invitations: the first registrant (id 1) is made admin, the owner."""
        body = await request.json()
        count = self.db.execute("SELECT count(*) FROM users").fetchone()[0]
        email = body.get("email", f"user{count}@example.com")
        password = (
            "$argon2id$v=19$m=19456,t=2,p=1$stand-in$" + hashlib.sha256(email.encode()).hexdigest()[:43]
        )
        self.db.execute("BEGIN IMMEDIATE")
        try:
            user, token, admin = register_user(
                self.db, email, password_encrypted=password, name=body.get("name")
            )
            self.db.execute(
                "INSERT INTO refresh_tokens(user_id, token, expires_at) VALUES (?, ?, DATETIME('now', '+7 days'))",
                (user, uuid.uuid4().hex),
            )
        except sqlite3.IntegrityError:
            self.db.execute("ROLLBACK")
            return web.json_response({"error": "User already exists"}, status=409)
        self.db.execute("COMMIT")
        return web.json_response({"auth_token": token, "is_admin": admin, "id": user})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=1 << 30)
        r = app.router
        r.add_route("*", "/v1/health", self.health)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1beta/chat/completions", self.chat)
        r.add_get("/metrics", self.metrics)
        r.add_get("/subscriptions", self.websocket)
        r.add_get("/hub", self.websocket)
        r.add_get("/debug/stats", self.stats)
        r.add_get("/debug/config", self.config_view)
        r.add_post("/debug/embed", self.embed)
        r.add_route("*", "/debug/echo{tail:.*}", self.echo)
        r.add_get("/debug/cookies", self.cookies)
        r.add_get("/debug/download", self.download)
        r.add_get("/debug/gzip", self.gzipped)
        r.add_get("/debug/slow", self.slow)
        r.add_get("/debug/json", self.small_json)
        r.add_get("/debug/abort", self.abort)
        r.add_get("/debug/idle", self.idle)
        r.add_post("/debug/register", self.register)
        r.add_get("/", self.page)
        r.add_get("/auth/signup", self.page)
        r.add_get("/auth/signin", self.page)
        return app


async def serve(args: argparse.Namespace, standin: Standin) -> None:
    runner = web.AppRunner(standin.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    # As crates/tabby/src/routes/mod.rs `run_app` (banner art left out): print, then bind. A client that connects on
    # this line can still be refused; STANDIN_BIND_GATE holds the bind until that file exists, to show it in tests.
    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    sys.stdout.flush()
    sys.stdout.buffer.write(f"\n📄 Version {VERSION}\n🚀 Listening at http://{address}\n\n".encode())
    sys.stdout.flush()
    gate = os.environ.get("STANDIN_BIND_GATE")
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.01)
    site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
    await site.start()
    exit_after = os.environ.get("STANDIN_EXIT_AFTER")
    if exit_after:  # a crash while serving, with no request needed (the owner-claim guard may be locked)
        await asyncio.sleep(float(exit_after))
        print("stand-in crash while serving (STANDIN_EXIT_AFTER)", flush=True)
        os._exit(7)
    await asyncio.Event().wait()


def read_config(root: Path) -> dict:
    """As Tabby's `Config::load().expect(...)` in main.rs: absent is the default; invalid TOML panics (exit 101)."""
    path = root / "config.toml"
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        print(f"thread 'main' panicked: Must be able to load config: '{path}' is not valid: {err}")
        sys.exit(101)


def main() -> None:
    ap = argparse.ArgumentParser(prog="tabby")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model")  # optional, as in Tabby: config.toml may name the completion model
    s.add_argument("--chat-model")
    s.add_argument("--device", default="cpu")
    s.add_argument("--parallelism", type=int, default=1)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()

    if os.environ.get("STANDIN_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    root = Path(os.environ.get("TABBY_ROOT") or Path.home() / ".tabby")
    config = read_config(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # as Tabby does for every subcommand
    print(f"Writing to new file {root / 'events'}", flush=True)
    spawn_child()
    crash = os.environ.get("STANDIN_CRASH_AT_START")
    spin(
        float(os.environ.get("STANDIN_LOAD_SECONDS", "0")),
        os.environ.get("STANDIN_SPINNER", "lines"),
        os.environ.get("STANDIN_HANG") == "1",
        int(crash) if crash else None,
    )
    args.model_configs = standin_tabby_models.http_configs(config)
    children: list[subprocess.Popen[bytes]] = []
    if standin_tabby_models.local_llama_enabled():  # local models: llama-server children, the same clients
        embedding = ((config.get("model") or {}).get("embedding") or {}).get("local", {}).get("model_id")
        local = {"completion": args.model, "chat": args.chat_model, "embedding": embedding}
        local = {r: m for r, m in local.items() if r not in args.model_configs}
        args.model_configs.update(
            standin_tabby_models.start_local_children(local, args.parallelism, children)
        )
    db = open_db(root)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args, Standin(args, root, db, config)))


if __name__ == "__main__":
    main()
