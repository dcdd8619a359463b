"""usable_cpus: the affinity mask capped by a container's CPU quota (cgroup v2 and v1 files in a temporary root)."""

from __future__ import annotations

import os

from llm_worker.engine.cpus import usable_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_no_cgroup_files_means_the_affinity_mask(tmp_path):
    assert usable_cpus(str(tmp_path)) == affinity()


def test_cgroup_v2_quota_caps_and_rounds_up(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cpus(str(tmp_path)) == min(affinity(), 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path)) == affinity()


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(str(tmp_path)) == affinity()
