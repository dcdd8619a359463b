"""bullmq.Worker with a job-fetch loop of our own: free slots take waiting jobs in batches, one round trip a batch.

Why not bullmq 3.4.4's ``Worker.run``: it keeps ``concurrency`` fetch tasks alive. Whenever one returns a job, it starts
a new fetch task for *every* free slot at once (up to MAX_BATCH - 1 of them), each one a ``moveToActive`` Lua call on
the worker's one connection, and all but one come back empty. Measured with the stand-in engine, MAX_BATCH 256, 16
streams: 82 ``moveToActive`` calls per request, enqueue → pick-up 28-53 ms (p50); at 200 streams 1.1-1.4 s.

Why not one fetch at a time (BullMQ's Node worker, and this loop until issue 17): a burst waits for one round trip per
job. 1,000 clients at once through the whole stack: enqueue → pick-up p99 3.4-4.4 s (bench/cpu/admission_burst.py).

This loop asks for as many jobs as it has free slots *and* knows to be waiting, up to ``FETCH_BATCH`` in one
pipeline of BullMQ's own ``moveToActive`` script (each call atomic and the same as a single fetch: the job moves to
active under its own lock token, so a worker that dies mid-batch leaves locked active jobs that the stalled check
re-queues, as with a single fetch). The pipeline ends with ``LLEN wait`` + ``ZCARD prioritized``: how many jobs are still
waiting sizes the next round, so a lone job costs one call and an empty one (no ``MAX_BATCH`` empty calls), and a burst
of 1,000 about 1,000 / FETCH_BATCH round trips. When a call comes back empty the queue is drained and one ``BZPOPMIN`` on
the queue's marker blocks on a connection of its own until ``Queue.add`` (or a job moved back from delayed/stalled) sets
the marker — a job added between the empty ``moveToActive`` and the ``BZPOPMIN`` has set the marker already, so it is
never missed. When every slot is busy the loop waits for a job to end, not for Redis. Everything else is bullmq's own
``Worker``: ``processJob`` (lock tracking, ``moveToCompleted``/``moveToFailed``), the lock renewal, the stalled-job
check, ``pause``, ``close``; jobs are ordinary BullMQ jobs in ordinary states. Only ``run`` and the fetch are replaced
(bullmq is pinned in requirements.txt; a bullmq upgrade must re-check this class against ``bullmq/worker.py`` and
``bullmq/scripts.py: Scripts.moveToActive``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgpack
from bullmq import Worker
from bullmq.scripts import raw2NextJobData
from bullmq.timer import Timer
from redis.exceptions import NoScriptError

log = logging.getLogger("llm_worker.transport.fetch_loop")

# At most this many jobs per fetch round trip. A round's replies are parsed and its jobs started before the next
# round goes out, so a larger batch delays the first jobs of a burst behind the parsing of the rest; 64 × ~0.1 ms.
FETCH_BATCH = 64

# After an error that is not a lost connection (bullmq's own short_retry_delay): keeps a persistent fault from
# spinning the loop.
_ERROR_PAUSE_S = 0.1

# moveToActive-11.lua's keys, in its order (bullmq/scripts.py: Scripts.moveToActive).
_MOVE_TO_ACTIVE_KEYS = ["wait", "active", "prioritized", "events", "stalled", "limiter", "delayed", "paused", "meta", "pc",
                        "marker"]


class FetchLoopWorker(Worker):
    """``bullmq.Worker`` whose ``run`` fetches waiting jobs in batches (see the module docstring). Same options."""

    def __init__(self, name: str, processor: Any, opts: dict[str, Any]):
        super().__init__(name, processor, {**opts, "autorun": False})
        self._slot_free = asyncio.Event()
        self._tokens = 0
        self._known_waiting = 1  # jobs the last round saw still waiting: the next round asks for that many
        if opts.get("autorun", True):
            asyncio.ensure_future(self.run())

    async def run(self) -> None:
        if self.running:
            raise Exception("Worker is already running")
        await self._ensure_client_names()
        self.lockManager.start()
        self.stalledCheckTimer = Timer(self.opts["stalledInterval"] / 1000, self.runStalledJobsCheck, self.emit)
        self.running = True
        concurrency = int(self.opts["concurrency"])
        try:
            while not self.closing and not self.closed:
                if self.paused:
                    await self.resume_event.wait()
                    continue
                if len(self.processing) >= concurrency:
                    self._slot_free.clear()
                    if len(self.processing) >= concurrency:
                        await self._slot_free.wait()
                    continue
                # Jobs that came back are started whatever happened meanwhile (pause, close): they are active and
                # locked, and close() waits for what runs.
                for job in await self._next_jobs(concurrency - len(self.processing)):
                    self.emit("active", job, "waiting")
                    task = asyncio.ensure_future(self.processJob(job, job.token))
                    self.processing.add(task)
                    task.add_done_callback(self._job_ended)
        finally:
            self.running = False
            if not self.closing:  # cancelled from outside, not close(): stop what runs (as bullmq's run does)
                for task in list(self.processing):
                    task.cancel()
                if self.processing:
                    await asyncio.gather(*self.processing, return_exceptions=True)
            # close() waits for the jobs in flight and then closes the lock manager; stopping here would let locks
            # lapse under jobs that are still running.
            if self.stalledCheckTimer is not None:
                self.stalledCheckTimer.stop()

    def _job_ended(self, task: asyncio.Future) -> None:
        self.processing.discard(task)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:  # processJob catches the processor's errors
            self.emit("error", task.exception())

    async def _next_jobs(self, free: int) -> list:
        """Up to ``free`` waiting jobs moved to active (none: nothing came within the block timeout, paused, closing)."""
        try:
            if self.drained:
                self.waiting = asyncio.ensure_future(self.waitForJob())
                try:
                    self.blockUntil = await self.waiting
                except asyncio.CancelledError:
                    if self.paused or self.closing:
                        return []  # pause()/close() cancel the idle BZPOPMIN
                    raise
                finally:
                    self.waiting = None
                if self.blockUntil > int(time.time() * 1000):
                    return []  # the marker names a delayed job's due time: nothing to take yet
                self._known_waiting = 1  # woken by a marker: at least one job, how many we learn from the first round
            if self.paused or self.closing:
                return []
            # Sets self.drained when a call found nothing: the next round blocks on the marker.
            return await self._move_to_active(max(1, min(free, self._known_waiting, FETCH_BATCH)))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self.closing or self.closed:
                return []
            if self.isConnectionError(err):
                # bullmq's run waits runRetryDelay after a lost connection before fetching again; so do we (service.py
                # sets it to 1 s).
                await asyncio.sleep(self.opts.get("runRetryDelay", 15000) / 1000)
            else:
                self.emit("error", err)
                await asyncio.sleep(_ERROR_PAUSE_S)
            return []

    async def _move_to_active(self, count: int) -> list:
        """``count`` moveToActive calls (bullmq's script and arguments) and the waiting count, in one round trip.

        The pipeline is not a transaction: each script is atomic on its own, as a single fetch is, and other workers'
        fetches may interleave. It runs on a pooled connection, not the worker's single one that moveToCompleted and
        the lock renewal queue on.
        """
        scripts = self.scripts
        script = scripts.commands["moveToActive"]
        keys = scripts.getKeys(_MOVE_TO_ACTIVE_KEYS)
        now = round(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        tokens = []
        for _ in range(count):
            self._tokens += 1
            token = f"{self.id}:{self._tokens}"
            opts = msgpack.packb({"token": token, "lockDuration": self.opts["lockDuration"],
                                  "limiter": self.opts.get("limiter")}, use_bin_type=True)
            # EVALSHA itself, not script(client=pipe): that would cost a SCRIPT EXISTS round trip per pipeline.
            pipe.evalsha(script.sha, len(keys), *keys, scripts.keys[""], now, opts)
            tokens.append(token)
        pipe.llen(scripts.keys["wait"])
        pipe.zcard(scripts.keys["prioritized"])
        replies = await pipe.execute(raise_on_error=False)
        *moved, waiting, prioritized = replies
        jobs, failure = [], None
        for token, reply in zip(tokens, moved):
            if isinstance(reply, Exception):
                # NOSCRIPT (a Redis that restarted lost its scripts): that call moved nothing; load it and go on.
                failure = failure or reply
                continue
            job_data, job_id, limit_until, delay_until = raw2NextJobData(reply)
            job = await self.nextJobFromJobData(job_data, job_id, limit_until or 0, delay_until or 0, token)
            if job is not None:
                jobs.append(job)
        if isinstance(waiting, int) and isinstance(prioritized, int):
            self._known_waiting = waiting + prioritized
        if isinstance(failure, NoScriptError):
            script.sha = await self.client.script_load(script.script)
        elif failure is not None and not jobs:
            raise failure
        elif failure is not None:
            self.emit("error", failure)  # the jobs that did come back run; the failed calls moved nothing
        return jobs
