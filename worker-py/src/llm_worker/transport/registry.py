"""Registration in Redis (PROTOCOL.md "Names in Redis"): tokenizer HASH first, then WorkerInfo + ZSET heartbeat.

The tokenizer is written before the worker is listed, so a gateway that sees the worker can always count tokens.
The heartbeat loop survives Redis outages (redis-py reconnects on the next command); a worker that cannot beat for
HEARTBEAT_TTL_MS simply drops out of gateways' view until Redis is back. A Redis that comes back empty (restarted
without persistence, flushed) has lost the tokenizer too: each beat checks for it and writes it again first, so the
worker registers again completely, in the same order, without a restart (tests/e2e/faults.test.ts).
"""

from __future__ import annotations

import asyncio

import logging
import os
import socket
from typing import Any, Callable, Optional

from ..log import now_ms
from ..protocol import WORKERS_ZSET, WorkerInfo, tokenizer_key, worker_key
from .redis_client import transaction_ok

log = logging.getLogger("llm_worker.transport.registry")


async def publish_tokenizer(redis: Any, model_id: str, tokenizer_json: str, config_json: str, digest: str) -> None:
    await redis.hset(tokenizer_key(model_id), mapping={
        "hash": digest, "tokenizer_json": tokenizer_json, "tokenizer_config_json": config_json})


def make_worker_info(*, worker_id: str, model_id: str, queue: str, context_length: int, max_batch: int,
                     device: str, dtype: str, engine: str, tokenizer_hash: str, version: str,
                     kv_token_budget: Optional[int] = None) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, model=model_id, queue=queue, context_length=context_length,
                      max_batch=max_batch, device=device, dtype=dtype, engine=engine, tokenizer_hash=tokenizer_hash,
                      started_at_ms=now_ms(), ready=True, pid=os.getpid(), host=socket.gethostname(), version=version,
                      kv_token_budget=kv_token_budget)


class Heartbeat:
    def __init__(self, redis: Any, info: WorkerInfo, interval_ms: int, ttl_ms: int,
                 on_tick: Optional[Callable[[], None]] = None, tokenizer: Optional[tuple[str, str, str]] = None):
        self.redis = redis
        self.info = info
        self.interval_ms = interval_ms
        self.ttl_ms = ttl_ms
        self.on_tick = on_tick
        self.tokenizer = tokenizer  # (tokenizer_json, tokenizer_config_json, hash), written again if Redis lost it
        self._task: Optional[asyncio.Task] = None
        self._healthy = True

    async def beat(self) -> None:
        if self.tokenizer is not None and not await self.redis.exists(tokenizer_key(self.info.model)):
            # One EXISTS per beat: without it a Redis that restarted empty would list us again (below) with no
            # tokenizer, and gateways that have not cached it would refuse the model until a new worker registers.
            log.warning("tokenizer missing from Redis (restarted empty?): registering it again",
                        extra={"model": self.info.model})
            await publish_tokenizer(self.redis, self.info.model, *self.tokenizer)
        expiry = now_ms() + self.ttl_ms
        async with self.redis.pipeline(transaction=transaction_ok(self.redis)) as pipe:
            pipe.set(worker_key(self.info.worker_id), self.info.model_dump_json(), px=self.ttl_ms)
            pipe.zadd(WORKERS_ZSET, {self.info.worker_id: expiry})
            await pipe.execute()

    async def start(self) -> None:
        await self.beat()  # listed before the first job can be taken
        self._task = asyncio.create_task(self._loop(), name="heartbeat")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_ms / 1000)
            if self.on_tick is not None:
                self.on_tick()
            try:
                await self.beat()
                if not self._healthy:
                    log.info("heartbeat restored")
                self._healthy = True
            except Exception as exc:
                if self._healthy:
                    log.warning("heartbeat failed; retrying", extra={"error": str(exc)})
                self._healthy = False

    def set_ready(self, ready: bool) -> None:
        self.info = self.info.model_copy(update={"ready": ready})

    async def stop_and_deregister(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            async with self.redis.pipeline(transaction=transaction_ok(self.redis)) as pipe:
                pipe.zrem(WORKERS_ZSET, self.info.worker_id)
                pipe.delete(worker_key(self.info.worker_id))
                await pipe.execute()
        except Exception as exc:
            log.warning("deregister failed", extra={"error": str(exc)})


