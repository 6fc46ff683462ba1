"""Our three apps on Modal's own runtime: deployed by Modal's real client, run in Modal's real container
entrypoint, against the Modal test box (tests/modal_box: a local stand-in for Modal's control plane and web
ingress; see its docstring for what is real and what is stood in for). Pinned to modal 1.6.4, the version in
uv.lock: the box speaks that version's gRPC API, and the module is skipped with the reason on any other version
(or without root and `unshare`, which give each container its own /data, /backups and local disk).

One deploy and a sequence of containers per module, in order: the server's first container (startup, owner claim,
GET, SSE, both disconnect paths, websocket, cookies, bodies), its stop (exit hook, then the Volume commits), a
second server container that hydrates what the first persisted, and the maintenance functions (snapshot, restore
and reset, with the real server-running lookup) against it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import free_port, port_open, tabby_wrapper
from tests.modal_box import Box, Container, FunctionFailed, poll, unavailable

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

JWT_SECRET = str(uuid.uuid4())
SETUP_TOKEN = str(uuid.uuid4())
PORT = free_port()  # Tabby's internal port in the containers (they share the host's network)
DATA = "tabby-data"
STANDIN = {"STANDIN_CHILD": "0", "STANDIN_LOAD_SECONDS": "1"}  # "loading models" for a second before the bind


class Env:
    """What the module's tests share: the box, the running server container, the owner's credentials."""

    box: Box
    bindir: Path
    server: Container | None = None
    first: dict[str, Any]
    cookie: str = ""
    token: str = ""

    def url(self, path: str) -> str:
        return self.box.ingress_url + path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start_server(self) -> Container:
        if self.server is not None and self.server.proc.poll() is None:
            self.server.stop()  # max_containers=1: one server container at a time
        c = self.box.start_container("tabby-server", "Tabby", path=[self.bindir], **STANDIN)
        self.box.serve_web(c, "web")
        self.server = c
        return c

    def standin_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/debug/stats", timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("modal-box")
    with Box(root) as box:
        e = Env()
        e.box, e.first = box, {}
        e.bindir = tabby_wrapper(root / "bin").parent
        # `make secrets` creates this secret; the deploys read settings from their env, as on your machine.
        box.plane.secret(
            "tabby-secrets",
            {"TABBY_WEBSERVER_JWT_TOKEN_SECRET": JWT_SECRET, "TABBY_MODAL_SETUP_TOKEN": SETUP_TOKEN},
        )
        box.deploy_all(
            [["apps.warmer"], ["apps.server", "--strategy", "recreate"], ["apps.maintenance"]],
            env={"TABBY_MODAL_INTERNAL_PORT": str(PORT), "TABBY_MODAL_PERSIST_INTERVAL": "3600"},
        )
        # Startup: the first request is queued before the container even starts; Modal holds it until
        # `@modal.enter` (hydrate, start Tabby, wait for its port) has returned, so it must reach a ready Tabby.
        e.first["listening_before"] = port_open(PORT)
        result: dict[str, Any] = {}
        request = threading.Thread(target=lambda: result.update(claim(e)), daemon=True)
        request.start()
        poll(lambda: e.box.ingress.calls_seen, 10, what="the ingress to queue the first request")
        e.start_server()
        request.join(120)
        e.first.update(result)
        try:
            yield e
        finally:
            for c in box.containers:
                if c.proc.poll() is None:
                    c.kill()


def claim(e: Env) -> dict[str, Any]:
    """GET /_setup?token=...: the owner-claim guard answers 303 with its cookie (once Tabby is up)."""
    req = urllib.request.Request(e.url(f"/_setup?token={SETUP_TOKEN}"))
    opener = urllib.request.build_opener(NoRedirect)
    try:
        r = opener.open(req, timeout=120)
        return {"status": r.status, "headers": r.headers}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "headers": err.headers, "body": err.read().decode(errors="replace")}


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    """One request with a real aiohttp client: (status, headers, body)."""

    async def go() -> tuple[int, Any, bytes]:
        async with aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as r:
            return r.status, r.headers, await r.read()

    return run(go())


# --- deploy ---------------------------------------------------------------------------------------------------


def test_deploy_registers_the_three_apps(env: Env) -> None:
    plane = env.box.plane
    assert set(plane.apps) == {"tabby-warmer", "tabby-server", "tabby-maintenance"}
    server = plane.app_objects[plane.apps["tabby-server"]]
    assert set(server) == {"Tabby", "Tabby.*"}
    service = plane.functions[server["Tabby.*"]]
    assert service.is_class and set(service.method_definitions) == {"web"}
    assert service.max_concurrent_inputs == 10
    assert {m.mount_path for m in service.volume_mounts} == {"/data"}
    maintenance = plane.app_objects[plane.apps["tabby-maintenance"]]
    assert {"snapshot", "restore", "reset", "scheduled_backup"} <= set(maintenance)
    mounts = {m.mount_path for m in plane.functions[maintenance["restore"]].volume_mounts}
    assert mounts == {"/data", "/backups"}
    assert plane.functions[maintenance["scheduled_backup"]].HasField("schedule")
    assert "check_models" in plane.app_objects[plane.apps["tabby-warmer"]]


# --- the server's first container -----------------------------------------------------------------------------


def test_startup_first_input_only_after_enter(env: Env) -> None:
    # Queued before the container started, and Tabby was not listening then; the answer still comes from the
    # ready server (the guard's 303), never the runtime's 503 "Tabby is starting".
    assert not env.first["listening_before"]
    assert env.first["status"] == 303, env.first
    cookie = env.first["headers"]["Set-Cookie"]
    env.cookie = cookie.split(";", 1)[0]
    events = env.server.events("FunctionGetInputs", "Input")
    assert events[0][0] == "FunctionGetInputs"
    assert "Listening at" in env.server.log()


def test_register_owner_then_get(env: Env) -> None:
    status, _, body = fetch(
        "POST",
        env.url("/debug/register"),
        json={"email": "owner@example.com"},
        headers={"Cookie": env.cookie},
    )
    assert status == 200
    env.token = json.loads(body)["auth_token"]
    status, _, body = fetch("GET", env.url("/v1/health"), headers={**env.auth(), "Cookie": env.cookie})
    assert status == 200
    assert json.loads(body)["model"] == "TabbyML/StarCoder-1B"
    # The guard notices the owner within its recheck interval and then lets everyone through.
    poll(
        lambda: fetch("GET", env.url("/v1/health"), headers=env.auth())[0] == 200,
        30,
        what="the owner-claim guard to open",
    )


def test_sse_chat(env: Env) -> None:
    status, headers, body = fetch(
        "POST", env.url("/v1/chat/completions"), json={"events": 5}, headers=env.auth()
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in body.decode().splitlines() if line.strip()]
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(x[6:])["choices"][0]["delta"]["content"] for x in lines[:-1]] == [
        f"tok{i} " for i in range(5)
    ]


@pytest.mark.parametrize("path", ["message", "cancel"])
def test_client_disconnect_mid_stream_reaches_tabby(env: Env, path: str) -> None:
    """Both ways Modal tells the app a client left: an `http.disconnect` message, or the input cancelled (the
    task is cancelled). Either way Tabby's stream must end (the proxy closes the upstream request)."""
    before = env.standin_stats()["chat_cancelled"]

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                env.url("/v1/chat/completions"),
                json={"events": 100000, "interval_ms": 20},
                headers={**env.auth(), "x-box-disconnect": path},
            )
            assert r.status == 200
            await r.content.readline()  # the first event arrived: the stream is live
            r.close()  # the client goes away mid-stream

    run(go())
    poll(lambda: env.standin_stats()["chat_cancelled"] > before, 30, what="Tabby to see the stream cancelled")
    input_id, taken = env.box.ingress.disconnects[-1]
    assert taken == path
    if path == "cancel":
        assert ("CancelInput", input_id) in [(e[0], e[1]) for e in env.server.events("CancelInput")]
        # Modal's asgi wrapper ends the cancelled input's generator quietly: the input completes.
        poll(lambda: env.box.output_status(input_id), 30, what="the cancelled input to finish")


def test_websocket_subprotocol_and_close_code(env: Env) -> None:
    async def go() -> tuple[str | None, str, int | None, str]:
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(
                env.url("/subscriptions"), protocols=("graphql-transport-ws",), headers=env.auth()
            ) as ws,
        ):
            await ws.send_str(json.dumps({"type": "connection_init"}))
            ack = await ws.receive_str()
            await ws.send_str("close:4001:bye")
            msg = await ws.receive()
            return ws.protocol, ack, ws.close_code, msg.extra or ""

    protocol, ack, code, reason = run(go())
    assert protocol == "graphql-transport-ws"
    assert json.loads(ack) == {"type": "connection_ack"}
    assert code == 4001 and reason == "bye"
    assert [4001, "/subscriptions"] in env.standin_stats()["ws_closes"]


def test_two_set_cookie_headers(env: Env) -> None:
    status, headers, _ = fetch("GET", env.url("/debug/cookies"))
    assert status == 200
    assert headers.getall("Set-Cookie") == [
        "a=1; Path=/; HttpOnly",
        "b=2; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
    ]


def echo(env: Env, path: str, body: bytes, **headers: str) -> dict[str, Any]:
    status, _, got = fetch("POST", env.url(path), data=body, headers=headers)
    assert status == 200, got
    return json.loads(got)


def test_body_with_content_length(env: Env) -> None:
    body = bytes(range(256)) * 400
    got = echo(env, "/debug/echo", body)
    assert got["body_bytes"] == len(body)


def test_body_without_length_headers(env: Env) -> None:
    """HTTP/2 through Modal's ingress: the scope has neither Content-Length nor Transfer-Encoding."""
    body = bytes(range(256)) * 400
    got = echo(env, "/debug/echo", body, **{"x-box-no-length": "1"})
    assert got["body_bytes"] == len(body)


def test_path_without_raw_path_is_requoted(env: Env) -> None:
    """Modal's scope has no `raw_path`: the proxy must re-quote the decoded `path`, not send it as it is.
    (An escaped slash, %2F, cannot come back from a decoded path; this one can.)"""
    got = echo(env, "/debug/echo/a%20b%3Fc?q=1%202", b"x")
    assert got["raw_path"] == "/debug/echo/a%20b%3Fc?q=1%202"


# --- stop, then a second container ----------------------------------------------------------------------------


def test_exit_hook_then_volume_commit(env: Env) -> None:
    c = env.server
    assert c is not None
    assert c.stop() == 0
    log = c.log()
    assert "server: stopped" in log
    # After the kill switch: our exit hook persists and commits (data.commit), then Modal commits every mounted
    # Volume once more, after the hook.
    events = c.events("Input", "VolumeCommit")
    kill = next(i for i, e in enumerate(events) if e[:2] == ("Input", "kill_switch"))
    commits = [e for e in events[kill:] if e[0] == "VolumeCommit"]
    assert [e[1] for e in commits] == [DATA, DATA]
    assert not port_open(PORT)  # Tabby was stopped by the hook
    committed = env.box.plane.volume(DATA).committed
    assert any(committed.rglob("*db.sqlite*")), sorted(p.name for p in committed.rglob("*"))


def test_second_container_hydrates_what_the_first_persisted(env: Env) -> None:
    env.start_server()
    # No cookie: the guard is off because the owner registered in the first container is in the DB.
    status, _, body = fetch("GET", env.url("/v1/health"), headers=env.auth())
    assert status == 200, body
    assert "hydrated /var/lib/tabby from /data" in env.server.log()


# --- maintenance, with the server running and then stopped ----------------------------------------------------


def test_server_running_lookup_in_a_maintenance_container(env: Env) -> None:
    """restore refuses while the server runs, through the real lookup (Cls.from_name + the web method's
    stats); then the server stops and the same restore goes through; reset too."""
    box = env.box
    snapper = box.start_container("tabby-maintenance", "snapshot")
    snap = snapper.call("", label="box")
    snapper.stop()
    snap_id = snap.get("id") or snap.get("snapshot")
    assert snap_id, snap

    restorer = box.start_container("tabby-maintenance", "restore")
    with pytest.raises(FunctionFailed, match=r"while the server app has 1 running container"):
        restorer.call("", snapshot=snap_id, confirm=DATA)
    assert env.server is not None and env.server.stop() == 0
    restored = restorer.call("", snapshot=snap_id, confirm=DATA)
    assert restored, restored
    restorer.stop()

    resetter = box.start_container("tabby-maintenance", "reset")
    resetter.call("", scope="auth", confirm=DATA)
    resetter.stop()

    # A server started after the reset has no owner again: the guard locks it.
    env.start_server()
    assert fetch("GET", env.url("/v1/health"), headers=env.auth())[0] == 403
    env.server.stop()


def test_server_containers_lookup_from_a_client(env: Env) -> None:
    """The lookup as `tabby-modal` on your machine runs it: 0 for a deployed, idle server, 0 for no app."""
    code = (
        "from shared.operations.maintenance import server_containers\n"
        "from shared.settings import load_settings\n"
        "print(server_containers(load_settings())(), server_containers(load_settings(server_app='nope'))())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env.box.client_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0"]


def test_jwt_secret_not_a_uuid_is_refused_at_start(env: Env) -> None:
    """Tabby checks the JWT secret only at the first login and then exits; the container must say so at start."""
    secret = env.box.plane.secrets[env.box.plane.named_secrets["tabby-secrets"]]
    secret["TABBY_WEBSERVER_JWT_TOKEN_SECRET"] = "not-a-uuid"  # as `modal secret create --force` would
    try:
        c = env.start_server()
        status, _, body = fetch("GET", env.url("/v1/health"), headers=env.auth())
        text = body.decode()
        c.stop()
    finally:
        secret["TABBY_WEBSERVER_JWT_TOKEN_SECRET"] = JWT_SECRET
    assert status == 503 and "TABBY_WEBSERVER_JWT_TOKEN_SECRET" in text, (status, text)
    assert "TABBY_WEBSERVER_JWT_TOKEN_SECRET" in c.log()


def test_tabby_crashing_past_the_restart_limit_exits_the_container(env: Env) -> None:
    """Tabby crashes while serving more often than TABBY_MODAL_RESTART_LIMIT allows: the runtime persists and
    SIGINTs its own process, as Modal's runtime does to shut a container down from inside; the exit hook and the
    Volume commits run and the container's process ends, so Modal starts a fresh one on the next request."""
    crashing = {**STANDIN, "STANDIN_EXIT_AFTER": "0.3", "TABBY_MODAL_RESTART_LIMIT": "1"}
    if env.server is not None and env.server.proc.poll() is None:
        env.server.stop()  # max_containers=1
    c = env.box.start_container("tabby-server", "Tabby", path=[env.bindir], **crashing)
    env.server = c
    code = c.wait(60)
    log = c.log()
    assert "tabby exited with code 7 while serving" in log and "restarting tabby in" in log
    assert "giving up on tabby: tabby crashed 2 times within 600s" in log
    assert "exiting the container so that Modal starts a fresh one" in log
    assert code == 0 and "server: stopped" in log  # the exit hook ran: a clean end, not os._exit
    assert [e[1] for e in c.events("VolumeCommit")][-2:] == [DATA, DATA]  # our hook's commit, then Modal's
    assert not port_open(PORT)
