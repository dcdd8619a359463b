"""What a prefill chunk of k tokens costs beside the steady decode step, on the CPU engine's own path (issue 14, target 2).

Sizes PREFILL_CHUNK_TOKENS: an engine turn is one chunk + one decode step of the running rows, so the running rows'
inter-token latency during a long prefill is (chunk + step) / step times their steady one; the target (p99 ≤ 2 × the
median) needs a chunk no slower than one steady step. Prints the median 16-row decode step (contexts ~40-55 + 32 steps)
and, for each k, the median time of a k-token chunk continuing a prompt already ``--depth`` tokens into its cache (the
attention of a late chunk of a 4,000-token prompt is the costly one), with chunk ÷ step. Asserts nothing.

    worker-py/.venv/bin/python bench/cpu/chunk_cost.py [--chunks 8,16,32,64,128,256] [--depth 2048] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import bench_paths  # noqa: F401  (puts bench/ and worker-py/src on sys.path)
from bench_model import bench_dtype, load_bundled_model  # noqa: E402
from decode_step import run as decode_steps  # noqa: E402
from llm_worker.engine import attention, linear  # noqa: E402
from llm_worker.engine.prefill import ChunkedPrefill  # noqa: E402


@torch.inference_mode()
def chunk_times(model, depth: int, chunk: int, reps: int) -> list[float]:
    """Seconds of ``reps`` chunks of ``chunk`` tokens, each continuing a prompt ``depth`` tokens into its cache."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 4000, (depth + chunk * reps,), generator=gen).tolist()
    pre = ChunkedPrefill([], ids, fresh=True)
    while pre.done < depth:
        pre.step(model, torch.device("cpu"), min(512, depth - pre.done))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        pre.step(model, torch.device("cpu"), chunk)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="8,16,32,64,128,256")
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default=None, help="default: bench_dtype() (the worker's DTYPE=auto on this CPU)")
    a = ap.parse_args()
    if a.dtype:
        os.environ["BENCH_DTYPE"] = a.dtype
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_bundled_model()
    attention.install(model)
    linear.install(model)
    decode_steps(model, 16, 4)  # warm-up
    step = statistics.median(decode_steps(model, 16, 32))
    print(f"dtype {bench_dtype()}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"16-row decode step median {step * 1000:.1f} ms")
    for k in (int(c) for c in a.chunks.split(",")):
        ct = statistics.median(chunk_times(model, a.depth, k, a.reps))
        print(f"chunk {k:4d} at depth {a.depth}: {ct * 1000:7.1f} ms = {ct / step:5.2f} steps "
              f"({(ct / k) * 1000:.2f} ms/token); turn (chunk+step) ÷ step {(ct + step) / step:.2f}")
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
