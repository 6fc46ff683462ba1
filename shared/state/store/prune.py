"""Prune: forget snapshots outside the retention rules, then delete what no kept snapshot names.

Loose blobs no kept snapshot names are deleted, packs none of whose blobs is named are deleted, and a pack is rewritten
(repacked) when at least REPACK_GARBAGE of its bytes are unnamed; below that, the unnamed blobs stay until more of the
pack is garbage (rewriting live data on every prune would cost more than the space it frees).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from typing import Any

from shared.state.atomic import is_tmp
from shared.state.errors import StateError
from shared.state.store.backend import snapshot_name
from shared.state.store.core import Catalog, Snapshot, StoreCore

REPACK_GARBAGE = 0.25  # prune rewrites a pack when this fraction of its bytes is named by no kept snapshot


SAFETY_LABELS = (
    "pre-restore",
    "pre-reset",
    "pre-upgrade",
)  # taken by restore, reset and upgrade, not by a user
KEEP_SAFETY = 3  # the default of the `keep_safety` setting


def is_safety(snap: Snapshot) -> bool:
    """A snapshot a tool took to protect a data dir before changing it (restore, reset, upgrade)."""
    return snap.label.startswith(SAFETY_LABELS)


def plan(
    snaps: list[Snapshot],
    keep_last: int,
    keep_daily: int,
    keep_weekly: int,
    keep_safety: int = KEEP_SAFETY,
    pinned: frozenset[str] = frozenset(),
) -> set[str]:
    """Ids to keep: the newest always; of the snapshots users and the schedule take, the last N and the newest of
    each of the last N days and ISO weeks; of the safety snapshots (`is_safety`), the newest `keep_safety`, on a
    count of their own, so a few restores in one day never push out labelled or scheduled snapshots; `pinned`."""
    newest_first = sorted(snaps, key=lambda s: (s.time_unix, s.id), reverse=True)
    regular = [s for s in newest_first if not is_safety(s)]
    keep = {s.id for s in newest_first[:1]} | {s.id for s in regular[: max(1, keep_last)]}
    keep |= {s.id for s in [s for s in newest_first if is_safety(s)][:keep_safety]}
    keep |= {s.id for s in snaps if s.id in pinned}
    for count, key in (
        (keep_daily, lambda d: d.date()),
        (keep_weekly, lambda d: d.isocalendar()[:2]),
    ):
        seen: set[Any] = set()
        for s in regular:
            k = key(dt.datetime.fromtimestamp(s.time_unix, dt.UTC))
            if k not in seen and len(seen) < count:
                seen.add(k)
                keep.add(s.id)
    return keep


def prune(
    store: StoreCore,
    keep_last: int,
    keep_daily: int,
    keep_weekly: int,
    *,
    dry_run: bool = False,
    keep_safety: int = KEEP_SAFETY,
    pinned: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Forget snapshots outside the retention rules (see `plan`), then delete blobs no snapshot names (and stray
    temp files).

    With `dry_run` nothing is written (not even the lock). Blob deletion is skipped while any manifest is
    unreadable, since its blobs cannot be known.
    """
    for name, n in (
        ("keep-last", keep_last),
        ("keep-daily", keep_daily),
        ("keep-weekly", keep_weekly),
        ("keep-safety", keep_safety),
    ):
        if n < 0:
            raise StateError(f"--{name} must be 0 or more, got {n}")
    started = time.monotonic()
    ctx = contextlib.nullcontext() if dry_run else store.lock("prune")
    with ctx:
        snaps = store.snapshots()
        unreadable = [sid for sid in store.ids() if sid not in {s.id for s in snaps}]
        keep = plan(snaps, keep_last, keep_daily, keep_weekly, keep_safety, pinned) if snaps else set()
        drop = [s for s in snaps if s.id not in keep]
        referenced = {e.sha256 for s in snaps if s.id in keep for e in s.files.values() if e.link is None}
        garbage: list[str] = []  # loose blobs and packs to delete
        repack: list[str] = []  # packs to rewrite without their garbage
        temp: list[str] = []
        blobs_removed = freed = 0
        cat = store.catalog()
        if not unreadable:
            for name in store.backend.list("blobs/"):
                if is_tmp(name):
                    temp.append(name)
                elif name.rsplit("/", 1)[-1] not in referenced:
                    garbage.append(name)
                    blobs_removed += 1
                    with contextlib.suppress(OSError):
                        freed += store.backend.size(name)
            for name in store.backend.list("packs/"):
                if is_tmp(name):
                    temp.append(name)
                if name not in cat.packs:
                    continue  # a temp, or unreadable: its blobs cannot be known (verify reports them)
                index = cat.packs[name]
                dead = [n for sha, _, n in index if sha not in referenced]
                total = sum(n for _, _, n in index)
                if len(dead) == len(index):
                    garbage.append(name)
                elif dead and sum(dead) >= REPACK_GARBAGE * total:
                    repack.append(name)
                else:
                    continue
                blobs_removed += len(dead)
                freed += sum(dead)
        temp += [n for n in store.backend.list("snapshots/") if is_tmp(n)]
        if not dry_run:
            for s in drop:
                store.backend.delete(snapshot_name(s.id))
            if repack:
                repack = _repack(store, cat, repack, referenced)
            for name in [*garbage, *repack, *temp]:
                store.backend.delete(name)
    return {
        "dry_run": dry_run,
        "kept": sorted(keep),
        "removed": sorted(s.id for s in drop),
        "blobs_removed": blobs_removed,
        "bytes_freed": freed,
        "packs_removed": sum(n.startswith("packs/") for n in garbage),
        "packs_repacked": len(repack),
        "temp_removed": len(temp),
        "unreadable": unreadable,
        "blob_gc": not unreadable,
        "seconds": round(time.monotonic() - started, 4),
    }


def _repack(store: StoreCore, cat: Catalog, packs: list[str], referenced: set[str | None]) -> list[str]:
    """Copy the still-named blobs of `packs` into new packs, durable before the old ones may be deleted; returns
    the packs rewritten.

    Each blob is re-hashed on the way: a pack holding one that does not match its name is left as it is (verify
    reports it; deleting the pack could lose the other blobs' only copy). A crash before the old packs are gone
    leaves blobs in two packs, which is harmless: the first listed is read, and prune deletes the other later."""
    done = []
    with store.backend.batch():
        for name in packs:
            keep = []
            for sha, off, n in cat.packs[name]:
                if sha not in referenced or cat.packed.get(sha, (name,))[0] != name:
                    continue  # garbage, or the copy read is in another pack
                with store.backend.read_range(name, off, n) as f:
                    data = f.read()
                if hashlib.sha256(data).hexdigest() != sha:
                    break
                keep.append((sha, data))
            else:
                for sha, data in keep:
                    store.backend.write_small(sha, data)
                done.append(name)
    return done
