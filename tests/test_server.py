"""The runtime composition: hydrate -> start Tabby -> serve -> persist every N s -> stop, persist, commit."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serving.server import TabbyServer
from shared.serving.supervisor import group_members
from shared.settings import load_settings
from shared.state import mirror
from tests.harness import TOKEN, free_port, mirrored_bytes, poll, serve_asgi, tabby_wrapper
from tests.standin_tabby import migrate, register_user

SETUP = "6f1c1b7e-3a52-4d0e-9a55-2f8d0c6c3c11"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def users(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT email FROM users ORDER BY id")]
    finally:
        conn.close()


def seed_data_dir(tmp: Path, data: Path, emails: list[str]) -> None:
    """A data dir as a previous server left it: a persisted root whose DB has these users."""
    root = tmp / "seed-root"
    (root / "ee").mkdir(parents=True)
    conn = sqlite3.connect(root / "ee/db.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn)  # Tabby 0.32's tables and migration history
    for email in emails:
        register_user(conn, email)  # the first one is the owner (id 1, admin)
    conn.close()
    (root / "events").mkdir()
    (root / "events/2026-01-01.json").write_text('{"old": true}\n')
    mirror.persist(root, data)


class Harness:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> None:
        for key, value in overrides.pop("standin_env", {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("STANDIN_CHILD_PIDFILE", str(tmp / "child.pid"))
        self.settings = load_settings(
            env_file=None,
            internal_port=free_port(),
            model_cache=str(tmp / "models"),
            device="cpu",
            persist_interval=overrides.pop("persist_interval", 3600),
            startup_timeout=overrides.pop("startup_timeout", 20),
        )
        self.data = tmp / "data"
        self.live = tmp / "live"
        self.commits: list[float] = []
        self.server = TabbyServer(
            self.settings,
            data_dir=self.data,
            live_root=self.live,
            tabby_bin=str(tabby_wrapper(tmp / "bin")),
            jwt_secret="00000000-0000-4000-8000-000000000000",
            setup_token=SETUP,
            commit=lambda: self.commits.append(time.monotonic()),
            grace=2.0,
            **overrides,
        )

    def request(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
        async def go():
            async with (
                serve_asgi(self.server.app()) as url,
                aiohttp.ClientSession() as c,
                c.request(method, url + path, **kw) as r,
            ):
                body = await r.json() if r.content_type == "application/json" else await r.text()
                return r.status, dict(r.headers), body

        return asyncio.run(go())


@pytest.fixture
def harness(tmp_path, monkeypatch, no_modal_env):
    made: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        h = Harness(tmp_path, monkeypatch, **overrides)
        made.append(h)
        return h

    yield make
    for h in made:
        h.server.stop()


def test_hydrate_start_serve_then_persist_and_commit_on_stop(tmp_path, harness):
    h = harness()
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    assert h.server.start() is True
    assert h.server.state == "ready"
    # Tabby runs on the hydrated root: its DB holds the persisted owner, so the guard is open.
    assert users(h.live / "ee/db.sqlite") == ["owner@example.com"]
    assert (h.live / "events/2026-01-01.json").exists()
    status, _, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 200 and body["device"] == "cpu"
    status, _, _ = h.request("POST", "/debug/register", json={"email": "second@example.com"})
    assert status == 200
    assert h.commits == []  # interval is an hour: nothing persisted yet
    result = h.server.stop()
    assert result is not None and result["wrote_manifest"] and result["committed"]
    assert len(h.commits) == 1
    assert h.server.state == "stopped"
    assert h.server.supervisor.exited()
    # The data dir now has the new user, checked through a fresh hydrate elsewhere.
    again = tmp_path / "again"
    mirror.hydrate(h.data, again)
    assert users(again / "ee/db.sqlite") == ["owner@example.com", "second@example.com"]
    assert h.server.stop() is result  # idempotent


def test_persists_every_interval_with_a_commit_each_time(tmp_path, harness):
    h = harness(persist_interval=1)
    assert h.server.start()
    started = time.monotonic()
    poll(lambda: len(h.commits) >= 2, 6, what="two periodic persists")
    assert h.commits[0] - started >= 0.9  # not before the first interval
    assert h.server.persist_count >= 2
    assert (h.data / mirror.MANIFEST).exists()
    h.server.stop()
    assert len(h.commits) >= 3  # plus the one at stop


def test_fresh_instance_is_locked_by_the_guard_until_claimed(tmp_path, harness):
    h = harness()
    assert h.server.start()
    status, _, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 403 and "/_setup?token=" in body["error"]


def test_maintenance_lock_refuses_to_start_with_503(tmp_path, harness):
    reason = ["restore of 20260101T000000Z by alice"]
    h = harness(maintenance_check=lambda: reason[0], maintenance_recheck=0.05)
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    before = mirror.load_manifest(h.data)
    assert h.server.start() is False
    assert h.server.state == "maintenance" and h.server.supervisor is None
    assert not h.live.exists()  # nothing hydrated while maintenance holds the data
    status, headers, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 503
    assert headers["Retry-After"] == "60"
    assert "maintenance in progress" in body["error"] and reason[0] in body["error"]
    # When the lock goes, the next request after the recheck interval starts Tabby.
    reason[0] = None
    poll(lambda: (h.server.gate(), h.server.state == "ready")[1], 15, what="start after maintenance")
    status, _, _ = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 200
    h.server.stop()
    assert mirror.load_manifest(h.data).seq == before.seq + 1


def test_maintenance_at_stop_never_persists_an_unhydrated_root(tmp_path, harness):
    h = harness(maintenance_check=lambda: "reset by bob", maintenance_recheck=3600)
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    before = (h.data / mirror.MANIFEST).read_bytes()
    assert h.server.start() is False
    assert h.server.stop() is None
    assert (h.data / mirror.MANIFEST).read_bytes() == before
    assert h.commits == []


def test_503_while_starting_then_serves(tmp_path, harness):
    h = harness(standin_env={"STANDIN_LOAD_SECONDS": "1.0"})
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    h.server.start_in_background()
    poll(lambda: h.server.state == "starting", 10, what="starting")
    status, headers, body = h.request("POST", "/v1/completions", json={}, headers=AUTH)
    assert status == 503 and headers["Retry-After"] == "10"
    assert "starting" in body["error"]
    poll(lambda: h.server.state == "ready", 15, what="ready")
    status, _, body = h.request(
        "POST", "/v1/completions", json={"segments": {"prefix": "def f():"}}, headers=AUTH
    )
    assert status == 200 and body["choices"]


def test_start_failure_is_served_as_503_not_raised(tmp_path, harness):
    h = harness(standin_env={"STANDIN_CRASH_AT_START": "9"})
    assert h.server.start() is False
    assert h.server.state == "failed"
    status, _, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 503 and "exited with code 9" in body["error"]
    h.server.stop()
    assert h.server.state == "stopped"


def test_hydrate_failure_keeps_the_data_dir_untouched(tmp_path, harness):
    h = harness()
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    db = h.data / "ee/db.sqlite"
    db.write_bytes(b"x" * db.stat().st_size)  # no longer matches its manifest
    before = {p: p.read_bytes() for p in h.data.rglob("*") if p.is_file()}
    assert h.server.start() is False
    assert h.server.state == "failed" and "hydrating" in h.server.reason
    assert h.server.supervisor is None
    status, _, body = h.request("GET", "/", headers=AUTH)
    assert status == 503 and "hydrating" in body["error"]
    h.server.stop()
    assert {p: p.read_bytes() for p in h.data.rglob("*") if p.is_file()} == before


def test_tabby_crash_while_serving_is_restarted_after_a_persist(tmp_path, harness, caplog):
    h = harness()
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    assert h.server.start()
    first = h.server.supervisor
    h.request("POST", "/debug/register", json={"email": "second@example.com"})
    with pytest.raises(aiohttp.ClientPayloadError):  # the stream in flight is cut, visibly
        h.request("POST", "/v1/chat/completions", json={"events": 3, "crash_after": 1}, headers=AUTH)
    crashed = time.monotonic()
    status, headers, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 503 and headers["Retry-After"] == "10"
    assert "restarting" in body["error"] and "failed to start" not in body["error"]
    poll(lambda: h.request("GET", "/v1/health", headers=AUTH)[0] == 200, 20, 0.01, "a 200 after the restart")
    print(f"\ntabby crash -> next 200: {time.monotonic() - crashed:.2f}s")
    assert h.server.supervisor is not first and first.exited() and h.server.state == "ready"
    assert list(h.server.restarts) and len(h.commits) == 1  # persisted (and committed) before the restart
    assert users(h.data / "ee/db.sqlite") == ["owner@example.com", "second@example.com"]
    assert "tabby exited with code 3 while serving; its last lines:" in caplog.text
    assert "| llama-server: listening (stand-in)" in caplog.text  # the tail of Tabby's own log


def test_tabby_crashing_past_the_restart_limit_gives_up(tmp_path, harness):
    given_up: list[str] = []
    h = harness(on_give_up=given_up.append, restart_backoff=0.05)
    h.server.settings = h.settings.model_copy(update={"restart_limit": 1, "restart_window": 600})
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    assert h.server.start()
    for _ in range(2):
        poll(lambda: h.server.state == "ready", 20, 0.01, "serving")
        with pytest.raises(aiohttp.ClientPayloadError):
            h.request("POST", "/v1/chat/completions", json={"events": 3, "crash_after": 1}, headers=AUTH)
    poll(lambda: given_up, 10, 0.01, "the give-up hook")
    assert "crashed 2 times within 600s" in given_up[0] and "TABBY_MODAL_RESTART_LIMIT=1" in given_up[0]
    assert h.server.state == "gave_up" and len(h.commits) == 2  # persisted before each restart and at the end
    status, headers, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 503 and "Retry-After" not in headers and "the server exits" in body["error"]


def test_stop_while_starting_cancels_the_start(tmp_path, harness):
    h = harness(standin_env={"STANDIN_HANG": "1"})
    h.server.start_in_background()
    pidfile = tmp_path / "child.pid"
    child = int(poll(lambda: h.server.state == "starting" and pidfile.exists() and pidfile.read_text(), 10))
    started = time.monotonic()
    h.server.stop()
    assert time.monotonic() - started < 5
    assert h.server.state == "stopped"
    assert not group_members(h.server.supervisor.pid)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] in "ZX"  # gone, or a zombie


def test_a_failing_maintenance_check_fails_closed_then_recovers(tmp_path, harness):
    broken = [True]

    def check() -> str | None:
        if broken[0]:
            raise ConnectionError("modal.Dict unreachable")
        return None

    h = harness(maintenance_check=check, maintenance_recheck=0.05)
    assert h.server.start() is False
    status, _, body = h.request("GET", "/")
    assert status == 503 and "could not be checked" in body["error"] and "unreachable" in body["error"]
    broken[0] = False
    poll(lambda: (h.server.gate(), h.server.state == "ready")[1], 15, what="start once the check works")


# --- config.toml and the JWT secret, checked before Tabby starts (issue 10, items 2 and 6) -------------------


def fetch_json(url: str) -> Any:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_config_toml_reaches_tabby_and_the_users_part_survives(tmp_path, harness):
    h = harness()
    baked = Path(h.settings.model_cache) / "TabbyML/Nomic-Embed-Text"
    (baked / "ggml").mkdir(parents=True)
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    user = "[server]\ncompletion_timeout = 60\n"
    (tmp_path / "seed-root/config.toml").write_text(user)  # the user's own file, in the persisted root
    mirror.persist(tmp_path / "seed-root", h.data)
    assert h.server.start()
    got = fetch_json(f"http://127.0.0.1:{h.settings.internal_port}/debug/config")
    assert got["embedding_model_id"] == str(baked)  # a local path: no registry lookup at start
    assert got["embedding_enabled"] == "yes"
    assert got["completion_model_id"] == "TabbyML/StarCoder-1B"  # the flag (not baked here)
    h.server.stop()
    persisted = mirrored_bytes(h.data, "config.toml").decode()
    assert persisted.startswith(user) and str(baked) in persisted


def test_invalid_config_toml_is_a_503_and_tabby_never_starts(tmp_path, harness):
    h = harness()
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    (tmp_path / "seed-root/config.toml").write_text("[model\n")
    mirror.persist(tmp_path / "seed-root", h.data)
    assert h.server.start() is False
    assert h.server.supervisor is None
    status, _, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 503 and "config.toml is not valid TOML" in body["error"]


@pytest.mark.parametrize("secret", ["not-a-uuid", "", "0000000-0000-4000-8000-000000000000"])
def test_jwt_secret_not_a_uuid_is_refused_at_start(tmp_path, harness, monkeypatch, caplog, secret):
    h = harness()
    h.server.jwt_secret = None  # from the environment, as on Modal (the Modal secret)
    monkeypatch.setenv("TABBY_WEBSERVER_JWT_TOKEN_SECRET", secret)
    with caplog.at_level("ERROR", logger="tabby_modal.server"):
        assert h.server.start() is False
    assert h.server.supervisor is None and not h.live.exists()  # neither Tabby nor a hydrate
    status, headers, body = h.request("GET", "/v1/health", headers=AUTH)
    assert status == 503 and "Retry-After" not in headers
    assert "TABBY_WEBSERVER_JWT_TOKEN_SECRET" in body["error"] and "\n" not in body["error"]
    assert secret == "" or secret not in body["error"]  # the secret itself is never shown
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "TABBY_WEBSERVER_JWT_TOKEN_SECRET" in lines[0]


def test_jwt_secret_forms_tabby_accepts():
    from shared.serving.jwt_secret import jwt_secret_problem

    u = "67e55044-10b1-426f-9247-bb680e5fe0c8"
    for ok in (None, u, u.upper(), u.replace("-", ""), "{" + u + "}", "urn:uuid:" + u):
        assert jwt_secret_problem(ok) is None, ok
    for bad in ("", " " + u, u + "\n", u[:-1], "6-7e55044" + u[9:], "not-a-uuid"):
        assert jwt_secret_problem(bad), bad


# --- the exit budget (issue 10, item 5): Modal gives the exit hook ~30 s -----------------------------------------


def test_stop_kills_a_tabby_ignoring_sigterm_at_the_grace_and_logs_each_phase(tmp_path, harness, caplog):
    h = harness(standin_env={"STANDIN_IGNORE_TERM": "1"})
    h.server.grace = 1.0  # TABBY_MODAL_STOP_GRACE; past EARLY_PERSIST (0.5 s), so a persist runs alongside
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    assert h.server.start()
    pgid = h.server.supervisor.pid
    with caplog.at_level("INFO", logger="tabby_modal"):
        result = h.server.stop()
    assert result is not None and result["committed"]
    assert not group_members(pgid)
    lines = [r.getMessage() for r in caplog.records]
    assert "tabby did not stop within 1.0s of SIGTERM: SIGKILL" in lines
    phases = [x.split(" (")[0] for x in lines if x.startswith(("stop:", "stopped in"))]
    assert phases[:3] == [
        "stop: tabby still running after SIGTERM: persisting meanwhile",
        "stop: tabby stopped",
        "stop: final persist done",
    ]
    assert len(phases) == 4 and phases[3].startswith("stopped in") and "exit budget" in lines[-1]
    assert len(h.commits) == 1  # the pass during the grace does not commit; the final one does


def test_final_persist_past_the_exit_deadline_keeps_the_last_complete_state(tmp_path, harness, caplog):
    from shared.serving.server import FINAL_RESERVE

    h = harness(exit_budget=FINAL_RESERVE)  # no time left for copying once stop() begins
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    assert h.server.start()
    assert h.server.persist_now() is not None
    before = mirror.load_manifest(h.data)
    commits = len(h.commits)
    assert h.request("POST", "/debug/register", json={"email": "late@example.com"})[0] == 200
    for i in range(40):  # a large change just before the stop: many files to copy
        (h.live / f"index/late-{i}.idx").parent.mkdir(exist_ok=True)
        (h.live / f"index/late-{i}.idx").write_bytes(b"x" * 50_000)
    with caplog.at_level("INFO", logger="tabby_modal.server"):
        assert h.server.stop() is None
    lines = [r.getMessage() for r in caplog.records]
    assert any(x.startswith("persist stopped at the exit deadline") for x in lines), lines
    assert any(x.startswith("stop: final persist not done") for x in lines), lines
    assert len(h.commits) == commits  # not committed by us (Modal commits after the hook anyway)
    assert mirror.load_manifest(h.data).seq == before.seq  # the last complete persist is still the one named
    again = tmp_path / "again"
    mirror.hydrate(h.data, again)  # what the next container would start from: consistent, the old database
    assert users(again / "ee/db.sqlite") == ["owner@example.com"]


def test_persist_passes_read_the_live_root_through_one_change_journal(tmp_path, harness):
    h = harness()
    seed_data_dir(tmp_path, h.data, ["owner@example.com"])
    assert h.server.start()
    tree = h.server._live_tree
    assert tree is not None
    h.server.persist_now()
    assert tree.stats["full_scans"] == 1  # the first pass after hydrate scans the root whole
    (h.live / "events/2026-01-02.json").write_text('{"new": true}\n')
    result = h.server.persist_now()
    assert result is not None and result["changed"] >= 1
    assert mirrored_bytes(h.data, "events/2026-01-02.json") == b'{"new": true}\n'
    assert tree.stats["full_scans"] == 1 and tree.last_changes is not None  # from inotify, no second scan
    h.server.stop()
    assert h.server._live_tree is None
    with pytest.raises(ValueError, match="closed"):
        tree.nodes()
