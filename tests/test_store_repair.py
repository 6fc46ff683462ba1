"""Corruption you can recover from (issue 16 items 4 and 6): a corrupt blob is quarantined and never reused by
dedup, `repair` drops it and names what each snapshot lost, `restore`/`export --partial` take what is intact,
`latest` names the snapshot it skipped, and safety snapshots have their own retention count. Real stores on disk,
the real CLI where a user would type it; bytes flipped by hand in real packs and blobs."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from shared.operations import versions
from shared.state import archive, mirror
from shared.state.atomic import hash_file
from shared.state.errors import StateError
from shared.state.mirror import Entry
from shared.state.packs import PACK_FOOTER
from shared.state.store import Snapshot, Store, snapshot_name
from tests.conftest import run_cli
from tests.harness import mirrored, mirrored_bytes
from tests.tabby_root import make_root, tree_state

DAY = 86400.0
YES = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}


def flip(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    os.chmod(path, 0o444)


def cli(tmp: Path, *args: str, code: int | None = 0) -> dict | str:
    """`tabby-modal ARGS --local DIR --json`: the parsed JSON (or stderr when it refused)."""
    proc = run_cli([*args, "--local", str(tmp / "dir"), "--json"], tmp, **YES)
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {"error": proc.stderr}
    return doc["error"] if proc.returncode == 2 else doc


def corrupt_copy(store: Store, sha: str) -> Path:
    """Flip a byte in the middle of the stored copy of blob `sha` (in a pack or loose)."""
    name, off, n = store.locate(sha)
    flip(store.backend.root / name, off + n // 2)
    return store.backend.root / name


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """DIR/data persisted from a live Tabby-like root with a few files of our own: small ones (packed) and one
    over the pack limit (a loose blob)."""
    live = tmp_path / "live"
    make_root(live, size_mb=0.1, seed=3)
    (live / "extra").mkdir()
    (live / "extra/changes.txt").write_text("version one\n")
    (live / "extra/stays.txt").write_text("the same in every snapshot\n")
    (live / "extra/big.bin").write_bytes(os.urandom(1 << 20) + b"tail")
    persist(tmp_path)
    return tmp_path


def persist(tmp: Path) -> None:
    mirror.persist(tmp / "live", tmp / "dir/data")


def snapshot(tmp: Path, label: str = "manual") -> str:
    return Store.open(tmp / "dir/backups").snapshot(tmp / "dir/data", label)["id"]


def test_corrupt_blobs_are_stored_again_repaired_and_restored_partially(site: Path) -> None:
    tmp = site
    store = Store.open(tmp / "dir/backups")
    a = snapshot(tmp, "first")
    (tmp / "live/extra/changes.txt").write_text("version two\n")
    persist(tmp)
    b = snapshot(tmp, "second")
    files_a = store.load(a).files
    old, stays, big = (files_a[p].sha256 for p in ("extra/changes.txt", "extra/stays.txt", "extra/big.bin"))
    pack = store.locate(old)[0]
    assert pack.startswith("packs/") and store.locate(stays)[0].startswith("packs/")
    assert store.locate(big)[0].startswith("blobs/")
    corrupt_copy(store, old)  # only snapshot A names it, and the data dir no longer has it: lost
    corrupt_copy(store, stays)  # both snapshots name it; the data dir still has it
    corrupt_copy(store, big)  # a loose blob

    # verify finds all three, quarantines them, and says what to do next.
    proc = run_cli(["verify", "--local", str(tmp / "dir")], tmp)
    assert proc.returncode == 1 and "docs/recovery.md" in proc.stdout and "repair" in proc.stdout
    assert {p.split(": ")[0].split()[-1] for p in proc.stdout.splitlines() if "corrupt" in p} == {
        "extra/changes.txt",
        "extra/stays.txt",
        "extra/big.bin",
    }

    # The next snapshot does not dedup against the corrupt copies: it stores them again from the data dir.
    c = store.snapshot(tmp / "dir/data", "after")
    assert c["new_blobs"] >= 2
    assert store.verify(c["id"])["ok"]
    assert store.verify(b)["ok"]  # B names only blobs the new snapshot stored again: whole again
    check = tmp / "check"
    Store.open(tmp / "dir/backups").restore(c["id"], check)
    assert mirrored_bytes(check, "extra/stays.txt") == b"the same in every snapshot\n"
    assert hash_file(check / "extra/big.bin")[1] == big

    # Restore without --partial refuses, and says what --partial and repair do.
    refused = run_cli(["restore", a, "--yes", "--local", str(tmp / "dir")], tmp, **YES)
    assert (
        refused.returncode == 2 and "--partial" in refused.stderr and "tabby-modal repair" in refused.stderr
    )
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr

    # A dry run says what a repair would do and writes nothing.
    before = tree_state(tmp / "dir/backups")
    dry = cli(tmp, "repair", "--dry-run", code=1)
    assert dry["dry_run"] and dry["lost"] == {a: ["extra/changes.txt"]}
    assert tree_state(tmp / "dir/backups") == before

    # repair: the pack is rewritten without the corrupt blob, snapshot A is told what it lost, verify passes.
    data_before = tree_state(tmp / "dir/data")
    done = cli(tmp, "repair", "--yes", code=1)
    assert done["lost"] == {a: ["extra/changes.txt"]} and pack in done["packs_rewritten"]
    assert not (tmp / "dir/backups" / pack).exists() and not (tmp / "dir/backups/quarantine.json").exists()
    assert tree_state(tmp / "dir/data") == data_before  # repair reads the data dir, never writes it
    assert store.verify()["ok"]
    assert store.load(a).doc["repaired"]["lost"] == ["extra/changes.txt"]

    # A restore of A needs --partial now; with it the rest is laid down, each left-out file named, exit 1.
    with pytest.raises(StateError, match="--partial"):
        store.restore(a, tmp / "elsewhere")
    proc = run_cli(["restore", a, "--partial", "--yes", "--local", str(tmp / "dir")], tmp, **YES)
    assert proc.returncode == 1 and "LEFT OUT 1 files" in proc.stdout and "extra/changes.txt" in proc.stdout
    assert "extra/changes.txt" not in mirrored(tmp / "dir/data")
    assert hash_file(tmp / "dir/data/ee/db.sqlite")[1] == files_a["ee/db.sqlite"].sha256
    assert mirrored_bytes(tmp / "dir/data", "extra/stays.txt") == b"the same in every snapshot\n"


def test_partial_restore_and_export_before_any_repair(site: Path) -> None:
    tmp = site
    store = Store.open(tmp / "dir/backups")
    a = snapshot(tmp)
    snap = store.load(a)
    (tmp / "live/extra/changes.txt").write_text("changed in the live root\n")
    persist(tmp)  # the data dir moves on: the old content exists only in the store
    corrupt_copy(store, snap.files["extra/changes.txt"].sha256)
    corrupt_copy(store, snap.files["extra/big.bin"].sha256)
    (tmp / "live/extra/big.bin").write_bytes(b"replaced")
    persist(tmp)
    gone = ["extra/big.bin", "extra/changes.txt"]

    out = tmp / "a.tar.gz"
    refused = run_cli(["export", a, "--out", str(out), "--local", str(tmp / "dir")], tmp)
    assert refused.returncode == 2 and "--partial" in refused.stderr and not out.exists()
    res = cli(tmp, "export", a, "--out", str(out), "--partial", code=1)
    assert [m["path"] for m in res["left_out"]] == gone and res["files"] == len(snap.files) - 2
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[0] == "ee/db.sqlite" and not set(gone) & set(names) and len(names) == len(snap.files) - 2

    res = store.restore(a, tmp / "dir/data", partial=True)
    assert [m["path"] for m in res["left_out"]] == gone and res["safety_snapshot"]
    assert hash_file(tmp / "dir/data/ee/db.sqlite")[1] == snap.files["ee/db.sqlite"].sha256
    assert "extra/big.bin" not in mirrored(tmp / "dir/data")

    # A corrupt database is never left out of a restore (the data dir would start as a fresh instance).
    corrupt_copy(store, snap.files["ee/db.sqlite"].sha256)
    before = tree_state(tmp / "dir/data")
    with pytest.raises(StateError, match=r"database ee/db\.sqlite .*export --partial"):
        store.restore(a, tmp / "dir/data", partial=True)
    assert tree_state(tmp / "dir/data") == before


def test_restore_latest_names_the_newer_snapshot_it_skipped(site: Path) -> None:
    tmp = site
    a = snapshot(tmp, "good")
    b = snapshot(tmp, "newest")
    manifest = tmp / "dir/backups" / snapshot_name(b)
    manifest.write_bytes(manifest.read_bytes()[:200])  # truncated
    res = archive.export_snapshot(Store.open(tmp / "dir/backups"), "latest", tmp / "l.tar.gz")
    assert res["snapshot"] == a and [s["id"] for s in res["skipped_newer"]] == [b]
    proc = run_cli(["restore", "latest", "--yes", "--local", str(tmp / "dir")], tmp, **YES)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped newer snapshot {b}" in proc.stdout and f"restored {a}" in proc.stdout


def test_safety_snapshots_have_their_own_retention_count(site: Path) -> None:
    tmp = site
    store = Store.open(tmp / "dir/backups")
    upgrade = store.snapshot(tmp / "dir/data", "pre-upgrade-0.31.0-to-0.32.0")["id"]
    versions.record(tmp / "dir/backups", {"version": "0.32.0", "outcome": "ok", "snapshot": upgrade})
    mine = snapshot(tmp, "before-experiment")
    sched = snapshot(tmp, "scheduled")
    safety = [store.restore(mine, tmp / "dir/data")["safety_snapshot"] for _ in range(4)]
    assert all(s and "pre-restore" in s for s in safety)
    res = cli(tmp, "prune", "--keep-last", "2", "--keep-daily", "1", "--keep-weekly", "0", "--yes")
    # The two newest of the user's and the schedule's, the three newest safety copies (TABBY_MODAL_KEEP_SAFETY),
    # and the pre-upgrade snapshot of the last upgrade recorded.
    assert set(res["kept"]) == {mine, sched, *safety[-3:], upgrade}
    assert set(res["removed"]) == set(safety[:1])


def _snap(sid: str, t: float, label: str) -> Snapshot:
    return Snapshot(sid, label, t, "persist", {}, {}, {})


def test_retention_plan_counts_safety_apart():
    now = 1_800_000_000.0
    regular = [_snap(f"r{i}", now - DAY - i, "manual") for i in range(3)]
    safety = [_snap(f"s{i}", now - i, "pre-reset-auth" if i % 2 else "pre-restore") for i in range(6)]
    keep = Store.plan([*regular, *safety], 2, 1, 0, keep_safety=2)
    assert keep == {"r0", "r1", "s0", "s1"}
    assert Store.plan([*regular, *safety], 2, 1, 0, keep_safety=0) == {"r0", "r1", "s0"}  # the newest stays


def _import(store: Store, files: dict[str, bytes], when: float) -> str:
    entries = [(Entry(p, size=len(b), mtime_ns=0, mode=0o644), io.BytesIO(b)) for p, b in files.items()]
    return store.import_entries(entries, time_unix=when)["id"]


def test_a_pack_index_that_parses_but_lies_is_reported_and_its_blobs_never_deleted(tmp_path):
    """Mutant: the pack index checksum check removed (packs.parse_pack_index). A changed hex digit in a blob's
    sha256 still parses; without the checksum prune took the pack for garbage and deleted the only copy."""
    store = Store.open(tmp_path / "backups")
    keep, drop = b"kept by the newest snapshot\n" * 40, b"only the old snapshot names this\n" * 40
    old = _import(store, {"a.txt": keep, "b.txt": drop}, time.time() - DAY)  # one pack: both blobs
    new = _import(store, {"a.txt": keep}, time.time())
    pack = store.backend.root / store.locate(store.load(new).files["a.txt"].sha256)[0]
    raw = pack.read_bytes()
    sha = store.load(new).files["a.txt"].sha256.encode()
    at = raw.rindex(sha)
    lie = b"0" if sha[:1] != b"0" else b"1"
    pack.chmod(0o644)
    pack.write_bytes(raw[:at] + lie + raw[at + 1 :])
    length = PACK_FOOTER.unpack(raw[-PACK_FOOTER.size :])[0]
    assert json.loads(pack.read_bytes()[-PACK_FOOTER.size - length : -PACK_FOOTER.size])  # still parses

    fresh = Store.open(tmp_path / "backups")
    report = fresh.verify()
    assert not report["ok"] and list(report["bad_packs"]) == [str(pack.relative_to(tmp_path / "backups"))]
    assert any(p["snapshot"] == new and "missing blob" in p["problem"] for p in report["problems"])
    res = fresh.prune(1, 0, 0)
    assert res["removed"] == [old] and pack.exists()  # the only copy of a.txt stays
    pack.write_bytes(raw)
    assert Store.open(tmp_path / "backups").verify(new)["ok"]


def test_prune_deletes_no_pack_while_a_manifest_is_unreadable(tmp_path):
    """Mutant: prune runs blob GC while a manifest is unreadable. With small files (packs, not loose blobs) the
    pack only the unreadable snapshot names must survive, and verify pass once the manifest is back."""
    store = Store.open(tmp_path / "backups")
    a = _import(
        store, {"only-a.txt": b"named only by the snapshot whose manifest breaks\n"}, time.time() - DAY
    )
    _import(store, {"b.txt": b"the newest snapshot\n"}, time.time())
    packs = sorted((tmp_path / "backups/packs").rglob("*"))
    manifest = tmp_path / "backups" / snapshot_name(a)
    good = manifest.read_bytes()
    manifest.write_bytes(good[: len(good) // 2])
    res = store.prune(5, 0, 0)
    assert res["unreadable"] == [a] and not res["blob_gc"]
    assert sorted((tmp_path / "backups/packs").rglob("*")) == packs
    manifest.write_bytes(good)
    assert store.verify()["ok"]
