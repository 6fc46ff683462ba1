"""Tabby's SQLite database: consistent online copies, checks, and a read-out of what is inside.

A live WAL database is never copied as a file: its committed data may sit only in `-wal`. `backup()` uses SQLite's
online backup API (one step, so one read transaction: a consistent point even while Tabby writes), checks the copy,
and only then renames it into place. Copies are switched to `journal_mode=DELETE` so they are one self-contained
file; Tabby turns WAL back on when it opens the database.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

from shared.state.atomic import ensure_dir, fsync_dir, hash_file, tmp_path
from shared.state.errors import StateError
from shared.state.space import disk_full, free_bytes, room_for

# Tabby's databases under TABBY_ROOT (dev builds use dev-db.sqlite).
DB_PATHS = ("ee/db.sqlite", "ee/dev-db.sqlite")
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")

Check = Literal["quick", "full", "none"]


class DbCheckError(StateError):
    """A database copy failed its check: it was not published."""


def sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + s) for s in SIDECAR_SUFFIXES]


def _ro_uri(path: Path) -> str:
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"


def check_conn(conn: sqlite3.Connection, mode: Check = "full") -> str:
    """'ok', or the first problems SQLite reports, on one line."""
    if mode == "none":
        return "ok"
    pragma = "integrity_check" if mode == "full" else "quick_check"
    try:
        rows = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(5)")]
    except sqlite3.DatabaseError as err:
        return f"error: {err}"
    if rows == ["ok"]:
        return "ok"
    return "; ".join(rows)[:300] or "error: no result"


def check_file(path: Path, mode: Check = "full") -> str:
    """Check a database file that nobody else uses (a private copy): 'ok' or what is wrong."""
    try:
        with closing(sqlite3.connect(_ro_uri(path), uri=True)) as conn:
            return check_conn(conn, mode)
    except sqlite3.DatabaseError as err:
        return f"error: {err}"


def _private_source(src: Path, workdir: Path) -> Path:
    """Copy the database and its `-wal` into `workdir` so we never open (and write `-shm` next to) the original."""
    dst = workdir / src.name
    shutil.copyfile(src, dst)
    wal = src.with_name(src.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, dst.with_name(dst.name + "-wal"))
    return dst


def backup(
    src: Path,
    dst: Path,
    *,
    private_copy: bool = False,
    check: Check = "quick",
    skip_if_sha256: str | None = None,
    durable: bool = True,
) -> dict[str, Any]:
    """Copy database `src` to `dst` through the online backup API, check it, then publish it atomically.

    `private_copy=True` is for sources we must not open in place (a mounted data Volume, a copied install): the file
    and its `-wal` are copied to a temp dir first. Otherwise `src` is opened read-only, which is safe while another
    process writes it. If the copy hashes to `skip_if_sha256`, `dst` is left alone (`unchanged: True`).
    Raises DbCheckError when the copy fails its check; `dst` is then untouched.
    """
    ensure_dir(dst.parent, durable=durable)
    tmp = tmp_path(dst)
    work = Path(tempfile.mkdtemp(prefix="tabby-modal-db-")) if private_copy else None
    try:
        try:
            if work is not None:
                with room_for(work, src.stat().st_size):
                    source = sqlite3.connect(_private_source(src, work))
            else:
                source = sqlite3.connect(_ro_uri(src), uri=True, timeout=30)
            with closing(source), closing(sqlite3.connect(tmp)) as target:
                source.backup(target)  # pages=-1: one step, one read transaction
                target.execute("PRAGMA journal_mode=DELETE")
                result = check_conn(target, check)
                page_count = target.execute("PRAGMA page_count").fetchone()[0]
        except sqlite3.DatabaseError as err:
            if _out_of_room(err, tmp, src):
                raise disk_full(tmp, _size_or_none(src), cause=f"SQLite: {err}") from None
            raise DbCheckError(f"{src.name}: cannot copy: {err}") from None
        if result != "ok":
            raise DbCheckError(f"{src.name}: copy fails {check}_check: {result}")
        if durable:
            with room_for(tmp), open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        size, sha = hash_file(tmp)
        out = {"check": result, "mode": check, "method": "backup", "bytes": size, "sha256": sha}
        out["page_count"] = page_count
        if sha == skip_if_sha256:
            return {**out, "unchanged": True}
        os.replace(tmp, dst)
        if durable:
            fsync_dir(dst.parent)
        return {**out, "unchanged": False}
    finally:
        for p in (tmp, *sidecars(tmp)):
            p.unlink(missing_ok=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


SQLITE_FULL, SQLITE_IOERR = getattr(sqlite3, "SQLITE_FULL", 13), getattr(sqlite3, "SQLITE_IOERR", 10)


def _out_of_room(err: sqlite3.Error, tmp: Path, src: Path) -> bool:
    """Did writing the copy fail for want of room? SQLite says so (SQLITE_FULL), or gives an I/O error (extending
    the copy's -shm or -wal, writing a page) while the disk has less room than the source needs."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF
    if code == SQLITE_FULL:
        return True
    free = free_bytes(tmp.parent)
    return code == SQLITE_IOERR and free is not None and free < (_size_or_none(src) or 0) + (1 << 20)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info({_quote(table)})")}


# Tabby's owner is the user with id 1, its first registrant, made admin (tabby-db `OWNER_USER_ID`).
OWNER_ID = 1


def schema_version(conn: sqlite3.Connection) -> dict[str, int | None] | None:
    """Tabby's schema from sqlx's `_sqlx_migrations`: {"version": highest successful, "migrations": rows}, or None
    when the table is absent (Tabby 0.32 has 49 rows, version 50)."""
    try:
        version, rows = conn.execute(
            "SELECT max(CASE WHEN success THEN version END), count(*) FROM _sqlx_migrations"
        ).fetchone()
    except sqlite3.OperationalError:  # no such table (or column): not a Tabby database, or not migrated yet
        return None
    return {"version": None if version is None else int(version), "migrations": int(rows)}


def read_schema_version(path: Path) -> dict[str, int | None] | None:
    """`schema_version` of the database at `path`, opened read-only; None when the file or the table is missing."""
    if not path.is_file():
        return None
    try:
        with closing(sqlite3.connect(_ro_uri(path), uri=True, timeout=5)) as conn:
            return schema_version(conn)
    except sqlite3.DatabaseError:
        return None


def inspect_conn(conn: sqlite3.Connection, *, check: Check = "full") -> dict[str, Any]:
    """Tables with row counts, users, whether the owner (id 1, admin) exists, schema version, integrity."""
    tables: dict[str, int] = {}
    names = [
        str(r[0])
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    for name in names:
        tables[name] = int(conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0])
    users = tables.get("users", 0)
    owner = False
    if "users" in tables:
        cols = _columns(conn, "users")
        # Tabby's owner: id 1 (its first registrant), an admin; a flag column is checked if present.
        flag = next((c for c in ("is_owner", "is_admin") if c in cols), None)
        where = [f"id = {OWNER_ID}"] if "id" in cols else []
        where += [_quote(flag)] if flag else []
        if where:
            owner = bool(
                conn.execute(f"SELECT EXISTS(SELECT 1 FROM users WHERE {' AND '.join(where)})").fetchone()[0]
            )
        else:
            owner = users > 0
    schema = schema_version(conn) if "_sqlx_migrations" in tables else None
    return {
        "integrity": check_conn(conn, check),
        "users": users,
        "owner": owner,
        "tables": tables,
        "schema_version": schema["version"] if schema else None,
        "migrations": schema["migrations"] if schema else None,
        "page_count": int(conn.execute("PRAGMA page_count").fetchone()[0]),
    }


def inspect_file(path: Path, *, check: Check = "full") -> dict[str, Any]:
    """Inspect a private copy of a database. An unreadable file gives `integrity` 'error: ...' and empty counts."""
    base: dict[str, Any] = {"present": True, "bytes": path.stat().st_size}
    try:
        with closing(sqlite3.connect(_ro_uri(path), uri=True)) as conn:
            return {**base, **inspect_conn(conn, check=check)}
    except sqlite3.DatabaseError as err:
        return {
            **base,
            "integrity": f"error: {err}",
            "users": 0,
            "owner": False,
            "tables": {},
            "schema_version": None,
            "migrations": None,
        }


def absent() -> dict[str, Any]:
    """The `db` section when there is no database (a fresh instance)."""
    return {
        "present": False,
        "integrity": None,
        "users": 0,
        "owner": False,
        "tables": {},
        "schema_version": None,
        "migrations": None,
    }
