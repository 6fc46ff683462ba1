#!/usr/bin/env python3
"""A stand-in for llama.cpp's `llama-server`: its flags, its start-up order, and the HTTP surface Tabby uses.

Run as `python tests/standin_llama_server.py -m MODEL.gguf --port P [...]`, the way Tabby's supervisor runs the real
binary (`-m <gguf> --cont-batching --port P -np N --ctx-size C [-ngl L] [--embedding --ubatch-size U]
[--chat-template T]`, see docs/split-mode-facts.md). An unknown flag is refused like the real one does
("error: invalid argument: X", exit 1), so a wrong command line fails a test instead of passing silently.

Start-up follows llama.cpp's server.cpp (2025): a short start (STANDIN_LLAMA_START_SECONDS), then the port is bound
and "main: HTTP server is listening, hostname: H, port: P, ..." goes to stderr; while the model "loads" every
endpoint but /models answers 503 {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}};
then "main: server is listening on http://H:P - starting the main loop" and /health answers 200 {"status": "ok"}.
`--port 0` binds any free port (as the real server does) and the lines carry the real port.

Endpoints: /health, /models, /v1/models, /props, /tokenize, /completion and /completions (llama.cpp native, SSE
`data: {...}` events, the last with "stop": true), /chat/completions and /v1/chat/completions (OpenAI, SSE ending with
`data: [DONE]`), /embedding, /embeddings (native: `[{"index": 0, "embedding": [[...]]}]`), /v1/embeddings (OpenAI).
With --embedding the generation endpoints answer 501 and without it the embedding ones do. With --api-key every
endpoint except /health, /models, /v1/models (the real server's public ones) and /debug/* answers 401
{"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}} unless it gets
`Authorization: Bearer KEY`. `-np N` slots: at most N requests generate at once, the others wait (FIFO).

Generated text is deterministic: word k of a completion is WORDS[(offset + k) % len(WORDS)] with offset from the
prompt's sha256 (see `expected_text`). `stop` strings end generation as llama.cpp does (the stop string itself is not
sent, nor a partial match of one). Between tokens the server checks whether its client is still connected and stops
generating when it is not (llama.cpp checks `sink.is_writable()` the same way).

Environment knobs (all optional):
  STANDIN_LLAMA_START_SECONDS  seconds before the bind (default 0.05)
  STANDIN_LLAMA_LOAD_SECONDS   seconds of "Loading model" after the bind (default 0)
  STANDIN_LLAMA_LOAD_GATE      a path: loading lasts until it exists (after LOAD_SECONDS)
  STANDIN_LLAMA_TOKEN_MS       delay before each generated token, in ms (default 0); a request body may override it
                               with "standin_token_ms"
  STANDIN_LLAMA_EMBED_DIM      embedding size (default 16)

Debug endpoints (no auth, answered while loading too): GET /debug/stats -> counters (requests, active, max_active,
waiting, max_waiting, tokens_generated, completed, disconnects, tokens_after_disconnect, auth_failures); POST
/debug/reset zeroes them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

# Words of generated text; with the leading spaces and newlines a completion reads like code.
WORDS = ["def", " answer", "(", "x", ")", ":", "\n", "    return", " x", " +", " 42", "\n"]
# The real server's public endpoints (no API key asked), plus our own test hooks.
PUBLIC = {"/health", "/models", "/v1/models"}
PIECE = re.compile(r"\w+|[^\w\s]|\s+")
# OpenAI finish_reason for llama.cpp's stop types.
FINISH = {"word": "stop", "eos": "stop", "limit": "length"}


def log(line: str) -> None:
    # llama.cpp's common log prints everything but plain output to stderr; Tabby's supervisor reads stderr.
    print(line, file=sys.stderr, flush=True)


def tokenize(text: str) -> list[int]:
    """Deterministic token ids: one per word, punctuation mark or whitespace run."""
    return [int.from_bytes(hashlib.sha256(p.encode()).digest()[:2], "big") for p in PIECE.findall(text)]


def prompt_offset(prompt: str) -> int:
    return hashlib.sha256(prompt.encode()).digest()[0] % len(WORDS)


def expected_text(prompt: str, n: int) -> str:
    """The text the stand-in generates for `prompt` in `n` tokens, without stop strings."""
    offset = prompt_offset(prompt)
    return "".join(WORDS[(offset + k) % len(WORDS)] for k in range(n))


def embedding_of(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    raw = hashlib.sha256(text.encode()).digest()
    while len(raw) < dim:
        raw += hashlib.sha256(raw).digest()
    vec = [b / 255.0 - 0.5 for b in raw[:dim]]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def error_body(code: int, message: str, kind: str) -> dict[str, Any]:
    # llama.cpp's format_error_response wrapped by res_error: {"error": {"code", "message", "type"}}
    return {"error": {"code": code, "message": message, "type": kind}}


def error_response(code: int, message: str, kind: str) -> web.Response:
    return web.json_response(error_body(code, message, kind), status=code)


def partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (held back, as llama.cpp)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@dataclass
class Stats:
    requests: int = 0
    active: int = 0
    max_active: int = 0
    waiting: int = 0
    max_waiting: int = 0
    tokens_generated: int = 0
    completed: int = 0
    disconnects: int = 0
    tokens_after_disconnect: int = 0
    auth_failures: int = 0


class ArgumentError(Exception):
    pass


class StrictParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = StrictParser(prog="llama-server", add_help=False, allow_abbrev=False)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", type=int, default=0)
    p.add_argument("-cb", "--cont-batching", action="store_true")
    p.add_argument("--embedding", "--embeddings", action="store_true")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--api-key", action="append", default=[])
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-fa", "--flash-attn", action="store_true")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        raise ArgumentError(f"invalid argument: {unknown[0]}")
    if args.parallel < 1 or args.ctx_size < 1:
        raise ArgumentError("-np and --ctx-size must be positive")
    return args


class LlamaServer:
    """The HTTP side: state, slots, counters and the handlers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loading = True
        self.slots = asyncio.Semaphore(args.parallel)
        self.stats = Stats()
        self.token_ms = float(os.environ.get("STANDIN_LLAMA_TOKEN_MS", "0"))
        self.dim = int(os.environ.get("STANDIN_LLAMA_EMBED_DIM", "16"))
        self.model_id = args.model

    # --- middleware -------------------------------------------------------------------------------------------
    @web.middleware
    async def gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path.startswith("/debug/"):
            return await handler(request)
        # Order as in llama.cpp's pre-routing handler: the loading state first, then the API key.
        if self.loading and path not in ("/models", "/v1/models"):
            return error_response(503, "Loading model", "unavailable_error")
        if self.args.api_key and path not in PUBLIC and path != "/":
            header = request.headers.get("Authorization", "")
            if not (header.startswith("Bearer ") and header[len("Bearer ") :] in self.args.api_key):
                self.stats.auth_failures += 1
                return error_response(401, "Invalid API Key", "authentication_error")
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            # cpp-httplib has no 405: a known path with the wrong method is a 404 like an unknown one.
            return error_response(404, "File Not Found", "not_found_error")

    async def body(self, request: web.Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.read())
        except ValueError as e:
            # llama.cpp's exception handler answers a json::parse failure with a 500 server_error.
            raise web.HTTPInternalServerError(
                text=json.dumps(error_body(500, f"JSON parse error: {e}", "server_error")),
                content_type="application/json",
            ) from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(
                text=json.dumps(error_body(400, "request body must be an object", "invalid_request_error")),
                content_type="application/json",
            )
        return data

    # --- slots and generation ---------------------------------------------------------------------------------
    async def slot(self, request: web.Request) -> bool:
        """Wait for a free slot (FIFO, asyncio.Semaphore); False if the client left while waiting."""
        if self.slots.locked():  # every slot busy (or others already queued): this one waits
            self.stats.waiting += 1
            self.stats.max_waiting = max(self.stats.max_waiting, self.stats.waiting)
            try:
                await self.slots.acquire()
            finally:
                self.stats.waiting -= 1
        else:
            await self.slots.acquire()
        if request.transport is None or request.transport.is_closing():
            self.slots.release()
            self.stats.disconnects += 1
            return False
        self.stats.active += 1
        self.stats.max_active = max(self.stats.max_active, self.stats.active)
        return True

    def release(self) -> None:
        self.stats.active -= 1
        self.slots.release()

    def budget(self, prompt: str, n_predict: int) -> int:
        # n_predict < 0 means "until the slot's context is full", as in llama.cpp.
        room = max(self.args.ctx_size // self.args.parallel - len(tokenize(prompt)), 0)
        return room if n_predict < 0 else min(n_predict, room)

    async def generate(
        self, request: web.Request, prompt: str, n_predict: int, stops: list[str], token_ms: float
    ) -> AsyncIterator[tuple[str, int, str]]:
        """Yield (text to send, tokens so far, stop_type or "" while going on); the last item has a stop_type.

        Returns without a final item when the client is gone (checked before each token, as llama.cpp does)."""
        offset = prompt_offset(prompt)
        text, sent = "", 0
        limit = self.budget(prompt, n_predict)
        for k in range(limit):
            await asyncio.sleep(token_ms / 1000)
            if request.transport is None or request.transport.is_closing():
                self.stats.disconnects += 1
                return
            self.stats.tokens_generated += 1
            text += WORDS[(offset + k) % len(WORDS)]
            # A stop string cannot start before `sent`: a partial match at the end is held back below.
            hits = [i for i in (text.find(s, sent) for s in stops if s) if i >= 0]
            if hits:
                yield text[sent : min(hits)], k + 1, "word"
                return
            keep = partial_stop(text, stops)
            if len(text) - keep > sent:
                yield text[sent : len(text) - keep], k + 1, ""
                sent = len(text) - keep
        yield text[sent:], limit, "limit" if limit > 0 else "eos"

    async def send_event(self, response: web.StreamResponse, data: Any, token: bool = True) -> bool:
        try:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
            return True
        except (ConnectionError, RuntimeError):
            self.stats.disconnects += 1
            if token:
                # The token was generated but nobody got it: the disconnect was noticed late.
                self.stats.tokens_after_disconnect += 1
            return False

    # --- handlers ---------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model_id, "object": "model", "created": int(time.time()), "owned_by": "llamacpp"}
        return web.json_response({"object": "list", "data": [entry]})

    async def props(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "total_slots": self.args.parallel,
                "model_path": self.model_id,
                "chat_template": self.args.chat_template or "",
                "build_info": "standin",
            }
        )

    async def tokenize_handler(self, request: web.Request) -> web.Response:
        data = await self.body(request)
        return web.json_response({"tokens": tokenize(str(data.get("content", "")))})

    def refuse_mode(self, embedding_endpoint: bool) -> web.Response | None:
        if embedding_endpoint and not self.args.embedding:
            return error_response(
                501,
                "This server does not support embeddings. Start it with `--embeddings`",
                "not_supported_error",
            )
        if not embedding_endpoint and self.args.embedding:
            return error_response(
                501,
                "This server does not support completions. Start it without `--embeddings`",
                "not_supported_error",
            )
        return None

    def options(self, data: dict[str, Any], n_key: str) -> tuple[int, list[str], float]:
        n_predict = int(data.get(n_key, -1) if data.get(n_key) is not None else -1)
        stop = data.get("stop") or []
        stops = [stop] if isinstance(stop, str) else [str(s) for s in stop]
        token_ms = float(data.get("standin_token_ms", self.token_ms))
        return n_predict, stops, token_ms

    async def completion(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.refuse_mode(False)) is not None:
            return refused
        data = await self.body(request)
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            return error_response(400, '"prompt" must be a string', "invalid_request_error")
        n_predict, stops, token_ms = self.options(data, "n_predict")
        self.stats.requests += 1
        if not await self.slot(request):
            return web.Response(status=499)
        try:
            n_prompt = len(tokenize(prompt))

            def final(n: int, stop_type: str, content: str) -> dict[str, Any]:
                return {
                    "index": 0,
                    "content": content,
                    "id_slot": 0,
                    "stop": True,
                    "stop_type": stop_type,
                    "model": self.model_id,
                    "tokens_predicted": n,
                    "tokens_evaluated": n_prompt,
                }

            if not data.get("stream"):
                content = ""
                async for text, n, stop_type in self.generate(request, prompt, n_predict, stops, token_ms):
                    content += text
                    if stop_type:
                        self.stats.completed += 1
                        return web.json_response(final(n, stop_type, content))
                return web.Response(status=499)  # the client is gone
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for text, n, stop_type in self.generate(request, prompt, n_predict, stops, token_ms):
                event = {"index": 0, "content": text, "stop": False, "id_slot": -1, "tokens_predicted": n}
                if text and not await self.send_event(response, event):
                    break
                if stop_type and await self.send_event(response, final(n, stop_type, ""), token=False):
                    self.stats.completed += 1
            return response
        finally:
            self.release()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.refuse_mode(False)) is not None:
            return refused
        data = await self.body(request)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return error_response(400, "'messages' is required", "invalid_request_error")
        # A stand-in "chat template": the contents joined; only determinism matters here.
        prompt = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        n_key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
        n_predict, stops, token_ms = self.options(data, n_key)
        model = str(data.get("model") or "gpt-3.5-turbo")
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        self.stats.requests += 1
        if not await self.slot(request):
            return web.Response(status=499)
        try:
            n_prompt = len(tokenize(prompt))

            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {
                    "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
                    "created": created,
                    "id": cid,
                    "model": model,
                    "system_fingerprint": "standin",
                    "object": "chat.completion.chunk",
                }

            if not data.get("stream"):
                content = ""
                async for text, n, stop_type in self.generate(request, prompt, n_predict, stops, token_ms):
                    content += text
                    if stop_type:
                        self.stats.completed += 1
                        message = {"role": "assistant", "content": content}
                        choice = {"finish_reason": FINISH[stop_type], "index": 0, "message": message}
                        usage = {
                            "completion_tokens": n,
                            "prompt_tokens": n_prompt,
                            "total_tokens": n + n_prompt,
                        }
                        return web.json_response(
                            {
                                "choices": [choice],
                                "created": created,
                                "id": cid,
                                "model": model,
                                "object": "chat.completion",
                                "usage": usage,
                            }
                        )
                return web.Response(status=499)  # the client is gone
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            if not await self.send_event(
                response, chunk({"role": "assistant", "content": None}, None), token=False
            ):
                return response
            usage_chunk = bool((data.get("stream_options") or {}).get("include_usage"))
            async for text, n, stop_type in self.generate(request, prompt, n_predict, stops, token_ms):
                if text and not await self.send_event(response, chunk({"content": text}, None)):
                    break
                if not stop_type or not await self.send_event(
                    response, chunk({}, FINISH[stop_type]), token=False
                ):
                    continue
                usage = {"completion_tokens": n, "prompt_tokens": n_prompt, "total_tokens": n + n_prompt}
                # OpenAI's stream_options.include_usage: one more chunk, no choices, the usage.
                if not usage_chunk or await self.send_event(
                    response, {**chunk({}, None), "choices": [], "usage": usage}, token=False
                ):
                    try:
                        await response.write(b"data: [DONE]\n\n")
                        self.stats.completed += 1
                    except (ConnectionError, RuntimeError):
                        self.stats.disconnects += 1
            return response
        finally:
            self.release()

    async def embeddings(self, request: web.Request) -> web.Response:
        if (refused := self.refuse_mode(True)) is not None:
            return refused
        data = await self.body(request)
        oai = request.path == "/v1/embeddings"
        if "input" in data:
            prompt = data["input"]
        elif "content" in data:
            prompt, oai = data["content"], False  # "content" is not OAI-compatible: native shape
        else:
            return error_response(400, '"input" or "content" must be provided', "invalid_request_error")
        texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
        if not texts or any(not tokenize(t) for t in texts):
            return error_response(400, "Input content cannot be empty", "invalid_request_error")
        self.stats.requests += 1
        if not await self.slot(request):
            return web.Response(status=499)
        try:
            vectors = [embedding_of(t, self.dim) for t in texts]
        finally:
            self.release()
        self.stats.completed += 1
        if oai:
            n = sum(len(tokenize(t)) for t in texts)
            return web.json_response(
                {
                    "model": self.model_id,
                    "object": "list",
                    "usage": {"prompt_tokens": n, "total_tokens": n},
                    "data": [
                        {"embedding": v, "index": i, "object": "embedding"} for i, v in enumerate(vectors)
                    ],
                }
            )
        return web.json_response([{"index": i, "embedding": [v]} for i, v in enumerate(vectors)])

    async def debug_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**asdict(self.stats), "slots": self.args.parallel, "loading": self.loading})

    async def debug_reset(self, request: web.Request) -> web.Response:
        active, waiting = self.stats.active, self.stats.waiting
        self.stats = Stats(active=active, waiting=waiting)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.gate], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/models", self.models)
        r.add_get("/v1/models", self.models)
        r.add_get("/props", self.props)
        r.add_post("/tokenize", self.tokenize_handler)
        r.add_post("/completion", self.completion)
        r.add_post("/completions", self.completion)
        r.add_post("/chat/completions", self.chat)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/embedding", self.embeddings)
        r.add_post("/embeddings", self.embeddings)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/debug/stats", self.debug_stats)
        r.add_post("/debug/reset", self.debug_reset)
        return app


async def serve(args: argparse.Namespace) -> int:
    log("build: 0 (standin) with python for llama-server stand-in")
    log(
        f"system_info: n_threads = {args.threads or os.cpu_count()} | "
        f"n_parallel = {args.parallel} | ctx = {args.ctx_size} | ngl = {args.gpu_layers}"
    )
    await asyncio.sleep(float(os.environ.get("STANDIN_LLAMA_START_SECONDS", "0.05")))
    server = LlamaServer(args)
    # handler_cancellation stays off (aiohttp's default), as in llama.cpp a handler runs on after a disconnect
    # and notices it between tokens.
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as e:
        log(f"main: couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port} ({e})")
        await runner.cleanup()
        return 1
    port = runner.addresses[0][1]
    log(
        f"main: HTTP server is listening, hostname: {args.host}, port: {port}, http threads: {args.parallel + 2}"
    )
    log("main: loading model")
    await asyncio.sleep(float(os.environ.get("STANDIN_LLAMA_LOAD_SECONDS", "0")))
    gate = os.environ.get("STANDIN_LLAMA_LOAD_GATE")
    while gate and not Path(gate).exists():
        await asyncio.sleep(0.01)
    if not Path(args.model).is_file():
        log(f"gguf_init_from_file: failed to open GGUF file '{args.model}'")
        log("main: exiting due to model loading error")
        await runner.cleanup()
        return 1
    server.loading = False
    log("main: model loaded")
    if args.chat_template:
        log(f"main: chat template, chat_template: {args.chat_template}")
    # As the real server, SIGINT/SIGTERM are handled (clean exit 0) only once the model is loaded.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log(f"main: server is listening on http://{args.host}:{port} - starting the main loop")
    log("srv  update_slots: all slots are idle")
    await stop.wait()
    log("srv    operator(): operator(): cleaning up before exit...")
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as e:
        log(f"error: {e}")
        return 1
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
