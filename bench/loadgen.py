"""Load generator: N concurrent streaming chat completions against any OpenAI-compatible server; prints figures.

Why our own and not a well-known tool: the figures the issue asks for need (1) exact output lengths on three different
servers, each of which honours a different knob (`ignore_eos` here, a `generation_config` JSON in `transformers serve`),
and (2) the worker's own timestamps joined per request to the client's, to get the stack's overhead. vLLM's
benchmark_serving needs vLLM installed (GBs, GPU-oriented); llmperf/genai-perf/guidellm likewise bring large stacks and
know nothing of our worker's timestamps; wrk/k6/hey do not parse SSE token streams. This is ~250 lines of asyncio+aiohttp.

Closed loop: `concurrency` clients, each sends its next request as soon as its previous one ends, until `requests` are
done. Every request has the same prompt but for a 6-digit request number at its start (so the token count is fixed
and no server can answer from a cache: our gateway caches deterministic requests, on by default) and asks for exactly
`max_tokens` output tokens.

Figures (all from the client's clock, time.perf_counter):
- output tokens/s = Σ usage.completion_tokens / (last response end − first request sent)
- TTFT = first chunk with non-empty content − request sent
- ITL (client-seen) = gaps between successive content chunks. Servers coalesce tokens (ours every STREAM_FLUSH_MS), so a
  chunk may carry several tokens: we also report tokens per chunk (Σ completion_tokens / Σ content chunks) and
  TPOT = (last content chunk − first content chunk) / (completion_tokens − 1) per request, the per-token figure.
- stack overhead (our stack only; needs --redis-url): the worker stores JobResult.timing {picked_up_ms, first_token_ms,
  finished_ms} and the gateway stores enqueued_at_ms in the BullMQ job (docs/PROTOCOL.md); after the run we read them
  from Redis by job id (= the completion id of the chunks) — nothing is read during the run, so measuring costs the
  stack nothing. overhead = client TTFT − worker TTFT − queue wait, worker TTFT = first_token_ms − picked_up_ms.
  Queue wait is the time a job waited because every slot was taken (issue 4 excludes it): rebuilt after the run from
  every job's [picked_up_ms, finished_ms) and the workers' max_batch (llm:worker:*) — the part of a job's
  enqueued → picked up time during which the workers held max_batch jobs. A slot stays taken a little past
  finished_ms (the done event, moveToCompleted), so the rebuilt wait is slightly short and the overhead slightly
  long, never the other way round. Without the gateway log "in" = picked_up − sent, "out" = client receipt −
  first_token_ms. Worker timestamps are integer ms (epoch), so each figure carries ±1 ms of rounding.
- where the overhead goes (with --gateway-log, the gateway's log file): the gateway logs wall-clock stamps of each
  request's hot path with its "chat completion finished" line (gateway/src/services/stamps.ts); joined by job id they
  split the overhead into: client → gateway route (HTTP, auth, JSON body), prepare (validation, prompt tokens),
  admission (cache lookup, budgets, queue depth), enqueue (SUBSCRIBE + Queue.add), pick-up (Queue.add answered →
  the worker's processor runs, less queue wait), [worker TTFT, excluded], pub/sub (worker's first token → the gateway
  has the delta), SSE write (→ written to the socket), client (→ the client has parsed the chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from prompts import PROMPT, numbered


@dataclass
class Req:
    sent: float = 0.0
    sent_wall_ms: float = 0.0
    first: Optional[float] = None
    first_wall_ms: Optional[float] = None
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0
    completion_tokens: Optional[int] = None
    prompt_tokens: Optional[int] = None
    job_id: Optional[str] = None
    error: Optional[str] = None


def pct(xs: list[float], p: float) -> Optional[float]:
    """Nearest-rank percentile (p in 0..100); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def body_for(flavor: str, model: Optional[str], max_tokens: int, prompt: str) -> dict[str, Any]:
    b: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_tokens,
                         "temperature": 0}
    if model:
        b["model"] = model
    if flavor == "ours":  # gateway/src/protocol/chat.ts: ignore_eos (vLLM's extension) is accepted and forwarded
        b["ignore_eos"] = True
        b["stream_options"] = {"include_usage": True}
    elif flavor == "hf-serve":  # transformers serve: no ignore_eos; a GenerationConfig JSON is its per-request knob
        b["generation_config"] = json.dumps({"max_new_tokens": max_tokens, "min_new_tokens": max_tokens,
                                             "do_sample": False})
    elif flavor == "tutorial":  # bench/baselines/tutorial_server.py
        b["ignore_eos"] = True
    return b


# The shape of an OpenAI content chunk's only choice, as our gateway writes it (compact JSON).
_CONTENT = b'"delta":{"content":"'
_NOT_FINISHED = b'"finish_reason":null'
_USAGE = b'"usage":{'


async def one(session: aiohttp.ClientSession, url: str, headers: dict, body: dict, r: Req) -> None:
    r.sent_wall_ms = time.time() * 1000.0
    r.sent = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            done = finished = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                if r.job_id is not None and _CONTENT in data and _NOT_FINISHED in data and _USAGE not in data:
                    # A plain content chunk (almost all of them): no JSON decoding, so that the client's own CPU
                    # (it shares the machine with the stack) stays small; anything else is decoded below.
                    if data[data.index(_CONTENT) + len(_CONTENT):][:1] != b'"':
                        if r.first is None:
                            r.first, r.first_wall_ms = now, time.time() * 1000.0
                        r.chunk_times.append(now)
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    r.error = f"stream error: {str(obj['error'])[:200]}"
                    return
                r.job_id = r.job_id or obj.get("id")
                for ch in obj.get("choices") or []:
                    finished = finished or bool(ch.get("finish_reason"))
                    if (ch.get("delta") or {}).get("content"):
                        if r.first is None:
                            r.first, r.first_wall_ms = now, time.time() * 1000.0
                        r.chunk_times.append(now)
                usage = obj.get("usage")
                if usage:
                    r.completion_tokens = usage.get("completion_tokens")
                    r.prompt_tokens = usage.get("prompt_tokens")
            # transformers serve ends with a finish_reason chunk and no [DONE]; a stream with neither was cut short.
            if not (done or finished):
                r.error = f"stream closed without finish_reason or [DONE] after {len(r.chunk_times)} content chunks"
    except Exception as exc:  # noqa: BLE001 — recorded per request, reported in the summary
        r.error = f"{type(exc).__name__}: {exc}"
    finally:
        r.end = time.perf_counter()


async def run_load(base_url: str, *, flavor: str, concurrency: int, requests: int, max_tokens: int,
                   model: Optional[str] = None, api_key: Optional[str] = None, prompt: str = PROMPT,
                   warmup: int = 1, timeout_s: float = 900, ramp_s: float = 0.0) -> tuple[list[Req], float, float]:
    """Runs the load; returns (requests, t_start, t_end) with perf_counter times. `warmup` requests run first, unmeasured.

    `ramp_s`: client k starts k × ramp_s / concurrency seconds after the first, instead of all at once. Clients that
    start together and ask for the same number of tokens at a fixed rate stay in lockstep: every round arrives as one
    burst of `concurrency` requests, and each request's TTFT then includes the stack working through the requests of
    its own burst. A ramp over one request's duration spreads the arrivals evenly, as independent clients arrive."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for k in range(warmup):
            w = Req()
            await one(session, url, headers, body_for(flavor, model, min(max_tokens, 8), numbered(prompt)), w)
            if w.error:
                raise RuntimeError(f"warm-up request failed: {w.error}")
        results: list[Req] = []
        todo = iter(range(requests))

        async def client(k: int) -> None:
            if ramp_s > 0:
                await asyncio.sleep(k * ramp_s / concurrency)
            for i in todo:
                r = Req()
                results.append(r)
                await one(session, url, headers, body_for(flavor, model, max_tokens, numbered(prompt)), r)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        t1 = time.perf_counter()
    return results, t0, t1


def fetch_worker_timing(redis_url: str, queue: str, reqs: list[Req]) -> Optional[int]:
    """Joins the worker's timestamps (stored BullMQ job: data.enqueued_at_ms, returnvalue.timing) to each request.

    Returns the slots of the workers serving `queue` (Σ max_batch of the live workers, llm:worker:*), or None."""
    import redis  # the worker's dependency (bullmq pins it); present in bench/.venv through the worker venv

    cli = redis.Redis.from_url(redis_url)
    pipe = cli.pipeline()
    ids = [r.job_id for r in reqs if r.job_id]
    for jid in ids:
        pipe.hmget(f"bull:{queue}:{jid}", "data", "returnvalue")
    for r, (data, ret) in zip([r for r in reqs if r.job_id], pipe.execute()):
        if data and ret:
            d, rv = json.loads(data), json.loads(ret)
            timing = rv.get("timing") or {}
            r.worker = {"enqueued_at_ms": d.get("enqueued_at_ms"), **timing}  # type: ignore[attr-defined]
    slots = 0
    workers = cli.zrangebyscore("llm:workers", time.time() * 1000, "+inf")
    for raw in cli.mget([b"llm:worker:" + w for w in workers]) if workers else []:
        info = json.loads(raw) if raw else {}
        if info.get("queue") == queue:
            slots += int(info.get("max_batch") or 0)
    return slots or None


def fetch_gateway_stamps(log_path: str, reqs: list[Req]) -> int:
    """Joins the gateway's hot-path stamps (its "chat completion finished" log lines) by job id; returns how many."""
    by_id = {r.job_id: r for r in reqs if r.job_id}
    n = 0
    with open(log_path, errors="replace") as fh:
        for line in fh:
            if '"stamps"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            r = by_id.get(rec.get("jobId"))
            if r is not None and isinstance(rec.get("stamps"), dict):
                r.gateway = rec["stamps"]  # type: ignore[attr-defined]
                n += 1
    return n


def queue_waits(jobs: list[tuple[float, float, float]], slots: int) -> list[float]:
    """For each job (enqueued, picked_up, finished) in ms: the part of [enqueued, picked_up) during which the workers
    held `slots` jobs (every slot taken), from all jobs' [picked_up, finished) intervals."""
    edges = sorted([(p, 1) for _, p, f in jobs] + [(f, -1) for _, p, f in jobs], key=lambda e: (e[0], e[1]))
    full: list[tuple[float, float]] = []  # intervals with every slot taken
    occ, since = 0, None
    for t, d in edges:
        occ += d
        if occ >= slots and since is None:
            since = t
        elif occ < slots and since is not None:
            if t > since:
                full.append((since, t))
            since = None
    out = []
    for e, p, _ in jobs:
        out.append(sum(max(0.0, min(p, b) - max(e, a)) for a, b in full if a < p and b > e))
    return out


# Where the overhead goes, in order (see the module docstring); the worker's own TTFT sits between pickup and pubsub.
STAGE_PARTS = {"client_to_route": "client → route", "prepare": "prepare", "admit": "admission", "enqueue": "enqueue",
               "pickup": "pick-up", "pubsub": "pub/sub", "sse_write": "SSE write", "to_client": "→ client"}


def summarize(reqs: list[Req], t0: float, t1: float, slots: Optional[int] = None) -> dict[str, Any]:
    """Figures of one run; `slots` (fetch_worker_timing's answer) separates queue wait from the overhead."""
    ok = [r for r in reqs if not r.error]
    toks = [r.completion_tokens or 0 for r in ok]
    ttft = [(r.first - r.sent) * 1000 for r in ok if r.first is not None]
    gaps = [(b - a) * 1000 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) * 1000 / (r.completion_tokens - 1)
            for r in ok if r.completion_tokens and r.completion_tokens > 1 and len(r.chunk_times) > 1]
    chunks = sum(len(r.chunk_times) for r in ok)
    s: dict[str, Any] = {
        "requests": len(reqs), "errors": len(reqs) - len(ok), "first_error": next((r.error for r in reqs if r.error), None),
        "wall_s": t1 - t0, "output_tokens": sum(toks), "tok_per_s": sum(toks) / (t1 - t0) if t1 > t0 else 0.0,
        "completion_tokens_min": min(toks) if toks else None, "completion_tokens_max": max(toks) if toks else None,
        "prompt_tokens": next((r.prompt_tokens for r in ok if r.prompt_tokens), None),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
        "tokens_per_chunk": (sum(toks) / chunks) if chunks else None,
    }
    joined = [r for r in ok if getattr(r, "worker", None) and r.worker.get("first_token_ms") and r.first_wall_ms]
    if joined:
        # Queue wait needs every job's occupancy, failed ones included (they held a slot too).
        timed = [r for r in reqs if getattr(r, "worker", None) and r.worker.get("picked_up_ms")
                 and r.worker.get("finished_ms")]
        wait: dict[int, float] = {}
        if slots:
            def enq(r: Req) -> float:
                g = getattr(r, "gateway", None)
                return g["route"] + g["enqueued"] if g and "enqueued" in g else r.worker.get("enqueued_at_ms") or 0
            waits = queue_waits([(enq(r), r.worker["picked_up_ms"], r.worker["finished_ms"]) for r in timed], slots)
            wait = {id(r): w for r, w in zip(timed, waits)}
        over, raw_over, qw, o_in, o_out, pick, gw, wt = [], [], [], [], [], [], [], []
        parts: dict[str, list[float]] = {k: [] for k in STAGE_PARTS}
        for r in joined:
            w = r.worker
            client_ttft = r.first_wall_ms - r.sent_wall_ms
            q = wait.get(id(r), 0.0)
            wt.append(w["first_token_ms"] - w["picked_up_ms"])
            raw_over.append(client_ttft - wt[-1])
            over.append(raw_over[-1] - q)
            qw.append(q)
            o_in.append(w["picked_up_ms"] - r.sent_wall_ms - q)
            o_out.append(r.first_wall_ms - w["first_token_ms"])
            if w.get("enqueued_at_ms"):
                pick.append(w["picked_up_ms"] - w["enqueued_at_ms"] - q)
                gw.append(w["enqueued_at_ms"] - r.sent_wall_ms)
            g = getattr(r, "gateway", None)
            if g and all(k in g for k in ("prepared", "admitted", "enqueued", "delta", "written")):
                at = g["route"]
                parts["client_to_route"].append(at - r.sent_wall_ms)
                parts["prepare"].append(g["prepared"])
                parts["admit"].append(g["admitted"] - g["prepared"])
                parts["enqueue"].append(g["enqueued"] - g["admitted"])
                parts["pickup"].append(w["picked_up_ms"] - (at + g["enqueued"]) - q)
                parts["pubsub"].append(at + g["delta"] - w["first_token_ms"])
                parts["sse_write"].append(g["written"] - g["delta"])
                parts["to_client"].append(r.first_wall_ms - (at + g["written"]))
        s.update({"overhead_n": len(joined), "overhead_p50_ms": pct(over, 50), "overhead_p99_ms": pct(over, 99),
                  "overhead_with_queue_wait_p50_ms": pct(raw_over, 50),
                  "overhead_with_queue_wait_p99_ms": pct(raw_over, 99),
                  "queue_slots": slots, "queue_wait_p50_ms": pct(qw, 50) if slots else None,
                  "queue_wait_p99_ms": pct(qw, 99) if slots else None,
                  "queue_waited_n": sum(1 for x in qw if x > 0) if slots else None,
                  "overhead_in_p50_ms": pct(o_in, 50), "overhead_in_p99_ms": pct(o_in, 99),
                  "overhead_out_p50_ms": pct(o_out, 50), "overhead_out_p99_ms": pct(o_out, 99),
                  "enqueue_to_pickup_p50_ms": pct(pick, 50), "enqueue_to_pickup_p99_ms": pct(pick, 99),
                  "sent_to_enqueued_p50_ms": pct(gw, 50), "sent_to_enqueued_p99_ms": pct(gw, 99),
                  "worker_ttft_p50_ms": pct(wt, 50), "worker_ttft_p99_ms": pct(wt, 99)})
        if parts["prepare"]:
            s["stages_n"] = len(parts["prepare"])
            for k, xs in parts.items():
                s[f"stage_{k}_p50_ms"], s[f"stage_{k}_p99_ms"] = pct(xs, 50), pct(xs, 99)
    return s


def fmt(s: dict[str, Any]) -> str:
    def f(v, d=0):
        return "—" if v is None else f"{v:,.{d}f}"
    line = (f"{f(s['tok_per_s'], 1)} tok/s | TTFT p50 {f(s['ttft_p50_ms'])} p99 {f(s['ttft_p99_ms'])} ms | "
            f"ITL(chunk) p50 {f(s['itl_p50_ms'], 1)} p99 {f(s['itl_p99_ms'], 1)} ms | TPOT p50 {f(s['tpot_p50_ms'], 1)} "
            f"p99 {f(s['tpot_p99_ms'], 1)} ms | {f(s['tokens_per_chunk'], 2)} tok/chunk | tokens/req "
            f"{s['completion_tokens_min']}–{s['completion_tokens_max']} | {s['requests']} req, {s['errors']} errors")
    if "overhead_p50_ms" in s:
        line += (f"\n    stack overhead p50 {f(s['overhead_p50_ms'], 1)} p99 {f(s['overhead_p99_ms'], 1)} ms "
                 f"(queue wait excluded: p50 {f(s['queue_wait_p50_ms'], 1)} p99 {f(s['queue_wait_p99_ms'], 1)} ms, "
                 f"{s['queue_waited_n'] if s['queue_waited_n'] is not None else '?'} of {s['overhead_n']} jobs waited "
                 f"for a slot of {s['queue_slots'] or '?'}) = in p50 {f(s['overhead_in_p50_ms'], 1)} "
                 f"[sent→enqueued_at p50 {f(s['sent_to_enqueued_p50_ms'], 1)}, enqueued_at→picked up p50 "
                 f"{f(s['enqueue_to_pickup_p50_ms'], 1)} p99 {f(s['enqueue_to_pickup_p99_ms'], 1)}]"
                 f" + out p50 {f(s['overhead_out_p50_ms'], 1)} ms; worker TTFT (picked up → first token, excluded) "
                 f"p50 {f(s['worker_ttft_p50_ms'], 1)} p99 {f(s['worker_ttft_p99_ms'], 1)} ms")
    if "stages_n" in s:
        line += ("\n    stages p50 / p99 ms: " + ", ".join(
            f"{label} {f(s[f'stage_{k}_p50_ms'], 1)} / {f(s[f'stage_{k}_p99_ms'], 1)}" for k, label in STAGE_PARTS.items()))
    if s.get("first_error"):
        line += f"\n    first error: {s['first_error']}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="…/v1")
    ap.add_argument("--flavor", choices=["ours", "hf-serve", "tutorial"], required=True)
    ap.add_argument("--model")
    ap.add_argument("--api-key")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ramp-s", type=float, default=0.0,
                    help="spread the clients' starts over this many seconds (0: all at once; see run_load)")
    ap.add_argument("--redis-url", help="our stack: join the worker's timestamps (stack overhead)")
    ap.add_argument("--queue", default="gen.smollm2-135m-instruct")
    ap.add_argument("--gateway-log", help="our stack: the gateway's log file, to split the overhead by stage")
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args()
    reqs, t0, t1 = asyncio.run(run_load(a.base_url, flavor=a.flavor, concurrency=a.concurrency, requests=a.requests,
                                        max_tokens=a.max_tokens, model=a.model, api_key=a.api_key, warmup=a.warmup,
                                        ramp_s=a.ramp_s))
    slots = fetch_worker_timing(a.redis_url, a.queue, reqs) if a.redis_url else None
    if a.gateway_log:
        fetch_gateway_stamps(a.gateway_log, reqs)
    s = summarize(reqs, t0, t1, slots)
    print(fmt(s))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(s, fh, indent=2)
    sys.exit(1 if s["errors"] else 0)


if __name__ == "__main__":
    main()
