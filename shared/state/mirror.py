"""Persist a live TABBY_ROOT to the data dir (the `/data` Volume) and hydrate it back: the data dir is a mirror.

Tabby runs on local disk; `persist()` copies its state to the data dir every few seconds while it writes:

- the database through SQLite's online backup API, checked before it is published (never a file copy);
- other files only when changed: (size, mtime) first, then their hash; each through temp file + fsync + rename;
- every Tantivy `index/**/meta.json` after the segment files it names, from a copy read before those segments;
- deletions after additions; lock files, SQLite sidecars and `models/` excluded;
- the persist manifest (`.tabby-modal/persist.json`: files, sizes, sha256, DB check, time) written last.

A pending marker (`.tabby-modal/pending.json`) is written before the first change of a pass and removed after the
manifest: readers that find it know the tree may be a mix of two passes (each file whole, the index still
consistent), as after a crash; the next persist repairs it. A pass with nothing changed only stats live files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.state import database
from shared.state.atomic import (
    SHA256_RE,
    TMP_MARK,
    HashMismatch,
    StateError,
    check_tree,
    copy_file,
    current_umask,
    ensure_dir,
    fsync_dir,
    hash_file,
    inside,
    is_tmp,
    link_escapes,
    make_link,
    read_record,
    read_small,
    write_bytes,
    write_new_bytes,
    write_private,
)
from shared.state.locks import process_alive, this_process
from shared.state.progress import Progress, silent

META_DIR = ".tabby-modal"
MANIFEST = f"{META_DIR}/persist.json"
PENDING = f"{META_DIR}/pending.json"
FORMAT = 1
# Top-level dirs never mirrored: models live in the image, META_DIR is ours.
EXCLUDED_TOP = frozenset({"models", META_DIR})
SQLITE_BASES = (".sqlite", ".sqlite3", ".db")
# A recorded mtime this close to the moment we stat'ed may be shared by a later write (coarse kernel clocks):
# such entries are "racy" and are re-hashed on the next pass, as git does for its index.
RACY_NS = 100_000_000
WORKERS = min(4, (os.cpu_count() or 1) + 1)
SMALL_FILE = 1 << 20  # hydrate reads a file below this size whole, then writes it in one go


# --- Tree entries and manifests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or symlink of a Tabby root, as manifests record it."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644
    sha256: str | None = None
    link: str | None = None
    racy: bool = False  # persist only: re-hash on the next pass

    def to_json(self) -> dict[str, Any]:
        if self.link is not None:
            return {"path": self.path, "link": self.link, "mode": self.mode}
        out: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "mode": self.mode,
            "sha256": self.sha256,
        }
        if self.racy:
            out["racy"] = True
        return out

    @classmethod
    def from_json(cls, item: object, where: str) -> Entry:
        if not isinstance(item, dict):
            raise StateError(f"{where}: entry {item!r} is not an object")
        path = item.get("path")
        mode = item.get("mode", 0o644)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise StateError(f"{where}: {path!r}: bad mode {mode!r}")
        if "link" in item:
            link = item["link"]
            if not isinstance(link, str) or not link or "\x00" in link:
                raise StateError(f"{where}: {path!r}: bad link target {link!r}")
            return cls(path=path, mode=mode, link=link)  # type: ignore[arg-type]
        size, mtime_ns, sha = item.get("size"), item.get("mtime_ns", 0), item.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StateError(f"{where}: {path!r}: bad size {size!r}")
        if not isinstance(mtime_ns, int) or isinstance(mtime_ns, bool):
            raise StateError(f"{where}: {path!r}: bad mtime_ns {mtime_ns!r}")
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise StateError(f"{where}: {path!r}: bad sha256 {sha!r}")
        return cls(path, size, mtime_ns, mode, sha, racy=item.get("racy") is True)  # type: ignore[arg-type]


def parse_entries(items: object, where: str) -> dict[str, Entry]:
    """Validate a manifest's `files`: types, safe relative paths, no duplicates, no link leaving the root."""
    if not isinstance(items, list):
        raise StateError(f"{where}: 'files' is not a list")
    entries = [Entry.from_json(i, where) for i in items]
    try:
        check_tree([e.path for e in entries], {e.path: e.link for e in entries if e.link is not None})
    except StateError as err:
        raise StateError(f"{where}: {err}") from None
    return {e.path: e for e in entries}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_json(raw: bytes, where: str) -> dict[str, Any]:
    """Strict JSON object (duplicate keys refused), or StateError naming `where`."""
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise StateError(f"{where}: malformed JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise StateError(f"{where}: malformed JSON (not an object)")
    return doc


def dump_json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=None, separators=(",", ":"), sort_keys=True) + "\n").encode()


@dataclass
class PersistManifest:
    """The last complete persist: what the data dir holds, as of `time_unix`."""

    files: dict[str, Entry]
    databases: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {check, sig, racy}
    time_unix: float = 0.0
    seq: int = 0
    epoch: str = ""
    origin: str = "persist"

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "tabby-modal/persist",
            "time": iso(self.time_unix),
            "time_unix": self.time_unix,
            "seq": self.seq,
            "epoch": self.epoch,
            "origin": self.origin,
            "bytes": self.bytes,
            "databases": [{"path": p, **d} for p, d in sorted(self.databases.items())],
            "files": [e.to_json() for _, e in sorted(self.files.items())],
        }


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# Parsed manifests by path, keyed on (size, mtime, inode): a persist pass with nothing changed reads no file.
_CACHE: dict[str, tuple[tuple[int, int, int], PersistManifest]] = {}


def load_manifest(data_dir: Path) -> PersistManifest | None:
    """The persist manifest of `data_dir`, validated; None when there is none. StateError when malformed."""
    path = Path(data_dir) / MANIFEST
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == key:
        m = hit[1]
        return replace(m, files=dict(m.files), databases=dict(m.databases))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    m = _parse_manifest(raw)
    _CACHE[str(path)] = (key, m)
    return replace(m, files=dict(m.files), databases=dict(m.databases))


def _parse_manifest(raw: bytes) -> PersistManifest:
    where = f"persist manifest {MANIFEST}"
    doc = load_json(raw, where)
    if doc.get("format") != FORMAT or doc.get("kind") != "tabby-modal/persist":
        raise StateError(f"{where}: unknown format {doc.get('format')!r}/{doc.get('kind')!r}")
    files = parse_entries(doc.get("files"), where)
    dbs: dict[str, dict[str, Any]] = {}
    for d in doc.get("databases") or []:
        if not isinstance(d, dict) or d.get("path") not in files:
            raise StateError(f"{where}: database entry {d!r} names no listed file")
        dbs[d["path"]] = {k: v for k, v in d.items() if k != "path"}
    t = doc.get("time_unix")
    return PersistManifest(
        files=files,
        databases=dbs,
        time_unix=float(t) if isinstance(t, int | float) else 0.0,
        seq=int(doc.get("seq") or 0),
        epoch=str(doc.get("epoch") or ""),
        origin=str(doc.get("origin") or "persist"),
    )


def write_manifest(data_dir: Path, manifest: PersistManifest) -> None:
    path = Path(data_dir) / MANIFEST
    write_bytes(path, dump_json(manifest.to_json()))
    st = path.stat()
    kept = replace(manifest, files=dict(manifest.files), databases=dict(manifest.databases))
    _CACHE[str(path)] = ((st.st_size, st.st_mtime_ns, st.st_ino), kept)


def pending_info(data_dir: Path) -> dict[str, Any] | None:
    """The pending marker of an unfinished (running or crashed) persist, restore or reset; None if none."""
    return read_record(Path(data_dir) / PENDING)


def pending_alive(info: dict[str, Any] | None) -> bool:
    """Is the run that wrote this pending marker still running on this host?"""
    return bool(info) and process_alive(info) is True  # type: ignore[arg-type]


def write_pending(data_dir: Path, op: str) -> None:
    write_bytes(Path(data_dir) / PENDING, json.dumps({**this_process(), "op": op}).encode())


def clear_pending(data_dir: Path) -> None:
    path = Path(data_dir) / PENDING
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


# --- Walking a root -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    size: int
    mtime_ns: int
    mode: int
    link: str | None = None


def excluded(relpath: str) -> bool:
    """Never mirrored or snapshotted: lock files, SQLite sidecars, models/, our own metadata and temp files.

    `*.lock` inside `repositories/` is kept (git work trees hold Cargo.lock, yarn.lock...) except under `.git/`.
    """
    parts = relpath.split("/")
    name = parts[-1]
    if parts[0] in EXCLUDED_TOP or is_tmp(name):
        return True
    if name.endswith(database.SIDECAR_SUFFIXES) and name.rsplit("-", 1)[0].endswith(SQLITE_BASES):
        return True
    if name.endswith(".lock"):
        return parts[0] != "repositories" or ".git" in parts
    return False


def scan(root: Path, *, tmp_files: list[str] | None = None) -> dict[str, Node]:
    """Every file and symlink under `root` that is mirrored (see `excluded`), by relative posix path.

    Symlinks are recorded, never followed. Temp files found are appended to `tmp_files` when given.
    """
    root = Path(root)
    out: dict[str, Node] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(root / rel if rel else root)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for de in it:
                path = f"{rel}/{de.name}" if rel else de.name
                if excluded(path):
                    if tmp_files is not None and is_tmp(de.name):
                        tmp_files.append(path)
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        out[path] = Node(0, st.st_mtime_ns, 0o777, os.readlink(de.path))
                    except FileNotFoundError:
                        continue
                elif stat.S_ISREG(st.st_mode):
                    out[path] = Node(st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def escaping_links(nodes: dict[str, Node]) -> set[str]:
    links = {p: n.link for p, n in nodes.items() if n.link is not None}
    return {p for p in links if link_escapes(links, p)}


def clear_way(root: Path, relpath: str) -> None:
    """Make room for a file at `root/relpath`: drop a file or link where a parent dir must go, a dir where it must go."""
    parts = relpath.split("/")
    p = Path(root)
    for part in parts[:-1]:
        p = p / part
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
    target = p / parts[-1]
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)


def remove(root: Path, relpath: str, *, tree: bool = False) -> int:
    """Delete the file or link `root/relpath` if it is still there; returns bytes freed.

    A directory found there is new content that replaced the file (kept), unless `tree` (stray temp dirs).
    """
    path = Path(root) / relpath
    try:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            path.unlink()
            return st.st_size
        if tree:
            shutil.rmtree(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return 0


def prune_empty_dirs(root: Path, relpaths: Iterable[str]) -> None:
    """Remove directories left empty by deletions, deepest first, never `root` itself."""
    dirs: set[str] = set()
    for p in relpaths:
        d = posixpath.dirname(p)
        while d:
            dirs.add(d)
            d = posixpath.dirname(d)
    for d in sorted(dirs, key=lambda s: s.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            (Path(root) / d).rmdir()


# --- Tantivy ---------------------------------------------------------------------------------------------------


def is_index_meta(path: str) -> bool:
    return path == "index/meta.json" or (path.startswith("index/") and path.endswith("/meta.json"))


def meta_requires(path: str, content: bytes) -> list[tuple[str, str | None]] | None:
    """For a Tantivy meta.json: (file prefix of each segment, its `.del` file or None); None if not Tantivy's."""
    try:
        doc = json.loads(content)
        segments = doc["segments"]
        out = []
        base = posixpath.dirname(path)
        for seg in segments:
            sid = str(seg["segment_id"]).replace("-", "")
            prefix = posixpath.join(base, sid + ".")
            deletes = seg.get("deletes")
            dele = posixpath.join(base, f"{sid}.{deletes['opstamp']}.del") if deletes else None
            out.append((prefix, dele))
        return out
    except (ValueError, KeyError, TypeError):
        return None


def meta_missing(path: str, content: bytes, present: Iterable[str]) -> list[str]:
    """Segments named by this meta.json with no file among `present` (empty when all are there)."""
    needs = meta_requires(path, content)
    if not needs:
        return []
    present = set(present)
    base = posixpath.dirname(path)
    prefixes = {
        p[: p.index(".", len(base) + 1) + 1]
        for p in present
        if posixpath.dirname(p) == base and "." in posixpath.basename(p)
    }
    missing = []
    for prefix, dele in needs:
        if prefix not in prefixes:
            missing.append(prefix + "*")
        elif dele is not None and dele not in present:
            missing.append(dele)
    return missing


# --- persist ---------------------------------------------------------------------------------------------------


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
            self.pending = True

    def copy(self, path: str) -> Entry | None:
        """Copy one live file (or link) if its content changed; None if it vanished."""
        src, dst = self.live / path, self.data / path
        old = self.old.get(path)
        size, sha, st = 0, "", None
        for _ in range(3):
            t0 = time.time_ns()
            try:
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(src)
                    if old is None or old.link != target or self.repair:
                        self.begin()
                        clear_way(self.data, path)
                        make_link(dst, target)
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
                            os.chmod(dst, mode)
                            os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
                        return replace(old, mtime_ns=st.st_mtime_ns, mode=mode, racy=racy)
                self.begin()
                clear_way(self.data, path)
                size, sha = copy_file(src, dst, mode=mode, mtime_ns=st.st_mtime_ns)
                after = src.lstat()
            except FileNotFoundError:
                return None
            self.copied += 1
            self.copied_bytes += size
            if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and size == st.st_size:
                return Entry(path, size, st.st_mtime_ns, mode, sha, racy=racy)
        # Still being written: keep this copy, and make sure the next pass looks again.
        assert st is not None
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
        clear_way(self.data, path)
        res = database.backup(src, self.data / path, skip_if_sha256=old.sha256 if old else None)
        if res["unchanged"] and old is not None:
            self.new[path] = old
        else:
            st = (self.data / path).stat()
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
                clear_way(self.data, path)
                write_bytes(self.data / path, content, mode=stat.S_IMODE(st.st_mode))
                os.utime(self.data / path, ns=(st.st_mtime_ns, st.st_mtime_ns))
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


def persist(
    live_root: Path,
    data_dir: Path,
    *,
    commit: Callable[[], None] | None = None,
    progress: Progress | None = None,
    epoch: str | None = None,
) -> dict[str, Any]:
    """Mirror `live_root` into `data_dir` consistently; call `commit()` once the pass is complete.

    Safe to run every few seconds while Tabby writes; only one persist may run per data dir. `epoch` (from
    `hydrate()`) makes persist refuse when the data dir was restored or reset since: the live root is then stale.
    A database copy that fails its check raises DbCheckError and nothing of it is published.
    Returns {changed, copied_bytes, deleted, files, bytes, databases, seconds, wrote_manifest, committed, ...}.
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
    warnings: list[str] = []
    try:
        prev = load_manifest(data_dir)
    except StateError as err:
        prev = None
        warnings.append(f"unreadable persist manifest ignored ({err})")
    if epoch is not None and prev is not None and prev.epoch != epoch:
        raise StateError(
            "data dir was restored or reset after this live root was hydrated: hydrate again before persisting"
        )
    repair = prev is None or pending_info(data_dir) is not None
    nodes = scan(live_root)
    run = _Persist(live_root, data_dir, prev, repair)
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
    prog.set_totals(len(todo), sum(nodes[p].size for p in todo))
    with ThreadPoolExecutor(WORKERS) as pool:
        for path, entry in zip(todo, pool.map(run.copy, todo), strict=True):
            if entry is not None:
                run.new[path] = entry
            prog.add(1, nodes[path].size)
    databases = {p: run.database(p) for p in dbs}
    for p, item in metas.items():
        if item is None:
            run.new[p] = run.old[p]
        else:
            run.meta(p, *item)

    # Deletions come after every addition, so the index never names a segment that is gone.
    tmp_files: list[str] = []
    existing = set(scan(data_dir, tmp_files=tmp_files)) if repair else set(prev.files if prev else ())
    gone = sorted(existing - set(run.new))
    if gone or tmp_files:
        run.begin()
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
    committed = False
    if commit is not None:
        commit()
        committed = True
    return {
        "changed": run.copied,
        "copied_bytes": run.copied_bytes,
        "deleted": len(gone),
        "files": len(manifest.files),
        "bytes": manifest.bytes,
        "databases": {p: d["check"] for p, d in databases.items()},
        "wrote_manifest": not same,
        "committed": committed,
        "repaired": repair,
        "epoch": manifest.epoch,
        "warnings": warnings + run.warnings,
        "seconds": round(time.monotonic() - started, 4),
    }


# --- hydrate ---------------------------------------------------------------------------------------------------


def _staging_for(live_root: Path) -> Path:
    # Beside the live root (same filesystem, so the final move is a rename), unless the root is a mount point.
    base = live_root if os.path.ismount(live_root) else live_root.parent
    return base / f".{live_root.name}{TMP_MARK}hydrate-{secrets.token_hex(4)}"


def hydrate(data_dir: Path, live_root: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Lay the last persisted state down at `live_root`, checked against the persist manifest.

    Everything is copied into a staging dir and checked (hashes, links, the database's quick_check) before
    `live_root` is touched; any failure raises StateError and leaves `live_root` as it was. An empty data dir is a
    fresh instance (`fresh: True`). With a pending marker (an interrupted persist) the data dir is taken as it
    stands: every file in it is whole, and the database is checked. Files in `live_root` that the state does not
    have are removed, and so are stale SQLite sidecars; `models/` and lock files are left alone.
    """
    data_dir, live_root = Path(data_dir), Path(live_root)
    started = time.monotonic()
    manifest = load_manifest(data_dir) if data_dir.is_dir() else None
    pending = pending_info(data_dir) if data_dir.is_dir() else None
    if manifest is not None and pending is None:
        entries = manifest.files
        checked = "manifest"
    else:
        nodes = scan(data_dir) if data_dir.is_dir() else {}
        known = manifest.files if manifest else {}
        entries = {}
        for p, n in nodes.items():
            k = known.get(p)
            sha = k.sha256 if k and k.link is None and (k.size, k.mtime_ns) == (n.size, n.mtime_ns) else None
            entries[p] = Entry(p, n.size, n.mtime_ns, n.mode, sha, link=n.link)
        try:
            check_tree(entries, {p: e.link for p, e in entries.items() if e.link is not None})
        except StateError as err:
            raise StateError(f"hydrate refused: data dir: {err}") from None
        checked = "tree"
    epoch = manifest.epoch if manifest else None
    if not entries:
        live_root.mkdir(parents=True, exist_ok=True)
        return {"fresh": True, "files": 0, "bytes": 0, "checked": checked, "epoch": epoch, "databases": {}}

    prog = progress or silent()
    prog.set_totals(len(entries), sum(e.size for e in entries.values()))
    staging = _staging_for(live_root)
    staging.mkdir(parents=True)
    umask = current_umask()
    try:

        def lay(e: Entry) -> None:
            dst = staging / e.path
            if e.link is not None:
                ensure_dir(dst.parent, durable=False)
                os.symlink(e.link, dst)
                return
            src = data_dir / e.path
            try:
                if checked == "tree" and e.path in database.DB_PATHS:
                    # A plain root may hold a WAL database: copy it the consistent way.
                    database.backup(src, dst, private_copy=True, check="none", durable=False)
                elif e.size < SMALL_FILE and (data := read_small(src, e.size)) is not None:
                    # One read, the hash from memory, one write: most of a Tabby root is small index files.
                    if e.sha256 is not None and _sha(data) != e.sha256:
                        raise HashMismatch(e.path)
                    write_new_bytes(dst, data, mode=e.mode, mtime_ns=e.mtime_ns, umask=umask)
                else:
                    with open(src, "rb", buffering=0) as f:
                        write_private(dst, f, expect_sha256=e.sha256, mode=e.mode, mtime_ns=e.mtime_ns)
            except HashMismatch:
                raise StateError(
                    f"hydrate refused: {e.path} does not match the persist manifest; live root untouched"
                ) from None
            except FileNotFoundError:
                raise StateError(
                    f"hydrate refused: {e.path} is in the persist manifest but missing; live root untouched"
                ) from None
            prog.add(1, e.size)

        for d in sorted({posixpath.dirname(p) for p in entries} - {""}):
            (staging / d).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lay, entries.values()))
        for p, e in entries.items():
            if e.link is not None and not inside(staging, staging / p):
                raise StateError(f"hydrate refused: link {p} leaves the root; live root untouched")
        checks = {}
        for p in database.DB_PATHS:
            if p in entries and entries[p].link is None:
                checks[p] = database.check_file(staging / p, "quick")
                if checks[p] != "ok":
                    raise StateError(
                        f"hydrate refused: {p} fails quick_check ({checks[p]}); live root untouched"
                    )
        _swap_in(staging, live_root, entries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prog.finish()
    return {
        "fresh": False,
        "files": len(entries),
        "bytes": sum(e.size for e in entries.values()),
        "checked": checked,
        "epoch": epoch,
        "databases": checks,
        "seconds": round(time.monotonic() - started, 4),
    }


def _swap_in(staging: Path, live_root: Path, entries: dict[str, Entry]) -> None:
    if live_root.is_dir() and not os.path.ismount(live_root) and not any(live_root.iterdir()):
        live_root.rmdir()
    if not live_root.exists():
        live_root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, live_root)
        return
    for p in database.DB_PATHS:
        for side in database.sidecars(live_root / p):
            side.unlink(missing_ok=True)
    existing = scan(live_root)
    for p in entries:
        clear_way(live_root, p)
        (live_root / p).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / p, live_root / p)
    gone = [p for p in existing if p not in entries]
    for p in gone:
        remove(live_root, p)
    prune_empty_dirs(live_root, gone)


def rebuild_manifest(
    data_dir: Path,
    *,
    origin: str,
    known: dict[str, Entry] | None = None,
    checks: dict[str, str] | None = None,
) -> PersistManifest:
    """Write a fresh persist manifest describing `data_dir` as it is now (after a restore or reset).

    Hashes are taken from `known` or the old manifest where a file's (size, mtime) still match, else computed.
    A new epoch tells a running persister that its live root no longer matches. Clears the pending marker.
    """
    data_dir = Path(data_dir)
    try:
        prev = load_manifest(data_dir)
    except StateError:
        prev = None
    pool = {**(prev.files if prev else {}), **(known or {})}
    files: dict[str, Entry] = {}
    for p, n in scan(data_dir).items():
        if n.link is not None:
            files[p] = Entry(p, mode=0o777, link=n.link)
            continue
        k = pool.get(p)
        if k is not None and k.link is None and (k.size, k.mtime_ns) == (n.size, n.mtime_ns):
            files[p] = replace(k, mode=n.mode, racy=False)
        else:
            size, sha = hash_file(data_dir / p)
            files[p] = Entry(p, size, n.mtime_ns, n.mode, sha)
    dbs = {
        p: {"check": (checks or {}).get(p, "unchecked"), "sig": None, "racy": False}
        for p in database.DB_PATHS
        if p in files
    }
    manifest = PersistManifest(
        files=files,
        databases=dbs,
        time_unix=time.time(),
        seq=(prev.seq + 1) if prev else 1,
        epoch=secrets.token_hex(8),
        origin=origin,
    )
    write_manifest(data_dir, manifest)
    clear_pending(data_dir)
    return manifest
