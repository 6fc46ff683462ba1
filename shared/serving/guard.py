"""The owner-claim guard: on a fresh (or reset) Tabby the first account to register becomes its owner (users.id 1,
made admin), so while the database has no owner, nobody gets through without the setup token.

    GET /_setup?token=<TABBY_MODAL_SETUP_TOKEN>   -> 303 to Tabby's owner sign-up, with an HttpOnly cookie
    any request carrying that cookie              -> passed through (the sign-up page, its assets, /graphql)
    anything else while no user exists            -> 403 saying how to claim the instance (a page for a browser)

Once the owner exists the guard switches off for the life of the process. The check is cheap: the answer is cached
and, while locked, re-read at most every `recheck` seconds from a read-only connection (`mode=ro`: the guard never
creates the database, and a missing file or `users` table means "no owner"). Other users without id 1 do not count:
Tabby opens its admin sign-up to anyone while no admin exists.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.cookies import SimpleCookie
from pathlib import Path

from shared.serving import pages
from shared.serving.asgi import ASGIApp, Receive, Scope, Send, reject_websocket
from shared.state.database import OWNER_ID

log = logging.getLogger("tabby_modal.guard")

SETUP_PATH = "/_setup"
# Tabby's owner sign-up page (ee/tabby-ui/lib/tabby/auth.tsx redirects there while `isAdminInitialized` is false).
SIGNUP_PATH = "/auth/signup?isAdmin=true"
COOKIE = "tabby_modal_setup"
COOKIE_MAX_AGE = 3600
RECHECK = 1.0


def has_user(db_path: Path) -> bool:
    """Has Tabby's owner registered: a user with id 1 (an admin, where the table has `is_admin`)? False when the file
    or the table is missing."""
    if not db_path.is_file():
        return False
    uri = f"file:{urllib.parse.quote(str(db_path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=0.2, check_same_thread=False)
    except sqlite3.Error:
        return False
    try:
        cur = conn.execute(f"SELECT * FROM users WHERE id = {OWNER_ID}")
        row = cur.fetchone()
        if row is None:
            return False
        names = [d[0] for d in cur.description]
        return bool(row[names.index("is_admin")]) if "is_admin" in names else True
    except sqlite3.Error:  # no such table (yet), or the database is mid-creation
        return False
    finally:
        conn.close()


def cookie_value(setup_token: str) -> str:
    """What the cookie carries: a MAC of the token, never the token itself."""
    return hmac.new(setup_token.encode(), b"tabby-modal owner claim", hashlib.sha256).hexdigest()


class OwnerGuard:
    """ASGI middleware around the proxy. `setup_token` None: the claim is impossible until one is configured."""

    def __init__(
        self,
        app: ASGIApp,
        db_path: Path,
        setup_token: str | None,
        *,
        recheck: float = RECHECK,
        secret_hint: str = "TABBY_MODAL_SETUP_TOKEN",
        enabled: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.db_path = Path(db_path)
        self.setup_token = setup_token or None
        self.recheck = recheck
        self.secret_hint = secret_hint
        # While this says False (Tabby not serving yet) requests pass to the proxy, whose gate answers 503: the
        # database is not there to be read, and "starting" or "maintenance" is the more useful answer.
        self.enabled = enabled
        self._open = False
        self._checked_at = -1e9
        self._lock = threading.Lock()
        self._cookie = cookie_value(self.setup_token) if self.setup_token else None

    @property
    def locked(self) -> bool:
        if self._open:
            return False
        now = time.monotonic()
        if now - self._checked_at >= self.recheck:
            with self._lock:
                if not self._open and now - self._checked_at >= self.recheck:
                    self._checked_at = now
                    if has_user(self.db_path):
                        self._open = True
                        log.info("owner-claim guard off: the database has a user")
        return not self._open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (
            kind not in ("http", "websocket")
            or (self.enabled is not None and not self.enabled())
            or not self.locked
        ):
            await self.app(scope, receive, send)
            return
        if kind == "http" and scope.get("path") == SETUP_PATH:
            await self._setup(scope, send)
            return
        if self._has_cookie(scope):
            await self.app(scope, receive, send)
            return
        error = self._explain(scope)
        if kind == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await reject_websocket(scope, send, 403, error)
            return
        await pages.answer(scope, send, 403, error, kind="locked" if self.setup_token else "no_token")

    # --- pieces --------------------------------------------------------------------------------------------
    def _has_cookie(self, scope: Scope) -> bool:
        if self._cookie is None:
            return False
        for k, v in scope.get("headers") or ():
            if k.lower() != b"cookie":
                continue
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(v.decode("latin-1"))
            except Exception:
                continue
            morsel = jar.get(COOKIE)
            if morsel is not None and hmac.compare_digest(morsel.value.encode(), self._cookie.encode()):
                return True
        return False

    def _explain(self, scope: Scope) -> str:
        if self.setup_token is None:
            return (
                "This Tabby instance has no owner yet, and no setup token is configured, so it cannot be claimed. "
                f"Set {self.secret_hint} (a UUID; on Modal in the secret, `make secrets` creates it; locally in the "
                "environment or .env), restart the server, then open /_setup?token=<that token>."
            )
        return (
            "This Tabby instance has no owner yet: the first account to register becomes its owner. "
            f"To claim it, open {self._origin(scope)}{SETUP_PATH}?token=<setup token> "
            f"(the token is {self.secret_hint}), then register."
        )

    @staticmethod
    def _origin(scope: Scope) -> str:
        host = ""
        for k, v in scope.get("headers") or ():
            if k.lower() == b"host":
                host = v.decode("latin-1")
                break
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        return f"{scheme}://{host}" if host else ""

    async def _setup(self, scope: Scope, send: Send) -> None:
        if self.setup_token is None:
            await pages.answer(scope, send, 403, self._explain(scope), kind="no_token")
            return
        query = urllib.parse.parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        given = (query.get("token") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), self.setup_token.encode()):
            log.warning("owner claim: wrong setup token from %s", (scope.get("client") or ["?"])[0])
            await pages.answer(scope, send, 403, "wrong setup token", kind="wrong_token")
            return
        forwarded = dict((k.lower(), v) for k, v in scope.get("headers") or ()).get(b"x-forwarded-proto", b"")
        secure = "; Secure" if scope.get("scheme") == "https" or forwarded == b"https" else ""
        cookie = f"{COOKIE}={self._cookie}; Path=/; HttpOnly; SameSite=Lax; Max-Age={COOKIE_MAX_AGE}{secure}"
        log.info("owner claim: setup token accepted, redirecting to sign-up")
        headers = [(b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")]
        await pages.redirect(scope, send, SIGNUP_PATH, headers)
