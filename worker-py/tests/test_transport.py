"""The worker's Redis side against a real redis-server: events, results, failures, cancel, registration."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from conftest import chat_ids, wait_until_async
from engine_util import run_requests
from transport_util import job_data, serve

from llm_worker.engine.base import GenerationRequest, SamplingParams
from llm_worker.model import raw_prompt_ids


def run(coro):
    return asyncio.run(coro)


def check_seq(events):
    numbered = [e for e in events if e["type"] != "started"]
    assert [e["seq"] for e in numbered] == list(range(1, len(numbered) + 1))


def delta_text(events, index=0):
    return "".join(c["text"] for e in events if e["type"] == "delta" for c in e["choices"] if c["index"] == index)


def test_stream_events_and_result(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            events, job = await gw.run(job_data("What is the capital of France?", max_tokens=20, temperature=0))
            return events, job

    events, job = run(body())
    assert events[0]["type"] == "started" and events[-1]["type"] == "done"
    check_seq(events)
    result = events[-1]["result"]
    assert job.returnvalue == result
    assert delta_text(events) == result["choices"][0]["text"] and "Paris" in result["choices"][0]["text"]
    assert result["usage"]["prompt_tokens"] == len(chat_ids(loaded.tokenizer, "What is the capital of France?"))
    assert events[0]["prompt_tokens"] == result["usage"]["prompt_tokens"]
    t = result["timing"]
    assert t["picked_up_ms"] <= t["first_token_ms"] <= t["finished_ms"]


def test_raw_prompt_job_is_generated_without_the_chat_template(redis_url, engine, loaded):
    """A job with `prompt` instead of `messages` (/v1/completions): the model continues the text itself."""
    prompt = "The capital of France is"
    data = {**job_data("unused", max_tokens=8, temperature=0), "prompt": prompt}
    del data["messages"]

    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            return await gw.run(data, job_id=f"cmpl-{uuid.uuid4().hex}")

    events, job = run(body())
    assert events[0]["type"] == "started" and events[-1]["type"] == "done"
    result = events[-1]["result"]
    raw_ids = raw_prompt_ids(loaded.tokenizer, prompt)
    assert result["usage"]["prompt_tokens"] == events[0]["prompt_tokens"] == len(raw_ids)
    assert len(raw_ids) < len(chat_ids(loaded.tokenizer, prompt))  # no template around it
    text = result["choices"][0]["text"]
    assert delta_text(events) == text and job.returnvalue == result
    # Greedy: exactly what the engine generates after those ids alone (no template, no turn markers).
    alone = run_requests(engine, [GenerationRequest("raw", raw_ids, SamplingParams(max_tokens=8, temperature=0.0))])
    assert loaded.tokenizer.decode(alone["raw"].tokens[0], skip_special_tokens=True) == text


def test_stop_string_spanning_tokens_never_streamed(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            base, _ = await gw.run(job_data("Describe the sun in one sentence.", max_tokens=30, temperature=0))
            text = base[-1]["result"]["choices"][0]["text"]
            ids = loaded.tokenizer.encode(text, add_special_tokens=False)
            # A stop string from the middle of the greedy text, spanning the boundary of tokens 3 and 4.
            pre = loaded.tokenizer.decode(ids[:4])
            stop = pre[-2:] + loaded.tokenizer.decode(ids[:6])[len(pre):][:3]
            events, job = await gw.run(job_data("Describe the sun in one sentence.", max_tokens=30, temperature=0,
                                                stop=[stop]))
            return text, stop, events

    text, stop, events = run(body())
    result = events[-1]["result"]["choices"][0]
    assert result["finish_reason"] == "stop"
    assert result["text"] == text[:text.index(stop)]
    assert stop not in delta_text(events) and delta_text(events) == result["text"]


def test_logprobs_spell_the_text_a_stop_string_cut(redis_url, engine, loaded):
    """OpenAI's logprobs.content spells the returned content: no entries for the stop string or text held back."""
    prompt = "Describe the sun in one sentence."

    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            base, _ = await gw.run(job_data(prompt, max_tokens=30, temperature=0, logprobs=True))
            full = base[-1]["result"]["choices"][0]
            # A stop string of a few words from the middle of the text: tokens after its start must lose their entries.
            cut = len(full["text"]) // 2
            stop = full["text"][cut:cut + 6]
            events, _ = await gw.run(job_data(prompt, max_tokens=30, temperature=0, logprobs=True, stop=[stop]))
            return full, stop, events

    full, stop, events = run(body())
    assert "".join(e["token"] for e in full["logprobs"]) == full["text"]
    result = events[-1]["result"]["choices"][0]
    assert result["finish_reason"] == "stop" and result["text"] == full["text"][:full["text"].index(stop)]
    spelled = "".join(e["token"] for e in result["logprobs"])
    # Every entry's token shows in the text; the last may run past the cut (part of it was returned).
    assert spelled.startswith(result["text"]) and len(spelled) - len(result["logprobs"][-1]["token"]) < len(result["text"])
    assert result["logprobs"] == full["logprobs"][:len(result["logprobs"])]
    streamed = [e for ev in events if ev["type"] == "delta" for c in ev["choices"] for e in c.get("logprobs") or []]
    assert streamed == result["logprobs"]


def test_echo_logprobs_score_the_prompt_tokens(redis_url, engine, loaded):
    """/v1/completions echo + logprobs (job param prompt_logprobs): each choice's logprobs start with the prompt's own
    tokens, flagged, spelling the prompt; the first has no logprob; each is what the model gives that token after the
    ones before it (checked against one plain forward pass), with the asked-for alternatives; streamed like the rest."""
    import torch

    prompt = "The capital of France is"
    data = {**job_data("unused", max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, n=2), "prompt": prompt}
    data["params"]["prompt_logprobs"] = 2
    del data["messages"]

    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            return await gw.run(data, job_id=f"cmpl-{uuid.uuid4().hex}")

    events, _ = run(body())
    assert events[-1]["type"] == "done", events[-1]
    ids = raw_prompt_ids(loaded.tokenizer, prompt)
    with torch.inference_mode():
        expected = loaded.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for c in events[-1]["result"]["choices"]:
        head = [e for e in c["logprobs"] if e.get("prompt")]
        assert len(head) == len(ids) and c["logprobs"][:len(ids)] == head  # the prompt's entries come first
        assert "".join(e["token"] for e in head) == prompt
        assert head[0]["logprob"] is None and head[0]["top_logprobs"] == []
        for p, e in enumerate(head[1:], start=1):
            assert abs(e["logprob"] - float(expected[p - 1, ids[p]])) < 0.05, (p, e)
            assert len(e["top_logprobs"]) == 2
            assert e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-4
        assert len(c["logprobs"]) == len(ids) + 5  # then the generated tokens' entries
        streamed = [e for ev in events if ev["type"] == "delta" for ch in ev["choices"] if ch["index"] == c["index"]
                    for e in ch.get("logprobs") or []]
        assert streamed == c["logprobs"]


def test_n_choices_with_logprobs_interleave(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            return await gw.run(job_data("Say something.", max_tokens=6, temperature=1.0, seed=3, n=2,
                                         logprobs=True, top_logprobs=2, ignore_eos=True))

    events, _ = run(body())
    check_seq(events)
    result = events[-1]["result"]
    assert [c["index"] for c in result["choices"]] == [0, 1]
    for c in result["choices"]:
        assert len(c["logprobs"]) == 6 and len(c["logprobs"][0]["top_logprobs"]) == 2
        assert delta_text(events, c["index"]) == c["text"]
    assert result["usage"]["completion_tokens"] == 12


def test_invalid_request_fails_without_quotes(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            return await gw.run(job_data("Hi", logit_bias={"49152": 1}))

    events, job = run(body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "invalid_request"
    assert job.failedReason.startswith("invalid_request: ") and '"' not in job.failedReason


def test_more_choices_than_the_batch_and_forged_turns_are_client_errors(redis_url, engine, loaded):
    """n above MAX_BATCH would grow the batch (and its cache) past its size; a lone surrogate cannot be tokenized.
    Both are the client's errors (invalid_request, a 400 at the gateway), never a worker crash or internal_error."""
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            wide = await gw.run(job_data("Hi", n=engine.max_batch + 1, max_tokens=2))
            surrogate = await gw.run(job_data("bad \ud800 text", max_tokens=2))
            return wide, surrogate

    (ev_wide, _), (ev_sur, _) = run(body())
    assert ev_wide[-1]["type"] == "error" and ev_wide[-1]["error"]["code"] == "invalid_request"
    assert "MAX_BATCH" in ev_wide[-1]["error"]["message"]
    assert ev_sur[-1]["type"] == "error" and ev_sur[-1]["error"]["code"] == "invalid_request"


def test_no_room_in_the_batch_before_the_start_deadline_is_queue_timeout(redis_url, engine, loaded):
    """A job the worker took but could not start (every row busy) by start_deadline_ms fails queue_timeout (a 503 the
    client may retry), instead of waiting inside the worker up to the request's whole deadline.

    The batch is filled by max_batch single-choice requests, one row each: that is every request's fair share, so
    none gives a row back to the late one (a single n=max_batch request would: its surplus rows are parked)."""
    async def body():
        # The service may take more jobs than the engine has rows, so the late job reaches the engine and waits there.
        async with serve(redis_url, engine, loaded, fetch_concurrency=engine.max_batch + 1) as (svc, gw):
            long_ones = [asyncio.create_task(gw.run(job_data(f"Write a very long essay, part {i}.", max_tokens=2000,
                                                             temperature=1.0, ignore_eos=True)))
                         for i in range(engine.max_batch)]

            async def full():
                return engine.stats().running_sequences == engine.max_batch

            await wait_until_async(full, 300, "a full batch")
            late = job_data("Hi", max_tokens=3)
            late["start_deadline_ms"] = int(time.time() * 1000) + 500
            events, job = await gw.run(late)
            for job_id in list(svc.runs):
                await gw.cancel(job_id)
            await asyncio.gather(*long_ones)
            return events, job

    events, job = run(body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "queue_timeout"
    assert job.failedReason.startswith("queue_timeout: ")


def test_queue_timeout_and_context_length(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded, context_length=30) as (svc, gw):
            late = job_data("Hi")
            late["deadline_ms"] = int(time.time() * 1000) - 1
            a = await gw.run(late)
            b = await gw.run(job_data("This prompt is longer than thirty tokens once the chat template is applied."))
            return a, b

    (ev_a, job_a), (ev_b, job_b) = run(body())
    assert job_a.failedReason.startswith("queue_timeout: ") and ev_a[-1]["error"]["code"] == "queue_timeout"
    assert job_b.failedReason.startswith("context_length_exceeded: ")


def test_cancel_while_running_frees_sequence(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            sent = {}

            async def on_event(ev, job_id):
                if ev["type"] == "delta" and "t" not in sent:
                    sent["t"] = time.time()
                    await gw.cancel(job_id)

            events, job = await gw.run(job_data("Write a long essay.", max_tokens=2000, temperature=0,
                                                ignore_eos=True), on_event=on_event)

            # The engine frees the rows just after its last emit; the gauge follows its stats every 0.25 s.
            async def freed():
                s = engine.stats()
                return s.running_sequences == 0 and s.kv_cache_bytes == 0 and svc.metrics.running._value.get() == 0

            await wait_until_async(freed, 60, "the sequence to leave the batch and the gauge")
            return events, job, sent["t"]

    events, job, t_cancel = run(body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "cancelled"
    # Promptly, at a token boundary, not by running to max_tokens (2000 tokens: tens of seconds even on a fast machine):
    # measured well under a second on an idle machine; the bound leaves a loaded one room.
    assert events[-1]["_recv"] - t_cancel < 5.0
    done_tokens = sum(c["tokens"] for e in events if e["type"] == "delta" for c in e["choices"])
    assert done_tokens < 2000
    assert job.failedReason.startswith("cancelled: ")


def test_cancel_sent_while_the_listener_was_disconnected_is_not_missed(redis_url, engine, loaded):
    """The gateway sets llm:cancelled:{id}, then publishes on llm:cancel. If the worker's subscription was down at that
    moment (a Redis blip), the message is gone; on resubscribing the worker must look at the keys of its running jobs."""
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            # The worker's cancel listener is the only subscriber before the test subscribes to the job's channel.
            await wait_until_async(lambda: _pubsub_ids(gw.redis), 30, "the worker's cancel listener")
            listeners = await _pubsub_ids(gw.redis)
            killed = []

            async def on_event(ev, job_id):
                if ev["type"] == "delta" and not killed:
                    killed.append(job_id)
                    await gw.redis.set(f"llm:cancelled:{job_id}", "1", ex=600)  # the key, but no message
                    for cid in listeners:  # drop the worker's listener (a Redis blip), not our own subscription
                        await gw.redis.execute_command("CLIENT", "KILL", "ID", cid)

            return await gw.run(job_data("Write a long essay.", max_tokens=2000, temperature=0, ignore_eos=True),
                                on_event=on_event)

    events, job = run(body())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "cancelled"
    done_tokens = sum(c["tokens"] for e in events if e["type"] == "delta" for c in e["choices"])
    assert done_tokens < 2000


async def _pubsub_ids(redis) -> list[str]:
    listing = await redis.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    return [field.split("=", 1)[1] for line in text.splitlines() for field in line.split() if field.startswith("id=")]


def test_cancelled_before_pickup(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            await gw.redis.set("llm:cancelled:chatcmpl-precancelled", "1", ex=600)
            return await gw.run(job_data("Hi"), job_id="chatcmpl-precancelled")

    events, job = run(body())
    assert job.failedReason.startswith("cancelled: ") and events[-1]["error"]["code"] == "cancelled"


def test_registration_and_deregistration(redis_url, engine, loaded):
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            r = gw.redis
            tok = await r.hgetall("llm:tokenizer:smollm2-135m-instruct")
            info = json.loads(await r.get(f"llm:worker:{svc.info.worker_id}"))
            score = await r.zscore("llm:workers", svc.info.worker_id) - time.time() * 1000
            ttl = await r.pttl(f"llm:worker:{svc.info.worker_id}")
        async with serve(redis_url, engine, loaded) as (svc2, gw2):
            gone = (await gw2.redis.zscore("llm:workers", svc.info.worker_id),
                    await gw2.redis.exists(f"llm:worker:{svc.info.worker_id}"))
        return tok, info, score, ttl, gone

    tok, info, score, ttl, gone = run(body())
    assert set(tok) == {"hash", "tokenizer_json", "tokenizer_config_json"}
    cfg = json.loads(tok["tokenizer_config_json"])
    assert "<|im_start|>assistant" in cfg["chat_template"] and info["tokenizer_hash"] == tok["hash"]
    assert info["ready"] is True and info["context_length"] == 8192 and info["queue"].startswith("test-")
    assert 0 < score <= 5000 and 0 < ttl <= 5000
    assert gone == (None, 0)


def test_registration_restored_when_redis_loses_it(redis_url, engine, loaded):
    """A Redis that comes back empty (no persistence): the next beat writes the tokenizer again, then re-lists the
    worker, so gateways that never cached the tokenizer can serve the model again (tests/e2e/faults.test.ts: restart)."""
    async def body():
        async with serve(redis_url, engine, loaded) as (svc, gw):
            r, wid = gw.redis, svc.info.worker_id
            await r.delete("llm:tokenizer:smollm2-135m-instruct", f"llm:worker:{wid}")
            await r.zrem("llm:workers", wid)
            started = time.time()

            async def listed():
                return await r.zscore("llm:workers", wid) is not None

            await wait_until_async(listed, 60, "the worker to be listed again")
            listed_after = time.time() - started
            return listed_after, await r.hget("llm:tokenizer:smollm2-135m-instruct", "hash"), svc.info.tokenizer_hash, \
                await r.exists(f"llm:worker:{wid}")

    listed_after, stored_hash, own_hash, info_exists = run(body())
    # The next beat restores it (HEARTBEAT_MS 1 s; measured about a second): the bound under test is that it is back
    # before HEARTBEAT_TTL_MS (5 s), the silence after which gateways would count the worker dead.
    assert listed_after < 5.0
    assert stored_hash == own_hash and info_exists == 1  # the tokenizer is back by the time the worker is listed
