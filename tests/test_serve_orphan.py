"""A Tabby left running by a `serve --local DIR` killed with SIGKILL (issue 16, item 5): Tabby runs in its own
process group, so it outlives its `serve` and keeps its port. The serve lock's record names it (pid and start
time); `status --local DIR` reports it (exit 1, with the command that fixes it) and the next `serve` ends its group
and starts normally. A record naming a live process whose start time differs (a reused pid) is left alone.
Real `tabby-modal` processes and the stand-in Tabby.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shared.state.locks import serve_lock
from shared.state.locks.holder import proc_stat as _proc_stat
from tests.conftest import BIN, clean_env, run_cli
from tests.harness import free_port, poll, port_open, tabby_wrapper
from tests.test_serve_local import SETUP, wait_ready


def start_serve(tmp: Path, port: int, internal: int) -> subprocess.Popen[str]:
    """`serve --local state` on the stand-in; the same internal (Tabby) port each time, as a real setup has."""
    return subprocess.Popen(
        [str(BIN / "tabby-modal"), "serve", "--local", "state", "--port", str(port)],
        cwd=tmp,
        env=clean_env(
            tmp,
            TABBY_BIN=str(tabby_wrapper(tmp / "bin")),
            TABBY_MODAL_INTERNAL_PORT=str(internal),
            TABBY_MODAL_SETUP_TOKEN=SETUP,
            TABBY_MODAL_PERSIST_INTERVAL="3600",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def running(pid: int, start: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == start


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=60)[1]


def test_a_killed_serve_leaves_a_tabby_that_status_reports_and_the_next_serve_ends(tmp_path):
    port, internal = free_port(), free_port()
    first = start_serve(tmp_path, port, internal)
    stray: dict | None = None
    try:
        wait_ready(f"http://127.0.0.1:{port}", first)
        record = json.loads((tmp_path / "state" / serve_lock.LOCK_NAME).read_text())
        tabby = record["tabby"]
        assert running(tabby["pid"], tabby["proc_start"])
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
        # Its Tabby lives on in its own process group, holding the internal port.
        assert running(tabby["pid"], tabby["proc_start"]) and port_open(internal)
        stray = tabby

        out = run_cli(["status", "--local", "state", "--json"], tmp_path)
        assert out.returncode == 1, out.stdout + out.stderr
        server = next(i for i in json.loads(out.stdout)["items"] if i["name"] == "server")
        assert f"pid {tabby['pid']}" in server["detail"] and "still runs" in server["detail"], server
        assert server["next"] == "tabby-modal serve --local state", server

        second = start_serve(tmp_path, port, internal)
        try:
            wait_ready(f"http://127.0.0.1:{port}", second)
            poll(lambda: not running(tabby["pid"], tabby["proc_start"]), 15, 0.02, "the orphan to be gone")
            new = json.loads((tmp_path / "state" / serve_lock.LOCK_NAME).read_text())["tabby"]
            assert new["pid"] != tabby["pid"] and running(new["pid"], new["proc_start"])
        finally:
            err = stop(second)
        assert f"ended the Tabby (pid {tabby['pid']}) left running by a `serve` that died" in err, err
        assert "Traceback" not in err
    finally:
        if first.poll() is None:
            first.kill()
        if stray is not None and running(stray["pid"], stray["proc_start"]):
            os.killpg(stray["pid"], signal.SIGKILL)


def test_a_record_whose_pid_was_reused_is_left_alone(tmp_path):
    """The record names a live process with another start time: it is not that Tabby; nothing is signalled."""
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    try:
        start = _proc_stat(bystander.pid)[1]
        local = tmp_path / "state"
        (local / "data").mkdir(parents=True)  # a local DIR, as `status --local` requires
        record = {
            "op": "serve",
            "pid": 999_999,
            "host": socket.gethostname(),
            "port": 1,
            "tabby": {"pid": bystander.pid, "proc_start": start + 1},
        }
        (local / serve_lock.LOCK_NAME).write_text(json.dumps(record))
        assert serve_lock.orphan(local) is None
        # The same record with the right start time is an orphan (the check is the start time, not the pid).
        assert serve_lock.tabby_of({**record, "tabby": {"pid": bystander.pid, "proc_start": start}})

        out = run_cli(["status", "--local", "state", "--json"], tmp_path)
        server = next(i for i in json.loads(out.stdout)["items"] if i["name"] == "server")
        assert "not running (nothing serves" in server["detail"], server

        port = free_port()
        proc = start_serve(tmp_path, port, free_port())
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
        finally:
            err = stop(proc)
        assert "ended the Tabby" not in err, err
        assert bystander.poll() is None and running(bystander.pid, start)
    finally:
        bystander.kill()
        bystander.wait()
