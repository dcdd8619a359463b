"""LLM serving worker: BullMQ jobs in, tokens out over Redis pub/sub (docs/PROTOCOL.md)."""

import os

# libgomp (torch's CPU threads) reads this once, when torch loads: set here, on the package's first import, so the
# worker (``python -m llm_worker``) and the tests have it before anything loads torch. 1,000 spins before an idle
# OpenMP thread sleeps instead of 300,000: with the default, a worker sharing its cores (a second worker, the
# gateway, any busy process) decoded at 68 tok/s instead of 144 beside one busy process, and the fault tests' extra
# workers stalled requests for 10 s and more; on a quiet machine 1,000 costs nothing measurable (bench/RESULTS.md,
# 2026-11-26). See model.keep_main_thread_serial for the other half.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"
