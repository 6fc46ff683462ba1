"""The snapshot store on real directories: dedup, verify, restore, prune, reset, inspect, locks, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.state import database, inspection, mirror
from shared.state.atomic import hash_file
from shared.state.errors import HashMismatch, StateError
from shared.state.locks.store_lock import LOCK_NAME, LockHeld, StoreLock, break_lock, read_lock
from shared.state.mirror import Entry
from shared.state.packs import PACK_FOOTER
from shared.state.progress import Progress
from shared.state.store import DirectoryBackend, Snapshot, Store, UnknownSnapshot, blob_name, snapshot_name
from shared.state.store.core import ID_RE
from tests.conftest import REPO
from tests.harness import mirrored_bytes
from tests.tabby_root import counter_values, make_root, tree_state

SEED = 11
DAY = 86400.0


@dataclass
class Env:
    live: Path
    data: Path
    backups: Path
    store: Store


@pytest.fixture
def env(tmp_path: Path) -> Env:
    make_root(tmp_path / "live", size_mb=0.5, seed=SEED, wal_rows=12)
    mirror.persist(tmp_path / "live", tmp_path / "data")
    return Env(tmp_path / "live", tmp_path / "data", tmp_path / "backups", Store.open(tmp_path / "backups"))


def flip(path: Path, offset: int = 0) -> None:
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 0x01
    path.write_bytes(bytes(raw))


def blobs(backups: Path) -> list[Path]:
    return sorted(p for p in (backups / "blobs").rglob("*") if p.is_file())


def age_persist(data: Path, seconds: float = 3600) -> None:
    """Make the last persist look old, as when the server has been stopped for a while."""
    doc = json.loads((data / mirror.MANIFEST).read_bytes())
    doc["time_unix"] -= seconds
    (data / mirror.MANIFEST).write_bytes(json.dumps(doc).encode())


# --- snapshot ----------------------------------------------------------------------------------------------------


def test_snapshot_then_repeat_writes_no_blob(env):
    first = env.store.snapshot(env.data, "nightly")
    assert ID_RE.match(first["id"]) and first["id"].endswith("-nightly")
    assert first["consistency"] == "persist" and first["new_blobs"] > 0
    assert first["new_bytes"] <= first["bytes"]  # duplicate contents are stored once
    before = blobs(env.backups)
    again = env.store.snapshot(env.data, "nightly")
    assert again["new_blobs"] == 0 and again["new_bytes"] == 0
    assert blobs(env.backups) == before
    assert [s["id"] for s in env.store.list()] == [first["id"], again["id"]]
    # Blobs are named by their content and never writable.
    for b in before[:10]:
        assert hash_file(b)[1] == b.name and b.stat().st_mode & 0o222 == 0


def test_snapshot_of_a_plain_root_takes_the_database_through_the_backup_api(env, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(env.live, plain, symlinks=True)  # a self-hosted ~/.tabby, -wal and all
    res = env.store.snapshot(plain, "import")
    assert res["consistency"] == "direct" and res["databases"] == {"ee/db.sqlite": "ok"}
    target = tmp_path / "restored"
    env.store.restore(res["id"], target)
    assert counter_values(target / "ee/db.sqlite") == list(range(1, 13))
    assert not (target / "models").exists()


def test_snapshot_of_a_data_dir_changed_under_its_manifest_is_labelled_crash(env):
    # A plain file of the data dir (>= 1 MiB; smaller ones live in packs, which are never changed).
    (env.live / "big.bin").write_bytes(b"p" * (2 << 20))
    mirror.persist(env.live, env.data)
    (env.data / "big.bin").write_text("written after the manifest\n")
    res = env.store.snapshot(env.data)
    assert res["consistency"] == "crash"
    snap = env.store.load(res["id"])
    assert snap.files["big.bin"].size == len("written after the manifest\n")
    assert (
        snap.files["config.toml"].sha256
        == hashlib.sha256(mirrored_bytes(env.data, "config.toml")).hexdigest()
    )
    assert env.store.verify(res["id"])["ok"]


def test_snapshot_after_an_interrupted_persist(env, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    marker = {"pid": int(dead.stdout), "host": os.uname().nodename, "op": "persist", "time": time.time()}
    (env.data / mirror.PENDING).write_text(json.dumps(marker))
    res = env.store.snapshot(env.data)
    assert res["consistency"] == "crash" and env.store.verify(res["id"])["ok"]


# --- verify and corruption -------------------------------------------------------------------------------------


def test_verify_ok_and_sampled(env):
    sid = env.store.snapshot(env.data)["id"]
    full = env.store.verify()
    assert full["ok"] and full["blobs_checked"] == full["blobs"] > 0 and full["databases_drilled"] == 1
    part = env.store.verify(sid, sample=0.25)
    assert part["ok"] and 0 < part["blobs_checked"] < full["blobs"]
    assert env.store.verify(sample=0)["blobs_checked"] == 0
    with pytest.raises(StateError):
        env.store.verify(sample=1.5)


def test_every_flipped_byte_is_found_and_blocks_restore(env, tmp_path):
    make_root(tmp_path / "small", size_mb=0.05, seed=5)
    mirror.persist(tmp_path / "small", tmp_path / "sdata")
    sid = env.store.snapshot(tmp_path / "sdata")["id"]
    snap = env.store.load(sid)
    by_sha: dict[str, list[str]] = {}
    for p, e in sorted(snap.files.items()):
        if e.link is None:
            by_sha.setdefault(e.sha256, []).append(p)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert len(by_sha) > 20
    where = {sha: env.store.locate(sha) for sha in by_sha}
    assert any(name.startswith("packs/") for name, _, _ in where.values())  # small files are packed
    assert where[snap.files["ee/db.sqlite"].sha256][0].startswith("blobs/")  # the database is not
    for i, (sha, (name, offset, length)) in enumerate(sorted(where.items())):
        blob = env.backups / name
        original = blob.read_bytes()
        flip(blob, offset=offset + (i * 7919) % length)  # a byte of this blob, wherever it lives
        report = env.store.verify(sid)
        assert not report["ok"]
        corrupt = "blob content does not match its sha256 (corrupt)"
        assert report["problems"] == [{"snapshot": sid, "path": p, "problem": corrupt} for p in by_sha[sha]]
        before = (tree_state(target), tree_state(env.backups))
        with pytest.raises(StateError, match="fails verification"):
            env.store.restore(sid, target, force=True)
        assert (tree_state(target), tree_state(env.backups)) == before
        blob.write_bytes(original)
        os.chmod(blob, 0o444)
    assert env.store.verify(sid)["ok"]


def test_missing_blob_is_reported_and_blocks_restore(env, tmp_path):
    sid = env.store.snapshot(env.data)["id"]
    db_blob = env.backups / blob_name(env.store.load(sid).files["ee/db.sqlite"].sha256)
    db_blob.unlink()
    report = env.store.verify()
    assert not report["ok"]
    assert (
        report["problems"][0]["path"] == "ee/db.sqlite" and "missing blob" in report["problems"][0]["problem"]
    )
    with pytest.raises(StateError, match="missing blob"):
        env.store.restore(sid, tmp_path / "target", force=True)
    assert not (tmp_path / "target").exists()


def test_verify_checks_the_index_names_only_present_segments(env, tmp_path):
    sid = env.store.snapshot(env.data)["id"]
    doc = json.loads((env.backups / snapshot_name(sid)).read_bytes())
    seg = json.loads(mirrored_bytes(env.data, "index/corpus/meta.json"))["segments"][0]["segment_id"]
    doc["files"] = [f for f in doc["files"] if seg.replace("-", "") not in f["path"]]
    (env.backups / snapshot_name(sid)).write_bytes(json.dumps(doc).encode())
    report = env.store.verify(sid)
    assert any("index meta.json names a segment" in p["problem"] for p in report["problems"])


# --- refusals ---------------------------------------------------------------------------------------------------

UNSAFE = {
    "absolute": {"path": "/etc/passwd", "size": 1, "mtime_ns": 0, "mode": 420, "sha256": "0" * 64},
    "dotdot": {"path": "../outside", "size": 1, "mtime_ns": 0, "mode": 420, "sha256": "0" * 64},
    "link-out": {"path": "events/escape", "link": "../../../etc", "mode": 511},
    "link-chain-out": {"path": "repositories/a", "link": "..", "mode": 511},
}


def _tamper(env: Env, sid: str, how: str) -> None:
    path = env.backups / snapshot_name(sid)
    doc = json.loads(path.read_bytes())
    if how in UNSAFE:
        doc["files"].append(UNSAFE[how])
        if how == "link-chain-out":  # each link alone stays inside; together they leave
            doc["files"].append({"path": "repositories/b", "link": "a/..", "mode": 511})
        path.write_bytes(json.dumps(doc).encode())
    elif how == "duplicate":
        doc["files"].append(doc["files"][3])
        path.write_bytes(json.dumps(doc).encode())
    elif how == "malformed":
        path.write_bytes(path.read_bytes()[:-50])
    elif how == "not-an-object":
        path.write_bytes(b"[1, 2]")


@pytest.mark.parametrize("how", [*UNSAFE, "duplicate", "malformed", "not-an-object"])
def test_unsafe_manifests_are_refused_and_nothing_is_written(env, tmp_path, how):
    sid = env.store.snapshot(env.data)["id"]
    _tamper(env, sid, how)
    age_persist(env.data)
    before = tree_state(tmp_path)
    with pytest.raises(StateError) as err:
        env.store.restore(sid, env.data)
    assert "\n" not in str(err.value) and sid in str(err.value)
    assert tree_state(tmp_path) == before
    report = env.store.verify()
    assert not report["ok"] and report["problems"][0]["path"] == snapshot_name(sid)
    assert env.store.list()[-1]["id"] == sid and "problem" in env.store.list()[-1]
    with pytest.raises(StateError):
        env.store.restore(sid, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("sid", ["20991231T000000Z-abcd-nope", "../../etc/passwd", "", "latest"])
def test_unknown_snapshot_ids_are_refused(tmp_path, sid):
    store = Store.open(tmp_path / "backups")
    before = tree_state(tmp_path)
    with pytest.raises(UnknownSnapshot):
        store.restore(sid, tmp_path / "data")
    with pytest.raises(UnknownSnapshot):
        store.verify(sid)
    assert tree_state(tmp_path) == before


def test_restore_refuses_while_a_live_run_writes_the_data_dir_not_after_a_recent_persist(env):
    sid = env.store.snapshot(env.data)["id"]
    mirror.write_pending(env.data, "persist")  # a persist of this (live) process, mid-way
    before = tree_state(env.data)
    with pytest.raises(StateError, match=f"restore: a persist is running in .* \\(pid {os.getpid()}\\)"):
        env.store.restore(sid, env.data)
    with pytest.raises(StateError, match="reset: a persist is running"):
        env.store.reset(env.data, "auth")
    assert tree_state(env.data) == before
    # A persist that just finished says nothing about a server: whether one runs is the caller's check (Modal's
    # containers, or DIR's serve lock), not a guess from the manifest's age.
    mirror.persist(env.live, env.data)
    assert env.store.restore(sid, env.data)["restored"] == sid


# --- restore ----------------------------------------------------------------------------------------------------


def test_restore_replaces_the_data_dir(env, tmp_path):
    sid = env.store.snapshot(env.data, "good")["id"]
    expected = {p: e for p, e in env.store.load(sid).files.items()}
    (env.live / "config.toml").write_text("changed later\n")
    (env.live / "events/extra.json").write_text("{}\n")
    mirror.persist(env.live, env.data)
    (env.data / "ee/db.sqlite-wal").write_bytes(b"stale wal that would be replayed")
    (env.data / "ee/db.sqlite-shm").write_bytes(b"stale shm")
    (env.data / "models").mkdir()
    (env.data / "models/keep.gguf").write_bytes(b"not ours")
    res = env.store.restore(sid, env.data, force=True)
    assert res["restored"] == sid and res["safety_snapshot"]
    assert not (env.data / "events/extra.json").exists()
    assert not (env.data / "ee/db.sqlite-wal").exists() and not (env.data / "ee/db.sqlite-shm").exists()
    assert (env.data / "models/keep.gguf").exists()
    manifest = mirror.load_manifest(env.data)
    assert manifest.origin == "restore" and mirror.pending_info(env.data) is None
    assert {p: (e.sha256, e.link) for p, e in manifest.files.items()} == {
        p: (e.sha256, e.link) for p, e in expected.items()
    }
    # The safety snapshot holds what was there before.
    safety = env.store.load(res["safety_snapshot"])
    assert "events/extra.json" in safety.files
    back = tmp_path / "back"
    mirror.hydrate(env.data, back)
    assert counter_values(back / "ee/db.sqlite") == list(range(1, 13))


def test_restore_latest_into_an_empty_dir(env, tmp_path):
    env.store.snapshot(env.data)
    res = env.store.restore("latest", tmp_path / "new")
    assert res["safety_snapshot"] is None
    assert database.check_file(tmp_path / "new/ee/db.sqlite") == "ok"
    assert os.readlink(tmp_path / "new/repositories/https_github.com_example_project.git/main.py")


# --- prune ------------------------------------------------------------------------------------------------------


def _snap(sid: str, t: float) -> Snapshot:
    return Snapshot(sid, "x", t, "persist", {}, {}, {})


def test_retention_plan():
    now = 1_800_000_000.0
    snaps = [_snap(f"s{i:03d}", now - i * DAY / 4) for i in range(60)]  # 4 a day for 15 days
    assert Store.plan(snaps, 0, 0, 0) == {"s000"}  # the newest always stays
    assert Store.plan(snaps, 3, 0, 0) == {"s000", "s001", "s002"}
    daily = Store.plan(snaps, 0, 5, 0)
    assert len(daily) == 5 and "s000" in daily
    weekly = Store.plan(snaps, 0, 0, 2)
    assert len(weekly) == 2 and "s000" in weekly


def _clone(store: Store, sid: str, when: float, label: str) -> str:
    return store.import_entries(store.iter_files(sid), label=label, time_unix=when)["id"]


def test_prune_forgets_old_snapshots_then_their_blobs(env):
    base = env.store.snapshot(env.data, "base")["id"]
    now = time.time()
    old = [_clone(env.store, base, now - d * DAY, f"day{d}") for d in (30, 20, 10)]
    (env.data / "only-old.txt").write_text("an old file")
    # A blob only the oldest snapshot will name.
    snap_old = env.store.import_entries(
        [(Entry("only-old.txt", size=11, mtime_ns=0, mode=0o644), io.BytesIO(b"an old file"))],
        label="old",
        time_unix=now - 40 * DAY,
    )["id"]
    only_old_blob = env.backups / env.store.locate(env.store.load(snap_old).files["only-old.txt"].sha256)[0]
    assert only_old_blob.exists()
    (env.backups / "blobs/.incoming.tmtmp-dead").write_bytes(b"half a blob")

    before = tree_state(env.backups)
    plan = env.store.prune(1, 2, 0, dry_run=True)
    assert tree_state(env.backups) == before  # a dry run writes nothing, not even the lock
    assert set(plan["removed"]) == {snap_old, *old[:2]} and plan["blobs_removed"] == 1

    res = env.store.prune(1, 2, 0)
    assert (
        set(res["removed"]) == set(plan["removed"]) and res["blobs_removed"] == 1 and res["temp_removed"] == 1
    )
    assert not only_old_blob.exists() and not (env.backups / "blobs/.incoming.tmtmp-dead").exists()
    assert {s["id"] for s in env.store.list()} == {base, old[2]}
    assert env.store.verify()["ok"]
    assert not (env.backups / LOCK_NAME).exists()


def test_prune_keeps_blobs_while_a_manifest_is_unreadable(env):
    a = env.store.snapshot(env.data)["id"]
    b = env.store.import_entries(
        [(Entry("x.txt", size=3, mtime_ns=0, mode=0o644), io.BytesIO(b"xyz"))], time_unix=time.time() - DAY
    )["id"]
    _tamper(env, b, "malformed")
    nblobs = len(blobs(env.backups))
    res = env.store.prune(1, 0, 0)
    assert res["unreadable"] == [b] and not res["blob_gc"] and len(blobs(env.backups)) == nblobs
    assert env.store.ids() == sorted([a, b])


# --- reset ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "gone", "kept"),
    [("auth", ["ee/"], ["index/", "events/"]), ("index", ["index/", "repositories/"], ["ee/", "events/"])],
)
def test_reset_scopes(env, tmp_path, scope, gone, kept):
    res = env.store.reset(env.data, scope, force=True)
    assert res["safety_snapshot"] and res["removed_files"] > 0
    left = mirror.load_manifest(env.data)
    assert left.origin == "reset" and not any(p.startswith(tuple(gone)) for p in left.files)
    assert all(any(p.startswith(k) for p in left.files) for k in kept)
    assert not any(p.startswith(tuple(gone)) for p in mirror.scan(env.data))
    # The safety snapshot brings it all back.
    env.store.restore(res["safety_snapshot"], env.data, force=True)
    assert counter_values(env.data / "ee/db.sqlite") == list(range(1, 13))


def test_reset_all_leaves_a_fresh_instance(env, tmp_path):
    res = env.store.reset(env.data, "all", force=True)
    assert res["files_left"] == 0
    assert mirror.hydrate(env.data, tmp_path / "fresh")["fresh"] is True
    with pytest.raises(StateError, match="unknown scope"):
        env.store.reset(env.data, "everything", force=True)


# --- export / import hooks --------------------------------------------------------------------------------------


def test_iter_files_and_import_entries_round_trip(env, tmp_path):
    sid = env.store.snapshot(env.data)["id"]
    other = Store.open(tmp_path / "other")
    res = other.import_entries(env.store.iter_files(sid), label="imported")
    assert res["consistency"] == "import" and res["databases"] == {"ee/db.sqlite": "ok"}
    a, b = env.store.load(sid).files, other.load(res["id"]).files
    assert {p: (e.sha256, e.link, e.mode) for p, e in a.items()} == {
        p: (e.sha256, e.link, e.mode) for p, e in b.items()
    }
    assert other.verify()["ok"]


def test_iter_files_raises_on_a_corrupt_blob(env):
    sid = env.store.snapshot(env.data)["id"]
    e = env.store.load(sid).files["config.toml"]
    name, offset, _ = env.store.locate(e.sha256)
    flip(env.backups / name, offset)
    with pytest.raises(HashMismatch):
        for _entry, f in env.store.iter_files(sid):
            if f is not None:
                while f.read(7):
                    pass


@pytest.mark.parametrize("bad", ["../x", "/abs", "dup", "sidecar", "link-out", "short", "bad-db"])
def test_import_refusals_leave_the_store_as_it_was(env, tmp_path, bad):
    env.store.snapshot(env.data)
    entries = [(Entry("a.txt", size=5, mtime_ns=0, mode=0o644), io.BytesIO(b"hello"))]
    entries.append((Entry("new-content.bin", size=9, mtime_ns=0, mode=0o644), io.BytesIO(b"brand new")))
    if bad == "dup":
        entries.append((Entry("a.txt", size=5, mtime_ns=0, mode=0o644), io.BytesIO(b"hello")))
    elif bad == "sidecar":
        entries.append((Entry("ee/db.sqlite-wal", size=3, mtime_ns=0, mode=0o644), io.BytesIO(b"wal")))
    elif bad == "link-out":
        entries.append((Entry("l", link="../../etc"), None))
    elif bad == "short":
        entries.append((Entry("b.txt", size=50, mtime_ns=0, mode=0o644), io.BytesIO(b"only a few")))
    elif bad == "bad-db":
        entries.append((Entry("ee/db.sqlite", size=4096, mtime_ns=0, mode=0o644), io.BytesIO(b"\x01" * 4096)))
    else:
        entries.append((Entry(bad, size=1, mtime_ns=0, mode=0o644), io.BytesIO(b"x")))
    before = tree_state(env.backups)
    with pytest.raises(StateError, match="import refused"):
        env.store.import_entries(iter(entries))
    assert tree_state(env.backups) == before


def test_add_tree(env, tmp_path):
    res = env.store.add_tree(env.live, "laptop")
    assert res["consistency"] == "direct" and res["id"].endswith("-laptop")
    with pytest.raises(StateError):
        env.store.add_tree(tmp_path / "nope")


# --- packs ------------------------------------------------------------------------------------------------------


def _import(store: Store, files: dict[str, bytes], when: float, label: str) -> str:
    entries = [(Entry(p, size=len(b), mtime_ns=0, mode=0o644), io.BytesIO(b)) for p, b in files.items()]
    return store.import_entries(entries, label=label, time_unix=when)["id"]


def test_a_corrupt_pack_index_names_each_snapshot_and_path_and_blocks_restore(env, tmp_path):
    sid = env.store.snapshot(env.data)["id"]
    snap = env.store.load(sid)
    cfg = snap.files["config.toml"]
    pack, _, _ = env.store.locate(cfg.sha256)
    held = {sha for sha, _, _ in env.store.catalog().packs[pack]}
    paths = sorted(p for p, e in snap.files.items() if e.sha256 in held)
    size = (env.backups / pack).stat().st_size
    flip(env.backups / pack, size - PACK_FOOTER.size - 2)  # inside the pack's index
    fresh = Store.open(env.backups)  # no cached index
    report = fresh.verify()
    assert not report["ok"]
    assert sorted(pr["path"] for pr in report["problems"]) == paths
    assert all(pr["snapshot"] == sid and "missing blob" in pr["problem"] for pr in report["problems"])
    with pytest.raises(StateError, match="fails verification"):
        fresh.restore(sid, tmp_path / "target", force=True)
    assert (
        fresh.prune(0, 0, 0)["packs_removed"] == 0 and (env.backups / pack).exists()
    )  # its blobs are unknown


CHILD_KILLED_MID_PACK = """
import os, sys, time
from pathlib import Path
from shared.state.store import Store
from shared.state.packs import PackWriter
first = PackWriter.add
def add(self, sha, data):
    first(self, sha, data)
    self.f.flush()
    print("mid-pack", self.tmp, flush=True)
    time.sleep(3600)  # until the parent kills us
PackWriter.add = add
Store.open(Path(sys.argv[1])).snapshot(Path(sys.argv[2]), "killed")
"""


def test_a_pack_left_half_written_by_a_killed_snapshot_is_harmless(env, tmp_path):
    base = env.store.snapshot(env.data, "base")["id"]
    (env.live / "new-file.txt").write_text("content no pack has yet")
    mirror.persist(env.live, env.data)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_KILLED_MID_PACK, str(env.backups), str(env.data)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().split()
    assert line[0] == "mid-pack", line
    half = Path(line[1])
    assert half.parent == env.backups / "packs" and half.stat().st_size > 0
    proc.kill()
    proc.wait()
    assert env.store.ids() == [base]  # no manifest for the killed run
    assert env.store.verify()["ok"] and env.store.stats()["packs"] >= 1
    again = env.store.snapshot(env.data, "again")
    assert again["new_blobs"] >= 1 and env.store.verify()["ok"]
    env.store.restore(again["id"], tmp_path / "target", force=True)
    assert mirrored_bytes(tmp_path / "target", "new-file.txt") == b"content no pack has yet"
    res = env.store.prune(10, 0, 0)
    assert res["temp_removed"] >= 1 and not half.exists() and res["removed"] == []


def test_prune_deletes_dead_packs_repacks_mostly_dead_ones_and_keeps_the_rest(tmp_path):
    store = Store.open(tmp_path / "backups")
    now = time.time()
    blob = {f"f{i}": os.urandom(10_000) for i in range(30)}
    old = _import(store, {f"a/{i}": blob[f"f{i}"] for i in range(10)}, now - 3 * DAY, "old")
    mid = _import(store, {f"b/{i}": blob[f"f{i}"] for i in range(10, 20)}, now - 2 * DAY, "mid")
    light = _import(store, {f"c/{i}": blob[f"f{i}"] for i in range(20, 30)}, now - DAY, "light")
    # The newest names 2 of mid's 10 blobs (80% of that pack is garbage) and 9 of light's 10 (10% garbage).
    keep = {"b/10": blob["f10"], "b/11": blob["f11"], **{f"c/{i}": blob[f"f{i}"] for i in range(21, 30)}}
    newest = _import(store, keep, now, "newest")
    packs = {name: {sha for sha, _, _ in idx} for name, idx in store.catalog().packs.items()}
    assert len(packs) == 3 and store.stats()["blobs"] == 30

    before = tree_state(tmp_path / "backups")
    plan = store.prune(1, 0, 0, dry_run=True)
    assert tree_state(tmp_path / "backups") == before
    assert plan["removed"] == sorted([old, mid, light]) and plan["blobs_removed"] == 10 + 8
    assert plan["packs_removed"] == 1 and plan["packs_repacked"] == 1

    res = store.prune(1, 0, 0)
    assert {k: res[k] for k in ("blobs_removed", "packs_removed", "packs_repacked")} == {
        "blobs_removed": 18,
        "packs_removed": 1,
        "packs_repacked": 1,
    }
    cat = store.catalog()
    assert len(cat.packs) == 2 and set(cat.packed) == {
        hashlib.sha256(b).hexdigest() for b in blob.values()
    } - {
        hashlib.sha256(blob[f"f{i}"]).hexdigest() for i in [*range(10), *range(12, 20)]
    }  # the lightly dead pack kept its one dead blob
    assert store.ids() == [newest] and store.verify()["ok"]
    store.restore(newest, tmp_path / "target", force=True)
    assert {p: mirrored_bytes(tmp_path / "target", p) for p in keep} == keep


def test_stores_without_packs_are_read_as_they_are(env, tmp_path):
    """A store from before packs: every blob a loose file under blobs/."""
    sid = env.store.snapshot(env.data)["id"]
    for sha, (name, offset, length) in {s: env.store.locate(s) for s in env.store.catalog().packed}.items():
        with (env.backups / name).open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        (env.backups / blob_name(sha)).parent.mkdir(exist_ok=True)
        (env.backups / blob_name(sha)).write_bytes(data)
    shutil.rmtree(env.backups / "packs")
    old = Store.open(env.backups)
    assert old.verify()["ok"] and old.stats()["packs"] == 0
    assert old.snapshot(env.data)["new_blobs"] == 0
    old.restore(sid, tmp_path / "target", force=True)
    assert database.check_file(tmp_path / "target/ee/db.sqlite") == "ok"


def test_write_small_only_inside_a_batch_and_an_aborted_batch_leaves_nothing(tmp_path):
    be = DirectoryBackend(tmp_path)
    sha = hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(RuntimeError):
        be.write_small(sha, b"hello")
    with pytest.raises(KeyboardInterrupt), be.batch():
        assert be.write_small(sha, b"hello") is True
        assert be.write_small(sha, b"hello") is False  # once per batch
        raise KeyboardInterrupt
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with be.batch() as published:
        be.write_small(sha, b"hello")
    assert len(published) == 1 and published[0].startswith("packs/")
    assert be.pack_index(published[0]) == [(sha, 0, 5)]
    assert be.read_range(published[0], 0, 5).read() == b"hello"


# --- backend ----------------------------------------------------------------------------------------------------


def test_directory_backend_write_once_checks_the_hash(tmp_path):
    be = DirectoryBackend(tmp_path)
    good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"  # sha256("hello")
    with pytest.raises(HashMismatch):
        be.write_once("blobs/x", io.BytesIO(b"hellO"), sha256=good)
    assert not be.exists("blobs/x") and list(be.list("blobs/")) == []
    assert be.write_once("blobs/x", io.BytesIO(b"hello"), sha256=good) is True
    assert be.write_once("blobs/x", io.BytesIO(b"other"), sha256=None) is False
    assert be.read("blobs/x").read() == b"hello"
    assert be.write_content(io.BytesIO(b"hello"), blob_name) == (good, 5, True)
    assert be.write_content(io.BytesIO(b"hello"), blob_name) == (good, 5, False)
    with pytest.raises(StateError):
        be.exists("../escape")


# --- inspect ----------------------------------------------------------------------------------------------------


def test_inspect_data_dir_and_snapshot(env):
    sid = env.store.snapshot(env.data)["id"]
    rep = inspection.inspect(env.data, env.store)
    db = rep["db"]
    assert db["integrity"] == "ok" and db["users"] == 3 and db["owner"] is True
    assert db["tables"]["counter"] == 12 and db["tables"]["refresh_tokens"] == 3
    assert db["schema_version"] == 50  # Tabby 0.32: 49 migrations, the last one 0050
    assert set(rep["dirs"]) == {".", "ee", "events", "index", "repositories"}
    # Small files live in packs: the Volume holds far fewer files and dirs than the data dir has files.
    assert rep["dirs"]["ee"]["files"] >= 9 and rep["packs"] >= 1 and rep["inodes"] < rep["files"]
    assert 0 <= rep["last_persist"]["age_seconds"] < 600 and rep["last_persist"]["pending"] is False
    assert rep["snapshots"]["count"] == 1 and rep["snapshots"]["bytes"] > 0
    snap = inspection.inspect(env.data, env.store, sid)
    assert snap["snapshot"] == sid and snap["db"]["users"] == 3 and snap["dirs"] == rep["dirs"]
    assert (env.data / "ee/db.sqlite-shm").exists() is False  # never opened in place


def test_inspect_fresh_and_ownerless(tmp_path):
    make_root(tmp_path / "live", size_mb=0.05, seed=1, users=0)
    rep = inspection.inspect(tmp_path / "live", None)
    assert rep["db"]["users"] == 0 and rep["db"]["owner"] is False and rep["last_persist"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert inspection.inspect(empty, None)["db"]["present"] is False


@pytest.mark.parametrize(
    ("columns", "row", "owner"),
    [("id INTEGER, email TEXT", "(1, 'a')", True), ("id INTEGER, is_owner BOOLEAN", "(1, 0)", False)],
)
def test_owner_detection_without_is_admin(tmp_path, columns, row, owner):
    import sqlite3

    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE users ({columns})")
        conn.execute(f"INSERT INTO users VALUES {row}")
    conn.close()
    assert database.inspect_file(db)["owner"] is owner


# --- locks ------------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from shared.state.locks.store_lock import StoreLock
StoreLock(sys.argv[1], "snapshot").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _wait_zombie(pid: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < end


def test_lock_held_by_a_live_process_then_broken_when_it_dies(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockHeld, match="snapshot by pid"):
            StoreLock(tmp_path, "prune", wait=0).acquire()
        proc.send_signal(signal.SIGKILL)
        _wait_zombie(proc.pid)  # dead but not reaped: still a dead holder
        with StoreLock(tmp_path, "prune", wait=0):
            assert read_lock(tmp_path)["op"] == "prune"
        assert read_lock(tmp_path) is None
    finally:
        proc.kill()
        proc.wait()


def test_locks_of_other_hosts_expire_by_ttl(tmp_path):
    info = {"pid": 1, "host": "elsewhere", "op": "snapshot", "time": time.time(), "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(info))
    with pytest.raises(LockHeld):
        StoreLock(tmp_path, "prune", ttl=3600, wait=0).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**info, "time": time.time() - 7200}))
    with StoreLock(tmp_path, "prune", ttl=3600, wait=0):
        pass
    (tmp_path / LOCK_NAME).write_text(json.dumps(info))
    assert break_lock(tmp_path)["host"] == "elsewhere" and read_lock(tmp_path) is None


def test_an_empty_lock_file_is_a_holder_mid_write_until_it_is_old(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"")
    with pytest.raises(LockHeld):
        StoreLock(tmp_path, "prune", wait=0).acquire()
    os.utime(tmp_path / LOCK_NAME, (time.time() - 60, time.time() - 60))
    with StoreLock(tmp_path, "prune", wait=0):
        pass


CONTENDER = """
import os, sys
from shared.state.locks.store_lock import StoreLock
log = sys.argv[2]
for i in range(15):
    with StoreLock(sys.argv[1], "op", wait=60):
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\\n")
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\\n")
"""


def test_contenders_never_hold_the_lock_together_even_when_breaking_a_stale_one(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = {
        "pid": int(dead.stdout),
        "host": os.uname().nodename,
        "op": "crashed",
        "time": time.time(),
        "token": "x",
    }
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    log = tmp_path / "log"
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), str(log)], cwd=REPO)
        for _ in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * 15 * 2
    for a, b in zip(lines[::2], lines[1::2], strict=True):
        assert a.startswith("in ") and b == "out " + a[3:]


# --- progress ---------------------------------------------------------------------------------------------------


def test_progress_is_throttled():
    now = [0.0]
    out = io.StringIO()
    p = Progress(
        "snapshot", total_files=100, total_bytes=100 << 20, interval=5, stream=out, clock=lambda: now[0]
    )
    for _ in range(100):
        now[0] += 0.5
        p.add(1, 1 << 20)
    p.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # one per 5 s of a 50 s run, plus the closing line
    assert lines[0].startswith("snapshot: 10/100 files, 10.0/100.0 MiB, 2.0 MiB/s, ETA 45s")
    assert lines[-1].endswith("done in 50s")
    quiet = io.StringIO()
    q = Progress("x", interval=5, stream=quiet, clock=lambda: 0.0)
    q.add(5, 5)
    q.finish()
    assert quiet.getvalue() == ""
