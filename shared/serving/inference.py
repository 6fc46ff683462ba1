"""Split mode's GPU side (issue 20): the baked models' `llama-server`s, started with Tabby's own arguments, behind
one authenticated ASGI front that Modal scales as the `Inference` class (apps/server.py).

    Tabby (CPU container) --[model.*.http], Bearer key--> Modal ingress --> InferenceFront --> llama-server(s)

- Commands: as Tabby 0.32's supervisor runs them (crates/llama-cpp-server/src/supervisor.rs, docs/split-mode-facts.md):
  `-m <ggml/model-00001-of-N.gguf> --cont-batching --port P -np N --ctx-size 4096 [-t T] [-ngl 9999]`, plus
  `--embedding --ubatch-size 4096` for the embedding model and `--chat-template` for the chat model. No `--api-key`
  and no `--host`: each binds 127.0.0.1, and only this front reaches it.
- One container serves all three models: the defaults (StarCoder-1B, Qwen2-1.5B-Instruct, Nomic-Embed-Text) are about
  3 GB of GGUF together, well inside an L4's 24 GB, and one container means one cold start per replica, not three.
  When the completion and chat models are the same, one server serves both (as Tabby does, lib.rs 237-264).
- Routes: `/completion` and `/completions` to the completion server, `/chat/completions` and `/v1/chat/completions`
  to the chat server, `/tokenize` and `/embeddings` to the embedding server (only Tabby's embedding client calls
  `/tokenize`), `/health` public (503 while any model loads, as llama-server itself answers). Everything else is
  refused before it reaches a model: a missing or wrong key is a 401 and one log line.
- Streaming, SSE and cancellation go through the toolkit's `Proxy` (shared/serving/proxy.py): a client that goes
  away closes the upstream connection, and llama-server stops generating between two tokens. Tabby applies its stop
  words itself and drops the stream, so this is what stops a GPU from generating for nobody.
- Cold replicas: a model request waits for its server to load for up to `inference_wait` seconds (below the 150 s
  Modal's web endpoints allow), then gets a 503 saying so, with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.serving import asgi
from shared.serving.asgi import Receive, Scope, Send
from shared.serving.proxy import Proxy
from shared.serving.supervisor import Supervisor, TabbyStartError, find_tabby, model_arg
from shared.settings import ENV_PREFIX, Settings

log = logging.getLogger("tabby_modal.inference")

KEY_ENV = ENV_PREFIX + "INFERENCE_KEY"  # in the Modal secret; the Tabby class reads it too
ROUTES = {
    "/completion": "completion",
    "/completions": "completion",
    "/chat/completions": "chat",
    "/v1/chat/completions": "chat",
    "/tokenize": "embedding",
    "/embeddings": "embedding",
}
CTX_SIZE = 4096  # Tabby's default context_size for a local model
GPU_LAYERS = 9999  # Tabby's default num_gpu_layers: every layer on the GPU
EMBEDDING_UBATCH = "4096"
HEALTH_POLL = 0.05
WAIT_POLL = 0.02
RETRY_AFTER = 10


class InferenceError(Exception):
    """A model cannot be served: the message is one line."""


@dataclass
class ModelServer:
    """One llama-server: the roles it serves, its model and, once started, its port and readiness."""

    roles: tuple[str, ...]
    model: str
    gguf: Path
    chat_template: str | None = None
    prompt_template: str | None = None
    port: int = 0
    state: str = "new"  # new, loading, ready, failed, stopped
    reason: str | None = None
    supervisor: Supervisor | None = None
    proxy: Proxy | None = None
    ready_at: float | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return "+".join(self.roles)


def model_dir(model: str, model_cache: str) -> Path:
    """The model's directory: the baked copy under the cache, or the absolute path given."""
    return Path(model_arg(model, model_cache))


def model_info(directory: Path) -> dict[str, Any]:
    """The model's `tabby.json` (prompt_template, chat_template, ...), {} when absent or unreadable."""
    try:
        info = json.loads((directory / "tabby.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def entry_gguf(directory: Path) -> Path:
    """`ggml/model-00001-of-N.gguf` (llama.cpp loads the other parts itself), as Tabby's registry.rs finds it."""
    ggml = directory / "ggml"
    try:
        found = sorted(
            p for p in ggml.iterdir() if p.name.startswith("model-00001-of-") and p.suffix == ".gguf"
        )
    except OSError:
        found = []
    if found:
        return found[0]
    legacy = ggml / "model.gguf"
    if legacy.is_file():
        return legacy
    raise InferenceError(f"no model file in {ggml} (expected model-00001-of-N.gguf): is the model baked?")


def plan_servers(settings: Settings) -> list[ModelServer]:
    """The llama-servers split mode runs: one per distinct model."""
    by_model: dict[str, list[str]] = {}
    for role, model in settings.models().items():
        by_model.setdefault(model, []).append(role)
    servers = []
    for model, roles in by_model.items():
        directory = model_dir(model, settings.model_cache)
        info = model_info(directory)
        servers.append(
            ModelServer(
                roles=tuple(roles),
                model=model,
                gguf=entry_gguf(directory),
                chat_template=info.get("chat_template") if "chat" in roles else None,
                prompt_template=info.get("prompt_template"),
            )
        )
    return servers


def llama_command(
    binary: str,
    server: ModelServer,
    port: int,
    parallelism: int,
    *,
    device: str = "cuda",
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """llama-server's arguments exactly as Tabby's supervisor.rs builds them (lines 56-90)."""
    env = os.environ if env is None else env
    embedding = "embedding" in server.roles
    cmd = [binary, "-m", str(server.gguf), "--cont-batching", "--port", str(port)]
    cmd += ["-np", str(1 if embedding else parallelism), "--ctx-size", str(CTX_SIZE)]
    if env.get("LLAMA_CPP_N_THREADS"):
        cmd += ["-t", env["LLAMA_CPP_N_THREADS"]]
    if device != "cpu":
        cmd += ["-ngl", str(GPU_LAYERS)]
    if embedding:
        cmd += [
            "--embedding",
            "--ubatch-size",
            env.get("LLAMA_CPP_EMBEDDING_N_UBATCH_SIZE") or EMBEDDING_UBATCH,
        ]
    if server.chat_template:
        cmd += ["--chat-template", server.chat_template]
    return cmd


def find_llama_server(tabby_bin: str) -> str | None:
    """As Tabby's `find_binary_name`: a `llama-server*` next to the tabby binary, else `llama-server` on PATH."""
    import shutil

    tabby = find_tabby(tabby_bin)
    if tabby:
        here = Path(tabby).resolve().parent
        for candidate in sorted(here.glob("llama-server*")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("llama-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError):
        return False


class Inference:
    """The llama-servers of one inference container, their readiness, and the front in front of them."""

    def __init__(
        self,
        settings: Settings,
        *,
        binary: str,
        key: str | None,
        servers: list[ModelServer] | None = None,
        wait: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.binary = binary
        self.key = key
        self.servers = plan_servers(settings) if servers is None else servers
        self.wait = settings.inference_wait if wait is None else wait
        base = os.environ if env is None else env
        # Our settings and the key stay out of the children's environment.
        self.env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
        self._stopping = threading.Event()
        self._app: InferenceFront | None = None

    def server_for(self, role: str) -> ModelServer | None:
        return next((s for s in self.servers if role in s.roles), None)

    def start(self) -> None:
        """Start every llama-server; each becomes ready in its own thread (requests wait for it, bounded)."""
        for server in self.servers:
            server.port = free_port()
            cmd = llama_command(
                self.binary,
                server,
                server.port,
                self.settings.inference_parallelism,
                device=self.settings.device,
                env=self.env,
            )
            server.supervisor = Supervisor(
                cmd,
                self.env,
                port=server.port,
                startup_timeout=self.settings.startup_timeout,
                log_sink=lambda line, name=server.name: log.info("[%s] %s", name, line),
            )
            server.proxy = Proxy(
                f"http://127.0.0.1:{server.port}",
                connect_timeout=self.settings.connect_timeout,
                idle_timeout=self.settings.idle_timeout,
            )
            server.state = "loading"
            try:
                server.supervisor.start()
            except TabbyStartError as err:
                server.state, server.reason = "failed", err.reason
                log.error("llama-server for %s failed to start: %s", server.name, err.reason)
                continue
            server._thread = threading.Thread(
                target=self._become_ready, args=(server,), name=f"ready-{server.name}", daemon=True
            )
            server._thread.start()

    def _become_ready(self, server: ModelServer) -> None:
        """llama-server binds before it loads: the port first, then /health until 200 (503 while loading)."""
        sup = server.supervisor
        assert sup is not None
        try:
            sup.wait_ready(cancel=self._stopping)
        except TabbyStartError as err:
            server.state, server.reason = "failed", f"llama-server for {server.name}: {err.reason}"
            log.error("%s", server.reason)
            return
        deadline = time.monotonic() + self.settings.startup_timeout
        while not self._stopping.is_set():
            if _healthy(server.port):
                server.state, server.ready_at = "ready", time.monotonic()
                log.info("%s ready on 127.0.0.1:%d (%s)", server.name, server.port, server.model)
                return
            if sup.exited() or time.monotonic() > deadline:
                why = "exited while loading" if sup.exited() else "did not load in time"
                server.state, server.reason = "failed", f"llama-server for {server.name} {why}"
                log.error("%s; its last lines:\n%s", server.reason, "\n".join(sup.tail()[-20:]))
                return
            self._stopping.wait(HEALTH_POLL)

    def ready(self) -> bool:
        return all(s.state == "ready" for s in self.servers)

    def wait_ready(self, timeout: float) -> bool:
        """Block until every model serves (True), one failed or `timeout` passed (False). For the snapshot phase."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if any(s.state == "failed" for s in self.servers):
                return False
            time.sleep(HEALTH_POLL)
        return self.ready()

    def status(self) -> dict[str, Any]:
        return {
            s.name: {"state": s.state, "model": s.model, **({"reason": s.reason} if s.reason else {})}
            for s in self.servers
        }

    def stop(self) -> None:
        self._stopping.set()
        for server in self.servers:
            if server.supervisor is not None:
                server.supervisor.stop()
            server.state = "stopped"

    def app(self) -> InferenceFront:
        if self._app is None:
            self._app = InferenceFront(self)
        return self._app


def _error_body(code: int, message: str, kind: str) -> bytes:
    """llama-server's own error shape, so a client reads ours as it reads the model's."""
    return json.dumps({"error": {"code": code, "message": message, "type": kind}}).encode()


async def _answer(send: Send, status: int, body: bytes, retry_after: int | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class InferenceFront:
    """The inference container's ASGI app: key check, routing by path, bounded wait for a loading model."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        key = inference.key or ""
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()
            await asgi.reject_websocket(scope, send, 404, "no websockets here")
        elif kind == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for server in self.inference.servers:
                    if server.proxy is not None:
                        await server.proxy.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def authorized(self, scope: Scope) -> bool:
        if self._expected is None:
            return False  # no key configured: fail closed
        got = next((v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"), b"")
        return hmac.compare_digest(got, self._expected)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") or "/"
        if path == "/health":
            ready = self.inference.ready()
            if ready:
                body = json.dumps({"status": "ok", "models": self.inference.status()}).encode()
            else:
                body = json.dumps(
                    {
                        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"},
                        "models": self.inference.status(),
                    }
                ).encode()
            await _answer(send, 200 if ready else 503, body, None if ready else RETRY_AFTER)
            return
        if not self.authorized(scope):
            client = (scope.get("client") or ("?", 0))[0]
            why = "no key is configured here" if self._expected is None else "missing or wrong key"
            log.warning("401 %s %s from %s: %s", scope.get("method"), path, client, why)
            await _answer(send, 401, _error_body(401, "Invalid API Key", "authentication_error"))
            return
        role = ROUTES.get(path)
        server = self.inference.server_for(role) if role else None
        if server is None:
            what = f"no {role} model here" if role else f"no route {path}"
            await _answer(send, 404, _error_body(404, what, "not_found_error"))
            return
        if server.state != "ready":
            problem = await self._wait_for(server)
            if problem is not None:
                await _answer(send, 503, _error_body(503, problem, "unavailable_error"), RETRY_AFTER)
                return
        assert server.proxy is not None
        await server.proxy(scope, receive, send)

    async def _wait_for(self, server: ModelServer) -> str | None:
        """Wait (bounded) for a loading model; None when it serves, else the reason for a 503."""
        deadline = time.monotonic() + self.inference.wait
        while server.state in ("new", "loading"):
            if time.monotonic() >= deadline:
                return (
                    f"the {server.name} model is still loading after {self.inference.wait:g}s "
                    "(a cold inference container); retry shortly"
                )
            await asyncio.sleep(WAIT_POLL)
        if server.state == "ready":
            return None
        return f"the {server.name} model is not available: {server.reason or server.state}"


def for_modal(settings: Settings) -> Inference:
    """The inference container's servers: the image's llama-server next to tabby, the key from the Modal secret."""
    binary = find_llama_server(settings.tabby_bin) or "/opt/tabby/bin/llama-server"
    key = settings.inference_key.get_secret_value() if settings.inference_key else None
    if not key:
        log.error("%s is not set in the Modal secret: every model request gets 401 (`make secrets`)", KEY_ENV)
    return Inference(settings, binary=binary, key=key)


# --- The Tabby side's view ------------------------------------------------------------------------------------

INFERENCE_CLASS = "Inference"


@dataclass(frozen=True)
class Endpoint:
    """Where Tabby sends its model requests in split mode, and the key it sends."""

    url: str
    key: str | None


def endpoint_from_modal(settings: Settings) -> Endpoint:
    """The inference class's web URL through Modal's client (the same app: it is deployed together with Tabby),
    and the key from the Modal secret. Raises InferenceError with one line when it cannot be found."""
    import modal

    try:
        cls = modal.Cls.from_name(
            settings.server_app, INFERENCE_CLASS, environment_name=settings.modal_environment
        )
        url = cls().web.get_web_url()
    except Exception as err:  # modal's NotFoundError, a connection error: the reason goes into Tabby's 503
        raise InferenceError(
            f"cannot look up {settings.server_app}.{INFERENCE_CLASS} through Modal ({err}); was it deployed with "
            "TABBY_MODAL_INFERENCE=split?"
        ) from None
    if not url:
        raise InferenceError(f"{settings.server_app}.{INFERENCE_CLASS}.web has no web URL")
    key = settings.inference_key.get_secret_value() if settings.inference_key else None
    if not key:
        log.error(
            "%s is not set in the Modal secret: the inference endpoint answers 401 (`make secrets`)", KEY_ENV
        )
    return Endpoint(url.rstrip("/"), key)


def split_endpoint(settings: Settings, lookup: Callable[[], Endpoint] | None) -> Endpoint | None:
    """The endpoint for this Tabby start: None in local mode; in split mode the lookup's, or InferenceError."""
    if settings.inference != "split":
        return None
    if lookup is None:
        raise InferenceError(
            "TABBY_MODAL_INFERENCE=split but no inference endpoint is known to this server (split mode runs on "
            "Modal; serve locally with TABBY_MODAL_INFERENCE=local)"
        )
    return lookup()


def split_options(settings: Settings) -> dict[str, Any]:
    """The Tabby class's resources in split mode: no GPU, its CPU and memory from the settings."""
    if settings.inference != "split":
        return {}
    return {"gpu": None, "cpu": settings.server_cpu, "memory": settings.server_memory}


# --- Modal wiring (apps/server.py) ----------------------------------------------------------------------------


def slots(settings: Settings) -> int:
    """Requests the container's llama-servers decode at once: `-np` per generation model, 1 for embeddings."""
    servers = {model for role, model in settings.models().items() if role != "embedding"}
    return settings.inference_parallelism * len(servers) + 1


def concurrency(settings: Settings) -> dict[str, int]:
    """`@modal.concurrent` for the inference class: Modal aims at one request per slot and starts another
    replica beyond that; up to twice as many are let in (they wait in llama-server's queue, not at the ingress)."""
    n = slots(settings)
    return {"max_inputs": 2 * n, "target_inputs": n}


def web_label(settings: Settings) -> str:
    return f"{settings.server_app}-inference"


def function_options(settings: Settings, *, secret: Any) -> dict[str, Any]:
    """Keyword arguments for the inference class's `app.cls(...)`: on the GPU, scaled 0..N by Modal."""
    options: dict[str, Any] = {
        "gpu": settings.gpu_spec(),
        "secrets": [secret],
        "min_containers": settings.inference_min_containers,
        "max_containers": settings.inference_max_containers,
        "scaledown_window": settings.inference_scaledown_window,
        "timeout": settings.request_timeout,
        "startup_timeout": settings.startup_timeout,
        "env": settings.container_env(),
    }
    if (
        settings.inference_gpu_snapshot
    ):  # Modal alpha: load the models once, restore GPU memory on later starts
        options["enable_memory_snapshot"] = True
        options["experimental_options"] = {"enable_gpu_snapshot": True}
    return options
