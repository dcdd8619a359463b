"""The CPU benchmark, all of it in one run (called by bench/cpu/run.sh; see bench/README.md for what each figure means).

Phases, in order, one server at a time so that none competes with another for the 2 cores:
  ceiling      this CPU's ceilings for the model (cpu/ceiling.py)
  tutorial     (b) one process, one model.generate per request, one at a time (baselines/tutorial_server.py)
  serve        (c) `transformers serve`, no continuous batching
  serve-cb-*   (c) `transformers serve --continuous-batching`, cache sized for this machine (a few sizes)
  ours         (a) our stack: Redis + worker (real model, default settings) + gateway, as `npm start` runs them
  standin-16   our stack with the worker's benchmark stand-in engine (ENGINE=standin): stack overhead at 16 streams,
               the clients' starts spread over one request's duration (--standin-ramp-s)
  standin-200  the same at 200 streams
  standin-*-burst  the same with every client starting at once (for information; --no-standin-burst skips them)
Prints a table and the targets, appends a dated section to bench/RESULTS.md, writes bench/out/cpu-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional

from bench_paths import BENCH, HERE, OUT, ROOT

import loadgen  # noqa: E402
from bench_model import bench_dtype  # noqa: E402
from machine import CpuMeter, boost, machine_summary, wait_idle  # noqa: E402

PY = sys.executable
MODEL_ID = "smollm2-135m-instruct"
# transformers serve --continuous-batching on CPU: the default sizing is for a GPU (OOM-killed at 21 GB here, see
# ../shared/FACTS.md). Needed here: 16 streams × (~64 prompt + 100 output) ≈ 2,600 tokens = 82 blocks of 32.
SERVE_CB_CONFIGS = {
    "serve-cb-512": ["--cb-num-blocks", "256", "--cb-block-size", "32", "--cb-max-batch-tokens", "512"],
    "serve-cb-1024": ["--cb-num-blocks", "256", "--cb-block-size", "32", "--cb-max-batch-tokens", "1024"],
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def http_ok(url: str, headers: Optional[dict] = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


class Server:
    """A server process in its own session; stop() ends its whole process group."""

    def __init__(self, name: str, cmd: list[str], env: Optional[dict] = None):
        self.name, self.cmd = name, cmd
        self.log_path = os.path.join(OUT, f"{name}.log")
        self.fh = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_http(self, url: str, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
            if http_ok(url):
                return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.fh.close()


class Stack:
    """Our stack through bench/cpu/stack_up.mjs (scripts/lib/stack.mjs helpers); SIGTERM makes it stop all it started."""

    def __init__(self, name: str, env: dict):
        self.name = name
        self.log_path = os.path.join(OUT, f"{name}.stack.log")
        self.fh = open(self.log_path, "w")
        self.proc = subprocess.Popen(["node", os.path.join(HERE, "stack_up.mjs")], cwd=ROOT,
                                     env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=self.fh, text=True)

    def wait(self, timeout_s: float) -> dict:
        t0 = time.monotonic()
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # ends when stack_up exits
            if line.startswith("STACK "):
                return json.loads(line[6:])
            self.fh.write(line)
            if time.monotonic() - t0 > timeout_s:
                break
        self.stop()
        raise RuntimeError(f"our stack did not start; see {self.log_path} and .run/bench-worker.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fh.close()


def measure(name: str, label: str, base_url: str, flavor: str, roots: list[int], a, *, concurrency: int,
            requests: int, model: Optional[str] = None, api_key: Optional[str] = None,
            redis_url: Optional[str] = None, gateway_log: Optional[str] = None, ramp_s: float = 0.0) -> dict[str, Any]:
    how = f", clients starting over {ramp_s:g} s" if ramp_s else ""
    log(f"{name}: {concurrency} concurrent streams{how}, {requests} requests × {a.max_tokens} output tokens…")
    with CpuMeter(roots) as cpu:
        reqs, t0, t1 = asyncio.run(loadgen.run_load(base_url, flavor=flavor, concurrency=concurrency, requests=requests,
                                                    max_tokens=a.max_tokens, model=model, api_key=api_key,
                                                    ramp_s=ramp_s))
    slots = loadgen.fetch_worker_timing(redis_url, "gen." + MODEL_ID, reqs) if redis_url else None
    if gateway_log:
        time.sleep(0.5)  # the last requests' log lines
        loadgen.fetch_gateway_stamps(gateway_log, reqs)
    s = loadgen.summarize(reqs, t0, t1, slots)
    s["ramp_s"] = ramp_s
    print(f"  {name}: {loadgen.fmt(s)}\n    {cpu.note()}", flush=True)
    per = [{"job": r.job_id, "ttft_ms": (r.first - r.sent) * 1000 if r.first else None, "chunks": len(r.chunk_times),
            "tokens": r.completion_tokens, "error": r.error, "worker": getattr(r, "worker", None),
            "gateway": getattr(r, "gateway", None), "sent_wall_ms": r.sent_wall_ms, "first_wall_ms": r.first_wall_ms}
           for r in reqs]
    return {"name": name, "label": label, "concurrency": concurrency, "summary": s, "cpu": cpu.note(),
            "foreign_cpu_pct": cpu.foreign_pct, "requests": per}


def phase_ceiling(a) -> dict:
    path = os.path.join(OUT, "ceiling.json")
    log("ceiling: fp32 matmul, memory copy, and the model's batched decode step…")
    with CpuMeter([]) as cpu:
        subprocess.run([PY, os.path.join(HERE, "ceiling.py"), "--json", path, "--batches", a.ceiling_batches],
                       cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    res = json.load(open(path))
    res["cpu"] = cpu.note()
    return res


def apply_nice(n: int) -> int:
    """Sets this process's priority (inherited by every server started after); returns the priority in force."""
    cur = os.getpriority(os.PRIO_PROCESS, 0)
    if n and n != cur:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, n)
        except PermissionError:
            log(f"cannot set priority {n} (not root); running at {cur}")
    now = os.getpriority(os.PRIO_PROCESS, 0)
    boost([os.getpid()], now)  # our own session's autogroup too (see machine.boost)
    log(f"scheduling priority (nice) of the benchmark and its servers: {now} (process and autogroup)")
    return now


def phase_tutorial(a) -> list[dict]:
    port = free_port()
    srv = Server("tutorial", [PY, os.path.join(BENCH, "baselines", "tutorial_server.py"), "--port", str(port)])
    try:
        srv.wait_http(f"http://127.0.0.1:{port}/v1/models", 600)
        boost([srv.proc.pid], a.nice_applied)
        return [measure("tutorial", "(b) tutorial: one generate at a time", f"http://127.0.0.1:{port}/v1", "tutorial",
                        [srv.proc.pid], a, concurrency=a.concurrency, requests=a.requests_sequential)]
    finally:
        srv.stop()


def phase_serve(a, name: str, extra: list[str]) -> list[dict]:
    model_dir = os.path.join(OUT, "smollm2-hf")
    subprocess.run([PY, os.path.join(BENCH, "export_model.py"), model_dir], cwd=ROOT, check=True,
                   stderr=subprocess.DEVNULL)
    hf_home = os.path.join(OUT, "hf")
    os.makedirs(os.path.join(hf_home, "hub"), exist_ok=True)  # /v1/models answers 500 until the hub cache exists
    port = free_port()
    cmd = [PY, "-m", "transformers.cli.transformers", "serve", model_dir, "--device", "cpu", "--dtype", bench_dtype(),
           "--host", "127.0.0.1", "--port", str(port), *extra]
    srv = Server(name, cmd, env={"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"})
    try:
        srv.wait_http(f"http://127.0.0.1:{port}/v1/models", 600)
        boost([srv.proc.pid], a.nice_applied)
        cb = "--continuous-batching" in extra
        label = "(c) transformers serve" + (" --continuous-batching " + " ".join(extra[1:]) if cb else "")
        return [measure(name, label, f"http://127.0.0.1:{port}/v1", "hf-serve", [srv.proc.pid], a,
                        concurrency=a.concurrency, requests=a.requests if cb else a.requests_sequential)]
    finally:
        srv.stop()


def phase_ours(a) -> list[dict]:
    st = Stack("ours", {})
    try:
        info = st.wait(600)
        boost([st.proc.pid], a.nice_applied)
        return [measure("ours", "(a) this stack (gateway + Redis/BullMQ + worker)", info["baseUrl"], "ours",
                        [st.proc.pid], a, concurrency=a.concurrency, requests=a.requests, model=MODEL_ID,
                        api_key=info["apiKey"], redis_url=info["redisUrl"])]
    finally:
        st.stop()


def phase_standin(a, notes: list[str]) -> list[dict]:
    levels = [int(x) for x in a.standin_levels.split(",")]
    env = {"ENGINE": "standin", "MAX_BATCH": str(max(levels + [16]) + 56), "STANDIN_STEP_MS": str(a.standin_step_ms)}
    st = Stack("standin", env)
    try:
        info = st.wait(600)
        how = "ENGINE=standin"
    except RuntimeError:
        # The worker's factory does not know ENGINE=standin yet: same worker code through bench/cpu/standin_worker.py.
        st = Stack("standin-shim", {**env, "ENGINE": "auto", "BENCH_STANDIN_SHIM": "1"})
        info = st.wait(600)
        how = "bench/cpu/standin_worker.py (ENGINE=standin not accepted by the worker yet)"
        notes.append("stand-in engine selected through " + how)
    boost([st.proc.pid], a.nice_applied)
    log(f"standin: worker runs the stand-in engine via {how}, one token per {a.standin_step_ms:g} ms per stream")
    # Clients start spread over one request's duration (the stand-in's fixed rate and the fixed output length would
    # otherwise keep them in lockstep: every round one burst of `c` requests). The burst rows (all clients at once)
    # follow for information.
    ramp = a.standin_ramp_s if a.standin_ramp_s >= 0 else a.max_tokens * a.standin_step_ms / 1000
    try:
        out = []
        runs = [(c, ramp) for c in levels] + ([(c, 0.0) for c in levels] if a.standin_burst and ramp > 0 else [])
        for c, r in runs:
            start = f", clients start over {r:g} s" if r else ", all clients start at once"
            out.append(measure(f"standin-{c}" + ("" if r else "-burst"),
                               f"(a) this stack, stand-in engine ({a.standin_step_ms:g} ms/token{start})",
                               info["baseUrl"], "ours", [st.proc.pid], a, concurrency=c, requests=c * a.standin_rounds,
                               model=MODEL_ID, api_key=info["apiKey"], redis_url=info["redisUrl"],
                               gateway_log=info.get("gatewayLog"), ramp_s=r))
        return out
    finally:
        st.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _f(v, d=0) -> str:
    return "—" if v is None else f"{v:,.{d}f}"


def table(results: list[dict]) -> str:
    rows = ["| system | streams | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms, per chunk) | TPOT p50 / p99 (ms) "
            "| tok/chunk | tokens/req | stack overhead p50 / p99 (ms) | requests (errors) | CPU during the run |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        over = f"{_f(s.get('overhead_p50_ms'), 1)} / {_f(s.get('overhead_p99_ms'), 1)}" if "overhead_p50_ms" in s else "—"
        rows.append(f"| {r['label']} | {r['concurrency']} | **{_f(s['tok_per_s'], 1)}** | {_f(s['ttft_p50_ms'])} / "
                    f"{_f(s['ttft_p99_ms'])} | {_f(s['itl_p50_ms'], 1)} / {_f(s['itl_p99_ms'], 1)} | "
                    f"{_f(s['tpot_p50_ms'], 1)} / {_f(s['tpot_p99_ms'], 1)} | {_f(s['tokens_per_chunk'], 2)} | "
                    f"{s['completion_tokens_min']}–{s['completion_tokens_max']} | {over} | {s['requests']} "
                    f"({s['errors']}) | {r['cpu']} |")
    return "\n".join(rows)


def targets(results: list[dict], ceiling: Optional[dict]) -> list[str]:
    by = {r["name"]: r["summary"] for r in results}
    out = []

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    ours = by.get("ours")
    if ours and ceiling:
        c = ceiling["compute_ceiling_tok_s"]
        f16 = ceiling["decode"].get("16", {}).get("tok_s")
        e16 = ceiling.get("engine_decode_16", {}).get("tok_s")
        line = (f"- ≥ 60% of the compute ceiling: {ours['tok_per_s']:.1f} tok/s = "
                f"{100 * ours['tok_per_s'] / c:.0f}% of {c:.0f} tok/s (matmul roofline) → "
                f"{verdict(ours['tok_per_s'] >= 0.6 * c)}")
        if e16:
            line += (f"; {100 * ours['tok_per_s'] / e16:.0f}% of the fastest measured forward pass at 16 sequences "
                     f"(the engine's own step, bare: {e16:.0f} tok/s) → {verdict(ours['tok_per_s'] >= 0.6 * e16)}")
        if f16:
            line += f"; {100 * ours['tok_per_s'] / f16:.0f}% of the stock Transformers forward at 16 ({f16:.0f} tok/s)"
        out.append(line)
    serves = [(n, s) for n, s in by.items() if n.startswith("serve") and not s["errors"]]
    if ours and serves:
        n, best = max(serves, key=lambda kv: kv[1]["tok_per_s"])
        ok = ours["tok_per_s"] > best["tok_per_s"] and (ours["ttft_p50_ms"] or 1e18) <= (best["ttft_p50_ms"] or 0)
        out.append(f"- ahead of (c)'s best ({n}: {best['tok_per_s']:.1f} tok/s, TTFT p50 {_f(best['ttft_p50_ms'])} ms) "
                   f"with TTFT p50 no worse: ours {ours['tok_per_s']:.1f} tok/s, TTFT p50 {_f(ours['ttft_p50_ms'])} ms "
                   f"→ {verdict(ok)}")
    tut = by.get("tutorial")
    if ours and tut and tut["tok_per_s"]:
        x = ours["tok_per_s"] / tut["tok_per_s"]
        out.append(f"- ≥ 5× (b): {x:.1f}× ({ours['tok_per_s']:.1f} vs {tut['tok_per_s']:.1f} tok/s) → {verdict(x >= 5)}")
    for n, s in by.items():
        if n.startswith("standin") and "overhead_p50_ms" in s:
            ok = s["overhead_p50_ms"] <= 3 and s["overhead_p99_ms"] <= 15
            burst = n.endswith("-burst")
            start = (f"clients started over {s['ramp_s']:g} s" if s.get("ramp_s") else "all clients started at once")
            where = f"Where (p50 / p99 ms): " + ", ".join(
                f"{label} {_f(s.get(f'stage_{k}_p50_ms'), 1)} / {_f(s.get(f'stage_{k}_p99_ms'), 1)}"
                for k, label in loadgen.STAGE_PARTS.items()) if "stages_n" in s else (
                f"Where: request sent → gateway stamps enqueued_at p50 {_f(s.get('sent_to_enqueued_p50_ms'), 1)}, "
                f"→ worker picks the job up p50 {_f(s.get('enqueue_to_pickup_p50_ms'), 1)}, worker's first token → "
                f"client p50 {_f(s.get('overhead_out_p50_ms'), 1)}")
            out.append(f"- {'(for information) ' if burst else ''}stack TTFT overhead at {n.split('-')[1]} streams "
                       f"(stand-in engine, {start}): p50 {s['overhead_p50_ms']:.1f} ms (≤ 3), p99 "
                       f"{s['overhead_p99_ms']:.1f} ms (≤ 15)" + ("" if burst else f" → {verdict(ok)}") +
                       f"; queue wait (no free slot of {s.get('queue_slots') or '?'}, excluded): p50 "
                       f"{_f(s.get('queue_wait_p50_ms'), 1)}, p99 {_f(s.get('queue_wait_p99_ms'), 1)} ms, "
                       f"{s.get('queue_waited_n')} of {s.get('overhead_n')} jobs. {where}; not counted, the "
                       f"worker's own pickup → first token with an engine that answers at once: p50 "
                       f"{_f(s.get('worker_ttft_p50_ms'), 1)} ms")
    if ours and "overhead_p50_ms" in ours:
        out.append(f"- (for information) stack TTFT overhead with the real model at {a_conc(results)} streams: p50 "
                   f"{ours['overhead_p50_ms']:.1f} ms, p99 {ours['overhead_p99_ms']:.1f} ms — the model's forward passes "
                   "share the 2 cores with the gateway and Redis, so this is not the stack's own cost")
    return out


def a_conc(results: list[dict]) -> int:
    return next((r["concurrency"] for r in results if r["name"] == "ours"), 0)


def ceiling_lines(c: dict) -> list[str]:
    dec = "; ".join(f"B={b}: {d['step_ms']:.0f} ms/step → {d['tok_s']:.0f} tok/s" for b, d in c["decode"].items())
    dtype, gflops = c.get("dtype", "float32"), c.get("matmul_gflops", c["matmul_fp32_gflops"])
    return [f"- every server computes in {dtype} (bench_model.bench_dtype(): the worker's DTYPE=auto on this CPU)",
            f"- matmul (2048³ `torch.mm`, {c['threads']} threads): {dtype} {gflops:.1f} GFLOP/s, fp32 "
            f"{c['matmul_fp32_gflops']:.1f} GFLOP/s; memory copy {c['copy_gbps']:.1f} GB/s",
            f"- model: {c['params'] / 1e6:.1f} M parameters, {c['weight_bytes'] / 1e6:.0f} MB in {dtype}, "
            f"{c['gflop_per_token']:.3f} GFLOP per output token (2 × Linear weights + attention at the benchmark's context)",
            f"- **compute ceiling = {gflops:.1f} / {c['gflop_per_token']:.3f} = "
            f"{c['compute_ceiling_tok_s']:.0f} output tok/s**; single-stream ceiling (bandwidth ÷ weight bytes) = "
            f"{c['single_stream_ceiling_tok_s']:.0f} tok/s",
            f"- the model's bare decode step (eager PyTorch, DynamicCache, no serving): {dec}",
            *([f"- the worker engine's own decode step, bare (packed linear layers, decode attention): B=16: "
               f"{c['engine_decode_16']['step_ms']:.0f} ms/step → {c['engine_decode_16']['tok_s']:.0f} tok/s"]
              if c.get("engine_decode_16") else []),
            f"- {c.get('cpu', '')}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="ceiling,tutorial,serve,serve-cb,ours,standin")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="per batching server (2 waves of 16)")
    ap.add_argument("--requests-sequential", type=int, default=16,
                    help="for the two one-at-a-time servers (b) and (c) without batching, to fit the time budget")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--standin-levels", default="16,200")
    ap.add_argument("--standin-rounds", type=int, default=3, help="requests per stream at each stand-in level")
    ap.add_argument("--standin-step-ms", type=float, default=20.0)
    ap.add_argument("--standin-ramp-s", type=float, default=-1,
                    help="stand-in levels: spread the clients' starts over this many seconds (default: one request's "
                         "duration, max_tokens × step; 0 = all at once)")
    ap.add_argument("--no-standin-burst", dest="standin_burst", action="store_false",
                    help="skip the stand-in rows with all clients starting at once")
    ap.add_argument("--ceiling-batches", default="1,16,32")
    ap.add_argument("--serve-cb", default=",".join(SERVE_CB_CONFIGS))
    ap.add_argument("--wait-idle", type=float, default=120, help="seconds to wait for other processes to go quiet")
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling priority of the benchmark and every server it starts (children inherit it): on a "
                         "shared machine a negative value keeps other processes from taking the cores mid-run; 0 = leave")
    ap.add_argument("--no-results-md", action="store_true")
    a = ap.parse_args()
    # SIGTERM like Ctrl-C: unwind, so each phase's `finally` stops the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    os.makedirs(OUT, exist_ok=True)
    phases = a.phases.split(",")
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    log(f"machine: {machine_summary()}")
    a.nice_applied = apply_nice(a.nice)
    idle = wait_idle(a.wait_idle, log=log)
    log(f"other processes at start: {idle:.0f}% of the CPUs")

    ceiling, results, notes = None, [], []
    steps = {
        "ceiling": None,
        "tutorial": lambda: phase_tutorial(a),
        "serve": lambda: phase_serve(a, "serve", []),
        "serve-cb": lambda: [r for n in a.serve_cb.split(",") if n
                             for r in phase_serve(a, n, ["--continuous-batching", *SERVE_CB_CONFIGS[n]])],
        "ours": lambda: phase_ours(a),
        "standin": lambda: phase_standin(a, notes),
    }
    for p in phases:
        try:
            if p == "ceiling":
                ceiling = phase_ceiling(a)
                for line in ceiling_lines(ceiling):
                    print("  " + line, flush=True)
            else:
                results.extend(steps[p]())
        except Exception as exc:  # noqa: BLE001 — one failed phase must not lose the others' figures
            log(f"{p}: FAILED: {exc}")
            notes.append(f"phase `{p}` failed: {exc}")

    took = time.monotonic() - t_start
    tgt = targets(results, ceiling)
    print("\n" + table(results) + "\n")
    if ceiling:
        print("\n".join(ceiling_lines(ceiling)))
    print("\nTargets (issue 4):\n" + "\n".join(tgt))
    log(f"done in {took / 60:.1f} min")

    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(OUT, f"cpu-{stamp}.json"), "w") as fh:
        json.dump({"started": started.isoformat(), "ceiling": ceiling, "results": results, "notes": notes}, fh, indent=2)
    if not a.no_results_md:
        append_results(started, took, a, ceiling, results, tgt, notes, idle)


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "?"


def append_results(started, took, a, ceiling, results, tgt, notes, idle) -> None:
    cmd = "bench/cpu/run.sh" + ("" if len(sys.argv) == 1 else " " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    parts = [f"\n## CPU benchmark — {started.strftime('%Y-%m-%d %H:%M UTC')}\n",
             f"- machine: {machine_summary()}",
             f"- command: `{cmd}` (took {took / 60:.1f} min); code: {git_rev()}",
             f"- load: {a.concurrency} concurrent streaming requests (closed loop), same prompt but for a unique request number "
             f"({next((r['summary']['prompt_tokens'] for r in results if r['summary'].get('prompt_tokens')), '?')} prompt "
             f"tokens), exactly {a.max_tokens} output tokens each (EOS ignored), greedy; bench/loadgen.py",
             f"- other processes used {idle:.0f}% of the CPUs when the run started (per-phase figures in the last column); "
             f"the benchmark and its servers ran at nice {a.nice_applied}",
             ""]
    if ceiling:
        parts += ["### This CPU's ceiling for the model (bench/cpu/ceiling.py)", *ceiling_lines(ceiling), ""]
    parts += ["### Side by side", table(results), "", "### Targets (issue 4)", *tgt, ""]
    if notes:
        parts += ["### Problems in this run", *[f"- {n}" for n in notes], ""]
    path = os.path.join(BENCH, "RESULTS.md")
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write("# Benchmark results\n\nEvery figure with the machine, date and command that made it. Newest last. "
                     "How each figure is measured: bench/README.md.\n")
    with open(path, "a") as fh:
        fh.write("\n".join(parts) + "\n")
    log(f"appended to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
