"""What the proxy answers by itself (locked instance, starting, restarting, maintenance, failures), in two forms:
a small HTML page for a person's browser, the JSON `{"error": ..., "status": ...}` for everything else.

Which form: HTML only when the request's `Accept` header prefers `text/html` to JSON, as a browser navigation does
(`text/html,...,*/*;q=0.8`). curl's `*/*`, tabby-agent, `application/json`, a missing header, websockets and any
`/v1/*` API path keep the JSON. The status code and `Retry-After` are the same in both forms.

The pages are self-contained (inline CSS, no scripts, no fonts or images from elsewhere; a Content-Security-Policy
says so), readable on a phone (viewport meta, 17 px text), a few KB. The waiting ones (starting, restarting,
maintenance, stopping, upstream not answering) reload themselves every `REFRESH` seconds, by `<meta refresh>` and
the `Refresh` header. Everything dynamic (the reason, the Host header) is HTML-escaped. docs/pages.md lists them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from shared.serving.asgi import Scope, Send, send_json

REFRESH = 5  # seconds between reloads of a waiting page
API_PREFIXES = ("/v1/", "/v1beta/")
JSON_TYPES = ("application/json", "application/*", "*/*")  # most specific first
HTML_TYPES = ("text/html", "application/xhtml+xml", "text/*")  # `*/*` alone never means "a person"


@dataclass(frozen=True)
class Page:
    """How one kind of answer reads in a browser: a title, what is happening, what to do, and whether it waits."""

    title: str
    what: str  # what is happening, in plain words (static text, may hold markup)
    todo: str  # what to do about it (static text, may hold markup)
    waiting: bool = False  # reloads itself every REFRESH s


SECRET = "<code>TABBY_MODAL_SETUP_TOKEN</code>"
PAGES: dict[str, Page] = {
    "locked": Page(
        "This Tabby has no owner yet",
        "The first account to register becomes its owner (the admin). Until then only the person with the "
        "setup token can get in.",
        f"Enter the setup token ({SECRET}: on Modal it is in the <code>tabby-secrets</code> secret that "
        "<code>make secrets</code> created), then register the owner account.",
    ),
    "no_token": Page(
        "This Tabby cannot be claimed yet",
        "It has no owner, and no setup token is configured, so nobody can register the owner account.",
        f"Set {SECRET} to a UUID (on Modal: <code>make secrets</code>; locally: in the environment or "
        "<code>.env</code>), restart the server, then open this address again.",
    ),
    "wrong_token": Page(
        "That setup token is not right",
        "The token given does not match the server's setup token, so the instance stays locked.",
        f"Check {SECRET} (on Modal: the <code>tabby-secrets</code> secret) and try again.",
    ),
    "claimed": Page(
        "Setup token accepted",
        "You can now register the owner account of this Tabby.",
        '<a class="button" href="{href}">Continue to sign-up</a>',
    ),
    "starting": Page(
        "Tabby is starting",
        "The server is restoring its data and loading the models. A cold start takes a minute or two.",
        f"Nothing to do: this page reloads every {REFRESH} seconds and shows Tabby once it is ready.",
        waiting=True,
    ),
    "restarting": Page(
        "Tabby is restarting",
        "Tabby stopped unexpectedly; its data was saved and it is being started again.",
        f"Nothing to do: this page reloads every {REFRESH} seconds and shows Tabby once it is back.",
        waiting=True,
    ),
    "maintenance": Page(
        "Maintenance in progress",
        "A restore or reset of Tabby's data is running, so Tabby waits until it ends.",
        f"Nothing to do: this page reloads every {REFRESH} seconds. If it lasts long, whoever runs the "
        "instance can see the lock with <code>make status</code>.",
        waiting=True,
    ),
    "stopping": Page(
        "The server is stopping",
        "This server is shutting down. On Modal a new one starts with the next request.",
        f"This page reloads every {REFRESH} seconds.",
        waiting=True,
    ),
    "upstream": Page(
        "Tabby is not answering",
        "The server is up but Tabby behind it did not answer; it is usually being restarted.",
        f"This page reloads every {REFRESH} seconds. If this lasts, see the server log.",
        waiting=True,
    ),
    "failed": Page(
        "Tabby failed to start",
        "The server could not start Tabby, for the reason below. Retrying would fail the same way.",
        "Whoever runs the instance: fix the cause below, then restart the server "
        "(on Modal: <code>make deploy-server</code>). The server log has the details.",
    ),
    "bad_secret": Page(
        "Tabby's JWT secret is not usable",
        "The JWT secret (<code>TABBY_WEBSERVER_JWT_TOKEN_SECRET</code>) is not a UUID, so Tabby would stop at "
        "the first sign-in. The server refused to start it.",
        "Whoever runs the instance: put a UUID in the secret (<code>make rotate-jwt-secret</code>) and restart "
        "the server.",
    ),
    "gave_up": Page(
        "Tabby keeps crashing",
        "Tabby crashed too often in a short time, so this server gave up restarting it and is shutting down.",
        "On Modal a fresh container starts with the next request: reload this page in a minute. If it "
        "happens again, see the server log (<code>make status</code> says what is wrong).",
    ),
    "superseded": Page(
        "Tabby's data was replaced",
        "Tabby's data folder was replaced under this server (a restore, a reset or another server), so it "
        "stopped serving rather than overwrite the new data.",
        "Start the server again: the new one serves the new data.",
    ),
    "unavailable": Page(
        "Tabby is not available",
        "The server cannot pass this request to Tabby right now.",
        "Reload this page in a moment.",
    ),
}

STYLE = """
:root{color-scheme:light dark;--fg:#1d2430;--muted:#5b6472;--bg:#f6f7f9;--card:#fff;--line:#dde1e7;--accent:#2563eb}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ee;--muted:#a3acb9;--bg:#14171c;--card:#1d2229;
--line:#313843;--accent:#6ea1ff}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:17px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;-webkit-text-size-adjust:100%}
main{max-width:34rem;margin:0 auto;padding:2.5rem 1.25rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:1.5rem 1.4rem}
.tag{margin:0 0 .6rem;color:var(--muted);font-size:.85rem;letter-spacing:.02em}
h1{font-size:1.45rem;line-height:1.25;margin:0 0 .8rem}
p{margin:.7rem 0}
code{font:.88em/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--bg);
border:1px solid var(--line);border-radius:5px;padding:.05em .3em;overflow-wrap:anywhere}
.detail{margin-top:1.2rem;padding-top:.9rem;border-top:1px solid var(--line);color:var(--muted);font-size:.9rem;
overflow-wrap:anywhere}
form{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0 .4rem}
input{flex:1 1 14rem;min-width:0;font:inherit;padding:.6rem .75rem;border:1px solid var(--line);border-radius:9px;
background:var(--bg);color:var(--fg)}
button,.button{font:inherit;font-weight:600;padding:.6rem 1.1rem;border:0;border-radius:9px;background:var(--accent);
color:#fff;text-decoration:none;display:inline-block;cursor:pointer}
.wait{display:inline-block;width:.9em;height:.9em;margin-right:.45em;vertical-align:-.1em;border-radius:50%;
border:.16em solid var(--line);border-top-color:var(--accent);animation:spin 1s linear infinite}
@keyframes spin{to{transform:rotate(360deg)}}
@media (prefers-reduced-motion:reduce){.wait{animation:none}}
""".strip()

CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"


def _media_ranges(accept: str) -> dict[str, float]:
    """`Accept` as {media range: q}; a range listed twice keeps its highest q, a malformed q counts as 0."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        ranges[media] = max(q, ranges.get(media, 0.0))
    return ranges


def _quality(ranges: dict[str, float], candidates: tuple[str, ...]) -> tuple[float, bool]:
    """The q of the most specific listed candidate, and whether it was an exact (non-wildcard) match."""
    for media in candidates:
        if media in ranges:
            return ranges[media], "*" not in media
    return 0.0, False


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


def wants_html(scope: Scope) -> bool:
    """Does this request prefer an HTML page (a browser navigation) to JSON?"""
    if scope.get("type") != "http":
        return False
    path = scope.get("path") or "/"
    if path.startswith(API_PREFIXES) or path in ("/v1", "/v1beta"):
        return False  # the API is for clients, whatever they accept
    ranges = _media_ranges(_header(scope, b"accept"))
    html_q, _ = _quality(ranges, HTML_TYPES)
    json_q, json_exact = _quality(ranges, JSON_TYPES)
    # A tie goes to HTML only against a wildcard: `text/html, application/json` names JSON, so JSON it is.
    return html_q > 0 and (html_q > json_q or (html_q == json_q and not json_exact))


def origin(scope: Scope) -> str:
    """`scheme://host` as the client addressed us ("" without a Host header). Untrusted: escape before use."""
    host = _header(scope, b"host")
    scheme = scope.get("scheme", "http")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    forwarded = _header(scope, b"x-forwarded-proto").split(",")[0].strip().lower()
    if forwarded in ("http", "https"):
        scheme = forwarded  # behind Modal's ingress the browser speaks https
    return f"{scheme}://{host}" if host else ""


def render(kind: str, status: int, error: str, scope: Scope | None = None, *, href: str = "") -> str:
    """The HTML page for this kind of answer. `error` (the JSON's text) is shown, escaped, as the details."""
    page = PAGES.get(kind) or PAGES["unavailable"]
    e = html.escape
    refresh = f'<meta http-equiv="refresh" content="{REFRESH}">' if page.waiting else ""
    title = f'<span class="wait" aria-hidden="true"></span>{e(page.title)}' if page.waiting else e(page.title)
    todo = page.todo.replace("{href}", e(href, quote=True))
    extra = ""
    if kind in ("locked", "wrong_token"):
        link = f"{e(origin(scope) if scope is not None else '')}/_setup?token=&lt;setup token&gt;"
        extra = (
            '<form method="get" action="/_setup">'
            '<input name="token" type="password" autocomplete="off" aria-label="Setup token" '
            'placeholder="Setup token" required>'
            "<button>Claim</button></form>"
            f'<p class="detail">The setup link also works: <code>{link}</code></p>'
        )
    details = (
        "" if kind in ("locked", "wrong_token", "claimed") else f'<p class="detail">Details: {e(error)}</p>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'{refresh}<meta name="robots" content="noindex"><title>{e(page.title)} · Tabby</title>'
        f'<style>{STYLE}</style></head><body><main><div class="card">'
        f'<p class="tag">HTTP {status} · Tabby on Modal</p><h1>{title}</h1>'
        f"<p>{page.what}</p><p>{todo}</p>{extra}{details}</div></main></body></html>"
    )


def html_headers(body: bytes, *, waiting: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"vary", b"Accept"),
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),  # a setup link carries the token in its query
    ]
    if waiting:
        headers.append((b"refresh", str(REFRESH).encode()))
    return headers


async def answer(
    scope: Scope,
    send: Send,
    status: int,
    error: str,
    *,
    kind: str = "unavailable",
    retry_after: int | None = None,
) -> None:
    """Answer by ourselves: the page for a browser, else the JSON exactly as before. Same status, same Retry-After."""
    if not wants_html(scope):
        await send_json(send, status, error, retry_after=retry_after)
        return
    body = render(kind, status, error, scope).encode()
    headers = html_headers(body, waiting=(PAGES.get(kind) or PAGES["unavailable"]).waiting)
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def redirect(scope: Scope, send: Send, location: str, headers: list[tuple[bytes, bytes]]) -> None:
    """A 303 to `location`; a browser also gets a one-link page (shown only where redirects are not followed)."""
    body = b""
    extra: list[tuple[bytes, bytes]] = []
    if wants_html(scope):
        body = render("claimed", 303, "", scope, href=location).encode()
        extra = [*html_headers(body, waiting=False)[:1], (b"vary", b"Accept")]
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode()),
                *headers,
                *extra,
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
