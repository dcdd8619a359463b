"""This CPU's ceilings for the bundled model (SmolLM2-135M, fp32), measured; prints them and writes JSON.

How:
1. matmul GFLOP/s in the dtype the worker computes in on this CPU (bench_model.bench_dtype(): bf16 where the CPU
   has native bf16, else fp32; fp32 is printed too): a 2048×2048 @ 2048×2048 torch.mm (2·n³ FLOP), best of 15
   after a warm-up, all torch threads.
2. FLOP per output token, from the config: 2 × (every Linear's weights, incl. the tied lm_head) + attention
   (QKᵀ and AV: 4 × layers × heads × head_dim × context, at the benchmark's mean context).
   Compute ceiling (roofline) = GFLOP/s ÷ GFLOP per token — what batching can reach at best on this CPU.
3. Memory bandwidth: copying a 512 MiB fp32 tensor (read + write bytes ÷ time), best of 15. Single-stream ceiling =
   bandwidth ÷ weight bytes (each decode step reads every weight once).
4. The model's own batched decode step, measured: prefill B sequences of the benchmark's prompt length, then time 10
   decode steps (after an unmeasured warm-up pass, and 2 warm-up steps each) with a DynamicCache, as an engine would; tokens/s = B ÷ fastest step time, for
   B = 1, 16, 32, 64. This is what eager PyTorch reaches on this model with no serving around it.
5. The same at B = 16 through the worker engine's own forward path (llm_worker.engine: packed oneDNN linear layers,
   the decode attention, kv.BatchCache), bare: the fastest forward pass we know for this model on this CPU, so the
   ceiling the serving stack is held to (the run's 16 streams cannot beat it: every token costs one such step).
Usage: python bench/cpu/ceiling.py [--json out.json] [--prompt-tokens 64] [--decode-tokens 100]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import bench_paths  # noqa: F401  (puts bench/ and worker-py/src on sys.path)
from bench_model import bench_dtype, load_bundled_model  # noqa: E402


def best_of(fn, n: int = 15) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def matmul_gflops(n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_of(lambda: torch.mm(a, b)) / 1e9


def copy_gbps(mib: int = 512) -> float:
    src = torch.empty(mib * 2**20 // 4).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_of(lambda: dst.copy_(src)) / 1e9


def flop_per_token(model, context: int) -> float:
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 2.0 * linear + attn


@torch.inference_mode()
def decode_step_ms(model, batch: int, prompt_tokens: int, steps: int = 10) -> float:
    from transformers import DynamicCache

    ids = torch.randint(100, int(model.config.vocab_size) - 100, (batch, prompt_tokens))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.ones(batch, prompt_tokens, dtype=torch.long)
    ts = []
    for i in range(steps + 2):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        t = time.perf_counter()
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        if i >= 2:
            ts.append(time.perf_counter() - t)
    return min(ts) * 1000  # a ceiling: the best step seen (on a shared machine the median carries others' load)


@torch.inference_mode()
def engine_step_ms(model, batch: int, prompt_tokens: int, steps: int = 10) -> float:
    """Item 5: the engine's path, timed by decode_step.py (patches the model in place: call after the stock
    measurements). Like decode_step_ms: 2 warm-up steps, then the fastest of ``steps``."""
    from decode_step import run
    from llm_worker.engine import attention, linear

    attention.install(model)
    linear.install(model)
    return min(run(model, batch, steps + 2, prompt_tokens)[2:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=100)
    ap.add_argument("--batches", default="1,16,32,64")
    a = ap.parse_args()

    dtype = bench_dtype()  # the dtype the worker computes in on this CPU (bf16 where native, else fp32)
    gflops_fp32 = matmul_gflops()
    gflops = gflops_fp32 if dtype == "float32" else matmul_gflops(dtype=getattr(torch, dtype))
    gbps = copy_gbps()
    model, _ = load_bundled_model()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head counted once
    fpt = flop_per_token(model, a.prompt_tokens + a.decode_tokens // 2)
    res = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": dtype, "matmul_fp32_gflops": gflops_fp32,
        "matmul_gflops": gflops,
        "copy_gbps": gbps, "params": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes,
        "gflop_per_token": fpt / 1e9, "compute_ceiling_tok_s": gflops * 1e9 / fpt,
        "single_stream_ceiling_tok_s": gbps * 1e9 / weight_bytes, "decode": {},
    }
    decode_step_ms(model, 1, a.prompt_tokens, steps=6)  # warm-up: the first forward passes of a process are slow
    for b in [int(x) for x in a.batches.split(",")]:
        ms = decode_step_ms(model, b, a.prompt_tokens)
        res["decode"][str(b)] = {"step_ms": ms, "tok_s": b * 1000 / ms}
    best = max(res["decode"].items(), key=lambda kv: kv[1]["tok_s"])
    res["forward_ceiling_tok_s"], res["forward_ceiling_batch"] = best[1]["tok_s"], int(best[0])
    ms = engine_step_ms(model, 16, a.prompt_tokens)
    res["engine_decode_16"] = {"step_ms": ms, "tok_s": 16 * 1000 / ms}

    print(f"matmul (2048³ torch.mm, {res['threads']} threads): {dtype} {gflops:.1f} GFLOP/s, fp32 {gflops_fp32:.1f}; "
          f"memory copy {gbps:.1f} GB/s")
    print(f"model: {res['params'] / 1e6:.1f} M params, {weight_bytes / 1e6:.0f} MB {dtype}, "
          f"{res['gflop_per_token']:.3f} GFLOP per output token")
    print(f"compute ceiling (roofline) = {gflops:.1f} / {res['gflop_per_token']:.3f} = "
          f"{res['compute_ceiling_tok_s']:.0f} tok/s; single-stream ceiling = bandwidth / weights = "
          f"{res['single_stream_ceiling_tok_s']:.0f} tok/s")
    print("measured decode step (eager forward, no serving): " + "; ".join(
        f"B={b}: {d['step_ms']:.1f} ms → {d['tok_s']:.0f} tok/s" for b, d in res["decode"].items()))
    e = res["engine_decode_16"]
    print(f"the worker engine's own decode step, bare: B=16: {e['step_ms']:.1f} ms → {e['tok_s']:.0f} tok/s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
