"""The real process: `python -m llm_worker` + Node bullmq 6.7.0 (the gateway's library) + SIGTERM drain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from conftest import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
NODE_SCRIPT = Path(__file__).parent / "interop" / "node_roundtrip.mjs"


KV_CACHE_BYTES = 64 << 20


def job(content, **params):
    return {"v": 1, "request_id": "req_x", "model": "m", "messages": [{"role": "user", "content": content}],
            "params": params, "stream": True, "prompt_tokens": 0, "enqueued_at_ms": 0, "deadline_ms": None}


@pytest.fixture
def worker_process(redis_url, tmp_path):
    model_id = f"test-{uuid.uuid4().hex[:8]}"
    worker_id = f"w-proc-{uuid.uuid4().hex[:6]}"
    metrics_port = free_port()
    env = dict(os.environ, REDIS_URL=redis_url, MODEL_ID=model_id, WORKER_ID=worker_id,
               METRICS_PORT=str(metrics_port), HF_HUB_OFFLINE="1", SHUTDOWN_GRACE_MS="60000",
               KV_CACHE_BYTES=str(KV_CACHE_BYTES))
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llm_worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # Loading torch and the model on a loaded machine takes a while; the deadline only bounds a hang.
        wait_until(lambda: r.zscore("llm:workers", worker_id) is not None, 300, "the worker to register",
                   alive=lambda: proc.poll() is None, interval=0.2)
    except AssertionError as err:
        proc.kill()
        raise AssertionError(f"{err}\n{(tmp_path / 'worker.log').read_text()}") from None
    yield proc, r, f"gen.{model_id}", worker_id, metrics_port, tmp_path
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    r.close()


@pytest.mark.skipif(shutil.which("node") is None or not (REPO / "node_modules" / "bullmq").is_dir(),
                    reason="node or the repo's node_modules/bullmq is missing")
def test_node_queue_to_python_worker_and_sigterm_drain(worker_process, redis_url, loaded):
    proc, r, queue, worker_id, metrics_port, tmp = worker_process
    # The KV budget it admits by is the one it registers, so gateways refuse what could never fit (KV_CACHE_BYTES).
    info = json.loads(r.get(f"llm:worker:{worker_id}"))
    c = loaded.model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) \
        * {"bfloat16": 2, "float16": 2, "float32": 4}[info["dtype"]]
    assert info["kv_token_budget"] == KV_CACHE_BYTES // per_token
    jobs = [{"id": "chatcmpl-ok1", "data": job("What is the capital of France?", max_tokens=12, temperature=0)},
            {"id": "chatcmpl-bad1", "data": job("Hi", logit_bias={"999999": 1})}]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    out = subprocess.run(["node", str(NODE_SCRIPT), redis_url, queue, str(tmp / "jobs.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ok, bad = [json.loads(line) for line in out.stdout.splitlines()]
    assert ok["ok"] and ok["result"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert ok["result"]["worker_id"] == worker_id and ok["events"][-1]["result"] == ok["result"]
    assert not bad["ok"]
    assert bad["message"].startswith("invalid_request: ") and bad["failedReason"] == bad["message"]
    # The error event the gateway streams says the same as the stored failedReason (PROTOCOL.md: "<code>: <message>").
    error = bad["events"][-1]
    assert error["type"] == "error" and error["error"]["code"] == "invalid_request", bad["events"]
    assert bad["failedReason"] == f"invalid_request: {error['error']['message']}"
    assert '"' not in bad["failedReason"]  # Python bullmq <= 3.0.4 JSON-quoted it (bullmq#4596)

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60).read().decode()
    assert "llm_worker_running_sequences" in metrics and "llm_worker_model_load_seconds" in metrics

    # SIGTERM with a job in flight: it finishes, then the worker deregisters and exits 0.
    (tmp / "long.json").write_text(json.dumps([{"id": "chatcmpl-drain1",
                                                "data": job("Tell a story.", max_tokens=30, temperature=0,
                                                            ignore_eos=True)}]))
    node = subprocess.Popen(["node", str(NODE_SCRIPT), redis_url, queue, str(tmp / "long.json")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: r.hget(f"bull:{queue}:chatcmpl-drain1", "processedOn") is not None, 300,
               "the worker to pick up the job", alive=lambda: node.poll() is None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = node.communicate(timeout=300)  # the script gives up first, at its own deadline (240 s)
    assert node.returncode == 0, stderr
    drained = json.loads(stdout.strip())
    assert drained["ok"] and drained["result"]["usage"]["completion_tokens"] == 30
    assert proc.wait(timeout=120) == 0
    assert r.zscore("llm:workers", worker_id) is None and not r.exists(f"llm:worker:{worker_id}")
