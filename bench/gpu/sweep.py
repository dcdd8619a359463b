"""One-call sweep of the cuda-cb engine's configurations on the random-weight Qwen2.5-7B shape (bf16, EOS ignored).

For each configuration, under a shared wall-clock budget (a configuration starts only if enough time is left):
  start the engine (warm-up included) → single-stream decode (one greedy 200-prompt / 256-token request after a short
  priming request) → saturated throughput (a priming pass of N × P / 16 tokens, so CUDA graphs for the batch shapes
  are captured, then the measured pass of N × P / O, all submitted at once) → stop.
Then a profile of the first configuration that ran: torch.profiler over a short saturated pass and a short single
stream (top CUDA and CPU ops), and a sampler of the manager thread's Python stacks (where the host time goes).
Everything is printed and written to --out (JSON, rewritten after each step). ``--tiny`` is a CPU dry run.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (puts worker-py/src on sys.path)
from bench import QWEN25_7B, TINY, Recorder, build_model, random_prompts, saturated_run, sync  # noqa: E402
from llm_worker.engine.base import SamplingParams  # noqa: E402
from llm_worker.engine.cuda import VARLEN_ATTN, CudaCBConfig, CudaContinuousBatchingEngine, decode_kernel_self_test  # noqa: E402

T0 = time.monotonic()
RESULTS: dict = {"configs": {}}
OUT: list[Path] = []


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def save():
    if OUT:
        OUT[0].write_text(json.dumps(RESULTS, indent=2, default=str))


def left(budget):
    return budget - (time.monotonic() - T0)


# name, config kwargs: the new defaults first, the previous run's configuration second (same-machine baseline)
CONFIGS = [
    ("fastsampling_only", dict(decode_path="off")),
    ("new_mbt2048", dict()),
    ("baseline_mbt2048", dict(decode_path="off", fast_sampling=False)),
    ("new_mbt4096", dict(max_batch_tokens=4096)),
    ("decode_only", dict(fast_sampling=False)),
    ("new_mbt8192", dict(max_batch_tokens=8192)),
]
# Every configuration leaves 20 % of the memory free after the weights to activations and sampling temporaries (a
# decode batch of 1024 sequences sorts 1024 x 152k logits); the workload needs ~13 GB of the ~50 GB of cache left.
COMMON = dict(memory_fraction=0.8)


def time_decode_kernel(device, dtype, cases=((1, 456), (64, 400), (512, 300))):
    """One layer's paged decode attention (28 q heads, 4 KV heads, head 128, blocks of 64) on random data: median of
    20 CUDA-event timings; bytes = K and V of every cached token read once."""
    from llm_worker.engine.cuda.kernels import paged_decode_triton

    out = {}
    for batch, length in cases:
        bs, hkv, hq, d = 64, 4, 28, 128
        nb = (length + bs - 1) // bs
        blocks = batch * nb + 1
        kc = torch.randn((blocks + 2) * bs, hkv, d, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        table = torch.randperm(batch * nb, device=device).to(torch.int32).view(batch, nb)
        seq = torch.full((batch,), length, dtype=torch.int32, device=device)
        q = torch.randn(batch, hq, d, device=device, dtype=dtype)
        for _ in range(3):
            paged_decode_triton(q, kc, vc, table, seq, d ** -0.5, bs, blocks)
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            paged_decode_triton(q, kc, vc, table, seq, d ** -0.5, bs, blocks)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        med = sorted(times)[len(times) // 2]
        nbytes = 2 * batch * length * hkv * d * kc.element_size()
        out[f"B{batch}_L{length}"] = {"us": round(med * 1e6, 1), "GBps": round(nbytes / med / 1e9, 1)}
        del kc, vc
    return out


def install_step_counter(engine):
    """Counts the manager's generation steps by path (decode fast path vs varlen) and the query tokens they carried."""
    bp = engine.manager.batch_processor
    counts = collections.Counter()
    orig = bp._generation_step

    def step(model):
        io = bp.inputs_and_outputs
        counts["decode_steps" if io.use_block_table else "varlen_steps"] += 1
        return orig(model)

    bp._generation_step = step
    return counts


def counted(counts, fn):
    before = dict(counts)
    t = time.monotonic()
    out = fn()
    wall = time.monotonic() - t
    steps = {k: v - before.get(k, 0) for k, v in counts.items()}
    n = sum(steps.values())
    out["steps"] = {**steps, "ms_per_step": round(1000 * wall / n, 2) if n else None}
    return out


def single_stream(engine, prompt, n_new, prime=32):
    """One greedy request after a short priming one; rate from first to last emitted token."""
    out = {}
    for label, n in (("prime", prime), ("run", n_new)):
        rec = Recorder()
        rec.expected = 1
        rec.keep_tokens = True
        rid = f"single-{label}-{time.monotonic()}"
        rec.submit(engine, rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        if not rec.all_done.wait(90):
            raise TimeoutError("single stream did not finish")
        st = rec.stamps[rid]
        rate = (st[-1][1] - st[0][1]) / (st[-1][0] - st[0][0]) if len(st) > 1 else None
        out[label] = {"decode_tok_s": round(rate, 1) if rate else None, "tokens": rec.count[rid],
                      "ttft_s": round(rec.first[rid] - rec.submitted[rid], 4), "emits": len(st)}
        out["first_32"] = rec.tokens[rid][:32]
    out["decode_tok_s"] = out["run"]["decode_tok_s"]
    out["ms_per_token"] = round(1000 / out["decode_tok_s"], 2) if out["decode_tok_s"] else None
    return out


def run_config(model, name, kwargs, args, prompts, single_prompt, budget):
    res = {"kwargs": kwargs}
    RESULTS["configs"][name] = res
    t = time.monotonic()
    kwargs = {**COMMON, **kwargs}
    if args.no_decode:
        kwargs["decode_path"] = "off"
    cfg = CudaCBConfig(attn_implementation=VARLEN_ATTN, **kwargs)
    if args.tiny:
        cfg = CudaCBConfig(attn_implementation=VARLEN_ATTN, cpu_cache_bytes=64 << 20,
                           **{"max_batch_tokens": 256, **kwargs})
    engine = CudaContinuousBatchingEngine(model, cfg, eos_token_ids=[])
    try:
        engine.start()
        res["start_s"] = round(time.monotonic() - t, 1)
        res["cache"] = engine.cache_info
        log(f"{name}: started in {res['start_s']} s: {engine.cache_info}")
        counts = install_step_counter(engine)
        res["single"] = counted(counts, lambda: single_stream(engine, single_prompt, args.single_len))
        log(f"{name}: single stream {res['single']['decode_tok_s']} tok/s ({res['single']['ms_per_token']} ms/token)")
        save()
        prime = saturated_run(engine, prompts, 16 if not args.tiny else 4, min(25.0, max(5.0, left(budget) - 10)),
                              f"{name}-prime")
        res["saturated_prime"] = prime
        log(f"{name}: priming pass {prime}")
        cap = min(40.0, max(5.0, left(budget) - 8))
        sat = counted(counts, lambda: saturated_run(engine, prompts, args.out_len, cap, f"{name}-sat"))
        res["saturated"] = sat
        res["output_tok_s"] = sat["output_tok_s"] if not sat["cut_at_cap"] else None
        log(f"{name}: saturated {sat}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:800]
    return engine, res


def stop_engine(engine):
    try:
        engine.stop()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class StackSampler(threading.Thread):
    """Samples one thread's Python stack every ``interval`` s: counts of the innermost frame and of 3-frame stacks."""

    def __init__(self, ident, interval=0.004):
        super().__init__(daemon=True)
        self.target, self.interval = ident, interval
        self.leaf, self.stacks, self.samples = collections.Counter(), collections.Counter(), 0
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.wait(self.interval):
            frame = sys._current_frames().get(self.target)
            if frame is None:
                continue
            self.samples += 1
            names = []
            while frame is not None and len(names) < 3:
                co = frame.f_code
                names.append(f"{Path(co.co_filename).name}:{co.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            self.leaf[names[0].rsplit(":", 1)[0]] += 1
            self.stacks[" < ".join(names)] += 1

    def summary(self, top=15):
        n = max(1, self.samples)
        return {"samples": self.samples,
                "leaf": [(k, round(100 * v / n, 1)) for k, v in self.leaf.most_common(top)],
                "stacks": [(k, round(100 * v / n, 1)) for k, v in self.stacks.most_common(top)]}


def profile(engine, prompts, single_prompt, args, on_gpu):
    from torch.profiler import ProfilerActivity, profile as tprofile

    out = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    thread = engine.manager._generation_thread
    n_out = 24 if not args.tiny else 4
    for label, fn in (
        ("saturated", lambda: saturated_run(engine, prompts, n_out, 30.0, f"prof-{time.monotonic()}")),
        ("single", lambda: single_stream(engine, single_prompt, 64, prime=4)),
    ):
        sampler = StackSampler(thread.ident) if thread is not None else None
        if sampler:
            sampler.start()
        t = time.monotonic()
        with tprofile(activities=acts) as prof:
            info = fn()
            sync(engine.device)
        wall = time.monotonic() - t
        if sampler:
            sampler.stop_event.set()
            sampler.join()
        ka = prof.key_averages()
        sort_cuda = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        table_cuda = ka.table(sort_by=sort_cuda, row_limit=15, max_name_column_width=60)
        table_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        print(f"\n==== profile {label}: top by {sort_cuda} (wall {wall:.1f} s) ====\n{table_cuda}")
        print(f"\n==== profile {label}: top by self_cpu_time_total ====\n{table_cpu}")
        rows = []
        for e in sorted(ka, key=lambda e: getattr(e, sort_cuda, 0) or 0, reverse=True)[:25]:
            rows.append({"name": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
                         "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1000, 2)})
        out[label] = {"wall_s": round(wall, 2), "run": info, "top_device_ops": rows,
                      "table_device": table_cuda, "table_cpu": table_cpu,
                      "manager_thread_stacks": sampler.summary() if sampler else None}
        if sampler:
            print(f"\n==== manager thread Python stacks during {label} ({sampler.samples} samples) ====")
            for k, v in sampler.summary()["stacks"]:
                print(f"{v:5.1f}%  {k}")
        save()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out") + "/sweep_results.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--out-len", type=int, default=200)
    ap.add_argument("--single-len", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget of the whole script")
    ap.add_argument("--config-min-s", type=float, default=42.0, help="start a configuration only with this much left")
    ap.add_argument("--configs", default="", help="comma-separated subset of configuration names")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-config", default="new_mbt2048", help="profile after this configuration's runs")
    ap.add_argument("--no-decode", action="store_true", help="decode_path=off everywhere")
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    OUT.append(Path(args.out))
    bench.OUT_PATH.append(Path(args.out).with_name("sweep_bench_phases.json"))

    import transformers

    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = QWEN25_7B if not args.tiny else TINY
    RESULTS.update({
        "device": torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "argv": sys.argv, "dtype": str(dtype),
        "workload": {"requests": args.requests, "prompt_len": args.prompt_len, "out_len": args.out_len,
                     "single_stream_len": args.single_len},
    })
    log(f"device {RESULTS['device']} torch {torch.__version__} transformers {transformers.__version__}")
    probe = None
    if on_gpu and not args.no_decode:  # the Triton kernel's self-test in a child first: a fault there can't kill us
        import subprocess

        code = ("import sys, torch; sys.path.insert(0, %r); from llm_worker.engine.cuda.kernels import "
                "decode_kernel_self_test as t; "
                "print('SELFTEST', t(torch.device('cuda'), torch.bfloat16) or 'ok')"
                % str(HERE.parents[1] / "worker-py" / "src"))
        probe = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    t = time.monotonic()
    model = build_model(shape, device, dtype)
    sync(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    RESULTS["model"] = {"build_s": round(time.monotonic() - t, 1), "weight_bytes": weight_bytes}
    a = bench.bandwidth(device, weight_bytes, gib=4 if on_gpu else 0.25)
    RESULTS["bandwidth"] = a
    if probe is not None:
        try:
            text = probe.communicate(timeout=max(5.0, 90 - (time.monotonic() - T0)))[0]
        except Exception as e:  # noqa: BLE001
            probe.kill()
            text = f"probe failed: {e}"
        verdict = next((ln.split(" ", 1)[1] for ln in text.splitlines() if ln.startswith("SELFTEST ")), None)
        RESULTS["decode_kernel_child_self_test"] = {"verdict": verdict, "rc": probe.returncode, "tail": text[-1500:]}
        log(f"child self-test of the triton decode kernel: {verdict!r} rc={probe.returncode}")
        if verdict != "ok":
            args.no_decode = True
            log("decode fast path disabled for every configuration")
    if on_gpu and not args.no_decode:
        t = time.monotonic()
        RESULTS["decode_kernel_self_test"] = {"result": decode_kernel_self_test(device, dtype, "triton") or "ok",
                                              "s": round(time.monotonic() - t, 1)}
        log(f"triton decode kernel self-test: {RESULTS['decode_kernel_self_test']}")
        try:
            RESULTS["decode_kernel_timing"] = time_decode_kernel(device, dtype)
            log(f"triton decode kernel timing (one layer): {RESULTS['decode_kernel_timing']}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["decode_kernel_timing"] = {"error": f"{type(e).__name__}: {e}"}
    save()

    prompts = random_prompts(args.requests, args.prompt_len, shape["vocab_size"], seed=2)
    single_prompt = random_prompts(1, args.prompt_len, shape["vocab_size"], seed=1)[0]
    wanted = [c for c in args.configs.split(",") if c]
    configs = [(n, k) for n, k in CONFIGS if not wanted or n in wanted]
    profiled = args.no_profile
    for i, (name, kwargs) in enumerate(configs):
        need = args.config_min_s + (0 if profiled else 25)
        if left(args.budget_s) < need:
            log(f"skipping {name}: {left(args.budget_s):.0f} s left")
            RESULTS["configs"][name] = {"kwargs": kwargs, "skipped": "time budget"}
            continue
        engine, res = run_config(model, name, kwargs, args, prompts, single_prompt, args.budget_s)
        if not profiled and "error" not in res and name == args.profile_config:
            try:
                RESULTS["profile"] = {"config": name, **profile(engine, prompts, single_prompt, args, on_gpu)}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                RESULTS["profile"] = {"config": name, "error": f"{type(e).__name__}: {e}"}
            profiled = True
        stop_engine(engine)
        del engine
        save()

    ceiling = a.get("single_stream_ceiling_tok_s")
    rows = []
    for name, res in RESULTS["configs"].items():
        single = res.get("single", {}).get("decode_tok_s")
        rows.append({"config": name, "single_tok_s": single,
                     "single_pct_ceiling": round(100 * single / ceiling, 1) if single and ceiling else None,
                     "saturated_tok_s": res.get("output_tok_s"),
                     "sat_wall_s": res.get("saturated", {}).get("wall_s"),
                     "ttft_p50": res.get("saturated", {}).get("ttft_p50_s"),
                     "decode_path": res.get("cache", {}).get("decode_path"),
                     "start_s": res.get("start_s"), "error": res.get("error") or res.get("skipped")})
    RESULTS["summary"] = {"bandwidth_GBps": a.get("bandwidth_GBps"), "single_stream_ceiling_tok_s": ceiling,
                          "rows": rows}
    save()
    print(f"\n==== SUMMARY ({RESULTS['device']}, bandwidth {a.get('bandwidth_GBps')} GB/s, ceiling {ceiling} tok/s) ====")
    for r in rows:
        print(json.dumps(r))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
