"""Split mode on Modal's own runtime (issue 20), in the Modal test box (tests/modal_box; see test_modal_box.py for
what is real there): `modal deploy -m apps.server` with TABBY_MODAL_INFERENCE=split registers both classes; the
Tabby class (no GPU) runs in Modal's real container entrypoint and finds the Inference class's web URL through
Modal's real client (ClassGet/FunctionGet against the box), writes `[model.*.http]` and starts the stand-in Tabby
without model flags; a completion sent while no inference container is up waits at the ingress, as Modal holds a
request while a container starts, and is answered once the Inference container (stand-in llama-servers in the real
entrypoint) is up; then a chat, an embedding and a cancel go through both containers.

The box's ingress routes web URLs by label here (`Box.label_web_urls`): Modal's real URLs are per host, which a box
on 127.0.0.1 cannot offer; that routing is the one stand-in on the path between the two containers.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import free_port
from tests.modal_box import Box, Container, poll, unavailable
from tests.split_parts import PROMPT_TEMPLATE, bake_models, llama_wrapper
from tests.standin_llama_server import expected_text

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

JWT_SECRET = str(uuid.uuid4())
SETUP_TOKEN = str(uuid.uuid4())
KEY = str(uuid.uuid4())
PORT = free_port()
LABEL = "tabby-server-inference"
LISTENING = re.compile(r"\[(\w+)\] main: HTTP server is listening, hostname: [\d.]+, port: (\d+)")


class Env:
    box: Box
    bindir: Path
    tabby: Container
    inference: Container | None = None
    cookie: str = ""
    first: dict[str, Any]
    tabby_env_cache: str = ""

    def url(self, path: str) -> str:
        return self.box.ingress_url + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer standin-token", "Cookie": self.cookie}

    def llama_port(self, role: str) -> int:
        assert self.inference is not None
        ports = dict(LISTENING.findall(self.inference.log()))
        return int(ports[role])


def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    async def go() -> tuple[int, Any, bytes]:
        async with aiohttp.ClientSession() as s, s.request(method, url, allow_redirects=False, **kwargs) as r:
            return r.status, r.headers, await r.read()

    return asyncio.run(go())


def llama_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/stats", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("modal-box-split")
    with Box(root) as box:
        e = Env()
        e.box, e.first = box, {}
        e.bindir = llama_wrapper(root / "bin").parent  # tabby and llama-server, as in /opt/tabby/bin
        cache = bake_models(root / "models")
        e.tabby_env_cache = str(cache)
        box.label_web_urls()
        box.plane.secret(
            "tabby-secrets",
            {
                "TABBY_WEBSERVER_JWT_TOKEN_SECRET": JWT_SECRET,
                "TABBY_MODAL_SETUP_TOKEN": SETUP_TOKEN,
                "TABBY_MODAL_INFERENCE_KEY": KEY,
            },
        )
        box.deploy_all(
            [["apps.server", "--strategy", "recreate"]],
            env={
                "TABBY_MODAL_INTERNAL_PORT": str(PORT),
                "TABBY_MODAL_PERSIST_INTERVAL": "3600",
                "TABBY_MODAL_INFERENCE": "split",
                "TABBY_MODAL_MODEL_CACHE": str(cache),
                "TABBY_MODAL_INFERENCE_MAX_CONTAINERS": "3",
            },
        )
        e.tabby = box.start_container(
            "tabby-server", "Tabby", path=[e.bindir], STANDIN_CHILD="0", STANDIN_LLAMA_START_SECONDS="0"
        )
        box.serve_web(e.tabby, "web")
        try:
            yield e
        finally:
            for c in box.containers:
                if c.proc.poll() is None:
                    c.kill()


def test_deploy_registers_both_classes(env: Env) -> None:
    plane = env.box.plane
    server = plane.app_objects[plane.apps["tabby-server"]]
    assert {"Tabby.*", "Inference.*"} <= set(server)
    tabby, inference = plane.functions[server["Tabby.*"]], plane.functions[server["Inference.*"]]
    assert not tabby.resources.gpu_config.gpu_type and tabby.resources.milli_cpu == 2000
    assert {m.mount_path for m in tabby.volume_mounts} == {"/data"}
    assert inference.resources.gpu_config.gpu_type == "L4" and not inference.volume_mounts
    assert inference.autoscaler_settings.max_containers == 3
    assert inference.autoscaler_settings.scaledown_window == 300
    assert inference.max_concurrent_inputs == 18 and inference.target_concurrent_inputs == 9
    assert set(inference.method_definitions) == {"web"}


def test_tabby_finds_the_inference_endpoint_through_modals_client(env: Env) -> None:
    status, headers, _ = fetch("GET", env.url(f"/_setup?token={SETUP_TOKEN}"))
    assert status == 303, env.tabby.log()[-3000:]
    env.cookie = headers["Set-Cookie"].split(";", 1)[0]
    log = env.tabby.log()
    endpoint = env.box.plane.web_base + LABEL
    assert f"config.toml: model.completion.http.api_endpoint = {endpoint}" in log
    assert f"config.toml: model.completion.http.prompt_template = {PROMPT_TEMPLATE}" in log
    assert "ClassGet" in env.box.plane.rpcs
    assert "--model" not in log.split("starting: ", 1)[1].splitlines()[0]


def test_completion_waits_for_a_cold_inference_container_then_is_answered(env: Env) -> None:
    result: dict[str, Any] = {}
    body = {"segments": {"prefix": "def f(x):\n    ", "suffix": "\n"}, "max_tokens": 6}

    def send() -> None:
        result["answer"] = fetch("POST", env.url("/v1/completions"), json=body, headers=env.headers())

    request = threading.Thread(target=send, daemon=True)
    request.start()
    poll(lambda: env.box.ingress.label_calls.get(LABEL), 30, what="Tabby's request to reach the ingress")
    assert not env.box.plane.running(
        env.box.plane.app_objects[env.box.plane.apps["tabby-server"]]["Inference.*"]
    )
    env.inference = env.box.start_container(
        "tabby-server", "Inference", path=[env.bindir], STANDIN_LLAMA_START_SECONDS="0"
    )
    env.box.serve_web(env.inference, "web", label=LABEL)
    request.join(120)
    status, _, raw = result["answer"]
    assert status == 200, raw
    prompt = PROMPT_TEMPLATE.replace("{prefix}", body["segments"]["prefix"]).replace("{suffix}", "\n")
    assert json.loads(raw)["choices"][0]["text"] == expected_text(prompt, 6), env.inference.log()[-3000:]


def test_chat_embedding_and_cancel_through_both_containers(env: Env) -> None:
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    status, _, raw = fetch("POST", env.url("/v1/chat/completions"), json=chat, headers=env.headers())
    assert status == 200 and raw.decode().rstrip().endswith("data: [DONE]")
    status, _, raw = fetch(
        "POST", env.url("/debug/embed"), json={"content": "a b c d"}, headers=env.headers()
    )
    assert status == 200 and len(json.loads(raw)["embedding"]) == 16

    port = env.llama_port("chat")

    async def cancel() -> None:
        long = {**chat, "max_tokens": 3000, "standin_token_ms": 10}
        async with aiohttp.ClientSession() as s:
            r = await s.post(env.url("/v1/chat/completions"), json=long, headers=env.headers())
            assert r.status == 200
            await r.content.readline()
            r.close()

    asyncio.run(cancel())
    poll(lambda: llama_stats(port)["disconnects"] == 1, 30, what="the cancel to reach the model")
    stats = llama_stats(port)
    assert stats["tokens_after_disconnect"] == 0 and stats["tokens_generated"] < 3000


def test_a_wrong_key_is_a_401_at_the_inference_container(env: Env) -> None:
    status, _, raw = fetch(
        "POST",
        env.box.plane.web_base + LABEL + "/completion",
        json={"prompt": "x", "stream": True},
        headers={"Authorization": "Bearer wrong"},
    )
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    assert env.inference is not None and "401 POST /completion" in env.inference.log()


# What `tabby-modal warm`, `cold`, `status` and `doctor` do on your machine, with Modal's real client talking to the
# box: one process for all of them (each process pays for importing modal).
OPERATIONS = """
import json
from shared.operations import doctor, status, warm
from shared.settings import load_settings

s = load_settings(env_file=None)
out = {"warm": warm.set_min_containers(s, 1)}
out["after_warm"] = json.loads(input())
out["cold"] = warm.set_min_containers(s, 0)
out["status"] = status.server_info(s)
out["doctor"] = doctor.inference_check(s)
out["doctor_missing"] = doctor.inference_check(s.model_copy(update={"server_app": "no-such-app"}))
print(json.dumps(out))
"""


def test_warm_cold_status_and_doctor_cover_both_classes(env: Env) -> None:
    import subprocess
    import sys

    plane = env.box.plane
    server = plane.app_objects[plane.apps["tabby-server"]]
    tabby_id, inference_id = server["Tabby.*"], server["Inference.*"]
    proc = subprocess.Popen(
        [sys.executable, "-c", OPERATIONS],
        env=env.box.client_env(TABBY_MODAL_INFERENCE="split", TABBY_MODAL_INFERENCE_MAX_CONTAINERS="3"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    # After `warm`, before `cold`: both classes' overrides as Modal's server keeps them.
    poll(lambda: inference_id in plane.autoscaler, 60, what="warm to reach the Inference class")
    warm_seen = {
        "tabby": plane.autoscaler[tabby_id].min_containers,
        "inference": plane.autoscaler[inference_id].min_containers,
    }
    out, err = proc.communicate(json.dumps(warm_seen) + "\n", timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["warm"]["min_containers"] == 1 and result["warm"]["inference_min_containers"] == 1
    assert result["after_warm"] == {"tabby": 1, "inference": 1}
    assert plane.autoscaler[tabby_id].min_containers == 0
    assert plane.autoscaler[inference_id].min_containers == 0
    inference = result["status"]["inference"]
    assert inference["url"] == plane.web_base + LABEL and "containers" in inference
    assert result["doctor"]["ok"] and result["doctor"]["detail"].endswith(plane.web_base + LABEL)
    missing = result["doctor_missing"]
    assert not missing["ok"] and "has no Inference class" in missing["detail"], missing


DEPLOY = """
from shared.operations.upgrade import ModalTarget
from shared.settings import load_settings

s = load_settings(env_file=None)
ModalTarget(s, server_info=dict, containers=lambda: 0, probe=lambda url: 200).deploy(s.tabby_image)
"""


def test_a_toolkit_deploy_puts_the_warm_hours_back_at_once(env: Env) -> None:
    """A deploy resets update_autoscaler's override (the box does as Modal does); the upgrade's deploy (the same
    step `make deploy-server` runs) sets both classes to what the warm hours say right after it."""
    import subprocess
    import sys

    plane = env.box.plane
    server = plane.app_objects[plane.apps["tabby-server"]]
    settings_env = {
        "TABBY_MODAL_INTERNAL_PORT": str(PORT),
        "TABBY_MODAL_PERSIST_INTERVAL": "3600",
        "TABBY_MODAL_INFERENCE": "split",
        "TABBY_MODAL_MODEL_CACHE": env.tabby_env_cache,
        "TABBY_MODAL_INFERENCE_MAX_CONTAINERS": "3",
        "TABBY_MODAL_WARM_HOURS": "Mon-Sun 00:00-24:00 UTC",  # always inside the hours
    }
    proc = subprocess.run(
        [sys.executable, "-c", DEPLOY],
        env=env.box.client_env(**settings_env),
        cwd=env.box.root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert plane.autoscaler[server["Tabby.*"]].min_containers == 1
    assert plane.autoscaler[server["Inference.*"]].min_containers == 1


def test_gpu_snapshot_phases_run_in_order(env: Env) -> None:
    """TABBY_MODAL_INFERENCE_GPU_SNAPSHOT=true: Modal's entrypoint runs `@modal.enter(snap=True)` (start the
    llama-servers and wait until every model is loaded), then asks for the snapshot, then is restored and serves.
    The box has no GPU: the GPU memory part (gVisor's) is not run; its effect is unmeasured until it runs on one."""
    env.box.deploy_all(
        [["apps.server", "--strategy", "recreate"]],
        env={
            "TABBY_MODAL_INTERNAL_PORT": str(PORT),
            "TABBY_MODAL_PERSIST_INTERVAL": "3600",
            "TABBY_MODAL_INFERENCE": "split",
            "TABBY_MODAL_MODEL_CACHE": env.tabby_env_cache,
            "TABBY_MODAL_INFERENCE_GPU_SNAPSHOT": "true",
        },
    )
    plane = env.box.plane
    fdef = plane.functions[plane.app_objects[plane.apps["tabby-server"]]["Inference.*"]]
    assert fdef.checkpointing_enabled and fdef._experimental_enable_gpu_snapshot
    if env.inference is not None:
        env.inference.stop()
    # Each model takes a second to load: a snapshot asked for before the models are loaded would show here.
    c = env.box.start_container(
        "tabby-server",
        "Inference",
        path=[env.bindir],
        STANDIN_LLAMA_START_SECONDS="0",
        STANDIN_LLAMA_LOAD_SECONDS="1",
    )
    env.box.serve_web(c, "web", label=LABEL)
    poll(lambda: c.events("ContainerCheckpoint"), 60, what="the snapshot request")
    at_checkpoint = c.log()
    assert len(re.findall(r"inference: [\w+]+ ready on 127\.0\.0\.1:\d+ \(", at_checkpoint)) == 3, (
        at_checkpoint[-3000:]
    )
    status, _, raw = fetch("GET", plane.web_base + LABEL + "/health")
    assert status == 200, raw  # restored with every model loaded: nothing loads after the restore
    checkpoint_at = c.events("ContainerCheckpoint")[0][2]
    inputs = [e for e in c.events() if e[0] == "FunctionGetInputs"]
    assert inputs and all(e[2] > checkpoint_at for e in inputs)
    status, _, raw = fetch(
        "POST",
        plane.web_base + LABEL + "/completion",
        json={"prompt": "x", "n_predict": 3},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert status == 200 and json.loads(raw)["content"] == expected_text("x", 3)
    c.stop()
