"""The packed data dir (format 2, issue 19): small files live in packs, the Volume holds few files, every byte is
still checked; a format-1 data dir of the previous release is read and migrated; a persist killed at any of its
steps leaves a data dir that hydrates to old or new files (by hash) and that the next pass repairs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from shared.state import database, mirror
from shared.state.atomic import hash_file
from shared.state.mirror.packed import pack_files
from shared.state.packs import PACK_BLOB_MAX
from tests.harness import mirrored, mirrored_bytes, volume_files
from tests.tabby_root import make_root, tantivy_commit

REPO = Path(__file__).resolve().parent.parent
PREVIOUS_RELEASE = "b65c290"  # the last commit writing format 1


def hashes(root: Path) -> dict[str, str]:
    """sha256 (or `-> target`) of every mirrored file of a plain root; not the databases (a backup-API copy has the
    same rows in other bytes: those are checked by SQLite)."""
    out = {}
    for p, n in mirror.scan(root).items():
        if p in database.DB_PATHS:
            continue
        out[p] = f"-> {n.link}" if n.link is not None else hash_file(root / p)[1]
    return out


def data_hashes(data: Path) -> dict[str, str]:
    out = {}
    for p, e in mirrored(data).items():
        if p in database.DB_PATHS:
            continue
        out[p] = f"-> {e.link}" if e.link is not None else hashlib.sha256(mirrored_bytes(data, p)).hexdigest()
    return out


def index_sound(root: Path) -> None:
    for p in mirror.scan(root):
        if mirror.is_index_meta(p):
            present = {q: None for q in mirror.scan(root)}
            assert mirror.meta_missing(p, (root / p).read_bytes(), present) == [], p


def plain_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def many_small(root: Path, n: int, seed: int = 1) -> None:
    """`n` small files over nested dirs, as a cloned repository looks."""
    rng = __import__("random").Random(seed)
    for i in range(n):
        f = root / f"repositories/mono/pkg{i % 37}/mod{i % 11}/f{i}.py"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rng.randbytes(rng.randint(0, 3000)))


def test_small_files_go_to_packs_and_the_volume_holds_few_files(tmp_path):
    live, data, back = tmp_path / "live", tmp_path / "data", tmp_path / "back"
    make_root(live, size_mb=1, seed=3)
    many_small(live, 3000)
    (live / "index/big.seg").write_bytes(os.urandom(PACK_BLOB_MAX + 1))
    res = mirror.persist(live, data)
    entries = mirrored(data)
    packed = [e for e in entries.values() if e.pack is not None]
    assert len(entries) > 3000 and len(packed) >= len(entries) - 5
    assert entries["ee/db.sqlite"].pack is None and entries["index/big.seg"].pack is None
    # Files really on the Volume: packs, the database, the large file, the manifest.
    assert volume_files(data) <= res["packs"] + 6, volume_files(data)
    assert plain_files(data / "repositories") == []  # no plain copy of a packed file (links are plain)
    mirror.hydrate(data, back)
    assert hashes(back) == hashes(live)
    for p in ("config.toml", "index/big.seg"):
        assert (back / p).stat().st_mtime_ns == (live / p).stat().st_mtime_ns
        assert (back / p).stat().st_mode == (live / p).stat().st_mode


def test_a_pass_writes_one_small_pack_for_a_few_changes_and_compaction_bounds_the_packs(tmp_path):
    live, data, back = tmp_path / "live", tmp_path / "data", tmp_path / "back"
    make_root(live, size_mb=0.2, seed=4)
    many_small(live, 600)
    mirror.persist(live, data)
    first = set(pack_files(data))
    counts = []
    for i in range(90):  # a busy server: a few files change in every pass
        for k in range(5):
            f = live / f"repositories/mono/pkg{(i + k) % 37}/mod{k}/f{(i * 5 + k) % 600}.py"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(os.urandom(2000))
        res = mirror.persist(live, data)
        assert res["changed"] >= 5
        counts.append(len(pack_files(data)))
    assert max(counts) <= 64 + 2, counts  # small packs are merged, not left to pile up one per pass
    assert first - set(pack_files(data)), "no original pack was ever compacted away"
    mirror.hydrate(data, back)
    assert hashes(back) == hashes(live)


def _format_1_data_dir(live: Path, data: Path) -> None:
    """What the previous release's persist left: every file plain at its path, a format-1 manifest of objects."""
    files = []
    for p, n in sorted(mirror.scan(live).items()):
        if n.link is not None:
            os.makedirs((data / p).parent, exist_ok=True)
            os.symlink(n.link, data / p)
            files.append(mirror.Entry(p, mode=0o777, link=n.link))
            continue
        (data / p).parent.mkdir(parents=True, exist_ok=True)
        if p in database.DB_PATHS:
            database.backup(live / p, data / p)
        else:
            shutil.copy2(live / p, data / p)
        st = (data / p).stat()
        files.append(mirror.Entry(p, st.st_size, st.st_mtime_ns, n.mode, hash_file(data / p)[1]))
    doc = {
        "format": 1,
        "kind": "tabby-modal/persist",
        "time": "2026-12-01T00:00:00.000Z",
        "time_unix": 1796083200.0,
        "seq": 4,
        "epoch": "00aa11bb22cc33dd",
        "origin": "persist",
        "bytes": sum(e.size for e in files),
        "databases": [{"path": "ee/db.sqlite", "check": "ok", "sig": None, "racy": False}],
        "files": [e.to_json() for e in files],
    }
    (data / mirror.META_DIR).mkdir()
    (data / mirror.MANIFEST).write_text(json.dumps(doc))


def test_a_format_1_data_dir_hydrates_and_its_first_persist_packs_it(tmp_path):
    live, data = tmp_path / "live", tmp_path / "data"
    make_root(live, size_mb=0.5, seed=5)
    many_small(live, 500)
    _format_1_data_dir(live, data)
    before = volume_files(data)
    m = mirror.load_manifest(data)
    assert m is not None and all(e.pack is None for e in m.files.values())
    hy = mirror.hydrate(data, tmp_path / "back")  # read as it is
    assert hy["checked"] == "manifest" and hy["seq"] == 4
    assert hashes(tmp_path / "back") == hashes(live)
    # The server's first persist: nothing changed in the live root, yet the small files move into packs, and the
    # plain copies go only after the format-2 manifest naming the packs is in place.
    res = mirror.persist(tmp_path / "back", data, epoch=hy["epoch"], seq=hy["seq"])
    assert res["wrote_manifest"] and res["seq"] == 5 and res["epoch"] == hy["epoch"]
    assert json.loads((data / mirror.MANIFEST).read_bytes())["format"] == 2
    assert volume_files(data) < before / 20, (before, volume_files(data))
    assert data_hashes(data) == hashes(live)
    mirror.hydrate(data, tmp_path / "again")
    assert hashes(tmp_path / "again") == hashes(live)


def _previous_release(tmp_path: Path) -> Path:
    """The previous release's `shared/` package, from git (the repository's own history)."""
    out = tmp_path / "previous"
    out.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "shared"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE} is not in this clone's history ({err})")
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _run_previous(previous: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": str(previous)},
        cwd=previous,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_previous_release_writes_format_1_we_migrate_it_and_it_refuses_format_2(tmp_path):
    previous = _previous_release(tmp_path)
    live, data = tmp_path / "live", tmp_path / "data"
    make_root(live, size_mb=0.5, seed=6)
    many_small(live, 300)
    persist = "import sys; from pathlib import Path; from shared.state import mirror; mirror.persist(Path(sys.argv[1]), Path(sys.argv[2]))"
    hydrate = "import sys; from pathlib import Path; from shared.state import mirror; mirror.hydrate(Path(sys.argv[1]), Path(sys.argv[2]))"
    done = _run_previous(previous, persist, str(live), str(data))
    assert done.returncode == 0, done.stderr
    assert json.loads((data / mirror.MANIFEST).read_bytes())["format"] == 1
    assert (data / "repositories/mono/pkg0/mod0/f0.py").is_file()  # one file per file: format 1
    # This release: hydrate reads it, persist migrates it.
    hy = mirror.hydrate(data, tmp_path / "back")
    assert hashes(tmp_path / "back") == hashes(live)
    mirror.persist(tmp_path / "back", data, epoch=hy["epoch"], seq=hy["seq"])
    assert plain_files(data / "repositories") == [] and data_hashes(data) == hashes(live)
    # The previous release on a format-2 data dir: its hydrate refuses (its server would not start on it), and
    # nothing of the data dir changes.
    before = {p: hash_file(p)[1] for p in data.rglob("*") if p.is_file()}
    old = _run_previous(previous, hydrate, str(data), str(tmp_path / "old-back"))
    assert old.returncode != 0 and "unknown format 2" in old.stderr
    assert {p: hash_file(p)[1] for p in data.rglob("*") if p.is_file()} == before
    # Its persist (run by hand) treats the manifest as unreadable and re-copies the tree as format 1; we read that
    # again, and our next pass packs it and drops the packs that format-1 manifest left orphaned.
    done = _run_previous(previous, persist, str(live), str(data))
    assert done.returncode == 0, done.stderr
    assert json.loads((data / mirror.MANIFEST).read_bytes())["format"] == 1
    orphans = set(pack_files(data))
    assert orphans
    hy = mirror.hydrate(data, tmp_path / "back2")
    mirror.persist(tmp_path / "back2", data, epoch=hy["epoch"], seq=hy["seq"])
    assert not orphans & set(pack_files(data)) and data_hashes(data) == hashes(live)


RUNNER = """
import sys
from pathlib import Path
from shared.state import mirror
mirror.persist(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _one_busy_pass(live: Path) -> None:
    """Every kind of change in one pass: small files added, changed and deleted (enough to compact a pack), a large
    file rewritten, a large file deleted, the database written, an index commit."""
    for i in range(0, 400, 3):
        (live / f"repositories/mono/pkg{i % 37}/mod{i % 11}/f{i}.py").unlink(missing_ok=True)
    many_small(live, 120, seed=9)
    (live / "index/big.seg").write_bytes(os.urandom(PACK_BLOB_MAX + 7))
    (live / "index/gone.seg").unlink()
    conn = sqlite3.connect(live / "ee/db.sqlite")
    conn.execute("INSERT INTO counter(n) VALUES (424242)")
    conn.commit()
    conn.close()
    tantivy_commit(live / "index/corpus", __import__("random").Random(3))


def test_a_persist_killed_at_each_step_leaves_old_or_new_files_and_the_next_pass_repairs(tmp_path):
    live, template = tmp_path / "live", tmp_path / "template"
    make_root(live, size_mb=0.3, seed=8)
    many_small(live, 400)
    (live / "index/big.seg").write_bytes(os.urandom(PACK_BLOB_MAX + 3))
    (live / "index/gone.seg").write_bytes(os.urandom(PACK_BLOB_MAX + 5))
    mirror.persist(live, template)
    old = hashes(live)
    _one_busy_pass(live)
    new = hashes(live)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    counts = tmp_path / "counts.json"
    probe = tmp_path / "probe"
    shutil.copytree(template, probe, symlinks=True)
    subprocess.run(
        [sys.executable, "-c", RUNNER, str(live), str(probe)],
        cwd=REPO,
        env={**env, "TM_TEST_FAULT": f"persist:count:{counts}"},
        check=True,
    )
    steps = json.loads(counts.read_text())["persist"]
    assert steps >= 8, steps  # barrier, renames, manifest, deletions, pack GC
    outcomes = {"old manifest": 0, "new manifest": 0, "marked": 0}
    for n in range(1, steps + 1):
        data = tmp_path / f"data{n}"
        shutil.copytree(template, data, symlinks=True)
        rc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(live), str(data)],
            cwd=REPO,
            env={**env, "TM_TEST_FAULT": f"persist:{n}:KILL"},
        ).returncode
        assert rc == -signal.SIGKILL, (n, rc)
        m = mirror.load_manifest(data)
        outcomes["new manifest" if m.seq == 2 else "old manifest"] += 1
        outcomes["marked"] += mirror.pending_info(data) is not None
        back = tmp_path / f"back{n}"
        mirror.hydrate(data, back)
        got = hashes(back)
        for p, h in got.items():  # every file whole: the old or the new version, never a mix of bytes
            assert h in (old.get(p), new.get(p)), (n, p)
        assert database.check_file(back / "ee/db.sqlite") == "ok"
        index_sound(back)
        if m.seq == 2 and mirror.pending_info(data) is None:
            assert got == new, n
        again = mirror.persist(live, data)
        assert mirror.pending_info(data) is None and data_hashes(data) == new, n
        assert again["seq"] >= m.seq
        shutil.rmtree(back)
        shutil.rmtree(data)
    assert outcomes["old manifest"] and outcomes["new manifest"] and outcomes["marked"], outcomes
    print(f"persist fault points: {steps}, outcomes {outcomes}")
