"""Which Tabby runs, and which Tabby wrote a database: the upgrade record and what a schema version says.

`tabby-modal upgrade` records every deploy it makes in the backups store's `tabby-versions.json` (next to
`snapshots/` and the blobs, which the store leaves alone): {current: ENTRY, history: [ENTRY ...]} with ENTRY =
{image, version, schema_version, migrations, time, outcome}. `inspect` and `status` read it; a database (live or in
a snapshot) is attributed to a Tabby version by its `_sqlx_migrations` version: the newest recorded deploy with
that schema, else the releases we know, else by a `pre-upgrade-<old>-to-<new>` snapshot label.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

RECORD = "tabby-versions.json"
HISTORY_KEPT = 50
# Schema versions (highest `_sqlx_migrations` version) of Tabby releases we checked: 0.32.0 has 49 rows, version 50.
KNOWN_SCHEMAS = {50: "0.32.0"}
_PRE_UPGRADE = re.compile(r"pre-upgrade-(?P<old>[^-]+(?:-[^-]+)*?)-to-(?P<new>.+)$")


def tag_of(image: str) -> str:
    """`tabbyml/tabby:0.32.0` -> `0.32.0` (a digest-pinned image keeps its digest)."""
    if "@" in image:
        return image.split("@", 1)[1]
    return image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else image


def read(backups_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((Path(backups_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {"current": None, "history": []}
    if not isinstance(doc, dict):
        return {"current": None, "history": []}
    return {"current": doc.get("current"), "history": list(doc.get("history") or [])}


def render(doc: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """`doc` with `entry` as the current deploy, appended to the history."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
    history = [*doc.get("history", []), entry][-HISTORY_KEPT:]
    return {"current": entry, "history": history}


def record(backups_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Write `entry` as the current deploy (atomic replace); returns the new document."""
    backups_dir = Path(backups_dir)
    backups_dir.mkdir(parents=True, exist_ok=True)
    doc = render(read(backups_dir), entry)
    tmp = backups_dir / f".{RECORD}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, backups_dir / RECORD)
    return doc


def written_by(
    doc: dict[str, Any], schema_version: int | None, label: str | None = None
) -> dict[str, Any] | None:
    """Which Tabby wrote a database of `schema_version`: {version, basis}, or None when nothing says."""
    if label and (m := _PRE_UPGRADE.search(label)):
        return {"version": m.group("old"), "basis": f"snapshot label {label!r}"}
    if schema_version is None:
        return None
    for entry in reversed(doc.get("history") or []):
        if entry.get("schema_version") == schema_version and entry.get("outcome", "ok") == "ok":
            return {"version": entry.get("version"), "basis": f"upgrade record (schema {schema_version})"}
    if schema_version in KNOWN_SCHEMAS:
        return {
            "version": KNOWN_SCHEMAS[schema_version],
            "basis": f"schema {schema_version} is Tabby {KNOWN_SCHEMAS[schema_version]}'s",
        }
    return None


def annotate(result: dict[str, Any], backups_dir: Path) -> dict[str, Any]:
    """Add `tabby` {recorded, written_by} to an inspect result (of /data or of a snapshot)."""
    doc = read(backups_dir)
    schema = (result.get("db") or {}).get("schema_version")
    label = None
    if result.get("source") == "snapshot":
        label = str(result.get("snapshot") or "").split("-", 2)[-1]
    return {**result, "tabby": {"recorded": doc["current"], "written_by": written_by(doc, schema, label)}}
