"""How many CPUs this process may really use: the default for the CPU engine's torch threads.

``os.cpu_count()`` (torch's own default too) counts the machine's CPUs, not the process's: in a container limited to
2 CPUs on a 64-core node it says 64, and 64 torch threads sharing 2 CPUs' worth of time mostly wait for each other at
the end of every op (and the container is throttled by the kernel for using its quota in bursts). So: the affinity
mask (``taskset``, cpusets), capped by the cgroup CPU quota (a Kubernetes or Docker CPU limit, rounded up).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of time per period, or None when unlimited or unknown. cgroup v2 (``cpu.max``: "200000 100000" or
    "max 100000"), else cgroup v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 = unlimited)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
