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

from shared.state import database
from shared.state.atomic import TMP_MARK, ensure_dir, fsync_dir, hash_file, write_bytes, write_temp
from shared.state.errors import StateError
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
from shared.state.paths import inside
from shared.state.progress import Progress, silent

# A recorded mtime this close to the moment we stat'ed may be shared by a later write (coarse kernel clocks):
# such entries are "racy" and are re-hashed on the next pass, as git does for its index.
RACY_NS = 100_000_000


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
        self.prev = prev
        self.repair = repair
        old = dict(prev.files) if prev else {}
        if repair:  # trust only entries whose data-dir file still looks as recorded
            old = {p: e for p, e in old.items() if self._data_matches(e)}
        self.old = old
        self.new: dict[str, Entry] = {}
        self.copied = 0
        self.copied_bytes = 0
        self.warnings: list[str] = []
        self.pending = False
        self.published = False  # has this pass changed the data dir yet (beyond its pending marker)?
        # Where this pass writes its copies before any is renamed into place, and the (copy, final path) pairs.
        self.staging = data / META_DIR / f"persist{TMP_MARK}{secrets.token_hex(4)}"
        self.staged: list[tuple[Path, Path]] = []

    def _data_matches(self, e: Entry) -> bool:
        p = self.data / e.path
        try:
            if e.link is not None:
                return os.readlink(p) == e.link
            st = p.lstat()
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns

    def _has(self, e: Entry) -> bool:
        try:
            return (self.data / e.path).lstat().st_size == e.size
        except OSError:
            return False

    def begin(self) -> None:
        if not self.pending:
            write_pending(self.data, "persist")
            ensure_dir(self.staging, durable=False)
            self.pending = True

    def stage_name(self) -> Path:
        return self.staging / secrets.token_hex(8)

    def publish(self) -> None:
        """Rename every staged copy into place, in the order staged (segments before the meta.json naming them),
        each directory entry made durable before the next: only now does the data dir change."""
        if self.staged:
            self.published = True
        for staged, final in self.staged:
            clear_way(self.data, final.relative_to(self.data).as_posix())
            ensure_dir(final.parent)
            os.replace(staged, final)
            fsync_dir(final.parent)
        self.staged = []

    def copy(self, path: str) -> Entry | None:
        """Copy one live file (or link) if its content changed; None if it vanished."""
        src, dst = self.live / path, self.data / path
        old = self.old.get(path)
        size, sha, st = 0, "", None
        copy: Path | None = None  # the staged copy of the last attempt
        for _ in range(3):
            t0 = time.time_ns()
            try:
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(src)
                    if old is None or old.link != target or self.repair:
                        self.begin()
                        link = self.stage_name()
                        os.symlink(target, link)
                        self.staged.append((link, dst))
                    return Entry(path, mode=0o777, link=target)
                if not stat.S_ISREG(st.st_mode):
                    return None
                mode = stat.S_IMODE(st.st_mode)
                racy = st.st_mtime_ns >= t0 - RACY_NS
                if old is not None and old.link is None and old.size == st.st_size and self._has(old):
                    hsize, hsha = hash_file(src)
                    if hsha == old.sha256 and hsize == old.size:
                        if (old.mtime_ns, old.mode) != (st.st_mtime_ns, mode):
                            self.begin()
                            self.published = True
                            os.chmod(dst, mode)
                            os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
                        return replace(old, mtime_ns=st.st_mtime_ns, mode=mode, racy=racy)
                self.begin()
                if copy is not None:
                    copy.unlink()  # the source changed under the last attempt
                    copy = None
                with open(src, "rb", buffering=0) as f:
                    copy, size, sha = write_temp(self.stage_name(), f, mode=mode, mtime_ns=st.st_mtime_ns)
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
        if copy is not None:
            self.staged.append((copy, dst))
        return Entry(path, size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), sha, racy=True)

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
        self.begin()
        copy = self.stage_name()
        res = database.backup(src, copy, skip_if_sha256=old.sha256 if old else None)
        if res["unchanged"] and old is not None:
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
                self.begin()
                copy = self.stage_name()
                write_bytes(copy, content, mode=stat.S_IMODE(st.st_mode))
                os.utime(copy, ns=(st.st_mtime_ns, st.st_mtime_ns))
                self.staged.append((copy, self.data / path))
                size, sha = len(content), _sha(content)
                racy = st.st_mtime_ns >= t0 - RACY_NS or size != st.st_size
                self.new[path] = Entry(path, size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), sha, racy=racy)
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
        prev = load_manifest(data_dir)
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
    nodes = live_tree.nodes()[0] if live_tree is not None else scan(live_root)
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
            if node.link is None and (old.size, old.mtime_ns, old.mode) == (
                node.size,
                node.mtime_ns,
                node.mode,
            ):
                run.new[path] = old
                continue
        todo.append(path)

    prog = progress or silent()
    # The databases are copied (backup API + check) after the files: part of the work the ETA counts.
    prog.set_totals(len(todo) + len(dbs), sum(nodes[p].size for p in [*todo, *dbs]))
    with worker_pool(WORKERS) as pool:
        for done, (path, entry) in enumerate(zip(todo, pool.map(run.copy, todo), strict=True)):
            if entry is not None:
                run.new[path] = entry
            _check_deadline(deadline, done, len(todo) + len(dbs))
            prog.add(1, nodes[path].size)
    databases = {p: run.database(p) for p in dbs}
    _check_deadline(deadline, len(todo), len(todo) + len(dbs))
    prog.add(len(dbs), sum(nodes[p].size for p in dbs))
    for p, item in metas.items():
        if item is None:
            run.new[p] = run.old[p]
        else:
            run.meta(p, *item)

    run.publish()
    # Deletions come after every addition, so the index never names a segment that is gone.
    tmp_files: list[str] = []
    existing = set(scan(data_dir, tmp_files=tmp_files)) if repair else set(prev.files if prev else ())
    gone = sorted(existing - set(run.new))
    if gone or tmp_files:
        run.begin()
        run.published |= bool(gone)
        for p in gone:
            remove(data_dir, p)
        for p in tmp_files:
            remove(data_dir, p, tree=True)
        prune_empty_dirs(data_dir, [*gone, *tmp_files])

    manifest = PersistManifest(
        files=run.new,
        databases=databases,
        time_unix=time.time(),
        seq=(prev.seq + 1) if prev else 1,
        epoch=(prev.epoch if prev and prev.epoch else secrets.token_hex(8)),
        origin="persist",
    )
    same = (
        prev is not None
        and not repair
        and not run.pending
        and prev.files == manifest.files
        and prev.databases == manifest.databases
    )
    if not same:
        write_manifest(data_dir, manifest)
        clear_pending(data_dir)
    prog.finish()
    return {
        "changed": run.copied,
        "copied_bytes": run.copied_bytes,
        "deleted": len(gone),
        "files": len(manifest.files),
        "bytes": manifest.bytes,
        "databases": {p: d["check"] for p, d in databases.items()},
        "wrote_manifest": not same,
        "committed": False,
        "repaired": repair,
        "epoch": manifest.epoch,
        "seq": prev.seq if same and prev else manifest.seq,
        "warnings": warnings + run.warnings,
    }
