"""A/B of the stack's TTFT overhead (stand-in engine): an older revision against the working tree, runs interleaved.

    bench/.venv/bin/python bench/cpu/overhead_ab.py --before 512d640 [--reps 3] [--levels 16,200] [--ramp-s 2]

On a shared machine a single run says little: this starts one stand-in stack per run (bench/cpu/stack_up.mjs of
each side, ENGINE=standin, MAX_BATCH 256, STANDIN_STEP_MS 20), alternating before / after, measures every level with
the same load generator (this checkout's bench/loadgen.py, so both sides are measured the same way) and prints the
median of each figure over the runs, with each run's value. The older revision is unpacked with `git archive` into
bench/out/ab-<rev>/ (node_modules and worker-py/.venv are linked from this checkout; its worker code is put first on
PYTHONPATH). Side by side figures only; nothing is written to RESULTS.md. The per-request data of every run goes to
bench/out/overhead-ab-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import time

from bench_paths import OUT, ROOT

import loadgen  # noqa: E402
from machine import CpuMeter, boost, machine_summary  # noqa: E402

MODEL_ID = "smollm2-135m-instruct"


def checkout(rev: str) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = os.path.join(OUT, f"ab-{sha}")
    if not os.path.exists(os.path.join(tree, "package.json")):
        os.makedirs(tree, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", sha], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tree], stdin=archive.stdout, check=True)
        archive.wait()
        os.symlink(os.path.join(ROOT, "node_modules"), os.path.join(tree, "node_modules"))
        os.symlink(os.path.join(ROOT, "worker-py", ".venv"), os.path.join(tree, "worker-py", ".venv"))
    return tree


def run_side(tree: str, levels: list[int], rounds: int, ramp_s: float, nice: int) -> dict:
    env = {**os.environ, "ENGINE": "standin", "MAX_BATCH": str(max(levels + [16]) + 56), "STANDIN_STEP_MS": "20",
           "PYTHONPATH": os.path.join(tree, "worker-py", "src")}
    with open(os.path.join(OUT, "overhead-ab.stack.log"), "a") as err:
        proc = subprocess.Popen(["node", os.path.join(tree, "bench/cpu/stack_up.mjs")], cwd=tree, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        info = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("STACK "):
                info = json.loads(line[6:])
                break
        if info is None:
            raise RuntimeError(f"the stack of {tree} did not start; see bench/out/overhead-ab.stack.log")
        boost([proc.pid], nice)
        out = {}
        try:
            for c in levels:
                with CpuMeter([proc.pid]) as cpu:
                    reqs, t0, t1 = asyncio.run(loadgen.run_load(info["baseUrl"], flavor="ours", concurrency=c,
                                                                requests=c * rounds, max_tokens=100, model=MODEL_ID,
                                                                api_key=info["apiKey"], ramp_s=ramp_s))
                slots = loadgen.fetch_worker_timing(info["redisUrl"], "gen." + MODEL_ID, reqs)
                time.sleep(0.5)
                loadgen.fetch_gateway_stamps(info["gatewayLog"], reqs)
                s = loadgen.summarize(reqs, t0, t1, slots)
                s["cpu"] = cpu.note()
                out[c] = s
                print(f"  [{os.path.relpath(tree, ROOT) or '.'}] {c} streams: {loadgen.fmt(s)}\n    {cpu.note()}",
                      flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--levels", default="16,200")
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream at each level")
    ap.add_argument("--ramp-s", type=float, default=2.0, help="clients start over this many seconds (0: all at once)")
    ap.add_argument("--nice", type=int, default=-10, help="priority of the load and the stacks (as bench/cpu/run.sh)")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if a.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, a.nice)
        except PermissionError:
            a.nice = 0
        boost([os.getpid()], a.nice)
    levels = [int(x) for x in a.levels.split(",")]
    sides = {"before": checkout(a.before), "after": ROOT}
    print(f"machine: {machine_summary()}; before = {a.before}, after = working tree; levels {levels}, "
          f"ramp {a.ramp_s:g} s, {a.reps} runs each, interleaved", flush=True)
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(a.reps):
        for name, tree in sides.items():
            print(f"run {i + 1}/{a.reps}: {name}", flush=True)
            runs[name].append(run_side(tree, levels, a.rounds, a.ramp_s, a.nice))
    print("\nmedian over the runs (each run's value in brackets), ms:")
    for c in levels:
        for name in sides:
            def fig(key: str) -> str:
                xs = [r[c].get(key) for r in runs[name] if r[c].get(key) is not None]
                if not xs:
                    return "—"
                return f"{statistics.median(xs):.1f} [{', '.join(f'{x:.1f}' for x in xs)}]"
            print(f"  {c:>3} streams, {name:>6}: overhead p50 {fig('overhead_p50_ms')}, p99 {fig('overhead_p99_ms')}; "
                  f"TTFT p50 {fig('ttft_p50_ms')}; queue wait p99 {fig('queue_wait_p99_ms')}; "
                  f"worker TTFT p50 {fig('worker_ttft_p50_ms')}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(OUT, f"overhead-ab-{stamp}.json"), "w") as fh:
        json.dump({"before": a.before, "levels": levels, "ramp_s": a.ramp_s,
                   "runs": {k: [{str(c): s for c, s in r.items()} for r in v] for k, v in runs.items()}}, fh, indent=2)


if __name__ == "__main__":
    main()
