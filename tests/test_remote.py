"""The remote path end to end: `RemoteOps` -> the maintenance app's functions -> the state engine, with Modal's
Function lookup, Volumes and Dict swapped for fakes that model commit/reload and atomic put-if-absent."""

from __future__ import annotations

import sqlite3
import tarfile
import time
from pathlib import Path

import pytest

from shared.operations import maintenance
from shared.settings import load_settings
from shared.state import mirror
from shared.state.errors import StateError
from shared.state.locks import lease
from shared.state.store import Store
from tests.fake_modal import FakeModal
from tests.tabby_root import make_root, tree_state


def db_users(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT email FROM users ORDER BY id")]


def add_user(live: Path, email: str) -> None:
    with sqlite3.connect(live / "ee/db.sqlite") as conn:
        conn.execute("INSERT INTO users(email, is_admin, auth_token) VALUES (?, 0, ?)", (email, email))


class Server:
    """The server container's side: Tabby's live root, persisted into its own view of the data Volume."""

    def __init__(self, fake: FakeModal, tmp: Path) -> None:
        self.live = tmp / "server/live"
        make_root(self.live, size_mb=0.3, users=2)
        self.view = fake.data.mount(tmp / "server/data")

    def persist(self, *, commit: bool = True) -> None:
        mirror.persist(self.live, self.view.path, commit=self.view.commit if commit else None)


@pytest.fixture
def fake(tmp_path, monkeypatch, no_modal_env) -> FakeModal:
    return FakeModal(tmp_path, monkeypatch)


@pytest.fixture
def ops(fake):
    return fake.remote_ops(load_settings())


def fresh_store(fake: FakeModal, tmp: Path) -> Store:
    """The backups Volume as a new container would see it: only what was committed."""
    return Store.open(fake.backups.mount(tmp / f"reader-{time.monotonic_ns()}").path)


def committed_data(fake: FakeModal, tmp: Path) -> Path:
    """The data Volume's committed state, hydrated into a plain root to compare."""
    out = tmp / f"check-{time.monotonic_ns()}"
    mirror.hydrate(fake.data.committed, out)
    return out


def test_snapshot_sees_only_committed_persists_and_commits_the_store(tmp_path, fake, ops):
    server = Server(fake, tmp_path)
    server.persist(commit=False)
    first = ops.snapshot("a")
    assert first["files"] == 0  # the server's persist was never committed: invisible to maintenance
    server.view.commit()
    second = ops.snapshot("b")  # the warm maintenance container must reload /data to see it
    assert second["files"] > 10 and second["consistency"] == "persist"
    assert set(fresh_store(fake, tmp_path).ids()) == {first["id"], second["id"]}  # committed for all readers
    listed = ops.snapshots()
    assert {s["id"] for s in listed["snapshots"]} == {first["id"], second["id"]}
    assert fake.locks.get(lease.STORE) is None  # the store lease is released


def test_restore_through_the_app_replaces_data_and_keeps_a_safety_snapshot(tmp_path, fake, ops):
    server = Server(fake, tmp_path)
    server.persist()
    snap = ops.snapshot("before")
    add_user(server.live, "late@example.com")
    server.persist()
    assert "late@example.com" in db_users(committed_data(fake, tmp_path) / "ee/db.sqlite")

    result = ops.restore(snap["id"], confirm="tabby-data")
    assert result["restored"] == snap["id"] and result["safety_snapshot"]
    # The safety snapshot (backups) is published before the data it protects: a crash between the two commits
    # must not leave a restored /data with no way back.
    assert fake.backups.last_commit < fake.data.last_commit
    restored = committed_data(fake, tmp_path)
    assert db_users(restored / "ee/db.sqlite") == ["user0@example.com", "user1@example.com"]
    store = fresh_store(fake, tmp_path)
    assert result["safety_snapshot"] in store.ids()  # committed before the data changed
    safety = tmp_path / "safety"
    Store.open(store.backend.root).restore(result["safety_snapshot"], safety)
    assert "late@example.com" in db_users(
        mirror.hydrate(safety, tmp_path / "s") and tmp_path / "s/ee/db.sqlite"
    )
    assert fake.locks.get(lease.MAINTENANCE) is None and fake.locks.get(lease.STORE) is None


def test_restore_and_reset_refuse_while_the_server_runs(tmp_path, fake, ops):
    server = Server(fake, tmp_path)
    server.persist()
    snap = ops.snapshot("before")
    data_before = tree_state(fake.data.committed)
    backups_before = tree_state(fake.backups.committed)
    fake.server_running = 1
    with pytest.raises(StateError, match="make stop-server") as err:
        ops.restore(snap["id"], confirm="tabby-data")
    assert "\n" not in str(err.value)
    with pytest.raises(StateError, match="1 running container"):
        ops.reset("auth", confirm="tabby-data")
    assert tree_state(fake.data.committed) == data_before
    assert tree_state(fake.backups.committed) == backups_before
    assert fake.locks.get(lease.MAINTENANCE) is None  # refused runs leave no lease behind
    # --force is the documented, dangerous way past the check.
    result = ops.reset("index", force=True, confirm="tabby-data")
    assert result["removed_files"] > 0
    assert not (committed_data(fake, tmp_path) / "index").exists()


def test_a_failing_server_check_refuses_unless_forced(tmp_path, fake, ops, monkeypatch):
    Server(fake, tmp_path).persist()
    snap = ops.snapshot("x")

    def broken(settings):
        def count() -> int:
            raise ConnectionError("Modal unreachable")

        return count

    monkeypatch.setattr(maintenance, "server_containers", broken)
    with pytest.raises(StateError, match="could not check whether the server runs"):
        ops.restore(snap["id"], confirm="tabby-data")
    assert ops.restore(snap["id"], force=True, confirm="tabby-data")["restored"] == snap["id"]


def test_destructive_calls_need_the_volume_name(tmp_path, fake, ops):
    Server(fake, tmp_path).persist()
    snap = ops.snapshot("x")
    before = tree_state(fake.data.committed), tree_state(fake.backups.committed)
    for call in (
        lambda: ops.restore(snap["id"]),
        lambda: ops.reset("all", confirm="tabby-dat"),
        lambda: ops.prune(0, 0, 0),
    ):
        with pytest.raises(StateError, match="confirm"):
            call()
    assert (tree_state(fake.data.committed), tree_state(fake.backups.committed)) == before
    assert ops.prune(0, 0, 0, dry_run=True)["dry_run"] is True  # a dry run needs no confirmation


def test_maintenance_lease_held_expired_and_broken(tmp_path, fake, ops):
    Server(fake, tmp_path).persist()
    snap = ops.snapshot("x")
    other = lease.Lease(fake.locks, lease.MAINTENANCE, "restore", ttl=600, owner="alice-laptop").acquire()
    try:
        with pytest.raises(StateError, match="maintenance lock held: restore by alice-laptop"):
            ops.restore(snap["id"], confirm="tabby-data")
    finally:
        other._stop.set()  # alice's run "crashes": no heartbeat, no release
    # Expired entries are taken over by the next run.
    fake.locks.put(lease.MAINTENANCE, {**fake.locks.get(lease.MAINTENANCE), "expires": time.time() - 1})
    assert ops.restore(snap["id"], confirm="tabby-data")["restored"] == snap["id"]
    assert fake.locks.get(lease.MAINTENANCE) is None
    # A live lease of a dead run: `unlock` breaks it.
    lease.Lease(fake.locks, lease.MAINTENANCE, "reset all", ttl=600, owner="bob").acquire()._stop.set()
    status = ops.locks_status()
    assert status[lease.MAINTENANCE]["live"] and status[lease.MAINTENANCE]["owner"] == "bob"
    assert ops.unlock()["held"][lease.MAINTENANCE]["owner"] == "bob"  # live: only named without force
    assert set(ops.unlock(force=True)["broken"]) == {lease.MAINTENANCE}
    assert ops.locks_status() == {lease.MAINTENANCE: None, lease.STORE: None, "store_file": None}


def test_store_lease_orders_runs_in_different_containers(tmp_path, fake, ops, monkeypatch):
    Server(fake, tmp_path).persist()
    monkeypatch.setenv("TABBY_MODAL_LOCK_WAIT", "0")
    held = lease.Lease(fake.locks, lease.STORE, "prune", ttl=600, owner="other-container").acquire()
    before = tree_state(fake.backups.committed)
    with pytest.raises(StateError, match="store lock held: prune by other-container"):
        ops.snapshot("blocked")
    assert tree_state(fake.backups.committed) == before
    held.release()
    assert ops.snapshot("after")["files"] > 0


def test_not_deployed_names_the_make_target(fake, ops):
    fake.deployed = False
    with pytest.raises(StateError, match="make deploy-maintenance"):
        ops.snapshots()


def test_export_import_restore_round_trip_through_modal(tmp_path, fake, ops):
    server = Server(fake, tmp_path)
    server.persist()
    snap = ops.snapshot("src")
    original = committed_data(fake, tmp_path)

    out = tmp_path / "exported.tar.gz"
    exported = ops.export_archive("latest", out)
    assert exported["snapshot"] == snap["id"] and out.stat().st_size == exported["archive_bytes"]
    assert not (fake.backups.committed / maintenance.TRANSFER_DIR).exists() or not any(
        (fake.backups.committed / maintenance.TRANSFER_DIR).iterdir()
    )  # the staged archive was deleted after the download
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "ee/db.sqlite" in names and not any(n.endswith(("-wal", "-shm")) for n in names)

    add_user(server.live, "after-export@example.com")
    server.persist()
    imported = ops.import_archive(out, "moved")
    assert imported["id"].endswith("-moved") and imported["files"] == snap["files"]
    assert not any((fake.backups.committed / maintenance.TRANSFER_DIR).iterdir())
    ops.restore(imported["id"], confirm="tabby-data")
    back = committed_data(fake, tmp_path)
    assert db_users(back / "ee/db.sqlite") == db_users(original / "ee/db.sqlite")
    assert {k: v[-1] for k, v in tree_state(back).items() if v[0] == "file"} == {
        k: v[-1] for k, v in tree_state(original).items() if v[0] == "file"
    }


def test_scheduled_backup_snapshots_then_prunes(tmp_path, fake, monkeypatch):
    Server(fake, tmp_path).persist()
    monkeypatch.setenv("TABBY_MODAL_KEEP_LAST", "2")
    monkeypatch.setenv("TABBY_MODAL_KEEP_DAILY", "0")
    monkeypatch.setenv("TABBY_MODAL_KEEP_WEEKLY", "0")
    runs = [fake.lookup("scheduled_backup").remote() for _ in range(3)]
    assert all(r["snapshot"]["label"] == "scheduled" for r in runs)
    assert len(runs[-1]["prune"]["removed"]) == 1
    kept = {runs[1]["snapshot"]["id"], runs[2]["snapshot"]["id"]}
    assert set(fresh_store(fake, tmp_path).ids()) == kept


def test_every_refusal_reaches_the_caller_as_one_line(tmp_path, fake, ops):
    with pytest.raises(StateError, match="unknown snapshot") as err:
        ops.restore("20990101T000000Z-abcd-nope", confirm="tabby-data")
    assert "\n" not in str(err.value)
    with pytest.raises(StateError, match="no such file"):
        ops.import_archive(tmp_path / "missing.tar.gz")
    (tmp_path / "there.tar.gz").write_bytes(b"x")
    with pytest.raises(StateError, match="exists"):
        ops.export_archive("latest", tmp_path / "there.tar.gz")
    assert (tmp_path / "there.tar.gz").read_bytes() == b"x"
    assert fake.calls == [
        ("restore", {"snapshot": "20990101T000000Z-abcd-nope", "force": False, "confirm": "tabby-data"})
    ]


def test_repair_and_partial_restore_through_the_app(tmp_path, fake, ops):
    """A corrupt blob in the committed backups Volume: repair (a dry run needs no confirmation and writes nothing),
    then a partial restore names the file the snapshot lost; both commit what they wrote."""
    server = Server(fake, tmp_path)
    (server.live / "note.txt").write_text("only in the first snapshot\n")
    server.persist()
    snap = ops.snapshot("x")
    (server.live / "note.txt").unlink()
    server.persist()
    store = fresh_store(fake, tmp_path)
    name, off, _ = store.locate(store.load(snap["id"]).files["note.txt"].sha256)
    path = fake.backups.committed / name
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[off] ^= 1
    path.write_bytes(bytes(raw))
    # The corrupt copy is quarantined, and committed: a snapshot in another container will not dedup against it.
    assert not ops.verify()["ok"]
    assert (fake.backups.committed / "quarantine.json").is_file()
    before = tree_state(fake.backups.committed)
    assert ops.repair(dry_run=True)["lost"] == {snap["id"]: ["note.txt"]}
    assert tree_state(fake.backups.committed) == before
    with pytest.raises(StateError, match="confirm"):
        ops.repair()
    assert ops.repair(confirm="tabby-data")["lost"] == {snap["id"]: ["note.txt"]}
    assert fresh_store(fake, tmp_path).verify()["ok"]  # committed
    with pytest.raises(StateError, match="--partial"):
        ops.restore(snap["id"], confirm="tabby-data")
    res = ops.restore(snap["id"], confirm="tabby-data", partial=True)
    assert [m["path"] for m in res["left_out"]] == ["note.txt"] and res["files"] > 10
