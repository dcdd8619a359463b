"""Admission under a burst (issue 17 item 2): N clients start at once against the whole stack, stand-in engine.

Starts a private stack (bench/cpu/stack_up.mjs: redis-server, one worker with ENGINE=standin and MAX_BATCH above N, the
gateway), sends one streaming chat completion per client, all N at the same moment (bench/loadgen.py, ramp 0), and
prints:
- TTFT p50/p99 and errors as the clients saw them (the target: ≤ 1 s / ≤ 3 s, 0 errors at 1,000 clients);
- where a request's time to first token went, p50/p99 per stage (the gateway's hot-path stamps joined with the worker's
  timestamps, loadgen.summarize): client → route, prepare, admission, enqueue, pick-up (Queue.add answered → the
  worker runs the job), the worker's own TTFT, pub/sub, SSE write, → client;
- each process's CPU over the burst (cores: CPU seconds / wall seconds): redis-server, gateway, worker, the load
  generator itself — on 2 cores the client competes with the stack, and a client above ~0.9 core is the limit;
- Redis calls per request (INFO commandstats: EVALSHA = BullMQ's Lua scripts, the worker's moveToActive among them);
- the 1-minute load average before and after (above 2 the figures are noisy on this 2-core machine).

Usage: bench/.venv/bin/python bench/cpu/admission_burst.py [--clients 1000] [--tokens 100] [--step-ms 20] [--json F]
(bench/cpu/ensure_bench_venv.sh makes bench/.venv). One burst per --runs; each run restarts nothing, so later runs
find a warm stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench_paths import OUT

import loadgen  # noqa: E402
from machine import machine_summary  # noqa: E402
from run_all import MODEL_ID, Stack  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        parts = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        todo.extend(int(k) for k in kids)
    return out


def role(pid: int) -> str:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "redis-server" in cmd:
        return "redis"
    if "llm_worker" in cmd or "standin_worker" in cmd:
        return "worker"
    if "stack_up.mjs" in cmd:
        return "stack_up"
    if "node" in cmd or "tsx" in cmd or "main.ts" in cmd:
        return "gateway"
    return "other"


def redis_stats(url: str) -> dict[str, int]:
    import redis

    cli = redis.Redis.from_url(url)
    stats = cli.info("commandstats")
    cli.close()
    return {k[len("cmdstat_"):]: int(v.get("calls", 0)) for k, v in stats.items()}


def load1() -> float:
    return os.getloadavg()[0]


def burst(info: dict[str, Any], stack_pid: int, a) -> dict[str, Any]:
    pids = {p: role(p) for p in tree(stack_pid)}
    me = os.getpid()
    cpu0 = {p: cpu_s(p) for p in pids}
    me0, rs0, load_before = cpu_s(me), redis_stats(info["redisUrl"]), load1()
    t_wall = time.monotonic()
    reqs, t0, t1 = asyncio.run(loadgen.run_load(info["baseUrl"], flavor="ours", concurrency=a.clients,
                                                requests=a.clients, max_tokens=a.tokens, model=MODEL_ID, api_key=info["apiKey"],
                                                warmup=1, ramp_s=0.0))
    wall = time.monotonic() - t_wall
    cores: dict[str, float] = {}
    for p, r in pids.items():
        cores[r] = cores.get(r, 0.0) + (cpu_s(p) - cpu0[p]) / wall
    cores["loadgen"] = (cpu_s(me) - me0) / wall
    rs1 = redis_stats(info["redisUrl"])
    calls = {k: rs1.get(k, 0) - rs0.get(k, 0) for k in rs1}
    slots = loadgen.fetch_worker_timing(info["redisUrl"], "gen." + MODEL_ID, reqs)
    time.sleep(0.5)  # the gateway's last "finished" log lines
    loadgen.fetch_gateway_stamps(info["gatewayLog"], reqs)
    s = loadgen.summarize(reqs, t0, t1, slots)
    return {"summary": s, "cores": cores, "wall_s": wall, "redis_calls": calls, "load_before": load_before,
            "load_after": load1()}


def report(run: dict[str, Any], a) -> str:
    s, n = run["summary"], a.clients

    def ms(k: str) -> str:
        v = s.get(k)
        return "—" if v is None else f"{v:,.0f}"

    ok = (s["errors"] == 0 and (s["ttft_p50_ms"] or 1e9) <= 1000 and (s["ttft_p99_ms"] or 1e9) <= 3000)
    lines = [
        f"{n} clients at once × {a.tokens} tokens: TTFT p50 {ms('ttft_p50_ms')} ms, p99 {ms('ttft_p99_ms')} ms, "
        f"errors {s['errors']} (target p50 ≤ 1,000, p99 ≤ 3,000, 0 errors → {'met' if ok else 'NOT met'})",
        f"  {s['tok_per_s']:,.0f} tok/s over {s['wall_s']:.1f} s; first error: {s['first_error']}",
        "  stages p50/p99 ms: " + ", ".join(
            f"{label} {ms(f'stage_{k}_p50_ms')}/{ms(f'stage_{k}_p99_ms')}" for k, label in loadgen.STAGE_PARTS.items()),
        f"  enqueue → pick-up p50/p99 {ms('enqueue_to_pickup_p50_ms')}/{ms('enqueue_to_pickup_p99_ms')} ms, "
        f"worker TTFT {ms('worker_ttft_p50_ms')}/{ms('worker_ttft_p99_ms')} ms, queue wait (no free slot) "
        f"{ms('queue_wait_p99_ms')} ms p99 (stages joined for {s.get('stages_n', 0)} of {n})",
        "  CPU (cores over the burst): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(run["cores"].items())
                                                     if k != "stack_up"),
        f"  Redis calls per request: EVALSHA {run['redis_calls'].get('evalsha', 0) / (n + 1):.1f}, all "
        f"{sum(run['redis_calls'].values()) / (n + 1):.1f}",
        f"  load average (1 min) {run['load_before']:.2f} before, {run['load_after']:.2f} after"
        + (" — noisy" if max(run["load_before"], run["load_after"]) > 2 else ""),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=100, help="output tokens per request")
    ap.add_argument("--step-ms", type=float, default=20.0, help="stand-in engine: ms per token per stream")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", help="write the runs' summaries here")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    print(f"[admission] machine: {machine_summary()}", flush=True)
    # MAX_BATCH tops out at 1024 (config.py): room for 1,000 clients and the warm-up request.
    env = {"ENGINE": "standin", "MAX_BATCH": str(min(1024, a.clients + 24)), "STANDIN_STEP_MS": f"{a.step_ms:g}"}
    st = Stack("admission", env)
    runs = []
    try:
        info = st.wait(600)
        print(f"[admission] stack up in {info['readySeconds']:.1f} s ({env})", flush=True)
        for i in range(a.runs):
            run = burst(info, st.proc.pid, a)
            runs.append(run)
            print(report(run, a), flush=True)
    finally:
        st.stop()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump([{k: v for k, v in r.items()} for r in runs], fh, indent=1)
    sys.exit(0 if runs else 1)


if __name__ == "__main__":
    main()
