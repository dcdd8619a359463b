"""Events of one job on ``llm:job:{jobId}``: coalesced deltas with gap-free seq numbers, then done or error.

One writer task per job sends every message of that job, one after the other: two publishes in flight on different
pooled connections could reach Redis out of order. Pending text is flushed every STREAM_FLUSH_MS, but at once when
it holds the first text of a choice (time to first token is never delayed by coalescing) and at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..log import now_ms
from ..protocol import job_channel

log = logging.getLogger("llm_worker.transport.publisher")


@dataclass
class _Pending:
    text: str = ""
    tokens: int = 0
    logprobs: Optional[list[dict[str, Any]]] = None


@dataclass
class JobStream:
    redis: Any
    job_id: str
    flush_ms: int
    seq: int = 0
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _started_choices: set[int] = field(default_factory=set)
    _final: Optional[dict[str, Any]] = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: Optional[asyncio.Task] = None

    def __post_init__(self) -> None:
        self.channel = job_channel(self.job_id)

    async def publish_started(self, worker_id: str, prompt_tokens: int) -> None:
        # Not counted in seq (PROTOCOL.md); sent before any delta since the writer starts after it.
        await self._send({"type": "started", "worker_id": worker_id, "prompt_tokens": prompt_tokens, "ts_ms": now_ms()})
        self._task = asyncio.create_task(self._writer(), name=f"publisher:{self.job_id}")

    def add(self, index: int, text: str, tokens: int, logprobs: Optional[list[dict[str, Any]]]) -> None:
        p = self._pending.setdefault(index, _Pending())
        p.text += text
        p.tokens += tokens
        if logprobs:
            p.logprobs = (p.logprobs or []) + logprobs
        self._wake.set()

    async def finish(self, event: dict[str, Any]) -> None:
        """Send what is pending, then ``event`` (a done or error object without seq/ts_ms), and stop."""
        self._final = event
        self._wake.set()
        if self._task is None:  # failed before started: no writer yet
            self._task = asyncio.create_task(self._writer())
        await self._task

    async def _writer(self) -> None:
        last_flush = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            urgent = self._final is not None or any(
                p.text and i not in self._started_choices for i, p in self._pending.items())
            if not urgent:
                delay = last_flush + self.flush_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            delta = self._take_delta()
            if delta is not None:
                await self._send(delta)
                last_flush = time.monotonic()
            if self._final is not None:
                delta = self._take_delta()  # anything added while the last publish was in flight
                if delta is not None:
                    await self._send(delta)
                self.seq += 1
                await self._send(dict(self._final, seq=self.seq, ts_ms=now_ms()))
                return

    def _take_delta(self) -> Optional[dict[str, Any]]:
        choices = []
        for index in sorted(self._pending):
            p = self._pending[index]
            if not p.text:
                continue  # tokens without text yet (held back): they travel with the text they become
            choices.append({"index": index, "text": p.text, "tokens": p.tokens, "logprobs": p.logprobs})
            self._started_choices.add(index)
            del self._pending[index]
        if not choices:
            return None
        self.seq += 1
        return {"type": "delta", "seq": self.seq, "ts_ms": now_ms(), "choices": choices}

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self.redis.publish(self.channel, json.dumps(message, ensure_ascii=False, separators=(",", ":")))
        except Exception as exc:
            # The gateway recovers from a gap with the job's stored result; a lost message must not fail the job.
            log.warning("publish failed", extra={"jobId": self.job_id, "error": str(exc)})
