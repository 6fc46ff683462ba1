"""Time the change journal (`shared.state.mirror.journal.LiveTree`) against `scan()` on a generated root, and print
a markdown table (issue 19: a no-change persist under 300 ms at 200,000 files).

    .venv/bin/python scripts/bench_journal.py                 # 20,000 and 200,000 files
    .venv/bin/python scripts/bench_journal.py --files 5000    # one size

Per size: `scan()` of the root (best of 3), the journal's first `nodes()` (full scan + one watch per directory), a
`nodes()` with nothing changed (median of 200), and one with one file changed since the last call (an append;
median of 50), plus the watch count and this process's peak RSS. Roots come from `scripts/bench_scale.py`
(`make_scaled_root`: a Tabby root plus a monorepo working tree), in a temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_scale import MONOREPO, make_scaled_root
from shared.state.mirror import LiveTree, scan


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def measure(root: Path) -> dict[str, float | int]:
    scans = []
    for _ in range(3):
        t = time.perf_counter()
        n = len(scan(root))
        scans.append(time.perf_counter() - t)
    with LiveTree(root) as tree:
        t = time.perf_counter()
        nodes, _ = tree.nodes()
        first = time.perf_counter() - t
        assert len(nodes) == n
        idle = []
        for _ in range(200):
            t = time.perf_counter()
            _, changed = tree.nodes()
            idle.append(time.perf_counter() - t)
            assert not changed
        target = next(root.joinpath(MONOREPO).rglob("*.py"))
        one = []
        for _ in range(50):
            with open(target, "ab") as f:
                f.write(b"#\n")
            t = time.perf_counter()
            _, changed = tree.nodes()
            one.append(time.perf_counter() - t)
            assert changed
        assert tree.nodes()[0] == scan(root)
        watches = tree.stats["watches"]
    return {
        "files": n,
        "scan": min(scans),
        "first": first,
        "idle": statistics.median(idle),
        "idle_max": max(idle),
        "one": statistics.median(one),
        "watches": watches,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--files", type=int, action="append", help="Files in the root (repeatable; 20000 and 200000)."
    )
    args = ap.parse_args()
    sizes = args.files or [20_000, 200_000]
    if any(n < 100 for n in sizes):
        print("error: --files needs >= 100", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="tabby-modal-bench-journal-"))
    rows = []
    try:
        for n in sizes:
            root = base / f"root-{n}"
            t = time.perf_counter()
            make_scaled_root(root, size_mb=8, files=n, seed=1)
            print(f"made a {n}-file root in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
            rows.append(measure(root))
            shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        "| Files | scan() | first nodes() (scan + watches) | nodes(), nothing changed (max) | nodes(), one file "
        "changed | Watches |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['files']} | {ms(r['scan'])} | {ms(r['first'])} | {ms(r['idle'])} ({ms(r['idle_max'])}) "
            f"| {ms(r['one'])} | {r['watches']} |"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nPeak RSS of this process: {rss / 1024:.0f} MiB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
