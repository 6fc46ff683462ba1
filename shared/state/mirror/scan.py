"""Walking a Tabby root: which files are mirrored (`excluded`), what is there (`scan`), and the small file
operations persist, hydrate and restore share (make way for a file, remove one, drop emptied dirs).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.state import database
from shared.state.atomic import is_tmp
from shared.state.cores import copy_workers
from shared.state.paths import link_escapes

META_DIR = ".tabby-modal"

# Top-level dirs never mirrored: models live in the image, META_DIR is ours.
EXCLUDED_TOP = frozenset({"models", META_DIR})
SQLITE_BASES = (".sqlite", ".sqlite3", ".db")
WORKERS = copy_workers()  # threads of the copy pools: two per core the container may use


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
                elif (node := node_of(de, st)) is not None:
                    out[path] = node
    return out


def node_of(de: os.DirEntry[str], st: os.stat_result) -> Node | None:
    """What `scan` records for a directory entry that is not a directory: a symlink (its target) or a regular
    file; None for anything else, or a link gone before it was read."""
    if stat.S_ISLNK(st.st_mode):
        try:
            return Node(0, st.st_mtime_ns, 0o777, os.readlink(de.path))
        except FileNotFoundError:
            return None
    if stat.S_ISREG(st.st_mode):
        return Node(st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return None


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
