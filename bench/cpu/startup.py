"""Start-up time of the whole stack on the bundled model: `npm start` (Redis, worker, gateway) from process start to
its READY line, first with an empty converted-weights cache (the GGUF is read and dequantised, then cached) and then
again with the entry in place (issue 14, target: ≤ 10 s for the second and later starts on a 2-core machine).

    bench/.venv/bin/python bench/cpu/startup.py [--runs 2] [--results-md]
    (any python with the standard library works: worker-py/.venv/bin/python bench/cpu/startup.py)

Each run starts `node scripts/start.mjs` on a free port with WEIGHTS_CACHE_DIR pointing at a fresh temporary directory
(the first run) or at the one the first run filled (the later runs), reads the worker's own step timings from its log,
then stops the stack. The CPU time other processes used meanwhile is printed: a loaded machine starts slower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_summary  # noqa: E402

READY = re.compile(r"READY: .*\(([\d.]+) s after start\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_busy() -> float:
    vals = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def one_start(cache_dir: str, timeout_s: float) -> dict:
    # METRICS_PORT 0: a worker of another stack on this machine may hold the default port.
    env = {**os.environ, "PORT": str(free_port()), "WEIGHTS_CACHE_DIR": cache_dir, "LOG_LEVEL": "info", "METRICS_PORT": "0"}
    started, busy0 = time.monotonic(), cpu_busy()
    proc = subprocess.Popen(["node", "scripts/start.mjs"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    steps: dict[str, float] = {}
    ready_s = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"no READY within {timeout_s} s")
            m = READY.search(line)
            if m:
                ready_s = float(m.group(1))
            if ready_s is not None and "worker: ready (registered)" in steps:
                # Both: npm start's Redis keeps its data, so right after a previous run the gateway can see that run's
                # worker registration (still inside its TTL) and print READY before this run's worker is up.
                ready_s = max(ready_s, steps["worker: ready (registered)"])
                break
            if line.startswith("[worker] {"):
                try:
                    rec = json.loads(line[len("[worker] "):])
                except ValueError:
                    continue
                t = time.monotonic() - started
                msg = rec.get("msg", "")
                for key, name in (("loading model", "worker: loading model"), ("tokenizer loaded", "worker: tokenizer (GGUF)"),
                                  ("weights loaded", "worker: weights (GGUF)"),
                                  ("converted weights cached", "worker: cache entry written"),
                                  ("loaded converted weights", "worker: weights + tokenizer from the cache"),
                                  ("model loaded", "worker: model loaded"), ("grammar compiler ready", "worker: grammar compiler"),
                                  ("worker ready", "worker: ready (registered)")):
                    if msg.startswith(key):
                        steps[name] = round(t, 2)
                if ready_s is not None and "worker: ready (registered)" in steps:
                    ready_s = max(ready_s, steps["worker: ready (registered)"])
                    break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    wall = time.monotonic() - started
    return {"ready_s": ready_s, "steps": steps, "other_cpu_s": round(cpu_busy() - busy0, 1), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="starts: the first with an empty cache, the rest warm")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--results-md", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args()
    machine = machine_summary()
    flags = open("/proc/cpuinfo").read()
    bf16 = "avx512_bf16" in flags
    print(f"machine: {machine}; AVX512-BF16: {'yes' if bf16 else 'no'}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-cache-") as cache:
        for i in range(args.runs):
            r = one_start(cache, args.timeout)
            r["run"] = "first (empty cache)" if i == 0 else f"warm #{i}"
            rows.append(r)
            print(f"{r['run']:>20}: READY after {r['ready_s']} s   (busy CPU of the machine meanwhile: "
                  f"{r['other_cpu_s']} s)")
            for name, t in r["steps"].items():
                print(f"{'':>22}{t:7.2f} s  {name}")
    warm = [r["ready_s"] for r in rows[1:] if r["ready_s"] is not None]
    verdict = "met" if warm and max(warm) <= 10 else "NOT met"
    print(f"target: second and later starts ≤ 10 s to READY: {verdict} ({warm})")
    if args.results_md:
        cmd = "python bench/cpu/startup.py " + " ".join(sys.argv[1:])
        lines = [f"\n## Start-up, {datetime.date.today()} ({machine}; AVX512-BF16: {'yes' if bf16 else 'no'})\n",
                 f"Command: `{cmd}`. `npm start` → READY, bundled model, worker DTYPE=auto.\n",
                 "| start | READY (s) | machine busy CPU meanwhile (s) | steps (s after start) |", "|---|---|---|---|"]
        for r in rows:
            steps = "; ".join(f"{k} {v}" for k, v in r["steps"].items())
            lines.append(f"| {r['run']} | {r['ready_s']} | {r['other_cpu_s']} | {steps} |")
        lines.append(f"\nTarget (≤ 10 s for warm starts): {verdict}.\n")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
