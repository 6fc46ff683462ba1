"""The stand-in Tabby's model clients, as Tabby 0.32 talks to `[model.*.http]` endpoints (docs/split-mode-facts.md,
"What Tabby sends"), and, with STANDIN_LOCAL_LLAMA=1, to its own llama-server children, which Tabby wraps in the
very same clients (crates/llama-cpp-server/src/lib.rs).

- `llama.cpp/completion`: POST `<api_endpoint>/completion` `{"seed", "prompt", "n_predict", "temperature",
  "stream": true, "penalty_last_n", "presence_penalty"}` with the prompt built from `prompt_template` (`{prefix}`,
  `{suffix}`; without a template the prefix alone), `Authorization: Bearer` only when `api_key` is set; reads the
  SSE until `"stop": true`; applies stop words itself and then drops the stream (closing the connection); a non-200
  or non-SSE answer gives an empty completion.
- `openai/chat`: POST `<api_endpoint>/chat/completions` with `model` = `model_name`, always `Authorization:
  Bearer <key>` (empty when unset), the SSE passed on to the client.
- `llama.cpp/embedding`: POST `<api_endpoint>/tokenize` `{"content"}` (failure ignored; fewer than 4 tokens get
  `\\n`s appended), then `<api_endpoint>/embeddings` `{"content"}`, reading `[{"embedding": [[...]]}]`.

Each call's outcome is counted in STATS (`model_calls`, `model_errors`, `model_last_status`), so tests see what the
stand-in did without reading its logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

LLAMA = Path(__file__).resolve().parent / "standin_llama_server.py"
KINDS = {"completion": "llama.cpp/completion", "chat": "openai/chat", "embedding": "llama.cpp/embedding"}


def http_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`[model.<role>.http]` tables of a config.toml, checked as Tabby's serde and clients check them."""
    out: dict[str, dict[str, Any]] = {}
    for role, table in (config.get("model") or {}).items():
        http = (table or {}).get("http") if isinstance(table, dict) else None
        if http is None:
            continue
        if "kind" not in http:
            print(f"thread 'main' panicked: model.{role}.http: missing field `kind`", flush=True)
            sys.exit(101)
        if not http.get("api_endpoint"):
            print("thread 'main' panicked: api_endpoint is required", flush=True)
            sys.exit(101)
        if http["kind"] == "openai/chat" and not http.get("model_name"):
            print("thread 'main' panicked: Model name is required", flush=True)
            sys.exit(101)
        out[role] = dict(http)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gguf(model: str) -> tuple[str, dict[str, Any]]:
    directory = Path(model)
    found = sorted((directory / "ggml").glob("model-00001-of-*.gguf"))
    try:
        info = json.loads((directory / "tabby.json").read_text())
    except (OSError, ValueError):
        info = {}
    return str(found[0] if found else directory / "ggml" / "model-00001-of-00001.gguf"), info


def start_local_children(
    models: dict[str, str | None], parallelism: int, children: list[subprocess.Popen[bytes]]
) -> dict[str, dict[str, Any]]:
    """As Tabby with local models: a llama-server per model (supervisor.rs arguments), then the same HTTP clients
    at http://127.0.0.1:P. `models` maps role -> model directory."""
    out: dict[str, dict[str, Any]] = {}
    for role, model in models.items():
        if not model:
            continue
        gguf, info = _gguf(model)
        port = _free_port()
        cmd = [sys.executable, str(LLAMA), "-m", gguf, "--cont-batching", "--port", str(port)]
        cmd += ["-np", str(1 if role == "embedding" else parallelism), "--ctx-size", "4096"]
        if role == "embedding":
            cmd += ["--embedding", "--ubatch-size", "4096"]
        if role == "chat" and info.get("chat_template"):
            cmd += ["--chat-template", info["chat_template"]]
        children.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while True:  # as supervisor.rs `start`: GET /health until a 2xx
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print(f"llama-server for {role} did not become healthy", flush=True)
                sys.exit(1)
            time.sleep(0.02)
        out[role] = {"kind": KINDS[role], "api_endpoint": f"http://127.0.0.1:{port}"}
        if role == "completion" and info.get("prompt_template"):
            out[role]["prompt_template"] = info["prompt_template"]
        if role == "chat":
            out[role]["model_name"] = "local"
    return out


class ModelClients:
    """Tabby's three model clients over HTTP."""

    def __init__(self, configs: dict[str, dict[str, Any]], stats: dict[str, Any]) -> None:
        self.configs = configs
        self.stats = stats
        stats.setdefault("model_calls", {})
        stats.setdefault("model_errors", 0)
        stats.setdefault("model_cancelled", 0)
        stats["model_endpoints"] = {role: conf["api_endpoint"] for role, conf in configs.items()}
        self._session: aiohttp.ClientSession | None = None

    def has(self, role: str) -> bool:
        return role in self.configs

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=120))
        return self._session

    def _headers(self, role: str, *, always: bool = False) -> dict[str, str]:
        key = self.configs[role].get("api_key")
        if key or always:
            return {"Authorization": f"Bearer {key or ''}"}
        return {}

    def _count(self, what: str, status: int) -> None:
        calls = self.stats["model_calls"]
        calls[what] = calls.get(what, 0) + 1
        self.stats["model_last_status"] = status
        if status != 200:
            self.stats["model_errors"] += 1

    async def complete(self, segments: dict[str, Any], stop_words: list[str], max_tokens: int) -> str:
        conf = self.configs["completion"]
        prefix, suffix = segments.get("prefix", ""), segments.get("suffix") or ""
        template = conf.get("prompt_template")
        prompt = template.replace("{prefix}", prefix).replace("{suffix}", suffix) if template else prefix
        body = {
            "seed": 0,
            "prompt": prompt,
            "n_predict": max_tokens,
            "temperature": 0.1,
            "stream": True,
            "penalty_last_n": 0,
            "presence_penalty": 0.0,
        }
        self.stats["last_prompt"] = prompt
        url = f"{conf['api_endpoint']}/completion"
        text = ""
        try:
            async with self.session().post(url, json=body, headers=self._headers("completion")) as resp:
                self._count("completion", resp.status)
                if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                    return ""  # as reqwest_eventsource: any error ends the stream, an empty completion
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    text += event.get("content", "")
                    for word in stop_words:  # Tabby applies stop words itself, then drops the stream
                        if word in text:
                            return text[: text.index(word)]
                    if event.get("stop"):
                        return text
        except asyncio.CancelledError:
            self.stats["model_cancelled"] += 1
            raise
        return text

    async def chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        conf = self.configs["chat"]
        payload = {k: v for k, v in body.items() if k in ("messages", "max_tokens", "temperature", "seed")}
        payload.update({"model": body.get("model") or conf["model_name"], "stream": True})
        if "standin_token_ms" in body:
            payload["standin_token_ms"] = body["standin_token_ms"]
        url = f"{conf['api_endpoint']}/chat/completions"
        try:
            async with self.session().post(
                url, json=payload, headers=self._headers("chat", always=True)
            ) as up:
                self._count("chat", up.status)
                if up.status != 200:
                    return web.json_response({"error": f"chat model answered {up.status}"}, status=500)
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except asyncio.CancelledError:
            self.stats["model_cancelled"] += 1
            raise

    async def embed(self, text: str) -> list[float]:
        conf = self.configs["embedding"]
        base = conf["api_endpoint"].rstrip("/")
        headers = self._headers("embedding")
        with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
            async with self.session().post(f"{base}/tokenize", json={"content": text}, headers=headers) as r:
                self._count("tokenize", r.status)
                if r.status == 200 and len((await r.json())["tokens"]) < 4:
                    text += "\n" * (4 - len((await r.json())["tokens"]))
        async with self.session().post(f"{base}/embeddings", json={"content": text}, headers=headers) as r:
            self._count("embeddings", r.status)
            if r.status != 200:
                raise web.HTTPInternalServerError(text=f"embedding model answered {r.status}")
            return list((await r.json())[0]["embedding"][0])


def local_llama_enabled() -> bool:
    return os.environ.get("STANDIN_LOCAL_LLAMA") == "1"
