"""Describe a data dir anew, after a restore or a reset changed it under the manifest: its plain files by a scan
(hashes reused where size and mtime match), its packed files as given (or as the old manifest had them); then the
stale plain copies and the packs the new manifest does not name go, and the pending marker last.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from pathlib import Path

from shared.state import database, fault_points
from shared.state.atomic import hash_file
from shared.state.errors import StateError
from shared.state.mirror.manifest import (
    Entry,
    PersistManifest,
    clear_pending,
    load_manifest,
    write_manifest,
)
from shared.state.mirror.packed import pack_file, pack_files, tree_view
from shared.state.mirror.scan import prune_empty_dirs, remove, scan
from shared.state.paths import check_tree


def rebuild_manifest(
    data_dir: Path,
    *,
    origin: str,
    known: dict[str, Entry] | None = None,
    checks: dict[str, str] | None = None,
    packed: dict[str, Entry] | None = None,
) -> PersistManifest:
    """Write a fresh persist manifest describing `data_dir` as it is now (after a restore or reset).

    Plain files come from a scan: hashes are taken from `known` or the old manifest where a file's (size, mtime)
    still match, else computed. `packed` are the packed entries the data dir holds (kept as they are; their packs
    must be in place), by default those of the old manifest (`tree_view`): a plain file left at one of their
    paths is older than the manifest that packed it and is removed after the new manifest, and so are the packs
    it no longer names. A new epoch tells a running persister that its live root no longer matches. Clears the
    pending marker.
    """
    data_dir = Path(data_dir)
    try:
        prev = load_manifest(data_dir)
    except StateError:
        prev = None
    pool = {**(prev.files if prev else {}), **(known or {})}
    if packed is None:
        packed = {p: e for p, e in tree_view(data_dir, prev).items() if e.pack is not None}
    files: dict[str, Entry] = {}
    stale: list[str] = []
    for p, n in scan(data_dir).items():
        if p in packed:
            stale.append(p)
            continue
        if n.link is not None:
            files[p] = Entry(p, mode=0o777, link=n.link)
            continue
        k = pool.get(p)
        if (
            k is not None
            and k.link is None
            and k.pack is None
            and (k.size, k.mtime_ns) == (n.size, n.mtime_ns)
        ):
            files[p] = replace(k, mode=n.mode, racy=False)
        else:
            size, sha = hash_file(data_dir / p)
            files[p] = Entry(p, size, n.mtime_ns, n.mode, sha)
    files.update({p: replace(e, racy=False) if e.racy else e for p, e in packed.items()})
    try:
        check_tree(list(files), {p: e.link for p, e in files.items() if e.link is not None})
    except StateError as err:
        raise StateError(f"{data_dir}: cannot describe the data dir: {err}") from None
    try:
        packs = {
            i: pack_file(data_dir, i).stat().st_size for i in {e.pack for e in packed.values() if e.pack}
        }
    except FileNotFoundError as err:
        raise StateError(f"{data_dir}: a pack the new manifest names is missing ({err.filename})") from None
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
        packs=packs,
    )
    write_manifest(data_dir, manifest)
    fault_points.reached(origin)  # the new state is whole and described; stale copies and the marker are left
    for p in stale:
        remove(data_dir, p)
    prune_empty_dirs(data_dir, stale)
    for pack_id, f in pack_files(data_dir).items():
        if pack_id not in packs:
            f.unlink(missing_ok=True)  # no manifest names it any more (the state before, or a run that died)
    clear_pending(data_dir)
    return manifest
