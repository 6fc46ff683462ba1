"""SIGINT and SIGTERM at evenly spaced points of a real `tabby-modal snapshot` and `tabby-modal persist` (issue 16,
item 5): every run exits 130 within 2 s of the signal, with no traceback, and leaves the store lock and lease free
(a new snapshot runs at once, with no wait), the store verifying, and the data dir consistent (the next persist
repairs an interrupted one: a clean manifest of exactly the live root's files; under stress, hydrate lays them down
with every hash checked).

The points are offsets from the moment the command is at work (its store lease, or the data dir's writer lock,
exists: the signal handlers are installed by then) spread over the time an uninterrupted run takes. The default
run uses a root of a few thousand files and a few points; `@pytest.mark.stress` uses 20k files and many points.
Each test prints the points tried, the failures and the slowest exit.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.state import mirror
from shared.state.locks.lease import DirDict
from shared.state.mirror.packed import pack_file
from shared.state.store import Store
from tests.conftest import BIN, clean_env
from tests.harness import poll
from tests.tabby_root import make_root

LIMIT = 2.0  # seconds from the signal to the exit
START = 120.0  # a command may take long to start on a loaded machine: only there so a regression fails
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Tally:
    """Points tried, what went wrong at each, and the slowest exit."""

    what: str
    tried: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    finished_first: int = 0  # runs that ended before the signal landed (not counted as tried)

    def report(self) -> str:
        return (
            f"{self.what}: {self.tried} points tried, {len(self.failures)} failures, slowest exit "
            f"{self.slowest:.3f}s after the signal, {self.finished_first} runs ended before their point"
        )


def launch(args: list[str], tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "tabby-modal"), *args],
        cwd=tmp,
        env=clean_env(tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def at_work(proc: subprocess.Popen[str], marker: Path) -> float:
    """The moment the command holds `marker` (it is at work); poll() returns it."""
    poll(lambda: marker.exists() or proc.poll() is not None, timeout=START, interval=0.001, what=str(marker))
    return time.monotonic()


def uninterrupted(args: list[str], marker: Path, tmp: Path) -> float:
    """How long the command runs once at work (the span the points are spread over)."""
    proc = launch(args, tmp)
    t0 = at_work(proc, marker)
    _, err = proc.communicate(timeout=START)
    assert proc.returncode == 0, err
    return time.monotonic() - t0


def interrupt(
    args: list[str], marker: Path, offset: float, sig: signal.Signals, tmp: Path, tally: Tally
) -> bool:
    """Run the command, send `sig` `offset` seconds into its work, and check its exit. False if it ended first."""
    proc = launch(args, tmp)
    t0 = at_work(proc, marker)
    # The fault point: a wait to a moment, not a synchronisation (the run may also end before it).
    while time.monotonic() < t0 + offset and proc.poll() is None:
        time.sleep(0.001)
    if proc.poll() is not None:
        proc.communicate()
        tally.finished_first += 1
        return False
    sent = time.monotonic()
    proc.send_signal(sig)
    where = f"{sig.name} at {offset:.2f}s"
    try:
        _, err = proc.communicate(timeout=LIMIT + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        tally.tried += 1
        tally.failures.append(f"{where}: still running {LIMIT + 10:.0f}s after the signal")
        return True
    took = time.monotonic() - sent
    tally.tried += 1
    tally.slowest = max(tally.slowest, took)
    if proc.returncode == 0:
        tally.finished_first += 1  # finished as the signal came: fine, and not an interruption
        tally.tried -= 1
        return False
    if proc.returncode != 130:
        tally.failures.append(f"{where}: exit {proc.returncode}: {err[-300:]!r}")
    if took > LIMIT:
        tally.failures.append(f"{where}: exited {took:.2f}s after the signal")
    if "Traceback" in err or "error: interrupted" not in err:
        tally.failures.append(f"{where}: stderr {err[-300:]!r}")
    return True


def locks_free(box: Path) -> str | None:
    """What still holds the store, or None."""
    if DirDict(box / "locks").get("store") is not None:
        return "store lease still held"
    if DirDict(box / "locks").get("maintenance") is not None:
        return "maintenance lease still held"
    if (box / "backups/lock.json").exists():
        return "store lock file still there"
    return None


def check_store(box: Path, where: str, tally: Tally) -> None:
    """The lock is free (a snapshot that may not wait runs), and every snapshot verifies."""
    held = locks_free(box)
    if held:
        tally.failures.append(f"{where}: {held}")
        return
    store = Store.open(box / "backups", lock_wait=0)
    store.snapshot(box / "data", "after-interrupt")
    result = store.verify()
    if not result["ok"]:
        tally.failures.append(f"{where}: verify: {result['problems'][:3]}")


def check_data_dir(box: Path, live: Path, tmp: Path, where: str, tally: Tally, *, hydrate: bool) -> None:
    """The next persist repairs whatever the interrupted one left: its manifest names exactly the live root's
    files, each present in the data dir at its recorded size; with `hydrate`, hydrate (which checks every hash)
    gives back exactly those files."""
    mirror.persist(live, box / "data")
    want = {p for p in mirror.scan(live) if not mirror.excluded(p)}
    manifest = mirror.load_manifest(box / "data")
    if manifest is None or set(manifest.files) != want or mirror.pending_info(box / "data") is not None:
        tally.failures.append(f"{where}: the repairing persist left no clean manifest of the live root")
        return
    for p, e in manifest.files.items():
        got = box / "data" / p
        if e.pack is not None:
            got = pack_file(
                box / "data", e.pack
            )  # a packed file: its pack holds it (hydrate checks the bytes)
            if not got.is_file() or got.stat().st_size < e.offset + e.size:
                tally.failures.append(f"{where}: {p}: its pack {e.pack} is not in the data dir")
        elif e.link is None and (not got.is_file() or got.stat().st_size != e.size):
            tally.failures.append(f"{where}: {p} is not in the data dir as the manifest says")
            return
    if hydrate:
        out = tmp / "hydrated"
        shutil.rmtree(out, ignore_errors=True)
        mirror.hydrate(box / "data", out)
        if set(mirror.scan(out)) != want:
            tally.failures.append(f"{where}: hydrate gives other paths than the live root's")


def points(n: int, span: float) -> list[float]:
    """`n` offsets evenly spread over the first 80% of `span` (the middle of each of n equal slices): later runs
    are often quicker than the measured one (warm caches), and a run that ends first tests nothing."""
    return [0.8 * span * (i + 0.5) / n for i in range(n)]


def run_snapshot_points(tmp: Path, files: int, n: int) -> Tally:
    live, box = tmp / "live", tmp / "box"
    make_root(live, size_mb=files / 500, files=files, seed=16)
    mirror.persist(live, box / "data")
    args = ["snapshot", "--local", str(box)]
    marker = box / "locks/store.json"
    span = uninterrupted(args, marker, tmp)
    tally = Tally(f"snapshot of {files} files ({span:.2f}s of work)")
    for i, offset in enumerate(points(n, span)):
        shutil.rmtree(box / "backups", ignore_errors=True)  # each point a first snapshot: every blob is new
        sig = SIGNALS[i % 2]
        for _ in range(3):  # a run quicker than the measured one ended first: the point again, earlier
            if interrupt(args, marker, offset, sig, tmp, tally):
                check_store(box, f"{sig.name} at {offset:.2f}s", tally)
                break
            shutil.rmtree(box / "backups", ignore_errors=True)
            offset /= 2
    return tally


def run_persist_points(tmp: Path, files: int, n: int) -> Tally:
    live, box = tmp / "live", tmp / "box"
    make_root(live, size_mb=files / 500, files=files, seed=16)
    args = ["persist", "--local", str(box), "--root", str(live)]
    marker = box / "data" / mirror.WRITER_LOCK
    span = uninterrupted(args, marker, tmp)
    tally = Tally(f"first persist of {files} files ({span:.2f}s of work)")
    for i, offset in enumerate(points(n, span)):
        shutil.rmtree(box, ignore_errors=True)  # each point a first persist into an empty data dir
        sig = SIGNALS[(i + 1) % 2]
        for _ in range(3):  # a run quicker than the measured one ended first: the point again, earlier
            where = f"{sig.name} at {offset:.2f}s"
            if interrupt(args, marker, offset, sig, tmp, tally):
                held = locks_free(box)
                if held:
                    tally.failures.append(f"{where}: {held}")
                check_data_dir(box, live, tmp, where, tally, hydrate=files > 5000)
                break
            shutil.rmtree(box, ignore_errors=True)
            offset /= 2
    return tally


def settle(tally: Tally, minimum: int) -> None:
    print(tally.report())
    assert not tally.failures, "\n".join([tally.report(), *tally.failures])
    assert tally.tried >= minimum, tally.report()


@pytest.mark.parametrize(
    ("run", "files", "n"),
    [(run_snapshot_points, 1500, 4), (run_persist_points, 800, 3)],
    ids=["snapshot", "persist"],
)
def test_signals_end_runs_fast_and_clean(
    tmp_path: Path, run: Callable[[Path, int, int], Tally], files: int, n: int
) -> None:
    settle(run(tmp_path, files, n), minimum=n - 1)


@pytest.mark.stress
@pytest.mark.parametrize(
    ("run", "n"), [(run_snapshot_points, 16), (run_persist_points, 16)], ids=["snapshot", "persist"]
)
def test_signals_at_many_points_of_20k_files(
    tmp_path: Path, run: Callable[[Path, int, int], Tally], n: int
) -> None:
    settle(run(tmp_path, 20_000, n), minimum=n // 2)
