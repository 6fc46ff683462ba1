"""`tabby-modal serve --local DIR` as a real process with the stand-in as TABBY_BIN; the smoke script against it."""

from __future__ import annotations

import http.cookiejar
import json
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.state import mirror
from tests.conftest import BIN, REPO, clean_env, run_cli
from tests.harness import free_port, poll, tabby_wrapper

SETUP = "6f1c1b7e-3a52-4d0e-9a55-2f8d0c6c3c11"


def get(url: str, opener: urllib.request.OpenerDirector | None = None, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with (opener or urllib.request.build_opener()).open(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post_json(url: str, doc: dict, opener: urllib.request.OpenerDirector) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with opener.open(request, timeout=10) as r:
        return json.loads(r.read())


def start_serve(tmp: Path, local: Path, port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        # DIR relative to the working directory, as people type it.
        [str(BIN / "tabby-modal"), "serve", "--local", str(local.relative_to(tmp)), "--port", str(port)],
        cwd=tmp,
        env=clean_env(
            tmp,
            TABBY_BIN=str(tabby_wrapper(tmp / "bin")),
            TABBY_MODAL_INTERNAL_PORT=str(free_port()),
            TABBY_MODAL_SETUP_TOKEN=SETUP,
            TABBY_MODAL_PERSIST_INTERVAL="3600",
            STANDIN_CHILD_PIDFILE=str(tmp / "child.pid"),
            **env,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    def up() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return get(f"{url}/")[0] != 503  # 503 while Tabby starts; then the guard's 403
        except OSError:
            return False

    poll(up, 30, 0.02, "serve --local to be ready")


def users(data: Path, tmp: Path) -> list[str]:
    root = tmp / "check-root"
    mirror.hydrate(data, root)
    with sqlite3.connect(root / "ee/db.sqlite") as conn:
        return [r[0] for r in conn.execute("SELECT email FROM users ORDER BY id")]


def test_serve_local_claim_smoke_and_sigterm_persists(tmp_path):
    local = tmp_path / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp_path, local, port, STANDIN_LOAD_SECONDS="0.3")
    try:
        wait_ready(url, proc)
        status, body = get(f"{url}/v1/health")
        assert status == 403 and b"/_setup?token=" in body  # fresh instance: locked
        # Claim: the setup link sets the cookie and lands on the owner sign-up; the first account registers.
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        status, body = get(f"{url}/_setup?token={SETUP}", opener)
        assert status == 200 and b"stand-in /auth/signup" in body
        token = post_json(f"{url}/debug/register", {"email": "owner@example.com"}, opener)["auth_token"]
        # The guard re-reads the database at most once a second while locked: poll until it opens.
        poll(
            lambda: get(f"{url}/v1/health", Authorization=f"Bearer {token}")[0] == 200, 5, 0.02, "guard open"
        )
        # The smoke script against the local server, as `make smoke URL=... TOKEN=...` would run it.
        smoke = subprocess.run(
            [sys.executable, str(REPO / "scripts/smoke.py"), "--url", url, "--token", token],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert "all checks passed" in smoke.stdout
        for check in ("health", "completion", "chat stream", "websocket /subscriptions"):
            assert f"| {check} | ok |" in smoke.stdout
        assert "first event" in smoke.stdout and "connection_ack" in smoke.stdout
        bad = subprocess.run(
            [sys.executable, str(REPO / "scripts/smoke.py"), "--url", url, "--token", "wrong"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "| health | FAIL |" in bad.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "persisted" in err and "serve: stopped" in err
    assert users(local / "data", tmp_path) == ["owner@example.com"]
    child = int((tmp_path / "child.pid").read_text())
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] in "ZX"  # no orphaned llama-server
    secret = (local / "jwt-secret").read_text().strip()
    assert len(secret) == 36 and (local / "jwt-secret").stat().st_mode & 0o777 == 0o600

    # Second run: the state comes back (the guard stays open), the JWT secret is reused; Ctrl-C also exits 0.
    proc = start_serve(tmp_path, local, port)
    try:
        wait_ready(url, proc)
        assert get(f"{url}/v1/health", Authorization=f"Bearer {token}")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (local / "jwt-secret").read_text().strip() == secret


def test_serve_local_without_tabby_is_one_line_exit_2(tmp_path):
    proc = run_cli(["serve", "--local", str(tmp_path / "x")], tmp_path, TABBY_BIN=str(tmp_path / "missing"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Tabby not found" in lines[0] and "TABBY_BIN" in lines[0]
    proc = run_cli(["serve", "--local", str(tmp_path / "x")], tmp_path, PATH="/usr/bin:/bin")
    assert proc.returncode == 2 and "Tabby not found ('tabby')" in proc.stderr


def test_serve_local_start_failure_exits_1_with_the_reason(tmp_path):
    proc = start_serve(tmp_path, tmp_path / "state", free_port(), STANDIN_CRASH_AT_START="5")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "error: tabby exited with code 5 while starting" in err
    assert "stand-in crash" in err  # Tabby's own last lines are in the log


def test_serve_local_waits_for_a_local_restore_lease(tmp_path):
    from shared.state.locks.lease import DirDict, Lease

    local = tmp_path / "state"
    held = Lease(DirDict(local / "locks"), "maintenance", "restore", ttl=600, owner="ops").acquire()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp_path, local, port, STANDIN_LOAD_SECONDS="0.1")
    try:

        def refused() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                status, body = get(f"{url}/v1/health")
            except OSError:
                return False
            return status == 503 and b"maintenance in progress" in body and b"restore by ops" in body

        poll(refused, 30, 0.02, "a 503 naming the lease")
        assert not (local / "live").exists()  # nothing hydrated while the lease is held
        held.release()
        poll(lambda: get(f"{url}/v1/health")[0] == 403, 30, 0.05, "Tabby to start after the lease")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "restore by ops" in err


def test_serve_local_without_setup_token_says_the_env_line_once(tmp_path):
    """No TABBY_MODAL_SETUP_TOKEN: said at start, once, as the exact .env line; never a placeholder link. The line
    added to .env as printed makes the claim work after a restart."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def serve() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(BIN / "tabby-modal"), "serve", "--local", "state", "--port", str(port)],
            cwd=tmp_path,  # where .env is read
            env=clean_env(
                tmp_path,
                TABBY_BIN=str(tabby_wrapper(tmp_path / "bin")),
                TABBY_MODAL_INTERNAL_PORT=str(free_port()),
                TABBY_MODAL_PERSIST_INTERVAL="3600",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    proc = serve()
    try:
        wait_ready(url, proc)
        poll(lambda: get(f"{url}/v1/health")[0] == 403, 10, 0.02, "the guard")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "_setup?token=<" not in err
    lines = [line for line in err.splitlines() if "TABBY_MODAL_SETUP_TOKEN=" in line]
    assert len(lines) == 1, err
    env_line = re.search(r"TABBY_MODAL_SETUP_TOKEN=[0-9a-f-]{36}\b", lines[0]).group(0)
    assert "add the line" in lines[0] and ".env" in lines[0] and "restart" in lines[0]

    (tmp_path / ".env").write_text(env_line + "\n")
    token = env_line.split("=", 1)[1]
    proc = serve()
    try:
        wait_ready(url, proc)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        status, body = get(f"{url}/_setup?token={token}", opener)
        assert status == 200 and b"stand-in /auth/signup" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "no setup token" not in err
    assert f"open {url}/_setup?token={token} and register" in err  # a link that opens as printed


def test_serve_local_on_a_read_only_dir_is_one_line_exit_2(tmp_path):
    """chmod does not stop root, so the DIR is made immutable (`chattr +i`), which refuses writes to root too."""
    ro_dir = tmp_path / "ro"
    (ro_dir / "data").mkdir(parents=True)
    ro_data = (
        tmp_path / "ro-data"
    )  # writable DIR, read-only DIR/data: found at start, not at the first persist
    (ro_data / "data").mkdir(parents=True)
    frozen = [ro_dir, ro_data / "data"]
    if subprocess.run(["chattr", "+i", *map(str, frozen)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (not root, or the filesystem has no immutable flag)")
    try:
        for local, where in ((ro_dir, ro_dir), (ro_data, ro_data / "data"), (tmp_path / "afile", None)):
            if where is None:
                local.write_text("")
            proc = run_cli(
                ["serve", "--local", str(local)], tmp_path, TABBY_BIN=str(tabby_wrapper(tmp_path / "bin"))
            )
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            if where is None:
                assert lines[0] == f"error: {local} is not a directory: --local DIR needs DIR to be a folder"
            else:
                assert lines[0] == (
                    f"error: cannot write in {where}: Operation not permitted; "
                    "serve --local needs a DIR it can write to"
                )
    finally:
        subprocess.run(["chattr", "-i", *map(str, frozen)], check=True)
    assert not (ro_data / "live").exists() or not any((ro_data / "live").iterdir())
