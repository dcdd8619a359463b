"""Events of one job on ``llm:job:{jobId}``: coalesced deltas with gap-free seq numbers, then done or error.

Pending text of a job is flushed every STREAM_FLUSH_MS, but at once when it holds the first text of a choice (time to
first token is never delayed by coalescing) and at the end.

Every message of every job leaves through the worker's outbox (one per Redis client): one task sends them on one
connection, in the order their seq numbers were given, as one pipeline per round trip — whatever became due while
the previous batch was in flight goes out together. So a job's messages reach Redis in order (two publishes in
flight on different pooled connections could not promise that), and the event loop does one write per batch instead
of one command (pool checkout, socket write, reply parse) and a writer-task wake-up per message. (A script that
PUBLISHes a whole batch in one command was tried: no less worker CPU at 200 streams, more Redis CPU.)
Why it matters: with 200 streams, profiled, the loop was busy 93% of the time, 41% of it in ``redis.publish``, and a
new job waited for the loop (enqueue → pick-up p50 0.1-1 s).

A job's text does not even wait for a task: ``add`` marks the job due (at once, or by a timer at the end of its
flush interval) and the outbox takes the text when it builds its next batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from ..log import now_ms
from ..protocol import job_channel

log = logging.getLogger("llm_worker.transport.publisher")


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


class Outbox:
    """Every PUBLISH of one worker, in order, batched per round trip (see the module docstring)."""

    def __init__(self, redis: Any):
        self.redis = redis
        self.loop = asyncio.get_running_loop()
        # Messages in order; a future is resolved once its message (and all before it) went out.
        self._queue: list[tuple[str, str, Optional[asyncio.Future]]] = []
        self._due: dict[int, "JobStream"] = {}  # streams whose pending text is to go out in the next batch
        self._task: Optional[asyncio.Task] = None

    def send(self, channel: str, messages: list[str]) -> asyncio.Future:
        """Queues messages of one channel; the future resolves once they were sent (or given up: see _publish)."""
        fut = self.loop.create_future()
        for i, m in enumerate(messages):
            self._queue.append((channel, m, fut if i == len(messages) - 1 else None))
        self._kick()
        return fut

    def due(self, stream: "JobStream") -> None:
        """The stream has text to send now: it goes into the next batch."""
        self._due[id(stream)] = stream
        self._kick()

    def _kick(self) -> None:
        if self._task is None:
            self._task = self.loop.create_task(self._drain(), name="publisher-outbox")

    def _take_batch(self) -> list[tuple[str, str, Optional[asyncio.Future]]]:
        # Queued messages first, then the due deltas: a job's `started` is queued before it can have text, and its
        # final message only after finish() took the pending text itself, so each channel keeps its order.
        batch, self._queue = self._queue, []
        due, self._due = self._due, {}
        for stream in due.values():
            message = stream._take_message()
            if message is not None:
                batch.append((stream.channel, message, None))
        return batch

    async def _drain(self) -> None:
        batch: list[tuple[str, str, Optional[asyncio.Future]]] = []
        try:
            while self._queue or self._due:
                batch = self._take_batch()
                if batch:
                    await self._publish(batch)
                    _resolve(batch)
        finally:
            # Only a cancelled drain (the loop shutting down) leaves anything here: nobody may wait forever.
            self._task = None
            _resolve(batch)
            _resolve(self._queue)
            self._queue = []
            self._due = {}

    async def _publish(self, batch: list[tuple[str, str, Optional[asyncio.Future]]]) -> None:
        # The gateway recovers from a gap with the job's stored result: a lost message is logged, never fatal.
        if len(batch) == 1 or not hasattr(self.redis, "pipeline"):
            for channel, message, _ in batch:
                try:
                    await self.redis.publish(channel, message)
                except Exception as exc:
                    log.warning("publish failed", extra={"channel": channel, "error": str(exc)})
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for channel, message, _ in batch:
                pipe.publish(channel, message)
            replies = await pipe.execute(raise_on_error=False)
            failed = [channel for (channel, _, _), r in zip(batch, replies) if isinstance(r, Exception)]
            if failed:
                log.warning("publish failed", extra={"channels": failed[:5], "failed": len(failed)})
        except Exception as exc:
            log.warning("publish failed", extra={"channels": [c for c, _, _ in batch[:5]], "failed": len(batch),
                                                 "error": str(exc)})


def _resolve(batch: list[tuple[str, str, Optional[asyncio.Future]]]) -> None:
    for _, _, fut in batch:
        if fut is not None and not fut.done():
            fut.set_result(None)


_outboxes: "weakref.WeakKeyDictionary[Any, Outbox]" = weakref.WeakKeyDictionary()


def outbox_for(redis: Any) -> Outbox:
    """The outbox of this Redis client on the running loop (one per client and loop)."""
    box = _outboxes.get(redis)
    if box is None or box.loop is not asyncio.get_running_loop():
        box = _outboxes[redis] = Outbox(redis)
    return box


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
    _last_flush: float = float("-inf")  # monotonic time the last delta was taken
    _timer: Optional[asyncio.TimerHandle] = None
    _finished: bool = False

    def __post_init__(self) -> None:
        self.channel = job_channel(self.job_id)
        self._box = outbox_for(self.redis)

    async def publish_started(self, worker_id: str, prompt_tokens: int) -> None:
        # Not counted in seq (PROTOCOL.md). Queued, not awaited: the outbox sends in order, so it still goes out before
        # any delta of the job, and generation need not wait a round trip for it.
        self._box.send(self.channel, [_dumps({"type": "started", "worker_id": worker_id,
                                              "prompt_tokens": prompt_tokens, "ts_ms": now_ms()})])

    def add(self, index: int, text: str, tokens: int, logprobs: Optional[list[dict[str, Any]]]) -> None:
        p = self._pending.setdefault(index, _Pending())
        p.text += text
        p.tokens += tokens
        if logprobs:
            p.logprobs = (p.logprobs or []) + logprobs
        if self._finished or not p.text:
            return  # tokens without text yet (held back) wait for their text
        if index not in self._started_choices:  # the first text of a choice: now, whatever the interval
            self._cancel_timer()
            self._box.due(self)
            return
        due = self._last_flush + self.flush_ms / 1000
        if due <= time.monotonic():
            self._box.due(self)
        elif self._timer is None:
            self._timer = self._box.loop.call_at(due, self._on_timer)

    async def finish(self, event: dict[str, Any]) -> None:
        """Send what is pending, then ``event`` (a done or error object without seq/ts_ms), and stop."""
        self._finished = True
        self._cancel_timer()
        messages = []
        pending = self._take_message()
        if pending is not None:
            messages.append(pending)
        self.seq += 1
        messages.append(_dumps(dict(event, seq=self.seq, ts_ms=now_ms())))
        await self._box.send(self.channel, messages)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._finished:
            self._box.due(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take_message(self) -> Optional[str]:
        """The pending text as one delta message (numbered now), or None; called when a batch is built."""
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
        self._cancel_timer()
        self._last_flush = time.monotonic()
        self.seq += 1
        return _dumps({"type": "delta", "seq": self.seq, "ts_ms": now_ms(), "choices": choices})
