"""Benchmark the server's shutdown (Modal's exit hook) against its budget, on a generated 1 GiB Tabby-like root.

    .venv/bin/python scripts/bench_stop.py               # ~1 GiB root, ~10k index files
    .venv/bin/python scripts/bench_stop.py --size-mb 64  # a quick run

Modal gives `@modal.exit` about 30 s (fixed for classes); the server's stop must fit in TABBY_MODAL_EXIT_BUDGET
(25 s) and leave Modal its own Volume commit. Each row runs the real `TabbyServer.stop()` (shared/serving/server.py)
with the stand-in Tabby (tests/standin_tabby.py, with its llama-server child) on a root hydrated from the data dir,
after a change of the given size since the last persist:

- nothing changed;
- typical: a few hundred database rows, event lines and two small index commits (what 30 s of use leaves);
- large: the whole index rewritten (a merge: ~65% of the root in new segment files, the old ones deleted) plus
  database rows;
- the large change with a Tabby that ignores SIGTERM (it is killed at TABBY_MODAL_STOP_GRACE).

Figures are local disk (page cache, fsync); a Modal Volume's write speed is not measured here. Goals, not
assertions: exit 0 either way (2 on bad arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.doubles import change_root, free_port, make_root, standin_bin
from shared.serving.server import TabbyServer
from shared.settings import load_settings
from shared.state import mirror


class Phases(logging.Handler):
    """Collects the stop's phase lines (`stop: ...`) and their durations."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def seconds(self, prefix: str) -> str:
        for line in self.lines:
            if line.startswith(prefix) and "(" in line:
                return line.rsplit("(", 1)[1].split(")")[0]
        return "-"


def one_stop(base: Path, data: Path, change: str | None, *, ignore_term: bool, seed: int) -> dict[str, str]:
    live = base / "live"
    shutil.rmtree(live, ignore_errors=True)
    settings = load_settings(
        env_file=None,
        internal_port=free_port(),
        model_cache=str(base / "no-models"),
        device="cpu",
        persist_interval=3600,
        startup_timeout=120,
    )
    os.environ["STANDIN_CHILD"] = "1"
    os.environ["STANDIN_IGNORE_TERM"] = "1" if ignore_term else "0"
    os.environ["STANDIN_CHILD_PIDFILE"] = str(base / "child.pid")
    server = TabbyServer(
        settings,
        data_dir=data,
        live_root=live,
        tabby_bin=str(standin_bin(base / "bin")),
        jwt_secret=str(uuid.uuid4()),
        commit=lambda: None,
    )
    if not server.start():
        raise SystemExit(f"error: the server did not start: {server.reason}")
    server.persist_now()  # the last periodic persist: the change below is all the final persist has to copy
    changed = mirror.scan(live)
    if change is not None:
        change_root(live, change, seed)
    after = mirror.scan(live)
    new_bytes = sum(n.size for p, n in after.items() if changed.get(p) != n)
    phases = Phases()
    log = logging.getLogger("tabby_modal")
    log.addHandler(phases)
    log.setLevel(logging.INFO)
    try:
        began = time.perf_counter()
        result = server.stop()
        took = time.perf_counter() - began
    finally:
        log.removeHandler(phases)
    return {
        "changed": f"{new_bytes / (1 << 20):.0f} MiB" if new_bytes >= 1 << 20 else f"{new_bytes >> 10} KiB",
        "tabby": phases.seconds("stop: tabby stopped"),
        "persist": phases.seconds("stop: final persist"),
        "total": f"{took:.2f}s",
        "seconds": took,
        "files": str(result["changed"]) if result else "aborted",
        "budget": settings.exit_budget,
        "grace": settings.stop_grace,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024, help="Size of the generated root (default 1024).")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.size_mb <= 0:
        print("error: --size-mb must be positive", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="tabby-modal-bench-stop-"))
    try:
        return bench(base, args.size_mb, args.seed)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench(base: Path, size_mb: float, seed: int) -> int:
    seed_root, data = base / "seed", base / "data"
    print(f"generating a {size_mb:.0f} MiB Tabby-like root in {base} ...", file=sys.stderr)
    info = make_root(seed_root, size_mb=size_mb, seed=seed, models=False)
    (seed_root / "config.toml").unlink()  # the stand-in gets the models from our flags
    mirror.persist(seed_root, data)
    shutil.rmtree(seed_root)
    rows = [
        ("nothing changed", None, False),
        ("typical (30 s of use)", "typical", False),
        ("large (index rewritten)", "large", False),
        ("large, Tabby ignores SIGTERM", "large", True),
    ]
    results = []
    for i, (name, change, ignore) in enumerate(rows):
        print(f"  {name} ...", file=sys.stderr)
        # A seed per row: a rerun of the same change would write segments that already exist.
        results.append((name, one_stop(base, data, change, ignore_term=ignore, seed=seed * 100 + i)))
    budget = results[0][1]["budget"]
    print(
        f"\nServer stop (Modal's exit hook) on a {info['bytes'] / (1 << 20):.0f} MiB root with "
        f"{info['index_files']} index files; budget {budget:g}s (TABBY_MODAL_EXIT_BUDGET), SIGTERM grace "
        f"{results[0][1]['grace']:g}s ({os.cpu_count()} CPUs, local disk).\n"
    )
    print(
        "| Change since the last persist | Changed | Stop Tabby | Final persist | Whole stop | Budget | Met |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results:
        met = "met" if r["seconds"] <= budget else "not met"
        print(
            f"| {name} | {r['changed']} | {r['tabby']} | {r['persist']} | {r['total']} | {budget:g}s | {met} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
