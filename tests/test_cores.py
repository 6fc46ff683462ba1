"""Sizing the copy pools by the cores the process may use: a cgroup CPU quota (Modal's `cpu=`) wins over the host's
count."""

from __future__ import annotations

import os
from pathlib import Path

from shared.state.cores import available_cores, copy_workers


def test_the_cgroup_quota_bounds_the_cores(tmp_path: Path) -> None:
    mask = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == mask
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cpu=1.5
    assert available_cores(tmp_path) == min(mask, 2)
    (tmp_path / "cpu.max").write_text("25000 100000\n")  # cpu=0.25
    assert available_cores(tmp_path) == 1
    assert copy_workers(tmp_path) == 4


def test_cgroup_v1_and_no_cgroup(tmp_path: Path) -> None:
    mask = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path / "missing") == mask
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    assert available_cores(tmp_path) == mask
    assert copy_workers(tmp_path) == min(32, max(4, 2 * mask))
