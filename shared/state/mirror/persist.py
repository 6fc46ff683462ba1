"""Persist: copy a live TABBY_ROOT to the data dir (the `/data` Volume) every few seconds while Tabby writes:

- the database through SQLite's online backup API, checked before it is published (never a file copy);
- other files only when changed: (size, mtime) first, then their hash; each through temp file + fsync + rename;
- every Tantivy `index/**/meta.json` after the segment files it names, from a copy read before those segments;
- deletions after additions; lock files, SQLite sidecars and `models/` excluded;
- the persist manifest (`.tabby-modal/persist.json`: files, sizes, sha256, DB check, time) written last.

Changed files are first written (and fsynced) into a staging folder inside `.tabby-modal/`, and renamed into place
only once the whole pass has been copied: a pass that fails (a full disk) leaves the data dir exactly as it was.
A pending marker (`.tabby-modal/pending.json`) is written before the first change of a pass and removed after the
manifest: readers that find it know the tree may be a mix of two passes (each file whole, the index still
consistent), as after a crash; the next persist repairs it. The marker of an unfinished restore or reset is not
repaired: persist refuses (InterruptedChange) until a restore finishes the job. A pass with nothing changed only stats live files.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import posixpath
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from shared.state import database, fault_points
from shared.state.atomic import (
    TMP_MARK,
    ensure_dir,
    fsync_dir,
    hash_file,
    read_upto,
    sync_fs,
    write_bytes,
    write_temp,
)
from shared.state.errors import HashMismatch, StateError
from shared.state.interruption import worker_pool
from shared.state.mirror.manifest import (
    DataDirReplaced,
    Entry,
    PersistManifest,
    clear_pending,
    load_manifest,
    pending_info,
    refuse_unfinished,
    write_manifest,
    write_pending,
    writing,
)
from shared.state.mirror.packed import (
    PACKS_DIR,
    PackSink,
    batches,
    by_pack,
    pack_file,
    pack_files,
    packable,
    read_slice,
)
from shared.state.mirror.scan import (
    META_DIR,
    WORKERS,
    Node,
    clear_way,
    escaping_links,
    excluded,
    prune_empty_dirs,
    remove,
    scan,
)
from shared.state.mirror.tantivy import is_index_meta, meta_missing
from shared.state.packs import PACK_BLOB_MAX
from shared.state.paths import inside
from shared.state.progress import Progress, silent

# A recorded mtime this close to the moment we stat'ed may be shared by a later write (coarse kernel clocks):
# such entries are "racy" and are re-hashed on the next pass, as git does for its index.
RACY_NS = 100_000_000
# Compaction: a pass moves at most this many live bytes out of mostly-dead packs; packs under SMALL_PACK bytes are
# merged once there are more than SMALL_PACKS_MAX of them (a busy server writes one small pack per pass).
COMPACT_BUDGET = 64 << 20
SMALL_PACK = 1 << 20
SMALL_PACKS_MAX = 64


def _db_sig(path: Path) -> list[int]:
    out: list[int] = []
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            st = p.stat()
            out += [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            out += [-1, -1]
    return out


class _Persist:
    def __init__(self, live: Path, data: Path, prev: PersistManifest | None, repair: bool) -> None:
        self.live, self.data = live, data
        self.live_s = os.fspath(live)  # string paths on the per-file path: a Path join costs more than a stat
        self.prev = prev
        self.repair = repair
        old = dict(prev.files) if prev else {}
        self.pack_sizes: dict[str, int] = {}
        if repair:  # trust only entries whose data-dir copy still looks as recorded
            self.pack_sizes = {i: f.stat().st_size for i, f in pack_files(data).items()}
            old = {p: e for p, e in old.items() if self._data_matches(e)}
        self.old = old
        self.new: dict[str, Entry] = {}
        self.copied = 0
        self.copied_bytes = 0
        self.warnings: list[str] = []
        self.pending = False
        self.published = (
            False  # has this pass changed what a reader of the data dir sees (beyond its marker)?
        )
        # Where this pass writes its packs and copies before any is renamed into place, and the (copy, final) pairs.
        self.staging = data / META_DIR / f"persist{TMP_MARK}{secrets.token_hex(4)}"
        self.staged: list[tuple[Path, Path]] = []
        self.sink = PackSink(self.staging)
        self.packs: dict[str, int] = {}  # the packs this pass renamed in, by id: their sizes

    def _data_matches(self, e: Entry) -> bool:
        if e.pack is not None:
            return self.pack_sizes.get(e.pack, -1) >= e.offset + e.size
        p = self.data / e.path
        try:
            if e.link is not None:
                return os.readlink(p) == e.link
            st = p.lstat()
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns

    def _has(self, e: Entry) -> bool:
        if e.pack is not None:
            return True  # packs are never changed; repair mode kept only entries whose pack is there
        try:
            return (self.data / e.path).lstat().st_size == e.size
        except OSError:
            return False

    def stage(self) -> None:
        """The staging dir: nothing in it is visible to a reader, so no marker is needed yet."""
        if not self.staging.is_dir():
            ensure_dir(self.staging, durable=False)

    def mark(self) -> None:
        """The pending marker, before the first change a reader could see (a plain file renamed over, a deletion)."""
        if not self.pending:
            write_pending(self.data, "persist")
            self.pending = True

    def stage_name(self) -> Path:
        self.stage()
        return self.staging / secrets.token_hex(8)

    def publish(self) -> None:
        """Close this pass's packs, put ONE durability barrier over everything it wrote (packs, copies, databases),
        then rename the packs in (no manifest names them yet, so no reader sees them) and every staged copy over
        its path, in the order staged (segments before the meta.json naming them), each directory made durable
        once at the end. Only the renames of plain files change what a reader sees."""
        done = self.sink.finish()
        if not done and not self.staged:
            return
        fault_points.reached("persist")  # written, not yet durable, nothing named
        sync_fs(self.data)
        fault_points.reached("persist")  # durable, nothing renamed
        if done:
            folder = self.data / PACKS_DIR
            ensure_dir(folder)
            for pack_id, (tmp, size) in done.items():
                os.replace(tmp, pack_file(self.data, pack_id))
                self.packs[pack_id] = size
            self.sink.done = {}
            fsync_dir(folder)
        if self.staged:
            self.mark()
            self.published = True
        touched: set[Path] = set()
        for staged, final in self.staged:
            clear_way(self.data, final.relative_to(self.data).as_posix())
            ensure_dir(final.parent)
            os.replace(staged, final)
            touched.add(final.parent)
            fault_points.reached("persist")
        for d in touched:
            fsync_dir(d)
        self.staged = []

    def copy(self, path: str) -> Entry | None:
        """Copy one live file (or link) if its content changed; None if it vanished."""
        src, dst = self.live / path, self.data / path
        old = self.old.get(path)
        size, sha, st = 0, "", None
        copy: Path | None = None  # the staged copy of the last attempt
        for attempt in range(3):
            t0 = time.time_ns()
            try:
                st = os.lstat(f"{self.live_s}/{path}")
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(src)
                    if old is None or old.link != target or self.repair:
                        link = self.stage_name()
                        os.symlink(target, link)
                        self.staged.append((link, dst))
                    return Entry(path, mode=0o777, link=target)
                if not stat.S_ISREG(st.st_mode):
                    return None
                mode = stat.S_IMODE(st.st_mode)
                racy = st.st_mtime_ns >= t0 - RACY_NS
                if packable(path, st.st_size):
                    got = self._pack(path, st, mode, racy, old, last=attempt == 2)
                    if got is not None:
                        return got
                    if attempt < 2:
                        continue  # changed while read: once more
                    # It grew past the pack limit while read, three times: a plain file, below.
                if old is not None and old.link is None and old.size == st.st_size and self._has(old):
                    hsize, hsha = hash_file(src)
                    if hsha == old.sha256 and hsize == old.size and old.pack is None:
                        if (old.mtime_ns, old.mode) != (st.st_mtime_ns, mode):
                            self.mark()
                            self.published = True
                            os.chmod(dst, mode)
                            os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
                        return replace(old, mtime_ns=st.st_mtime_ns, mode=mode, racy=racy)
                if copy is not None:
                    copy.unlink()  # the source changed under the last attempt
                    copy = None
                with open(src, "rb", buffering=0) as f:
                    copy, size, sha = write_temp(
                        self.stage_name(),
                        f,
                        mode=mode,
                        mtime_ns=st.st_mtime_ns,
                        durable=False,
                        writeback=True,
                    )
                after = src.lstat()
            except FileNotFoundError:
                if copy is not None:
                    copy.unlink()
                return None
            self.copied += 1
            self.copied_bytes += size
            if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and size == st.st_size:
                self.staged.append((copy, dst))
                return Entry(path, size, st.st_mtime_ns, mode, sha, racy=racy)
        # Still being written: keep this copy, and make sure the next pass looks again.
        assert st is not None
        if copy is None:
            return None
        self.staged.append((copy, dst))
        return Entry(path, size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), sha, racy=True)

    def _pack(
        self, path: str, st: os.stat_result, mode: int, racy: bool, old: Entry | None, last: bool
    ) -> Entry | None:
        """A small file into this pass's pack (or kept where it is if its content did not change); None when it
        changed while read (the caller tries again)."""
        fd = os.open(f"{self.live_s}/{path}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data: bytes | None = os.read(fd, st.st_size + 1)  # a regular file: all of it in one read
            if (
                len(data) != st.st_size
            ):  # it changed size (or a short read): read what is there, up to the limit
                with os.fdopen(os.dup(fd), "rb", buffering=0) as rest:
                    data += read_upto(rest, PACK_BLOB_MAX - len(data))
                if len(data) >= PACK_BLOB_MAX:
                    data = None  # it grew past the pack limit
            after = os.fstat(fd)  # the file we read, not whatever the path names by now
        finally:
            os.close(fd)
        stable = (after.st_size, after.st_mtime_ns, after.st_ino) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
        ) and (data is not None and len(data) == st.st_size)
        if data is None or (not stable and not last):
            return None
        racy = racy or not stable
        sha = hashlib.sha256(data).hexdigest()
        if old is not None and old.pack is not None and old.size == len(data) and sha == old.sha256:
            return replace(old, mtime_ns=st.st_mtime_ns, mode=mode, racy=racy)
        return self._packed(path, data, st, mode, racy, sha)

    def _packed(
        self, path: str, data: bytes, st: os.stat_result, mode: int, racy: bool, sha: str | None = None
    ) -> Entry:
        sha = sha or hashlib.sha256(data).hexdigest()
        self.stage()
        pack_id, off = self.sink.add(sha, data)
        self.copied += 1
        self.copied_bytes += len(data)
        return Entry(path, len(data), st.st_mtime_ns, mode, sha, racy=racy, pack=pack_id, offset=off)

    def database(self, path: str) -> dict[str, Any]:
        src = self.live / path
        t0 = time.time_ns()
        sig = _db_sig(src)
        racy = max(sig[1], sig[3]) >= t0 - RACY_NS
        old = self.old.get(path)
        old_db = self.prev.databases.get(path) if self.prev and not self.repair else None
        if old is not None and old_db and old_db.get("sig") == sig and not old_db.get("racy"):
            self.new[path] = old
            return old_db
        copy = self.stage_name()
        res = database.backup(src, copy, skip_if_sha256=old.sha256 if old else None, durable=False)
        if res["unchanged"] and old is not None and old.pack is None:
            self.new[path] = old
        else:
            self.staged.append((copy, self.data / path))
            st = copy.stat()
            self.new[path] = Entry(path, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), res["sha256"])
            self.copied += 1
            self.copied_bytes += st.st_size
        return {"check": res["check"], "mode": res["mode"], "sig": sig, "racy": racy}

    def meta(self, path: str, content: bytes | None, st: os.stat_result | None) -> None:
        """Publish a Tantivy meta.json only once every segment it names is in the data dir."""
        base = posixpath.dirname(path)
        for _ in range(3):
            if content is None or st is None:
                return  # meta.json gone: the index was removed
            old = self.old.get(path)
            if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns) and not old.racy:
                self.new[path] = old
                return
            missing = meta_missing(path, content, self.new)
            if not missing:
                t0 = time.time_ns()
                mode = stat.S_IMODE(st.st_mode)
                racy = st.st_mtime_ns >= t0 - RACY_NS or len(content) != st.st_size
                if packable(path, len(content)):
                    self.new[path] = self._packed(path, content, st, mode, racy)
                    return
                copy = self.stage_name()
                write_bytes(copy, content, mode=mode, durable=False)
                os.utime(copy, ns=(st.st_mtime_ns, st.st_mtime_ns))
                self.staged.append((copy, self.data / path))
                size, sha = len(content), _sha(content)
                self.new[path] = Entry(path, size, st.st_mtime_ns, mode, sha, racy=racy)
                self.copied += 1
                self.copied_bytes += size
                return
            # Tantivy committed (and maybe garbage-collected) since we looked: pick up that directory again.
            with os.scandir(self.live / base) as it:
                names = [de.name for de in it if de.is_file(follow_symlinks=False)]
            for name in names:
                rel = posixpath.join(base, name)
                if rel == path or excluded(rel):
                    continue
                e, st_now = self.new.get(rel), _stat(self.live / rel)
                if st_now is not None and (e is None or (e.size, e.mtime_ns) != st_now):
                    got = self.copy(rel)
                    if got is not None:
                        self.new[rel] = got
            content, st = _read_meta(self.live / path)
        # Could not catch a stable index: keep the previous meta.json and the segments it names.
        old = self.old.get(path)
        self.warnings.append(f"{path}: index changing too fast, kept the previous copy")
        if old is None:
            return
        self.new[path] = replace(old, racy=True)
        for p, e in self.old.items():
            if posixpath.dirname(p) == base and p not in self.new:
                self.new[p] = e

    def compact(self, sizes: dict[str, int], budget: int = COMPACT_BUDGET) -> int:
        """Copy the live slices of mostly-dead packs into this pass's pack, so old packs can go: packs whose live
        bytes are under half their size, and the smallest packs once there are more than SMALL_PACKS_MAX small
        ones; at most `budget` bytes per pass, so a pass stays short. Returns the bytes moved."""
        groups = by_pack(self.new)
        live = {i: sum(e.size for e in g) for i, g in groups.items()}
        old = [i for i in groups if i in sizes and i not in self.packs]
        dead = sorted((i for i in old if live[i] * 2 < sizes[i]), key=lambda i: live[i])
        small = sorted((i for i in old if sizes[i] < SMALL_PACK and i not in dead), key=lambda i: sizes[i])
        if len(small) > SMALL_PACKS_MAX:
            dead += small[: len(small) - SMALL_PACKS_MAX // 2]
        moved = 0
        for pack_id in dead:
            if moved >= budget:
                break
            try:
                fd = os.open(pack_file(self.data, pack_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                slices = [(e, read_slice(fd, e)) for e in groups[pack_id]]
            except HashMismatch as err:
                # A damaged pack stays as it is (the next snapshot's verify names it): never spread bad bytes.
                self.warnings.append(f"pack {pack_id} not compacted: {err}")
                continue
            finally:
                os.close(fd)
            for e, data in slices:
                new_pack, off = self.sink.add(e.sha256 or "", data)
                self.new[e.path] = replace(e, pack=new_pack, offset=off)
                moved += e.size
        return moved


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_meta(path: Path) -> tuple[bytes | None, os.stat_result | None]:
    try:
        st = path.stat()
        return path.read_bytes(), st
    except FileNotFoundError:
        return None, None


class LiveTree(Protocol):
    """What a pass asks of a change journal on the live root (`shared.state.mirror.journal`): the live root's
    nodes now (as `scan` would return them) and whether anything may have changed since the last call."""

    def nodes(self) -> tuple[dict[str, Node], bool]: ...


class PersistDeadline(Exception):
    """A persist gave up between two files: its deadline (the exit hook's time) had passed."""


def _check_deadline(deadline: Callable[[], float | None] | None, done: int, total: int) -> None:
    when = deadline() if deadline is not None else None
    if when is not None and time.monotonic() >= when:
        raise PersistDeadline(f"{done} of {total} changed files copied")


def persist(
    live_root: Path,
    data_dir: Path,
    *,
    commit: Callable[[], None] | None = None,
    progress: Progress | None = None,
    epoch: str | None = None,
    seq: int | None = None,
    deadline: Callable[[], float | None] | None = None,
    live_tree: LiveTree | None = None,
) -> dict[str, Any]:
    """Mirror `live_root` into `data_dir` consistently; call `commit()` once the pass is complete.

    Safe to run every few seconds while Tabby writes; the pass holds the data dir's writer lock (`writing`), so a
    restore or reset waits for it. `epoch` (from `hydrate()`) makes persist refuse when the data dir was restored or
    reset since: the live root is then stale; `seq` (from `hydrate()` or the last persist's result; 0 = no manifest)
    also when anyone else persisted into it. Both raise DataDirReplaced with nothing written.
    `deadline()` (a `time.monotonic()` time or None, asked between two files: the server's exit sets it while a
    pass runs) stops the pass with PersistDeadline once passed; the data dir keeps the last complete persist's
    database and index, plus whole newer files.
    A database copy that fails its check raises DbCheckError and nothing of it is published.
    Returns {changed, copied_bytes, deleted, files, bytes, databases, seconds, wrote_manifest, committed, seq, ...}.
    """
    live_root, data_dir = Path(live_root), Path(data_dir)
    started = time.monotonic()
    if not live_root.is_dir():
        raise StateError(f"live root {live_root} is not a directory")
    if (
        data_dir.resolve() == live_root.resolve()
        or inside(live_root, data_dir)
        or inside(data_dir, live_root)
    ):
        raise StateError("live root and data dir must be separate trees")
    ensure_dir(data_dir)
    with writing(data_dir):
        marked = pending_info(data_dir) is not None
        runs: list[_Persist] = []  # the pass, once started
        for old in (data_dir / META_DIR).glob(f"persist{TMP_MARK}*"):
            shutil.rmtree(old, ignore_errors=True)  # staged copies of a pass that crashed
        try:
            result = _persist(live_root, data_dir, progress, epoch, seq, runs, deadline, live_tree)
        except BaseException:
            if runs and runs[0].pending and not runs[0].published and not marked:
                # A pass that failed (a full disk) before changing anything: the data dir is exactly its last
                # persist, so its pending marker would only send the next hydrate to the slower tree check.
                with contextlib.suppress(OSError):
                    clear_pending(data_dir)
            raise
        finally:
            if runs:
                runs[
                    0
                ].sink.abort()  # packs of a pass that did not get to rename them (a no-op after publish)
                shutil.rmtree(runs[0].staging, ignore_errors=True)
    if commit is not None:
        commit()
        result["committed"] = True
    result["seconds"] = round(time.monotonic() - started, 4)
    return result


def _persist(
    live_root: Path,
    data_dir: Path,
    progress: Progress | None,
    epoch: str | None,
    seq: int | None,
    runs: list[_Persist],
    deadline: Callable[[], float | None] | None,
    live_tree: LiveTree | None = None,
) -> dict[str, Any]:
    warnings: list[str] = []
    # Never "repair" a half-done restore or reset into a state of its own: that would make the mix look healthy.
    refuse_unfinished(data_dir, "persist")
    try:
        prev = load_manifest(data_dir, copy=False)  # read only: the pass builds its own map
    except StateError as err:
        prev = None
        warnings.append(f"unreadable persist manifest ignored ({err})")
    if epoch is not None and prev is not None and prev.epoch != epoch:
        raise DataDirReplaced(
            "data dir was restored or reset after this live root was hydrated: hydrate again before persisting"
        )
    if seq is not None and (prev.seq if prev else 0) != seq:
        raise DataDirReplaced(
            f"data dir was written by someone else (persist #{prev.seq if prev else 0}, expected #{seq}): "
            "hydrate again before persisting"
        )
    repair = prev is None or pending_info(data_dir) is not None
    if live_tree is not None:
        nodes, changed = live_tree.nodes()
        if not changed and not repair and prev is not None and _quiet(live_root, prev):
            return _unchanged(prev, warnings)
    else:
        nodes = scan(live_root)
    run = _Persist(live_root, data_dir, prev, repair)
    runs.append(run)
    # Read each changed meta.json now, before any segment is copied: the copy we publish names only segments that
    # existed at this moment. An unchanged one is not read at all (None).
    metas: dict[str, tuple[bytes | None, os.stat_result | None] | None] = {}
    for p in sorted(nodes):
        if is_index_meta(p):
            old, n = run.old.get(p), nodes[p]
            unchanged = old is not None and not old.racy and (old.size, old.mtime_ns) == (n.size, n.mtime_ns)
            metas[p] = None if unchanged else _read_meta(live_root / p)
    dbs = [p for p in database.DB_PATHS if p in nodes and nodes[p].link is None]
    bad_links = escaping_links(nodes)
    for p in sorted(bad_links):
        warnings.append(f"{p}: symlink leaves the root, skipped")

    todo = []
    for path, node in nodes.items():
        if path in metas or path in dbs or path in bad_links:
            continue
        old = run.old.get(path)  # in repair mode, only entries whose data-dir copy still matches
        if old is not None and not old.racy:
            if node.link is not None and old.link == node.link:
                run.new[path] = old
                continue
            if (
                node.link is None
                and (old.size, old.mtime_ns, old.mode) == (node.size, node.mtime_ns, node.mode)
                and (old.pack is not None or not packable(path, old.size))  # else: a plain small file to pack
            ):
                run.new[path] = old
                continue
        todo.append(path)

    prog = progress or silent()
    # The databases are copied (backup API + check) after the files: part of the work the ETA counts.
    prog.set_totals(len(todo) + len(dbs), sum(nodes[p].size for p in [*todo, *dbs]))
    todo.sort()  # neighbours share a pack: a hydrate then creates files directory by directory

    def copy_batch(batch: list[str]) -> list[tuple[str, Entry | None]]:
        out = []
        for p in batch:
            out.append((p, run.copy(p)))
            prog.add(1, nodes[p].size)
        return out

    done = 0
    large = [[p] for p in todo if nodes[p].size >= PACK_BLOB_MAX]
    small = list(batches((p for p in todo if nodes[p].size < PACK_BLOB_MAX), lambda p: nodes[p].size))
    # Small files on ONE thread: their work is a few short system calls each, and threads trading the GIL after
    # every call made a 20k-file pass 2.5x slower on 4 threads than on one (measured). Large files (long reads
    # and hashes without the GIL) run beside it on the pool.
    with worker_pool(1) as one, worker_pool(WORKERS) as pool:
        results_iter = itertools.chain(one.map(copy_batch, small), pool.map(copy_batch, large))
        for results in results_iter:
            for path, entry in results:
                if entry is not None:
                    run.new[path] = entry
            done += len(results)
            _check_deadline(deadline, done, len(todo) + len(dbs))
    databases = {p: run.database(p) for p in dbs}
    _check_deadline(deadline, len(todo), len(todo) + len(dbs))
    prog.add(len(dbs), sum(nodes[p].size for p in dbs))
    for p, item in metas.items():
        if item is None:
            run.new[p] = run.old[p]
        else:
            run.meta(p, *item)

    sizes = {**(prev.packs if prev else {}), **run.pack_sizes} if repair else dict(prev.packs if prev else {})
    same = (
        prev is not None
        and not repair
        and not run.staged
        and not run.copied
        and not run.published
        and prev.files == run.new
        and prev.databases == databases
    )
    if not same:
        run.compact(sizes)
    run.publish()
    sizes.update(run.packs)
    manifest = PersistManifest(
        files=run.new,
        databases=databases,
        time_unix=time.time(),
        seq=(prev.seq + 1) if prev else 1,
        epoch=(prev.epoch if prev and prev.epoch else secrets.token_hex(8)),
        origin="persist",
        packs={i: sizes[i] for i in {e.pack for e in run.new.values() if e.pack is not None}},
    )
    # Plain files the new manifest no longer has at their paths (deleted, or now packed): removed after the
    # manifest, so the index it names is always whole. The marker goes first, so a crash between the two leaves a
    # pass the next one repairs.
    tmp_files: list[str] = []
    if repair:
        existing = set(scan(data_dir, tmp_files=tmp_files))
    else:
        existing = {p for p, e in prev.files.items() if e.pack is None} if prev else set()
    gone = sorted(p for p in existing if p not in run.new or run.new[p].pack is not None)
    if gone or tmp_files:
        run.mark()
    if not same:
        fault_points.reached("persist")  # before the manifest
        write_manifest(data_dir, manifest)
        fault_points.reached("persist")  # after it
    if gone or tmp_files:
        run.published |= bool(gone)
        for p in gone:
            remove(data_dir, p)
            fault_points.reached("persist")
        for p in tmp_files:
            remove(data_dir, p, tree=True)
        prune_empty_dirs(data_dir, [*gone, *tmp_files])
    if not same:
        for pack_id, f in pack_files(data_dir).items():
            if pack_id not in manifest.packs:
                f.unlink(missing_ok=True)  # no manifest names it any more (compacted, or left by a crash)
                fault_points.reached("persist")
    if not same or run.pending:
        clear_pending(data_dir)
    prog.finish()
    return {
        "changed": run.copied,
        "copied_bytes": run.copied_bytes,
        "deleted": sum(p not in run.new for p in (prev.files if prev else ())) if not same else 0,
        "files": len(manifest.files),
        "bytes": manifest.bytes,
        "databases": {p: d["check"] for p, d in databases.items()},
        "wrote_manifest": not same,
        "committed": False,
        "repaired": repair,
        "epoch": manifest.epoch,
        "seq": prev.seq if same and prev else manifest.seq,
        "packs": len(manifest.packs),
        "warnings": warnings + run.warnings,
    }


def _quiet(live_root: Path, prev: PersistManifest) -> bool:
    """Nothing to do, when the change journal saw nothing: the databases' signatures are as recorded (SQLite writes
    in place through mmap too) and no entry waits for a re-hash."""
    for p, d in prev.databases.items():
        if d.get("racy") or d.get("sig") != _db_sig(live_root / p):
            return False
    return not any(e.racy for e in prev.files.values())


def _unchanged(prev: PersistManifest, warnings: list[str]) -> dict[str, Any]:
    return {
        "changed": 0,
        "copied_bytes": 0,
        "deleted": 0,
        "files": len(prev.files),
        "bytes": prev.bytes,
        "databases": {p: d.get("check") for p, d in prev.databases.items()},
        "wrote_manifest": False,
        "committed": False,
        "repaired": False,
        "epoch": prev.epoch,
        "seq": prev.seq,
        "packs": len(prev.packs),
        "warnings": warnings,
    }
