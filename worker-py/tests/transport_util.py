"""Run the real WorkerService in-process on a fresh queue and talk to it as the gateway does (Redis only)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Optional

import redis.asyncio as aioredis
from bullmq import Job, Queue
from conftest import wait_subscribed

from llm_worker.config import load_config
from llm_worker.metrics import Metrics
from llm_worker.model import export_tokenizer
from llm_worker.text.logprobs import LogprobFormatter
from llm_worker.transport.job_run import JobContext
from llm_worker.transport.registry import make_worker_info
from llm_worker.transport.service import WorkerService

MODEL_ID = "smollm2-135m-instruct"


@asynccontextmanager
async def serve(redis_url: str, engine, loaded, context_length: Optional[int] = None, flush_ms: int = 15,
                fetch_concurrency: Optional[int] = None, grammars=None):
    """A started WorkerService on queue test-<uuid>; yields (service, gateway-side helper). ``fetch_concurrency``: how
    many jobs the service may hold at once (its BullMQ concurrency, MAX_BATCH by default), to take more jobs than
    the engine has rows. ``grammars``: the JobContext's BackgroundGrammarCompiler (None: no structured outputs)."""
    worker_id = f"w-test-{uuid.uuid4().hex[:6]}"
    env = {"REDIS_URL": redis_url, "WORKER_ID": worker_id, "METRICS_PORT": "0", "STREAM_FLUSH_MS": str(flush_ms),
           "SHUTDOWN_GRACE_MS": "5000"}
    if fetch_concurrency is not None:
        env["MAX_BATCH"] = str(fetch_concurrency)
    cfg = load_config(env)
    ctx = JobContext(engine=engine, tokenizer=loaded.tokenizer, logprob_formatter=LogprobFormatter(loaded.tokenizer),
                     worker_id=worker_id, context_length=context_length or loaded.context_length,
                     vocab_size=int(loaded.model.config.vocab_size), default_max_tokens=64, flush_ms=flush_ms,
                     log_prompts=False, grammars=grammars)
    export = export_tokenizer(loaded.tokenizer)
    queue = f"test-{uuid.uuid4().hex}"
    info = make_worker_info(worker_id=worker_id, model_id=MODEL_ID, queue=queue, context_length=ctx.context_length,
                            max_batch=16, device="cpu", dtype="float32", engine="cpu-batch",
                            tokenizer_hash=export[2], version="test")
    service = WorkerService(cfg, ctx, info, export, Metrics())
    await service.start()
    gw = Gateway(redis_url, queue)
    try:
        yield service, gw
    finally:
        await gw.close()
        await service.shutdown()


class Gateway:
    """The gateway's half of PROTOCOL.md, minimal: subscribe, add, collect events until done/error."""

    def __init__(self, redis_url: str, queue: str):
        self.redis = aioredis.from_url(redis_url, decode_responses=True)
        self.queue = Queue(queue, {"connection": redis_url})

    async def close(self) -> None:
        await self.queue.close()
        await self.redis.aclose()

    async def run(self, data: dict[str, Any], job_id: Optional[str] = None, timeout: float = 300,
                  on_event=None) -> tuple[list[dict[str, Any]], Job]:
        job_id = job_id or f"chatcmpl-{uuid.uuid4().hex}"
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(f"llm:job:{job_id}")
        await wait_subscribed(pubsub, 1)  # as the gateway: listening before the job exists
        await self.queue.add("chat", data, {"jobId": job_id, "attempts": 1,
                                            "removeOnComplete": {"age": 300, "count": 1000},
                                            "removeOnFail": {"age": 3600, "count": 1000}})
        events: list[dict[str, Any]] = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            ev = json.loads(msg["data"])
            ev["_recv"] = time.time()
            events.append(ev)
            if on_event is not None:
                await on_event(ev, job_id)
            if ev["type"] in ("done", "error"):
                break
        await pubsub.aclose()
        finish_by = time.monotonic() + 60  # the processor's return lands in BullMQ right after the done event
        while time.monotonic() < finish_by:
            job = await Job.fromId(self.queue, job_id)
            if job is not None and (job.finishedOn or job.failedReason):
                return events, job
            await asyncio.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish; events: {events}")

    async def cancel(self, job_id: str) -> None:
        await self.redis.set(f"llm:cancelled:{job_id}", "1", ex=600)
        await self.redis.publish("llm:cancel", job_id)


def job_data(content: str, **params: Any) -> dict[str, Any]:
    return {"v": 1, "request_id": f"req_{uuid.uuid4().hex[:8]}", "model": MODEL_ID,
            "messages": [{"role": "user", "content": content}], "params": params, "stream": True,
            "prompt_tokens": 0, "enqueued_at_ms": int(time.time() * 1000), "deadline_ms": None}
