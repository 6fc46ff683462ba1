"""Split mode's GPU side (shared/serving/inference.py) with real stand-in llama-servers: Tabby's own llama-server
arguments (the stand-in refuses any it does not know), /health 503 while a model loads, a request waiting for a cold
model (bounded), the key (401 and one log line), routing of /completion, chat, /tokenize and /embeddings, SSE, and a
client's cancel stopping generation through the front."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serving.inference import Inference, llama_command, plan_servers
from shared.settings import load_settings
from tests.harness import poll, serve_asgi
from tests.split_parts import CHAT_TEMPLATE, bake_models, llama_wrapper
from tests.standin_llama_server import expected_text

KEY = "inference-key"


def settings(cache: Path, **extra: Any) -> Any:
    return load_settings(env_file=None, model_cache=str(cache), inference="split", **extra)


def test_llama_server_commands_are_tabbys(tmp_path: Path) -> None:
    cache = bake_models(tmp_path / "models")
    servers = {s.name: s for s in plan_servers(settings(cache))}
    assert set(servers) == {"embedding", "completion", "chat"}
    ggml = "ggml/model-00001-of-00001.gguf"
    cmd = llama_command("llama-server", servers["completion"], 31000, 4, env={})
    assert cmd == [
        "llama-server",
        "-m",
        str(cache / "TabbyML/StarCoder-1B" / ggml),
        "--cont-batching",
        "--port",
        "31000",
        "-np",
        "4",
        "--ctx-size",
        "4096",
        "-ngl",
        "9999",
    ]
    embed = llama_command("llama-server", servers["embedding"], 31001, 4, env={"LLAMA_CPP_N_THREADS": "3"})
    assert embed[embed.index("-np") + 1] == "1"  # Tabby's embedding model runs with parallelism 1
    assert embed[-3:] == ["--embedding", "--ubatch-size", "4096"] and embed[10:12] == ["-t", "3"]
    chat = llama_command("llama-server", servers["chat"], 31002, 2, device="cpu", env={})
    assert chat[-2:] == ["--chat-template", CHAT_TEMPLATE] and "-ngl" not in chat
    # The same model for completion and chat: one server serves both, as Tabby does.
    same = plan_servers(settings(cache, chat_model="TabbyML/StarCoder-1B"))
    assert [s.name for s in same] == ["embedding", "completion+chat"]


class Front:
    """An Inference with stand-in llama-servers, its front served on 127.0.0.1 by our ASGI host."""

    def __init__(self, tmp: Path, *, wait: float = 20.0, key: str | None = KEY, **env: str) -> None:
        cache = bake_models(tmp / "models")
        binary = llama_wrapper(tmp / "bin")
        import os

        self.inference = Inference(
            settings(cache, inference_parallelism=2),
            binary=str(binary),
            key=key,
            wait=wait,
            env={**os.environ, "STANDIN_LLAMA_START_SECONDS": "0", **env},
        )

    def stats(self, role: str) -> dict[str, Any]:
        import urllib.request

        server = self.inference.server_for(role)
        assert server is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/debug/stats", timeout=5) as r:
            return json.loads(r.read())


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_front_cold_then_serves_routes_auth_and_cancel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = tmp_path / "loaded"
    front = Front(tmp_path, STANDIN_LLAMA_LOAD_GATE=str(gate))
    front.inference.start()

    async def main() -> None:
        async with serve_asgi(front.inference.app()) as url, aiohttp.ClientSession() as http:
            # Loading: /health is 503 (public), and a completion waits instead of failing.
            async with http.get(f"{url}/health") as r:
                assert r.status == 503 and (await r.json())["error"]["message"] == "Loading model"
            prompt = "def f(x):"
            body = {"prompt": prompt, "n_predict": 6, "stream": True}
            waiting = asyncio.ensure_future(http.post(f"{url}/completion", json=body, headers=auth()))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            gate.touch()
            r = await asyncio.wait_for(waiting, 20)
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = [
                json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: ")
            ]
            assert "".join(e["content"] for e in events) == expected_text(prompt, 6) and events[-1]["stop"]
            await asyncio.to_thread(poll, front.inference.ready, 20, what="every model loaded")
            async with http.get(f"{url}/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"

            # A wrong key and no key: 401 in llama-server's shape, one log line each, never a hang.
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="tabby_modal.inference"):
                for headers in (auth("wrong"), {}):
                    async with http.post(f"{url}/completion", json=body, headers=headers) as r:
                        assert r.status == 401
                        assert (await r.json())["error"]["type"] == "authentication_error"
            assert len([m for m in caplog.messages if m.startswith("401 ")]) == 2
            assert front.stats("completion")["requests"] == 1  # refused before reaching a model

            # Chat (OpenAI SSE with [DONE]), both paths; tokenize + embeddings reach the embedding model.
            for path in ("/chat/completions", "/v1/chat/completions"):
                chat = {"model": "local", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                async with http.post(f"{url}{path}", json=chat, headers=auth()) as r:
                    text = await r.text()
                    assert r.status == 200 and text.rstrip().endswith("data: [DONE]")
            async with http.post(f"{url}/tokenize", json={"content": "a b c d"}, headers=auth()) as r:
                assert r.status == 200 and len((await r.json())["tokens"]) >= 4
            async with http.post(f"{url}/embeddings", json={"content": "a b c d"}, headers=auth()) as r:
                assert r.status == 200 and len((await r.json())[0]["embedding"][0]) == 16
            assert front.stats("chat")["requests"] == 2 and front.stats("embedding")["requests"] >= 1
            async with http.post(f"{url}/infill", json={}, headers=auth()) as r:
                assert r.status == 404

            # Cancel: the client drops a slow stream; the model stops between two tokens.
            slow = {"prompt": "x", "n_predict": 500, "stream": True, "standin_token_ms": 20}
            r = await http.post(f"{url}/completion", json=slow, headers=auth())
            await r.content.readline()
            r.close()
            await asyncio.to_thread(
                poll,
                lambda: front.stats("completion")["disconnects"] == 1,
                10,
                what="the disconnect to reach it",
            )
            stats = front.stats("completion")
            assert stats["tokens_after_disconnect"] == 0 and stats["tokens_generated"] < 100

    try:
        asyncio.run(main())
    finally:
        front.inference.stop()


def test_cold_model_request_gets_a_clear_503_after_the_bound(tmp_path: Path) -> None:
    front = Front(tmp_path, wait=0.5, STANDIN_LLAMA_LOAD_GATE=str(tmp_path / "never"))
    front.inference.start()

    async def main() -> None:
        async with serve_asgi(front.inference.app()) as url, aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            began = loop.time()
            async with http.post(f"{url}/completion", json={"prompt": "x"}, headers=auth()) as r:
                took = loop.time() - began
                assert r.status == 503 and r.headers["Retry-After"] == "10"
                message = (await r.json())["error"]["message"]
            assert "still loading after 0.5s" in message and 0.5 <= took < 5

    try:
        asyncio.run(main())
    finally:
        front.inference.stop()
