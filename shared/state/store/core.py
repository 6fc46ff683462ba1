"""The store's read side, shared by every operation: snapshot ids and manifests, where each blob is (`Catalog`),
listing, stats and streaming a snapshot's files; plus the lock and progress hooks the writing operations use.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from shared.state import mirror
from shared.state.atomic import SHA256_RE, is_tmp
from shared.state.errors import HashMismatch, StateError
from shared.state.mirror import Entry
from shared.state.progress import Progress, silent
from shared.state.store import quarantine
from shared.state.store.backend import Backend, snapshot_name

FORMAT = 1
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{4})(?:-([A-Za-z0-9._-]{1,40}))?$")


class UnknownSnapshot(StateError):
    """No snapshot with that id."""


LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,38}[A-Za-z0-9_])?")
LABEL_RULE = "1 to 40 of the characters A-Z a-z 0-9 . _ - (not starting or ending with . or -)"


def check_label(label: str) -> str:
    """A label people give (`snapshot --label`, `import --label`) goes into the snapshot id as it is, or is refused:
    `new_id` would otherwise turn "üni" into "ni" without a word."""
    if not LABEL.fullmatch(label):
        raise StateError(f"label {label!r}: use {LABEL_RULE}")
    return label


def new_id(label: str, when: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40] or "manual"
    return f"{stamp}-{secrets.token_hex(2)}-{clean}"


@dataclass
class Snapshot:
    """A validated snapshot manifest."""

    id: str
    label: str
    time_unix: float
    consistency: str
    files: dict[str, Entry]
    databases: dict[str, str]  # path -> check result at snapshot time
    doc: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "time": mirror.iso(self.time_unix),
            "consistency": self.consistency,
            "files": len(self.files),
            "bytes": self.bytes,
        }


@dataclass
class Catalog:
    """Where each stored blob lives, as the store's listing says right now."""

    loose: dict[str, str]  # sha256 -> object name under blobs/
    packed: dict[str, tuple[str, int, int]]  # sha256 -> (pack name, offset, length)
    packs: dict[str, list[tuple[str, int, int]]]  # readable pack name -> its index
    bad_packs: dict[str, str]  # pack name -> why its index is unreadable
    # sha256 -> objects holding a copy found corrupt (skipped above; see store.quarantine)
    quarantined: dict[str, list[str]] = field(default_factory=dict)

    def has(self, sha256: str | None, *, loose: bool = False) -> bool:
        return sha256 in self.loose or (not loose and sha256 in self.packed)


class _Verifying:
    """A read-only stream over a blob that raises HashMismatch at its end if the bytes are not what was promised."""

    def __init__(self, raw: BinaryIO, entry: Entry) -> None:
        self._raw, self._entry = raw, entry
        self._h = hashlib.sha256()
        self._n = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or self._n + n > self._entry.size:
            n = self._entry.size - self._n  # never past the recorded size, so the check below always runs
        data = self._raw.read(n) if n > 0 else b""
        self._h.update(data)
        self._n += len(data)
        if (self._n >= self._entry.size or not data) and not self._checked:
            self._checked = True
            if self._h.hexdigest() != self._entry.sha256 or self._n != self._entry.size:
                raise HashMismatch(f"{self._entry.path}: stored blob is corrupt")
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()


# --- The store -----------------------------------------------------------------------------------------------


class StoreCore:
    """Snapshots of data dirs in a Backend, read side. `lock(op)` is the store lock the writing operations hold
    (reads do not need it); `progress(label)` reports their progress."""

    def __init__(
        self,
        backend: Backend,
        *,
        lock: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
        progress: Callable[[str], Progress] | None = None,
    ) -> None:
        self.backend = backend
        self._pack_cache: dict[str, list[tuple[str, int, int]]] = {}  # packs never change once named
        self.lock = lock or (lambda op: contextlib.nullcontext())
        self.progress = progress or (lambda label: silent())

    def catalog(self) -> Catalog:
        """Every blob the store holds and where: loose blobs by listing, packed ones from each pack's index."""
        loose = {}
        for name in self.backend.list("blobs/"):
            base = name.rsplit("/", 1)[-1]
            if not is_tmp(name) and SHA256_RE.match(base):
                loose[base] = name
        packed: dict[str, tuple[str, int, int]] = {}
        packs: dict[str, list[tuple[str, int, int]]] = {}
        bad: dict[str, str] = {}
        # A copy found corrupt is never read nor counted for dedup: the next snapshot stores the blob again.
        skip = {(r["sha256"], r["object"]) for r in quarantine.load(self.backend)}
        for name in sorted(self.backend.list("packs/")):
            if is_tmp(name):
                continue
            index = self._pack_cache.get(name)
            if index is None:
                try:
                    index = self.backend.pack_index(name)
                except (StateError, OSError) as err:
                    bad[name] = str(err)
                    continue
                self._pack_cache[name] = index
            packs[name] = index
            for sha, off, n in index:
                if (sha, name) not in skip:
                    packed.setdefault(sha, (name, off, n))
        held: dict[str, list[str]] = {}
        for sha, obj in sorted(skip):
            if obj in packs or (obj.startswith(quarantine.ASIDE) and self.backend.exists(obj)):
                held.setdefault(sha, []).append(obj)
        return Catalog(loose, packed, packs, bad, held)

    def forget_pack_indexes(self) -> None:
        """Read every pack index again on the next `catalog()` (verify checks their checksums)."""
        self._pack_cache.clear()

    def read_blob(self, cat: Catalog, sha256: str | None) -> BinaryIO:
        sha = sha256 or ""
        if sha in cat.loose:
            return self.backend.read(cat.loose[sha])
        if sha in cat.packed:
            name, off, n = cat.packed[sha]
            return self.backend.read_range(name, off, n)
        raise FileNotFoundError(f"missing blob {sha[:12]}")

    def blob_size(self, cat: Catalog, sha256: str | None) -> int:
        """Stored size of a blob, -1 when it is missing."""
        sha = sha256 or ""
        try:
            if sha in cat.loose:
                return self.backend.size(cat.loose[sha])
        except OSError:
            return -1
        return cat.packed[sha][2] if sha in cat.packed else -1

    def locate(self, sha256: str) -> tuple[str, int, int]:
        """Where a blob's bytes are: (object name, offset, length); FileNotFoundError if the store lacks it."""
        cat = self.catalog()
        if sha256 in cat.loose:
            return cat.loose[sha256], 0, self.backend.size(cat.loose[sha256])
        if sha256 in cat.packed:
            return cat.packed[sha256]
        raise FileNotFoundError(f"missing blob {sha256[:12]}")

    def open_blob(self, sha256: str) -> BinaryIO:
        """Read a stored blob by its sha256, wherever it lives (the caller closes it; bytes are not checked)."""
        return self.read_blob(self.catalog(), sha256)

    def ids(self) -> list[str]:
        """Snapshot ids in time order (oldest first), as their manifest names say; unreadable ones included."""
        out = []
        for name in self.backend.list("snapshots/"):
            base = name.rsplit("/", 1)[-1]
            if base.endswith(".json") and ID_RE.match(base[:-5]):
                out.append(base[:-5])
        return sorted(out)

    def resolve(self, snapshot_id: str) -> str:
        """A full id from an id or `latest`; UnknownSnapshot when there is no such snapshot."""
        if snapshot_id == "latest":
            snaps = self.snapshots()
            if not snaps:
                raise UnknownSnapshot("no snapshots yet")
            return snaps[-1].id
        if not isinstance(snapshot_id, str) or not ID_RE.match(snapshot_id):
            raise UnknownSnapshot(f"unknown snapshot {snapshot_id!r} (see `tabby-modal snapshots`)")
        if not self.backend.exists(snapshot_name(snapshot_id)):
            raise UnknownSnapshot(f"unknown snapshot {snapshot_id!r} (see `tabby-modal snapshots`)")
        return snapshot_id

    def resolve_noting(self, snapshot_id: str) -> tuple[str, list[dict[str, str]]]:
        """`resolve`, and for `latest` the newer snapshots it passed over because their manifest does not load
        ([{id, problem}]): a caller names them instead of silently taking an older one."""
        sid = self.resolve(snapshot_id)
        if snapshot_id != "latest":
            return sid, []
        skipped = []
        for other in self.ids():
            if other[:16] < sid[:16] or other == sid:  # ids start with their UTC time stamp
                continue
            try:
                self.load(other)
            except (StateError, OSError) as err:
                skipped.append({"id": other, "problem": str(err)})
        return sid, skipped

    def load(self, snapshot_id: str) -> Snapshot:
        """The validated manifest of a snapshot; StateError (one line) when it is malformed or unsafe."""
        sid = self.resolve(snapshot_id)
        where = f"snapshot {sid}"
        with self.backend.read(snapshot_name(sid)) as f:
            doc = mirror.load_json(f.read(), where)
        if doc.get("format") != FORMAT or doc.get("kind") != "tabby-modal/snapshot":
            raise StateError(f"{where}: unknown manifest format")
        if doc.get("id") != sid:
            raise StateError(f"{where}: manifest names another id {doc.get('id')!r}")
        files = mirror.parse_entries(doc.get("files"), where)
        dbs = {}
        for d in doc.get("databases") or []:
            if not isinstance(d, dict) or d.get("path") not in files:
                raise StateError(f"{where}: database entry {d!r} names no listed file")
            dbs[d["path"]] = str(d.get("check"))
        t = doc.get("time_unix")
        return Snapshot(
            id=sid,
            label=str(doc.get("label") or ""),
            time_unix=float(t) if isinstance(t, int | float) else 0.0,
            consistency=str(doc.get("consistency") or "?"),
            files=files,
            databases=dbs,
            doc=doc,
        )

    def manifest(self, snapshot_id: str) -> dict[str, Any]:
        """The raw manifest JSON of a snapshot, after validation (for export)."""
        return self.load(snapshot_id).doc

    def snapshots(self) -> list[Snapshot]:
        """Readable snapshots, oldest first (by manifest time, then id). Unreadable ones are left to `verify`."""
        out = []
        for sid in self.ids():
            with contextlib.suppress(StateError, OSError):
                out.append(self.load(sid))
        return sorted(out, key=lambda s: (s.time_unix, s.id))

    def list(self) -> list[dict[str, Any]]:
        """Summaries, oldest first; a manifest that does not load is listed with its `problem`."""
        good = {s.id: s.summary() for s in self.snapshots()}
        bad = []
        for sid in self.ids():
            if sid not in good:
                try:
                    self.load(sid)
                except (StateError, OSError) as err:
                    bad.append({"id": sid, "problem": str(err)})
        return [*good.values(), *bad]

    def stats(self) -> dict[str, Any]:
        """Number of snapshots, and blobs with their total bytes (the store's real size: blobs are shared)."""
        cat = self.catalog()
        total = 0
        for n in [*cat.loose.values(), *cat.packs, *cat.bad_packs]:
            with contextlib.suppress(OSError):
                total += self.backend.size(n)
        ids = self.ids()
        return {
            "count": len(ids),
            "blobs": len(cat.loose.keys() | cat.packed.keys()),
            "packs": len(cat.packs) + len(cat.bad_packs),
            "bytes": total,
            "newest": ids[-1] if ids else None,
        }

    def iter_files(
        self, snapshot_id: str, paths: list[str] | None = None
    ) -> Iterator[tuple[Entry, IO[bytes] | None]]:
        """Stream a snapshot's files in path order: (entry, reader) with `reader` None for symlinks.

        The reader must be consumed before the next item; it raises HashMismatch at its end if the stored bytes
        do not hash to `entry.sha256`. Entry gives path, size, mode, mtime_ns, sha256 and link (see mirror.Entry).
        Example (an exporter): for e, f in store.iter_files(sid): tar.addfile(info_for(e), f).
        `paths` (some of the snapshot's, in the order wanted) streams only those.
        """
        snap = self.load(snapshot_id)
        cat = self.catalog()
        for path in sorted(snap.files) if paths is None else paths:
            entry = snap.files[path]
            if entry.link is not None:
                yield entry, None
                continue
            reader = _Verifying(self.read_blob(cat, entry.sha256), entry)
            try:
                yield entry, reader  # type: ignore[misc]
            finally:
                reader.close()
