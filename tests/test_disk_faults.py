"""A full disk, a file size limit and short writes, on real files (issue 16, items 1 and 7).

Three fault layers: a small tmpfs mounted for the test (root only: CI runs as root; skipped otherwise), the real
`tabby-modal` CLI run under RLIMIT_FSIZE with SIGXFSZ ignored (writes past the limit come back short, then fail with
EFBIG), and in-process files whose raw writes come back short. After each fault: the command ends in the one-line
`disk full on <mount> ...` error with exit 2, no file under a final name is truncated (every file is compared with
its source by sha256), the data dir holds its previous state, and a persist manifest never records a size or hash
the file on disk does not have.

The last three tests watch the order of fsync/syncfs/rename/unlink events in-process: they fail when persist
stops fsyncing its copies, when it clears the pending marker before the manifest, or when the store's batch loses
its two syncfs barriers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.state import atomic, database, mirror, space
from shared.state.atomic import sync_fs, write_stream
from shared.state.errors import DiskFull, StateError
from shared.state.mirror.packed import PACKS_DIR, pack_file, read_packed
from shared.state.store import Store
from shared.state.store import backend as backend_mod
from tests.conftest import BIN, clean_env
from tests.harness import mirrored, mirrored_hashes
from tests.tabby_root import make_root

persist_mod = sys.modules["shared.state.mirror.persist"]  # the module (the package exports the function)
BIG = 3_000_000  # the tester's file
ROOM = 2_400_000  # ... and the free space they left (about 2.4 MB)


# --- Fault layers ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """mount(size) -> a fresh tmpfs of `size` bytes under tmp_path; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        got = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if got.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip() or got.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def leave_free(disk: Path, free: int) -> int:
    """Fill `disk` so that about `free` bytes stay free; returns the free bytes statvfs reports."""
    filler = disk / "filler"
    have = space.free_bytes(disk) or 0
    with open(filler, "ab") as f:
        f.write(b"\0" * max(have - free, 0))
    return space.free_bytes(disk) or 0


def _limited(limit: int) -> Callable[[], None]:
    def pre() -> None:  # in the child, before exec: both survive exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def cli(args: list[str], tmp: Path, *, fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    """The real `tabby-modal`, optionally under a file size limit."""
    return subprocess.run(
        [str(BIN / "tabby-modal"), *args],
        cwd=tmp,
        env=clean_env(tmp, TABBY_MODAL_ALLOW_DESTRUCTIVE="1"),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited(fsize) if fsize is not None else None,
    )


def assert_disk_full(got: subprocess.CompletedProcess[str], disk: Path | None = None) -> str:
    """Exit 2, one stderr line `error: disk full on <mount> (...)`, no traceback."""
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 2, (got.returncode, got.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: disk full on "), got.stderr
    assert "Traceback" not in got.stderr
    assert "needs " in lines[0] and " free (" in lines[0], lines[0]
    if disk is not None:
        assert f"disk full on {disk} " in lines[0], lines[0]
    return lines[0]


# --- What must hold after a fault -----------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(root: Path, *, skip: tuple[str, ...] = (".tabby-modal/", "models/")) -> dict[str, str]:
    """sha256 of every regular file under `root` (links as `->target`), by relative path; of a data dir, what it
    holds (packed files read through the manifest, every slice checked)."""
    if (root / mirror.MANIFEST).is_file():
        held = mirrored_hashes(root)
        return {k: v for k, v in held.items() if not (k.startswith(skip) or k.endswith(".lock"))}
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(skip) or rel.endswith(".lock") or "-wal" in rel or "-shm" in rel:
            continue
        if p.is_symlink():
            out[rel] = "->" + os.readlink(p)
        elif p.is_file():
            out[rel] = _sha(p)
    return out


def no_db(h: dict[str, str]) -> dict[str, str]:
    """Without the databases: a tree check copies them through SQLite's backup API (same rows, other bytes)."""
    return {k: v for k, v in h.items() if k not in database.DB_PATHS}


def temp_files(root: Path) -> list[str]:
    return [p.as_posix() for p in root.rglob("*") if atomic.TMP_MARK in p.name]


def assert_manifest_true(data: Path) -> None:
    """Every size and hash the persist manifest records is what the data dir holds (a plain file, or its pack's
    slice), and every pack it names is there at its recorded size."""
    m = mirror.load_manifest(data)
    assert m is not None
    for pack_id, size in m.packs.items():
        assert pack_file(data, pack_id).stat().st_size == size, pack_id
    for path, e in m.files.items():
        if e.link is not None:
            assert os.readlink(data / path) == e.link
            continue
        if e.pack is not None:
            got = read_packed(data, e)  # raises on a short slice or a hash that differs
            assert len(got) == e.size
            continue
        p = data / path
        assert p.stat().st_size == e.size, (path, p.stat().st_size, e.size)
        assert _sha(p) == e.sha256, path


def assert_whole_copies(copy: Path, *sources: dict[str, str]) -> None:
    """Every file under `copy` equals, by sha256, the same path in one of `sources` (old or new state); databases
    are copies through SQLite's backup API, checked against the persist manifest instead."""
    for rel, sha in hashes(copy).items():
        if rel in database.DB_PATHS:
            continue
        assert any(s.get(rel) == sha for s in sources), f"{rel}: matches no source (torn or truncated)"


def live_root(at: Path, *, big: bool = True, seed: int = 0) -> Path:
    make_root(at, size_mb=0.3, seed=seed, models=False)
    if big:
        (at / "big.bin").write_bytes(os.urandom(BIG))
    return at


# --- The tester's case, on a small tmpfs ----------------------------------------------------------------------


def test_hydrate_on_a_full_disk_fails_whole(tmp_path: Path, small_disk: Callable[[int], Path]) -> None:
    """Hydrate of a 3,000,000-byte file with ~2.4 MB free: before the fix it exited 0 with a 2.4 MB file."""
    live = live_root(tmp_path / "live")
    mirror.persist(live, tmp_path / "dir/data")
    data_before = hashes(tmp_path / "dir/data")
    disk = small_disk(5 << 20)
    free = leave_free(disk, ROOM)

    got = cli(["hydrate", "--root", str(disk / "root"), "--local", str(tmp_path / "dir")], tmp_path)
    line = assert_disk_full(got, disk)
    assert f"({BIG} bytes)" in line, line  # the file it could not fit
    assert not (disk / "root").exists()  # nothing half-written under the live root's name
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # staging and temps gone
    assert space.free_bytes(disk) == free
    assert hashes(tmp_path / "dir/data") == data_before


def test_hydrate_of_packed_small_files_on_a_full_disk_fails_whole(
    tmp_path: Path, small_disk: Callable[[int], Path]
) -> None:
    """Small files come out of packs in batches (one write per file, no temp names): a disk that fills half-way
    through gives the same one line, exit 2, and leaves nothing behind."""
    live = live_root(tmp_path / "live", big=False)
    for i in range(1500):
        f = live / f"repositories/r/d{i % 30}/f{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(2000))
    mirror.persist(live, tmp_path / "dir/data")
    assert sum(e.pack is not None for e in mirrored(tmp_path / "dir/data").values()) > 1500
    disk = small_disk(8 << 20)
    free = leave_free(disk, 2 << 20)  # room for about half of the ~4.5 MiB
    got = cli(["hydrate", "--root", str(disk / "root"), "--local", str(tmp_path / "dir")], tmp_path)
    assert_disk_full(got, disk)
    assert not (disk / "root").exists()
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert space.free_bytes(disk) == free


def test_hydrate_over_an_existing_root_on_a_full_disk_leaves_it(
    tmp_path: Path, small_disk: Callable[[int], Path]
) -> None:
    live = live_root(tmp_path / "live")
    mirror.persist(live, tmp_path / "data")
    disk = small_disk(5 << 20)
    old = live_root(disk / "root", big=False, seed=7)
    old_state = hashes(old)
    leave_free(disk, ROOM)
    with pytest.raises(DiskFull, match=f"^disk full on {disk} "):
        mirror.hydrate(tmp_path / "data", old)
    assert hashes(old) == old_state
    assert not temp_files(disk)


def test_first_persist_on_a_full_disk_leaves_no_dir(
    tmp_path: Path, small_disk: Callable[[int], Path]
) -> None:
    """Before the fix: exit 2 with a bare `[Errno 28]` and DIR left holding a truncated big.bin."""
    live = live_root(tmp_path / "live")
    disk = small_disk(5 << 20)
    free = leave_free(disk, ROOM)
    got = cli(["persist", "--root", str(live), "--local", str(disk / "dir")], tmp_path)
    assert_disk_full(got, disk)
    assert not (disk / "dir").exists()
    assert space.free_bytes(disk) == free


def test_persist_on_a_full_disk_keeps_the_data_dir(tmp_path: Path, small_disk: Callable[[int], Path]) -> None:
    """An existing data dir: the failed pass publishes nothing (its copies were staged) and leaves no pending
    marker, so hydrate gives the last persist byte for byte; with room, the next persist brings it up to date."""
    disk = small_disk(6 << 20)
    live = live_root(tmp_path / "live", big=False)
    data = disk / "data"
    mirror.persist(live, data)
    before = hashes(data)
    manifest_before = (data / mirror.MANIFEST).read_bytes()
    (live / "big.bin").write_bytes(os.urandom(BIG))
    leave_free(disk, ROOM)

    with pytest.raises(DiskFull, match=f"^disk full on {disk} .*needs 2.9 MiB \\({BIG} bytes\\)"):
        mirror.persist(live, data)
    assert hashes(data) == before
    assert (data / mirror.MANIFEST).read_bytes() == manifest_before
    assert mirror.pending_info(data) is None
    assert_manifest_true(data)
    assert not temp_files(data)

    mirror.hydrate(data, tmp_path / "back")
    assert hashes(tmp_path / "back") == before

    (disk / "filler").unlink()
    again = mirror.persist(live, data)
    assert again["copied_bytes"] >= BIG  # big.bin, and any file that was racy (just written) last time
    assert_manifest_true(data)
    assert hashes(data).keys() == hashes(live).keys()
    assert_whole_copies(data, hashes(live))


def test_snapshot_and_restore_on_a_full_disk(tmp_path: Path, small_disk: Callable[[int], Path]) -> None:
    """A snapshot that does not fit leaves no manifest and no temp pack or blob; a restore whose staging does not
    fit leaves the data dir as it was, with no pending marker."""
    disk = small_disk(16 << 20)
    # The engine itself (what the local form runs under its leases), on DIR/data and DIR/backups.
    data, store = disk / "data", Store.open(disk / "backups")
    live = live_root(tmp_path / "live")
    mirror.persist(live, data)
    data_big = hashes(disk / "data")
    big_id = store.snapshot(data, "big")["id"]

    # The next state drops big.bin (a restore of `big` must write it again) and adds new.bin.
    (live / "big.bin").unlink()
    (live / "new.bin").write_bytes(os.urandom(1_500_000))
    mirror.persist(live, data)
    data_small = hashes(disk / "data")
    backups_before = hashes(disk / "backups", skip=("lock",))

    leave_free(disk, 1_000_000)
    with pytest.raises(DiskFull, match=f"^disk full on {disk} .*needs 1.4 MiB \\(1500000 bytes\\)"):
        store.snapshot(data, "nofit")
    assert hashes(disk / "backups", skip=("lock",)) == backups_before  # no manifest, no blob, no pack
    assert not temp_files(disk)
    assert hashes(disk / "data") == data_small

    (disk / "filler").unlink()
    store.snapshot(data, "small")  # so the restore's safety snapshot below fits (it only adds a manifest)
    leave_free(disk, 1_000_000)
    # Restore lays the database down first, so whichever file meets the full disk is named.
    with pytest.raises(DiskFull, match=f"^disk full on {disk} \\(writing .*restore-staging-.*\\): needs "):
        store.restore(big_id, data)
    assert hashes(disk / "data") == data_small
    assert_manifest_true(disk / "data")
    assert not temp_files(disk)
    assert mirror.pending_info(disk / "data") is None

    (disk / "filler").unlink()
    store.restore(big_id, data)
    assert hashes(disk / "data") == data_big


def test_first_snapshot_on_a_full_disk_leaves_no_backups(
    tmp_path: Path, small_disk: Callable[[int], Path]
) -> None:
    disk = small_disk(8 << 20)
    mirror.persist(live_root(tmp_path / "live"), disk / "dir/data")
    leave_free(disk, ROOM)
    assert_disk_full(cli(["snapshot", "--local", str(disk / "dir")], tmp_path), disk)
    assert not (disk / "dir/backups").exists()
    assert not temp_files(disk)


# --- A file size limit (EFBIG): the real CLI in a subprocess, and in-process ---------------------------------


def test_file_size_limit_persist_and_hydrate_cli(tmp_path: Path) -> None:
    """RLIMIT_FSIZE below the big file: persist into a fresh DIR and hydrate stop with the one line (EFBIG)."""
    live = live_root(tmp_path / "live")
    dir_ = tmp_path / "dir"
    got = cli(["persist", "--root", str(live), "--local", str(dir_)], tmp_path, fsize=ROOM)
    assert "(file size limit reached)" in assert_disk_full(got)
    assert not dir_.exists()

    mirror.persist(live, dir_ / "data")
    got = cli(["hydrate", "--root", str(tmp_path / "root"), "--local", str(dir_)], tmp_path, fsize=ROOM)
    assert "(file size limit reached)" in assert_disk_full(got)
    assert not (tmp_path / "root").exists()
    assert not temp_files(tmp_path)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_FSIZE, SIGXFSZ ignored; both restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_file_size_limit_persist_snapshot_restore(tmp_path: Path) -> None:
    """EFBIG in persist (an existing data dir), snapshot and restore: nothing torn, nothing half-published."""
    # The engine itself (what the local form runs under its leases), on DIR/data and DIR/backups.
    data, store = tmp_path / "data", Store.open(tmp_path / "backups")
    live = live_root(tmp_path / "live", big=False)
    mirror.persist(live, data)
    sid = store.snapshot(data, "small")["id"]
    before, backups_before = hashes(tmp_path / "data"), hashes(tmp_path / "backups", skip=("lock",))
    (live / "big.bin").write_bytes(os.urandom(BIG))
    with file_size_limit(ROOM), pytest.raises(DiskFull, match="file size limit reached"):
        mirror.persist(live, data)
    assert hashes(tmp_path / "data") == before
    assert mirror.pending_info(tmp_path / "data") is None
    assert_manifest_true(tmp_path / "data")

    mirror.persist(live, data)
    with file_size_limit(ROOM), pytest.raises(DiskFull, match="file size limit reached"):
        store.snapshot(data, "big")
    assert hashes(tmp_path / "backups", skip=("lock",)) == backups_before
    assert not temp_files(tmp_path / "backups")

    big_id = store.snapshot(data, "big")["id"]
    store.restore(sid, data)
    small = hashes(tmp_path / "data")
    with file_size_limit(ROOM), pytest.raises(DiskFull, match="file size limit reached"):
        store.restore(big_id, data)
    assert hashes(tmp_path / "data") == small
    assert mirror.pending_info(tmp_path / "data") is None
    assert not temp_files(tmp_path)


@pytest.mark.stress
def test_file_size_limit_every_command_cli(tmp_path: Path) -> None:
    """The real CLI under RLIMIT_FSIZE for persist (fresh and existing), hydrate, snapshot, restore, export."""
    live = live_root(tmp_path / "live")
    dir_ = tmp_path / "dir"
    src = hashes(live)
    assert_disk_full(cli(["persist", "--root", str(live), "--local", str(dir_)], tmp_path, fsize=ROOM))
    assert not dir_.exists()
    assert cli(["persist", "--root", str(live), "--local", str(dir_)], tmp_path).returncode == 0
    assert_manifest_true(dir_ / "data")

    (live / "big.bin").write_bytes(os.urandom(BIG))
    (live / "other.bin").write_bytes(os.urandom(1000))
    assert_disk_full(cli(["persist", "--root", str(live), "--local", str(dir_)], tmp_path, fsize=ROOM))
    assert_manifest_true(dir_ / "data")
    assert_whole_copies(dir_ / "data", src, hashes(live))
    assert not temp_files(dir_)

    assert_disk_full(cli(["snapshot", "--local", str(dir_)], tmp_path, fsize=ROOM))
    assert not (dir_ / "backups").exists()
    assert cli(["persist", "--root", str(live), "--local", str(dir_)], tmp_path).returncode == 0
    snap = cli(["snapshot", "--local", str(dir_), "--json"], tmp_path)
    assert snap.returncode == 0, snap.stderr
    sid = json.loads(snap.stdout)["id"]
    out = tmp_path / "out.tar.gz"
    assert_disk_full(cli(["export", sid, "--out", str(out), "--local", str(dir_)], tmp_path, fsize=1_000_000))
    assert not out.exists() and not temp_files(tmp_path)

    (live / "big.bin").unlink()
    assert cli(["persist", "--root", str(live), "--local", str(dir_)], tmp_path).returncode == 0
    before = hashes(dir_ / "data")
    assert_disk_full(cli(["restore", sid, "--yes", "--local", str(dir_)], tmp_path, fsize=ROOM))
    assert hashes(dir_ / "data") == before
    assert not temp_files(dir_)


# --- Short writes and early stops, in-process -----------------------------------------------------------------


class ShortFile(io.FileIO):
    """A real file whose raw writes take at most `step` bytes, and none once `room` bytes are written (then
    ENOSPC), as a nearly full disk does."""

    step = 100_000
    room: int | None = None

    def write(self, b: Any) -> int:  # type: ignore[override]
        view = memoryview(b)[: self.step]
        if self.room is not None:
            left = self.room - self.tell()
            if left <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            view = view[:left]
        return super().write(view)


def _no_kernel_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any) -> int:
        raise OSError(errno.EXDEV, "no copy_file_range here")

    monkeypatch.setattr(os, "copy_file_range", refuse)


def test_short_raw_writes_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """_pump ignored what FileIO.write returned: a short write left a short file under the final name."""
    data = os.urandom(BIG)
    (tmp_path / "src").write_bytes(data)
    _no_kernel_copy(monkeypatch)
    real_open = open

    def short_open(path: Any, mode: str = "r", buffering: int = -1, **kw: Any) -> Any:
        if mode == "x+b" and buffering == 0:
            return ShortFile(path, "x+")
        return real_open(path, mode, buffering, **kw)

    monkeypatch.setattr("builtins.open", short_open)
    size, sha = atomic.copy_file(tmp_path / "src", tmp_path / "dst")
    assert (size, sha) == (BIG, hashlib.sha256(data).hexdigest())
    assert (tmp_path / "dst").read_bytes() == data

    ShortFile.room = 1_000_000
    try:
        with pytest.raises(DiskFull, match=r"^disk full on .*needs 2\.9 MiB \(3000000 bytes\)"):
            atomic.copy_file(tmp_path / "src", tmp_path / "dst2")
    finally:
        ShortFile.room = None
    assert not (tmp_path / "dst2").exists()
    assert not temp_files(tmp_path)


def test_copy_file_range_stopping_early_is_not_a_short_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy_file_range that answers 0 before the source's end was taken for the end of the file."""
    data = os.urandom(BIG)
    (tmp_path / "src").write_bytes(data)
    real = os.copy_file_range

    def stops(
        fd_in: int, fd_out: int, count: int, off_in: int | None = None, off_out: int | None = None
    ) -> int:
        if (off_out or 0) >= 1_000_000:
            return 0
        return real(fd_in, fd_out, min(count, 1_000_000), off_in, off_out)

    monkeypatch.setattr(os, "copy_file_range", stops)
    with open(tmp_path / "src", "rb", buffering=0) as src:
        assert write_stream(tmp_path / "dst", src)[0] == BIG
    assert (tmp_path / "dst").read_bytes() == data


def test_failing_syncfs_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """syncfs failing with EIO or ENOSPC fell back to sync(), which reports nothing: the barrier silently failed."""
    for code, expected in ((errno.EIO, OSError), (errno.ENOSPC, DiskFull)):

        def failing(_fd: int, code: int = code) -> int:
            ctypes.set_errno(code)
            return -1

        monkeypatch.setitem(atomic._LIBC, "syncfs", failing)
        with pytest.raises(expected) as got:
            sync_fs(tmp_path)
        if expected is OSError:
            assert got.value.errno == errno.EIO


# --- Durability order, watched in-process ---------------------------------------------------------------------


class Events:
    """fsync (of which file), syncfs, rename and unlink, in the order they completed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, ...]] = []  # (kind, path, detail...); fsync and rename carry "dev:inode"
        real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

        def fsync(fd: int) -> None:
            name, st = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
            real_fsync(fd)
            self.log.append(("fsync", name, f"{st.st_dev}:{st.st_ino}"))

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            st = os.lstat(dst)
            self.log.append(
                ("rename", os.path.abspath(src), os.path.abspath(dst), f"{st.st_dev}:{st.st_ino}")
            )

        def unlink(path: Any, **kw: Any) -> None:
            real_unlink(path, **kw)
            self.log.append(("unlink", os.path.abspath(path), ""))

        def syncfs(path: Path) -> None:
            sync_fs(path)
            self.log.append(("syncfs", os.path.abspath(path), ""))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(backend_mod, "sync_fs", syncfs)
        monkeypatch.setattr(atomic, "sync_fs", syncfs)
        monkeypatch.setattr(persist_mod, "sync_fs", syncfs)

    def index(self, kind: str, match: Callable[[tuple[str, ...]], bool]) -> list[int]:
        return [i for i, e in enumerate(self.log) if e[0] == kind and match(e)]


def _persisted_pair(tmp_path: Path) -> tuple[Path, Path]:
    live = live_root(tmp_path / "live", big=False)
    (live / "big.bin").write_bytes(os.urandom(1_200_000))
    return live, tmp_path / "data"


def test_persist_fsyncs_every_copy_before_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutant: persist copies with durable=False. Every file renamed into the data dir must be fsynced (its temp
    before the rename, or under a syncfs barrier) and its directory fsynced, all before the manifest's rename."""
    live, data = _persisted_pair(tmp_path)
    ev = Events(monkeypatch)
    mirror.persist(live, data)
    manifest = str(data / mirror.MANIFEST)
    (m_at,) = ev.index("rename", lambda e: e[2] == manifest)
    packs = str(data / PACKS_DIR)
    renames = [
        e
        for e in ev.log[:m_at]
        if e[0] == "rename"
        and e[2].startswith(str(data))
        and (mirror.META_DIR not in e[2] or e[2].startswith(packs))
    ]
    # The database, big.bin, and the packs holding every small file (a plain file each in format 1).
    assert len(renames) >= 3 and any(e[2].startswith(packs) for e in renames)
    for event in renames:
        at, final, inode = ev.log.index(event), event[2], event[3]
        synced = ev.index("fsync", lambda e, inode=inode: e[2] == inode)  # this file, under any of its names
        barrier = ev.index("syncfs", lambda e: True)
        if not os.path.islink(final):  # a link's target lives in its directory entry
            # Its bytes durable: fsynced, or under a syncfs barrier, before the manifest names it.
            assert any(i < at for i in synced + barrier) or any(at < i < m_at for i in barrier), (
                f"{final}: never fsynced"
            )
        parent = os.path.dirname(final)
        dir_synced = ev.index("fsync", lambda e, parent=parent: e[1] == parent)
        assert any(at < i < m_at for i in dir_synced + barrier), f"{final}: its directory entry never fsynced"


def test_persist_writes_its_manifest_before_clearing_the_pending_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutant: the pending marker cleared before the manifest is written. A crash between them would leave an old
    manifest over new files with no marker: hydrate then refuses the data dir."""
    live, data = _persisted_pair(tmp_path)
    mirror.persist(live, data)
    (live / "big.bin").write_bytes(os.urandom(1_300_000))
    (live / "config.toml").write_bytes(b'[model.completion.local]\nmodel_id = "Changed"\n')

    ev = Events(monkeypatch)
    mirror.persist(live, data)
    (m_at,) = ev.index("rename", lambda e: e[2] == str(data / mirror.MANIFEST))
    (p_at,) = ev.index("unlink", lambda e: e[1] == str(data / mirror.PENDING))
    assert m_at < p_at, "pending marker removed before the manifest was in place"

    # A crash after the last copy, before the manifest (the write itself fails).
    (live / "big.bin").write_bytes(os.urandom(1_100_000))
    real_write = persist_mod.write_manifest

    def crash(*_: Any) -> None:
        raise RuntimeError("crash before the manifest")

    monkeypatch.setattr(persist_mod, "write_manifest", crash)
    with pytest.raises(RuntimeError):
        mirror.persist(live, data)
    monkeypatch.setattr(persist_mod, "write_manifest", real_write)
    assert mirror.pending_info(data) is not None
    got = mirror.hydrate(data, tmp_path / "back")
    assert got["checked"] == "tree"
    assert no_db(hashes(tmp_path / "back")) == no_db(hashes(live))

    # A crash between the manifest and clearing the marker.
    (live / "config.toml").write_bytes(b"# again\n")

    def crash_clear(*_: Any) -> None:
        raise RuntimeError("crash before the marker is cleared")

    monkeypatch.setattr(persist_mod, "clear_pending", crash_clear)
    with pytest.raises(RuntimeError):
        mirror.persist(live, data)
    monkeypatch.undo()
    assert mirror.pending_info(data) is not None
    mirror.hydrate(data, tmp_path / "back2")
    assert no_db(hashes(tmp_path / "back2")) == no_db(hashes(live))

    repaired = mirror.persist(live, data)
    assert repaired["repaired"] is True
    assert mirror.pending_info(data) is None
    assert_manifest_true(data)
    assert no_db(hashes(data)) == no_db(hashes(live))


def test_store_batch_syncs_before_renames_and_before_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutant: both sync_fs barriers removed from DirectoryBackend.batch(). Blobs and packs are written under temp
    names without fsync: one syncfs must come before any of them is renamed into place, and another after the last
    rename and before the snapshot manifest names them."""
    live, data = _persisted_pair(tmp_path)
    mirror.persist(live, data)
    backups = tmp_path / "backups"
    ev = Events(monkeypatch)
    Store.open(backups).snapshot(data)
    objects = ev.index("rename", lambda e: e[2].startswith((str(backups / "blobs"), str(backups / "packs"))))
    packs = ev.index("rename", lambda e: e[2].startswith(str(backups / "packs")))
    loose = ev.index("rename", lambda e: e[2].startswith(str(backups / "blobs")))
    assert packs and loose, "this tree should give both packs and loose blobs"
    (m_at,) = ev.index("rename", lambda e: e[2].startswith(str(backups / "snapshots")))
    barriers = ev.index("syncfs", lambda e: e[1] == str(backups))
    for at in objects:
        inode = ev.log[at][3]
        fsynced = ev.index("fsync", lambda e, inode=inode: e[2] == inode)
        assert any(i < at for i in barriers + fsynced), (
            f"{ev.log[at][2]}: renamed before its bytes were synced"
        )
    assert any(max(objects) < i < m_at for i in barriers), (
        "manifest written before the object names were synced"
    )


def test_disk_full_message_is_built_in_one_place(tmp_path: Path) -> None:
    """The one line names the mount point, the file, what it needed and what is free."""
    err = space.disk_full(tmp_path / "a" / "b", 5_000_000, OSError(errno.ENOSPC, "x"))
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"disk full on {space.mount_point(tmp_path)} (writing {tmp_path / 'a' / 'b'}): ")
    assert "needs 4.8 MiB (5000000 bytes)" in text and "free (no space left)" in text
    assert isinstance(err, StateError) and err.needed == 5_000_000


@pytest.mark.stress
def test_free_space_sweep(tmp_path: Path, small_disk: Callable[[int], Path]) -> None:
    """Persist with free space stepped from 0.2 MB to 8 MB: every outcome is either success or DiskFull; no file
    is ever torn; the manifest is always true; a failed persist leaves the exact previous state with no marker (a
    marked mix, which hydrate accepts and the next persist repairs, only if the disk fills after every copy fit)."""
    disk = small_disk(12 << 20)
    base_live = live_root(tmp_path / "live", big=False)
    base_data = tmp_path / "base-data"
    mirror.persist(base_live, base_data)
    old = hashes(base_data)
    live = tmp_path / "live"
    (live / "big.bin").write_bytes(os.urandom(BIG))
    (live / "mid.bin").write_bytes(os.urandom(1_200_000))
    for i, p in enumerate(sorted(live.glob("events/*.json"))[:5]):
        p.write_bytes(os.urandom(20_000 + i))
    new = hashes(live)
    outcomes: dict[str, int] = {"ok": 0, "clean": 0, "mixed": 0}
    for free in range(200_000, 8_000_001, 250_000):
        data = disk / "data"
        shutil.rmtree(data, ignore_errors=True)
        (disk / "filler").unlink(missing_ok=True)
        shutil.copytree(base_data, data, symlinks=True)
        leave_free(disk, free)
        try:
            mirror.persist(live, data)
            outcomes["ok"] += 1
        except DiskFull:
            if mirror.pending_info(data) is None:
                assert hashes(data) == old
                outcomes["clean"] += 1
            else:
                outcomes["mixed"] += 1
                back = tmp_path / f"back-{free}"
                mirror.hydrate(data, back)
                assert_whole_copies(back, old, new)
                shutil.rmtree(back)
        assert_manifest_true(data)
        assert_whole_copies(data, old, new)
        assert not temp_files(disk)
        (disk / "filler").unlink()
        mirror.persist(live, data)
        assert_manifest_true(data)
        assert no_db(hashes(data)) == no_db(new)
    print(f"persist sweep: {outcomes}")
    assert outcomes["ok"] and (outcomes["clean"] or outcomes["mixed"])


def test_a_live_source_that_grows_between_two_looks_is_copied_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the busy-writer stress test: Tabby appended to a file between the size look and the change look of
    # one copy, and a whole copy was refused as "copied 7983 of 7970 bytes".
    from shared.state import atomic

    src = tmp_path / "events.json"
    src.write_bytes(b"x" * 7970)
    real_fstat = os.fstat
    grown = []

    def fstat_then_append(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if not grown:
            grown.append(True)
            with open(src, "ab") as f:  # the writer, right after our first look
                f.write(b"y" * 13)
        return st

    monkeypatch.setattr(atomic.os, "fstat", fstat_then_append)
    size, sha = atomic.copy_file(src, tmp_path / "copy.json")
    monkeypatch.setattr(atomic.os, "fstat", real_fstat)
    assert grown and size == 7983 == (tmp_path / "copy.json").stat().st_size
    assert sha == hashlib.sha256((tmp_path / "copy.json").read_bytes()).hexdigest()
