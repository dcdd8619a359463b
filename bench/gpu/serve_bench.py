"""Phase (d): `transformers serve --continuous-batching` on the same random model, driven by N streaming clients.

Run by bench.py after it has saved the model (and a word-level tokenizer whose every token is one word) to disk and
freed the GPU. Prints and returns a dict of figures; never raises (errors are recorded in the dict).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges: ids 0-255 are the 256 bytes, every other id is a filler word, so a
    prompt of k ASCII letters is exactly k tokens and any id the model samples decodes. (`transformers serve` loads
    it as Qwen2Tokenizer because config.json says qwen2; that class rebuilds a byte-level BPE from this vocab.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=lambda c: _byte_of(c)))}
    vocab = dict(byte_vocab)
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(folder)


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def one_stream(client, url, model, prompt, max_tokens, rec):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "temperature": 1.0, "top_p": 1.0}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    words = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            rec["errors"].append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                rec["errors"].append(str(chunk["error"])[:200])
                return
            for ch in chunk.get("choices") or []:
                text = (ch.get("delta") or {}).get("content") or ""
                if text and first is None:
                    first = time.perf_counter()
                words += 1  # fallback count (chunks), only used if the final usage is missing
            usage = chunk.get("usage")
            if usage:
                tokens = usage.get("completion_tokens", 0)
    rec["ttft"].append((first or time.perf_counter()) - t0)
    rec["tokens"] += tokens or words
    rec["done"] += 1


async def drive(port, model, n_requests, prompt_len, out_len, vocab, cap_s, seed=0):
    import httpx

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    prompts = ["".join(rng.choice(letters) for _ in range(prompt_len)) for _ in range(n_requests)]  # 1 letter = 1 token
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rec = {"ttft": [], "tokens": 0, "done": 0, "errors": []}
    limits = httpx.Limits(max_connections=n_requests + 8, max_keepalive_connections=n_requests + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one_stream(client, url, model, p, out_len, rec)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=cap_s)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                rec["errors"].append(repr(t.exception())[:200])
        elapsed = time.perf_counter() - t0
    return {
        "requests": n_requests, "completed": rec["done"], "cut_at_cap": bool(pending), "wall_s": round(elapsed, 2),
        "output_tokens": rec["tokens"], "output_tok_s": round(rec["tokens"] / elapsed, 1),
        "ttft_p50_s": percentile(rec["ttft"], 50), "ttft_p99_s": percentile(rec["ttft"], 99),
        "errors": rec["errors"][:5], "error_count": len(rec["errors"]),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout_s):
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return f"server exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return None
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    return "server not ready in time"


def run_serve_phase(model_dir: str, *, device: str, n_requests: int, prompt_len: int, out_len: int, vocab: int,
                    budget_s: float, port: int | None = None, extra_args=(), site: str | None = None,
                    log_path=None) -> dict:
    t_start = time.monotonic()
    port = port or free_port()
    res: dict = {"command": None}
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(os.path.expanduser("~/.cache/huggingface/hub"), exist_ok=True)  # /v1/models 500s without it
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--continuous-batching",
           "--device", device, "--dtype", "bfloat16" if device.startswith("cuda") else "float32",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args]
    res["command"] = " ".join(cmd[2:])
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        problem = wait_ready(port, proc, max(10.0, budget_s * 0.4))
        res["startup_s"] = round(time.monotonic() - t_start, 1)
        if problem:
            res["error"] = problem
            return res
        warm = asyncio.run(drive(port, model_dir, 2, prompt_len, 8, vocab, cap_s=60))
        res["warmup"] = {k: warm[k] for k in ("completed", "wall_s", "error_count", "errors")}
        cap = max(10.0, budget_s - (time.monotonic() - t_start) - 10)
        res.update(asyncio.run(drive(port, model_dir, n_requests, prompt_len, out_len, vocab, cap_s=cap)))
        res["time_cap_s"] = round(cap, 1)
        return res
    except Exception as e:  # noqa: BLE001 - report, don't lose the other phases
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
