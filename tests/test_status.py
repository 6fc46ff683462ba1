"""`tabby-modal status`: a healthy instance (a real `serve --local` on the stand-in), a stale backup, an owner-less
instance, and the remote form through the Modal fakes (and without credentials)."""

from __future__ import annotations

import json
import random
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
from tests.test_serve_local import start_serve, wait_ready


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
    # Stopped: the server line turns into a problem naming the command that starts it.
    out = run_cli(["status", "--local", str(local)], tmp_path)
    assert out.returncode == 1
    assert "BAD  server" in out.stdout and f"-> make serve-local LOCAL={local}" in out.stdout


def test_an_owner_less_instance_needs_a_person(tmp_path, no_modal_env):
    local = tmp_path / "state"
    instance(local, tmp_path, users=0)
    out = run_cli(["status", "--local", str(local), "--json"], tmp_path)
    assert out.returncode == 1
    users = by_name(json.loads(out.stdout))["users"]
    assert users["state"] == "problem" and users["detail"].startswith("0 user(s) and no owner")
    assert users["next"].startswith("open http://127.0.0.1:8000/_setup?token=")
    # A directory with nothing in it: no database at all is owner-less too.
    empty = status.local_status(load_settings(None), str(tmp_path / "fresh"))
    assert not empty["ok"] and by_name(empty)["server"]["state"] == "problem"


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
