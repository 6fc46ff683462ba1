"""The path rules of manifests: relative, normalised paths that stay inside their root, links that do not leave it;
judged on the manifest's strings before anything is written, and on disk with `inside`."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.state.errors import StateError

MAX_LINK_HOPS = 40


def check_relpath(path: object) -> str:
    """A manifest path: relative, posix, no `.`/`..`/empty parts, no NUL. Returns it unchanged or raises StateError."""
    if not isinstance(path, str) or not path:
        raise StateError(f"bad path {path!r}: not a non-empty string")
    if path.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", path):
        raise StateError(f"bad path {path!r}: absolute")
    if "\x00" in path or "\\" in path:
        raise StateError(f"bad path {path!r}: NUL or backslash")
    parts = path.split("/")
    if ".." in parts:
        raise StateError(f"bad path {path!r}: '..' leaves the root")
    if any(p in ("", ".") for p in parts):
        raise StateError(f"bad path {path!r}: not normalised")
    return path


def resolve_inside(links: Mapping[str, str], path: str) -> str | None:
    """Where `path` lands after following the tree's own symlinks (`links`: path -> target), or None if it leaves.

    Pure string work over the manifest, so a malicious manifest is judged before anything is written.
    """
    out: list[str] = []
    todo = [p for p in path.split("/")]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        candidate = "/".join([*out, part])
        target = links.get(candidate)
        if target is None:
            out.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS or target.startswith("/"):
            return None
        todo = target.split("/") + todo
    return "/".join(out)


def link_escapes(links: Mapping[str, str], path: str) -> bool:
    """Does the symlink at `path` point outside the root (absolute, or through `..`, or via other links)?"""
    target = links[path]
    if not target or target.startswith("/"):
        return True
    return resolve_inside(links, posixpath.join(posixpath.dirname(path), target)) is None


def check_tree(paths: Iterable[str], links: Mapping[str, str]) -> None:
    """A whole manifest's paths: each safe, none twice, none under another file or link, no link leaving the root."""
    seen: set[str] = set()
    for p in paths:
        check_relpath(p)
        if p in seen:
            raise StateError(f"bad path {p!r}: listed twice")
        seen.add(p)
    for p in seen:
        parent = posixpath.dirname(p)
        while parent:
            if parent in seen:
                raise StateError(f"bad path {p!r}: its parent {parent!r} is a file or link")
            parent = posixpath.dirname(parent)
    for p in links:
        if link_escapes(links, p):
            raise StateError(f"bad link {p!r} -> {links[p]!r}: leaves the root")


def inside(root: Path, path: Path) -> bool:
    """On disk: does `path`, with every symlink resolved, stay under `root`?"""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)
