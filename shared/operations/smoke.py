"""The smoke checks of a running Tabby behind our proxy: health with a token, one completion, one chat stream (time to
the first event) and the websocket handshake on /subscriptions (`graphql-transport-ws`, which Tabby's web chat,
Answer Engine and Pages use). Used by `scripts/smoke.py` (`make smoke`) and by `tabby-modal upgrade`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)


@dataclass
class Check:
    name: str
    ok: bool = False
    ms: float = 0.0
    detail: str = ""


async def health(c: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> str:
    async with c.get(f"{url}/v1/health", headers=auth) as r:
        body = await r.text()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body[:160]}")
        doc = json.loads(body)
        return f"model {doc.get('model')}, chat {doc.get('chat_model')}, device {doc.get('device')}"


async def completion(c: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> str:
    req = {"language": "python", "segments": {"prefix": "def fib(n):\n    ", "suffix": "\n"}}
    async with c.post(f"{url}/v1/completions", json=req, headers=auth) as r:
        body = await r.text()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body[:160]}")
        choices = json.loads(body).get("choices") or []
        if not choices:
            raise RuntimeError("no choices in the answer")
        if not choices[0].get("text"):
            # Tabby turns any model error (a llama-server down; in split mode a wrong key or a cold inference
            # container past TABBY_MODAL_INFERENCE_WAIT) into an empty completion: that is a failure here.
            raise RuntimeError(
                "empty completion: the model failed behind Tabby (split mode: see the Inference log)"
            )
        return f"{len(choices[0].get('text', ''))} chars"


async def chat(c: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> str:
    req = {"messages": [{"role": "user", "content": "Reply with one word: hello"}], "stream": True}
    started = time.monotonic()
    first: float | None = None
    events = 0
    done = False
    async with c.post(f"{url}/v1/chat/completions", json=req, headers=auth) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:160]}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            if first is None:
                first = time.monotonic() - started
            if line.strip() == b"data: [DONE]":
                done = True
                break
            events += 1
    if first is None:
        raise RuntimeError("the stream ended without an event")
    return f"first event {first * 1000:.0f} ms, {events} events{'' if done else ', no [DONE]'}"


async def subscriptions(c: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> str:
    ws_url = url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    async with c.ws_connect(
        f"{ws_url}/subscriptions", protocols=["graphql-transport-ws"], headers=auth
    ) as ws:
        if ws.protocol != "graphql-transport-ws":
            raise RuntimeError(f"subprotocol {ws.protocol!r} negotiated")
        token = auth.get("Authorization", "")
        await ws.send_str(json.dumps({"type": "connection_init", "payload": {"authorization": token}}))
        msg = await asyncio.wait_for(ws.receive(), 15)
        if msg.type == aiohttp.WSMsgType.TEXT:
            kind = json.loads(msg.data).get("type")
            return f"handshake ok, {kind} to connection_init"
        if msg.type == aiohttp.WSMsgType.CLOSE and msg.data not in (1006, 1011):
            # A close frame from Tabby still proves the connection carries frames both ways.
            return f"handshake ok, closed {msg.data} {msg.extra or ''}".rstrip()
        raise RuntimeError(f"no answer to connection_init ({msg.type.name} {msg.data})")


async def run_checks(url: str, token: str) -> list[Check]:
    auth = {"Authorization": f"Bearer {token}"}
    steps: list[tuple[str, Callable[..., Awaitable[str]]]] = [
        ("health", health),
        ("completion", completion),
        ("chat stream", chat),
        ("websocket /subscriptions", subscriptions),
    ]
    results = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as c:
        for name, step in steps:
            check = Check(name)
            started = time.monotonic()
            try:
                check.detail = await step(c, url, auth)
                check.ok = True
            except aiohttp.WSServerHandshakeError as err:
                check.detail = f"websocket refused: HTTP {err.status}"
            except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError) as err:
                check.detail = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            check.ms = (time.monotonic() - started) * 1000
            results.append(check)
    return results


def table(url: str, checks: list[Check]) -> str:
    lines = [f"smoke test of {url}", "", "| check | result | ms | detail |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {'ok' if c.ok else 'FAIL'} | {c.ms:.0f} | {c.detail} |")
    failed = sum(not c.ok for c in checks)
    lines += ["", "all checks passed" if not failed else f"{failed} of {len(checks)} checks failed"]
    return "\n".join(lines)


def smoke(url: str, token: str) -> list[Check]:
    """Run every check against `url` (blocking)."""
    return asyncio.run(run_checks(url.rstrip("/"), token))
