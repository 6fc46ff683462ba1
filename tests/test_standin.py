"""The stand-in Tabby is close to Tabby v0.32.0 where our code looks: its database (the final `users` columns and sqlx's
`_sqlx_migrations` with 49 rows) and the "Listening at" line printed before the bind."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import urllib.request

from shared.state import database
from tests.harness import Standin, free_port, poll, port_open, standin_command
from tests.tabby_root import make_root

# PRAGMA table_info(users) as Tabby 0.32's migrations leave it (name, type, notnull, default, pk):
# 0002 creates id..active with a NOT NULL password_encrypted, 0018 re-adds password_encrypted nullable at the end,
# 0019 adds avatar, 0030 adds name.
USERS = [
    ("id", "INTEGER", 0, None, 1),
    ("email", "VARCHAR(150)", 1, None, 0),
    ("is_admin", "BOOLEAN", 1, "0", 0),
    ("created_at", "TIMESTAMP", 0, "DATETIME('now')", 0),
    ("updated_at", "TIMESTAMP", 0, "DATETIME('now')", 0),
    ("auth_token", "VARCHAR(128)", 1, None, 0),
    ("active", "BOOLEAN", 1, "1", 0),
    ("password_encrypted", "VARCHAR(128)", 0, None, 0),
    ("avatar", "BLOB", 0, "NULL", 0),
    ("name", "VARCHAR(255)", 0, None, 0),
]
# As sqlx 0.7 creates it for SQLite.
SQLX_MIGRATIONS = [
    ("version", "BIGINT", 0, None, 1),
    ("description", "TEXT", 1, None, 0),
    ("installed_on", "TIMESTAMP", 1, "CURRENT_TIMESTAMP", 0),
    ("success", "BOOLEAN", 1, None, 0),
    ("checksum", "BLOB", 1, None, 0),
    ("execution_time", "BIGINT", 1, None, 0),
]
# ee/tabby-db/migrations at v0.32.0: 0001..0050 without 0032.
VERSIONS = [v for v in range(1, 51) if v != 32]


def columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    return [tuple(r[1:]) for r in conn.execute(f"PRAGMA table_info({table})")]


def register(url: str, email: str) -> dict:
    req = urllib.request.Request(
        f"{url}/debug/register", data=json.dumps({"email": email}).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_standin_database_has_tabbys_columns_and_migrations(tmp_path):
    root = tmp_path / "root"
    with Standin(root) as tabby:
        first = register(tabby.url, "owner@example.com")
        second = register(tabby.url, "dev@example.com")
    assert (first["id"], first["is_admin"]) == (1, True)  # the first registrant is the owner
    assert (second["id"], second["is_admin"]) == (2, False)
    # Tabby backs the file up when migrations are pending, a fresh root included.
    backups = sorted(p.name for p in (root / "ee").glob("db.backup-*.sqlite"))
    assert len(backups) == 1 and re.fullmatch(r"db\.backup-\d{8}\.sqlite", backups[0])
    with sqlite3.connect(f"file:{root / 'ee/db.sqlite'}?mode=ro", uri=True) as conn:
        assert columns(conn, "users") == USERS
        assert columns(conn, "_sqlx_migrations") == SQLX_MIGRATIONS
        rows = conn.execute(
            "SELECT version, description, success, length(checksum) FROM _sqlx_migrations ORDER BY version"
        ).fetchall()
        assert [r[0] for r in rows] == VERSIONS and len(rows) == 49
        assert all(ok == 1 and n == 48 for _, _, ok, n in rows)  # sha384 checksums
        assert (
            rows[0][1] == "registration-token-table"
            and dict((v, d) for v, d, *_ in rows)[36] == "web document"
        )
        assert conn.execute("SELECT id FROM registration_token").fetchall() == [(1,)]
        assert conn.execute("SELECT id, is_admin, active FROM users ORDER BY id").fetchall() == [
            (1, 1, 1),
            (2, 0, 1),
        ]
        assert conn.execute("SELECT count(*) FROM refresh_tokens").fetchone()[0] == 2
    conn.close()

    # A second start on the migrated database: nothing pending, so no new backup and the history is unchanged.
    for p in (root / "ee").glob("db.backup-*.sqlite"):
        p.unlink()
    with Standin(root) as tabby:
        assert register(tabby.url, "third@example.com")["id"] == 3
    assert not list((root / "ee").glob("db.backup-*.sqlite"))


def test_tabby_root_database_matches_the_standin(tmp_path):
    info = make_root(tmp_path / "root", size_mb=0.05, users=2)
    assert info["schema_version"] == 50 and info["migrations"] == 49
    with sqlite3.connect(f"file:{tmp_path / 'root/ee/db.sqlite'}?mode=ro", uri=True) as conn:
        assert columns(conn, "users") == USERS
        assert [
            r[0] for r in conn.execute("SELECT version FROM _sqlx_migrations ORDER BY version")
        ] == VERSIONS
        assert conn.execute("SELECT id, is_admin FROM users ORDER BY id").fetchall() == [(1, 1), (2, 0)]
    conn.close()


def test_standin_refuses_a_modified_migration_after_backing_up(tmp_path):
    root = tmp_path / "root"
    make_root(root, size_mb=0.05, users=1)
    with sqlite3.connect(root / "ee/db.sqlite") as conn:
        conn.execute("UPDATE _sqlx_migrations SET checksum = zeroblob(48) WHERE version = 18")
    conn.close()
    out = subprocess.run(
        standin_command(free_port()),
        env={"TABBY_ROOT": str(root), "STANDIN_CHILD": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "migration 18 was previously applied but has been modified" in out.stdout
    assert len(list((root / "ee").glob("db.backup-*.sqlite"))) == 1


def test_standin_prints_listening_at_before_the_port_accepts(tmp_path):
    port = free_port()
    gate = tmp_path / "bind"
    proc = subprocess.Popen(
        standin_command(port),
        env={"TABBY_ROOT": str(tmp_path / "root"), "STANDIN_CHILD": "0", "STANDIN_BIND_GATE": str(gate)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for raw in proc.stdout:
            lines.append(raw.decode())
            if "Listening at" in lines[-1]:
                break
        # Tabby's format (crates/tabby/src/routes/mod.rs `run_app`), printed before `TcpListener::bind`.
        assert lines[-1] == f"🚀 Listening at http://127.0.0.1:{port}\n"
        assert lines[-2] == "📄 Version 0.32.0\n"
        assert not port_open(port)
        gate.touch()
        poll(lambda: port_open(port), 10, what="the bind after the gate")
    finally:
        proc.kill()
        proc.wait()


# --- our read-out of it (shared/state/database.py) ---------------------------------------------------------------


def test_schema_version_read_out(tmp_path):
    """Tabby 0.32's `_sqlx_migrations`: 49 rows, highest version 50; a failed (dirty) row does not count as the
    version; no table or no file reads as None."""
    db = tmp_path / "root/ee/db.sqlite"
    make_root(tmp_path / "root", size_mb=0.05, users=1)
    assert database.read_schema_version(db) == {"version": 50, "migrations": 49}
    rep = database.inspect_file(db)
    assert (rep["schema_version"], rep["migrations"], rep["owner"]) == (50, 49, True)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO _sqlx_migrations(version, description, success, checksum, execution_time)"
            " VALUES (51, 'next', FALSE, x'00', -1)"
        )
        conn.execute("UPDATE users SET id = 7 WHERE id = 1")  # an admin, but not Tabby's owner (id 1)
    conn.close()
    assert database.read_schema_version(db) == {"version": 50, "migrations": 50}
    rep = database.inspect_file(db)
    assert (rep["schema_version"], rep["migrations"], rep["owner"]) == (50, 50, False)
    bare = tmp_path / "bare.sqlite"
    with sqlite3.connect(bare) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    assert database.read_schema_version(bare) is None and database.inspect_file(bare)["migrations"] is None
    assert database.read_schema_version(tmp_path / "missing.sqlite") is None
    assert not (tmp_path / "missing.sqlite").exists()
