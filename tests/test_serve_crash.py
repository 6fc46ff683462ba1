"""A Tabby crash under `serve --local` (issue 13, item 4), with a real `tabby-modal` process and the stand-in: it is
restarted (503 "restarting" meanwhile, then 200), and past TABBY_MODAL_RESTART_LIMIT the server persists and exits."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request

from tests.harness import free_port, poll
from tests.test_serve_local import get, users, wait_ready
from tests.test_serve_ownership import claim, register, start_serve


def crash_tabby(url: str, token: str) -> None:
    """A chat stream whose stand-in exits mid-way (`crash_after`): the response is cut."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps({"events": 3, "crash_after": 1}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            r.read()
    except (http.client.IncompleteRead, urllib.error.URLError, ConnectionError):
        return
    raise AssertionError("the stream was not cut")


def test_a_crashed_tabby_is_restarted_then_the_server_gives_up_past_the_limit(tmp_path):
    local = tmp_path / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp_path, local, port, TABBY_MODAL_RESTART_LIMIT="1")
    try:
        wait_ready(url, proc)
        token = claim(url)
        crash_tabby(url, token)
        crashed = time.monotonic()
        status, body = get(f"{url}/v1/health", Authorization=f"Bearer {token}")
        assert status == 503 and b"restarting" in body and b"failed to start" not in body
        health = f"{url}/v1/health"
        poll(
            lambda: get(health, Authorization=f"Bearer {token}")[0] == 200,
            20,
            0.01,
            "a 200 after the restart",
        )
        print(f"\nserve --local: tabby crash -> next 200: {time.monotonic() - crashed:.2f}s")
        register(url, token, "second@example.com")
        crash_tabby(url, token)  # the second crash within the window: past the limit of 1 restart
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "error: tabby crashed 2 times within 600s (TABBY_MODAL_RESTART_LIMIT=1" in err
    assert "| llama-server: listening (stand-in)" in err  # the tail of Tabby's log, in ours
    assert "serve: stopped; state persisted" in err
    assert users(local / "data", tmp_path) == ["owner@example.com", "second@example.com"]
