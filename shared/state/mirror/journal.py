"""A change journal on a live Tabby root (issue 19, docs/scale-design.md 3.4): `LiveTree.nodes()` returns what
`scan(root)` would return, but after the first call it only rescans the directories inotify says were touched, so
a pass with nothing changed costs microseconds instead of a 2 s scan of a 200,000-file root.

One inotify watch per mirrored directory (never under the excluded `models/` and `.tabby-modal/`), through ctypes
(no dependency). A missed event would be silent data loss, so the journal falls back to a full scan (and rebuilds
every watch) on its first call, on a queue overflow, when a watch cannot be added (the `max_user_watches` limit),
when the root itself is moved or deleted, after any error inside a call, and every `full_scan_every` seconds
regardless. Where inotify is missing (not Linux, or `inotify_init1` fails) every call is a full scan: correct, just
slower.

What inotify does not report, and how it is covered: a write through a hard link in another directory (files with
more than one link are re-stat'ed on every call, and a new hard link found by a rescan sends the call to a full scan
to find the file's other names); a hard link made from outside the watched tree (`models/`, elsewhere) to a file
that had one link, then written through, or a hard link made, written through and removed again between two calls
(no event in our directories, or none left to see: caught by the periodic full scan); a write
through a shared `mmap` (no event at all: the periodic full scan; the databases are checked by persist through
their own signature).
Directory mtimes are never used to skip files: an in-place write does not change its directory's mtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import heapq
import os
import posixpath
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from shared.state.mirror.scan import Node, excluded, node_of, scan

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

# What makes a directory's entries worth a rescan; ONLYDIR and DONT_FOLLOW: a path that became a file or a symlink
# (scan never follows one) is refused instead of watched.
WATCH_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_EVENT = struct.Struct(
    "iIII"
)  # struct inotify_event: wd, mask, cookie, len; then `len` bytes of NUL-padded name
_READ_SIZE = 1 << 16


class WatchLimit(OSError):
    """A watch could not be added (ENOSPC: `fs.inotify.max_user_watches`; ENOMEM)."""


class Inotify:
    """One inotify instance (non-blocking, close-on-exec) through libc."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify is Linux only")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = (ctypes.c_int, ctypes.c_int)
        self._rm.restype = ctypes.c_int
        init = libc.inotify_init1
        init.argtypes = (ctypes.c_int,)
        init.restype = ctypes.c_int
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int | None = fd

    def add_watch(self, path: Path, mask: int = WATCH_MASK) -> int:
        assert self.fd is not None
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            cls = WatchLimit if err in (errno.ENOSPC, errno.ENOMEM) else OSError
            raise cls(err, os.strerror(err), str(path))
        return wd

    def rm_watch(self, wd: int) -> None:
        assert self.fd is not None
        self._rm(self.fd, wd)  # EINVAL: the kernel already dropped it (its directory is gone): fine

    def read(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); [] when none."""
        assert self.fd is not None
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return out
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, off)
                off += _EVENT.size
                name = os.fsdecode(buf[off : off + size].rstrip(b"\0")) if size else ""
                off += size
                out.append((wd, mask, name))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops every watch
            self.fd = None


def _open_inotify() -> Inotify:
    """The inotify instance of a LiveTree (a module function, so a test can make it fail)."""
    return Inotify()


@dataclass(slots=True)
class _Dir:
    """A watched directory: its watch, its inode (a directory replaced under the same name is a new one), the
    mirrored files and links directly in it, and its subdirectories (relative paths)."""

    wd: int | None
    ino: tuple[int, int]
    files: set[str] = field(default_factory=set)
    subdirs: set[str] = field(default_factory=set)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _parent(rel: str) -> str:
    return posixpath.dirname(rel)


class LiveTree:
    """`scan(root)` kept up to date by inotify; see the module docstring. Satisfies persist's `LiveTree`.

    `nodes()` returns (nodes, changed). The map is owned by the tree and edited in place by later calls: callers
    must not mutate it, nor keep it across calls. `changed` is False only when no event and no re-stat showed
    anything under the root since the previous call (the first call, and every full scan, say True).
    After each call, `last_changes` holds the paths added, changed or removed by it (None after a full scan:
    anything may have), and `stats` what it did. Thread-safe; `close()` (or the context manager) drops the watches.
    """

    def __init__(
        self,
        root: Path,
        *,
        full_scan_every: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.full_scan_every = full_scan_every
        self.clock = clock
        self.last_changes: set[str] | None = None
        self.stats: dict[str, Any] = {
            "full_scans": 0,
            # Why the last full scan: first, periodic, overflow, watch-limit, root, hard-link, race, error,
            # no-inotify, always.
            "last_full_scan": None,
            "full_scans_by": {},  # reason -> count
            "rescanned_dirs": 0,
            "watches": 0,
        }
        self._lock = threading.Lock()
        self._ino: Inotify | None = None
        self._nodes: dict[str, Node] = {}
        self._dirs: dict[str, _Dir] = {}
        self._wds: dict[int, str] = {}
        # Files with more than one hard link: a write through another name is reported elsewhere, if at all.
        self._linked: set[str] = set()
        self._rebuilding = False
        self._full_due: str | None = "first"  # why the next call must be a full scan, or None
        self._last_full = 0.0
        self._closed = False

    # --- the public face ------------------------------------------------------------------------------------
    def nodes(self) -> tuple[dict[str, Node], bool]:
        with self._lock:
            if self._closed:
                raise ValueError("LiveTree is closed")
            try:
                return self._nodes_locked()
            except BaseException:
                self._full_due = "error"  # the bookkeeping may be half-updated: start over next time
                raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._ino is not None:
                self._ino.close()
                self._ino = None
            self._dirs, self._wds, self._nodes = {}, {}, {}

    def __enter__(self) -> LiveTree:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- one call -------------------------------------------------------------------------------------------
    def _nodes_locked(self) -> tuple[dict[str, Node], bool]:
        if self.full_scan_every <= 0:
            return self._plain_scan("always")
        if self._full_due is None and self.clock() - self._last_full >= self.full_scan_every:
            self._full_due = "periodic"
        dirty: set[str] = set()
        if self._full_due is None and self._ino is not None:
            dirty = self._drain()
        if self._full_due is not None or self._ino is None:
            return self._rebuild(self._full_due or "no-inotify")
        self._check_linked(dirty)
        if not dirty:
            self.last_changes = set()
            return self._nodes, False
        # Something was touched: True even if the rescan finds the same nodes (a rewrite within the same mtime
        # tick looks the same; persist's racy re-check needs the pass).
        changes: set[str] = set()
        self._apply(dirty, changes)
        if self._full_due is not None:  # a watch could not be added meanwhile, or the root went
            return self._rebuild(self._full_due)
        self.last_changes = changes
        return self._nodes, True

    def _plain_scan(self, why: str) -> tuple[dict[str, Node], bool]:
        self._nodes = scan(self.root)
        self._note_full(why)
        return self._nodes, True

    def _note_full(self, why: str) -> None:
        self.last_changes = None
        self.stats["full_scans"] += 1
        self.stats["last_full_scan"] = why
        self.stats["full_scans_by"][why] = self.stats["full_scans_by"].get(why, 0) + 1
        self.stats["watches"] = len(self._wds)
        self._last_full = self.clock()

    def _rebuild(self, why: str) -> tuple[dict[str, Node], bool]:
        """Drop every watch, open a fresh instance, and watch + scan the whole tree (watch first: a change made
        while we list a directory is then either listed or queued)."""
        if self._ino is not None:
            self._ino.close()
            self._ino = None
        self._dirs, self._wds, self._nodes, self._linked = {}, {}, {}, set()
        self._full_due = None
        try:
            self._ino = _open_inotify()
        except OSError:
            # And again next call: without events nothing can be trusted.
            return self._plain_scan("no-inotify")
        try:
            st = os.stat(self.root)  # a symlinked root is followed, as scan() does
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            self._rebuilding = True
            try:
                self._adopt("", (st.st_dev, st.st_ino), set())
            finally:
                self._rebuilding = False
        if "" not in self._dirs:
            self._full_due = "root"  # scan() of a missing root is empty: so is ours; look again next time
        self._note_full(why)
        return self._nodes, True

    # --- events ---------------------------------------------------------------------------------------------
    def _drain(self) -> set[str]:
        """Read every queued event; the directories whose entries must be looked at again."""
        assert self._ino is not None
        dirty: set[str] = set()
        for wd, mask, name in self._ino.read():
            if mask & IN_Q_OVERFLOW:
                self._full_due = "overflow"
                continue
            rel = self._wds.get(wd)
            if rel is None:
                continue  # a watch we dropped (its directory was forgotten, then rescanned whole if it came back)
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                if rel == "":
                    self._full_due = "root"
                    continue
                if mask & IN_IGNORED:
                    # The kernel dropped this watch (its directory is gone): never rm_watch its wd again.
                    self._dirs[rel].wd = None
                    del self._wds[wd]
                dirty.add(_parent(rel))
                dirty.add(rel)
                continue
            if not name:
                continue
            if not excluded(_join(rel, name)):
                dirty.add(rel)
            elif (
                mask & (IN_CREATE | IN_MOVED_TO) and not mask & IN_ISDIR and self._linked_elsewhere(rel, name)
            ):
                # An excluded name (never listed) for a mirrored file: writes through it are reported only here.
                self._full_due = "hard-link"
        return dirty

    def _linked_elsewhere(self, rel: str, name: str) -> bool:
        try:
            st = os.lstat(self.root / rel / name)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_nlink > 1

    def _check_linked(self, dirty: set[str]) -> None:
        """A file with several hard links changes without an event in our directory when written through another:
        re-stat those (few) on every call."""
        for path in self._linked:
            d = _parent(path)
            if d in dirty:
                continue
            try:
                st = os.lstat(self.root / path)
            except OSError:
                dirty.add(d)
                continue
            n = self._nodes.get(path)
            now = (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
            if n is None or (n.size, n.mtime_ns, n.mode) != now:
                dirty.add(d)

    def _apply(self, dirty: set[str], changes: set[str]) -> None:
        """Rescan the direct entries of each dirty directory, parents first (a parent may forget or re-adopt a
        child: that child's own rescan is then moot)."""
        heap = [(d.count("/") if d else -1, d) for d in dirty]
        heapq.heapify(heap)
        done: set[str] = set()
        while heap:
            _, rel = heapq.heappop(heap)
            if rel in done or rel not in self._dirs:
                continue
            done.add(rel)
            if not self._rescan(rel, changes, done):
                if rel == "":
                    self._full_due = "root"
                    return
                parent = _parent(rel)
                done.discard(parent)
                heapq.heappush(heap, (parent.count("/") if parent else -1, parent))
            self.stats["rescanned_dirs"] += 1
        self.stats["watches"] = len(self._wds)

    # --- directories ----------------------------------------------------------------------------------------
    def _list(self, rel: str) -> tuple[dict[str, Node], dict[str, tuple[int, int]]] | None:
        """The mirrored files and links directly in `rel`, and its subdirectories with their inodes, exactly as
        `scan()` sees them (same `excluded` rule, same Node); None if `rel` is no longer a directory."""
        files: dict[str, Node] = {}
        subdirs: dict[str, tuple[int, int]] = {}
        try:
            it = os.scandir(self.root / rel if rel else self.root)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with it:
            for de in it:
                path = _join(rel, de.name)
                if excluded(path):
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs[path] = (st.st_dev, st.st_ino)
                elif (node := node_of(de, st)) is not None:
                    files[path] = node
                    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        if path not in self._linked and not self._rebuilding:
                            # A new hard link: its other names may sit in directories without an event for a
                            # write through this one, and we do not know where: find them all once.
                            self._full_due = "hard-link"
                        self._linked.add(path)
                    else:
                        self._linked.discard(path)
        return files, subdirs

    def _rescan(self, rel: str, changes: set[str], done: set[str]) -> bool:
        """Bring `rel`'s direct entries up to date; False if `rel` is no longer the directory we watch."""
        d = self._dirs[rel]
        try:
            st = os.lstat(self.root / rel) if rel else os.stat(self.root)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != d.ino:
            self._forget(rel, changes)
            return False
        listed = self._list(rel)
        if listed is None:
            self._forget(rel, changes)
            return False
        files, subdirs = listed
        for path in d.files - files.keys():
            self._nodes.pop(path, None)
            self._linked.discard(path)
            changes.add(path)
        for path, node in files.items():
            if self._nodes.get(path) != node:
                self._nodes[path] = node
                changes.add(path)
        d.files = set(files)
        for sub in list(d.subdirs):
            known = self._dirs.get(sub)
            if sub not in subdirs or known is None or known.ino != subdirs[sub] or known.wd is None:
                self._forget(sub, changes)  # gone, another directory under that name, or unwatched: (re)adopt
        for sub, ino in subdirs.items():
            if sub not in self._dirs:
                self._adopt(sub, ino, changes)
                done.add(sub)
        d.subdirs = set(subdirs) & self._dirs.keys()
        return True

    def _adopt(self, top: str, ino: tuple[int, int], changes: set[str]) -> None:
        """Watch `top` and everything below it, then list each directory once its watch is in place (a directory
        created and filled before its watch is thus listed; its events may then repeat what we list: harmless)."""
        assert self._ino is not None
        stack = [(top, ino)]
        while stack:
            rel, want = stack.pop()
            path = self.root / rel if rel else self.root
            try:
                wd, want = self._watch(path, want)
            except WatchLimit:
                self._full_due = "watch-limit"  # listed all the same: this call's answer stays complete
                wd = None
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone (or no longer a directory) already: its parent's events say so
            stale = self._wds.get(wd) if wd is not None else None
            if stale is not None and stale != rel:
                # The same directory, moved here before its old place was rescanned: forget the old place, but
                # keep the watch (inotify hands back the one it has per inode).
                self._forget(stale, changes, keep_wd=wd)
            if wd is not None:
                self._wds[wd] = rel
            d = _Dir(wd, want)
            self._dirs[rel] = d
            parent = self._dirs.get(_parent(rel)) if rel else None
            if parent is not None:
                parent.subdirs.add(rel)
            listed = self._list(rel)
            if listed is None:
                continue
            files, subdirs = listed
            d.files = set(files)
            for path, node in files.items():
                self._nodes[path] = node
                changes.add(path)
            d.subdirs = set(subdirs)
            stack.extend(subdirs.items())

    def _watch(self, path: Path, ino: tuple[int, int]) -> tuple[int | None, tuple[int, int]]:
        """Add a watch on the directory `path` whose inode we listed as `ino`; None (and a rebuild next call) if
        it keeps being replaced under us. The inode is checked after the watch is added: had the directory been
        swapped in between, the watch would sit on the wrong one. Returns the watch and the inode watched."""
        assert self._ino is not None
        root = path == self.root  # followed if a symlink, as scan() does; nothing below it is
        for _ in range(3):
            wd = self._ino.add_watch(path, WATCH_MASK & ~IN_DONT_FOLLOW if root else WATCH_MASK)
            st = os.stat(path) if root else os.lstat(path)
            if (st.st_dev, st.st_ino) == ino:
                return wd, ino
            if wd not in self._wds:
                self._ino.rm_watch(wd)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "replaced by a file", str(path))
            # Replaced by another directory: its parent's events will tell; watch that one.
            ino = (st.st_dev, st.st_ino)
        self._full_due = "race"
        return None, ino

    def _forget(self, top: str, changes: set[str], *, keep_wd: int | None = None) -> None:
        """Drop `top` and everything below it: their nodes, their watches, their bookkeeping."""
        assert self._ino is not None
        stack = [top]
        while stack:
            rel = stack.pop()
            d = self._dirs.pop(rel, None)
            if d is None:
                continue
            for path in d.files:
                if self._nodes.pop(path, None) is not None:
                    changes.add(path)
                self._linked.discard(path)
            if d.wd is not None and self._wds.get(d.wd) == rel:
                del self._wds[d.wd]
                if d.wd != keep_wd:
                    self._ino.rm_watch(d.wd)
            stack.extend(d.subdirs)
        parent = self._dirs.get(_parent(top)) if top else None
        if parent is not None:
            parent.subdirs.discard(top)
