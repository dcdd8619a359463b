"""The worker's CPU engine alone — no Redis, no gateway, no HTTP — under the benchmark's load: what serving costs.

16 closed-loop clients (threads) each submit ``--requests`` requests of the benchmark's prompt (bench/prompts.py:
71 tokens with a unique request number) for exactly 100 greedy tokens straight to ``CpuBatchEngine``, as the
worker's transport does.
Prints output tokens/s, TTFT p50 / max and the median decode step. Set against bench/cpu/run.sh's "ours" row it
shows what the stack around the engine costs; set against bench/cpu/decode_step.py, what the engine's loop costs.

``--main-threads 2`` loads the model with two torch threads on the main thread, as the worker did before
``model.keep_main_thread_serial``: two OpenMP teams in one process, and libgomp's throttled spinning (see there).
Prints figures, asserts nothing. Usage: worker-py/.venv/bin/python bench/cpu/engine_alone.py [--requests 2]
[--streams 16] [--main-threads 1|2] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import bench_paths  # noqa: F401  (puts bench/ and worker-py/src on sys.path)
from prompts import PROMPT, numbered  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="per stream, one after the other")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--main-threads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="the engine's torch threads (default: the CPUs the worker may use)")
    a = ap.parse_args()

    from llm_worker import model as model_mod  # before torch: the package sets the worker's GOMP_SPINCOUNT

    import torch  # noqa: I001
    from llm_worker.config import load_config
    from llm_worker.engine import cpu_batch
    from llm_worker.engine.base import GenerationRequest, SamplingParams

    torch.set_num_threads(a.main_threads)  # 1 = model_mod.keep_main_thread_serial(), what the worker does
    loaded = model_mod.load(load_config({}))
    engine = cpu_batch.CpuBatchEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, max_batch=a.streams,
                                      context_length=loaded.context_length, num_threads=a.threads)
    steps: list[float] = []
    decode_step = cpu_batch.CpuBatchEngine._decode_step

    def timed_step(self):
        t = time.perf_counter()
        decode_step(self)
        steps.append(time.perf_counter() - t)

    engine._decode_step = timed_step.__get__(engine)
    engine.start()
    lock = threading.Lock()

    def prompt_ids() -> list[int]:
        return model_mod.chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": numbered(PROMPT)}])

    def generate(max_tokens: int) -> tuple[float, int]:
        done, first, count = threading.Event(), [0.0], [0]

        def emit(_rid, outputs):
            for o in outputs:
                if o.token_ids and not first[0]:
                    first[0] = time.perf_counter()
                count[0] += len(o.token_ids)
                if o.finish_reason:
                    done.set()

        t0 = time.perf_counter()
        engine.submit(GenerationRequest(f"r{time.perf_counter_ns()}", prompt_ids(),
                                        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)), emit)
        done.wait()
        return first[0] - t0, count[0]

    generate(8)  # warm-up: the first passes of a process are slow
    steps.clear()
    ttft: list[float] = []
    tokens = [0]

    def client() -> None:
        for _ in range(a.requests):
            t, n = generate(a.tokens)
            with lock:
                ttft.append(t)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    engine.stop()
    print(f"engine alone ({loaded.dtype}, main thread {a.main_threads} torch thread(s), engine {engine.num_threads}): "
          f"{a.streams} streams × {a.requests} × {a.tokens} tokens: {tokens[0] / wall:.1f} tok/s, "
          f"TTFT p50 {statistics.median(ttft) * 1000:.0f} ms, max {max(ttft) * 1000:.0f} ms; "
          f"decode step median {statistics.median(steps) * 1000:.1f} ms over {len(steps)} steps")


if __name__ == "__main__":
    main()
