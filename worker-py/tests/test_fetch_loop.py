"""The worker's job-fetch loop (transport/fetch_loop.py) against a real redis-server.

bullmq 3.4.4's own Worker.run answered every new job with one moveToActive call per free slot (MAX_BATCH − 1 of them,
all but one empty); the fetch loop must take a job with a constant number of Redis calls, still fill every slot, and
take a burst of waiting jobs in a few round trips, not one round trip per job (issue 17 item 2).
"""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from conftest import wait_until_async
from transport_util import job_data, serve

from llm_worker.engine.standin import StandInEngine
from llm_worker.transport.fetch_loop import FETCH_BATCH


def test_one_fetch_per_job_not_one_per_free_slot(redis_url, loaded):
    async def body():
        engine = StandInEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, step_ms=1)
        engine.start()
        stats = aioredis.from_url(redis_url)
        try:
            async with serve(redis_url, engine, loaded) as (svc, gw):  # MAX_BATCH 16: 15 free slots per job
                await gw.run(job_data("warm up", max_tokens=2))
                before = (await stats.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
                for i in range(8):
                    events, job = await gw.run(job_data(f"job {i}", max_tokens=2))
                    assert events[-1]["type"] == "done"
                after = (await stats.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
                # Per job: Queue.add, moveToActive (the job), moveToActive (empty: drained), moveToFinished, and the
                # odd lock renewal / stalled check. bullmq's own loop made it 15 more per job at MAX_BATCH 16.
                return (after - before) / 8
        finally:
            await stats.aclose()
            engine.stop()

    per_job = asyncio.run(body())
    assert per_job < 8, per_job


def test_every_slot_fills_and_all_jobs_finish(redis_url, loaded):
    async def body():
        engine = StandInEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, step_ms=20)
        engine.start()
        try:
            async with serve(redis_url, engine, loaded) as (svc, gw):
                # Each job runs 3 s (150 steps of 20 ms): the loop has that long to fill all 16 slots before the first
                # job ends, ample even on a loaded machine (a fetch takes milliseconds).
                running = asyncio.gather(*(gw.run(job_data(f"job {i}", max_tokens=150, ignore_eos=True))
                                           for i in range(24)))
                seen = []

                async def all_slots_busy():  # or every job over without that ever happening
                    seen.append(len(svc.runs))
                    return seen[-1] >= 16 or running.done()

                await wait_until_async(all_slots_busy, 300, "16 jobs running at once")
                results = await running
                return max(seen), results
        finally:
            engine.stop()

    peak, results = asyncio.run(body())
    assert peak == 16, f"at most {peak} jobs ran at once"  # MAX_BATCH jobs at once, the rest waited for a slot
    assert all(events[-1]["type"] == "done" for events, _ in results)
    assert all(job.returnvalue["usage"]["completion_tokens"] == 150 for _, job in results)


class _MoveToActiveWrites:
    """Counts the worker's writes to Redis that carry moveToActive (one write, one round trip) and the calls in them.

    A counter on redis-py's real socket writes, not a stand-in for Redis: every command still goes to the real server.
    """

    def __init__(self, sha: str):
        self.sha = sha.encode()
        self.writes = self.calls = 0
        self._send = AbstractConnection.send_packed_command

    def __enter__(self):
        counter, send = self, self._send

        async def counting_send(conn, command, check_health=True):
            data = command if isinstance(command, (bytes, str)) else b"".join(bytes(c) for c in command)
            data = data.encode() if isinstance(data, str) else data
            if counter.sha in data:
                counter.writes += 1
                counter.calls += data.count(counter.sha)
            return await send(conn, command, check_health)

        AbstractConnection.send_packed_command = counting_send
        return self

    def __exit__(self, *exc):
        AbstractConnection.send_packed_command = self._send


def test_a_burst_of_waiting_jobs_is_fetched_in_a_few_round_trips(redis_url, loaded):
    jobs = 300

    async def body():
        engine = StandInEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, step_ms=1)
        engine.start()
        try:
            async with serve(redis_url, engine, loaded, fetch_concurrency=512) as (svc, gw):
                await gw.run(job_data("warm up", max_tokens=2))  # the worker is idle again: blocked on the marker
                sha = svc.worker.scripts.commands["moveToActive"].sha
                with _MoveToActiveWrites(sha) as fetches:
                    # All at once, as a burst of clients does: one addBulk (one MULTI) puts them in the wait list.
                    await gw.queue.addBulk([{"name": "chat", "data": job_data(f"job {i}", max_tokens=2),
                                             "opts": {"jobId": f"chatcmpl-{uuid.uuid4().hex}", "attempts": 1}}
                                            for i in range(jobs)])

                    async def all_done():
                        return (await gw.queue.getJobCounts("completed"))["completed"] >= jobs + 1

                    await wait_until_async(all_done, 300, f"{jobs} jobs completed")
                failed = (await gw.queue.getJobCounts("failed"))["failed"]
                return fetches.writes, fetches.calls, failed
        finally:
            engine.stop()

    writes, calls, failed = asyncio.run(body())
    assert failed == 0
    assert calls >= jobs, calls  # every job came through a moveToActive the counter saw
    # One round trip per FETCH_BATCH jobs, a few more while the bulk add lands and at the end (drained, woken by the
    # marker the last fetch set). One job per round trip would be ≥ 300.
    assert writes <= jobs // FETCH_BATCH + 12, f"{writes} round trips carried the {calls} moveToActive calls"
