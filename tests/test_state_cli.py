"""`tabby-modal` state commands as a user runs them: real subprocesses, JSON on stdout, exit codes, two signals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared.state.locks.serve_lock import ServeLock
from shared.state.store import Store
from tests.conftest import run_cli
from tests.harness import damage_mirrored
from tests.tabby_root import make_root, tree_state

ALLOW = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """DIR for `--local DIR`, with a live root next to it that has been persisted once."""
    make_root(tmp_path / "live", size_mb=0.3, seed=21, wal_rows=5)
    ok(["persist", "--local", str(tmp_path / "box"), "--root", str(tmp_path / "live")], tmp_path)
    return tmp_path / "box"


def ok(args: list[str], tmp: Path, **env: str) -> dict:
    proc = run_cli([*args, "--json"], tmp, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def refused(args: list[str], tmp: Path, code: int = 2, **env: str) -> str:
    """Run a command that must fail: one line on stderr; on stdout nothing, or with --json the refusal."""
    proc = run_cli(args, tmp, **env)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    if "--json" in args:
        assert json.loads(proc.stdout) == {"ok": False, "error": lines[0].removeprefix("error: ")}
    else:
        assert proc.stdout == ""
    return lines[0]


def make_old(box: Path) -> None:
    doc = json.loads((box / "data/.tabby-modal/persist.json").read_bytes())
    doc["time_unix"] -= 3600  # the server stopped an hour ago
    (box / "data/.tabby-modal/persist.json").write_bytes(json.dumps(doc).encode())


def test_persist_snapshot_verify_inspect_json(box, tmp_path):
    d = str(box)
    again = ok(["persist", "--local", d, "--root", str(tmp_path / "live")], tmp_path)
    assert {"changed", "files", "bytes", "databases", "wrote_manifest"} <= set(again)
    snap = ok(["snapshot", "--local", d, "--label", "first"], tmp_path)
    assert {"id", "files", "bytes", "new_blobs", "new_bytes"} <= set(snap) and snap["new_blobs"] > 0
    repeat = ok(["snapshot", "--local", d], tmp_path)
    assert repeat["new_blobs"] == 0 and repeat["new_bytes"] == 0
    listing = ok(["snapshots", "--local", d], tmp_path)
    assert [s["id"] for s in listing["snapshots"]] == [snap["id"], repeat["id"]] and listing["count"] == 2
    verify = ok(["verify", "--local", d], tmp_path)
    assert verify["ok"] is True and verify["problems"] == []
    assert ok(["verify", "--local", d, snap["id"], "--sample", "0.5"], tmp_path)["ok"]
    info = ok(["inspect", "--local", d], tmp_path)
    assert info["db"]["integrity"] == "ok" and info["db"]["users"] == 3 and info["db"]["owner"] is True
    assert info["db"]["tables"]["counter"] == 5 and "ee" in info["dirs"] and info["last_persist"]["time"]
    assert ok(["inspect", "--local", d, "--snapshot", snap["id"]], tmp_path)["db"]["users"] == 3


def test_human_output_goes_to_stdout_and_messages_to_stderr(box, tmp_path):
    proc = run_cli(["snapshot", "--local", str(box)], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("snapshot ") and "new:" in proc.stdout
    proc = run_cli(["snapshots", "--local", str(box)], tmp_path)
    assert proc.returncode == 0 and "1 snapshots" in proc.stdout
    proc = run_cli(["inspect", "--local", str(box)], tmp_path)
    assert "owner yes" in proc.stdout


def test_verify_exit_1_names_snapshot_and_path_and_restore_is_refused(box, tmp_path):
    d = str(box)
    snap = ok(["snapshot", "--local", d], tmp_path)
    manifest = json.loads((box / f"backups/snapshots/{snap['id']}.json").read_bytes())
    entry = next(f for f in manifest["files"] if f["path"] == "config.toml")
    name, offset, length = Store.open(box / "backups").locate(entry["sha256"])
    blob = box / "backups" / name
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[offset + length - 1] ^= 0x01  # the last byte of config.toml, inside its pack
    blob.write_bytes(bytes(raw))
    proc = run_cli(["verify", "--local", d, "--json"], tmp_path)
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False
    assert result["problems"][0]["snapshot"] == snap["id"] and result["problems"][0]["path"] == "config.toml"
    make_old(box)
    before = tree_state(box)
    line = refused(["restore", snap["id"], "--local", d, "--yes"], tmp_path, **ALLOW)
    assert "fails verification" in line and "config.toml" in line
    assert tree_state(box) == before


def test_restore_needs_two_signals(box, tmp_path):
    d = str(box)
    sid = ok(["snapshot", "--local", d], tmp_path)["id"]
    make_old(box)
    before = tree_state(box)
    assert "TABBY_MODAL_ALLOW_DESTRUCTIVE=1" in refused(["restore", sid, "--local", d], tmp_path)
    assert "also needs" in refused(["restore", sid, "--local", d, "--yes"], tmp_path)
    assert tree_state(box) == before
    res = ok(["restore", sid, "--local", d, "--yes"], tmp_path, **ALLOW)
    assert res["restored"] == sid and res["safety_snapshot"]


def test_restore_and_reset_refuse_while_a_server_holds_dir_unless_forced(box, tmp_path):
    d = str(box)
    sid = ok(["snapshot", "--local", d], tmp_path)["id"]
    server = ServeLock(box).acquire(port=8123)  # what `serve --local DIR` holds for its whole run
    before = tree_state(box)
    try:
        for args in (["restore", sid], ["reset", "--scope", "auth"]):
            line = refused([*args, "--local", d, "--yes"], tmp_path, **ALLOW)
            assert f"while `serve` (pid {os.getpid()} on " in line and "port 8123" in line
            assert "--force" in line
        assert tree_state(box) == before
    finally:
        server.release()
    # Free right after the server stops (the persist just before is no reason to refuse).
    assert ok(["restore", sid, "--local", d, "--yes"], tmp_path, **ALLOW)["restored"] == sid
    res = ok(["reset", "--scope", "auth", "--local", d, "--yes", "--force"], tmp_path, **ALLOW)
    assert res["scope"] == "auth" and res["safety_snapshot"] and not (box / "data/ee").exists()
    assert ok(["inspect", "--local", d], tmp_path)["db"]["present"] is False
    back = ok(["restore", res["safety_snapshot"], "--local", d, "--yes", "--force"], tmp_path, **ALLOW)
    assert back["restored"] == res["safety_snapshot"]
    assert ok(["inspect", "--local", d], tmp_path)["db"]["users"] == 3


def test_reset_needs_two_signals_and_a_valid_scope(box, tmp_path):
    d = str(box)
    before = tree_state(box)
    refused(["reset", "--scope", "all", "--local", d, "--yes"], tmp_path)
    proc = run_cli(["reset", "--scope", "everything", "--local", d, "--yes"], tmp_path, **ALLOW)
    assert proc.returncode == 2 and proc.stdout == ""
    assert tree_state(box) == before


def test_prune_dry_run_needs_no_confirmation_and_writes_nothing(box, tmp_path):
    d = str(box)
    ids = [ok(["snapshot", "--local", d, "--label", f"n{i}"], tmp_path)["id"] for i in range(3)]
    before = tree_state(box)
    plan = ok(
        ["prune", "--local", d, "--keep-last", "1", "--keep-daily", "0", "--keep-weekly", "0", "--dry-run"],
        tmp_path,
    )
    assert plan["dry_run"] and set(plan["removed"]) == set(ids[:2]) and plan["kept"] == [ids[2]]
    assert tree_state(box) == before
    refused(["prune", "--local", d, "--keep-last", "1"], tmp_path)
    assert tree_state(box) == before
    done = ok(
        ["prune", "--local", d, "--keep-last", "1", "--keep-daily", "0", "--keep-weekly", "0", "--yes"],
        tmp_path,
        **ALLOW,
    )
    assert set(done["removed"]) == set(ids[:2])
    assert [s["id"] for s in ok(["snapshots", "--local", d], tmp_path)["snapshots"]] == [ids[2]]


def test_prune_defaults_come_from_settings(box, tmp_path):
    d = str(box)
    ids = [ok(["snapshot", "--local", d], tmp_path)["id"] for _ in range(3)]
    plan = ok(
        ["prune", "--local", d, "--dry-run"], tmp_path, TABBY_MODAL_KEEP_LAST="2", TABBY_MODAL_KEEP_DAILY="0"
    )
    assert plan["removed"] == [ids[0]]


@pytest.mark.parametrize("sid", ["20991231T000000Z-abcd-nope", "../../x"])
def test_unknown_snapshot_is_refused_with_nothing_written(box, tmp_path, sid):
    before = tree_state(box)
    assert "unknown snapshot" in refused(["restore", sid, "--local", str(box), "--yes"], tmp_path, **ALLOW)
    assert "unknown snapshot" in refused(["verify", sid, "--local", str(box)], tmp_path)
    assert "unknown snapshot" in refused(["inspect", "--snapshot", sid, "--local", str(box)], tmp_path)
    assert tree_state(box) == before


def test_hydrate_and_its_refusal(box, tmp_path):
    res = ok(["hydrate", "--local", str(box), "--root", str(tmp_path / "back")], tmp_path)
    assert res["fresh"] is False and res["databases"] == {"ee/db.sqlite": "ok"}
    assert "no such directory" in refused(
        ["hydrate", "--local", str(tmp_path / "empty"), "--root", str(tmp_path / "new")], tmp_path
    )
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty/data").mkdir(parents=True)  # a folder with an empty data dir: a fresh instance
    fresh = ok(["hydrate", "--local", str(tmp_path / "empty"), "--root", str(tmp_path / "new")], tmp_path)
    assert fresh["fresh"] is True
    damage_mirrored(box / "data", "config.toml", "flip")
    before = tree_state(tmp_path / "back")
    assert "does not match" in refused(
        ["hydrate", "--local", str(box), "--root", str(tmp_path / "back")], tmp_path
    )
    assert tree_state(tmp_path / "back") == before


def test_persist_and_hydrate_are_local_only(tmp_path):
    assert "--local" in refused(["persist", "--root", str(tmp_path)], tmp_path)
    assert "--local" in refused(["hydrate", "--root", str(tmp_path)], tmp_path)
    assert "live root" in refused(
        ["persist", "--local", str(tmp_path / "b"), "--root", str(tmp_path / "none")], tmp_path
    )


@pytest.mark.parametrize(
    "args",
    [
        ["snapshots"],
        ["verify", "--json"],
        ["snapshot", "--label", "x"],
        ["inspect"],
        ["export", "latest", "--out", "x.tar.gz"],
        ["import", "x.tar.gz"],
        ["unlock"],
    ],
)
def test_remote_form_without_credentials_is_one_line_exit_2(tmp_path, args):
    assert "No Modal credentials" in refused(args, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a config file


def test_a_label_is_kept_as_given_or_refused_naming_the_characters(box, tmp_path):
    """`new_id` used to turn "üni" into "ni" without a word: now the id carries the label as given, or it is
    refused (exit 2, one line naming the allowed characters) before anything is written."""
    d = str(box)
    kept = ok(["snapshot", "--local", d, "--label", "v0.32_rc-1"], tmp_path)
    assert kept["id"].endswith("-v0.32_rc-1")
    before = tree_state(box)
    rule = "use 1 to 40 of the characters A-Z a-z 0-9 . _ - (not starting or ending with . or -)"
    for label in ("üni", "a" * 41):
        line = refused(["snapshot", "--local", d, "--label", label], tmp_path)
        assert line == f"error: label {label!r}: {rule}"
    assert tree_state(box) == before
    fresh = tmp_path / "fresh"
    line = refused(
        ["import", str(tmp_path / "any.tar.gz"), "--local", str(fresh), "--label", "üni"], tmp_path
    )
    assert "label 'üni'" in line and not fresh.exists()
