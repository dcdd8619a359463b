"""Machine description and CPU accounting for the CPU benchmark: who used the CPUs during a phase.

The benchmark shares a small machine with whatever else runs there; a figure measured while other processes took CPU
is not this stack's figure. Each phase therefore records the machine's busy CPU time (/proc/stat) and the part of it
used by the processes under test (the server's process tree + this load generator, /proc/<pid>/stat); the rest is
"foreign" CPU, printed beside the figures and flagged when it exceeds 10% of the machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Iterable

HZ = os.sysconf("SC_CLK_TCK")


def machine_summary() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} × {cpu}, {mem_gib:.0f} GiB RAM, no GPU used, {platform.system()} {platform.release()}"


def _busy_s() -> float:
    f = open("/proc/stat").readline().split()[1:]
    vals = [int(x) for x in f]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / HZ


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [int(x) for x in out.split()]


def _tree(pids: Iterable[int]) -> set[int]:
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(_children(p))
    return seen


def _proc_cpu_s(pid: int) -> float:
    try:
        parts = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / HZ  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuMeter:
    """Start before a phase, stop after: machine busy CPU, ours (given trees + this process), foreign, as % of machine."""

    def __init__(self, roots: Iterable[int]):
        self.roots = list(roots) + [os.getpid()]

    def __enter__(self) -> "CpuMeter":
        self.pids = _tree(self.roots)
        self.ours0 = {p: _proc_cpu_s(p) for p in self.pids}
        self.busy0, self.t0 = _busy_s(), time.monotonic()
        t = os.times()
        self.waited0 = t.children_user + t.children_system  # children this process waited for (e.g. ceiling.py)
        return self

    def __exit__(self, *exc) -> None:
        busy, wall = _busy_s() - self.busy0, time.monotonic() - self.t0
        pids = self.pids | _tree(self.roots)
        ours = sum(_proc_cpu_s(p) - self.ours0.get(p, 0.0) for p in pids)
        t = os.times()
        ours += t.children_user + t.children_system - self.waited0
        cap = wall * (os.cpu_count() or 1)
        self.busy_pct = 100 * busy / cap if cap else 0.0
        self.ours_pct = 100 * ours / cap if cap else 0.0
        self.foreign_pct = max(0.0, self.busy_pct - self.ours_pct)

    def note(self) -> str:
        flag = " — NOISY: other processes used the CPUs, figures are low" if self.foreign_pct > 10 else ""
        return f"CPU busy {self.busy_pct:.0f}% (under test {self.ours_pct:.0f}%, other processes {self.foreign_pct:.0f}%){flag}"


def boost(pids: Iterable[int], nice: int) -> None:
    """Gives the processes (and their descendants) priority `nice` against the rest of the machine.

    Linux's autogroup scheduling (kernel.sched_autogroup_enabled=1, as here) shares the CPUs fairly between *sessions*
    first, so a process's own nice value counts only inside its session, and every server we start with a new session
    (setsid) gets a group of its own. The priority that counts against other sessions is the group's:
    /proc/<pid>/autogroup (root may lower it). Best effort; silently does nothing where not permitted.
    """
    if not nice:
        return
    for pid in _tree(pids):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError:
            pass
        try:
            with open(f"/proc/{pid}/autogroup", "w") as fh:
                fh.write(str(nice))
        except OSError:
            pass


def foreign_load(seconds: float = 3.0) -> float:
    """% of the machine's CPU used by everything except this process over `seconds`."""
    with CpuMeter([]) as m:
        time.sleep(seconds)
    return m.foreign_pct


def wait_idle(max_wait_s: float, threshold_pct: float = 15.0, log=print) -> float:
    """Waits (up to max_wait_s) for other processes to use < threshold_pct of the CPUs; returns the last reading."""
    t0 = time.monotonic()
    load = foreign_load()
    while load > threshold_pct and time.monotonic() - t0 < max_wait_s:
        log(f"other processes use {load:.0f}% of the CPUs; waiting for a quiet machine "
            f"({max_wait_s - (time.monotonic() - t0):.0f} s left)…")
        time.sleep(10)
        load = foreign_load()
    return load
