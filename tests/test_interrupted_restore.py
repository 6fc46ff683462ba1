"""Issue 16, items 2 and 3, with real `tabby-modal` processes: one writer per DIR, and restores/resets that die mid-way
(SIGKILL, SIGINT) leave the old state, the new state, or a marked data dir that every reader refuses and names.

The faults land at exact steps through `TM_TEST_FAULT` (shared/state/fault_points.py): the process sends itself the
signal at the Nth step of the swap, spread evenly from "before the marker" to "manifest written, marker not cleared".
Each outcome is judged by content (sha256 of every file against snapshots A and B), never by the tool's own word.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shared.state import mirror
from shared.state.mirror.packed import packable, read_entry
from shared.state.store import Store
from tests.conftest import BIN, run_cli
from tests.harness import free_port, mirrored
from tests.tabby_root import make_root, tree_state
from tests.test_serve_local import users, wait_ready
from tests.test_serve_ownership import claim, register, start_serve, stop

DESTRUCTIVE = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}


# --- building A and B -------------------------------------------------------------------------------------------


def add_files(root: Path, n: int, seed: int, keep_every: int = 3) -> None:
    """`n` small source files under the repository: every `keep_every`th is the same in A and B, the rest differ
    (and B's numbering is shifted, so B both adds files and drops some of A's)."""
    src = next((root / "repositories").iterdir()) / "src/extra"
    for i in range(n):
        j = i + (n // 5 if seed else 0)
        body = f"# file {j}\n" if j % keep_every == 0 else f"# file {j} of {seed}\n" * (1 + j % 7)
        path = src / f"d{j % 16}" / f"f{j}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)


def two_states(tmp: Path, extra: int) -> tuple[Path, Store, str, str]:
    """DIR whose data dir holds state A; snapshots A and B in DIR/backups. Returns (DIR, store, A, B)."""
    local = tmp / "state"
    data = local / "data"
    store = Store.open(local / "backups")
    ids = []
    for seed in (0, 1):
        root = tmp / f"root-{seed}"
        make_root(root, size_mb=0.3, seed=seed, users=2 + seed)
        add_files(root, extra, seed)
        mirror.persist(root, data)
        ids.append(store.snapshot(data, "ab")["id"])
    store.restore(ids[0], data)
    return local, store, ids[0], ids[1]


def content(data: Path) -> dict[str, str]:
    """What the data dir holds, by path: the sha256 of each file's bytes (packed or plain) or the target of each
    link; a plain file that what it holds does not name (left behind) shows as `stray:PATH`."""
    held = mirrored(data)
    out = {}
    for p, e in held.items():
        out[p] = "->" + e.link if e.link is not None else hashlib.sha256(read_entry(data, e)).hexdigest()
    for p in mirror.scan(data):
        if p not in held or held[p].pack is not None:
            out[f"stray:{p}"] = "left behind"
    return out


def snapshot_content(store: Store, sid: str) -> dict[str, str]:
    return {
        p: "->" + e.link if e.link is not None else e.sha256 or "" for p, e in store.load(sid).files.items()
    }


def restore_cmd(local: Path, sid: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["restore", sid, "--local", str(local), "--yes"], tmp, **DESTRUCTIVE, **env)


def steps(store: Store, data: Path, target: str) -> int:
    """How many fault steps a restore of `target` over `data` has: the marker, each plain file laid (links,
    databases, files >= 1 MiB: the small ones arrive in packs, renamed in before them), each plain file removed
    (its path gone or packed now), the manifest, the marker's removal (see shared/state/store/restore.py)."""
    files = store.load(target).files
    plain = {p for p, e in files.items() if e.link is not None or not packable(p, e.size)}
    return 1 + len(plain) + len(set(mirror.scan(data)) - plain) + 2


def restore_marker(data: Path) -> dict[str, Any] | None:
    """The pending marker file as a restore or reset left it (read raw: the test does not take the code's word)."""
    info = mirror.pending_info(data)
    return info if info is not None and info.get("op") in ("restore", "reset") else None


# --- the readers of a marked data dir -------------------------------------------------------------------------


def check_refused_everywhere(tmp: Path, local: Path, target: str, *, serve: bool) -> None:
    """inspect (human) names it, status exits 1 with the command, hydrate/persist/snapshot (and serve) refuse, exit 2,
    with nothing written; the marker survives them all."""
    data = local / "data"
    finish = f"tabby-modal restore {target} --local {local}"
    before = tree_state(data)
    shown = run_cli(["inspect", "--local", str(local)], tmp)
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[0]
    assert first.startswith(f"INTERRUPTED: this data dir holds an interrupted restore of {target}"), first
    assert f"`{finish}` to finish it" in first
    status = run_cli(["status", "--local", str(local)], tmp)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "data dir" in status.stdout and f"-> {finish}\n" in status.stdout, status.stdout
    other = tmp / "other-root"
    make_root(other, size_mb=0.05, seed=9) if not other.exists() else None
    for args, what in (
        (["hydrate", "--root", str(tmp / "hydrated")], "hydrate"),
        (["persist", "--root", str(other)], "persist"),
        (["snapshot"], "snapshot"),
    ):
        refused = run_cli([*args, "--local", str(local)], tmp)
        assert refused.returncode == 2, (what, refused.stderr)
        # (`snapshot` takes the store lease first: the killed run's dead leases are broken, one line each)
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: refused: {what}: "), refused.stderr
        assert f"interrupted restore of {target}" in line and f"`{finish}`" in line
    assert not (tmp / "hydrated").exists()
    if serve:
        proc = start_serve(tmp, local, free_port())
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        as_typed = f"tabby-modal restore {target} --local {local.relative_to(tmp)}"  # serve got DIR relative
        assert err.strip().startswith("error: refused: serve: ") and f"`{as_typed}`" in err, err
        assert not (local / "live").exists()  # nothing hydrated
    assert tree_state(data) == before
    assert (restore_marker(data) or {}).get("target") == target


# --- the tests -------------------------------------------------------------------------------------------------


def run_faults(tmp: Path, extra: int, kills: int, ints: int, *, full_checks: int) -> dict[str, Any]:
    """Restore B over A (then A over B, alternating) in a real process, interrupted at `kills` SIGKILL and `ints`
    SIGINT steps spread over the whole swap; judge each outcome by content, check the readers on the first marked
    ones, then finish with a second restore and check the result by content."""
    started = time.monotonic()
    local, store, a, b = two_states(tmp, extra)
    data = local / "data"
    want = {a: snapshot_content(store, a), b: snapshot_content(store, b)}
    assert content(data) == want[a] and want[a] != want[b]
    fractions = [(i / (kills - 1), "KILL") for i in range(kills)]
    fractions += [((i + 1) / (ints + 1), "INT") for i in range(ints)]
    counts = {"tried": 0, "old": 0, "new": 0, "marked": 0, "mixed_unmarked": 0, "lost": 0}
    here, totals = a, set()
    for fraction, sig in fractions:
        target = b if here == a else a
        total = steps(store, data, target)
        totals.add(total)
        at = 1 + round(fraction * (total - 1))
        cut = restore_cmd(local, target, tmp, TM_TEST_FAULT=f"restore:{at}:{sig}")
        counts["tried"] += 1
        expected_rc = -signal.SIGKILL if sig == "KILL" else 130
        assert cut.returncode == expected_rc, (at, sig, cut.returncode, cut.stderr)
        now, marker = content(data), restore_marker(data)
        if marker is not None:
            counts["marked"] += 1
            if counts["marked"] <= full_checks:
                check_refused_everywhere(tmp, local, target, serve=counts["marked"] == 1)
            assert marker.get("target") == target and marker.get("safety")
        elif now == want[here]:
            counts["old"] += 1
        elif now == want[target]:
            counts["new"] += 1
            here = target
            continue
        else:
            counts["mixed_unmarked"] += 1
            store.restore(here, data)
            continue
        # Finish: the target restore, or (the first time) the way back to the safety snapshot; by the CLI while
        # the full checks run, then in-process (the same store code; the CLI adds the leases, checked above).
        back = marker is not None and counts["marked"] == 1
        goal, expect = (marker["safety"], want[here]) if back else (target, want[target])
        if counts["marked"] <= full_checks:
            again = restore_cmd(local, goal, tmp)
            assert again.returncode == 0, again.stderr
            safety = again.stdout.rsplit("safety snapshot ", 1)[-1].strip()
        else:
            safety = store.restore(goal, data)["safety_snapshot"]
        if content(data) != expect:
            counts["lost"] += 1
        assert mirror.pending_info(data) is None
        if (
            marker is not None
        ):  # the take-over kept the first run's safety snapshot, and it holds the old state
            assert safety == marker["safety"]
            assert snapshot_content(store, marker["safety"]) == want[here]
        here = here if back else target
    took = time.monotonic() - started
    print(
        f"\nrestore faults ({len(want[a])} <-> {len(want[b])} files, {sorted(totals)} steps, {took:.1f}s): {counts}"
    )
    return counts


def test_interrupted_restore_is_old_new_or_marked_and_refused(tmp_path):
    counts = run_faults(tmp_path, extra=240, kills=8, ints=2, full_checks=1)
    assert counts["mixed_unmarked"] == 0 and counts["lost"] == 0
    assert counts["marked"] >= 6  # most steps are inside the swap: the marker must be what makes them safe
    assert counts["tried"] == counts["old"] + counts["new"] + counts["marked"]


@pytest.mark.stress
def test_interrupted_restore_stress_20k_files(tmp_path):
    counts = run_faults(tmp_path, extra=20_000, kills=24, ints=6, full_checks=1)
    assert counts["mixed_unmarked"] == 0 and counts["lost"] == 0


def test_interrupted_reset_is_marked_and_only_a_finishing_run_clears_it(tmp_path):
    local, store, _, _ = two_states(tmp_path, extra=60)
    data = local / "data"
    before = content(data)
    doomed = {p for p in before if p.startswith(("index/", "repositories/"))}
    # The fault steps: the marker, each plain file removed (packed ones simply leave the manifest), the manifest.
    plain = [p for p in mirror.scan(data) if p in doomed]
    assert plain and len(plain) < len(doomed)
    cut = run_cli(
        ["reset", "--scope", "index", "--local", str(local), "--yes"],
        tmp_path,
        **DESTRUCTIVE,
        TM_TEST_FAULT=f"reset:{2 + len(plain)}:INT",  # every plain one gone, not the manifest
    )
    assert cut.returncode == 130, cut.stderr
    marker = restore_marker(data)
    assert marker is not None and marker["op"] == "reset"
    now = content(data)
    assert now != before and set(now) > set(before) - doomed  # half-done
    finish = f"tabby-modal reset --scope index --local {local}"
    shown = run_cli(["inspect", "--local", str(local)], tmp_path)
    assert shown.stdout.startswith("INTERRUPTED: this data dir holds an interrupted reset --scope index"), (
        shown
    )
    assert f"`{finish}` to finish it" in shown.stdout
    hydrate = run_cli(["hydrate", "--root", str(tmp_path / "h"), "--local", str(local)], tmp_path)
    assert hydrate.returncode == 2 and f"`{finish}`" in hydrate.stderr
    assert marker.get("scope") == "index" and marker.get("safety")
    # Another scope would clear the marker over a half-done tree: refused, nothing written.
    state = tree_state(data)
    other = run_cli(["reset", "--scope", "auth", "--local", str(local), "--yes"], tmp_path, **DESTRUCTIVE)
    assert other.returncode == 2 and "holds an interrupted reset --scope index" in other.stderr, other.stderr
    assert tree_state(data) == state
    done = run_cli(["reset", "--scope", "index", "--local", str(local), "--yes"], tmp_path, **DESTRUCTIVE)
    assert done.returncode == 0, done.stderr
    assert f"safety snapshot {marker['safety']}" in done.stdout
    assert content(data) == {p: h for p, h in before.items() if p not in doomed}
    assert mirror.pending_info(data) is None
    assert snapshot_content(store, marker["safety"]) == before


def test_an_interrupted_persist_keeps_its_meaning(tmp_path):
    """Only restore/reset markers block: an interrupted persist's marker is taken as it stands by hydrate and
    repaired by the next persist."""
    live, data = tmp_path / "live", tmp_path / "data"
    make_root(live, size_mb=0.1, seed=3)
    mirror.persist(live, data)
    (live / "events/new.json").write_text("{}\n")
    # The marker a persist killed mid-pass leaves: written by a process that is gone.
    code = f"from shared.state import mirror; mirror.write_pending({str(data)!r}, 'persist')"
    subprocess.run([str(BIN / "python"), "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert mirror.pending_info(data)["op"] == "persist" and mirror.unfinished_change(data) is None
    assert mirror.hydrate(data, tmp_path / "copy")["checked"] == "tree"
    result = mirror.persist(live, data)
    assert result["repaired"] and mirror.pending_info(data) is None


def test_the_server_refuses_to_hydrate_an_interrupted_restore(tmp_path, monkeypatch):
    """The Modal path: TabbyServer.start() (shared/serving/server.py) hydrates nothing and answers 503 naming the
    command; a persist of a live root hydrated earlier refuses too and leaves the marker."""
    from tests.test_server import Harness

    local, store, _, b = two_states(tmp_path, extra=20)
    data = local / "data"
    live = tmp_path / "earlier-live"
    seq = mirror.hydrate(data, live)["seq"]
    cut = restore_cmd(local, b, tmp_path, TM_TEST_FAULT=f"restore:{steps(store, data, b) // 2}:KILL")
    assert cut.returncode == -signal.SIGKILL
    before = tree_state(data)
    with pytest.raises(mirror.InterruptedChange, match=f"restore of {b}"):
        mirror.persist(live, data, seq=seq)
    h = Harness(tmp_path / "srv", monkeypatch)
    h.server.data_dir = data
    assert h.server.start() is False
    refusal = h.server.gate()
    assert refusal is not None and refusal.status == 503
    assert f"interrupted restore of {b}" in refusal.error, refusal
    assert f"`tabby-modal restore {b}` to finish it" in refusal.error
    assert not (tmp_path / "srv/live/ee").exists()
    assert tree_state(data) == before


def test_one_writer_per_dir_while_serve_runs(tmp_path):
    """While `serve --local DIR` runs, persist into DIR, hydrate into its live root, restore and reset refuse with
    exit 2 and one line naming the holder; DIR/data is unchanged and the server's acknowledged writes survive."""
    local = tmp_path / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    other = tmp_path / "other-root"
    make_root(other, size_mb=0.05, seed=5)
    proc = start_serve(tmp_path, local, port)
    try:
        wait_ready(url, proc)
        token = claim(url)
        register(url, token, "acked@example.com")  # acknowledged: it must survive everything below
        snap = run_cli(["snapshot", "--local", str(local)], tmp_path)  # allowed while serving: reads DIR/data
        assert snap.returncode == 0, snap.stderr
        data_before, live_db = tree_state(local / "data"), (local / "live/ee/db.sqlite").stat().st_ino
        for args in (
            ["persist", "--root", str(other)],
            ["hydrate", "--root", str(local / "live")],
            ["restore", "latest", "--yes"],
            ["reset", "--scope", "auth", "--yes"],
        ):
            refused = run_cli([*args, "--local", str(local)], tmp_path, **DESTRUCTIVE)
            assert refused.returncode == 2, (args, refused.stderr)
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: refused: "), (args, lines)
            assert f"`serve` (pid {proc.pid} on " in lines[0] and f"port {port}, since " in lines[0], lines
        assert tree_state(local / "data") == data_before
        assert (local / "live/ee/db.sqlite").stat().st_ino == live_db  # the live database was not swapped
        # A copy elsewhere only reads DIR/data: it goes ahead.
        copy = run_cli(["hydrate", "--root", str(tmp_path / "copy"), "--local", str(local)], tmp_path)
        assert copy.returncode == 0, copy.stderr
        register(url, token, "after@example.com")
    finally:
        err = stop(proc)
    assert proc.returncode == 0 and "serve: stopped; state persisted" in err, err
    assert users(local / "data", tmp_path) == ["owner@example.com", "acked@example.com", "after@example.com"]
    # Once it stopped, the same persist goes ahead.
    done = run_cli(["persist", "--root", str(other), "--local", str(local)], tmp_path)
    assert done.returncode == 0, done.stderr
