"""GPU benchmark of the cuda-cb engine on a random-weight Qwen2.5-7B-Instruct-shaped model (bf16, EOS ignored).

Phases, each under its own time cap, each in try/except so one failure keeps the rest:
  (a) device-to-device copy bandwidth → single-stream decode ceiling = weight bytes ÷ bandwidth
  (b) single-stream decode tokens/s: plain model.generate (reference) and our engine
  (c) saturated throughput: N requests of ~P prompt / O output tokens through CudaContinuousBatchingEngine
  (d) `transformers serve --continuous-batching` on the same weights (saved to disk), N streaming clients
Prints everything and writes JSON to --out. ``--tiny`` runs the same code on CPU with a tiny config (a dry run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "worker-py" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from llm_worker.engine.cuda import VARLEN_ATTN, CudaCBConfig, CudaContinuousBatchingEngine  # noqa: E402

QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)

RESULTS: dict = {"phases": {}}
OUT_PATH: list[Path] = []


def save_results():
    if OUT_PATH:
        OUT_PATH[0].write_text(json.dumps(RESULTS, indent=2, default=str))
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def phase(name):
    """Decorator: run a phase, time it, record its result or its error."""
    def wrap(fn):
        def run(*a, **kw):
            log(f"=== phase {name}")
            t = time.monotonic()
            try:
                out = fn(*a, **kw)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                out = {"error": f"{type(e).__name__}: {e}"}
            out = out or {}
            out["phase_s"] = round(time.monotonic() - t, 1)
            RESULTS["phases"][name] = out
            log(f"--- {name}: {json.dumps(out, default=str)}")
            save_results()  # after every phase: a crash later (e.g. a CUDA assert) keeps what was measured
            return out
        return run
    return wrap


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_sliding_window=False)
    with torch.device(device):  # parameters are created (and randomly initialised) on the device directly
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def random_prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# --------------------------------------------------------------------------------------------------------- phase a
@phase("a_bandwidth")
def bandwidth(device, weight_bytes, gib):
    n = int(gib * (1 << 30)) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    med = statistics.median(times)
    bw = 2 * n * 4 / med  # bytes read + bytes written
    ceiling = bw / weight_bytes
    return {"copy_bytes": n * 4, "copy_median_s": med, "bandwidth_GBps": round(bw / 1e9, 1),
            "weight_bytes": weight_bytes, "single_stream_ceiling_tok_s": round(ceiling, 1),
            "how": "median of 10 device-to-device copies, bytes read + written; ceiling = bandwidth / weight bytes"}


# --------------------------------------------------------------------------------------------------------- phase b
@phase("b_generate_reference")
def generate_reference(model, prompt, n_new):
    model.set_attn_implementation("sdpa")
    x = torch.tensor([prompt], device=model.device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(k):
        sync(model.device)
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=k, min_new_tokens=k, **kw)
        sync(model.device)
        assert out.shape[1] == len(prompt) + k
        return time.perf_counter() - t

    timed(4)  # warm-up
    t1, tn = timed(1), timed(n_new + 1)
    greedy = model.generate(x, max_new_tokens=32, min_new_tokens=32, **kw)[0, len(prompt):].tolist()
    return {"decode_tok_s": round(n_new / (tn - t1), 1), "tokens": n_new, "prefill_s": round(t1, 4),
            "greedy_first_32": greedy,
            "how": "model.generate greedy, sdpa, dynamic cache; (t(n+1) - t(1)) over n decode tokens"}


class Recorder:
    """emit() target: per request, time of each emit and token counts; an event per finished request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.first, self.last, self.count, self.finish, self.submitted = {}, {}, {}, {}, {}
        self.stamps: dict[str, list[tuple[float, int]]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.all_done = threading.Event()
        self.expected = 0
        self.keep_tokens = False

    def submit(self, engine, rid, ids, params):
        self.submitted[rid] = time.perf_counter()
        engine.submit(GenerationRequest(rid, ids, params), self)

    def __call__(self, rid, outputs):
        now = time.perf_counter()
        with self.lock:
            for o in outputs:
                if o.token_ids:
                    self.first.setdefault(rid, now)
                    self.last[rid] = now
                    self.count[rid] = self.count.get(rid, 0) + len(o.token_ids)
                    self.stamps.setdefault(rid, []).append((now, self.count[rid]))
                    if self.keep_tokens:
                        self.tokens.setdefault(rid, []).extend(o.token_ids)
                if o.finish_reason is not None:
                    self.finish[rid] = o.finish_reason
            if self.expected and len(self.finish) >= self.expected:
                self.all_done.set()


@phase("b_engine_single_stream")
def engine_single_stream(engine, prompt, n_new, reference=None, runs=2):
    out = {}
    for r in range(runs):
        rec = Recorder()
        rec.expected = 1
        rec.keep_tokens = True
        rec.submit(engine, f"single-{r}", prompt, SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True))
        if not rec.all_done.wait(120):
            raise TimeoutError("single stream did not finish")
        rid = f"single-{r}"
        st = rec.stamps[rid]
        # decode rate from the first emitted token to the last: excludes prefill / time to first token
        n_after_first = st[-1][1] - st[0][1]
        rate = n_after_first / (st[-1][0] - st[0][0])
        out[f"run{r}"] = {"decode_tok_s": round(rate, 1), "ttft_s": round(rec.first[rid] - rec.submitted[rid], 4),
                          "tokens": rec.count[rid], "finish": rec.finish[rid], "emits": len(st)}
        if reference:
            got = rec.tokens[rid][: len(reference)]
            same = next((i for i, (x, y) in enumerate(zip(got, reference)) if x != y), len(reference))
            out[f"run{r}"]["greedy_prefix_equal_to_generate"] = f"{same}/{len(reference)}"
    out["decode_tok_s"] = out[f"run{runs - 1}"]["decode_tok_s"]
    out["how"] = ("one greedy request (argmax when the batch is all greedy, else top_k=1), ignore_eos; "
                  "last run reported")
    return out


# --------------------------------------------------------------------------------------------------------- phase c
def saturated_run(engine, prompts, n_out, cap_s, label):
    rec = Recorder()
    rec.expected = len(prompts)
    params = SamplingParams(max_tokens=n_out, temperature=1.0, top_p=1.0, ignore_eos=True)
    peak = {"running": 0, "kv": 0}
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        rec.submit(engine, f"{label}-{i}", ids, params)
    while not rec.all_done.wait(0.25):
        s = engine.stats()
        peak["running"] = max(peak["running"], s.running_sequences)
        peak["kv"] = max(peak["kv"], s.kv_cache_bytes)
        if time.perf_counter() - t0 > cap_s:
            break
    wall = time.perf_counter() - t0
    total = sum(rec.count.values())
    ttft = sorted(rec.first[r] - rec.submitted[r] for r in rec.first)
    finished = len(rec.finish)
    if finished < len(prompts):
        for i in range(len(prompts)):
            engine.cancel(f"{label}-{i}")
        time.sleep(1.0)
    pct = lambda v, q: round(v[min(len(v) - 1, int(q / 100 * (len(v) - 1)))], 3) if v else None  # noqa: E731
    return {"requests": len(prompts), "finished": finished, "cut_at_cap": finished < len(prompts),
            "wall_s": round(wall, 2), "output_tokens": total, "output_tok_s": round(total / wall, 1),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "peak_running_sequences": peak["running"],
            "peak_kv_cache_GB": round(peak["kv"] / 1e9, 2),
            "finish_reasons": sorted(set(rec.finish.values()))}


@phase("c_engine_saturated")
def engine_saturated(engine, prompts, n_out, cap_s):
    t0 = time.monotonic()
    out = {"cold": saturated_run(engine, prompts, n_out, cap_s * 0.55, "cold")}
    log(f"cold run: {out['cold']}")
    left = cap_s - (time.monotonic() - t0)
    if out["cold"]["wall_s"] < left * 0.9:
        out["warm"] = saturated_run(engine, prompts, n_out, left, "warm")
        log(f"warm run: {out['warm']}")
    best = out.get("warm") if out.get("warm") and not out["warm"]["cut_at_cap"] else out["cold"]
    out["output_tok_s"] = best["output_tok_s"]
    out["how"] = ("all requests submitted at once; output tokens / wall time from first submit to last finish; "
                  "cold = first pass (CUDA graphs captured on the way), warm = second pass")
    return out


def start_engine(model, attempts, smoke_prompt):
    """Start the first engine configuration that survives a short smoke request; record each attempt."""
    tried = []
    for name, cfg in attempts:
        t = time.monotonic()
        eng = None
        try:
            eng = CudaContinuousBatchingEngine(model, cfg, eos_token_ids=[])
            eng.start()
            rec = Recorder()
            rec.expected = 1
            rec.submit(eng, f"smoke-{name}", smoke_prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                                          ignore_eos=True))
            if not rec.all_done.wait(180) or rec.count.get(f"smoke-{name}", 0) != 8:
                raise RuntimeError(f"smoke request failed: {rec.finish} {rec.count} {eng.last_error}")
            tried.append({"name": name, "ok": True, "start_s": round(time.monotonic() - t, 1),
                          "cache": eng.cache_info})
            return eng, tried
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            tried.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
            if eng is not None:
                try:
                    eng.stop()
                except Exception:  # noqa: BLE001
                    pass
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return None, tried


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out") + "/gpu_results.json")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with a tiny config")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--out-len", type=int, default=200)
    ap.add_argument("--single-len", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=400, help="wall-clock budget for the whole script")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--serve-args", default="", help="extra flags for transformers serve (e.g. --cb-num-blocks 64)")
    ap.add_argument("--site", default=os.environ.get("SERVE_SITE"), help="PYTHONPATH for the serve subprocess")
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.append(Path(args.out))

    import transformers

    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = QWEN25_7B if not args.tiny else TINY
    RESULTS.update({
        "device": torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "argv": sys.argv, "model_shape": shape,
        "dtype": str(dtype), "workload": {"requests": args.requests, "prompt_len": args.prompt_len,
                                          "out_len": args.out_len, "single_stream_len": args.single_len},
    })
    log(f"device {RESULTS['device']} torch {torch.__version__} transformers {transformers.__version__}")

    t = time.monotonic()
    model = build_model(shape, device, dtype)
    sync(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    RESULTS["model"] = {"build_s": round(time.monotonic() - t, 1), "parameters": sum(p.numel() for p in model.parameters()),
                        "weight_bytes": weight_bytes}
    log(f"model built: {RESULTS['model']}")

    a = bandwidth(device, weight_bytes, gib=4 if on_gpu else 0.25)
    single_prompt = random_prompts(1, args.prompt_len, shape["vocab_size"], seed=1)[0]
    ref = generate_reference(model, single_prompt, 128 if on_gpu else 16)

    attempts = [("varlen_flash+cuda_graphs", CudaCBConfig(attn_implementation=VARLEN_ATTN)),
                ("varlen_flash_eager", CudaCBConfig(attn_implementation=VARLEN_ATTN, use_cuda_graph=False,
                                                    use_async_batching=False)),
                ("paged_sdpa", CudaCBConfig(attn_implementation="paged|sdpa"))]
    if not on_gpu:
        attempts = [("tiny_cpu_varlen", CudaCBConfig(attn_implementation=VARLEN_ATTN, max_batch_tokens=256,
                                                     cpu_cache_bytes=64 << 20))]
    engine, tried = start_engine(model, attempts, single_prompt[:32])
    RESULTS["engine_attempts"] = tried
    save_results()
    if engine is not None:
        b = engine_single_stream(engine, single_prompt, args.single_len if on_gpu else 32,
                                 reference=ref.get("greedy_first_32"))
        left = args.budget_s - (time.monotonic() - T0)
        cap_c = min(160.0, max(30.0, left - 200)) if not args.skip_serve else max(30.0, left - 20)
        prompts = random_prompts(args.requests, args.prompt_len, shape["vocab_size"], seed=2)
        c = engine_saturated(engine, prompts, args.out_len, cap_c)
        try:
            engine.stop()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    else:
        b = c = {}
    del engine

    if not args.skip_serve:
        serve_phase(model, shape, args, device)
    else:
        del model

    summarize(a, b, c)
    save_results()
    log(f"wrote {args.out}")


def serve_phase(model, shape, args, device):
    folder = Path("/tmp/qwen25-7b-random" if not args.tiny else "/tmp/qwen-tiny-random")

    @phase("d_save_model")
    def save():
        from serve_bench import write_tokenizer

        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, max_shard_size="4GB")
        write_tokenizer(folder, shape["vocab_size"])
        out = {"folder": str(folder), "bytes": sum(f.stat().st_size for f in folder.iterdir())}
        return out

    saved = save()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        RESULTS["gpu_memory_before_serve_GB"] = {"free": round(free / 1e9, 1), "total": round(total / 1e9, 1)}
        log(f"GPU memory before serve: {RESULTS['gpu_memory_before_serve_GB']}")
    if "error" in saved:
        return

    @phase("d_transformers_serve_cb")
    def serve():
        from serve_bench import run_serve_phase

        left = args.budget_s - (time.monotonic() - T0)
        out_dir = Path(args.out).parent
        return run_serve_phase(str(folder), device="cuda" if device.type == "cuda" else "cpu",
                               n_requests=args.requests, prompt_len=args.prompt_len, out_len=args.out_len,
                               vocab=shape["vocab_size"], budget_s=max(30.0, left - 15), site=args.site,
                               log_path=str(out_dir / "serve.log"), extra_args=args.serve_args.split())

    serve()


def summarize(a, b, c):
    ceiling = a.get("single_stream_ceiling_tok_s")
    single = b.get("decode_tok_s")
    sat = c.get("output_tok_s")
    serve = RESULTS["phases"].get("d_transformers_serve_cb", {})
    summary = {
        "device": RESULTS["device"], "bandwidth_GBps": a.get("bandwidth_GBps"),
        "single_stream_ceiling_tok_s": ceiling,
        "generate_single_stream_tok_s": RESULTS["phases"].get("b_generate_reference", {}).get("decode_tok_s"),
        "engine_single_stream_tok_s": single,
        "engine_single_stream_pct_of_ceiling": round(100 * single / ceiling, 1) if single and ceiling else None,
        "engine_saturated_output_tok_s": sat,
        "serve_cb_output_tok_s": serve.get("output_tok_s"),
        "target_saturated_7000": (sat >= 7000) if sat else None,
        "target_single_stream_60pct": (single >= 0.6 * ceiling) if single and ceiling else None,
    }
    RESULTS["summary"] = summary
    print("\n==== SUMMARY ====")
    for k, v in summary.items():
        print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
