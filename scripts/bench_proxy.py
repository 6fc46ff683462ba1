"""Benchmark our proxy side by side with talking to Tabby directly and with asgi-proxy-lib (the seed's proxy).

    .venv/bin/python scripts/bench_proxy.py            # part of `make bench`; about a minute, 127.0.0.1 only

The upstream is the stand-in Tabby (tests/standin_tabby.py, an aiohttp server). Both ASGI proxies run under plain
uvicorn (h11, asyncio), ours also under the local host of `serve --local` (shared/serving/host.py), each in its own
process (so its CPU time and memory can be read from /proc); the load comes from this process.
asgi-proxy-lib is a dev dependency used here only: runtime code never imports it.

Measured: GET req/s at 1 and 16 clients with p50/p99 latency and the proxy's CPU per request; time to the first SSE
event with 16 chats at once; events the upstream still produces after a client cancels (10 ms apart); the proxy's
RSS growth during a 50 MB upload and a 100 MB download; and the supervisor's readiness detection delay over 50
starts of a tiny process that binds after a random delay, against the seed's 1 s poll. Goals, not assertions:
exit 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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

STANDIN = REPO / "tests" / "standin_tabby.py"
TOKEN = "bench-token"
CELL_SECONDS = 2.5
FIRST_TOKEN_MS = 30  # the stand-in's time to first token in the SSE test, as a model would take


# --- processes ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port}")


def serve(kind: str, port: int, upstream: str) -> None:
    """Child mode: run one proxy under uvicorn."""
    if kind == "ours-host":  # the same proxy under our local host, as `serve --local` runs it
        from shared.serving.host import AsgiHost, run
        from shared.serving.proxy import Proxy

        async def main() -> None:
            await AsgiHost(Proxy(upstream), "127.0.0.1", port).start()
            await asyncio.Event().wait()

        run(main())
        return
    import uvicorn

    if kind == "ours":
        from shared.serving.proxy import Proxy

        app: Any = Proxy(upstream)
        lifespan = "on"
    else:
        from asgi_proxy import asgi_proxy  # benchmarks only

        app = asgi_proxy(upstream)
        lifespan = "off"  # it asserts scope["type"] == "http"
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan=lifespan,
        access_log=False,
        proxy_headers=False,
        loop="asyncio",
        http="h11",
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# --- load -----------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as c:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t = time.monotonic()
                try:
                    async with c.get(f"{url}/debug/json") as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.monotonic() - t)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        took = time.monotonic() - started
    return {
        "rps": len(latencies) / took,
        "n": len(latencies),
        "p50": pct(latencies, 0.5) * 1000,
        "p99": pct(latencies, 0.99) * 1000,
        "errors": errors,
    }


async def sse_first_events(url: str, n: int = 16, rounds: int = 5) -> float:
    """Median time to the first event of `n` chats at once (the upstream's first token comes after 30 ms)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"events": 3, "interval_ms": 10, "first_ms": FIRST_TOKEN_MS}

    async def one(c: aiohttp.ClientSession) -> float:
        t = time.monotonic()
        async with c.post(f"{url}/v1/chat/completions", json=body, headers=auth) as r:
            await r.content.readuntil(b"\n\n")
            first = time.monotonic() - t
            await r.read()
        return first

    firsts: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as c:
        await asyncio.gather(*(one(c) for _ in range(n)))  # warm-up: n pooled connections at every hop
        for _ in range(rounds):
            firsts += await asyncio.gather(*(one(c) for _ in range(n)))
    return statistics.median(firsts) * 1000


async def stats(upstream: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as c, c.get(f"{upstream}/debug/stats") as r:
        return await r.json()


async def events_after_cancel(url: str, upstream: str) -> int:
    before = await stats(upstream)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    c = aiohttp.ClientSession()
    r = await c.post(f"{url}/v1/chat/completions", json={"events": 300, "interval_ms": 10}, headers=auth)
    for _ in range(3):
        await r.content.readuntil(b"\n\n")
    r.close()
    await c.close()
    deadline = time.monotonic() + 5
    last, still = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = await stats(upstream)
        produced = now["chat_events"] - before["chat_events"]
        if now["chat_cancelled"] > before["chat_cancelled"] or produced >= 300:
            break
        if produced != last:
            last, still = produced, time.monotonic()
        elif time.monotonic() - still > 1.0:
            break
        await asyncio.sleep(0.02)
    now = await stats(upstream)
    return now["chat_events"] - before["chat_events"] - 3


async def transfer_rss(url: str, pid: int) -> tuple[float, float, int]:
    """RSS growth (MB) of the proxy process during a 50 MB upload, then a 100 MB download; the upload's status."""
    out = []
    status = 0
    for what in ("upload", "download"):
        base = rss_mb(pid)
        reset_peak(pid)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as c:
            if what == "upload":

                async def body():
                    block = b"u" * (1 << 20)
                    for _ in range(50):
                        yield block

                async with c.post(f"{url}/debug/echo", data=body()) as r:
                    await r.read()
                    status = r.status
            else:
                async with c.get(f"{url}/debug/download?bytes={100 << 20}") as r:
                    async for _ in r.content.iter_chunked(1 << 16):
                        pass
        out.append(max(0.0, rss_mb(pid, "VmHWM") - base))
    return out[0], out[1], status


# --- readiness ------------------------------------------------------------------------------------------------

BINDER = """
import socket, sys, time
time.sleep(float(sys.argv[2]))
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print(f"bound {time.monotonic():.6f}", flush=True)
time.sleep(60)
"""


def readiness(starts: int, seed_starts: int) -> dict[str, list[float]]:
    from shared.serving.supervisor import Supervisor

    rng = random.Random(1)
    ours: list[float] = []
    for _ in range(starts):
        port = free_port()
        lines: list[str] = []
        sup = Supervisor(
            [sys.executable, "-c", BINDER, str(port), f"{rng.uniform(0.0, 0.2):.4f}"],
            dict(os.environ),
            port=port,
            startup_timeout=10,
            log_sink=lines.append,
        )
        sup.start()
        sup.wait_ready()
        detected = time.monotonic()
        deadline = time.monotonic() + 5
        while not any(x.startswith("bound") for x in lines) and time.monotonic() < deadline:
            time.sleep(0.001)
        bound = float(next(x for x in lines if x.startswith("bound")).split()[1])
        ours.append((detected - bound) * 1000)
        sup.stop(grace=1)
    seed: list[float] = []
    for _ in range(seed_starts):  # the seed: connect, else sleep 1 s, until the port answers
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", BINDER, str(port), f"{rng.uniform(0.0, 0.2):.4f}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1.0)
        detected = time.monotonic()
        assert proc.stdout is not None
        bound = float(proc.stdout.readline().split()[1])
        seed.append((detected - bound) * 1000)
        proc.kill()
        proc.wait()
    return {"ours": ours, "seed": seed}


# --- the run --------------------------------------------------------------------------------------------------


def fmt(v: float, digits: int = 0) -> str:
    return "-" if v != v else f"{v:,.{digits}f}"


async def measure(name: str, url: str, upstream: str, pid: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    await load(url, 4, 0.5)  # warm-up: connections, pools, code paths
    for clients in (1, 16):
        cpu0 = cpu_seconds(pid) if pid else 0.0
        res = await load(url, clients, CELL_SECONDS)
        cpu = (cpu_seconds(pid) - cpu0) if pid else float("nan")
        row[f"c{clients}"] = res
        row[f"cpu{clients}"] = cpu * 1000 / max(res["n"], 1)
    row["sse"] = await sse_first_events(url)
    row["cancel"] = await events_after_cancel(url, upstream)
    if pid:
        row["rss_up"], row["rss_down"], row["upload_status"] = await transfer_rss(url, pid)
    print(f"  measured {name}: {row['c16']['rps']:.0f} req/s at c16", file=sys.stderr)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description="proxy benchmark")
    ap.add_argument("--serve", choices=("ours", "ours-host", "lib"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--starts", type=int, default=50, help="supervisor starts for the readiness figure")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream)
        return 0

    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        try:
            up_port = free_port()
            env = {**os.environ, "TABBY_ROOT": tmp, "STANDIN_CHILD": "0", "STANDIN_TOKEN": TOKEN}
            upstream_proc = subprocess.Popen(
                [
                    sys.executable,
                    str(STANDIN),
                    "serve",
                    "--model",
                    "m",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(up_port),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # asgi-proxy-lib's malformed uploads make it log tracebacks
            )
            procs.append(upstream_proc)
            wait_port(up_port, upstream_proc)
            upstream = f"http://127.0.0.1:{up_port}"
            targets = [("direct", upstream, None)]
            kinds = [
                ("ours", "our proxy, uvicorn (h11, asyncio)"),
                ("lib", "asgi-proxy-lib 0.2a0, uvicorn (h11, asyncio)"),
                ("ours-host", "our proxy, our local host (uvicorn: httptools, uvloop)"),
            ]
            for kind, label in kinds:
                port = free_port()
                p = subprocess.Popen(
                    [sys.executable, __file__, "--serve", kind, "--port", str(port), "--upstream", upstream]
                )
                procs.append(p)
                wait_port(port, p)
                targets.append((label, f"http://127.0.0.1:{port}", p.pid))
            rows = [asyncio.run(measure(name, url, upstream, pid)) for name, url, pid in targets]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    print("  measuring readiness detection", file=sys.stderr)
    ready = readiness(args.starts, 6)

    direct, ours_uv, lib, ours_host = rows
    hosts = [
        ("under uvicorn (h11, asyncio)", ours_uv),
        ("under our local host (httptools, uvloop)", ours_host),
    ]
    lines = [
        "| Target | GET c1 req/s | GET c16 req/s | c16 p50 / p99 ms | added p50 ms (c1; c16) | "
        "CPU ms/req (c1; c16) | 16 SSE first event p50 ms (first token at 30 ms) | events after cancel | RSS +MB: 50 MB up; 100 MB down |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r is direct:
            added = cpu = rss = "-"
            sse = f"{r['sse']:.1f}"
        else:
            added = (
                f"{r['c1']['p50'] - direct['c1']['p50']:.2f}; {r['c16']['p50'] - direct['c16']['p50']:.2f}"
            )
            cpu = f"{r['cpu1']:.2f}; {r['cpu16']:.2f}"
            rss = f"{r['rss_up']:.1f}; {r['rss_down']:.1f}"
            if r["upload_status"] != 200:
                rss += f" (upload answered {r['upload_status']})"
            sse = f"{r['sse']:.1f} ({r['sse'] - direct['sse']:+.1f})"
        errors = r["c1"]["errors"] + r["c16"]["errors"]
        lines.append(
            f"| {r['name']}{f' ({errors} errors)' if errors else ''} | {fmt(r['c1']['rps'])} | "
            f"{fmt(r['c16']['rps'])} | {r['c16']['p50']:.2f} / {r['c16']['p99']:.2f} | {added} | {cpu} | {sse} | "
            f"{r['cancel']} | {rss} |"
        )
    o, s = ready["ours"], ready["seed"]
    lines += [
        "",
        "| Readiness: bind -> detected | n | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|",
        f"| supervisor (TCP poll, backoff 1-10 ms) | {len(o)} | {pct(o, 0.5):.1f} | {pct(o, 0.95):.1f} | "
        f"{max(o):.1f} |",
        f"| seed (1 s poll) | {len(s)} | {pct(s, 0.5):.0f} | {pct(s, 0.95):.0f} | {max(s):.0f} |",
        "",
        "| Goal (our proxy) | " + " | ".join(h for h, _ in hosts) + " |",
        "|---" * (len(hosts) + 1) + "|",
    ]

    def goal(label: str, measure: Any, met: Any) -> str:
        cells = [f"{measure(r)} {'(met)' if met(r) else '**(missed)**'}" for _, r in hosts]
        return f"| {label} | " + " | ".join(cells) + " |"

    def ratio(r: dict[str, Any], c: str) -> float:
        return r[c]["rps"] / max(lib[c]["rps"], 1e-9)

    def added1(r: dict[str, Any]) -> float:
        return r["c1"]["p50"] - direct["c1"]["p50"]

    lines += [
        goal(
            "req/s >= 50x asgi-proxy-lib",
            lambda r: f"{ratio(r, 'c1'):.0f}x c1, {ratio(r, 'c16'):.0f}x c16",
            lambda r: min(ratio(r, "c1"), ratio(r, "c16")) >= 50,
        ),
        goal(
            "<= 1 ms CPU per request",
            lambda r: f"{r['cpu1']:.2f} c1, {r['cpu16']:.2f} c16",
            lambda r: max(r["cpu1"], r["cpu16"]) <= 1,
        ),
        goal("<= 1.5 ms added p50 (c1)", lambda r: f"{added1(r):.2f} ms", lambda r: added1(r) <= 1.5),
        goal(
            "16 SSE first event <= 1.5x direct",
            lambda r: f"{r['sse'] / direct['sse']:.2f}x",
            lambda r: r["sse"] / direct["sse"] <= 1.5,
        ),
        goal("<= 3 events after a cancel", lambda r: str(r["cancel"]), lambda r: r["cancel"] <= 3),
        goal(
            "RSS growth <= 16 MB per transfer",
            lambda r: f"{r['rss_up']:.1f} / {r['rss_down']:.1f} MB",
            lambda r: max(r["rss_up"], r["rss_down"]) <= 16,
        ),
        f"| readiness p95 <= 20 ms | {pct(o, 0.95):.1f} ms {'(met)' if pct(o, 0.95) <= 20 else '**(missed)**'} |"
        + " |" * (len(hosts) - 1),
        "",
        f"({os.cpu_count()} CPUs shared by load generator, proxy and upstream; loopback; "
        f"{CELL_SECONDS:g} s per load cell; run took {time.monotonic() - started:.0f} s)",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
