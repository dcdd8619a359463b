"""Engine throughput on this machine: N concurrent greedy streams of fixed length through CpuBatchEngine.

Prints figures, asserts nothing. Usage (from worker-py/):
    .venv/bin/python scripts/bench_engine.py [--streams 16] [--tokens 100] [--max-batch 16]
Also prints single-stream decode tok/s and two ceilings measured in the same run: fp32 GEMM GFLOP/s ÷ model FLOP/token
(a 512x576 @ 576x1536 GEMM: cache-resident, so optimistic), and the tokens/s of one 512-token forward pass with logits
at every position (the most a perfectly batched forward pass of this model reaches on this CPU). The box may be shared:
each run is followed by the CPU load other processes caused, and the 16-stream run is repeated (--repeat).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from llm_worker import model as model_mod  # noqa: E402
from llm_worker.config import load_config  # noqa: E402
from llm_worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from llm_worker.engine.cpu_batch import CpuBatchEngine  # noqa: E402

PROMPT = "Write a short story about a {}."
TOPICS = ["cat", "dog", "robot", "tree", "ship", "king", "bird", "river", "city", "moon", "fox", "train", "lamp",
          "door", "cloud", "stone"]


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""
    def snap():
        f = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return sum(f), f[3] + f[4]
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(quiet_s: int, limit_s: int) -> None:
    """Other processes on a shared box skew every figure: wait until the CPUs have been quiet for ``quiet_s``."""
    start, quiet = time.time(), 0
    while quiet < quiet_s and time.time() - start < limit_s:
        quiet = quiet + 1 if cpu_busy() < 0.2 else 0
    print(f"waited {time.time() - start:.0f} s for idle CPUs ({'ok' if quiet >= quiet_s else 'gave up: figures skewed'})")


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(5):
        a @ b
    n, t = 100, time.perf_counter()
    for _ in range(n):
        a @ b
    return n * 2 * 512 * 576 * 1536 / (time.perf_counter() - t) / 1e9


def run(engine, tokenizer, streams: int, tokens: int):
    reqs = [GenerationRequest(f"b{i}", model_mod.chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT.format(
        TOPICS[i % len(TOPICS)])}]), SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
        for i in range(streams)]
    times: dict[str, list[float]] = {r.request_id: [] for r in reqs}
    left = [len(reqs)]
    lock, done = threading.Lock(), threading.Event()

    def emit(rid, outputs):
        now = time.perf_counter()
        with lock:
            for o in outputs:
                times[rid].extend([now] * len(o.token_ids))
                if o.finish_reason:
                    left[0] -= 1
            if left[0] == 0:
                done.set()

    start = time.perf_counter()
    for r in reqs:
        engine.submit(r, emit)
    done.wait()
    wall = time.perf_counter() - start
    total = sum(len(v) for v in times.values())
    ttft = sorted(v[0] - start for v in times.values())
    itl = sorted(b - a for v in times.values() for a, b in zip(v, v[1:]))
    return total, wall, ttft, itl


def pct(xs, p):
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--wait-idle", type=int, default=0, help="seconds of idle CPUs to wait for first (0 = don't)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.wait_idle:
        wait_idle(args.wait_idle, 1800)
    threads = os.cpu_count() or 1
    gflops = matmul_gflops(threads)
    lm = model_mod.load(load_config())  # DTYPE etc. from the environment
    params = sum(p.numel() for p in lm.model.parameters())
    flop_per_token = 2 * params  # tied embeddings: the lm_head matmul reuses the embedding matrix
    print(f"cpu threads {threads}; fp32 matmul {gflops:.1f} GFLOP/s (512x576 @ 576x1536); model {params / 1e6:.1f}M "
          f"params = {flop_per_token / 1e9:.2f} GFLOP/token; compute ceiling {gflops * 1e9 / flop_per_token:.0f} tok/s")
    with torch.inference_mode():
        ids = torch.randint(100, 1000, (1, 512))
        lm.model(input_ids=ids)
        t = time.perf_counter()
        lm.model(input_ids=ids)
        print(f"one 512-token forward pass (all logits): {512 / (time.perf_counter() - t):.0f} tok/s")
    engine = CpuBatchEngine(lm.model, eos_token_ids=lm.eos_token_ids, max_batch=args.max_batch,
                            context_length=lm.context_length)
    engine.start()
    model_mod.warm_up(engine, lm.tokenizer)
    total, wall, _, itl = run(engine, lm.tokenizer, 1, args.tokens)
    print(f"single stream: {total} tokens in {wall:.2f} s = {total / wall:.1f} tok/s "
          f"(decode only {1 / statistics.median(itl):.1f} tok/s)")
    for _ in range(args.repeat):
        total, wall, ttft, itl = run(engine, lm.tokenizer, args.streams, args.tokens)
        print(f"{args.streams} streams x {args.tokens} tokens (max_batch {args.max_batch}): {total} tokens in {wall:.2f} s "
              f"= {total / wall:.1f} tok/s; TTFT p50 {pct(ttft, 50) * 1000:.0f} ms p99 {pct(ttft, 99) * 1000:.0f} ms; "
              f"ITL p50 {pct(itl, 50) * 1000:.0f} ms p99 {pct(itl, 99) * 1000:.0f} ms; "
              f"other load after: {cpu_busy(1.0) * 100:.0f}%")
    engine.stop()


if __name__ == "__main__":
    main()
