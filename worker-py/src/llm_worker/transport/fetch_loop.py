"""bullmq.Worker with a job-fetch loop of our own: a free slot takes a waiting job within about a millisecond.

Why: bullmq 3.4.4's ``Worker.run`` keeps ``concurrency`` fetch tasks alive. Whenever one returns a job, it starts a
new fetch task for *every* free slot at once (up to MAX_BATCH - 1 of them), each one a ``moveToActive`` Lua call, and
all but one come back empty. Measured with the stand-in engine, MAX_BATCH 256, 16 streams: 82 ``moveToActive`` calls
per request (Redis ``INFO commandstats``), and enqueue → pick-up took 28-53 ms (p50) with the asyncio loop busy
serving those replies; at 200 streams 1.1-1.4 s.

This loop is what BullMQ's Node worker does: one fetch at a time. ``moveToActive`` while jobs are known to wait; when
it comes back empty the queue is drained and one ``BZPOPMIN`` on the queue's marker blocks on a connection of its own
until ``Queue.add`` (or a job moved back from delayed/stalled) sets the marker — a job added between the empty
``moveToActive`` and the ``BZPOPMIN`` has set the marker already, so it is never missed. When every slot is busy the
loop waits for a job to end, not for Redis. Everything else is bullmq's own ``Worker``: ``processJob`` (lock
tracking, ``moveToCompleted``/``moveToFailed``), the lock renewal, the stalled-job check, ``pause``, ``close``; jobs are
ordinary BullMQ jobs in ordinary states. Only ``run`` is replaced (bullmq is pinned in requirements.txt; a bullmq
upgrade must re-check this class against ``bullmq/worker.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bullmq import Worker
from bullmq.timer import Timer

log = logging.getLogger("llm_worker.transport.fetch_loop")

# After an error that is not a lost connection (bullmq's own short_retry_delay): keeps a persistent fault from
# spinning the loop.
_ERROR_PAUSE_S = 0.1


class FetchLoopWorker(Worker):
    """``bullmq.Worker`` whose ``run`` fetches one job at a time (see the module docstring). Same options."""

    def __init__(self, name: str, processor: Any, opts: dict[str, Any]):
        super().__init__(name, processor, {**opts, "autorun": False})
        self._slot_free = asyncio.Event()
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
        n = 0
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
                n += 1
                token = f"{self.id}:{n}"
                job = await self._next_job(token)
                if job is None:
                    continue
                self.emit("active", job, "waiting")
                task = asyncio.ensure_future(self.processJob(job, token))
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

    async def _next_job(self, token: str):
        """One waiting job moved to active, or None (nothing came within the block timeout, paused, closing)."""
        try:
            if self.drained:
                self.waiting = asyncio.ensure_future(self.waitForJob())
                try:
                    self.blockUntil = await self.waiting
                except asyncio.CancelledError:
                    if self.paused or self.closing:
                        return None  # pause()/close() cancel the idle BZPOPMIN
                    raise
                finally:
                    self.waiting = None
                if self.blockUntil > int(time.time() * 1000):
                    return None  # the marker names a delayed job's due time: nothing to take yet
            if self.paused or self.closing:
                return None
            # Sets self.drained when the queue had nothing: the next call blocks on the marker.
            return await self.moveToActive(token)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self.closing or self.closed:
                return None
            if self.isConnectionError(err):
                # bullmq's run waits runRetryDelay after a lost connection before fetching again; so do we (service.py
                # sets it to 1 s).
                await asyncio.sleep(self.opts.get("runRetryDelay", 15000) / 1000)
            else:
                self.emit("error", err)
                await asyncio.sleep(_ERROR_PAUSE_S)
            return None
