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

Stored events (job data ``store_events``, PROTOCOL.md "Stored events"): each message of such a job is also RPUSHed to
LIST ``llm:events:{jobId}``, in the same pipeline and *before* its PUBLISH, and the list's expiry is set again (PEXPIRE
``ttl_ms``) once per batch. A gateway resuming the stream SUBSCRIBEs first and reads the list second, so every event
is in what it reads, in what it hears, or in both (it drops the repeats): no MULTI is needed, only this order. The list
is bounded by ``max_bytes``: the message that would pass it is replaced by a ``{"type":"truncated"}`` marker and
nothing more is appended (publishing goes on), so one long answer cannot fill Redis.
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
from ..protocol import TRUNCATED_MARKER, StoreEvents, events_key, job_channel
from .redis_client import publish

log = logging.getLogger("llm_worker.transport.publisher")

# One message in the outbox: channel, message, the future resolved once it went out, and the stream that sent it (its
# events may have to be stored too).
_Item = tuple[str, str, Optional[asyncio.Future], Optional["JobStream"]]


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


class Outbox:
    """Every PUBLISH of one worker, in order, batched per round trip (see the module docstring)."""

    def __init__(self, redis: Any):
        self.redis = redis
        self.loop = asyncio.get_running_loop()
        # Messages in order, with the stream that sent them (None: nothing to store); a future is resolved once its
        # message (and all before it) went out.
        self._queue: list[_Item] = []
        self._due: dict[int, "JobStream"] = {}  # streams whose pending text is to go out in the next batch
        self._task: Optional[asyncio.Task] = None

    def send(self, channel: str, messages: list[str], stream: Optional["JobStream"] = None) -> asyncio.Future:
        """Queues messages of one channel; the future resolves once they were sent (or given up: see _publish)."""
        fut = self.loop.create_future()
        for i, m in enumerate(messages):
            self._queue.append((channel, m, fut if i == len(messages) - 1 else None, stream))
        self._kick()
        return fut

    def due(self, stream: "JobStream") -> None:
        """The stream has text to send now: it goes into the next batch."""
        self._due[id(stream)] = stream
        self._kick()

    def _kick(self) -> None:
        if self._task is None:
            self._task = self.loop.create_task(self._drain(), name="publisher-outbox")

    def _take_batch(self) -> list[_Item]:
        # Queued messages first, then the due deltas: a job's `started` is queued before it can have text, and its
        # final message only after finish() took the pending text itself, so each channel keeps its order.
        batch, self._queue = self._queue, []
        due, self._due = self._due, {}
        for stream in due.values():
            message = stream._take_message()
            if message is not None:
                batch.append((stream.channel, message, None, stream))
        return batch

    async def _drain(self) -> None:
        batch: list[_Item] = []
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

    async def _publish(self, batch: list[_Item]) -> None:
        # The gateway recovers from a gap with the job's stored result: a lost message is logged, never fatal.
        # Which messages go into their job's list is decided here, in channel order (a stream's byte bound).
        stored = [stream._stored(message) if stream is not None else None for _, message, _, stream in batch]
        if not hasattr(self.redis, "pipeline"):  # a stand-in client without pipelines (unit tests): one at a time
            for (channel, message, _, _), st in zip(batch, stored):
                try:
                    if st is not None:
                        await self.redis.rpush(st[0], st[1])
                        await self.redis.pexpire(st[0], st[2])
                    await publish(self.redis, channel, message)
                except Exception as exc:
                    log.warning("publish failed", extra={"channel": channel, "error": str(exc)})
            return
        if len(batch) == 1 and stored[0] is None:
            channel, message, _, _ = batch[0]
            try:
                await publish(self.redis, channel, message)
            except Exception as exc:
                log.warning("publish failed", extra={"channel": channel, "error": str(exc)})
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            publishes: list[tuple[int, str]] = []  # (reply index, channel)
            expiries: dict[str, int] = {}
            n = 0  # commands queued so far
            for (channel, message, _, _), st in zip(batch, stored):
                if st is not None:  # before the PUBLISH: see the module docstring
                    pipe.rpush(st[0], st[1])
                    expiries[st[0]] = st[2]
                    n += 1
                publish(pipe, channel, message)
                publishes.append((n, channel))
                n += 1
            for key, ttl_ms in expiries.items():
                pipe.pexpire(key, ttl_ms)
            replies = await pipe.execute(raise_on_error=False)
            failed = [channel for i, channel in publishes if isinstance(replies[i], Exception)]
            if failed:
                log.warning("publish failed", extra={"channels": failed[:5], "failed": len(failed)})
            if sum(isinstance(r, Exception) for r in replies) > len(failed):
                # A resume of these jobs then fails cleanly (their lists miss events): logged, never fatal.
                log.warning("storing events failed", extra={"keys": list(expiries)[:5]})
        except Exception as exc:
            log.warning("publish failed", extra={"channels": [c for c, _, _, _ in batch[:5]], "failed": len(batch),
                                                 "error": str(exc)})


def _resolve(batch: list[_Item]) -> None:
    for _, _, fut, _ in batch:
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
    # The job data's store_events: None, only published.
    store: Optional[StoreEvents] = None
    seq: int = 0
    _stored_bytes: int = 0
    _store_full: bool = False
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _started_choices: set[int] = field(default_factory=set)
    _last_flush: float = float("-inf")  # monotonic time the last delta was taken
    _timer: Optional[asyncio.TimerHandle] = None
    _finished: bool = False

    def __post_init__(self) -> None:
        self.channel = job_channel(self.job_id)
        self.events_key = events_key(self.job_id)
        self._box = outbox_for(self.redis)

    async def publish_started(self, worker_id: str, prompt_tokens: int) -> None:
        # Not counted in seq (PROTOCOL.md). Queued, not awaited: the outbox sends in order, so it still goes out before
        # any delta of the job, and generation need not wait a round trip for it.
        self._box.send(self.channel, [_dumps({"type": "started", "worker_id": worker_id,
                                              "prompt_tokens": prompt_tokens, "ts_ms": now_ms()})], self)

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
        await self._box.send(self.channel, messages, self)

    def _stored(self, message: str) -> Optional[tuple[str, str, int]]:
        """(list key, what to append, ttl_ms) for a message about to be sent, or None: the outbox calls it in order."""
        if self.store is None or self._store_full:
            return None
        size = len(message.encode("utf-8"))
        if self._stored_bytes + size > self.store.max_bytes:
            self._store_full = True
            log.info("stored events reached their bound; no more are kept", extra={"jobId": self.job_id,
                                                                                   "maxBytes": self.store.max_bytes})
            return self.events_key, TRUNCATED_MARKER, self.store.ttl_ms
        self._stored_bytes += size
        return self.events_key, message, self.store.ttl_ms

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
