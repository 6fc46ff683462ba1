"""Repair: what to do with a store after `verify` found corrupt or missing blobs (restic's `repair packs` and
`repair snapshots` in one step).

1. A full verify quarantines every corrupt copy (see `quarantine`).
2. Blobs with no intact copy left are stored again from the data dir when a file there still has the same sha256
   (the persisted copy of the live state: most corrupt blobs are of files that did not change); a packed file is
   read through the data dir's manifest, its slice checked against the sha256 recorded there.
3. Packs holding a quarantined copy are rewritten without it (every other blob re-hashed on the way), and loose
   blobs moved aside are deleted.
4. Each manifest naming a blob that is still lost is rewritten without those files; its `repaired.lost` lists them,
   so `restore` refuses it without `--partial` and names them with it. A blob that is merely absent is dropped
   only while every pack index is readable (an unreadable index may still hold it; `verify` names such packs).

With `dry_run` nothing is written (not the quarantine, not the lock) and the result says what would happen.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

from shared.state import database, mirror
from shared.state.atomic import hash_file, read_small
from shared.state.errors import HashMismatch, StateError
from shared.state.mirror import Entry
from shared.state.mirror.packed import holdings, read_entry
from shared.state.store import quarantine
from shared.state.store.backend import blob_name, snapshot_name
from shared.state.store.core import Catalog, StoreCore
from shared.state.store.snapshotting import _loose
from shared.state.store.verify import verify


def repair(store: StoreCore, data_dir: Path, *, dry_run: bool = False) -> dict[str, Any]:
    """Repair the store (see the module docstring). Returns {dry_run, problems_found, corrupt_blobs,
    stored_again: [{sha256, path}], packs_rewritten, blobs_dropped, lost: {snapshot: [path]}, missing: {snapshot:
    [path]}, bad_packs, unreadable, seconds}."""
    started = time.monotonic()
    with contextlib.nullcontext() if dry_run else store.lock("repair"):
        report = verify(store, record=not dry_run)
        cat = store.catalog()
        bad = {(c["sha256"], c["object"]) for c in report["corrupt"]}
        bad |= {(sha, o) for sha, objs in cat.quarantined.items() for o in objs}
        good = _intact(cat, bad, dry_run)
        snaps = store.snapshots()
        wanted = {e.sha256 or "": e for s in snaps for e in s.files.values() if e.link is None}
        gone = {sha for sha in wanted if sha not in good}
        found = _in_data_dir(data_dir, {sha: wanted[sha].size for sha in gone})
        stored: list[dict[str, str]] = []
        if not dry_run and found:
            with store.backend.batch():
                for sha, e in sorted(found.items()):
                    if _store_again(store, data_dir, e, sha, wanted[sha].size):
                        stored.append({"sha256": sha, "path": e.path})
        elif found:
            stored = [{"sha256": sha, "path": e.path} for sha, e in sorted(found.items())]
        lost_shas = gone - {s["sha256"] for s in stored}
        packs = sorted({o for _, o in bad if o in cat.packs})
        dropped = len({pair for pair in bad if pair[1] in cat.packs or pair[1].startswith(quarantine.ASIDE)})
        if not dry_run:
            dropped += _rewrite_packs(store, cat, packs, bad)
            for obj in sorted({o for _, o in bad if o.startswith(quarantine.ASIDE)}):
                store.backend.delete(obj)
            quarantine.update(store.backend, [], bad)
        corrupt_shas = {sha for sha, _ in bad}
        droppable = lost_shas if not cat.bad_packs else lost_shas & corrupt_shas
        lost: dict[str, list[str]] = {}
        missing: dict[str, list[str]] = {}
        for s in snaps:
            paths = sorted(p for p, e in s.files.items() if e.link is None and e.sha256 in lost_shas)
            if not paths:
                continue
            dropping = [p for p in paths if s.files[p].sha256 in droppable]
            if dropping:
                lost[s.id] = dropping
                if not dry_run:
                    _rewrite_manifest(store, s.doc, set(dropping))
            if len(dropping) < len(paths):
                missing[s.id] = [p for p in paths if p not in dropping]
    return {
        "dry_run": dry_run,
        "problems_found": len(report["problems"]),
        "corrupt_blobs": len(corrupt_shas),
        "stored_again": stored,
        "packs_rewritten": packs,
        "blobs_dropped": dropped,
        "lost": lost,
        "missing": missing,
        "bad_packs": report["bad_packs"],
        "unreadable": [
            p["snapshot"] for p in report["problems"] if p["path"] == snapshot_name(p["snapshot"])
        ],
        "seconds": round(time.monotonic() - started, 4),
    }


def _intact(cat: Catalog, bad: set[tuple[str, str]], dry_run: bool) -> set[str]:
    """Blobs with a copy not known to be corrupt. In a dry run a corrupt loose blob is still in `blobs/`."""
    aside = {sha for sha, o in bad if o.startswith(quarantine.ASIDE)} if dry_run else set()
    good = set(cat.loose) - aside
    for name, index in cat.packs.items():
        good |= {sha for sha, _, _ in index if (sha, name) not in bad}
    return good


def _in_data_dir(data_dir: Path, sizes: dict[str, int]) -> dict[str, Entry]:
    """Files of the data dir that hash to a lost blob: {sha256: entry}. Only files of a lost blob's size are read;
    packed files are found by the sha256 their manifest records (checked again when read, in `_store_again`)."""
    if not sizes or not data_dir.is_dir():
        return {}
    try:
        manifest = mirror.load_manifest(data_dir, copy=False)
    except StateError:
        manifest = None  # the plain files can still help; the packed ones are out of reach without it
    held = holdings(data_dir, manifest, mirror.pending_info(data_dir) is not None)
    want = set(sizes.values())
    out: dict[str, Entry] = {}
    for path, e in sorted(held.items()):
        if e.link is not None or e.size not in want:
            continue
        if e.pack is not None:
            if e.sha256 in sizes and e.sha256 not in out:
                out[e.sha256] = e
            continue
        with contextlib.suppress(OSError):
            _, sha = hash_file(data_dir / path)
            if sha in sizes and sha not in out:
                out[sha] = e
    return out


def _store_again(store: StoreCore, data_dir: Path, e: Entry, sha: str, size: int) -> bool:
    """Write a data-dir file as blob `sha` (checked on the way: a file changed since it was hashed is skipped)."""
    try:
        if e.pack is not None:
            data = read_entry(data_dir, e)  # checked against the manifest's sha256, which is `sha`
            if len(data) != size:
                return False
            store.backend.write_small(sha, data)
            return True
        if _loose(e.path, size):
            with open(data_dir / e.path, "rb", buffering=0) as f:
                store.backend.write_once(blob_name(sha), f, sha256=sha)
            return True
        data = read_small(data_dir / e.path, size)
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            return False
        store.backend.write_small(sha, data)
        return True
    except (HashMismatch, FileNotFoundError):
        return False


def _rewrite_packs(store: StoreCore, cat: Catalog, packs: list[str], bad: set[tuple[str, str]]) -> int:
    """Copy every intact blob of `packs` into new packs (durable first), then delete the old ones; returns how
    many more blobs were found corrupt on the way (and dropped)."""
    more = 0
    with store.backend.batch():
        for name in packs:
            for sha, off, n in cat.packs[name]:
                if (sha, name) in bad:
                    continue
                with store.backend.read_range(name, off, n) as f:
                    data = f.read()
                if hashlib.sha256(data).hexdigest() != sha:
                    more += 1
                    continue
                store.backend.write_small(sha, data)
    for name in packs:
        store.backend.delete(name)
    store.forget_pack_indexes()
    return more


def _rewrite_manifest(store: StoreCore, doc: dict[str, Any], lost: set[str]) -> None:
    """The manifest without its lost files; `repaired` says which, and when."""
    doc = dict(doc)
    doc["files"] = [f for f in doc["files"] if f.get("path") not in lost]
    doc["databases"] = [d for d in doc.get("databases") or [] if d.get("path") not in lost]
    doc["bytes"] = sum(int(f.get("size") or 0) for f in doc["files"])
    before = list((doc.get("repaired") or {}).get("lost") or [])
    doc["repaired"] = {"time": mirror.iso(time.time()), "lost": sorted({*before, *lost})}
    if any(p in database.DB_PATHS for p in lost):
        doc["repaired"]["database_lost"] = True
    try:
        store.backend.write_atomic(snapshot_name(doc["id"]), mirror.dump_json(doc))
    except OSError as err:
        raise StateError(f"repair: cannot rewrite the manifest of {doc['id']}: {err}") from None
