"""The snapshot store and the tools over a PACKED data dir (issue 19): most files of `/data` live in packs under
`.tabby-modal/packs/`, named by the persist manifest. Snapshot reads them through the manifest, restore writes
them into packs, reset drops them from the manifest, repair stores them again from their packs, inspect counts
them; and a restore killed at any of its steps still leaves the old state, the new one, or a marked data dir.

Real files throughout: a persisted Tabby-like root of 2,000 small files plus large ones, real stores, real
`tabby-modal` processes killed with SIGKILL. Outcomes are judged by the bytes (sha256 of every file, read from the
packs by offset here, not through the code under test) and by the files really on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.state import database, inspection, mirror
from shared.state.errors import StateError
from shared.state.mirror.packed import PACKS_DIR, pack_file, pack_files, packable
from shared.state.store import Store
from tests.tabby_root import make_root, tree_state
from tests.test_interrupted_restore import add_files, restore_cmd, restore_marker

SMALL_FILES = 2000
BIG = (1 << 20) + 4096  # just over the pack limit: a plain file in the data dir, a loose blob in the store


# --- reading a data dir without the code under test ------------------------------------------------------------


def on_disk(data: Path) -> set[str]:
    """The files (and links) really in the data dir: what a Modal Volume counts."""
    out = set()
    for dirpath, _, files in os.walk(data):
        out |= {(Path(dirpath) / f).relative_to(data).as_posix() for f in files}
    return out


def raw_bytes(data: Path, e: mirror.Entry) -> bytes:
    if e.pack is None:
        return (data / e.path).read_bytes()
    with open(pack_file(data, e.pack), "rb") as f:
        f.seek(e.offset)
        return f.read(e.size)


def held(data: Path) -> dict[str, str]:
    """What a data dir with no pending marker holds: sha256 of each file's bytes (or `->target`), checked
    against its manifest; plain files the manifest does not name are shown as `stray:PATH`."""
    assert mirror.pending_info(data) is None
    manifest = mirror.load_manifest(data)
    assert manifest is not None
    out = {}
    for p, e in manifest.files.items():
        if e.link is not None:
            assert os.readlink(data / p) == e.link
            out[p] = "->" + e.link
            continue
        sha = hashlib.sha256(raw_bytes(data, e)).hexdigest()
        assert sha == e.sha256, p
        out[p] = sha
    for p in mirror.scan(data):
        if p not in manifest.files or manifest.files[p].pack is not None:
            out[f"stray:{p}"] = "left behind"
    return out


def tree(root: Path) -> dict[str, str]:
    """A live root by content (what `scan` mirrors), databases left out: their copies have the same rows but
    other bytes."""
    out = {}
    for p, n in mirror.scan(root).items():
        if p in database.DB_PATHS:
            continue
        out[p] = "->" + n.link if n.link is not None else hashlib.sha256((root / p).read_bytes()).hexdigest()
    return out


def dead_persist_marker(data: Path) -> None:
    """The pending marker a persist killed mid-pass leaves: written by a process that is gone."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    marker = {"pid": int(dead.stdout), "host": os.uname().nodename, "op": "persist", "time": time.time()}
    (data / mirror.PENDING).write_text(json.dumps(marker))


def check_layout(data: Path) -> mirror.PersistManifest:
    """The data dir holds only its manifest, the packs it names and its plain files (databases, files >= 1 MiB,
    links): no small file at its path, no staging left, no pack no manifest names."""
    manifest = mirror.load_manifest(data)
    assert manifest is not None and mirror.pending_info(data) is None
    plain = {p for p, e in manifest.files.items() if e.pack is None}
    assert all(e.link is not None or not packable(p, e.size) for p, e in manifest.files.items() if p in plain)
    packs = {f"{PACKS_DIR}/{i}.pack" for i in manifest.packs}
    # (lock files are never mirrored, and a restore leaves those it finds alone)
    ours = {p for p in on_disk(data) if p.startswith(f"{mirror.META_DIR}/")} - {mirror.WRITER_LOCK}
    assert ours | {p for p in on_disk(data) if not mirror.excluded(p)} == {mirror.MANIFEST, *packs, *plain}
    assert {i: pack_file(data, i).stat().st_size for i in manifest.packs} == manifest.packs
    assert {e.pack for e in manifest.files.values() if e.pack} == set(manifest.packs)
    return manifest


# --- the source: a persisted 2,000-small-file root ------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("packed-source")
    live, data = base / "live", base / "data"
    make_root(live, size_mb=2, seed=19, files=SMALL_FILES)
    (live / "big").mkdir()
    (live / "big/one.bin").write_bytes(os.urandom(BIG))
    (live / "big/two.bin").write_bytes(os.urandom(BIG + 1))
    mirror.persist(live, data)
    store = Store.open(base / "backups")
    snap = store.snapshot(data, "source")
    return {"base": base, "live": live, "data": data, "sid": snap["id"], "snap": snap}


def copy_of(source: dict[str, object], tmp: Path) -> tuple[Path, Store]:
    """A private copy of the persisted data dir and its store."""
    shutil.copytree(source["data"], tmp / "data", symlinks=True)  # type: ignore[arg-type]
    shutil.copytree(source["base"] / "backups", tmp / "backups", symlinks=True)  # type: ignore[operator]
    return tmp / "data", Store.open(tmp / "backups")


def test_the_source_data_dir_is_packed(source):
    data = source["data"]
    manifest = check_layout(data)
    assert len(manifest.files) >= SMALL_FILES * 0.99
    assert len(on_disk(data)) < len(manifest.files) // 20


def test_rebuild_manifest_keeps_what_a_packed_data_dir_holds(source, tmp_path):
    """Describing a data dir anew (new epoch) keeps its packed files and their packs, unless told otherwise."""
    data, _ = copy_of(source, tmp_path)
    before, old = held(data), mirror.load_manifest(data)
    new = mirror.rebuild_manifest(data, origin="restore")
    assert new.epoch != old.epoch and new.packs == old.packs
    assert held(data) == before
    check_layout(data)


# --- snapshot ----------------------------------------------------------------------------------------------------


def test_snapshot_of_a_packed_data_dir_persist_and_crash(source, tmp_path):
    data, store = copy_of(source, tmp_path)
    manifest = mirror.load_manifest(data)
    want = {p: (e.size, e.sha256, e.link) for p, e in manifest.files.items()}
    snap = store.load(source["sid"])
    assert source["snap"]["consistency"] == "persist"
    assert {p: (e.size, e.sha256, e.link) for p, e in snap.files.items()} == want
    assert all(
        e.pack is None and e.offset == 0 for e in snap.files.values()
    )  # the store's format is unchanged
    assert all("pack" not in f and "offset" not in f for f in snap.doc["files"])

    # An interrupted persist (its marker, left by a process that is gone): the tree as it stands, packed files
    # included (their packs are whole).
    dead_persist_marker(data)
    crash = store.snapshot(data, "crash")
    assert crash["consistency"] == "crash"
    got = store.load(crash["id"]).files
    db = "ee/db.sqlite"  # copied through the backup API on this path: the same rows, other bytes
    assert {p: (e.size, e.sha256, e.link) for p, e in got.items() if p != db} == {
        p: v for p, v in want.items() if p != db
    }
    assert db in got and crash["databases"][db] == "ok"
    assert store.verify(crash["id"])["ok"]


def test_snapshot_refuses_a_data_dir_whose_pack_is_gone(source, tmp_path):
    data, store = copy_of(source, tmp_path)
    before = store.ids()
    victim = next(iter(mirror.load_manifest(data).packs))
    pack_file(data, victim).unlink()
    # Blobs already in the store are not read again: a fresh store must read every pack.
    fresh = Store.open(tmp_path / "fresh")
    with pytest.raises(StateError, match="a pack its persist manifest names is gone"):
        fresh.snapshot(data, "gone")
    assert fresh.ids() == [] and store.ids() == before  # never a snapshot that silently lacks files


# --- restore -----------------------------------------------------------------------------------------------------


def test_restore_into_an_empty_and_a_plain_data_dir_writes_packs(source, tmp_path):
    store = Store.open(source["base"] / "backups")  # type: ignore[operator]
    want = held(source["data"])  # type: ignore[arg-type]
    plain_tree = tmp_path / "plain"  # a data dir of loose files (written by an old release, or by hand)
    make_root(plain_tree, size_mb=0.3, seed=4, files=300)
    shutil.rmtree(plain_tree / "models")
    (plain_tree / "big").mkdir()
    (plain_tree / "big/one.bin").write_bytes(b"x" * BIG)  # a plain file the snapshot has, with other bytes
    plain_files = set(mirror.scan(plain_tree))
    for target in (tmp_path / "empty", plain_tree):
        started = time.monotonic()
        res = store.restore(source["sid"], target)
        took = time.monotonic() - started
        manifest = check_layout(target)
        assert held(target) == want
        assert manifest.origin == "restore" and manifest.epoch
        print(
            f"\nrestore of {len(manifest.files)} files into {target.name}: {len(on_disk(target))} files on disk, {took:.2f}s"
        )
        assert len(on_disk(target)) < len(manifest.files) // 20
        assert (res["safety_snapshot"] is None) == (target.name == "empty")
        assert not list((target / mirror.META_DIR).glob("restore-staging-*"))
        back = tmp_path / f"hydrated-{target.name}"
        mirror.hydrate(target, back)
        assert tree(back) == tree(source["live"])  # type: ignore[arg-type]
        assert (
            hashlib.sha256((back / "ee/db.sqlite").read_bytes()).hexdigest()
            == manifest.files["ee/db.sqlite"].sha256
        )
    assert set(store.load(res["safety_snapshot"]).files) == plain_files  # what it replaced is kept


def test_restore_over_a_data_dir_of_packed_files_only_takes_a_safety_snapshot(tmp_path):
    """No plain file at all (a scan sees nothing) is not an empty data dir: what it holds is kept first."""
    live, data, store = tmp_path / "live", tmp_path / "data", Store.open(tmp_path / "backups")
    (live / "b").mkdir(parents=True)
    (live / "a.txt").write_text("first\n")
    (live / "b/c.txt").write_text("kept\n")
    mirror.persist(live, data)
    first = store.snapshot(data, "first")["id"]
    (live / "a.txt").write_text("second, never snapshotted\n")
    mirror.persist(live, data)
    assert mirror.scan(data) == {}  # every file packed
    now = held(data)
    res = store.restore(first, data)
    assert res["safety_snapshot"] is not None
    assert snapshot_content(store, res["safety_snapshot"]) == now
    store.restore(res["safety_snapshot"], data)
    assert held(data) == now


# --- reset, repair, inspect --------------------------------------------------------------------------------------


def test_reset_index_of_a_packed_data_dir(source, tmp_path):
    data, store = copy_of(source, tmp_path)
    before = held(data)
    old_packs = set(pack_files(data))
    doomed = {p for p in before if p.startswith(("index/", "repositories/"))}
    assert len(doomed) > SMALL_FILES // 2
    res = store.reset(data, "index")
    assert res["removed_files"] == len(doomed) and res["safety_snapshot"]
    check_layout(data)
    assert held(data) == {p: h for p, h in before.items() if p not in doomed}
    assert set(pack_files(data)) <= old_packs  # nothing rewritten: kept entries stay in their packs
    mirror.hydrate(data, tmp_path / "back")
    assert not (tmp_path / "back/index").exists() and (tmp_path / "back/events").is_dir()
    # The safety snapshot holds everything: restoring it brings the index back.
    store.restore(res["safety_snapshot"], data)
    assert held(data) == before


def test_reset_refuses_when_a_pack_it_keeps_is_gone(source, tmp_path):
    """A manifest written without the files of a missing pack would drop them silently: refused before the
    marker, nothing written. (The safety snapshot succeeds: the store already holds every blob.)"""
    data, store = copy_of(source, tmp_path)
    pack_file(data, mirror.load_manifest(data).files["config.toml"].pack or "").unlink()
    before = tree_state(data)
    with pytest.raises(
        StateError, match=r"refused: reset: pack [0-9a-f]{16} that the persist manifest names"
    ):
        store.reset(data, "index")
    assert tree_state(data) == before and mirror.pending_info(data) is None


def test_repair_stores_a_corrupt_blob_again_from_a_packed_file(source, tmp_path):
    data, store = copy_of(source, tmp_path)
    e = mirror.load_manifest(data).files["config.toml"]
    assert e.pack is not None
    name, off, n = store.locate(e.sha256)
    assert name.startswith("packs/")
    blob = tmp_path / "backups" / name
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[off + n // 2] ^= 0x01
    blob.write_bytes(bytes(raw))
    res = store.repair(data)
    assert {"sha256": e.sha256, "path": "config.toml"} in res["stored_again"]
    assert res["lost"] == {} and res["missing"] == {}
    assert store.verify()["ok"]
    store.restore(source["sid"], tmp_path / "restored")
    assert held(tmp_path / "restored") == held(data)


def test_inspect_counts_what_a_packed_data_dir_holds(source, tmp_path):
    data, _ = copy_of(source, tmp_path)
    manifest = mirror.load_manifest(data)
    rep = inspection.inspect(data)
    assert rep["files"] == len(manifest.files) == len(mirror.scan(source["live"]))  # type: ignore[arg-type]
    assert rep["bytes"] == manifest.bytes
    assert sum(d["files"] for d in rep["dirs"].values()) == rep["files"]
    assert rep["dirs"]["index"]["files"] == sum(p.startswith("index/") for p in manifest.files)
    entries = sum(len(d) + len(f) for _, d, f in os.walk(data))
    assert rep["inodes"] == entries and rep["inodes"] < rep["files"] // 10
    assert rep["packs"] == len(manifest.packs) >= 1
    # Under a pending persist marker: the tree as it stands, packed files included.
    dead_persist_marker(data)
    assert inspection.inspect(data)["files"] == len(manifest.files)


# --- a restore killed at every step ------------------------------------------------------------------------------


def two_packed_states(tmp: Path, extra: int) -> tuple[Path, Store, str, str]:
    """DIR whose data dir holds state A; snapshots A and B in DIR/backups. Both have packs and large files; between
    them a large file is kept, one is added and one dropped, one turns small (plain -> packed at the same path),
    and packed files trade places with directories."""
    local = tmp / "state"
    data = local / "data"
    store = Store.open(local / "backups")
    ids = []
    for seed in (0, 1):
        root = tmp / f"root-{seed}"
        make_root(root, size_mb=0.2, seed=seed, users=2 + seed)
        add_files(root, extra, seed)
        (root / "big").mkdir()
        (root / "big/shared.bin").write_bytes(b"s" * BIG)
        (root / f"big/only-{seed}.bin").write_bytes(bytes([65 + seed]) * BIG)
        (root / "big/turns.bin").write_bytes(b"t" * (BIG if seed == 0 else 100))
        (root / "shape").mkdir()
        if seed == 0:
            (root / "shape/x").write_text("a packed file where B has a directory\n")
            (root / "shape2").write_bytes(b"2" * BIG)
        else:
            (root / "shape/x").mkdir()
            (root / "shape/x/y").write_text("a packed file where A had one\n")
            (root / "shape2").mkdir()
            (root / "shape2/z").write_text("where A had a large file\n")
        mirror.persist(root, data)
        ids.append(store.snapshot(data, "ab")["id"])
    store.restore(ids[0], data)
    return local, store, ids[0], ids[1]


def snapshot_content(store: Store, sid: str) -> dict[str, str]:
    return {
        p: "->" + e.link if e.link is not None else e.sha256 or "" for p, e in store.load(sid).files.items()
    }


def plain_steps(store: Store, data: Path, target: str) -> int:
    """The fault steps of a restore of `target` over `data` (see shared/state/store/restore.py): the marker, each
    plain file swapped in, each plain file removed (gone, or packed now), the manifest, the marker's removal."""
    files = store.load(target).files
    plain = {p for p, e in files.items() if e.link is not None or not packable(p, e.size)}
    return 1 + len(plain) + len(set(mirror.scan(data)) - plain) + 2


def kill_at_every_step(tmp: Path, extra: int, directions: int) -> dict[str, int]:
    local, store, a, b = two_packed_states(tmp, extra)
    data = local / "data"
    want = {a: snapshot_content(store, a), b: snapshot_content(store, b)}
    assert held(data) == want[a] and want[a] != want[b]
    counts = {"tried": 0, "old": 0, "new": 0, "marked": 0, "mixed_unmarked": 0, "lost": 0, "leftovers": 0}
    here = a
    for _ in range(directions):
        target = b if here == a else a
        total = plain_steps(store, data, target)
        # The count of the steps a whole run reaches is what the kills below walk through, one by one.
        tally = tmp / "count.json"
        done = restore_cmd(local, target, tmp, TM_TEST_FAULT=f"restore:count:{tally}")
        assert done.returncode == 0, done.stderr
        assert json.loads(tally.read_text())["restore"] == total
        store.restore(here, data)
        for at in range(1, total + 1):
            cut = restore_cmd(local, target, tmp, TM_TEST_FAULT=f"restore:{at}:KILL")
            counts["tried"] += 1
            assert cut.returncode == -signal.SIGKILL, (at, cut.returncode, cut.stderr)
            marker = restore_marker(data)
            if marker is None:
                now = held(data)
                key = "old" if now == want[here] else "new" if now == want[target] else "mixed_unmarked"
                counts[key] += 1
            else:
                counts["marked"] += 1
                assert marker["target"] == target and marker["safety"]
                # The next restore takes the run over (its safety snapshot kept) and finishes it.
                assert store.restore(target, data)["safety_snapshot"] == marker["safety"]
                assert snapshot_content(store, marker["safety"]) == want[here]
            if held(data) == want[target]:
                try:
                    check_layout(data)  # no pack of the killed run or of the state before is left over
                except AssertionError:
                    counts["leftovers"] += 1
            elif held(data) != want[here]:
                counts["lost"] += 1
            store.restore(here, data)
        here = target
    return counts


def test_a_restore_killed_at_any_step_is_old_new_or_marked_and_finishes(tmp_path):
    started = time.monotonic()
    counts = kill_at_every_step(tmp_path, extra=150, directions=1)
    print(f"\npacked restore faults ({time.monotonic() - started:.1f}s): {counts}")
    assert counts["mixed_unmarked"] == 0 and counts["lost"] == 0 and counts["leftovers"] == 0
    assert counts["old"] == 1 and counts["marked"] == counts["tried"] - 1  # only the step before the marker


@pytest.mark.stress
def test_a_restore_killed_at_any_step_both_ways_5k_files(tmp_path):
    counts = kill_at_every_step(tmp_path, extra=5000, directions=2)
    print(f"\npacked restore faults: {counts}")
    assert counts["mixed_unmarked"] == 0 and counts["lost"] == 0 and counts["leftovers"] == 0
