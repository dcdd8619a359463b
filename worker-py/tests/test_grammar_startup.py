"""The grammar compiler is built after the worker is READY (issue 14 target 1): a structured-output request that
arrives while it is still being built waits for it and is served, instead of failing."""

from __future__ import annotations

import asyncio
import json
import threading

from conftest import wait_until_async
from transport_util import job_data, serve

from llm_worker.grammar import BackgroundGrammarCompiler, GrammarCompiler

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}


def test_structured_request_during_the_build_waits_for_the_compiler(redis_url, engine, loaded):
    release = threading.Event()
    build_started = threading.Event()

    def slow_build():  # the real compiler, held back until the job is waiting for it
        build_started.set()
        assert release.wait(120), "the test never released the build"
        return GrammarCompiler(loaded.tokenizer, int(loaded.model.config.vocab_size), sorted(loaded.eos_token_ids))

    grammars = BackgroundGrammarCompiler(slow_build)

    async def body():
        async with serve(redis_url, engine, loaded, grammars=grammars) as (svc, gw):
            assert build_started.wait(60), "the service did not start the build once ready"
            data = job_data("Name a city in France, as JSON.", max_tokens=40, temperature=0,
                            response_format={"type": "json_schema", "schema": SCHEMA})
            running = asyncio.create_task(gw.run(data))

            async def waiting():
                return grammars.waiting == 1

            await wait_until_async(waiting, 60, "the job to wait for the grammar compiler")
            assert not grammars.ready
            release.set()
            return await running

    try:
        events, job = asyncio.run(body())
    finally:
        release.set()
    assert events[-1]["type"] == "done", events[-1]
    text = events[-1]["result"]["choices"][0]["text"]
    assert set(json.loads(text)) == {"city"}


def test_a_failed_build_refuses_structured_requests_and_serves_the_rest(redis_url, engine, loaded):
    def broken_build():
        raise RuntimeError("llguidance exploded")

    async def body():
        async with serve(redis_url, engine, loaded, grammars=BackgroundGrammarCompiler(broken_build)) as (svc, gw):
            constrained, _ = await gw.run(job_data("Hi", max_tokens=5, temperature=0,
                                                   response_format={"type": "json_object"}))
            free, _ = await gw.run(job_data("Hi", max_tokens=5, temperature=0))
            return constrained, free

    constrained, free = asyncio.run(body())
    assert constrained[-1]["type"] == "error", constrained[-1]
    err = constrained[-1]["error"]
    assert err["code"] == "invalid_request" and err["param"] == "response_format"
    assert free[-1]["type"] == "done"
