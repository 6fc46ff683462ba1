"""ASGI in the small: the types every serving module speaks, and the plain answers (JSON errors, a refused
websocket handshake) that the proxy, the owner guard and the pages share."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def json_body(status: int, error: str) -> bytes:
    return json.dumps({"error": error, "status": status}).encode()


async def send_json(send: Send, status: int, error: str, *, retry_after: int | None = None) -> None:
    body = json_body(status, error)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def reject_websocket(
    scope: Scope, send: Send, status: int, error: str, *, retry_after: int | None = None
) -> None:
    """Refuse a websocket handshake: with an HTTP response where the server supports it, else a plain close (403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = json_body(status, error)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error[:120]})
