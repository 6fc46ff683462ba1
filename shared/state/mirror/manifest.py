"""The persist manifest (`.tabby-modal/persist.json`: what the data dir holds) and its entries, the pending marker
of an unfinished pass, and strict JSON; `rebuild_manifest` describes a data dir anew after a restore or reset.

Format 2 (this release writes it) packs small files: an entry with a `pack` lives at `offset` in
`.tabby-modal/packs/<pack>.pack` (see `packed`), any other one is a plain file at its path; its `files` are rows,
not objects (a 200,000-file root's manifest is parsed on every start). Format 1 (every earlier release) has only
plain files, and is read as such: the first persist of this release packs its small files.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.state.atomic import SHA256_RE, fsync_dir, write_bytes
from shared.state.errors import StateError
from shared.state.locks import writer_lock
from shared.state.locks.holder import process_alive, this_process
from shared.state.mirror.scan import (
    META_DIR,
)
from shared.state.paths import check_tree
from shared.state.records import read_record

MANIFEST = f"{META_DIR}/persist.json"
PENDING = f"{META_DIR}/pending.json"
WRITER_LOCK = f"{META_DIR}/writer.lock"
FORMAT = 2
FORMATS = (1, 2)  # read; FORMAT is written
PACK_ID_RE = re.compile(r"^[0-9a-f]{16}$")


class DataDirReplaced(StateError):
    """The data dir is no longer the one a live root was hydrated from (or last persisted into): a restore, a reset
    or another writer changed it. Persisting that live root would overwrite their data."""


# A restore or reset interrupted mid-way leaves a data dir that is neither the old state nor the new one: their
# pending marker blocks hydrate, persist and snapshot until a restore (or the same reset) finishes the job. An
# interrupted persist's marker does not: every file is whole and the next persist repairs the tree.
BLOCKING_OPS = ("restore", "reset")


class InterruptedChange(DataDirReplaced):
    """The data dir holds an unfinished restore or reset (`info` is its pending marker): serving, persisting or
    snapshotting it would treat a mix of two states as one. The message names the command that finishes it."""

    def __init__(self, data_dir: Path, info: dict[str, Any], action: str, flag: str = "") -> None:
        self.data_dir, self.info, self.action = Path(data_dir), info, action
        super().__init__(
            f"refused: {action}: {data_dir} holds {describe_change(info)}: {next_step(info, flag)}"
        )

    def spelled(self, flag: str) -> InterruptedChange:
        """The same refusal naming commands with `flag` (` --local DIR`)."""
        return InterruptedChange(self.data_dir, self.info, self.action, flag)


def unfinished_change(data_dir: Path) -> dict[str, Any] | None:
    """The pending marker of a restore or reset that has not finished (running now, or interrupted); else None."""
    info = pending_info(data_dir)
    return info if info is not None and info.get("op") in BLOCKING_OPS else None


def refuse_unfinished(data_dir: Path, action: str) -> None:
    """Raise InterruptedChange when the data dir holds an unfinished restore or reset."""
    info = unfinished_change(data_dir)
    if info is not None:
        raise InterruptedChange(data_dir, info, action)


def describe_change(info: dict[str, Any]) -> str:
    """`an interrupted restore of ID (started T, pid P; safety snapshot S)`; `a restore ... in progress` if alive."""
    op = info.get("op") or "change"
    what = f"{op} of {info['target']}" if info.get("target") else f"{op} --scope {info.get('scope') or '?'}"
    if op == "restore" and not info.get("target"):
        what = "restore (of a snapshot it did not record)"
    bits = []
    if isinstance(info.get("time"), int | float):
        bits.append(f"started {iso(info['time'])}")
    if info.get("pid"):
        bits.append(f"pid {info['pid']}")
    if info.get("safety"):
        bits.append(f"safety snapshot {info['safety']}")
    tail = f" ({', '.join(bits)})" if bits else ""
    if pending_alive(info):
        return f"a {what} in progress{tail}"
    return f"an interrupted {what}{tail}, a mix of the old and new state"


def finish_commands(info: dict[str, Any], flag: str = "") -> tuple[str, str | None]:
    """(the command that finishes an unfinished restore or reset, the one that goes back to before it or None)."""
    if info.get("op") == "restore" and info.get("target"):
        finish = f"tabby-modal restore {info['target']}{flag}"
    elif info.get("op") == "reset" and info.get("scope"):
        finish = f"tabby-modal reset --scope {info['scope']}{flag}"
    else:
        finish = f"tabby-modal restore ID{flag}"  # an old marker without its target: any snapshot
    return finish, (f"tabby-modal restore {info['safety']}{flag}" if info.get("safety") else None)


def next_step(info: dict[str, Any], flag: str = "") -> str:
    """What to do about an unfinished restore or reset, with the exact commands."""
    if pending_alive(info):
        return f"wait for it to end (pid {info.get('pid')}), then look again"
    finish, back = finish_commands(info, flag)
    if "restore ID" in finish:
        finish += f"` with a snapshot from `tabby-modal snapshots{flag}"
    if back:
        return f"run `{finish}` to finish it, or `{back}` to go back to the state before it"
    return f"run `{finish}` to finish it"


def writing(data_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the data dir's writer lock (`shared.state.locks.writer_lock`): persist, restore and reset write it one
    at a time on this machine."""
    return writer_lock.holding(Path(data_dir) / WRITER_LOCK)


# --- Tree entries and manifests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or symlink of a Tabby root, as manifests record it."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644
    sha256: str | None = None
    link: str | None = None
    racy: bool = False  # persist only: re-hash on the next pass
    pack: str | None = None  # persist only: the data dir pack holding it (None: a plain file at its path)
    offset: int = 0  # where in that pack

    def stored(self) -> Entry:
        """This entry as the snapshot store records it: no racy flag, no pack (where the mirror keeps the bytes is
        the mirror's business). Built directly: `dataclasses.replace` cost half of a repeat snapshot's 0.1 s."""
        if not self.racy and self.pack is None:
            return self
        return Entry(self.path, self.size, self.mtime_ns, self.mode, self.sha256, self.link)

    def to_row(self) -> list[Any]:
        """The format-2 manifest row: [path, size, mtime_ns, mode, sha256, pack, offset, racy] or [path, link]."""
        if self.link is not None:
            return [self.path, self.link]
        return [
            self.path,
            self.size,
            self.mtime_ns,
            self.mode,
            self.sha256,
            self.pack,
            self.offset,
            int(self.racy),
        ]

    @classmethod
    def from_row(cls, row: object, where: str, packs: dict[str, int]) -> Entry:
        if isinstance(row, list) and len(row) == 2 and isinstance(row[0], str):
            link = row[1]
            if not isinstance(link, str) or not link or "\x00" in link:
                raise StateError(f"{where}: {row[0]!r}: bad link target {link!r}")
            return cls(path=row[0], mode=0o777, link=link)
        if not isinstance(row, list) or len(row) != 8:
            raise StateError(f"{where}: entry {row!r} is not a row")
        path, size, mtime_ns, mode, sha, pack, offset, racy = row
        for name, v in (("size", size), ("mtime_ns", mtime_ns), ("mode", mode), ("offset", offset)):
            if type(v) is not int:
                raise StateError(f"{where}: {path!r}: bad {name} {v!r}")
        if size < 0 or offset < 0 or not 0 <= mode <= 0o7777:
            raise StateError(f"{where}: {path!r}: bad size, offset or mode")
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise StateError(f"{where}: {path!r}: bad sha256 {sha!r}")
        if pack is not None and (pack not in packs or offset + size > packs[pack]):
            raise StateError(f"{where}: {path!r}: pack {pack!r} is not listed or too short for it")
        return cls(path, size, mtime_ns, mode, sha, None, racy == 1, pack, offset)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        if self.link is not None:
            return {"path": self.path, "link": self.link, "mode": self.mode}
        out: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "mode": self.mode,
            "sha256": self.sha256,
        }
        if self.racy:
            out["racy"] = True
        return out

    @classmethod
    def from_json(cls, item: object, where: str) -> Entry:
        if not isinstance(item, dict):
            raise StateError(f"{where}: entry {item!r} is not an object")
        path = item.get("path")
        mode = item.get("mode", 0o644)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise StateError(f"{where}: {path!r}: bad mode {mode!r}")
        if "link" in item:
            link = item["link"]
            if not isinstance(link, str) or not link or "\x00" in link:
                raise StateError(f"{where}: {path!r}: bad link target {link!r}")
            return cls(path=path, mode=mode, link=link)  # type: ignore[arg-type]
        size, mtime_ns, sha = item.get("size"), item.get("mtime_ns", 0), item.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StateError(f"{where}: {path!r}: bad size {size!r}")
        if not isinstance(mtime_ns, int) or isinstance(mtime_ns, bool):
            raise StateError(f"{where}: {path!r}: bad mtime_ns {mtime_ns!r}")
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise StateError(f"{where}: {path!r}: bad sha256 {sha!r}")
        return cls(path, size, mtime_ns, mode, sha, racy=item.get("racy") is True)  # type: ignore[arg-type]


def parse_entries(items: object, where: str, packs: dict[str, int] | None = None) -> dict[str, Entry]:
    """Validate a manifest's `files` (objects; rows when `packs` is given): types, safe relative paths, no
    duplicates, no link leaving the root."""
    if not isinstance(items, list):
        raise StateError(f"{where}: 'files' is not a list")
    if packs is None:
        entries = [Entry.from_json(i, where) for i in items]
    else:
        entries = [Entry.from_row(i, where, packs) for i in items]
    try:
        check_tree([e.path for e in entries], {e.path: e.link for e in entries if e.link is not None})
    except StateError as err:
        raise StateError(f"{where}: {err}") from None
    return {e.path: e for e in entries}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_json(raw: bytes, where: str) -> dict[str, Any]:
    """Strict JSON object (duplicate keys refused), or StateError naming `where`."""
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise StateError(f"{where}: malformed JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise StateError(f"{where}: malformed JSON (not an object)")
    return doc


def dump_json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=None, separators=(",", ":"), sort_keys=True) + "\n").encode()


@dataclass
class PersistManifest:
    """The last complete persist: what the data dir holds, as of `time_unix`."""

    files: dict[str, Entry]
    databases: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {check, sig, racy}
    time_unix: float = 0.0
    seq: int = 0
    epoch: str = ""
    origin: str = "persist"
    packs: dict[str, int] = field(
        default_factory=dict
    )  # data dir pack id -> its size, every one an entry names

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "tabby-modal/persist",
            "time": iso(self.time_unix),
            "time_unix": self.time_unix,
            "seq": self.seq,
            "epoch": self.epoch,
            "origin": self.origin,
            "bytes": self.bytes,
            "databases": [{"path": p, **d} for p, d in sorted(self.databases.items())],
            "packs": dict(sorted(self.packs.items())),
            "files": [self.files[p].to_row() for p in sorted(self.files)],
        }


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# Parsed manifests by path, keyed on (size, mtime, inode): a persist pass with nothing changed reads no file.
_CACHE: dict[str, tuple[tuple[int, int, int], PersistManifest]] = {}


def load_manifest(data_dir: Path, *, copy: bool = True) -> PersistManifest | None:
    """The persist manifest of `data_dir`, validated; None when there is none. StateError when malformed.

    `copy=False` returns the cached object itself (a pass with nothing to change reads it and must not edit it)."""
    path = Path(data_dir) / MANIFEST
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == key:
        return _copied(hit[1]) if copy else hit[1]
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    m = _parse_manifest(raw)
    _CACHE[str(path)] = (key, m)
    return _copied(m) if copy else m


def _copied(m: PersistManifest) -> PersistManifest:
    return replace(m, files=dict(m.files), databases=dict(m.databases), packs=dict(m.packs))


def _parse_manifest(raw: bytes) -> PersistManifest:
    where = f"persist manifest {MANIFEST}"
    doc = load_json(raw, where)
    if doc.get("format") not in FORMATS or doc.get("kind") != "tabby-modal/persist":
        raise StateError(f"{where}: unknown format {doc.get('format')!r}/{doc.get('kind')!r}")
    packs: dict[str, int] | None = None
    if doc["format"] >= 2:
        packs = doc.get("packs")
        if not isinstance(packs, dict) or not all(
            PACK_ID_RE.match(k) and type(v) is int and v >= 0 for k, v in packs.items()
        ):
            raise StateError(f"{where}: bad 'packs'")
    files = parse_entries(doc.get("files"), where, packs)
    dbs: dict[str, dict[str, Any]] = {}
    for d in doc.get("databases") or []:
        if not isinstance(d, dict) or d.get("path") not in files:
            raise StateError(f"{where}: database entry {d!r} names no listed file")
        dbs[d["path"]] = {k: v for k, v in d.items() if k != "path"}
    t = doc.get("time_unix")
    return PersistManifest(
        files=files,
        databases=dbs,
        time_unix=float(t) if isinstance(t, int | float) else 0.0,
        seq=int(doc.get("seq") or 0),
        epoch=str(doc.get("epoch") or ""),
        origin=str(doc.get("origin") or "persist"),
        packs=packs or {},
    )


def write_manifest(data_dir: Path, manifest: PersistManifest) -> None:
    path = Path(data_dir) / MANIFEST
    write_bytes(path, dump_json(manifest.to_json()))
    st = path.stat()
    kept = _copied(manifest)
    _CACHE[str(path)] = ((st.st_size, st.st_mtime_ns, st.st_ino), kept)


def pending_info(data_dir: Path) -> dict[str, Any] | None:
    """The pending marker of an unfinished (running or crashed) persist, restore or reset; None if none."""
    return read_record(Path(data_dir) / PENDING)


def pending_alive(info: dict[str, Any] | None) -> bool:
    """Is the run that wrote this pending marker still running on this host?"""
    return bool(info) and process_alive(info) is True  # type: ignore[arg-type]


def write_pending(data_dir: Path, op: str, **about: Any) -> None:
    """The durable marker, written before the first change: `about` says what a restore or reset was doing
    (`target` snapshot, `scope`, `safety` snapshot), for the readers' messages and the run that finishes it."""
    doc = {**this_process(), "op": op, **{k: v for k, v in about.items() if v is not None}}
    write_bytes(Path(data_dir) / PENDING, json.dumps(doc).encode())


def clear_pending(data_dir: Path) -> None:
    path = Path(data_dir) / PENDING
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)
