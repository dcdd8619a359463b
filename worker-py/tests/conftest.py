"""Shared fixtures: the bundled model (loaded once per session), a started engine, and a private redis-server."""

from __future__ import annotations

import asyncio
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


def wait_until(check, timeout: float, what: str, alive=None, interval: float = 0.05):
    """Polls ``check`` until it is true; fails naming ``what`` after ``timeout`` seconds, or at once when ``alive``
    (a process we wait on) says it died. Tests wait on a state this way, never with a fixed sleep; the deadline only
    bounds a hang, so make it generous (a loaded machine takes longer, and a passing run never waits for it)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert alive is None or alive(), f"gave up waiting for {what}: the process exited"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


async def wait_until_async(check, timeout: float, what: str, interval: float = 0.02):
    """``wait_until`` for a coroutine ``check`` on a running event loop."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


async def wait_subscribed(pubsub, count: int, timeout: float = 60) -> None:
    """Reads the confirmations of ``count`` (p)subscribe calls of a redis-py asyncio PubSub: until Redis has confirmed,
    it may not deliver to it yet (and an unread confirmation makes a later get_message(ignore_subscribe_messages=True)
    return None)."""
    deadline = time.monotonic() + timeout
    confirmed = 0
    while confirmed < count:
        left = deadline - time.monotonic()
        assert left > 0, f"no (p)subscribe confirmation within {timeout} s"
        msg = await pubsub.get_message(timeout=min(left, 1.0))
        if msg is not None and msg["type"] in ("subscribe", "psubscribe"):
            confirmed += 1


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


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
    wait_until(lambda: _accepts(port), 60, f"redis-server on port {port} to accept connections",
               alive=lambda: proc.poll() is None)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=60)
    shutil.rmtree(workdir, ignore_errors=True)


def chat_ids(tokenizer, text: str) -> list[int]:
    return model_mod.chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
