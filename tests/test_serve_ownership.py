"""`serve --local DIR` owns DIR (issue 13, items 1 and 3), with real `tabby-modal` processes and the stand-in Tabby:
a second serve refuses before touching anything; restore/reset ask the lock, not the clock; a server whose data dir
is replaced under it stops serving (503) and never persists over it."""

from __future__ import annotations

import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from shared.state import mirror
from shared.state.locks import serve_lock
from shared.state.locks.serve_lock import DirInUse, ServeLock
from shared.state.store import Store
from tests.conftest import BIN, clean_env, run_cli
from tests.harness import free_port, poll, tabby_wrapper
from tests.tabby_root import make_root, tree_state
from tests.test_serve_local import SETUP, get, post_json, users, wait_ready

DESTRUCTIVE = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}


def start_serve(tmp: Path, local: Path, port: int, **env: str) -> subprocess.Popen[str]:
    settings = {"TABBY_MODAL_PERSIST_INTERVAL": "3600", **env}
    return subprocess.Popen(
        [str(BIN / "tabby-modal"), "serve", "--local", str(local.relative_to(tmp)), "--port", str(port)],
        cwd=tmp,
        env=clean_env(
            tmp,
            TABBY_BIN=str(tabby_wrapper(tmp / "bin")),
            TABBY_MODAL_INTERNAL_PORT=str(free_port()),
            TABBY_MODAL_SETUP_TOKEN=SETUP,
            **settings,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def claim(url: str, email: str = "owner@example.com") -> str:
    """The owner's claim through the setup link; returns its auth token once the guard lets it through."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    assert get(f"{url}/_setup?token={SETUP}", opener)[0] == 200
    token = post_json(f"{url}/debug/register", {"email": email}, opener)["auth_token"]
    poll(lambda: get(f"{url}/v1/health", Authorization=f"Bearer {token}")[0] == 200, 5, 0.02, "guard open")
    return token


def register(url: str, token: str, email: str) -> None:
    request = urllib.request.Request(
        f"{url}/debug/register",
        data=json.dumps({"email": email}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=60)[1]


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    root = tmp_path / "state"
    assert serve_lock.holder(root) is None  # no DIR, no lock file: free, and nothing is created
    assert not root.exists()
    # A holder in another process; SIGKILL frees DIR at once (the kernel drops the flock).
    code = (
        "import sys, time; from shared.state.locks.serve_lock import ServeLock;"
        f"ServeLock({str(root)!r}).acquire(port=1234); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        record = serve_lock.holder(root)
        assert record is not None and record["pid"] == proc.pid and record["port"] == 1234
        try:
            ServeLock(root).acquire(wait=0.2)
            raise AssertionError("a second holder got the lock")
        except DirInUse as err:
            assert f"pid {proc.pid} on " in str(err) and "port 1234" in str(err)
    finally:
        proc.kill()
        proc.wait()
    assert serve_lock.holder(root) is None
    with ServeLock(root) as mine:
        assert serve_lock.holder(root)["pid"] == os.getpid() and mine.held
    assert serve_lock.holder(root) is None


def test_a_second_serve_on_one_dir_refuses_and_the_first_keeps_its_data(tmp_path):
    local = tmp_path / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_serve(tmp_path, local, port)
    try:
        wait_ready(url, first)
        token = claim(url)
        live_before = sorted(p.relative_to(local) for p in (local / "live").rglob("*"))
        started = time.monotonic()
        second = start_serve(tmp_path, local, free_port())
        _, err = second.communicate(timeout=30)
        print(f"\nsecond serve refused after {time.monotonic() - started:.2f}s")
        assert second.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: refused: state is in use by `serve`")
        assert f"pid {first.pid} on " in lines[0] and f"port {port}" in lines[0]
        assert sorted(p.relative_to(local) for p in (local / "live").rglob("*")) == live_before
        register(url, token, "second@example.com")  # the first server still serves, on its own root
    finally:
        err = stop(first)
    assert first.returncode == 0, err
    assert "serve: stopped; state persisted" in err
    assert users(local / "data", tmp_path) == ["owner@example.com", "second@example.com"]


def test_restore_asks_the_lock_and_a_replaced_data_dir_stops_the_server(tmp_path):
    local = tmp_path / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp_path, local, port, TABBY_MODAL_PERSIST_INTERVAL="1")
    try:
        wait_ready(url, proc)
        token = claim(url)
        poll(lambda: (local / "data/ee/db.sqlite").exists(), 10, 0.05, "a persist")
        snap = run_cli(["snapshot", "--local", str(local), "--json"], tmp_path)  # allowed while serving
        assert snap.returncode == 0, snap.stderr
        register(url, token, "second@example.com")
        # While it serves, restore and reset refuse, naming the server.
        for args in (["restore", "latest"], ["reset", "--scope", "index"]):
            refused = run_cli([*args, "--local", str(local), "--yes"], tmp_path, **DESTRUCTIVE)
            assert refused.returncode == 2, refused.stderr
            assert (
                f"while `serve` (pid {proc.pid} on " in refused.stderr and "stop it first" in refused.stderr
            )
        # --force replaces the data dir under it: the server notices at its next persist, stops serving and
        # exits 1 by itself (not a 503 forever).
        forced = run_cli(
            ["restore", "latest", "--local", str(local), "--yes", "--force"], tmp_path, **DESTRUCTIVE
        )
        assert forced.returncode == 0, forced.stderr
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError("serve kept running after its data dir was replaced") from None
    finally:
        if proc.returncode is None:
            err = stop(proc)
    assert proc.returncode == 1, err
    assert "error: its data dir" in err and "was replaced" in err
    after = err.split("data dir replaced under the server", 1)[1]
    assert "error: the last persist failed" in after and "persisted" not in after
    assert users(local / "data", tmp_path) == ["owner@example.com"]  # the restored state, not overwritten
    # Right after a clean stop, restore goes ahead at once (no "persisted N s ago" guess).
    proc = start_serve(tmp_path, local, port)
    try:
        wait_ready(url, proc)
    finally:
        err = stop(proc)
    assert proc.returncode == 0 and "serve: stopped; state persisted" in err, err
    again = run_cli(["restore", "latest", "--local", str(local), "--yes"], tmp_path, **DESTRUCTIVE)
    assert again.returncode == 0, again.stderr


def test_persist_refuses_a_data_dir_someone_else_wrote(tmp_path):
    """The server's persist names the manifest it expects (`seq` from hydrate or its last persist): another
    writer's persist in between is seen, with nothing written over it."""
    data, live, other = tmp_path / "data", tmp_path / "live", tmp_path / "other"
    make_root(other, size_mb=0.1, seed=1)
    mirror.persist(other, data)
    seq = mirror.hydrate(data, live)["seq"]
    for _ in range(2):
        seq = mirror.persist(live, data, seq=seq)["seq"]  # our own persists: each says what to expect next
    (other / "events/late.json").write_text("{}\n")
    mirror.persist(other, data)  # someone else
    before = tree_state(data)
    (live / "events/mine.json").write_text("{}\n")
    with pytest.raises(mirror.DataDirReplaced, match="written by someone else"):
        mirror.persist(live, data, seq=seq)
    assert tree_state(data) == before


def test_restore_waits_for_a_persist_pass_in_progress(tmp_path):
    """persist, restore and reset hold the data dir's writer lock: a forced restore never lands mid-pass."""
    data, live = tmp_path / "data", tmp_path / "live"
    make_root(live, size_mb=0.1, seed=2)
    mirror.persist(live, data)
    store = Store.open(tmp_path / "backups")
    sid = store.snapshot(data)["id"]
    code = (
        "import sys; from shared.state import mirror\n"
        f"with mirror.writing({str(data)!r}):\n    print('held', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    done: list[dict] = []
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        worker = threading.Thread(target=lambda: done.append(store.restore(sid, data, force=True)))
        worker.start()
        ino = (data / mirror.WRITER_LOCK).stat().st_ino
        poll(lambda: _blocked_on(ino), 30, 0.01, "the restore to wait for the writer lock")
        assert not done and mirror.pending_info(data) is None  # it has not touched the data dir
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    worker.join(30)
    assert done and done[0]["restored"] == sid and mirror.load_manifest(data).origin == "restore"


def _blocked_on(ino: int) -> bool:
    """Does /proc/locks show a process waiting (`->`) for a lock on inode `ino`?"""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[6].rsplit(":", 1)[-1] == str(ino):
            return True
    return False
