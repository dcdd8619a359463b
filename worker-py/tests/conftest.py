"""Shared fixtures: the bundled model (loaded once per session), a started engine, and a private redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from llm_worker import model as model_mod  # first: the package sets GOMP_SPINCOUNT before anything loads torch
from llm_worker.config import load_config


@pytest.fixture(scope="session")
def loaded():
    # fp32, not DTYPE=auto (bf16 on CPUs with native bf16): these tests check that batching computes exactly what a
    # request alone computes (padding, positions, cache), and only fp32 makes that exact — bf16 rounding turns
    # matmul-shape noise into different greedy tokens (scripts/greedy_equivalence.py: 16/16 identical in fp32,
    # 9/16 in bf16). The bf16 default is exercised end to end by tests/e2e, whose worker runs DTYPE=auto.
    model_mod.keep_main_thread_serial()  # as the worker does: only the engine's thread runs torch in parallel
    return model_mod.load(load_config({"DTYPE": "float32"}))


@pytest.fixture(scope="session")
def tokenizer(loaded):
    return loaded.tokenizer


@pytest.fixture(scope="session")
def engine(loaded):
    from llm_worker.engine.cpu_batch import CpuBatchEngine

    eng = CpuBatchEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, max_batch=16,
                         context_length=loaded.context_length)
    eng.start()
    yield eng
    eng.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    """Our own redis-server on a free port (never a shared one); BullMQ wants noeviction."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="llm-worker-redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory-policy", "noeviction", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


def chat_ids(tokenizer, text: str) -> list[int]:
    return model_mod.chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
