"""The data dir (the `/data` Volume) as a mirror of a live TABBY_ROOT: `persist()` copies Tabby's state to it while
Tabby writes, `hydrate()` lays it back down at start; the persist manifest says what the data dir holds.

Tabby runs on local disk. Persist copies the database through SQLite's backup API, other files only when changed,
each Tantivy `meta.json` after the segments it names, deletions after additions, and the manifest last; a pending
marker (`.tabby-modal/pending.json`) tells readers a pass is mid-way. Hydrate checks everything in a staging dir
before the live root is touched.

The modules: `scan` (walking a root, what is mirrored), `manifest` (entries, the persist manifest, the pending
marker), `packed` (files under 1 MiB live in packs in the data dir), `tantivy` (what a meta.json names), `persist`,
`hydrate`, `rebuild` (a data dir described anew after a restore or reset), `journal` (the live root's scan kept
current by inotify: `LiveTree`, which persist's `live_tree=` takes). This face is what the rest of `shared` uses.
"""

from __future__ import annotations

from shared.state.mirror.hydrate import hydrate
from shared.state.mirror.journal import LiveTree
from shared.state.mirror.manifest import (
    BLOCKING_OPS,
    MANIFEST,
    PENDING,
    WRITER_LOCK,
    DataDirReplaced,
    Entry,
    InterruptedChange,
    PersistManifest,
    describe_change,
    dump_json,
    finish_commands,
    iso,
    load_json,
    load_manifest,
    next_step,
    parse_entries,
    pending_alive,
    pending_info,
    refuse_unfinished,
    unfinished_change,
    write_pending,
    writing,
)
from shared.state.mirror.persist import PersistDeadline, persist
from shared.state.mirror.rebuild import rebuild_manifest
from shared.state.mirror.scan import (
    META_DIR,
    WORKERS,
    clear_way,
    escaping_links,
    excluded,
    prune_empty_dirs,
    remove,
    scan,
)
from shared.state.mirror.tantivy import is_index_meta, meta_missing

__all__ = [
    "BLOCKING_OPS",
    "MANIFEST",
    "META_DIR",
    "PENDING",
    "WORKERS",
    "WRITER_LOCK",
    "DataDirReplaced",
    "Entry",
    "InterruptedChange",
    "LiveTree",
    "PersistDeadline",
    "PersistManifest",
    "clear_way",
    "describe_change",
    "dump_json",
    "escaping_links",
    "excluded",
    "finish_commands",
    "hydrate",
    "is_index_meta",
    "iso",
    "load_json",
    "load_manifest",
    "meta_missing",
    "next_step",
    "parse_entries",
    "pending_alive",
    "pending_info",
    "persist",
    "prune_empty_dirs",
    "rebuild_manifest",
    "refuse_unfinished",
    "remove",
    "scan",
    "unfinished_change",
    "write_pending",
    "writing",
]
