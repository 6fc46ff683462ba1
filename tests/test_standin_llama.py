"""The stand-in `llama-server` behaves as llama.cpp's server does where Tabby and our split mode touch it: start-up
order and /health, the native /completion stream, OpenAI chat, embeddings, --api-key, -np slots, and a client's
disconnect stopping generation. Real subprocesses, real sockets on 127.0.0.1, aiohttp clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import free_port, poll, port_open
from tests.standin_llama_server import expected_text

SERVER = Path(__file__).resolve().parent / "standin_llama_server.py"
KEY = "split-secret"
LISTENING = re.compile(r"main: HTTP server is listening, hostname: [\d.]+, port: (\d+)")


class Llama:
    """One stand-in process; its stderr goes to a file the test reads."""

    def __init__(self, tmp: Path, *flags: str, port: int = 0, model: Path | None = None, **env: str) -> None:
        self.log = tmp / f"llama-{time.monotonic_ns()}.log"
        if model is None:
            model = tmp / "model-00001-of-00001.gguf"
            model.write_bytes(b"GGUF")
        args = [sys.executable, str(SERVER), "-m", str(model), "--port", str(port), *flags]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **env}, cwd=tmp
            )
        self.port = 0

    def stderr(self) -> str:
        return self.log.read_text()

    def bound(self) -> int:
        """Wait for llama-server's "HTTP server is listening" line; the port it names."""
        match = poll(
            lambda: LISTENING.search(self.stderr()) or self.proc.poll() is not None, what="bind line"
        )
        assert match is not True, f"exited with {self.proc.returncode}: {self.stderr()}"
        self.port = int(match.group(1))
        return self.port

    def ready(self) -> Llama:
        self.bound()
        poll(lambda: "starting the main loop" in self.stderr(), what="ready line")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    """A generation server as Tabby starts one: `-m <gguf> --cont-batching --port P -np 2 --ctx-size 4096`."""
    llama = Llama(
        tmp_path_factory.mktemp("plain"), "--cont-batching", "-np", "2", "--ctx-size", "4096"
    ).ready()
    yield llama
    llama.stop()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    """An embedding server as Tabby starts one, behind an API key."""
    flags = ["--cont-batching", "-np", "1", "--ctx-size", "4096", "-ngl", "9999", "--embedding"]
    llama = Llama(tmp_path_factory.mktemp("emb"), *flags, "--ubatch-size", "4096", "--api-key", KEY).ready()
    yield llama
    llama.stop()


def run(scenario: Callable[[aiohttp.ClientSession], Awaitable[Any]], timeout: float = 20) -> Any:
    async def main() -> Any:
        async with aiohttp.ClientSession() as session:
            return await scenario(session)

    return asyncio.run(asyncio.wait_for(main(), timeout))


async def sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of a server-sent event stream."""
    events = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
        else:
            assert line == "", line  # llama.cpp sends only data lines and the blank separators
    return events


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_health_503_while_loading_then_200_and_clean_exit(tmp_path: Path) -> None:
    gate = tmp_path / "loaded"
    port = free_port()
    llama = Llama(tmp_path, port=port, STANDIN_LLAMA_START_SECONDS="0.3", STANDIN_LLAMA_LOAD_GATE=str(gate))
    try:
        assert not port_open(port)  # the port opens only after the short start
        assert llama.bound() == port

        async def loading(s: aiohttp.ClientSession) -> None:
            for path in ("/health", "/props"):
                async with s.get(llama.url + path) as r:
                    assert r.status == 503
                    assert await r.json() == {
                        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
                    }
            async with s.post(llama.url + "/completion", json={"prompt": "x"}) as r:
                assert r.status == 503
            async with s.get(llama.url + "/v1/models") as r:  # answered while loading, as the real one
                assert r.status == 200 and (await r.json())["data"][0]["owned_by"] == "llamacpp"

        run(loading)
        gate.touch()

        async def ready(s: aiohttp.ClientSession) -> None:
            deadline = time.monotonic() + 10
            while True:
                async with s.get(llama.url + "/health") as r:
                    if r.status == 200:
                        assert await r.json() == {"status": "ok"}
                        return
                    assert r.status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.01)

        run(ready)
        assert (
            f"main: server is listening on http://127.0.0.1:{port} - starting the main loop" in llama.stderr()
        )
    finally:
        assert llama.stop() == 0  # SIGTERM once loaded: a clean exit, as the real server


def test_completion_streams_llama_cpp_events_and_answers_whole(plain: Llama) -> None:
    prompt = "def fib(n):"
    want = expected_text(prompt, 7)
    body = {"prompt": prompt, "n_predict": 7, "temperature": 0.1, "seed": 0, "penalty_last_n": 0}

    async def scenario(s: aiohttp.ClientSession) -> None:
        # Tabby's request body (http-api-bindings completion/llama.rs): always streaming.
        async with s.post(plain.url + "/completion", json={**body, "stream": True}) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            events = [json.loads(e) for e in await sse(r)]
        assert all(e["stop"] is False for e in events[:-1]) and len(events) == 8
        assert "".join(e["content"] for e in events) == want
        assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit"
        assert events[-1]["tokens_predicted"] == 7
        async with s.post(plain.url + "/completion", json=body) as r:  # no "stream": one JSON
            whole = await r.json()
        assert (whole["content"], whole["stop"], whole["tokens_predicted"]) == (want, True, 7)

    run(scenario)


def test_completion_honours_stop_strings(plain: Llama) -> None:
    prompt = "# stop test"
    full = expected_text(prompt, 24)
    stop = " x + 42\n"  # four tokens: " x", " +", " 42" are held back as partial matches, never sent
    assert stop in full

    async def complete(s: aiohttp.ClientSession, stops: list[str]) -> list[dict]:
        body = {"prompt": prompt, "n_predict": 24, "stream": True, "stop": stops}
        async with s.post(plain.url + "/completion", json=body) as r:
            return [json.loads(e) for e in await sse(r)]

    async def scenario(s: aiohttp.ClientSession) -> None:
        events = await complete(s, [stop])
        # Text once sent cannot be taken back: equality means no part of the stop string went out.
        assert "".join(e["content"] for e in events) == full[: full.index(stop)]
        assert events[-1]["stop_type"] == "word"
        # A partial match that does not complete is released: nothing lost.
        events = await complete(s, [" x - 1"])
        assert "".join(e["content"] for e in events) == full and events[-1]["stop_type"] == "limit"

    run(scenario)


def test_client_disconnect_stops_generation(plain: Llama) -> None:
    async def scenario(s: aiohttp.ClientSession) -> dict:
        await s.post(plain.url + "/debug/reset")
        body = {"prompt": "long", "n_predict": 100000, "stream": True, "standin_token_ms": 5}
        r = await s.post(plain.url + "/completion", json=body)
        for _ in range(3):
            assert (await r.content.readline()).startswith(b"data: ")
            await r.content.readline()
        r.close()  # drop the connection mid-stream, as Tabby does when its stop condition matches
        deadline = time.monotonic() + 5
        while True:
            async with s.get(plain.url + "/debug/stats") as resp:
                stats = await resp.json()
            if stats["disconnects"] == 1 and stats["active"] == 0:
                return stats
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.01)

    stats = run(scenario)
    assert 3 <= stats["tokens_generated"] < 400, stats
    # Noticed between tokens (as llama.cpp checks its sink), not by a failed write of one more token.
    assert stats["tokens_after_disconnect"] == 0 and stats["completed"] == 0, stats


def test_chat_completions_stream_openai_chunks_and_done(plain: Llama) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = expected_text("be brief\nhi", 5)

    async def scenario(s: aiohttp.ClientSession) -> None:
        for path in ("/v1/chat/completions", "/chat/completions"):
            body = {"model": "local", "messages": messages, "max_tokens": 5, "stream": True}
            async with s.post(plain.url + path, json=body, headers={"Authorization": "Bearer "}) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                events = await sse(r)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            assert {c["model"] for c in chunks} == {"local"} and len({c["id"] for c in chunks}) == 1
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == want
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        body = {
            "messages": messages,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with s.post(plain.url + "/v1/chat/completions", json=body) as r:
            *_, usage, done = await sse(r)
        assert done == "[DONE]" and json.loads(usage)["choices"] == []
        assert json.loads(usage)["usage"]["completion_tokens"] == 5
        async with s.post(
            plain.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 5}
        ) as r:
            whole = await r.json()
        assert whole["object"] == "chat.completion"
        assert whole["choices"][0]["message"] == {"role": "assistant", "content": want}
        assert whole["usage"]["completion_tokens"] == 5

    run(scenario)


def test_embedding_server_answers_tabbys_calls_and_refuses_generation(embedder: Llama, plain: Llama) -> None:
    async def scenario(s: aiohttp.ClientSession) -> None:
        # Tabby's llama.cpp/embedding: POST /tokenize {"content"}, then POST /embeddings {"content"}.
        async with s.post(embedder.url + "/tokenize", json={"content": "fn main"}, headers=AUTH) as r:
            assert len((await r.json())["tokens"]) == 3
        native = []
        for path in ("/embeddings", "/embedding"):
            async with s.post(embedder.url + path, json={"content": "fn main() {}"}, headers=AUTH) as r:
                assert r.status == 200
                native.append(await r.json())
        assert native[0] == native[1]
        [item] = native[0]
        assert item["index"] == 0 and len(item["embedding"]) == 1 and len(item["embedding"][0]) == 16
        async with s.post(
            embedder.url + "/v1/embeddings", json={"input": ["fn main() {}"]}, headers=AUTH
        ) as r:
            oai = await r.json()
        assert oai["object"] == "list" and oai["data"][0]["object"] == "embedding"
        assert oai["data"][0]["embedding"] == item["embedding"][0]  # same text, same vector
        async with s.post(embedder.url + "/embeddings", json={"content": ""}, headers=AUTH) as r:
            assert r.status == 400
        async with s.post(embedder.url + "/completion", json={"prompt": "x"}, headers=AUTH) as r:
            assert r.status == 501 and (await r.json())["error"]["type"] == "not_supported_error"
        async with s.post(plain.url + "/embeddings", json={"content": "x"}) as r:  # no --embedding
            assert r.status == 501

    run(scenario)


def test_api_key_guards_all_but_the_public_endpoints(embedder: Llama) -> None:
    invalid = {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}

    async def scenario(s: aiohttp.ClientSession) -> None:
        for path in ("/health", "/v1/models", "/models"):
            async with s.get(embedder.url + path) as r:
                assert r.status == 200, path
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": "Bearer "},
        ):
            for path in ("/embeddings", "/tokenize", "/v1/chat/completions", "/no-such-path"):
                async with s.post(embedder.url + path, json={"content": "x"}, headers=headers) as r:
                    assert (r.status, await r.json()) == (401, invalid), (path, headers)
        async with s.get(embedder.url + "/props", headers=AUTH) as r:
            assert r.status == 200 and (await r.json())["total_slots"] == 1
        for path in ("/no-such-path", "/embeddings"):  # GET of a POST route: 404 too, as cpp-httplib
            async with s.get(embedder.url + path, headers=AUTH) as r:
                assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
        async with s.post(embedder.url + "/embeddings", data=b"{not json", headers=AUTH) as r:
            assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"

    run(scenario)


def test_slots_bound_concurrency_and_queue_the_rest(plain: Llama) -> None:
    n_predict, token_ms, requests = 4, 25, 6

    async def one(s: aiohttp.ClientSession, i: int) -> str:
        body = {"prompt": f"p{i}", "n_predict": n_predict, "standin_token_ms": token_ms}
        async with s.post(plain.url + "/completion", json=body) as r:
            return (await r.json())["content"]

    async def scenario(s: aiohttp.ClientSession) -> tuple[list[str], float, dict]:
        await s.post(plain.url + "/debug/reset")
        start = time.monotonic()
        texts = await asyncio.gather(*(one(s, i) for i in range(requests)))
        elapsed = time.monotonic() - start
        async with s.get(plain.url + "/debug/stats") as r:
            return texts, elapsed, await r.json()

    texts, elapsed, stats = run(scenario)
    assert texts == [expected_text(f"p{i}", n_predict) for i in range(requests)]
    assert stats["max_active"] == 2 and stats["max_waiting"] >= 1
    assert stats["requests"] == stats["completed"] == requests and stats["active"] == stats["waiting"] == 0
    # 6 requests through 2 slots take at least 3 rounds of 4 tokens.
    assert elapsed >= 3 * n_predict * token_ms / 1000


def test_cli_is_strict_and_a_missing_model_exits_1(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, str(SERVER), "-m", "x.gguf", "--port", "0", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 1 and "error: invalid argument: --no-such-flag" in bad.stderr
    # Tabby's full command line for an embedding model, -t and -fa included, with a model file that is not there.
    flags = ["--cont-batching", "-np", "1", "--ctx-size", "4096", "-t", "2", "-ngl", "9999"]
    flags += ["--embedding", "--ubatch-size", "4096", "-fa", "--chat-template", "chatml"]
    llama = Llama(tmp_path, *flags, model=tmp_path / "missing.gguf")
    assert llama.proc.wait(timeout=20) == 1
    assert "failed to open GGUF file" in llama.stderr() and "main: loading model" in llama.stderr()


def test_sigterm_while_loading_kills_like_the_default_action(tmp_path: Path) -> None:
    llama = Llama(tmp_path, STANDIN_LLAMA_LOAD_GATE=str(tmp_path / "never"))
    llama.bound()
    llama.proc.send_signal(signal.SIGTERM)
    assert llama.proc.wait(timeout=10) == -signal.SIGTERM
