"""Does one worker's transport keep up with a GPU-rate engine? (issue 17 item 1) — no gateway in the way.

Starts a private redis-server and one worker (`python -m llm_worker`, ENGINE=standin, STANDIN_STEP_MS=40 → 25 tok/s
per sequence, MAX_BATCH=512: ~12,800 tok/s, the H100 engine-alone figure), adds N jobs at once with BullMQ (as the
gateway does), and PSUBSCRIBEs ``llm:job:*`` itself to count every published token. Prints:
- delivered tok/s over the steady window (every job running) against the engine's rate (jobs × 1000 / step_ms);
- on time: a job's k-th token is due at its first delta's ts_ms + k × step; a token is on time if the worker stamped
  the delta carrying it (ts_ms, taken as the message is built for PUBLISH) within ``--late-ms`` of that — the worker's
  clock, so this subscriber's own lag does not count; a transport that falls behind the engine shows as late tokens;
- the worker process's CPU (utime+stime from /proc, engine thread included — the stand-in's is small) per 1,000 tokens.
``--profile`` runs the worker under py-spy (bench venv: pip install py-spy) and writes a top-functions summary.

Usage: worker-py/.venv/bin/python bench/cpu/transport_rate.py [--jobs 512] [--tokens 250] [--step-ms 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import redis.asyncio as aioredis
from bullmq import Queue

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = os.path.join(ROOT, "worker-py", ".venv", "bin", "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_worker(r) -> str:
    for _ in range(1200):
        ids = await r.zrange("llm:workers", 0, -1)
        if ids:
            info = json.loads(await r.get(f"llm:worker:{ids[0]}") or "{}")
            if info.get("queue"):
                return info["queue"]
        await asyncio.sleep(0.1)
    raise SystemExit("worker did not register")


async def bench(args, url: str, worker_pid: int) -> dict:
    r = aioredis.from_url(url, decode_responses=True)
    queue_name = await wait_worker(r)
    sub = aioredis.from_url(url, decode_responses=True)
    ps = sub.pubsub()
    await ps.psubscribe("llm:job:*")
    q = Queue(queue_name, {"connection": url})
    step = args.step_ms / 1000
    first: dict[str, float] = {}
    got: dict[str, int] = {}
    done: set[str] = set()
    late = on_time = 0
    arrivals: list[tuple[float, int]] = []
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(args.jobs)]
    data = {"v": 1, "model": "m", "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "params": {"max_tokens": args.tokens}, "stream": True, "prompt_tokens": 0, "deadline_ms": None}
    t_add = time.time()
    for jid in ids:
        await q.add("chat", {**data, "request_id": jid[-8:], "enqueued_at_ms": int(time.time() * 1000)},
                    {"jobId": jid, "attempts": 1, "removeOnComplete": True, "removeOnFail": True})
    cpu0 = cpu_s(worker_pid)
    deadline = time.time() + args.tokens * step * 3 + 60
    while len(done) < args.jobs and time.time() < deadline:
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if msg is None:
            continue
        jid = msg["channel"][len("llm:job:"):]
        ev = json.loads(msg["data"])
        if ev["type"] == "delta":
            # The worker's own stamp (taken as the message is built, just before PUBLISH): how late the *transport*
            # is, whatever this subscriber's own lag (it shares the 2 cores).
            now = ev["ts_ms"] / 1000
            n = sum(c["tokens"] for c in ev["choices"])
            k0 = got.get(jid, 0)
            if jid not in first:
                first[jid] = now
            for k in range(k0, k0 + n):
                if now <= first[jid] + k * step + args.late_ms / 1000:
                    on_time += 1
                else:
                    late += 1
            got[jid] = k0 + n
            arrivals.append((now, n))
        elif ev["type"] in ("done", "error"):
            done.add(jid)
    t_end = time.time()
    cpu1 = cpu_s(worker_pid)
    # Steady window: from the last job's first token to the first job's end (every job running).
    starts = sorted(first.values())
    ends = t_end if not starts else None
    win_lo = starts[-1] if starts else t_add
    win_hi = min(first.values()) + args.tokens * step if first else t_end
    win_tok = sum(n for t, n in arrivals if win_lo <= t <= win_hi)
    total = sum(got.values())
    await ps.aclose()
    await q.close()
    await sub.aclose()
    await r.aclose()
    return {"jobs": args.jobs, "tokens_per_job": args.tokens, "step_ms": args.step_ms,
            "engine_rate_tok_s": args.jobs * 1000 / args.step_ms, "jobs_done": len(done),
            "tokens_received": total, "tokens_expected": args.jobs * args.tokens,
            "steady_window_s": round(win_hi - win_lo, 2),
            "steady_tok_s": round(win_tok / (win_hi - win_lo), 1) if win_hi > win_lo else None,
            "first_token_spread_s": round(starts[-1] - starts[0], 2) if starts else None,
            "on_time_pct": round(100 * on_time / max(1, on_time + late), 2), "late_ms": args.late_ms,
            "wall_s": round(t_end - t_add, 2), "worker_cpu_s": round(cpu1 - cpu0, 2),
            "worker_cpu_ms_per_1k_tokens": round(1e6 * (cpu1 - cpu0) / max(1, total), 1),
            "worker_cores": round((cpu1 - cpu0) / (t_end - t_add), 2), "unused": ends}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--step-ms", type=float, default=40)
    ap.add_argument("--late-ms", type=float, default=250)
    ap.add_argument("--flush-ms", type=int, default=15)
    ap.add_argument("--profile", metavar="OUT", help="py-spy record the worker into OUT (raw/collapsed format)")
    args = ap.parse_args()
    port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    for _ in range(100):  # redis-server listening
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    env = {**os.environ, "REDIS_URL": url, "ENGINE": "standin", "STANDIN_STEP_MS": str(args.step_ms),
           "MAX_BATCH": str(args.jobs), "METRICS_PORT": "0", "WORKER_ID": f"w-bench-{port}",
           "STREAM_FLUSH_MS": str(args.flush_ms), "LOG_LEVEL": "warning"}
    cmd = [PY, "-m", "llm_worker"]
    worker = subprocess.Popen(cmd, env=env, cwd=os.path.join(ROOT, "worker-py"), stderr=subprocess.DEVNULL)
    try:
        pid = worker.pid
        spy = None
        if args.profile:  # sampled from outside for the expected run time (GIL-holding thread shown with --gil off)
            spy = subprocess.Popen([os.path.join(ROOT, "bench", ".venv", "bin", "py-spy"), "record", "--pid", str(pid),
                                    "-r", "50", "-f", "raw", "-d", str(int(args.tokens * args.step_ms / 1000 + 25)),
                                    "-o", os.path.abspath(args.profile)])
        res = asyncio.run(bench(args, url, pid))
        res.pop("unused", None)
        res["loadavg_1m"] = os.getloadavg()[0]
        res["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        print(json.dumps(res, indent=1))
        if spy is not None:
            spy.wait()
    finally:
        worker.send_signal(2)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis_proc.terminate()
        redis_proc.wait()


if __name__ == "__main__":
    sys.exit(main())
