"""JobStream in isolation (a recording stand-in for Redis): coalescing, first-token flush, seq numbering."""

from __future__ import annotations

import asyncio
import json
import time

from conftest import wait_subscribed, wait_until_async

from llm_worker.transport.publisher import JobStream


class RecordingRedis:
    """Records each PUBLISH with the time it went out. ``delay``: a round trip's latency (a slow Redis, simulated)."""

    def __init__(self, delay: float = 0.0):
        self.sent: list[tuple[float, dict]] = []
        self.delay = delay

    async def publish(self, channel: str, message: str) -> None:
        await asyncio.sleep(self.delay)
        self.sent.append((time.monotonic(), json.loads(message)))


def test_first_text_immediate_then_coalesced_then_done():
    # A long flush interval (1 s), so that a loaded machine's scheduling delays stay well inside it: the first text
    # must go out long before it, and the four pieces added after it must all fall within it.
    async def body():
        r = RecordingRedis()
        s = JobStream(r, "job1", flush_ms=1000)
        await s.publish_started("w1", 10)
        t0 = time.monotonic()
        s.add(0, "Hel", 1, None)

        async def first_sent():  # `started` and the first text
            return len(r.sent) >= 2

        await wait_until_async(first_sent, 60, "the first delta")
        for piece in ["lo", ",", " wor", "ld"]:
            s.add(0, piece, 1, None)
            await asyncio.sleep(0.002)  # tokens spread over time, as a model emits them: not synchronisation

        async def coalesced_sent():  # the flush timer sends the four pieces
            return len(r.sent) >= 3

        await wait_until_async(coalesced_sent, 60, "the coalesced delta")
        await s.finish({"type": "done", "result": {"ok": True}})
        return t0, r.sent

    t0, sent = asyncio.run(body())
    types = [m["type"] for _, m in sent]
    assert types == ["started", "delta", "delta", "done"]
    first_t, first = sent[1]
    assert first["choices"][0]["text"] == "Hel" and first_t - t0 < 0.5  # not held for the flush interval
    assert sent[2][1]["choices"][0] == {"index": 0, "text": "lo, world", "tokens": 4, "logprobs": None}
    assert sent[2][0] - first_t >= 0.99  # coalesced: one message for four tokens, one interval later
    assert [m["seq"] for _, m in sent[1:]] == [1, 2, 3]


def test_choices_interleave_and_empty_text_waits():
    async def body():
        r = RecordingRedis(delay=0.001)
        s = JobStream(r, "job2", flush_ms=10)
        await s.publish_started("w1", 3)
        s.add(0, "A", 1, None)
        s.add(1, "", 1, None)  # held-back bytes: no text yet

        async def a_sent():  # choice 0's text went out alone: choice 1 had none yet
            return any(m["type"] == "delta" for _, m in r.sent)

        await wait_until_async(a_sent, 60, "the delta of choice 0")
        s.add(1, "é", 1, [{"token": "é", "logprob": -0.1, "bytes": [195, 169], "top_logprobs": []}])
        await s.finish({"type": "error", "error": {"code": "cancelled", "message": "x"}})
        return r.sent

    sent = asyncio.run(body())
    deltas = [m for _, m in sent if m["type"] == "delta"]
    assert deltas[0]["choices"] == [{"index": 0, "text": "A", "tokens": 1, "logprobs": None}]
    assert deltas[1]["choices"][0]["index"] == 1 and deltas[1]["choices"][0]["tokens"] == 2
    assert sent[-1][1]["type"] == "error" and sent[-1][1]["seq"] == len(deltas) + 1


class PipelineRedis(RecordingRedis):
    """Also answers pipeline(): records each batch (one round trip) as a list of (channel, message). ``held``: each
    round trip stays in flight until the test lets it go (``let_go``), so the test knows what is in flight when."""

    def __init__(self, delay: float = 0.0, held: bool = False):
        super().__init__(delay)
        self.batches: list[list[tuple[str, dict]]] = []
        self.held = held
        self.begun = 0  # round trips begun (held or done)
        self._in_flight: list[asyncio.Future] = []

    def let_go(self) -> None:
        """Ends the oldest held round trip."""
        self._in_flight.pop(0).set_result(None)

    def pipeline(self, transaction: bool = False):
        outer = self

        class Pipe:
            def __init__(self):
                self.cmds: list[tuple[str, str]] = []

            def publish(self, channel: str, message: str) -> None:
                self.cmds.append((channel, message))

            async def execute(self, raise_on_error: bool = True):
                outer.begun += 1
                if outer.held:
                    fut = asyncio.get_running_loop().create_future()
                    outer._in_flight.append(fut)
                    await fut
                else:
                    await asyncio.sleep(outer.delay)
                outer.batches.append([(c, json.loads(m)) for c, m in self.cmds])
                now = time.monotonic()
                outer.sent.extend((now, json.loads(m)) for _, m in self.cmds)
                return [1] * len(self.cmds)

        return Pipe()


def test_outbox_batches_many_jobs_per_round_trip_in_order():
    """Messages that become due while a batch is in flight leave together; each job's own order and seq hold."""

    async def body():
        r = PipelineRedis(held=True)
        streams = [JobStream(r, f"job{i}", flush_ms=0) for i in range(20)]

        async def begun(n):
            async def check():
                return r.begun == n
            await wait_until_async(check, 60, f"round trip {n} to begin")

        for i, s in enumerate(streams):
            await s.publish_started("w1", i)  # queued, not awaited: must still precede the job's first delta
        for step in range(3):
            for s in streams:
                s.add(0, f"t{step}", 1, None)  # from step 1 on: due while the previous step's batch is in flight
            if step:
                r.let_go()
            await begun(step + 1)
        r.let_go()
        finishing = asyncio.gather(*(s.finish({"type": "done", "result": {}}) for s in streams))
        await begun(4)
        r.let_go()
        await finishing
        return r

    r = asyncio.run(body())
    kinds = [[(m["type"], "".join(c["text"] for c in m.get("choices", []))) for _, m in b] for b in r.batches]
    # One round trip per step for all 20 jobs: the first with every `started`, then one per step, then every `done`.
    assert kinds == [[("started", "")] * 20 + [("delta", "t0")] * 20, [("delta", "t1")] * 20, [("delta", "t2")] * 20,
                     [("done", "")] * 20]
    for i in range(20):
        msgs = [m for b in r.batches for c, m in b if c == f"llm:job:job{i}"]
        assert [m["type"] for m in msgs][0] == "started"
        assert msgs[-1]["type"] == "done"
        numbered = [m for m in msgs if m["type"] != "started"]
        assert [m["seq"] for m in numbered] == list(range(1, len(numbered) + 1))
        assert "".join(c["text"] for m in numbered if m["type"] == "delta" for c in m["choices"]) == "t0t1t2"


def test_outbox_survives_a_failed_round_trip():
    """A publish error is logged, the waiting job goes on (the gateway recovers a gap from the stored result)."""

    class Broken(PipelineRedis):
        def pipeline(self, transaction: bool = False):
            raise ConnectionError("redis went away")

        async def publish(self, channel: str, message: str) -> None:
            raise ConnectionError("redis went away")

    async def body():
        s = JobStream(Broken(), "job-x", flush_ms=0)
        await s.publish_started("w1", 1)
        s.add(0, "a", 1, None)
        await asyncio.wait_for(s.finish({"type": "done", "result": {}}), 60)  # bounds a hang only
        return s.seq

    assert asyncio.run(body()) == 2


def test_outbox_against_redis_in_order(redis_url):
    """The real path (redis-py pipelines on a real server): every job's messages arrive complete and in order."""
    import redis.asyncio as aioredis

    async def body():
        r = aioredis.from_url(redis_url, decode_responses=True)
        listener = aioredis.from_url(redis_url, decode_responses=True)
        pubsub = listener.pubsub()
        await pubsub.psubscribe("llm:job:outbox-*")
        await wait_subscribed(pubsub, 1)
        streams = [JobStream(r, f"outbox-{i}", flush_ms=0) for i in range(30)]
        for s in streams:
            await s.publish_started("w1", 1)
        for step in range(4):
            for s in streams:
                s.add(0, f"{step}", 1, None)
            await asyncio.sleep(0.005)  # a model's step time between tokens: not synchronisation (nothing waits on it)
        await asyncio.gather(*(s.finish({"type": "done", "result": {}}) for s in streams))
        got: dict[str, list[dict]] = {}
        while sum(1 for msgs in got.values() if msgs and msgs[-1]["type"] == "done") < 30:
            m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
            assert m is not None, got
            got.setdefault(m["channel"], []).append(json.loads(m["data"]))
        await pubsub.aclose()
        await listener.aclose()
        await r.aclose()
        return got

    got = asyncio.run(body())
    assert len(got) == 30
    for msgs in got.values():
        assert msgs[0]["type"] == "started" and msgs[-1]["type"] == "done"
        numbered = msgs[1:]
        assert [m["seq"] for m in numbered] == list(range(1, len(numbered) + 1))
        assert "".join(c["text"] for m in numbered if m["type"] == "delta" for c in m["choices"]) == "0123"


def test_messages_survive_a_connection_the_server_closed(redis_url):
    """A Redis that restarted closes the pool's connections: the next PUBLISH (one, or a pipeline) goes out anyway.

    Without the retry in transport/redis_client.py the first message after the close was logged and lost.
    """
    import redis.asyncio as aioredis

    from llm_worker.transport.redis_client import redis_client

    async def body():
        r = redis_client(redis_url, max_connections=4)
        admin = aioredis.from_url(redis_url, decode_responses=True)
        pubsub = admin.pubsub()
        await pubsub.psubscribe("llm:job:closed-*")
        await wait_subscribed(pubsub, 1)
        got: list[tuple[str, str]] = []

        async def receive(count: int) -> None:
            while len(got) < count:
                m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
                assert m is not None, got
                got.append((m["channel"], json.loads(m["data"])["type"]))

        async def close_pool_connection() -> None:
            cid = await r.client_id()  # the pool's one idle connection (calls take turns on it)
            assert await admin.client_kill_filter(_id=cid) == 1

        await close_pool_connection()
        await JobStream(r, "closed-single", flush_ms=0).publish_started("w1", 1)  # one message: a plain PUBLISH
        await receive(1)
        await close_pool_connection()
        streams = [JobStream(r, f"closed-{i}", flush_ms=0) for i in range(3)]  # sent together: one pipeline
        await asyncio.gather(*(s.publish_started("w1", 1) for s in streams))
        await receive(4)
        await pubsub.aclose()
        await admin.aclose()
        await r.aclose()
        return got

    got = asyncio.run(body())
    assert sorted(got) == [("llm:job:closed-0", "started"), ("llm:job:closed-1", "started"),
                           ("llm:job:closed-2", "started"), ("llm:job:closed-single", "started")]


def test_stored_events_are_the_published_ones_in_order(redis_url):
    """store_events: each message is also in LIST llm:events:{id}, byte for byte and in order, with the list's TTL."""
    import redis.asyncio as aioredis

    from llm_worker.protocol import StoreEvents, events_key

    async def body():
        r = aioredis.from_url(redis_url, decode_responses=True)
        listener = aioredis.from_url(redis_url, decode_responses=True)
        pubsub = listener.pubsub()
        await pubsub.subscribe("llm:job:stored-1")
        await wait_subscribed(pubsub, 1)
        plain = JobStream(r, "stored-plain", flush_ms=0)  # no store_events: published only
        s = JobStream(r, "stored-1", flush_ms=0, store=StoreEvents(ttl_ms=60_000, max_bytes=1 << 20))
        await s.publish_started("w1", 3)
        await plain.publish_started("w1", 3)
        for piece in ["Hel", "lo", " there"]:
            s.add(0, piece, 1, None)
            await asyncio.sleep(0.005)
        await s.finish({"type": "done", "result": {"ok": True}})
        heard = []
        while not heard or json.loads(heard[-1])["type"] != "done":
            m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
            assert m is not None, heard
            heard.append(m["data"])
        stored = await r.lrange(events_key("stored-1"), 0, -1)
        ttl = await r.pttl(events_key("stored-1"))
        plain_exists = await r.exists(events_key("stored-plain"))
        await pubsub.aclose()
        await listener.aclose()
        await r.aclose()
        return heard, stored, ttl, plain_exists

    heard, stored, ttl, plain_exists = asyncio.run(body())
    assert stored == heard  # the same text: a resuming gateway drops what it both reads and hears by equality
    assert [json.loads(m)["type"] for m in stored][0] == "started" and json.loads(stored[-1])["type"] == "done"
    assert 50_000 < ttl <= 60_000
    assert plain_exists == 0


def test_stored_events_stop_at_their_bound_with_a_marker(redis_url):
    """Past max_bytes the list ends with {"type": "truncated"} and grows no more; every event is still published."""
    import redis.asyncio as aioredis

    from llm_worker.protocol import TRUNCATED_MARKER, StoreEvents, events_key

    async def body():
        r = aioredis.from_url(redis_url, decode_responses=True)
        s = JobStream(r, "stored-bound", flush_ms=0, store=StoreEvents(ttl_ms=60_000, max_bytes=400))
        await s.publish_started("w1", 3)
        for i in range(20):
            s.add(0, f"piece {i} ", 1, None)
            await asyncio.sleep(0.002)
        await s.finish({"type": "done", "result": {"ok": True}})
        stored = await r.lrange(events_key("stored-bound"), 0, -1)
        await r.aclose()
        return stored, s.seq

    stored, last_seq = asyncio.run(body())
    assert stored[-1] == TRUNCATED_MARKER
    kept = stored[:-1]
    assert sum(len(m.encode()) for m in kept) <= 400 and len(kept) >= 2
    # Nothing after the marker, and what was kept is the prefix: started, then seq 1, 2, … without a gap.
    assert [json.loads(m).get("seq") for m in kept] == [None, *range(1, len(kept))]
    assert last_seq > len(kept)  # the stream went on (published) past the bound
