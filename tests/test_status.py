"""`tabby-modal status`: a healthy instance (a real `serve --local` on the stand-in), a stale backup, an owner-less
instance, and the remote form through the Modal fakes (and without credentials)."""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import pytest
from modal.exception import NotFoundError

from shared.operations import status
from shared.operations.maintenance import for_local
from shared.settings import load_settings
from shared.state import mirror
from tests.conftest import run_cli
from tests.fake_modal import FakeModal
from tests.harness import free_port
from tests.tabby_root import make_db
from tests.test_serve_local import SETUP, start_serve, wait_ready


def instance(local: Path, tmp: Path, *, users: int) -> None:
    """DIR/data persisted from a Tabby root with `users` accounts (the first is the owner), and one snapshot."""
    live = tmp / f"seed-live-{users}"
    make_db(live / "ee/db.sqlite", users=users, filler_bytes=0, rng=random.Random(7))
    mirror.persist(live, local / "data")
    for_local(load_settings(None), local).snapshot("scheduled")


def by_name(result: dict) -> dict[str, dict]:
    return {i["name"]: i for i in result["items"]}


def test_healthy_then_stale_backup_on_a_running_local_server(tmp_path, no_modal_env):
    local = tmp_path / "state"
    instance(local, tmp_path, users=2)
    port = free_port()
    proc = start_serve(tmp_path, local, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        out = run_cli(["status", "--local", str(local), "--json"], tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)
        items = by_name(r)
        assert r["ok"] and r["url"] == f"http://127.0.0.1:{port}" and r["server"]["pid"] == proc.pid
        assert (
            items["server"]["state"] == "ok" and f"up at http://127.0.0.1:{port}" in items["server"]["detail"]
        )
        assert items["users"]["detail"] == "2 user(s); the owner exists"
        assert items["backups"]["state"] == "ok" and "-scheduled" in items["backups"]["detail"]
        assert "database schema 50 (Tabby 0.32.0)" in items["tabby"]["detail"]
        assert items["last persist"]["state"] == "ok" and items["leases"]["detail"] == "none held"
        human = run_cli(["status", "--local", str(local)], tmp_path)
        assert human.returncode == 0 and human.stdout.rstrip().endswith("all well")

        # Three days later, with the default daily schedule: the newest snapshot is past twice the schedule.
        stale = status.local_status(load_settings(None), str(local), now=time.time() + 3 * 86400)
        backups = by_name(stale)["backups"]
        assert not stale["ok"] and stale["problems"] == 1
        assert (
            backups["state"] == "problem"
            and "older than twice the schedule ('0 3 * * *', every 24.0 h)" in (backups["detail"])
        )
        assert backups["next"] == f"tabby-modal snapshot --label manual --local {local}"
        # An hourly schedule makes today's snapshot stale after a few hours.
        hourly = load_settings(None, backup_schedule="0 * * * *")
        assert not status.local_status(hourly, str(local), now=time.time() + 3 * 3600)["ok"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    # Stopped: nothing needs a person (a local server that is not running is a normal state): exit 0, and the
    # server line says so with the command that starts it, as it runs.
    out = run_cli(["status", "--local", str(local)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"     server        not running (nothing serves {local})" in out.stdout
    assert f"-> tabby-modal serve --local {local}" in out.stdout and out.stdout.rstrip().endswith("all well")


def test_an_owner_less_instance_needs_a_person(tmp_path, no_modal_env):
    local = tmp_path / "state"
    instance(local, tmp_path, users=0)
    out = run_cli(["status", "--local", str(local), "--json"], tmp_path)
    assert out.returncode == 1
    users = by_name(json.loads(out.stdout))["users"]
    assert users["state"] == "problem" and users["detail"].startswith("0 user(s) and no owner")
    # No setup token: first the .env line (a fresh token), then the link with that very token.
    token = re.fullmatch(
        r"add the line TABBY_MODAL_SETUP_TOKEN=([0-9a-f-]{36}) to \.env, \(re\)start "
        rf"`tabby-modal serve --local {re.escape(str(local))}`, then open "
        r"http://127\.0\.0\.1:8000/_setup\?token=([0-9a-f-]{36}) and register the owner",
        users["next"],
    )
    assert token and token[1] == token[2]
    with_token = run_cli(["status", "--local", str(local), "--json"], tmp_path, TABBY_MODAL_SETUP_TOKEN=SETUP)
    assert by_name(json.loads(with_token.stdout))["users"]["next"] == (
        f"open http://127.0.0.1:8000/_setup?token={SETUP} and register the owner"
    )
    # A DIR with nothing in its data dir yet (as `serve` leaves it before the first persist): owner-less too.
    (tmp_path / "fresh" / "data").mkdir(parents=True)
    empty = status.local_status(load_settings(None), str(tmp_path / "fresh"))
    assert not empty["ok"] and by_name(empty)["users"]["state"] == "problem"


def test_remote_status_through_the_fakes(tmp_path, no_modal_env, monkeypatch):
    fake = FakeModal(tmp_path, monkeypatch)
    settings = load_settings(None)
    live = tmp_path / "live"
    make_db(live / "ee/db.sqlite", users=1, filler_bytes=0, rng=random.Random(1))
    mirror.persist(live, fake.data.committed)
    ops = fake.remote_ops(settings)
    ops.snapshot("scheduled")
    url = "https://ws--tabby-server.modal.run"
    r = status.remote_status(
        settings, credentials=True, ops=ops, server=lambda: {"containers": 1, "backlog": 0, "url": url}
    )
    items = by_name(r)
    assert r["ok"], items
    assert items["server"]["detail"] == f"{url}: 1 container(s) running"
    assert items["users"]["detail"] == "1 user(s); the owner exists"

    def undeployed():
        raise NotFoundError("Lookup failed for Cls 'Tabby'")

    fake.deployed = False
    r = status.remote_status(settings, credentials=True, ops=ops, server=undeployed)
    items = by_name(r)
    assert items["server"]["next"] == "make deploy-server"
    assert items["state"]["next"] == "make deploy-maintenance" and r["problems"] == 2


def test_offline_status_says_what_it_could_not_check(tmp_path):
    (tmp_path / ".env").write_text("TABBY_MODAL_WARM_HOURS=Mon-Fri 08:00-19:00 Europe/Berlin\n")
    out = run_cli(["status", "--json"], tmp_path)
    assert out.returncode == 1
    r = json.loads(out.stdout)
    assert set(r["unchecked"]) == {"server", "users", "last persist", "backups", "leases"}
    assert by_name(r)["credentials"]["next"].startswith("modal token new")
    assert (
        r["warm_hours"]["configured"] and r["warm_hours"]["schedule"] == "Mon-Fri 08:00-19:00 Europe/Berlin"
    )


@pytest.mark.parametrize("expr, hours", [("0 3 * * *", 24), ("0 3 * * 1", 168), ("*/30 * * * *", 0.5)])
def test_schedule_gaps(expr, hours):
    from shared.operations.cron import max_gap_seconds

    assert max_gap_seconds(expr) == hours * 3600


def test_a_clean_restore_with_no_server_running_is_all_well(tmp_path, no_modal_env):
    """Right after a clean restore nothing serves DIR, and nothing should: exit 0, "not running" as information."""
    local = tmp_path / "state"
    instance(local, tmp_path, users=1)
    restored = run_cli(
        ["restore", "latest", "--local", str(local), "--yes"], tmp_path, TABBY_MODAL_ALLOW_DESTRUCTIVE="1"
    )
    assert restored.returncode == 0, restored.stderr
    out = run_cli(["status", "--local", str(local)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "not running" in out.stdout and "BAD" not in out.stdout and out.stdout.rstrip().endswith("all well")
    )
    as_json = run_cli(["status", "--local", str(local), "--json"], tmp_path)
    assert as_json.returncode == 0 and by_name(json.loads(as_json.stdout))["server"]["state"] == "info"


def test_a_path_that_is_not_a_local_dir_is_one_line_exit_2(tmp_path, no_modal_env):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello\n")
    meta_file = tmp_path / "meta-file"
    (meta_file / "data").mkdir(parents=True)
    (meta_file / "data" / ".tabby-modal").write_text("")
    data_file = tmp_path / "data-file"
    data_file.mkdir()
    (data_file / "data").write_text("")
    cases = {
        str(a_file): "is not a directory",
        "/dev/null": "is not a directory",
        str(meta_file): "data/.tabby-modal is not a directory",
        str(data_file): "data is not a directory",
        str(tmp_path / "missing"): "no such directory",
    }
    for path, says in cases.items():
        out = run_cli(["status", "--local", path], tmp_path)
        assert out.returncode == 2, (path, out.stdout, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (path, out.stderr)
    assert a_file.read_text() == "hello\n"  # nothing touched
