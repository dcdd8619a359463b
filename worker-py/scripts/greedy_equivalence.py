"""How often a greedy request gives the same tokens alone and inside a full batch (float noise can flip a near-tie).

Prints figures, asserts nothing. Usage (from worker-py/):
    .venv/bin/python scripts/greedy_equivalence.py [--prompts 16] [--tokens 64]
Two batch conditions: all requests submitted together, and staggered (each joins a batch already running, so
rows differ in left padding and cache length).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llm_worker import model as model_mod  # noqa: E402
from llm_worker.config import load_config  # noqa: E402
from llm_worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from llm_worker.engine.cpu_batch import CpuBatchEngine  # noqa: E402

QUESTIONS = ["Why is the sky blue?", "Give me a recipe for pancakes.", "What is a black hole?",
             "Write a haiku about autumn.", "Explain recursion to a child.", "List five fruits.",
             "What causes earthquakes?", "Describe a busy market.", "How do bees make honey?",
             "Tell me about the Moon landing.", "What is photosynthesis?", "Suggest a name for a cat.",
             "How does a bicycle stay upright?", "Write a limerick about a frog.", "What is inflation?",
             "Describe the smell of rain.", "Summarise the plot of Hamlet.", "What is machine learning?",
             "Plan a day trip to the seaside.", "Why do we dream?"]


def collect(engine, reqs, stagger: float = 0.0):
    out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    left = [len(reqs)]
    lock, done = threading.Lock(), threading.Event()

    def emit(rid, outputs):
        with lock:
            for o in outputs:
                out[rid].extend(o.token_ids)
                if o.finish_reason:
                    left[0] -= 1
            if left[0] == 0:
                done.set()

    for r in reqs:
        engine.submit(r, emit)
        time.sleep(stagger)
    done.wait()
    return out


def compare(alone, batch, label):
    same = sum(alone[k] == batch[k] for k in alone)
    diverge = []
    for k in alone:
        a, b = alone[k], batch[k]
        if a != b:
            diverge.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    print(f"{label}: identical {same}/{len(alone)} ({100 * same / len(alone):.0f}%); first differing token of the "
          f"others at {sorted(diverge)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model_mod.keep_main_thread_serial()  # as the worker does
    lm = model_mod.load(load_config())  # DTYPE etc. from the environment
    engine = CpuBatchEngine(lm.model, eos_token_ids=lm.eos_token_ids, max_batch=args.prompts,
                            context_length=lm.context_length)
    engine.start()

    def reqs(prefix):
        return [GenerationRequest(f"{prefix}{i}", model_mod.chat_prompt_ids(
            lm.tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]),
            SamplingParams(max_tokens=args.tokens, temperature=0.0)) for i in range(args.prompts)]

    alone: dict[str, list[int]] = {}
    for r in reqs("q"):
        alone.update(collect(engine, [r]))
    compare(alone, collect(engine, reqs("q")), f"batch of {args.prompts}, submitted together")
    compare(alone, collect(engine, reqs("q"), stagger=0.4), f"batch of {args.prompts}, staggered 0.4 s")
    engine.stop()


if __name__ == "__main__":
    main()
