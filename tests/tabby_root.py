"""Generate Tabby-like roots for tests and benchmarks, and a writer process that keeps one busy.

Layout as Tabby 0.32 leaves it (see ../shared/notes/tabby.md): a WAL `ee/db.sqlite` with Tabby's tables, `ee/jobs/<id>/
stdout.log`, `events/YYYY-MM-DD.json`, a Tantivy-like `index/` (meta.json naming segment files, `.managed.json`,
`.tantivy-*.lock`), git clones under `repositories/`, `config.toml`, `usage_anonymous_id`, and a `models/` dir that the
mirror must leave out. Sizes scale with `size_mb`: about 10% database, 65% index (~10k files per GiB), 5% events,
15% repositories, 5% job logs. Content comes from a seeded RNG, so a seed always gives the same tree.

    python -m tests.tabby_root make DIR [--size-mb N] [--seed S] [--files N] [--no-models]
    python -m tests.tabby_root change ROOT typical|large [--seed S]   # what a stretch of use changes
    python -m tests.tabby_root writer ROOT [--seed S]     # commits a counter until SIGTERM; see `writer()`
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.standin_tabby import MIGRATIONS, migrate, register_user

SEGMENT_EXTS = ("idx", "pos", "term", "store", "fast", "fieldnorm")
# Tabby 0.32's own tables come from the stand-in (tests/standin_tabby.py); `counter` is the tests' own.
COUNTER = "CREATE TABLE counter (n INTEGER PRIMARY KEY);"


def _rng_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _write(path: Path, data: bytes, mtime: float | None = None) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return len(data)


def make_db(path: Path, *, users: int, filler_bytes: int, rng: random.Random) -> dict[str, Any]:
    """A WAL database as Tabby 0.32 leaves it (its tables, 49 migrations, the registration token) with `users`
    accounts registered as Tabby does (the first, id 1, is the admin owner), plus `counter` and filler events."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn)
    conn.execute(COUNTER)
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO registration_token(id, token) VALUES (1, ?)", (str(uuid.UUID(int=rng.getrandbits(128))),)
    )
    for i in range(users):
        user, _, _ = register_user(
            conn,
            f"user{i}@example.com",
            password_encrypted="$argon2id$" + rng.randbytes(16).hex(),
            name=f"User {i}",
        )
        conn.execute(
            "INSERT INTO refresh_tokens(user_id, token, expires_at) VALUES (?,?,datetime('now','+7 days'))",
            (user, rng.randbytes(16).hex()),
        )
    row = 4000
    written = 0
    while written < filler_bytes:
        batch = [(1, "completion", int(time.time()), rng.randbytes(row)) for _ in range(256)]
        conn.executemany(
            "INSERT INTO user_events(user_id, kind, created_at, payload) VALUES (?,?,?,?)", batch
        )
        written += row * len(batch)
    conn.execute("COMMIT")
    conn.close()
    return {"users": users, "schema_version": MIGRATIONS[-1][0], "migrations": len(MIGRATIONS)}


def leave_wal(db: Path, rows: int) -> None:
    """Commit `rows` counter rows from a process that dies without checkpointing: the data sits only in `-wal`."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_autocheckpoint=0')\n"
        "base = c.execute('SELECT coalesce(max(n), 0) FROM counter').fetchone()[0]\n"
        "for i in range(int(sys.argv[2])):\n"
        "    c.execute('INSERT INTO counter(n) VALUES (?)', (base + i + 1,)); c.commit()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(db), str(rows)], check=True)


def new_segment(index: Path, rng: random.Random, sizes: list[int]) -> str:
    """Write one Tantivy-like segment (immutable files named `<uuid hex>.<ext>`); returns its dashed id."""
    sid = uuid.UUID(int=rng.getrandbits(128), version=4)
    for ext, size in zip(SEGMENT_EXTS, sizes, strict=False):
        _write(index / f"{sid.hex}.{ext}", _rng_bytes(rng, size))
    return str(sid)


def write_meta(index: Path, segments: list[dict[str, Any]], opstamp: int) -> None:
    """Replace meta.json atomically, as Tantivy does."""
    doc = {
        "index_settings": {"docstore_compression": "lz4", "docstore_blocksize": 16384},
        "segments": segments,
        "schema": [{"name": "body", "type": "text"}],
        "opstamp": opstamp,
    }
    tmp = index / f".meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, index / "meta.json")
    managed = sorted(["meta.json"] + [p.name for p in index.iterdir() if "." in p.name[1:] and p.is_file()])
    (index / ".managed.json").write_text(json.dumps(managed))


def read_meta(index: Path) -> dict[str, Any]:
    return json.loads((index / "meta.json").read_text())


def tantivy_commit(index: Path, rng: random.Random, *, keep: int = 4, size: int = 2048) -> None:
    """A new segment, a new meta.json naming it, then garbage collection of segments dropped from the meta."""
    meta = read_meta(index)
    sid = new_segment(index, rng, [size] * len(SEGMENT_EXTS))
    segments = [*meta["segments"], {"segment_id": sid, "max_doc": 10, "deletes": None}]
    dropped, segments = segments[:-keep], segments[-keep:]
    write_meta(index, segments, meta["opstamp"] + 1)
    for seg in dropped:
        for f in index.glob(seg["segment_id"].replace("-", "") + ".*"):
            f.unlink(missing_ok=True)


def make_index(index: Path, *, nfiles: int, nbytes: int, rng: random.Random) -> int:
    index.mkdir(parents=True, exist_ok=True)
    nseg = max(2, nfiles // len(SEGMENT_EXTS))
    per_seg = max(len(SEGMENT_EXTS), nbytes // nseg)
    segments = []
    for i in range(nseg):
        weights = [rng.random() + 0.2 for _ in SEGMENT_EXTS]
        total = sum(weights)
        sid = new_segment(index, rng, [max(1, int(per_seg * w / total)) for w in weights])
        deletes = {"num_deleted_docs": 1, "opstamp": 7} if i == 0 else None
        if deletes:
            _write(index / f"{sid.replace('-', '')}.7.del", b"\x01" * 64)
        segments.append({"segment_id": sid, "max_doc": 1000, "deletes": deletes})
    write_meta(index, segments, 100)
    for name in (".tantivy-meta.lock", ".tantivy-writer.lock"):
        (index / name).write_bytes(b"")
    return sum(p.stat().st_size for p in index.iterdir() if p.is_file())


def make_root(
    root: Path,
    *,
    size_mb: float = 2.0,
    seed: int = 0,
    users: int = 3,
    wal_rows: int = 0,
    models: bool = True,
    files: int | None = None,
) -> dict[str, Any]:
    """Create a Tabby-like root of about `size_mb` MiB at `root`. `wal_rows` leaves that many commits only in -wal.
    `files` sets about how many files it holds (default: ~10k per GiB, as Tabby's index grows)."""
    rng = random.Random(seed)
    root = Path(root)
    total = int(size_mb * (1 << 20))
    info = make_db(root / "ee/db.sqlite", users=users, filler_bytes=total // 10, rng=rng)
    if wal_rows:
        leave_wal(root / "ee/db.sqlite", wal_rows)
    index_files = max(24, round(10_000 * total / (1 << 30)))
    if files is not None:  # many small files at a small size: the count, not the bytes, is what is tested
        index_files = max(24, round((files - 30) / 1.05))
    make_index(root / "index", nfiles=index_files - 12, nbytes=int(total * 0.63), rng=rng)
    make_index(root / "index/corpus", nfiles=12, nbytes=int(total * 0.02), rng=rng)

    days = 10
    for d in range(days):
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - d) * 86400))
        lines = []
        size = 0
        while size < total * 0.05 / days:
            line = json.dumps(
                {"ts": d, "event": "completion", "id": rng.randbytes(24).hex(), "lang": "python"}
            )
            lines.append(line)
            size += len(line) + 1
        _write(root / f"events/{day}.json", ("\n".join(lines) + "\n").encode())

    jobs = 8
    for j in range(jobs):
        _write(
            root / f"ee/jobs/{j + 1}/stdout.log",
            rng.randbytes(max(1, int(total * 0.025 / jobs))).hex().encode(),
        )

    repo = root / "repositories/https_github.com_example_project.git"
    nsrc = max(10, index_files // 20)
    for i in range(nsrc):
        _write(repo / f"src/mod{i // 50}/file{i}.py", _rng_bytes(rng, int(total * 0.10 / nsrc)))
    _write(repo / "Cargo.lock", b"# kept: a lock file of the work tree\n")
    _write(repo / ".git/HEAD", b"ref: refs/heads/main\n")
    _write(repo / ".git/objects/pack/pack-1.pack", _rng_bytes(rng, int(total * 0.05)))
    _write(repo / ".git/index.lock", b"")  # a transient git lock: excluded
    os.symlink("src/mod0/file0.py", repo / "main.py")

    _write(root / "config.toml", b'[model.completion.local]\nmodel_id = "StarCoder-1B"\n')
    _write(root / "usage_anonymous_id", str(uuid.UUID(int=rng.getrandbits(128))).encode())
    if models:
        _write(root / "models/TabbyML/StarCoder-1B/ggml/model-00001-of-00001.gguf", _rng_bytes(rng, 4096))
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return {
        **info,
        "root": str(root),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "index_files": index_files,
    }


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under `root` (hidden files, dirs and links included): to prove that nothing was written."""
    import hashlib

    out: dict[str, tuple[Any, ...]] = {}
    root = Path(root)
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = (
                    "file",
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_mode,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
    return out


def counter_values(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT n FROM counter ORDER BY n")]


def writer(root: Path, seed: int = 0) -> None:
    """Commit 1, 2, 3... into `counter` (one transaction each) until SIGTERM, like a busy Tabby.

    Every 25 commits it appends an event line, every 40 a Tantivy commit with garbage collection, every 500 a
    checkpoint. After each commit the committed value is written to `ROOT/../writer.committed` (for the test's bounds).
    """
    rng = random.Random(seed)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    conn = sqlite3.connect(root / "ee/db.sqlite", timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    n = conn.execute("SELECT coalesce(max(n), 0) FROM counter").fetchone()[0]
    events = root / "events" / (time.strftime("%Y-%m-%d", time.gmtime()) + ".json")
    mark = root.parent / "writer.committed"
    while not stop:
        n += 1
        conn.execute("INSERT INTO counter(n) VALUES (?)", (n,))
        conn.commit()
        tmp = mark.with_suffix(".tmp")
        tmp.write_text(str(n))
        os.replace(tmp, mark)
        if n % 25 == 0:
            with open(events, "a") as f:
                f.write(json.dumps({"n": n}) + "\n")
        if n % 40 == 0:
            tantivy_commit(root / "index/corpus", rng)
        if n % 500 == 0:
            conn.execute("PRAGMA wal_checkpoint(RESTART)")
    conn.close()


def db_rows(root: Path, n: int) -> None:
    conn = sqlite3.connect(root / "ee/db.sqlite", timeout=30)
    with conn:
        conn.executemany(
            "INSERT INTO user_events(user_id, kind, payload) VALUES (1, 'completion', ?)",
            [(os.urandom(400),) for _ in range(n)],
        )
    conn.close()


def typical_change(root: Path, rng: random.Random) -> None:
    """About 30 s of use: rows in the database, events, two small index commits."""
    db_rows(root, 300)
    with open(root / "events" / (time.strftime("%Y-%m-%d", time.gmtime()) + ".json"), "a") as f:
        for i in range(200):
            f.write(f'{{"event": "completion", "n": {i}}}\n')
    for _ in range(2):
        tantivy_commit(root / "index/corpus", rng)


def large_change(root: Path, rng: random.Random) -> None:
    """A merge of the main index: every segment rewritten as a new one of the same size, then the old deleted."""
    index = root / "index"
    meta = read_meta(index)
    segments = []
    for seg in meta["segments"]:
        old = seg["segment_id"].replace("-", "")
        sizes = [(index / f"{old}.{ext}").stat().st_size for ext in SEGMENT_EXTS]
        segments.append({"segment_id": new_segment(index, rng, sizes), "max_doc": 1000, "deletes": None})
    write_meta(index, segments, meta["opstamp"] + 1)
    for seg in meta["segments"]:
        for f in index.glob(seg["segment_id"].replace("-", "") + ".*"):
            f.unlink()
    db_rows(root, 300)


CHANGES = {"typical": typical_change, "large": large_change}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("dir")
    mk.add_argument("--size-mb", type=float, default=2.0)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--files", type=int, default=None)
    mk.add_argument("--no-models", action="store_true")
    ch = sub.add_parser("change")
    ch.add_argument("root")
    ch.add_argument("kind", choices=sorted(CHANGES))
    ch.add_argument("--seed", type=int, default=0)
    wr = sub.add_parser("writer")
    wr.add_argument("root")
    wr.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "make":
        info = make_root(
            Path(args.dir), size_mb=args.size_mb, seed=args.seed, files=args.files, models=not args.no_models
        )
        print(json.dumps(info))
    elif args.cmd == "change":
        CHANGES[args.kind](Path(args.root), random.Random(args.seed))
    else:
        writer(Path(args.root), args.seed)


if __name__ == "__main__":
    main()
