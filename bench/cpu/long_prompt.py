"""A long prompt arriving while 15 streams decode (issue 14, item 2): do the streams stall behind its prefill?

Engine-level, as engine_alone.py: the bundled model and ``CpuBatchEngine``, no Redis, no gateway, in the worker's
default dtype (bf16 where the CPU has AVX512-BF16) or ``--dtype``. One run: 15 streams (bench/prompts.py's prompt, a
unique number each, greedy, EOS ignored) decode; once each has ``--warm`` tokens, their inter-token gaps are watched for
``--steady`` more tokens (the steady state), then a request with a ~``--prompt-tokens`` prompt is submitted. Its TTFT
is submit → its first token; the streams' gaps that overlap that interval are "during the prefill". Then everything is
cancelled. One run per ``--chunks`` value (PREFILL_CHUNK_TOKENS; 0 = off, the prompt in one pass; ``C/r``: chunks of at
most C tokens sized by time to r decode steps, PREFILL_CHUNK_STEP_RATIO=r; a plain C is fixed chunks, ratio 0), each
value with its own engine on the same loaded model, runs interleaved and ``--rounds`` times, in a rotating order.

Target: the streams' ITL p99 during the prefill ≤ 2 × their median ITL. Printed against both medians: the steady one
(before the long prompt: what a stream normally gets) and the one during the prefill. A stall shows in the first.
Prints figures, asserts nothing; ``--results-md`` appends a dated section to bench/RESULTS.md.
Usage: worker-py/.venv/bin/python bench/cpu/long_prompt.py [--chunks 0,256,256/0.8] [--rounds 2] [--results-md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import threading
import time

import bench_paths  # noqa: F401  (puts bench/ and worker-py/src on sys.path)
from bench_paths import BENCH, ROOT  # noqa: E402
from machine import machine_summary  # noqa: E402
from prompts import PROMPT, numbered  # noqa: E402

STREAMS = 15


def long_text(tokenizer, tokens: int) -> str:
    """Distinct sentences (no repeated block a cache or the model could shortcut) up to about ``tokens`` tokens."""
    topics = ["harbours", "orchards", "glaciers", "markets", "observatories", "railways", "vineyards", "foundries"]
    parts, i = [], 0
    while True:
        parts.append(f"Record {i}: the {topics[i % len(topics)]} of region {i} reported {i * 37 % 101} visitors "
                     f"and {i * 13 % 29} repairs in week {i % 52}.")
        i += 1
        if i % 4 == 0 and len(tokenizer(" ".join(parts))["input_ids"]) >= tokens - 60:  # ~23 tokens a sentence
            return " ".join(parts) + "\n\nWhich region reported the most visitors?"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def one_run(engine, model_mod, tokenizer, long_ids: list[int], a) -> dict:
    from llm_worker.engine.base import GenerationRequest, SamplingParams

    lock = threading.Lock()
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(STREAMS)}
    long_first: list[float] = []
    open_ids = set(times) | {"long"}
    done = threading.Event()

    def emit(rid, outputs):
        now = time.perf_counter()
        with lock:
            if any(o.token_ids for o in outputs):
                (long_first if rid == "long" else times[rid]).append(now)
            if any(o.finish_reason for o in outputs):
                open_ids.discard(rid)
                if not open_ids:
                    done.set()

    tag = time.perf_counter_ns()
    for i in range(STREAMS):
        ids = model_mod.chat_prompt_ids(tokenizer, [{"role": "user", "content": numbered(PROMPT)}])
        engine.submit(GenerationRequest(f"s{i}", ids, SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)),
                      emit)

    def tokens_each() -> int:
        with lock:
            return min(len(t) for t in times.values())

    while tokens_each() < a.warm:
        time.sleep(0.01)
    steady_from = time.perf_counter()
    while tokens_each() < a.warm + a.steady:
        time.sleep(0.01)
    submitted = time.perf_counter()
    engine.submit(GenerationRequest(f"long{tag}", long_ids, SamplingParams(max_tokens=1, temperature=0)),
                  lambda rid, outputs: emit("long", outputs))
    while not long_first:
        time.sleep(0.005)
    first = long_first[0]
    while tokens_each() < a.warm + a.steady + 2 or time.perf_counter() - first < 0.5:  # the gap that ends after it
        time.sleep(0.01)
    for rid in times:
        engine.cancel(rid)
    done.wait()
    steady, during = [], []
    with lock:
        for ts in times.values():
            for t0, t1 in zip(ts, ts[1:]):
                if t0 >= steady_from and t1 <= submitted:
                    steady.append(t1 - t0)
                elif t1 > submitted and t0 < first:
                    during.append(t1 - t0)
    return {"ttft": first - submitted, "steady": steady, "during": during}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="0,256,256/0.8",
                    help="PREFILL_CHUNK_TOKENS values to compare (0 = off; C/r: time-sized, PREFILL_CHUNK_STEP_RATIO r)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--warm", type=int, default=6, help="tokens each stream has before the steady window")
    ap.add_argument("--steady", type=int, default=12, help="tokens per stream in the steady window")
    ap.add_argument("--dtype", default=None, help="DTYPE (default: the worker's, auto)")
    ap.add_argument("--results-md", action="store_true", help="append a dated section to bench/RESULTS.md")
    a = ap.parse_args()
    chunks = a.chunks.split(",")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]

    from llm_worker import model as model_mod  # before torch: the package sets the worker's GOMP_SPINCOUNT

    from llm_worker.config import load_config
    from llm_worker.engine.cpu_batch import CpuBatchEngine

    model_mod.keep_main_thread_serial()
    loaded = model_mod.load(load_config({"DTYPE": a.dtype} if a.dtype else {}))
    tokenizer = loaded.tokenizer
    long_ids = model_mod.chat_prompt_ids(tokenizer, [{"role": "user", "content": long_text(tokenizer, a.prompt_tokens)}])
    engines = {c: CpuBatchEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, max_batch=STREAMS + 1,
                                 context_length=loaded.context_length, prefill_chunk_tokens=int(c.split("/")[0]),
                                 prefill_chunk_step_ratio=float(c.split("/")[1]) if "/" in c else 0.0) for c in chunks}
    for e in engines.values():
        e.start()
    one_run(engines[chunks[0]], model_mod, tokenizer, long_ids[:300], a)  # warm-up: a process's first passes are slow
    runs: dict[int, list[dict]] = {c: [] for c in chunks}
    loads: list[float] = []
    for rnd in range(a.rounds):
        order = chunks[rnd % len(chunks):] + chunks[:rnd % len(chunks)]
        for c in order:
            res = one_run(engines[c], model_mod, tokenizer, long_ids, a)
            res["load"] = os.getloadavg()[0]
            loads.append(res["load"])
            runs[c].append(res)
            print(f"round {rnd + 1} chunk {c}: TTFT {res['ttft']:.2f} s, steady median "
                  f"{statistics.median(res['steady']) * 1000:.0f} ms, during: median "
                  f"{statistics.median(res['during']) * 1000:.0f} ms p99 {percentile(res['during'], 0.99) * 1000:.0f} ms"
                  f" max {max(res['during']) * 1000:.0f} ms ({len(res['during'])} gaps), load {res['load']:.1f}",
                  flush=True)
    for e in engines.values():
        e.stop()

    noisy = max(loads + [load_before]) > 2
    lines = [f"{machine_summary()}; bundled model, dtype {loaded.dtype}; {STREAMS} streams decoding, then one "
             f"{len(long_ids)}-token prompt (max_tokens 1). Command: `worker-py/.venv/bin/python "
             f"{os.path.relpath(sys.argv[0], ROOT)} {shlex.join(sys.argv[1:])}`. 1-min load average "
             f"{load_before:.1f} before, {min(loads):.1f}-{max(loads):.1f} during the runs"
             + (" (noisy: the machine is shared; figures are upper bounds)." if noisy else "."), "",
             "| PREFILL_CHUNK_TOKENS (/ STEP_RATIO) | long prompt's TTFT | streams' ITL: steady median | during the prefill: median / "
             "p99 / max | p99 ÷ steady median | p99 ÷ median during | target p99 ≤ 2 × steady median |",
             "|---|---|---|---|---|---|---|"]
    for c in chunks:
        steady = [g for r in runs[c] for g in r["steady"]]
        during = [g for r in runs[c] for g in r["during"]]
        ttfts = [r["ttft"] for r in runs[c]]
        med, dmed, p99 = statistics.median(steady), statistics.median(during), percentile(during, 0.99)
        lines.append(f"| {c if c != '0' else 'off (0)'} | {statistics.median(ttfts):.2f} s (runs: "
                     f"{', '.join(f'{t:.1f}' for t in ttfts)}) | {med * 1000:.0f} ms | {dmed * 1000:.0f} / "
                     f"{p99 * 1000:.0f} / {max(during) * 1000:.0f} ms | {p99 / med:.1f} | {p99 / dmed:.1f} | "
                     f"{'met' if p99 <= 2 * med else 'NOT met'} |")
    print("\n".join(lines))
    if a.results_md:
        head = f"\n## Long prompt beside 15 decoding streams (issue 14, item 2) — {started.strftime('%Y-%m-%d %H:%M UTC')}\n"
        with open(os.path.join(BENCH, "RESULTS.md"), "a") as fh:
            fh.write(head + "\n".join(lines) + "\n")
        print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
