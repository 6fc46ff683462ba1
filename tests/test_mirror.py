"""persist / hydrate on real files and real SQLite: consistency, change detection, refusals that write nothing."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from shared.state import database, mirror
from shared.state.atomic import hash_file, is_tmp
from shared.state.errors import StateError
from tests.harness import damage_mirrored, mirrored, mirrored_bytes, mirrored_names
from tests.tabby_root import counter_values, make_root, read_meta, tantivy_commit, tree_state

SEED = 7


@pytest.fixture
def live(tmp_path: Path) -> Path:
    make_root(tmp_path / "live", size_mb=1, seed=SEED, wal_rows=30)
    return tmp_path / "live"


def settle(live: Path, data: Path, deadline: float = 10.0) -> None:
    """Persist until a pass finds nothing to do (entries written within the racy window get one re-check)."""
    end = time.monotonic() + deadline
    while mirror.persist(live, data)["wrote_manifest"]:
        assert time.monotonic() < end, "persist never settled"


def rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM counter").fetchone()[0]


def data_is_consistent(data: Path) -> None:
    """What a commit may publish: manifest present, no pending marker, every file as listed, DB and index sound."""
    m = mirror.load_manifest(data)
    assert m is not None and mirror.pending_info(data) is None
    for p, e in m.files.items():
        if e.link is not None:
            assert os.readlink(data / p) == e.link
        elif e.pack is not None:
            assert mirrored_bytes(data, p)  # its slice hashes to the manifest's sha256
            assert not (data / p).exists(), f"{p}: packed, and a plain copy left at its path"
        else:
            assert hash_file(data / p) == (e.size, e.sha256), p
    assert database.check_file(data / "ee/db.sqlite") == "ok"
    for p in m.files:
        if mirror.is_index_meta(p):
            assert mirror.meta_missing(p, mirrored_bytes(data, p), m.files) == [], p


def test_roundtrip_keeps_content_modes_mtimes_and_links(live, tmp_path):
    data, back = tmp_path / "data", tmp_path / "back"
    for name, mode in (
        ("private.txt", 0o600),
        ("tool.sh", 0o755),
        ("shared.txt", 0o666),
        ("odd.txt", 0o1640),
    ):
        (live / name).write_text(name)
        os.chmod(live / name, mode)  # 0o666: bits the umask would drop when the file is created
    res = mirror.persist(live, data)
    assert res["databases"] == {"ee/db.sqlite": "ok"} and res["wrote_manifest"]
    hy = mirror.hydrate(data, back)
    assert hy["fresh"] is False and hy["checked"] == "manifest"
    src = mirror.scan(live)
    assert set(mirror.scan(back)) == set(src)
    for p, n in src.items():
        if n.link is not None:
            assert os.readlink(back / p) == n.link
        elif p != "ee/db.sqlite":
            assert (back / p).read_bytes() == (live / p).read_bytes(), p
            assert (back / p).stat().st_mtime_ns == n.mtime_ns
            assert (back / p).stat().st_mode & 0o7777 == n.mode
    # Excluded: models, lock files, SQLite sidecars; kept: a work tree's Cargo.lock.
    assert not (back / "models").exists() and not (data / "models").exists()
    assert not list(back.rglob("*.tantivy-*.lock")) and not list(back.rglob("index.lock"))
    assert list(back.rglob("Cargo.lock"))
    assert not (data / "ee/db.sqlite-wal").exists()
    assert counter_values(back / "ee/db.sqlite") == list(range(1, 31))


def test_database_goes_through_backup_api_not_a_file_copy(live, tmp_path):
    # The 30 counter rows were committed by a process that never checkpointed: they exist only in -wal.
    assert (live / "ee/db.sqlite-wal").stat().st_size > 0
    plain = tmp_path / "plain.sqlite"
    shutil.copyfile(live / "ee/db.sqlite", plain)
    assert rows(plain) == 0  # what a file copy would have published
    mirror.persist(live, tmp_path / "data")
    assert rows(tmp_path / "data/ee/db.sqlite") == 30
    assert database.check_file(tmp_path / "data/ee/db.sqlite") == "ok"


def test_a_pass_with_nothing_changed_reads_and_writes_nothing(live, tmp_path):
    data = tmp_path / "data"
    settle(live, data)
    before = tree_state(data)
    io_before = Path("/proc/self/io").read_text()
    res = mirror.persist(live, data)
    io_after = Path("/proc/self/io").read_text()
    assert res["changed"] == 0 and res["deleted"] == 0 and not res["wrote_manifest"]
    assert tree_state(data) == before

    def field(text: str, name: str) -> int:
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(name + ":")))

    assert field(io_after, "wchar") - field(io_before, "wchar") == 0
    assert field(io_after, "rchar") - field(io_before, "rchar") < 4096  # /proc/self/io itself only


def test_only_changed_files_are_copied(live, tmp_path):
    data = tmp_path / "data"
    settle(live, data)
    day = sorted((live / "events").iterdir())[-1]
    with open(day, "a") as f:
        f.write('{"event": "late"}\n')
    os.utime(live / "config.toml")  # touched, same content: hashed, not copied
    res = mirror.persist(live, data)
    assert res["changed"] == 1 and res["copied_bytes"] == day.stat().st_size
    assert mirrored_bytes(data, f"events/{day.name}") == day.read_bytes()
    data_is_consistent(data)


def test_same_size_rewrite_inside_the_racy_window_is_caught(live, tmp_path):
    data = tmp_path / "data"
    mirror.persist(live, data)
    cfg = live / "config.toml"
    cfg.write_bytes(b"A" * 40)
    mtime = cfg.stat().st_mtime_ns
    first = mirror.persist(live, data)
    assert first["changed"] >= 1
    cfg.write_bytes(b"B" * 40)
    os.utime(cfg, ns=(mtime, mtime))  # same size, same mtime: only the racy flag tells
    mirror.persist(live, data)
    assert mirrored_bytes(data, "config.toml") == b"B" * 40


def test_commits_only_complete_states_while_the_root_changes(live, tmp_path):
    data = tmp_path / "data"
    commits = []

    def commit() -> None:
        data_is_consistent(data)
        commits.append(mirror.load_manifest(data).seq)

    conn = sqlite3.connect(live / "ee/db.sqlite")
    import random

    rng = random.Random(SEED)
    for i in range(25):
        conn.execute("INSERT INTO counter(n) VALUES (?)", (1000 + i,))
        conn.commit()
        tantivy_commit(live / "index/corpus", rng)
        if i % 5 == 0:
            (live / f"ee/jobs/{100 + i}").mkdir(parents=True)
            (live / f"ee/jobs/{100 + i}/stdout.log").write_text(f"job {i}\n")
        if i % 7 == 3:
            shutil.rmtree(live / f"ee/jobs/{i // 7 + 1}", ignore_errors=True)
        mirror.persist(live, data, commit=commit)
    conn.close()
    assert len(commits) == 25
    # The data dir's index names only the live segments: old ones were collected after the new meta.json.
    assert (
        json.loads(mirrored_bytes(data, "index/corpus/meta.json"))["segments"]
        == read_meta(live / "index/corpus")["segments"]
    )
    live_segments = {p.name for p in (live / "index/corpus").iterdir() if not p.name.startswith(".")}
    assert {n for n in mirrored_names(data, "index/corpus") if not n.startswith(".")} == live_segments
    assert rows(data / "ee/db.sqlite") == 55


def test_type_changes_and_deletions(live, tmp_path):
    data = tmp_path / "data"
    mirror.persist(live, data)
    shutil.rmtree(live / "ee/jobs")
    (live / "ee/jobs").write_text("now a file\n")
    (live / "config.toml").unlink()
    (live / "config.toml").mkdir()
    (live / "config.toml/inner").write_text("x")
    res = mirror.persist(live, data)
    assert res["deleted"] >= 8
    assert mirrored_bytes(data, "ee/jobs") == b"now a file\n"
    assert mirrored_bytes(data, "config.toml/inner") == b"x"
    data_is_consistent(data)


def test_links_leaving_the_root_are_skipped(live, tmp_path):
    os.symlink("/etc/hostname", live / "repositories/outside")
    os.symlink("../../../..", live / "repositories/https_github.com_example_project.git/up")
    res = mirror.persist(live, tmp_path / "data")
    assert sum("leaves the root" in w for w in res["warnings"]) == 2
    assert not os.path.lexists(tmp_path / "data/repositories/outside")
    assert os.readlink(tmp_path / "data/repositories/https_github.com_example_project.git/main.py")


def test_empty_data_dir_is_a_fresh_instance(tmp_path):
    res = mirror.hydrate(tmp_path / "data", tmp_path / "live")
    assert res["fresh"] is True and (tmp_path / "live").is_dir()
    (tmp_path / "data").mkdir()
    assert mirror.hydrate(tmp_path / "data", tmp_path / "live2")["fresh"] is True


def test_hydrate_a_plain_root_without_manifest(live, tmp_path):
    # A copy of a self-hosted ~/.tabby, -wal included: taken as it is, the database through the backup API.
    plain = tmp_path / "plain"
    shutil.copytree(live, plain, symlinks=True)
    res = mirror.hydrate(plain, tmp_path / "back")
    assert res["checked"] == "tree"
    assert counter_values(tmp_path / "back/ee/db.sqlite") == list(range(1, 31))
    assert not (tmp_path / "back/models").exists()


def test_hydrate_over_an_existing_root_removes_stale_files_and_sidecars(live, tmp_path):
    data, back = tmp_path / "data", tmp_path / "back"
    mirror.persist(live, data)
    make_root(back, size_mb=0.2, seed=99)
    (back / "stale.txt").write_text("old")
    (back / "ee/db.sqlite-wal").write_bytes(b"garbage wal")
    mirror.hydrate(data, back)
    assert not (back / "stale.txt").exists() and not (back / "ee/db.sqlite-wal").exists()
    assert (back / "models").exists()  # not ours to delete
    assert counter_values(back / "ee/db.sqlite") == list(range(1, 31))


def test_hydrate_after_an_interrupted_persist_takes_the_tree_as_it_stands(live, tmp_path):
    data, back = tmp_path / "data", tmp_path / "back"
    (live / "index/big.bin").write_bytes(os.urandom(3 << 20))  # a plain file in the data dir (>= 1 MiB)
    mirror.persist(live, data)
    assert mirrored(data)["config.toml"].pack is not None and mirrored(data)["index/big.bin"].pack is None
    # As a killed persist leaves it: a newer plain file renamed in, and a plain copy of a packed file that the
    # pass had not removed yet (older than the manifest that packed it).
    mirror.write_pending(data, "persist")
    newer = os.urandom(2 << 20)
    (data / "index/big.bin").write_bytes(newer)
    (data / "config.toml").write_text("stale plain copy\n")
    res = mirror.hydrate(data, back)
    assert res["checked"] == "tree"
    assert (back / "index/big.bin").read_bytes() == newer
    assert (back / "config.toml").read_bytes() == (live / "config.toml").read_bytes()
    again = mirror.persist(live, data)  # the next persist repairs the data dir
    assert again["repaired"] and mirror.pending_info(data) is None
    assert mirrored_bytes(data, "index/big.bin") == (live / "index/big.bin").read_bytes()
    assert not (data / "config.toml").exists()  # the stale plain copy is gone
    data_is_consistent(data)


def _corrupt_db_but_keep_manifest_honest(data: Path) -> None:
    db = data / "ee/db.sqlite"
    raw = bytearray(db.read_bytes())
    raw[100:4096] = b"\xff" * (4096 - 100)  # smash the schema page
    db.write_bytes(bytes(raw))
    doc = json.loads((data / mirror.MANIFEST).read_bytes())
    for f in doc["files"]:
        if f[0] == "ee/db.sqlite":
            f[4] = hash_file(db)[1]
            f[1] = db.stat().st_size
            f[2] = db.stat().st_mtime_ns
    (data / mirror.MANIFEST).write_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "damage", ["db-fails-check", "file-changed", "file-grew", "file-shrank", "file-missing", "pack-missing"]
)
def test_hydrate_refuses_damaged_state_and_touches_nothing(live, tmp_path, damage):
    data, back = tmp_path / "data", tmp_path / "back"
    (live / "index/big.bin").write_bytes(os.urandom(3 << 20))
    mirror.persist(live, data)
    make_root(back, size_mb=0.1, seed=3)
    if damage == "db-fails-check":
        _corrupt_db_but_keep_manifest_honest(data)
    elif damage == "file-changed":
        damage_mirrored(data, next(p for p in mirrored(data) if p.endswith(".idx")), "flip")
    elif damage == "pack-missing":
        damage_mirrored(data, next(p for p in mirrored(data) if p.endswith(".term")), "missing")
    else:  # a plain file (>= 1 MiB) changed size, or is gone
        f = data / "index/big.bin"
        if damage == "file-missing":
            f.unlink()
        else:
            raw = f.read_bytes()
            f.write_bytes(raw + b"x" if damage == "file-grew" else raw[:-1])
    before_live, before_data = tree_state(back), tree_state(data)
    with pytest.raises(StateError) as err:
        mirror.hydrate(data, back)
    assert "live root untouched" in str(err.value) and "\n" not in str(err.value)
    assert tree_state(back) == before_live
    assert tree_state(data) == before_data
    assert [p.name for p in tmp_path.iterdir() if is_tmp(p.name)] == []


BAD_FILES = {  # format-2 rows: [path, size, mtime_ns, mode, sha256, pack, offset, racy] or [path, link]
    "absolute": ["/etc/passwd", 1, 0, 420, "0" * 64, None, 0, 0],
    "dotdot": ["ee/../../x", 1, 0, 420, "0" * 64, None, 0, 0],
    "link-out": ["repositories/escape", "../../etc"],
    "link-absolute": ["repositories/escape", "/etc"],
    "unlisted-pack": ["ee/x", 1, 0, 420, "0" * 64, "0123456789abcdef", 0, 0],
    "past-its-pack": ["ee/x", 1 << 30, 0, 420, "0" * 64, "PACK", 0, 0],
}


@pytest.mark.parametrize("bad", [*BAD_FILES, "duplicate", "malformed-json", "duplicate-key"])
def test_hydrate_refuses_unsafe_manifests_and_writes_nothing(live, tmp_path, bad):
    data, back = tmp_path / "data", tmp_path / "back"
    mirror.persist(live, data)
    path = data / mirror.MANIFEST
    doc = json.loads(path.read_bytes())
    if bad in BAD_FILES:
        row = list(BAD_FILES[bad])
        if row[5:6] == ["PACK"]:
            row[5] = next(iter(doc["packs"]))
        doc["files"].append(row)
        path.write_bytes(json.dumps(doc).encode())
    elif bad == "duplicate":
        doc["files"].append(doc["files"][0])
        path.write_bytes(json.dumps(doc).encode())
    elif bad == "duplicate-key":
        path.write_bytes(path.read_bytes().replace(b'{"bytes":', b'{"bytes":1,"bytes":', 1))
    else:
        path.write_bytes(path.read_bytes()[:-200])
    before = tree_state(tmp_path)
    with pytest.raises(StateError) as err:
        mirror.hydrate(data, back)
    assert "\n" not in str(err.value)
    assert tree_state(tmp_path) == before


def test_persist_refuses_to_overwrite_a_restored_data_dir(live, tmp_path):
    data = tmp_path / "data"
    mirror.persist(live, data)
    epoch = mirror.hydrate(data, tmp_path / "back")["epoch"]
    assert mirror.persist(tmp_path / "back", data, epoch=epoch)["epoch"] == epoch
    mirror.rebuild_manifest(data, origin="restore")  # what a restore or reset leaves behind
    before = tree_state(data)
    with pytest.raises(StateError, match="hydrate again"):
        mirror.persist(tmp_path / "back", data, epoch=epoch)
    assert tree_state(data) == before


def test_persist_refuses_a_bad_live_root(tmp_path):
    with pytest.raises(StateError):
        mirror.persist(tmp_path / "missing", tmp_path / "data")
    (tmp_path / "live").mkdir()
    with pytest.raises(StateError):
        mirror.persist(tmp_path / "live", tmp_path / "live/data")


def test_a_corrupt_live_database_is_never_published(live, tmp_path):
    data = tmp_path / "data"
    mirror.persist(live, data)
    good = tree_state(data)
    conn = sqlite3.connect(live / "ee/db.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = bytearray((live / "ee/db.sqlite").read_bytes())
    raw[100:4096] = b"\xff" * (4096 - 100)
    (live / "ee/db.sqlite").write_bytes(bytes(raw))
    with pytest.raises(database.DbCheckError):
        mirror.persist(live, data)
    assert (data / "ee/db.sqlite").read_bytes() and database.check_file(data / "ee/db.sqlite") == "ok"
    assert tree_state(data)["ee/db.sqlite"] == good["ee/db.sqlite"]


@pytest.mark.parametrize(
    ("path", "out"),
    [
        ("ee/db.sqlite-wal", True),
        ("ee/db.sqlite-shm", True),
        ("ee/db.sqlite-journal", True),
        ("index/.tantivy-meta.lock", True),
        ("models/TabbyML/x.gguf", True),
        (".tabby-modal/persist.json", True),
        ("repositories/r/Cargo.lock", False),
        ("repositories/r/.git/index.lock", True),
        ("events/2026-01-01.json", False),
        ("repositories/r/notes-wal", False),
    ],
)
def test_exclusions(path, out):
    assert mirror.excluded(path) is out
