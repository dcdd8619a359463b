"""The worker's job-fetch loop (transport/fetch_loop.py) against a real redis-server: one fetch per free slot.

bullmq 3.4.4's own Worker.run answered every new job with one moveToActive call per free slot (MAX_BATCH − 1 of them,
all but one empty); the fetch loop must take a job with a constant number of Redis calls, and still fill every slot.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from conftest import wait_until_async
from transport_util import job_data, serve

from llm_worker.engine.standin import StandInEngine


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
