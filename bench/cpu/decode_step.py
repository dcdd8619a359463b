"""The CPU engine's batched decode step, measured alone: how its parts change the step time of the bundled model.

What one step is: the engine's own path (worker-py/src/llm_worker/engine: kv.BatchCache with left padding, explicit
position ids, and the CPU patches attention.install / linear.install) for B rows, each prefilled with its own prompt
(40 + i tokens for row i, so rows are padded as in a real batch), then ``--steps`` decode steps. Prints the median
step time per quarter of the run (the context grows by one token per step, so attention's share grows) for each
variant, in one process, so the variants share the machine's state:
  engine        what the worker runs (dtype as DTYPE=auto picks it on this CPU, or --dtype)
  engine-unpacked  the same with F.linear instead of the packed oneDNN linear layers (engine/linear.py)
  engine-flash  the same with the decode attention path off (torch's flash SDPA kernel for one-token steps too)
  transformers  the model as Transformers loads it (its "sdpa" attention, F.linear), same cache and inputs
Prints figures, asserts nothing. Usage: python bench/cpu/decode_step.py [--batch 16] [--steps 100]
[--dtype bfloat16|float32] [--variants engine,engine-unpacked,engine-flash,transformers]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import bench_paths  # noqa: F401  (puts bench/ and worker-py/src on sys.path)
from bench_model import bench_dtype, load_bundled_model  # noqa: E402
from llm_worker.engine import attention, linear  # noqa: E402
from llm_worker.engine.kv import BatchCache  # noqa: E402


@torch.inference_mode()
def run(model, batch: int, steps: int, prompt_tokens: int | None = None) -> list[float]:
    """Seconds of each of ``steps`` decode steps after prefilling ``batch`` rows, row i with ``prompt_tokens`` tokens
    (all alike: no padding) or, by default, 40 + i (padded as in a real batch)."""
    cache = BatchCache("cpu")
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(100, 4000, (1, prompt_tokens or 40 + i), generator=gen)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache.add(out.past_key_values, ids.shape[1])
    nxt = torch.randint(100, 4000, (batch, 1), generator=gen)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        mask, pos = cache.step_inputs()
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache.cache, use_cache=True)
        nxt = out.logits[:, -1, :].float().argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--dtype", default=None, help="default: bench_dtype() (the worker's DTYPE=auto on this CPU)")
    ap.add_argument("--variants", default="engine,engine-unpacked,engine-flash,transformers")
    a = ap.parse_args()
    if a.dtype:
        os.environ["BENCH_DTYPE"] = a.dtype
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"dtype {bench_dtype()}, {torch.get_num_threads()} threads, batch {a.batch}, {a.steps} steps "
          f"(context {40}–{40 + a.batch - 1} prompt tokens + the steps)")
    for variant in a.variants.split(","):
        model, _ = load_bundled_model()
        attention.DECODE_MATMUL = variant != "engine-flash"
        linear.PACKED = variant != "engine-unpacked"
        if variant.startswith("engine"):
            attention.install(model)
            linear.install(model)
        run(model, a.batch, 8)  # warm-up: the first passes of a process are slow
        ts = run(model, a.batch, a.steps)
        q = max(1, len(ts) // 4)
        parts = [statistics.median(ts[i:i + q]) * 1000 for i in range(0, len(ts), q)][:4]
        print(f"{variant:13s} step ms by quarter: {' / '.join(f'{p:.1f}' for p in parts)}; median "
              f"{statistics.median(ts) * 1000:.1f} ms = {a.batch / statistics.median(ts):.0f} tok/s")
        del model
    attention.DECODE_MATMUL = True
    linear.PACKED = True


if __name__ == "__main__":
    main()
