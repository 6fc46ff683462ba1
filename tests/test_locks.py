"""One lock model for the store (issue 13 item 2, issue 10 item 3), with real processes.

The store has two locks: the *store lease* (`DIR/locks/store.json` locally, the modal.Dict on Modal) and the lock
file inside the store (`backups/lock.json`). A holder on this host whose process is gone is broken at once, with a log
line; a holder in another container (no pid to check) is broken when its lease is gone or expired; a live holder
makes a run wait, saying so every few seconds, and a run that gives up names `tabby-modal unlock --yes`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.state.locks import lease
from shared.state.locks import store_lock as locks
from shared.state.locks.lease import DirDict, Lease
from shared.state.locks.store_lock import LockHeld, StoreLock
from tests.conftest import BIN, REPO, clean_env, run_cli
from tests.harness import poll
from tests.tabby_root import make_root, tree_state

DEADLINE = 90  # generous: only there so a regression fails instead of hanging the suite


def persisted(tmp: Path, size_mb: float) -> Path:
    make_root(tmp / "live", size_mb=size_mb, seed=5)
    proc = run_cli(["persist", "--local", str(tmp / "box"), "--root", str(tmp / "live")], tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "box"


@pytest.fixture
def box(tmp_path: Path) -> Path:
    return persisted(tmp_path, 0.5)


@pytest.fixture
def big_box(tmp_path: Path) -> Path:
    """Big enough that a snapshot runs for a while (a kill lands inside it)."""
    return persisted(tmp_path, 20)


def cli(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(args, tmp, timeout=DEADLINE, **env)


def snapshot_ids(box: Path) -> set[str]:
    return {p.stem for p in (box / "backups/snapshots").glob("*.json")}


# --- a snapshot killed mid-run on this host ----------------------------------------------------------------------


def kill_a_snapshot_mid_run(box: Path, tmp: Path) -> None:
    """SIGKILL a real `tabby-modal snapshot` while it holds both locks (retried if it finished before the kill)."""
    for _ in range(5):
        proc = subprocess.Popen(
            [str(BIN / "tabby-modal"), "snapshot", "--local", str(box)],
            cwd=tmp,
            env=clean_env(tmp),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            poll(
                lambda p=proc: (box / "backups/lock.json").exists() or p.poll() is not None,
                timeout=DEADLINE,
                interval=0.001,
                what="the snapshot to take the store lock",
            )
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=DEADLINE)
        if (box / "locks/store.json").exists() and (box / "backups/lock.json").exists():
            assert proc.returncode == -signal.SIGKILL
            return
    pytest.fail("the snapshot never got killed while holding the store locks")


def test_a_sigkilled_snapshot_blocks_the_store_for_seconds_not_an_hour(big_box, tmp_path):
    box = big_box
    kill_a_snapshot_mid_run(box, tmp_path)
    started = time.monotonic()
    proc = cli(["snapshot", "--local", str(box), "--json"], tmp_path)
    recovered = time.monotonic() - started
    print(f"snapshot after a SIGKILLed snapshot: done in {recovered:.2f}s")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] > 0
    # Both of the dead run's locks were broken, each with a line naming it and why.
    assert "broke the store lease of snapshot by" in proc.stderr
    assert "broke the store lock file of snapshot by pid" in proc.stderr
    assert proc.stderr.count("its process is gone") == 2
    assert not (box / "locks").exists() and not (box / "backups/lock.json").exists()
    assert cli(["verify", "--local", str(box)], tmp_path).returncode == 0


def test_inspect_shows_a_dead_holder_and_plain_unlock_breaks_it(big_box, tmp_path):
    box = big_box
    kill_a_snapshot_mid_run(box, tmp_path)
    shown = json.loads(cli(["inspect", "--local", str(box), "--json"], tmp_path).stdout)["locks"]
    assert shown["store"]["op"] == "snapshot" and shown["store"]["live"] is False
    assert shown["store_file"]["op"] == "snapshot" and shown["store_file"]["live"] is False
    assert shown["store"]["why"] == shown["store_file"]["why"] == "its process is gone"
    human = cli(["inspect", "--local", str(box)], tmp_path).stdout
    assert (
        "store lease: snapshot by" in human
        and f"stale, `tabby-modal unlock --local {box}` breaks it" in human
    )
    proc = cli(["unlock", "--local", str(box), "--json"], tmp_path)  # no --yes: its holder is provably dead
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["broken"]) == {"store", "store_file"}
    assert (
        "broke the store lease" in proc.stderr and "broke the store lock (backups/lock.json)" in proc.stderr
    )
    assert not (box / "locks").exists() and not (box / "backups/lock.json").exists()


# --- a live holder: wait with progress lines, give up naming unlock --yes, Ctrl-C ------------------------------

HOLDER = """
import sys
from pathlib import Path
from shared.state.locks import lease
from shared.state.locks import store_lock as locks
held = lease.Lease(lease.DirDict(Path(sys.argv[1]) / "locks"), "store", "prune", ttl=600, owner="colleague")
with held, locks.vouched_by(held.vouch()), locks.StoreLock(Path(sys.argv[1]) / "backups", "prune"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def live_holder(box, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(box)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.stdin.close()
    assert proc.wait(timeout=DEADLINE) == 0


def test_a_live_holder_is_waited_for_and_named(box, tmp_path, live_holder):
    before = snapshot_ids(box)
    proc = cli(["snapshot", "--local", str(box), "--json"], tmp_path, TABBY_MODAL_LOCK_WAIT="1")
    assert proc.returncode == 2
    assert "store lock held: prune by colleague since" in proc.stderr
    assert f"`tabby-modal unlock --yes --local {box}`" in proc.stderr  # runs as printed
    assert json.loads(proc.stdout)["ok"] is False
    refused = cli(["unlock", "--local", str(box)], tmp_path)
    assert refused.returncode == 2 and "lock still live" in refused.stderr
    assert "store lease: prune by colleague" in refused.stderr and "unlock --yes" in refused.stderr
    assert snapshot_ids(box) == before and (box / "locks/store.json").exists()


def test_ctrl_c_while_waiting_exits_130_and_leaves_nothing(box, tmp_path, live_holder):
    waiter = subprocess.Popen(
        [str(BIN / "tabby-modal"), "snapshot", "--local", str(box), "--json"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = waiter.stderr.readline()  # the first progress line comes after locks.WAIT_REPORT seconds
        assert line.startswith("waiting for the store lock held by prune (colleague) since "), line
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=DEADLINE)
    finally:
        waiter.kill()
    assert waiter.returncode == 130
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert json.loads(out) == {"ok": False, "error": "interrupted"}
    assert json.loads((box / "locks/store.json").read_text())["owner"] == "colleague"  # not touched


# --- a holder in another Modal container: judged by its lease ------------------------------------------------


def other_container(box: Path, token: str) -> None:
    """The lock file a run in another container left: another host's pid, and the lease it held."""
    record = {
        "pid": 7,
        "host": "ta-01OTHERCONTAINER",
        "proc_start": 123,
        "time": time.time(),
        "op": "snapshot",
        "token": "file-token",
        "lease": {"key": "store", "owner": "ta-01OTHERCONTAINER", "token": token},
    }
    (box / "backups").mkdir(exist_ok=True)
    (box / "backups/lock.json").write_text(json.dumps(record))


def test_a_dead_containers_lock_file_goes_when_its_lease_is_gone(box, tmp_path):
    other_container(box, token="its-lease")  # its lease is not in the Dict any more
    started = time.monotonic()
    proc = cli(["snapshot", "--local", str(box)], tmp_path)
    print(f"snapshot after another container's stale lock file: {time.monotonic() - started:.2f}s")
    assert proc.returncode == 0, proc.stderr
    assert "broke the store lock file of snapshot by pid 7 on ta-01OTHERCONTAINER" in proc.stderr
    assert "its lease is gone or expired" in proc.stderr


def test_a_dead_containers_expired_lease_is_taken_over(box, tmp_path):
    d = DirDict(box / "locks")
    now = time.time()
    d.put("store", {"op": "snapshot", "owner": "ta-01OTHER", "token": "its-lease", "since": now - 400,
                    "expires": now - 5, "host": "ta-01OTHER", "pid": 7, "proc_start": 1})  # fmt: skip
    other_container(box, token="its-lease")
    proc = cli(["snapshot", "--local", str(box)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "broke the store lease of snapshot by ta-01OTHER" in proc.stderr and "expired" in proc.stderr
    assert "broke the store lock file of snapshot by pid 7" in proc.stderr


def test_a_live_containers_lock_file_is_kept(tmp_path):
    """Its lease is live and names it: the file lock is not stale, whatever its age."""
    d = DirDict(tmp_path / "locks")
    theirs = Lease(d, "store", "prune", ttl=600, owner="ta-01LIVE").acquire()
    theirs._stop.set()  # no heartbeat needed within the test
    record = {"pid": 7, "host": "ta-01LIVE", "time": time.time() - 7200, "op": "prune", "token": "t",
              "lease": {"key": "store", "owner": "ta-01LIVE", "token": theirs.token}}  # fmt: skip
    (tmp_path / "backups").mkdir()
    (tmp_path / "backups/lock.json").write_text(json.dumps(record))
    mine = lease.Lease(d, "store", "snapshot", ttl=600, owner="me", wait=0)
    judge = locks.Vouch(fields={}, gone=lambda info: lease.holder_gone(d, info))
    assert locks.status(tmp_path / "backups", ttl=3600, vouch=judge)["live"] is True
    with pytest.raises(lease.LeaseHeld, match="unlock --yes"):
        mine.acquire()
    d.pop("store")  # their lease is gone (broken or expired and taken over): so is their lock file
    assert locks.status(tmp_path / "backups", ttl=3600, vouch=judge)["why"] == "its lease is gone or expired"


# --- the file lock alone: progress lines and the unlock hint -----------------------------------------------------


def test_store_lock_says_who_it_waits_for_and_how_to_unlock(tmp_path):
    lines: list[str] = []
    with StoreLock(tmp_path, "snapshot"):
        waiter = StoreLock(tmp_path, "prune", wait=0.5, report=0.1, on_wait=lines.append)
        with pytest.raises(LockHeld, match=r"store busy: snapshot by pid \d+ .*`tabby-modal unlock --yes`"):
            waiter.acquire()
    assert lines and all(
        line.startswith("waiting for the store lock held by snapshot (pid ") for line in lines
    )
    assert tree_state(tmp_path) == {}  # released: nothing left behind
