"""The quarantine: stored copies of blobs found corrupt, which no operation may reuse.

`quarantine.json` at the store's root lists {sha256, object, why, found} records. `object` is either a pack (its copy
of that blob is skipped by `Catalog`, so dedup stores the blob again from live data) or `quarantine/<sha256>-<id>`,
where a corrupt loose blob was moved aside (out of `blobs/`, so the next snapshot writes it again under its name).
`verify` and `restore` add to it when a re-hash fails and take a copy off it when it re-hashes right again;
`repair` rewrites the packs without their quarantined blobs and deletes the moved-aside files.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared.state.atomic import SHA256_RE
from shared.state.store.backend import Backend

NAME = "quarantine.json"
ASIDE = "quarantine/"  # where corrupt loose blobs are moved to


def load(backend: Backend) -> list[dict[str, Any]]:
    """The records; an unreadable file counts as empty (the next verify finds the bad blobs again)."""
    if not backend.exists(NAME):
        return []
    try:
        with backend.read(NAME) as f:
            doc = json.loads(f.read())
        items = doc["blobs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [
        r
        for r in items
        if isinstance(r, dict) and SHA256_RE.match(str(r.get("sha256"))) and isinstance(r.get("object"), str)
    ]


def save(backend: Backend, records: list[dict[str, Any]]) -> None:
    """Write the records (only when they changed: a verify that finds nothing new writes nothing)."""
    records = sorted(records, key=lambda r: (r["sha256"], r["object"]))
    if records == sorted(load(backend), key=lambda r: (r["sha256"], r["object"])):
        return
    if not records:
        backend.delete(NAME)
        return
    doc = {"format": 1, "kind": "tabby-modal/quarantine", "blobs": records}
    backend.write_atomic(NAME, json.dumps(doc, indent=1, sort_keys=True).encode())


def record(sha256: str, obj: str, why: str) -> dict[str, Any]:
    return {
        "sha256": sha256,
        "object": obj,
        "why": why,
        "found": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def update(backend: Backend, add: list[dict[str, Any]], drop: set[tuple[str, str]]) -> None:
    """Add records and drop (sha256, object) pairs, in one read-modify-write."""
    if not add and not drop:
        return
    current = load(backend)
    have = {(r["sha256"], r["object"]) for r in current}
    kept = [r for r in current if (r["sha256"], r["object"]) not in drop]
    kept += [r for r in add if (r["sha256"], r["object"]) not in have]
    save(backend, kept)
