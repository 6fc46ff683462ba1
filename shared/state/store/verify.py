"""Verifying snapshots: manifests load, blobs exist with the right size and re-hash to their names, Tantivy
meta.json segments are present, and each database passes integrity_check in a restore drill.
"""

from __future__ import annotations

import math
import random
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.state import database, mirror
from shared.state.atomic import hash_stream, write_stream
from shared.state.errors import HashMismatch, StateError
from shared.state.interruption import worker_pool
from shared.state.mirror import Entry
from shared.state.store import quarantine
from shared.state.store.backend import blob_name, snapshot_name
from shared.state.store.core import Catalog, Snapshot, StoreCore


def drill(store: StoreCore, entry: Entry, cat: Catalog | None = None) -> str:
    """Restore-drill a database blob into a temp dir and run integrity_check there (`cat`: a current
    catalog, to spare a listing of the store)."""
    with tempfile.TemporaryDirectory(prefix="tabby-modal-drill-") as work:
        dst = Path(work) / "db.sqlite"
        try:
            with store.read_blob(cat or store.catalog(), entry.sha256) as f:
                write_stream(dst, f, expect_sha256=entry.sha256, durable=False)
        except HashMismatch:
            return "blob content does not match its sha256"
        except OSError as err:
            return f"cannot read blob: {err}"
        return database.check_file(dst, "full")


def verify(
    store: StoreCore, snapshot_id: str | None = None, sample: float | None = None, *, record: bool = True
) -> dict[str, Any]:
    """Check snapshots: every manifest loads, every blob exists with the right size, blobs re-hash to their
    names (all, or a random `sample` fraction), each Tantivy meta.json's segments are present, and each
    database passes integrity_check in a restore drill. Returns {ok, problems: [{snapshot, path, problem}],
    corrupt: [{sha256, object}], bad_packs: {pack: why}}.

    A copy that does not re-hash is quarantined (see store.quarantine; not with `record=False`): no snapshot
    dedups against it again. A quarantined copy is checked again when it is the only one, and set free if it
    re-hashes right (e.g. a disk that was remounted, or a byte put back by hand).
    """
    started = time.monotonic()
    if sample is not None and not 0 <= sample <= 1:
        raise StateError(f"--sample must be between 0 and 1, got {sample}")
    ids = [store.resolve(snapshot_id)] if snapshot_id is not None else store.ids()
    problems: list[dict[str, Any]] = []

    def problem(sid: str, path: str | None, what: str) -> None:
        problems.append({"snapshot": sid, "path": path, "problem": what})

    snaps: list[Snapshot] = []
    for sid in ids:
        try:
            snaps.append(store.load(sid))
        except (StateError, OSError) as err:
            problem(sid, snapshot_name(sid), str(err))
    refs: dict[str, list[tuple[str, str]]] = {}
    sizes: dict[str, int] = {}
    store.forget_pack_indexes()  # every pack index is read again, its checksum checked
    cat = store.catalog()
    add: list[dict[str, Any]] = []
    drop: set[tuple[str, str]] = set()
    corrupt: list[dict[str, str]] = []
    needed = {e.sha256 or "" for s in snaps for e in s.files.values() if e.link is None}
    still_bad = {
        sha
        for sha in sorted(needed)
        if not cat.has(sha) and sha in cat.quarantined and not _free_again(store, cat, sha, drop, record)
    }
    for sha in sorted(still_bad):
        corrupt += [{"sha256": sha, "object": o} for o in cat.quarantined[sha]]
    for snap in snaps:
        for e in snap.files.values():
            if e.link is not None:
                continue
            sha = e.sha256 or ""
            if sha in still_bad:
                problem(snap.id, e.path, f"{CORRUPT} (quarantined)")
                continue
            if sha not in sizes:
                sizes[sha] = store.blob_size(cat, sha)
            if sizes[sha] < 0:
                problem(snap.id, e.path, f"missing blob {sha[:12]}")
            elif sizes[sha] != e.size:
                problem(snap.id, e.path, f"blob {sha[:12]} has {sizes[sha]} bytes, manifest says {e.size}")
            else:
                refs.setdefault(sha, []).append((snap.id, e.path))
    chosen = sorted(refs)
    if sample is not None and sample < 1:
        k = math.ceil(len(chosen) * sample)
        chosen = sorted(random.sample(chosen, k))
    prog = store.progress("verify")
    prog.set_totals(len(chosen), sum(sizes[s] for s in chosen))

    def rehash(sha: str) -> tuple[str, str | None]:
        try:
            with store.read_blob(cat, sha) as f:
                got = hash_stream(f)[1]
        except OSError as err:
            return sha, f"cannot read blob: {err}"
        prog.add(1, sizes[sha])
        return sha, None if got == sha else CORRUPT

    bad: set[str] = set()
    with worker_pool(mirror.WORKERS) as pool:
        for sha, what in pool.map(rehash, chosen):
            if what:
                bad.add(sha)
                for sid, path in refs[sha]:
                    problem(sid, path, what)
                if what == CORRUPT:
                    corrupt.append(_quarantine(store, cat, sha, add, record))
    prog.finish()
    if record:
        quarantine.update(store.backend, add, drop)

    drilled: dict[str, str] = {}
    meta_ok: dict[tuple[str, frozenset[str]], list[str]] = {}
    for snap in snaps:
        for p in snap.databases:
            e = snap.files[p]
            sha = e.sha256 or ""
            if sha not in refs or sha in bad:
                continue
            if sha not in drilled:
                drilled[sha] = drill(store, e, cat)
            if drilled[sha] != "ok":
                problem(snap.id, p, f"restore drill: {drilled[sha]}")
        present = frozenset(snap.files)
        for p, e in snap.files.items():
            if not mirror.is_index_meta(p) or e.link is not None or e.sha256 not in refs or e.sha256 in bad:
                continue
            key = (e.sha256 or "", present)
            if key not in meta_ok:
                with store.read_blob(cat, e.sha256) as f:
                    meta_ok[key] = mirror.meta_missing(p, f.read(), present)
            for missing in meta_ok[key][:3]:
                problem(snap.id, p, f"index meta.json names a segment that is not in the snapshot: {missing}")
    # A snapshot pruned while we looked is not a problem.
    still = set(store.ids())
    problems = [pr for pr in problems if pr["snapshot"] in still]
    return {
        "ok": not problems and not cat.bad_packs,
        "snapshots": len(ids),
        "blobs": len(refs),
        "blobs_checked": len(chosen),
        "bytes_checked": sum(sizes[s] for s in chosen),
        "databases_drilled": len(drilled),
        "sample": sample,
        "problems": problems,
        "corrupt": corrupt,
        "bad_packs": dict(cat.bad_packs),
        "seconds": round(time.monotonic() - started, 4),
    }


CORRUPT = "blob content does not match its sha256 (corrupt)"


def _quarantine(
    store: StoreCore, cat: Catalog, sha: str, add: list[dict[str, Any]], record: bool
) -> dict[str, str]:
    """Quarantine the copy of `sha` that `cat` reads: a pack's copy is listed, a loose blob moved aside (out of
    `blobs/`, so the next snapshot can write the blob under its name again)."""
    if sha in cat.loose:
        obj = f"{quarantine.ASIDE}{sha}-{secrets.token_hex(4)}"
        if record:
            store.backend.set_aside(cat.loose[sha], obj)
    else:
        obj = cat.packed[sha][0]
    add.append(quarantine.record(sha, obj, CORRUPT))
    return {"sha256": sha, "object": obj}


def _free_again(store: StoreCore, cat: Catalog, sha: str, drop: set[tuple[str, str]], record: bool) -> bool:
    """Re-hash the quarantined copies of `sha` (it has no other): the first that is right again is set free and
    put in `cat`. False when none is."""
    for obj in cat.quarantined[sha]:
        where = next(((off, n) for s, off, n in cat.packs.get(obj, []) if s == sha), None)
        try:
            with store.backend.read_range(obj, *where) if where else store.backend.read(obj) as f:
                got = hash_stream(f)[1]
        except OSError:
            continue
        if got != sha:
            continue
        drop.add((sha, obj))
        if where:
            cat.packed[sha] = (obj, *where)
        elif record:
            store.backend.set_aside(obj, blob_name(sha))
            cat.loose[sha] = blob_name(sha)
        else:
            cat.loose[sha] = obj
        return True
    return False
