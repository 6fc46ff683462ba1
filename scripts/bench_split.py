"""Benchmark split mode's second hop (issue 20): our inference front (shared/serving/inference.py) between Tabby and
its llama-servers, on 127.0.0.1 with the stand-ins.

    .venv/bin/python scripts/bench_split.py            # part of `make bench`; about half a minute

Measured:
- the second hop's added p50 per completion: a streamed 8-token completion (no per-token delay) straight to the
  stand-in llama-server, and through the front served by our local ASGI host (uvicorn, httptools) in its own
  process; the difference of the medians (goal <= 2 ms);
- tokens after a cancel through both hops: a client -> the stand-in Tabby (talking `[model.chat.http]` as Tabby
  does) -> the front -> the stand-in llama-server; the client drops each of 20 long chat streams after its first
  event, and the llama-server counts tokens it generated after its client had gone (goal 0);
- completions per second with two inference replicas against one, each replica = its own front and its own
  llama-server with one slot (-np 1) and 5 ms per token, so the llama-server is the bottleneck; 8 clients spread
  round-robin over the replicas (what Modal's ingress does across containers) (goal >= 1.8x).

Not measured here: Modal's ingress (TLS, its routing, a cold start) on both hops, which adds its own latency on top
of these figures; measure that on Modal. Goals, not assertions: exit 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LLAMA = REPO / "tests" / "standin_llama_server.py"
TABBY = REPO / "tests" / "standin_tabby.py"
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} not ready in {timeout}s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], ready: str, **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        wait_http(ready, proc)
        return proc

    def llama(self, *flags: str, **env: str) -> int:
        port = free_port()
        gguf = Path(tempfile.mkdtemp()) / "model-00001-of-00001.gguf"
        gguf.write_bytes(b"GGUF")
        cmd = [sys.executable, str(LLAMA), "-m", str(gguf), "--cont-batching", "--port", str(port), *flags]
        self.start(cmd, f"http://127.0.0.1:{port}/health", STANDIN_LLAMA_START_SECONDS="0", **env)
        return port

    def front(self, llama_port: int) -> int:
        port = free_port()
        cmd = [sys.executable, __file__, "--serve-front", str(llama_port), str(port)]
        self.start(cmd, f"http://127.0.0.1:{port}/health")
        return port

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def serve_front(llama_port: int, port: int) -> None:
    """A front over one ready llama-server (serving every role), on our local ASGI host."""
    from shared.serving.host import AsgiHost, run
    from shared.serving.inference import Inference, ModelServer
    from shared.serving.proxy import Proxy
    from shared.settings import load_settings

    server = ModelServer(
        roles=("completion", "chat", "embedding"),
        model="bench",
        gguf=Path("bench.gguf"),
        port=llama_port,
        state="ready",
        proxy=Proxy(f"http://127.0.0.1:{llama_port}"),
    )
    inference = Inference(load_settings(env_file=None), binary="", key=KEY, servers=[server])

    async def main() -> None:
        host = AsgiHost(inference.app(), "127.0.0.1", port)
        await host.start()
        await asyncio.Event().wait()

    run(main())


async def stats(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/debug/stats") as r:
        return await r.json()


# --- 1. the second hop's added latency ------------------------------------------------------------------------


async def completion_p50(url: str, n: int) -> float:
    body = {"prompt": "def f(x):", "n_predict": 8, "stream": True}
    times = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            began = time.perf_counter()
            async with s.post(f"{url}/completion", json=body, headers=AUTH) as r:
                await r.read()
                assert r.status == 200
            if i >= 20:  # warm-up
                times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def hop_latency(procs: Procs, n: int) -> tuple[float, float]:
    llama = procs.llama("-np", "4")
    front = procs.front(llama)
    direct = asyncio.run(completion_p50(f"http://127.0.0.1:{llama}", n))
    through = asyncio.run(completion_p50(f"http://127.0.0.1:{front}", n))
    return direct, through


# --- 2. tokens after a cancel through both hops -----------------------------------------------------------------


def cancel_through_both_hops(procs: Procs, n: int) -> dict[str, Any]:
    llama = procs.llama("-np", "4")
    front = procs.front(llama)
    root = Path(tempfile.mkdtemp())
    (root / "config.toml").write_text(
        f'[model.chat.http]\nkind = "openai/chat"\nmodel_name = "local"\n'
        f'api_endpoint = "http://127.0.0.1:{front}"\napi_key = "{KEY}"\n'
    )
    tabby = free_port()
    cmd = [sys.executable, str(TABBY), "serve", "--host", "127.0.0.1", "--port", str(tabby)]
    procs.start(cmd, f"http://127.0.0.1:{tabby}/debug/stats", TABBY_ROOT=str(root), STANDIN_CHILD="0")

    async def main() -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000, "standin_token_ms": 5}
        headers = {"Authorization": "Bearer standin-token"}
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                r = await s.post(f"http://127.0.0.1:{tabby}/v1/chat/completions", json=body, headers=headers)
                await r.content.readline()
                r.close()
        deadline = time.monotonic() + 20
        while (await stats(llama))["disconnects"] < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(main())
    return asyncio.run(stats(llama))


# --- 3. two replicas against one ----------------------------------------------------------------------------------


async def throughput(urls: list[str], seconds: float, clients: int = 8) -> float:
    body = {"prompt": "x", "n_predict": 20, "stream": True}
    done = 0
    stop = time.monotonic() + seconds

    async def client(i: int, s: aiohttp.ClientSession) -> None:
        nonlocal done
        k = i
        while time.monotonic() < stop:
            url = urls[k % len(urls)]  # round-robin, as an ingress spreads requests over containers
            k += 1
            async with s.post(f"{url}/completion", json=body, headers=AUTH) as r:
                await r.read()
                if r.status == 200:
                    done += 1

    began = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(client(i, s) for i in range(clients)))
    return done / (time.monotonic() - began)


def replicas(procs: Procs, seconds: float) -> tuple[float, float]:
    urls = []
    for _ in range(2):
        llama = procs.llama("-np", "1", STANDIN_LLAMA_TOKEN_MS="5")
        urls.append(f"http://127.0.0.1:{procs.front(llama)}")
    one = asyncio.run(throughput(urls[:1], seconds))
    two = asyncio.run(throughput(urls, seconds))
    return one, two


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-front", nargs=2, type=int, metavar=("LLAMA_PORT", "PORT"))
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run of the bench)")
    args = ap.parse_args()
    if args.serve_front:
        serve_front(*args.serve_front)
        return 0
    n, cancels, seconds = (50, 5, 2.0) if args.quick else (300, 20, 3.0)
    procs = Procs()
    try:
        direct, through = hop_latency(procs, n)
        cancel = cancel_through_both_hops(procs, cancels)
        one, two = replicas(procs, seconds)
    finally:
        procs.stop()
    rows = [
        ("completion p50, llama-server direct", f"{direct:.2f} ms", ""),
        ("completion p50, through the inference front", f"{through:.2f} ms", ""),
        ("second hop's added p50", f"{through - direct:.2f} ms", "<= 2 ms"),
        (
            f"tokens after a cancel, both hops ({cancel['disconnects']} of {cancels} cancels seen)",
            str(cancel["tokens_after_disconnect"]),
            "0",
        ),
        ("completions/s, one replica (-np 1, 5 ms/token, 20 tokens)", f"{one:.1f}", ""),
        ("completions/s, two replicas", f"{two:.1f}", ""),
        ("two replicas / one", f"{two / one:.2f}x", ">= 1.8x"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'split mode, 127.0.0.1':<{width}}  {'measured':>10}  goal")
    for what, value, goal in rows:
        print(f"{what:<{width}}  {value:>10}  {goal}")
    print("Modal's ingress (TLS, routing, cold starts) on both hops is not measured here and comes on top.")
    print(json.dumps({"direct_ms": direct, "front_ms": through, "cancel": cancel, "one": one, "two": two}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
