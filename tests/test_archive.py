"""`tabby-modal export` / `import` on local folders: round trips, plain-tar compatibility, refusals that write nothing."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest

from shared.state.store import Store
from tests.conftest import run_cli
from tests.tabby_root import counter_values, leave_wal, make_root, tree_state

ALLOW = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}


def ok(args: list[str], tmp: Path, **env: str) -> dict:
    proc = run_cli([*args, "--json"], tmp, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def refused(args: list[str], tmp: Path) -> str:
    proc = run_cli(args, tmp)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute(sql))


def files_only(root: Path) -> dict[str, str]:
    """path -> sha256 of each file (mtimes and modes aside): what a round trip must keep."""
    return {k: v[-1] for k, v in tree_state(root).items() if v[0] == "file"}


@pytest.fixture
def box(tmp_path) -> Path:
    """DIR with data persisted from a Tabby-like root and one snapshot."""
    live = tmp_path / "live"
    make_root(live, size_mb=0.5, users=3)
    box = tmp_path / "box"
    ok(["persist", "--local", str(box), "--root", str(live)], tmp_path)
    ok(["snapshot", "--local", str(box), "--label", "orig"], tmp_path)
    return box


def test_export_import_restore_round_trip_equals_the_original(tmp_path, box):
    original = tmp_path / "original"
    ok(["hydrate", "--local", str(box), "--root", str(original)], tmp_path)
    out = tmp_path / "tabby.tar.gz"
    exported = ok(["export", "latest", "--out", str(out), "--local", str(box)], tmp_path)
    assert exported["files"] > 10 and exported["archive_bytes"] == out.stat().st_size

    # Into a brand-new DIR (another machine), then restore and compare.
    other = tmp_path / "other"
    imported = ok(["import", str(out), "--label", "moved", "--local", str(other)], tmp_path)
    assert imported["id"].endswith("-moved") and imported["files"] == exported["files"]
    ok(["restore", imported["id"], "--yes", "--local", str(other)], tmp_path, **ALLOW)
    back = tmp_path / "back"
    ok(["hydrate", "--local", str(other), "--root", str(back)], tmp_path)
    assert files_only(back) == files_only(original)
    sql = "SELECT email, is_admin, auth_token FROM users ORDER BY id"
    assert rows(back / "ee/db.sqlite", sql) == rows(original / "ee/db.sqlite", sql)
    assert rows(back / "ee/db.sqlite", "PRAGMA integrity_check") == [("ok",)]
    assert (back / "repositories/https_github.com_example_project.git/main.py").is_symlink()


def test_an_export_is_a_plain_tarball_of_a_tabby_root(tmp_path, box):
    out = tmp_path / "t.tar.gz"
    ok(["export", "latest", "--out", str(out), "--local", str(box)], tmp_path)
    home = tmp_path / "home/.tabby"
    home.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(out), "-C", str(home)], check=True)
    assert (home / "ee/db.sqlite").is_file() and (home / "config.toml").is_file()
    assert not list(home.rglob("*-wal")) and not (home / "models").exists()
    assert rows(home / "ee/db.sqlite", "PRAGMA integrity_check") == [("ok",)]
    assert len(rows(home / "ee/db.sqlite", "SELECT id FROM users")) == 3


def test_import_of_a_self_hosted_root_keeps_wal_commits(tmp_path):
    """A tar of a running install's ~/.tabby: wrapper folder, -wal with commits not yet checkpointed, models."""
    home = tmp_path / "home"
    make_root(home / ".tabby", size_mb=0.3)
    leave_wal(home / ".tabby/ee/db.sqlite", 25)
    assert (home / ".tabby/ee/db.sqlite-wal").stat().st_size > 0
    archive = tmp_path / "selfhosted.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(home), ".tabby"], check=True)

    box = tmp_path / "box"
    imported = ok(["import", str(archive), "--local", str(box)], tmp_path)
    assert imported["databases"]["ee/db.sqlite"] == "ok"
    ok(["restore", imported["id"], "--yes", "--local", str(box)], tmp_path, **ALLOW)
    live = tmp_path / "live"
    ok(["hydrate", "--local", str(box), "--root", str(live)], tmp_path)
    assert counter_values(live / "ee/db.sqlite") == list(range(1, 26))  # the -wal's commits survived
    assert not (live / "models").exists()  # the model cache is not state
    assert (live / "config.toml").read_bytes() == (home / ".tabby/config.toml").read_bytes()


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return path


@pytest.mark.parametrize(
    ("members", "says"),
    [
        ([("config.toml", b"x", None), ("../evil", b"x", None)], "bad path"),
        ([("/etc/evil", b"x", None)], "bad path"),
        ([("config.toml", b"x", None), ("config.toml", b"y", None)], "listed twice"),
        ([("ee/x", None, "../../outside")], "leave"),
        ([("ee/db.sqlite-wal", b"x" * 32, None)], "without its database"),
        ([("ee/db.sqlite", b"not a database at all" * 10, None)], "ee/db.sqlite"),
    ],
)
def test_bad_archives_are_refused_and_the_store_is_untouched(tmp_path, box, members, says):
    archive = _tar(tmp_path / "bad.tar.gz", members)
    before = tree_state(box)
    assert says in refused(["import", str(archive), "--local", str(box)], tmp_path)
    assert tree_state(box) == before


def test_not_an_archive_is_refused(tmp_path, box):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x00not a tarball" * 100)
    before = tree_state(box)
    assert "not a readable tar archive" in refused(["import", str(junk), "--local", str(box)], tmp_path)
    assert "no such file" in refused(["import", str(tmp_path / "nope.tar.gz"), "--local", str(box)], tmp_path)
    assert tree_state(box) == before


def test_export_refusals_write_nothing(tmp_path, box):
    existing = tmp_path / "keep.tar.gz"
    existing.write_bytes(b"precious")
    assert "exists" in refused(["export", "latest", "--out", str(existing), "--local", str(box)], tmp_path)
    assert existing.read_bytes() == b"precious"
    out = tmp_path / "new.tar.gz"
    assert "unknown snapshot" in refused(
        ["export", "20990101T000000Z-abcd-x", "--out", str(out), "--local", str(box)], tmp_path
    )
    assert "FILE.tar.gz" in refused(
        ["export", "latest", "--out", str(tmp_path / "x.zip"), "--local", str(box)], tmp_path
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["box", "keep.tar.gz", "live"]


def test_a_corrupt_blob_stops_the_export_and_leaves_no_file(tmp_path, box):
    store = Store.open(box / "backups")
    snap = store.load("latest")
    entry = max((e for e in snap.files.values() if e.link is None), key=lambda e: e.size)
    name, offset, length = store.locate(entry.sha256)  # a loose blob or a slice of a pack
    blob = box / "backups" / name
    data = bytearray(blob.read_bytes())
    data[offset + length // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    out = tmp_path / "bad.tar.gz"
    line = refused(["export", "latest", "--out", str(out), "--local", str(box)], tmp_path)
    assert entry.path in line
    assert not out.exists() and not list(tmp_path.glob("bad.tar.gz*"))
