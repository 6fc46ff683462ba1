"""Leases: atomic put-if-absent across processes, held / refused / expired / broken, heartbeats, the server's check,
and `tabby-modal unlock` / a held lease refusing a local restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from shared.state.locks import lease
from shared.state.locks.lease import DirDict, Lease, LeaseHeld
from tests.conftest import REPO, run_cli
from tests.harness import poll
from tests.tabby_root import make_root, tree_state

ALLOW = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}

RACER = """
import sys
from pathlib import Path
from shared.state.locks.lease import DirDict, Lease, LeaseHeld
go = Path(sys.argv[2])
while not go.exists():
    pass
try:
    Lease(DirDict(Path(sys.argv[1])), "maintenance", "restore", ttl=600, owner=sys.argv[3]).acquire()
    print("won", flush=True)
except LeaseHeld:
    print("lost", flush=True)
sys.stdin.read()  # the winner stays alive until every racer has answered (a dead holder is taken over at once)
"""


def test_put_if_absent_is_atomic_across_processes(tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "dict"), str(go), f"racer-{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(8)
    ]
    go.touch()
    outcomes = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.communicate(timeout=60)
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    winner = DirDict(tmp_path / "dict").get("maintenance")
    assert winner["owner"] == f"racer-{outcomes.index('won')}"


def test_dirdict_behaves_like_a_dict(tmp_path):
    d = DirDict(tmp_path / "d")
    assert d.get("k") is None and d.get("k", 5) == 5
    assert d.put("k", {"a": 1}, skip_if_exists=True) is True
    assert d.put("k", {"a": 2}, skip_if_exists=True) is False
    assert d.get("k") == {"a": 1}
    assert d.put("k", {"a": 3}) is True and d.get("k") == {"a": 3}
    assert d.pop("k") == {"a": 3}
    assert d.pop("k", None) is None
    with pytest.raises(KeyError):
        d.pop("k")
    assert not (tmp_path / "d").exists()  # empty: no folder left behind
    with pytest.raises(ValueError):
        d.get("../escape")


def test_held_refused_released(tmp_path):
    d = DirDict(tmp_path)
    first = Lease(d, "maintenance", "restore", ttl=600, owner="alice").acquire()
    with pytest.raises(LeaseHeld) as err:
        Lease(d, "maintenance", "reset all", ttl=600, owner="bob").acquire()
    assert str(err.value).startswith("maintenance lock held: restore by alice since ")
    assert "expires in" in str(err.value) and "\n" not in str(err.value)
    assert lease.reason(d).startswith("restore by alice")
    first.release()
    assert d.get("maintenance") is None and lease.reason(d) is None
    with Lease(d, "maintenance", "reset all", ttl=600, owner="bob"):
        assert d.get("maintenance")["owner"] == "bob"
    assert d.get("maintenance") is None


def test_waiting_acquire_gets_the_lease_when_the_holder_releases(tmp_path):
    d = DirDict(tmp_path)
    holder = Lease(d, "store", "prune", ttl=600, owner="a").acquire()
    waiter = Lease(d, "store", "snapshot", ttl=600, owner="b", wait=30, poll=0.02)
    got = threading.Event()
    t = threading.Thread(target=lambda: (waiter.acquire(), got.set()))
    t.start()
    assert not got.wait(0.2)  # still held
    holder.release()
    t.join(30)
    assert got.is_set() and d.get("store")["owner"] == "b"
    waiter.release()


def test_expired_lease_is_taken_over_and_a_malformed_one_too(tmp_path):
    d = DirDict(tmp_path)
    d.put("maintenance", {"op": "restore", "owner": "crashed", "since": 0, "expires": time.time() - 5})
    assert lease.reason(d) is None  # an expired lease does not stop the server
    with Lease(d, "maintenance", "reset auth", ttl=600, owner="next") as mine:
        assert d.get("maintenance")["token"] == mine.token
    d.put("maintenance", "garbage")
    with Lease(d, "maintenance", "restore", ttl=600, owner="next"):
        assert d.get("maintenance")["owner"] == "next"


def test_heartbeat_keeps_a_long_run_holding(tmp_path):
    d = DirDict(tmp_path)
    with Lease(d, "maintenance", "restore", ttl=0.6, owner="long") as held:
        first_expiry = d.get("maintenance")["expires"]
        poll(lambda: d.get("maintenance")["expires"] > first_expiry, 10, what="a heartbeat")
        poll(lambda: time.time() > first_expiry + 0.1, 10, what="the first expiry to pass")
        with pytest.raises(LeaseHeld):
            Lease(d, "maintenance", "reset all", ttl=600, owner="other").acquire()
        assert held.held()


def test_a_broken_lease_is_not_released_over_its_new_holder(tmp_path):
    d = DirDict(tmp_path)
    old = Lease(d, "maintenance", "restore", ttl=600, owner="old").acquire()
    assert set(lease.break_all(d)["broken"]) == {"maintenance"}
    new = Lease(d, "maintenance", "reset all", ttl=600, owner="new").acquire()
    old.release()  # the old run finishes late: it must not remove the new holder's entry
    assert old.lost and d.get("maintenance")["owner"] == "new"
    new.release()


def test_server_start_check_reads_the_modal_dict(tmp_path, monkeypatch, no_modal_env):
    from shared.serving.modal_container import lease_check
    from shared.settings import load_settings

    d = DirDict(tmp_path / "dict")
    monkeypatch.setattr(lease, "modal_dict", lambda settings: d)
    check = lease_check(load_settings())
    assert check() is None
    with Lease(d, "maintenance", "restore", ttl=600, owner="ops"):
        assert check().startswith("restore by ops since")
    assert check() is None


# --- the local form: `tabby-modal unlock --local`, and a held lease refusing restore ---------------------------


def cli_json(args, tmp, **env):
    proc = run_cli([*args, "--json"], tmp, **env)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.stderr


def test_unlock_local(tmp_path):
    box = tmp_path / "box"
    (box / "data").mkdir(parents=True)
    d = DirDict(box / "locks")
    code, out, err = cli_json(["unlock", "--local", str(box)], tmp_path)
    assert code == 0 and out == {"broken": {}, "held": {}}
    Lease(d, "maintenance", "restore", ttl=600, owner="dead-run").acquire()._stop.set()
    proc = run_cli(["unlock", "--local", str(box)], tmp_path)
    assert proc.returncode == 2 and "still live" in proc.stderr and "--yes" in proc.stderr
    assert d.get("maintenance")["owner"] == "dead-run"
    code, out, err = cli_json(["unlock", "--yes", "--local", str(box)], tmp_path)
    assert code == 0 and out["broken"]["maintenance"]["owner"] == "dead-run"
    assert "broke the maintenance lease" in err
    d.put("store", {"op": "prune", "owner": "gone", "since": 0, "expires": 1})
    code, out, _ = cli_json(["unlock", "--local", str(box)], tmp_path)  # expired: no --yes needed
    assert code == 0 and set(out["broken"]) == {"store"}


def test_local_restore_refused_while_the_lease_is_held(tmp_path):
    box = tmp_path / "box"
    live = tmp_path / "live"
    make_root(live, size_mb=0.2)
    assert run_cli(["persist", "--local", str(box), "--root", str(live)], tmp_path).returncode == 0
    snap = json.loads(run_cli(["snapshot", "--local", str(box), "--json"], tmp_path).stdout)
    held = Lease(DirDict(box / "locks"), "maintenance", "reset all", ttl=600, owner="colleague").acquire()
    held._stop.set()
    before = {k: v for k, v in tree_state(box).items() if not k.startswith("locks")}
    proc = run_cli(["restore", snap["id"], "--yes", "--force", "--local", str(box)], tmp_path, **ALLOW)
    assert proc.returncode == 2 and "maintenance lock held: reset all by colleague" in proc.stderr
    assert {k: v for k, v in tree_state(box).items() if not k.startswith("locks")} == before
    assert os.path.exists(box / "locks/maintenance.json")


def test_inspect_reports_the_leases(tmp_path):
    box = tmp_path / "box"
    (box / "data").mkdir(parents=True)
    Lease(DirDict(box / "locks"), "store", "snapshot", ttl=600, owner="worker").acquire()._stop.set()
    code, out, _ = cli_json(["inspect", "--local", str(box)], tmp_path)
    assert code == 0 and out["locks"]["store"]["owner"] == "worker" and out["locks"]["maintenance"] is None
