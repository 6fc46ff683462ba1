"""scripts/bench_scale.py: the monorepo generator has a real source tree's shape, and bad arguments exit 2."""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
from pathlib import Path

from scripts.bench_scale import MONOREPO, count_files, make_monorepo, make_scaled_root

ROOT = Path(__file__).resolve().parent.parent


def test_monorepo_has_source_sizes_a_packed_git_and_distinct_files(tmp_path: Path) -> None:
    info = make_monorepo(tmp_path, 2000, seed=3)
    repo = tmp_path / MONOREPO
    sources = [p for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert len(sources) == 2000
    sizes = [p.stat().st_size for p in sources]
    assert 2048 <= statistics.median(sizes) <= 4096  # like real source: a few KiB...
    assert sum(s > 30 * 1024 for s in sizes) >= 20  # ...with a long tail
    packs = list((repo / ".git/objects/pack").glob("pack-*.pack"))
    assert len(packs) == 1 and packs[0].stat().st_size > 0.2 * sum(sizes)
    assert (repo / ".git/HEAD").read_bytes().startswith(b"ref: ")
    assert (
        len({hashlib.sha256(p.read_bytes()).digest() for p in sources}) == 2000
    )  # the store would dedup copies
    assert info["files"] == count_files(repo)


def test_scaled_root_reaches_the_file_count(tmp_path: Path) -> None:
    info = make_scaled_root(tmp_path / "root", size_mb=2, files=1500, seed=1)
    assert info["files"] == 1500
    assert (tmp_path / "root/ee/db.sqlite").is_file() and (tmp_path / "root/index/meta.json").is_file()


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_scale.py"), "--repeat", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
