"""Tantivy's `meta.json`: which segment files it names, so persist publishes it after them and verify can tell
when a snapshot lacks one.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable


def is_index_meta(path: str) -> bool:
    return path == "index/meta.json" or (path.startswith("index/") and path.endswith("/meta.json"))


def meta_requires(path: str, content: bytes) -> list[tuple[str, str | None]] | None:
    """For a Tantivy meta.json: (file prefix of each segment, its `.del` file or None); None if not Tantivy's."""
    try:
        doc = json.loads(content)
        segments = doc["segments"]
        out = []
        base = posixpath.dirname(path)
        for seg in segments:
            sid = str(seg["segment_id"]).replace("-", "")
            prefix = posixpath.join(base, sid + ".")
            deletes = seg.get("deletes")
            dele = posixpath.join(base, f"{sid}.{deletes['opstamp']}.del") if deletes else None
            out.append((prefix, dele))
        return out
    except (ValueError, KeyError, TypeError):
        return None


def meta_missing(path: str, content: bytes, present: Iterable[str]) -> list[str]:
    """Segments named by this meta.json with no file among `present` (empty when all are there)."""
    needs = meta_requires(path, content)
    if not needs:
        return []
    present = set(present)
    base = posixpath.dirname(path)
    prefixes = {
        p[: p.index(".", len(base) + 1) + 1]
        for p in present
        if posixpath.dirname(p) == base and "." in posixpath.basename(p)
    }
    missing = []
    for prefix, dele in needs:
        if prefix not in prefixes:
            missing.append(prefix + "*")
        elif dele is not None and dele not in present:
            missing.append(dele)
    return missing
