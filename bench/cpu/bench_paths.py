"""Where the CPU benchmark's scripts live and find things.

Every script here runs as ``python bench/cpu/<script>.py``, which puts only bench/cpu on sys.path; importing this
module adds bench/ (loadgen, bench_model) and the worker's package (worker-py/src, not installed in bench/.venv).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out")
WORKER_SRC = os.path.join(ROOT, "worker-py", "src")

for _path in (WORKER_SRC, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)
