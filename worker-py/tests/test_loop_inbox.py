"""job_run's _LoopInbox: engine-thread emits reach the loop in order, many per loop wake-up."""

from __future__ import annotations

import asyncio
import threading

from conftest import wait_until_async

from llm_worker.transport.job_run import _LoopInbox


def test_emits_from_a_thread_arrive_in_order_and_share_wake_ups():
    async def body():
        loop = asyncio.get_running_loop()
        box = _LoopInbox(loop)
        wakeups = []
        real = loop.call_soon_threadsafe

        def counting(fn, *args):
            wakeups.append(fn)
            return real(fn, *args)

        box.loop = type("L", (), {"call_soon_threadsafe": staticmethod(counting)})()
        got: list[int] = []

        def engine():  # bursts as an engine step emits: many puts, then a pause
            for step in range(20):
                for i in range(50):
                    box.put(got.append, step * 50 + i)
                threading.Event().wait(0.005)

        t = threading.Thread(target=engine)
        t.start()
        async def all_arrived():
            return len(got) == 1000

        await wait_until_async(all_arrived, 30, "1,000 emits handled on the loop")
        t.join()
        return got, wakeups

    got, wakeups = asyncio.run(body())
    assert got == list(range(1000))
    assert len(wakeups) < 500, f"{len(wakeups)} loop wake-ups for 1,000 emits"
