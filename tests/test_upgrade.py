"""`tabby-modal upgrade --local DIR`: a real `serve --local` on the stand-in, restarted with a "new release" stand-in.
A release whose migration fails is rolled back to the exact pre-upgrade database; one that works is recorded, its
tag written to .env, and `--rollback` undoes it. Plus: unpinned tags, the .env writer, the remote form's steps."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from shared.operations import local_server, upgrade, versions
from shared.settings import load_settings
from shared.state.store import Store
from tests.conftest import BIN, clean_env, run_cli
from tests.harness import STANDIN, free_port, tabby_wrapper
from tests.test_serve_local import SETUP, get, wait_ready
from tests.test_status import instance

OLD, NEW = "tabbyml/tabby:0.32.0", "tabbyml/tabby:0.33.0"


def new_release(tmp: Path, migration: str, smoke_fail: str = "") -> Path:
    """A `tabby` that reports 0.33.0 and runs migration 51 (`ok` or `fail`); with `smoke_fail` (`completion`,
    `chat`) it is ready but that smoke check fails."""
    d = tmp / f"bin-0.33-{migration}{smoke_fail}"
    d.mkdir()
    path = d / "tabby"
    path.write_text(
        "#!/bin/sh\nexport STANDIN_VERSION=0.33.0 STANDIN_NEW_MIGRATION="
        + migration
        + "\n"
        + (f"export STANDIN_SMOKE_FAIL={smoke_fail}\n" if smoke_fail else "")
        + f'exec "{sys.executable}" "{STANDIN}" "$@"\n'
    )
    path.chmod(0o755)
    return path


def rows(db: Path) -> dict[str, list]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {
            "users": conn.execute("SELECT id, email, is_admin, auth_token FROM users ORDER BY id").fetchall(),
            "columns": [r[1] for r in conn.execute("PRAGMA table_info(users)")],
            "migrations": conn.execute(
                "SELECT version, success FROM _sqlx_migrations ORDER BY version"
            ).fetchall(),
        }


def snapshot_db_sha(backups: Path, snapshot_id: str) -> str:
    snap = Store.open(backups).load(snapshot_id)
    return snap.files["ee/db.sqlite"].sha256


def store_bytes(store: Store, snapshot_id: str, path: str) -> bytes:
    for entry, reader in store.iter_files(snapshot_id):
        if entry.path == path and reader is not None:
            return reader.read()
        if reader is not None:
            reader.read()
    raise AssertionError(f"{path} not in {snapshot_id}")


def health(port: int) -> str:
    status, body = get(f"http://127.0.0.1:{port}/v1/health", Authorization="Bearer standin-token")
    assert status == 200, body
    return json.loads(body)["version"]["git_describe"]


@pytest.fixture
def running(tmp_path, no_modal_env):
    """An owned instance with a snapshot, served by `serve --local` (the old release); stopped at the end."""
    local = tmp_path / "state"
    instance(local, tmp_path, users=2)
    port = free_port()
    env = {
        "TABBY_MODAL_INTERNAL_PORT": str(free_port()),
        "TABBY_MODAL_SETUP_TOKEN": SETUP,
        "TABBY_MODAL_PERSIST_INTERVAL": "3600",
        "TABBY_MODAL_ALLOW_DESTRUCTIVE": "1",
    }
    proc = subprocess.Popen(
        [str(BIN / "tabby-modal"), "serve", "--local", "state", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(tmp_path, TABBY_BIN=str(tabby_wrapper(tmp_path / "bin")), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}", proc)
    yield local, port, env
    local_server.stop(local, timeout=60)
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=30)


def test_a_failed_migration_rolls_back_to_the_exact_pre_upgrade_database(tmp_path, running):
    local, port, env = running
    (tmp_path / ".env").write_text("# ours\nTABBY_MODAL_GPU=L4\n")
    out = run_cli(
        ["upgrade", "--image", NEW, "--local", "state", "--token", "standin-token", "--yes", "--json"],
        tmp_path,
        timeout=240,
        TABBY_BIN=str(new_release(tmp_path, "fail")),
        **env,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert not r["upgraded"] and r["rolled_back"] and r["rollback_failures"] == []
    assert r["snapshot"].endswith("-pre-upgrade-0.32.0-to-0.33.0")
    assert "migration 51 failed" in r["failures"][0] or "exited" in r["failures"][0]
    assert "rolling back to tabbyml/tabby:0.32.0" in out.stderr
    # The data dir holds the pre-upgrade snapshot's database, byte for byte, and its rows.
    data_db = local / "data/ee/db.sqlite"
    assert hashlib.sha256(data_db.read_bytes()).hexdigest() == snapshot_db_sha(
        local / "backups", r["snapshot"]
    )
    after = rows(data_db)
    assert [u[1] for u in after["users"]] == ["user0@example.com", "user1@example.com"]
    assert "standin_upgraded" not in after["columns"] and after["migrations"][-1] == (50, 1)
    # The failed release had changed the data dir (its partial migration persisted): the restore's safety snapshot
    # of that state holds migration 51, so without the restore the old release would have refused to start.
    store = Store.open(local / "backups")
    safety = [s for s in store.ids() if "safety" in s or "pre-restore" in s]
    assert safety, store.ids()
    failed_db = tmp_path / "failed.sqlite"
    failed_db.write_bytes(store_bytes(store, safety[-1], "ee/db.sqlite"))
    assert (51, 0) in rows(failed_db)["migrations"]
    # The old release serves again (it would refuse a database that has migration 51), on the same port.
    assert health(port) == "v0.32.0-standin"
    assert (
        tmp_path / ".env"
    ).read_text() == "# ours\nTABBY_MODAL_GPU=L4\nTABBY_MODAL_TABBY_IMAGE=tabbyml/tabby:0.32.0\n"
    record = versions.read(local / "backups")
    assert [(e["image"], e["outcome"]) for e in record["history"]] == [(NEW, "failed"), (OLD, "ok")]
    assert record["current"]["schema_version"] == 50


@pytest.mark.parametrize("broken", ["completion", "chat"])
def test_a_ready_release_that_fails_a_smoke_check_is_rolled_back(tmp_path, running, broken):
    """Readiness is not enough: a release that starts, migrates and answers health but fails a smoke check (a 500
    from /v1/completions, a chat stream cut before its first event) is rolled back to the exact pre-upgrade database
    and recorded as failed; .env keeps the old tag."""
    local, port, env = running
    out = run_cli(
        ["upgrade", "--image", NEW, "--local", "state", "--token", "standin-token", "--yes", "--json"],
        tmp_path,
        timeout=240,
        TABBY_BIN=str(new_release(tmp_path, "ok", smoke_fail=broken)),
        **env,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert not r["upgraded"] and r["rolled_back"] and r["rollback_failures"] == [], r
    assert r["failures"] and r["failures"][0].startswith(
        "completion" if broken == "completion" else "chat"
    ), r
    assert f"upgrade: smoke {'completion' if broken == 'completion' else 'chat stream'}: FAIL" in out.stderr
    # The new release had applied its migration 51; the rollback put back the pre-upgrade database, byte for byte.
    data_db = local / "data/ee/db.sqlite"
    assert hashlib.sha256(data_db.read_bytes()).hexdigest() == snapshot_db_sha(
        local / "backups", r["snapshot"]
    )
    after = rows(data_db)
    assert "standin_upgraded" not in after["columns"] and after["migrations"][-1] == (50, 1)
    assert health(port) == "v0.32.0-standin"
    record = versions.read(local / "backups")
    assert [(e["image"], e["outcome"]) for e in record["history"]] == [(NEW, "failed"), (OLD, "ok")]
    assert record["current"]["image"] == OLD


def test_a_good_upgrade_is_recorded_and_rolled_back_on_request(tmp_path, running):
    local, port, env = running
    out = run_cli(
        ["upgrade", "--image", NEW, "--local", "state", "--token", "standin-token", "--yes"],
        tmp_path,
        timeout=240,
        TABBY_BIN=str(new_release(tmp_path, "ok")),
        **env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "upgraded tabbyml/tabby:0.32.0 -> tabbyml/tabby:0.33.0" in out.stdout
    assert health(port) == "v0.33.0-standin"
    assert (tmp_path / ".env").read_text() == f"TABBY_MODAL_TABBY_IMAGE={NEW}\n"
    current = versions.read(local / "backups")["current"]
    assert current["image"] == NEW and current["schema_version"] == 51 and current["previous_image"] == OLD
    # status shows the recorded release; inspect of the pre-upgrade snapshot says which Tabby wrote it.
    st = json.loads(run_cli(["status", "--local", "state", "--json"], tmp_path, **env).stdout)
    tabby = next(i for i in st["items"] if i["name"] == "tabby")
    assert (
        "last upgrade deployed 0.33.0 (ok" in tabby["detail"]
        and "image tabbyml/tabby:0.33.0" in tabby["detail"]
    )
    snap = current["snapshot"]
    ins = json.loads(
        run_cli(["inspect", "--snapshot", snap, "--local", "state", "--json"], tmp_path, **env).stdout
    )
    assert ins["tabby"]["written_by"]["version"] == "0.32.0"

    # Back again: TABBY_BIN names the old release now.
    out = run_cli(
        ["upgrade", "--rollback", "--local", "state", "--yes"],
        tmp_path,
        timeout=240,
        TABBY_BIN=str(tabby_wrapper(tmp_path / "bin")),
        **env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"rolled back to {OLD} with snapshot {snap}" in out.stdout
    assert health(port) == "v0.32.0-standin"
    assert hashlib.sha256((local / "data/ee/db.sqlite").read_bytes()).hexdigest() == snapshot_db_sha(
        local / "backups", snap
    )
    assert (tmp_path / ".env").read_text() == f"TABBY_MODAL_TABBY_IMAGE={OLD}\n"


@pytest.mark.parametrize("image", ["tabbyml/tabby:latest", "tabbyml/tabby", "tabbyml/tabby:"])
def test_unpinned_images_are_refused_with_one_line(tmp_path, image):
    out = run_cli(["upgrade", "--image", image, "--local", "state", "--yes"], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: --image {image}: " + out.stderr.split(": ", 2)[2].strip()
    ]
    assert "must be pinned to a release tag" in out.stderr
    assert not (tmp_path / "state").exists()  # nothing touched


def test_write_env_keeps_other_lines_and_replaces_the_key(tmp_path):
    env = tmp_path / ".env"
    env.write_text(
        "A=1\nexport TABBY_MODAL_TABBY_IMAGE=old:1\n# TABBY_MODAL_TABBY_IMAGE=comment\nTABBY_MODAL_TABBY_IMAGE=dup:2\nB=2"
    )
    env.chmod(0o600)
    upgrade.write_env(env, "TABBY_MODAL_TABBY_IMAGE", "tabbyml/tabby:0.33.0")
    assert env.read_text() == (
        "A=1\nTABBY_MODAL_TABBY_IMAGE=tabbyml/tabby:0.33.0\n# TABBY_MODAL_TABBY_IMAGE=comment\nB=2"
    )
    assert env.stat().st_mode & 0o777 == 0o600
    assert load_settings(env).tabby_image == "tabbyml/tabby:0.33.0"
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temp file left


class FakeTarget:
    """The Modal target's seam: deploys recorded; the new image "fails its smoke checks" by never getting ready."""

    def __init__(self, fake, bad: str) -> None:
        self.fake, self.bad, self.calls = fake, bad, []

    def stop(self) -> None:
        self.calls.append("stop")
        self.fake.server_running = 0

    def deploy(self, image: str) -> None:
        self.calls.append(f"deploy {image}")
        self.fake.server_running = 1
        self.image = image

    def ready(self) -> str:
        if self.image == self.bad:
            from shared.state.errors import StateError

            raise StateError(
                "https://ws--tabby-server.modal.run was not ready within 1500s (last answer: 503)"
            )
        return "https://ws--tabby-server.modal.run"

    def running_schema(self):
        return None


def test_remote_upgrade_steps_through_the_fakes(tmp_path, no_modal_env, monkeypatch):
    import random

    from shared.state import mirror
    from tests.fake_modal import FakeModal
    from tests.tabby_root import make_db

    fake = FakeModal(tmp_path, monkeypatch)
    settings = load_settings(None)
    live = tmp_path / "live"
    make_db(live / "ee/db.sqlite", users=1, filler_bytes=0, rng=random.Random(3))
    mirror.persist(live, fake.data.committed)
    before = (fake.data.committed / "ee/db.sqlite").read_bytes()
    ops = fake.remote_ops(settings)
    target = FakeTarget(fake, NEW)
    job = upgrade.Upgrade(
        settings,
        ops=ops,
        target=target,
        recorder=upgrade.VolumeRecorder(fake.backups),
        env_file=tmp_path / ".env",
        token=None,
        say=lambda m: None,
    )
    r = job.upgrade(NEW)
    assert not r["upgraded"] and r["rolled_back"]
    assert target.calls == ["stop", f"deploy {NEW}", "stop", f"deploy {OLD}"]
    assert [c for c, _ in fake.calls] == ["snapshot", "verify", "restore", "inspect"]
    assert (fake.data.committed / "ee/db.sqlite").read_bytes() == before
    doc = json.loads((fake.backups.committed / versions.RECORD).read_text())
    assert [(e["image"], e["outcome"]) for e in doc["history"]] == [(NEW, "failed"), (OLD, "ok")]
    assert (tmp_path / ".env").read_text() == f"TABBY_MODAL_TABBY_IMAGE={OLD}\n"


def test_the_modal_target_stops_deploys_with_the_tag_and_waits(no_modal_env):
    settings = load_settings(None, modal_environment="staging")
    calls: list[tuple[list[str], dict[str, str]]] = []
    running = iter([1, 0])
    answers = iter([None, 503, 403])
    target = upgrade.ModalTarget(
        settings,
        run=lambda cmd, env: calls.append((cmd[1:], env)),
        server_info=lambda: {"url": "https://ws--tabby-server.modal.run", "containers": 0},
        containers=lambda: next(running),
        probe=lambda url: next(answers),
        poll=0,
    )
    target.stop()
    target.deploy(NEW)
    assert target.ready() == "https://ws--tabby-server.modal.run"
    assert calls == [
        (["app", "stop", "-e", "staging", "tabby-server"], {}),
        (
            ["deploy", "-e", "staging", "-m", "apps.server", "--strategy", "recreate"],
            {"TABBY_MODAL_TABBY_IMAGE": NEW},
        ),
    ]
