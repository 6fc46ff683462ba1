"""Prototype (issue 19, docs/scale-design.md): a packed mirror, written and read back, measured against `cp -a`.

    .venv/bin/python scripts/proto_packed_mirror.py                    # a 200k-file monorepo root
    .venv/bin/python scripts/proto_packed_mirror.py --files 20000      # the 20k-small-file root

Standalone: it does not change shared/ and the engine does not use it. It answers the riskiest question of the design
with measurements instead of guesses: can a first persist put N small files into a data dir as a few pack files
(the snapshot store's pack format, `shared.state.packs`) with one durability barrier, and can a hydrate lay
them back down, every byte checked against its sha256, at `cp -a` speed or better, with the data dir holding few
files and bounded memory? Also: how long a no-change pass's scan of N files takes, and what a manifest of N entries
costs as JSON versus a compact binary form.

Write: files below SMALL go, in path order, to one pack per worker (rolled over at PACK_TARGET): read whole, sha256
(hashlib releases the GIL), appended. Larger files are copied one each under a temp name. Then ONE syncfs, then
the packs and large files are renamed into place, then the manifest (temp, fsync, rename, fsync dir). Read: per pack,
a worker reads the pack in one go, checks each slice's sha256 and creates its file with O_CREAT|O_EXCL in a private
staging dir (no temp names, no per-file fsync), then one rename of the staging dir (no barrier: the live root is local disk).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_scale import count_files, make_scaled_root
from shared.state.atomic import fsync_dir, sync_fs, write_bytes
from shared.state.mirror import scan
from shared.state.packs import PACK_TARGET, PackWriter, parse_pack_index

SMALL = 1 << 20  # files below this go into packs, as blobs do in the store
# (path, pack index or -1 for a loose file, offset, length, sha256 hex, mode, mtime_ns)
Row = tuple[str, int, int, int, str, int, int]


def read_all(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks, got = [], 0
        while True:
            b = os.read(fd, max(size - got, 0) + 1)  # one read for an unchanged file, one more to see EOF
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_mirror(live: Path, data: Path, workers: int) -> dict[str, Any]:
    nodes = scan(live)
    files = sorted(p for p, n in nodes.items() if n.link is None)
    small = [p for p in files if nodes[p].size < SMALL]
    large = [p for p in files if nodes[p].size >= SMALL]
    (data / "packs").mkdir(parents=True, exist_ok=True)
    (data / "files").mkdir(parents=True, exist_ok=True)
    per = -(-len(small) // workers) if small else 0
    chunks = [small[i : i + per] for i in range(0, len(small), per)] if per else []

    def pack_chunk(chunk: list[str]) -> tuple[list[Path], list[tuple[int, Row]]]:
        tmps: list[Path] = []
        rows: list[tuple[int, Row]] = []  # (local pack number, row)
        pw = PackWriter(data)
        for p in chunk:
            n = nodes[p]
            blob = read_all(live / p, n.size)
            sha = hashlib.sha256(blob).hexdigest()
            if pw.pos and pw.pos + len(blob) > PACK_TARGET:
                tmps.append(pw.finish())
                pw = PackWriter(data)
            rows.append((len(tmps), (p, 0, pw.pos, len(blob), sha, n.mode, n.mtime_ns)))
            pw.add(sha, blob)
        tmps.append(pw.finish())
        return tmps, rows

    def copy_large(p: str) -> tuple[Path, Row]:
        n = nodes[p]
        tmp = data / "files" / f".{hashlib.sha1(p.encode()).hexdigest()}.tmtmp-new"
        h = hashlib.sha256()
        with open(live / p, "rb", buffering=0) as src, open(tmp, "xb", buffering=0) as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
        return tmp, (p, -1, 0, n.size, h.hexdigest(), n.mode, n.mtime_ns)

    with ThreadPoolExecutor(workers) as pool:
        packed = list(pool.map(pack_chunk, chunks))
        loose = list(pool.map(copy_large, large))
    t = time.perf_counter()
    sync_fs(data)  # ONE barrier for every pack and large file, before any is named
    t_sync = time.perf_counter() - t
    names: list[str] = []
    rows: list[Row] = []
    for tmps, local_rows in packed:
        base = len(names)
        for tmp in tmps:
            final = f"packs/{hashlib.sha256(tmp.name.encode()).hexdigest()[:32]}.pack"
            os.rename(tmp, data / final)
            names.append(final)
        rows += [(r[0], base + i, *r[2:]) for i, r in local_rows]  # type: ignore[misc]
    for tmp, r in loose:
        os.rename(tmp, data / "files" / tmp.name[1:41])
        rows.append(r)
    fsync_dir(data / "packs")
    fsync_dir(data / "files")
    rows.sort()
    raw = dump_compact(names, rows)
    write_bytes(data / "persist.bin", raw)  # the manifest, last: temp + fsync + rename + fsync dir
    return {
        "files": len(rows),
        "packs": len(names),
        "loose": len(loose),
        "manifest_bytes": len(raw),
        "sync": t_sync,
    }


def dump_compact(packs: list[str], rows: list[Row]) -> bytes:
    """The manifest as one zlib stream: pack names, then per entry a fixed struct and its path."""
    rec = struct.Struct(">iQQ32sIq")
    out = [json.dumps(packs).encode(), b"\n"]
    for p, pk, off, n, sha, mode, mt in rows:
        pb = p.encode()
        out.append(struct.pack(">H", len(pb)) + pb + rec.pack(pk, off, n, bytes.fromhex(sha), mode, mt))
    return zlib.compress(b"".join(out), 1)


def load_compact(raw: bytes) -> tuple[list[str], list[Row]]:
    rec = struct.Struct(">iQQ32sIq")
    buf = zlib.decompress(raw)
    nl = buf.index(b"\n")
    packs = json.loads(buf[:nl])
    rows: list[Row] = []
    i = nl + 1
    while i < len(buf):
        (ln,) = struct.unpack_from(">H", buf, i)
        p = buf[i + 2 : i + 2 + ln].decode()
        pk, off, n, sha, mode, mt = rec.unpack_from(buf, i + 2 + ln)
        rows.append((p, pk, off, n, sha.hex(), mode, mt))
        i += 2 + ln + rec.size
    return packs, rows


def read_mirror(data: Path, live: Path, workers: int) -> dict[str, Any]:
    packs, rows = load_compact((data / "persist.bin").read_bytes())
    staging = live.parent / f".{live.name}.tmtmp-hydrate"
    staging.mkdir()
    for d in sorted({os.path.dirname(r[0]) for r in rows} - {""}):
        (staging / d).mkdir(parents=True, exist_ok=True)
    by_pack: dict[int, list[Row]] = {}
    loose = 0
    for r in rows:
        if r[1] < 0:  # each large file is a task of its own (keys -1, -2, ...): no straggler copying them all
            loose -= 1
            by_pack[loose] = [r]
        else:
            by_pack.setdefault(r[1], []).append(r)
    umask = os.umask(0)
    os.umask(umask)

    def create(r: Row, view: memoryview | bytes) -> None:
        p, _, _, _, sha, mode, mt = r
        if hashlib.sha256(view).hexdigest() != sha:
            raise SystemExit(f"{p}: hash mismatch")
        fd = os.open(staging / p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o777)
        try:
            v = memoryview(view)
            while v:
                v = v[os.write(fd, v) :]
            if mode & umask:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mt, mt))
        finally:
            os.close(fd)

    def copy_loose(r: Row) -> None:
        p, _, _, _, sha, mode, mt = r
        h = hashlib.sha256()
        src = data / "files" / hashlib.sha1(p.encode()).hexdigest()
        with open(src, "rb", buffering=0) as f, open(staging / p, "xb", buffering=0) as out:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            if h.hexdigest() != sha:
                raise SystemExit(f"{p}: hash mismatch")
            os.fchmod(out.fileno(), mode)
            os.utime(out.fileno(), ns=(mt, mt))

    def lay_pack(k: int) -> int:
        if k < 0:  # loose large files: streamed, hashed on the read side
            for r in by_pack[k]:
                copy_loose(r)
            return len(by_pack[k])
        with open(data / packs[k], "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            parse_pack_index(f, size)  # the pack's own trailer checks out (sha of its index)
            f.seek(0)
            blob = memoryview(f.read(size))
        for r in by_pack[k]:
            create(r, blob[r[2] : r[2] + r[3]])
        return len(by_pack[k])

    with ThreadPoolExecutor(workers) as pool:
        # Biggest tasks first (bytes), so the last ones to finish are short.
        laid = sum(pool.map(lay_pack, sorted(by_pack, key=lambda k: -sum(r[3] for r in by_pack[k]))))
    # No barrier: the live root is the container's local disk, gone with it (today's hydrate has none either).
    os.rename(staging, live)
    return {"files": laid}


def no_change_scan(live: Path, data: Path) -> tuple[float, float]:
    """A no-change pass's work as today: scan the live root, compare (size, mtime, mode) with the manifest's rows."""
    _, rows = load_compact((data / "persist.bin").read_bytes())
    known = {r[0]: (r[3], r[6], r[5]) for r in rows}
    t = time.perf_counter()
    nodes = scan(live)
    t_scan = time.perf_counter() - t
    changed = [p for p, n in nodes.items() if n.link is None and known.get(p) != (n.size, n.mtime_ns, n.mode)]
    assert not changed, changed[:3]
    return t_scan, time.perf_counter() - t


def manifest_costs(data: Path) -> dict[str, float]:
    """Today's JSON manifest form for the same entries (dump + strict load) versus the compact one."""
    from shared.state.mirror.manifest import Entry, PersistManifest, _parse_manifest, dump_json

    raw_c = (data / "persist.bin").read_bytes()
    t = time.perf_counter()
    _, rows = load_compact(raw_c)
    t_load_c = time.perf_counter() - t
    files = {r[0]: Entry(r[0], r[3], r[6], r[5], r[4]) for r in rows}
    m = PersistManifest(files=files, seq=1, epoch="e")
    t = time.perf_counter()
    raw_j = dump_json(m.to_json())
    t_dump_j = time.perf_counter() - t
    t = time.perf_counter()
    _parse_manifest(raw_j)
    t_load_j = time.perf_counter() - t
    return {
        "json_mib": len(raw_j) / (1 << 20),
        "json_dump": t_dump_j,
        "json_load": t_load_j,
        "compact_mib": len(raw_c) / (1 << 20),
        "compact_load": t_load_c,
    }


def timed(fn) -> tuple[float, Any]:  # type: ignore[no-untyped-def]
    os.sync()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def cp_a(src: Path, dst: Path) -> float:
    os.sync()
    t = time.perf_counter()
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    t = time.perf_counter() - t
    shutil.rmtree(dst)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--files", type=int, default=200_000, help="Files in the generated root (default 200000)."
    )
    ap.add_argument("--size-mb", type=float, default=64, help="Size of the non-monorepo part (default 64).")
    ap.add_argument("--workers", type=int, default=max(4, 2 * (os.cpu_count() or 1)))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.files < 100 or args.workers < 1 or args.size_mb <= 0:
        print("error: --files >= 100, --workers >= 1, --size-mb > 0", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="tabby-modal-proto-"))
    try:
        live, data, back = base / "live", base / "data", base / "hydrated"
        t_gen, info = timed(
            lambda: make_scaled_root(live, size_mb=args.size_mb, files=args.files, seed=args.seed)
        )
        print(
            f"root: {info['files']} files, {info['bytes'] / (1 << 20):.0f} MiB ({t_gen:.1f}s)",
            file=sys.stderr,
        )
        t_cp_w = cp_a(live, base / "cp")
        t_w, w = timed(lambda: write_mirror(live, data, args.workers))
        t_scan, t_pass = no_change_scan(live, data)
        costs = manifest_costs(data)
        t_cp_r = cp_a(live, base / "cp")  # the plain tree, as today's data dir would hold it
        t_r, r = timed(lambda: read_mirror(data, back, args.workers))
        assert r["files"] == w["files"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        vol = count_files(data)
        rows = [
            ("packed first persist vs `cp -a` of the root", t_w, t_cp_w, f"{t_w / t_cp_w:.2f}x the time"),
            ("packed hydrate vs `cp -a` of a plain tree", t_r, t_cp_r, f"{t_cp_r / t_r:.2f}x the speed"),
        ]
        print(
            f"\nPacked mirror prototype: {w['files']} files, {info['bytes'] / (1 << 20):.0f} MiB, {args.workers} "
            f"workers, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}.\n"
        )
        print("| Measure | Ours | `cp -a` | Ratio |")
        print("|---|---|---|---|")
        for name, mine, cp, ratio in rows:
            print(f"| {name} | {mine:.2f}s | {cp:.2f}s | {ratio} |")
        print(
            f"\n- data dir files: {vol} ({w['packs']} packs, {w['loose']} large files, 1 manifest; "
            f"today: one per file)\n"
            f"- of the packed persist, the one syncfs took {w['sync']:.2f}s\n"
            f"- no-change pass: scan {t_scan * 1000:.0f} ms, scan + compare {t_pass * 1000:.0f} ms\n"
            f"- manifest: JSON (today's form) {costs['json_mib']:.1f} MiB, dump {costs['json_dump'] * 1000:.0f} ms, "
            f"strict load {costs['json_load'] * 1000:.0f} ms; compact {costs['compact_mib']:.1f} MiB, "
            f"load {costs['compact_load'] * 1000:.0f} ms\n"
            f"- peak RSS of this process (incl. JSON test): {rss:.0f} MiB"
        )
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
