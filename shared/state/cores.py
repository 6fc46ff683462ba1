"""How many cores this process may use, for sizing the copy pools of persist, hydrate and restore.

`os.cpu_count()` is the host's count: in a Modal container (`cpu=` sets a CFS quota, not an affinity mask) it can
say 64 when the container may use 2. The quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) and the affinity mask
both bound it; the smallest wins, at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu/cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cores(root: Path = CGROUP) -> int:
    """Cores this process may run on at once: min(affinity mask, cgroup CPU quota rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _quota(root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def copy_workers(root: Path = CGROUP) -> int:
    """Threads for copying many files: two per core (a thread waits on the disk or a directory lock as often as it
    computes; sha256 and file I/O release the GIL), at least 4, at most 32."""
    return min(32, max(4, 2 * available_cores(root)))
