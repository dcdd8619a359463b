"""The worker process's asyncio side: BullMQ worker on the model's queue, registration, cancel listener, shutdown.

BullMQ settings (PROTOCOL.md "Worker death and retries"): concurrency = MAX_BATCH so the engine can batch that many
jobs; lockDuration 5 s renewed every 1.25-2.5 s by the asyncio loop (generation runs on the engine thread, so the
loop is never blocked for seconds and locks do not lapse under load); stalledInterval 2.5 s and maxStalledCount 1: a
job of a worker that died goes back to the wait list once, within 7.5 s, and another worker retries it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any, Optional

from bullmq import UnrecoverableError

from ..config import Config
from ..errors import JobError
from ..log import now_ms
from ..metrics import Metrics
from ..protocol import CANCEL_CHANNEL, JobData, WorkerInfo, cancelled_key
from .fetch_loop import FetchLoopWorker
from .job_run import JobContext, JobRun
from .redis_client import bull_prefix, bullmq_connection, cancel_listener_client, redis_client
from .registry import Heartbeat, publish_tokenizer

log = logging.getLogger("llm_worker.transport.service")

_frozen = False


def _freeze_startup_objects() -> None:
    """Moves what start-up allocated (the model, the tokenizer, every module) out of the cyclic collector's reach.

    Those objects live as long as the process, yet each full (generation 2) collection walked all of them: with the
    bundled model loaded that took ~220 ms every few seconds under load (measured with a gc callback, stand-in engine,
    200 streams), and the event loop — job pick-up, every stream's tokens — stood still meanwhile. Once per process.
    """
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()


def _thaw_startup_objects() -> None:
    """Hands them back at shutdown, so that the interpreter's own clean-up frees them (extensions check for leaks)."""
    global _frozen
    if _frozen:
        gc.unfreeze()
        _frozen = False


class WorkerService:
    def __init__(self, cfg: Config, ctx: JobContext, info: WorkerInfo, tokenizer_export: tuple[str, str, str],
                 metrics: Optional[Metrics] = None):
        self.cfg = cfg
        self.ctx = ctx
        self.info = info
        self.tokenizer_export = tokenizer_export
        self.metrics = metrics
        self.runs: dict[str, JobRun] = {}
        self.stopping = asyncio.Event()
        self.redis: Any = None
        self._cancel_client: Any = None  # self.redis on plain Redis; its own connection on a cluster (redis_client)
        self.worker: Optional[FetchLoopWorker] = None
        self.heartbeat: Optional[Heartbeat] = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        _freeze_startup_objects()
        # Sized above the batch: running jobs share it (cancel checks; their events go out through the publisher's outbox
        # on one connection at a time).
        self.redis = redis_client(self.cfg.redis_url, max_connections=self.cfg.max_batch + 16)
        self._cancel_client = cancel_listener_client(self.cfg.redis_url, self.redis)
        tok_json, cfg_json, digest = self.tokenizer_export
        await publish_tokenizer(self.redis, self.info.model, tok_json, cfg_json, digest)
        self._tasks.append(asyncio.create_task(self._cancel_listener(), name="cancel-listener"))
        if self.metrics is not None:
            self._tasks.append(asyncio.create_task(self._metrics_loop(), name="metrics"))
        # bullmq's Worker with our own fetch loop (fetch_loop.py): one moveToActive at a time, BZPOPMIN when drained.
        self.worker = FetchLoopWorker(self.info.queue, self.process, {
            "connection": bullmq_connection(self.cfg.redis_url),
            "prefix": bull_prefix(self.cfg.redis_url),
            "concurrency": self.cfg.max_batch,
            "lockDuration": self.cfg.lock_duration_ms,
            "stalledInterval": self.cfg.stalled_interval_ms,
            "maxStalledCount": 1,
            # Seconds one idle BZPOPMIN blocks. close() waits for it, so this bounds how long an idle worker takes
            # to stop; new jobs wake it at once whatever the value.
            "drainDelay": 1,
            # After a lost connection the fetch loop waits this long before fetching again (bullmq's default is 15 s:
            # a worker whose Redis restarted sat idle that long while the queue filled). A second is enough not to
            # spin against a Redis that is down; its clients reconnect on their own meanwhile.
            "runRetryDelay": 1000,
            "name": self.info.worker_id,
        })
        self.worker.on("error", lambda err, *a: log.warning("bullmq error", extra={"error": str(err)}))
        self.heartbeat = Heartbeat(self.redis, self.info, self.cfg.heartbeat_ms, self.cfg.heartbeat_ttl_ms,
                                   tokenizer=self.tokenizer_export)
        await self.heartbeat.start()
        if self.metrics is not None:
            self.metrics.ready = True
        log.info("worker ready", extra={"workerId": self.info.worker_id, "queue": self.info.queue,
                                        "model": self.info.model, "engine": self.info.engine})
        self.ctx.after_ready()  # what start-up deferred past READY (the grammar compiler)

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        await self.stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop taking jobs, let in-flight ones finish (bounded), deregister, close connections."""
        log.info("shutting down", extra={"inFlight": len(self.runs), "graceMs": self.cfg.shutdown_grace_ms})
        if self.heartbeat is not None:
            self.heartbeat.set_ready(False)  # still listed (streams in flight depend on it), but not ready
        if self.metrics is not None:
            self.metrics.ready = False
        if self.worker is not None:
            # pause() stops fetching and waits for in-flight jobs while locks keep being renewed. Not close() first:
            # in bullmq 3.4.4 a closing worker's run loop exits and closes its LockManager while jobs still run, so a
            # job finishing after lockDuration fails with "Missing lock" (seen here with a 12 s drain).
            pause = asyncio.ensure_future(self.worker.pause())
            try:
                await asyncio.wait_for(asyncio.shield(pause), self.cfg.shutdown_grace_ms / 1000)
                await self.worker.close()
            except asyncio.TimeoutError:
                # Unfinished jobs are handed back: their locks lapse, BullMQ's stalled check re-queues them once.
                log.warning("grace period over; handing back unfinished jobs", extra={"jobs": list(self.runs)})
                await self.worker.close(force=True)
        if self.heartbeat is not None:
            await self.heartbeat.stop_and_deregister()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._cancel_client is not None and self._cancel_client is not self.redis:
            await self._cancel_client.aclose()
        await self.redis.aclose()
        _thaw_startup_objects()

    async def process(self, job: Any, token: str) -> dict[str, Any]:
        """BullMQ processor: the return value is the JobResult (stored by BullMQ as the job's returnvalue)."""
        job_id = str(job.id)
        started = now_ms()
        try:
            data = JobData.model_validate(job.data)
        except Exception as exc:
            await self._fail_unstarted(job_id, JobError("invalid_request", f"bad job data: {exc}"))
        run = JobRun(self.ctx, self.redis, job_id, data)
        self.runs[job_id] = run  # before the key check: a cancel message arriving meanwhile still finds the run
        outcome = "failed"
        try:
            if await self.redis.exists(cancelled_key(job_id)):
                raise JobError("cancelled", "cancelled before generation started")
            result = await run.execute()
            outcome = "completed"
            return result
        except JobError as err:
            outcome = err.code
            log.info("job failed", extra={"jobId": job_id, "code": err.code, "error": err.message})
            if not run.events_sent:
                await run.publish_error(err)
            raise UnrecoverableError(str(err)) from None
        finally:
            self.runs.pop(job_id, None)
            if self.metrics is not None:
                self.metrics.jobs.labels(outcome).inc()
                self.metrics.gen_seconds.observe((now_ms() - started) / 1000)

    async def _fail_unstarted(self, job_id: str, err: JobError) -> None:
        from .publisher import JobStream

        await JobStream(self.redis, job_id, self.cfg.stream_flush_ms).finish({"type": "error", "error": err.to_event()})
        if self.metrics is not None:
            self.metrics.jobs.labels(err.code).inc()
        raise UnrecoverableError(str(err))

    async def _cancel_listener(self) -> None:
        """llm:cancel carries job ids; a job running here leaves the engine's batch at the next token boundary."""
        while True:
            pubsub = self._cancel_client.pubsub()
            try:
                await pubsub.subscribe(CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":
                        # (Re)subscribed: a cancel published while we were not listening (a Redis blip) is lost, but
                        # the gateway sets the job's cancelled key before publishing: look at those of running jobs.
                        await self._recheck_cancelled()
                        continue
                    if message.get("type") != "message":
                        continue
                    run = self.runs.get(str(message["data"]))
                    if run is not None:
                        log.info("cancel", extra={"jobId": run.job_id})
                        run.cancel()
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:
                log.warning("cancel listener lost Redis; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def _recheck_cancelled(self) -> None:
        for job_id, run in list(self.runs.items()):
            if not run.cancelled and await self.redis.exists(cancelled_key(job_id)):
                log.info("cancel (found on resubscribe)", extra={"jobId": job_id})
                run.cancel()

    async def _metrics_loop(self) -> None:
        while True:
            self.metrics.update(self.ctx.engine.stats())
            await asyncio.sleep(0.25)
