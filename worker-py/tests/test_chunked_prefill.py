"""Chunked prefill in CpuBatchEngine (engine/prefill.py): a long prompt prefilled a chunk per turn computes what one
pass computes (fp32 greedy), alone and beside running rows, with a grammar, and a cancelled row mid-prefill frees its
slot. The conftest ``engine`` (chunking off) gives the one-pass reference."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import chat_ids, wait_until
from engine_util import Collector, run_requests

from llm_worker.engine.base import GenerationRequest, SamplingParams
from llm_worker.engine.cpu_batch import CpuBatchEngine
from llm_worker.grammar import GrammarCompiler, GrammarSpec

CHUNK = 128  # not a divisor of the long prompt's length: the last chunk is a short one
TOPICS = ["cats", "the sea", "robots", "bread", "winter", "trains", "music", "mountains"]
FACTS = " ".join(f"Fact {i}: the {TOPICS[i % len(TOPICS)]} of district {i} weigh {i * 7 % 13 + 2} tonnes."
                 for i in range(60))


@pytest.fixture(scope="module")
def chunked(loaded):
    eng = CpuBatchEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, max_batch=16,
                         context_length=loaded.context_length, prefill_chunk_tokens=CHUNK)
    eng.start()
    yield eng
    eng.stop()


def long_request(tokenizer, rid: str, question: str = "Which district has the heaviest cats?", **params):
    ids = chat_ids(tokenizer, f"{FACTS}\n\n{question}")
    assert len(ids) > 6 * CHUNK and len(ids) % CHUNK, len(ids)
    return GenerationRequest(rid, ids, SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **params}))


def test_long_prompt_chunked_equals_one_pass(engine, chunked, tokenizer):
    one_pass = run_requests(engine, [long_request(tokenizer, "whole")])["whole"]
    in_chunks = run_requests(chunked, [long_request(tokenizer, "chunked")])["chunked"]
    assert in_chunks.tokens[0] == one_pass.tokens[0]
    assert in_chunks.finish[0] == one_pass.finish[0]


def test_running_rows_decode_between_chunks_and_nothing_changes(engine, chunked, tokenizer):
    """Rows already decoding get tokens while the long prompt is prefilled (between its chunks, not after it), and
    every request computes what it computes alone."""
    short = [GenerationRequest(f"s{i}", chat_ids(tokenizer, f"Write a story about {t}."),
                               SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
             for i, t in enumerate(TOPICS[:4])]
    alone = {r.request_id: run_requests(engine, [r])[r.request_id].tokens[0] for r in short[:2]}
    alone_long = run_requests(engine, [long_request(tokenizer, "ref")])["ref"].tokens[0]

    long = long_request(tokenizer, "long")
    c = Collector(short + [long])
    during: dict[str, int] = {}  # tokens each short row had when the long one was submitted / got its first token

    def emit(rid, outputs):
        if rid == "long" and "first" not in during:
            during["first"] = sum(len(c.results[r.request_id].tokens.get(0, [])) for r in short)
        c.emit(rid, outputs)

    for r in short:
        chunked.submit(r, emit)
    wait_until(lambda: all(c.results[r.request_id].tokens.get(0) for r in short), 300, "the short rows to decode")
    during["submitted"] = sum(len(c.results[r.request_id].tokens.get(0, [])) for r in short)
    chunked.submit(long, emit)
    assert c.done.wait(600)
    # ≥ 7 chunks: the short rows had a decode step after each but the last (one pass: none at all).
    assert during["first"] - during["submitted"] >= 4 * len(short), during
    assert c.results["long"].tokens[0] == alone_long
    for rid, tokens in alone.items():
        assert c.results[rid].tokens[0] == tokens


def test_grammar_row_prefilled_in_chunks(engine, chunked, tokenizer, loaded):
    grammars = GrammarCompiler(tokenizer, int(loaded.model.config.vocab_size), sorted(loaded.eos_token_ids))
    schema = {"type": "object", "properties": {"district": {"type": "integer"}, "topic": {"type": "string"}},
              "required": ["district", "topic"], "additionalProperties": False}
    grammar = grammars.compile(GrammarSpec.json_schema(schema))
    ask = "Answer as JSON: which district has the heaviest cats?"
    one_pass = run_requests(engine, [long_request(tokenizer, "g1", ask, max_tokens=60, grammar=grammar)])["g1"]
    in_chunks = run_requests(chunked, [long_request(tokenizer, "g2", ask, max_tokens=60, grammar=grammar)])["g2"]
    assert in_chunks.tokens[0] == one_pass.tokens[0]
    assert in_chunks.finish[0] == "stop"
    jsonschema.validate(json.loads(tokenizer.decode(in_chunks.tokens[0], skip_special_tokens=True)), schema)


def test_n_choices_share_a_chunked_prefill(engine, chunked, tokenizer):
    alone = run_requests(engine, [long_request(tokenizer, "one")])["one"].tokens[0]
    out = run_requests(chunked, [long_request(tokenizer, "two", n=2)])["two"]
    assert out.tokens[0] == alone and out.tokens[1] == alone


def test_cancel_mid_prefill_frees_the_slot(loaded, tokenizer):
    """max_batch 1: the row in prefill holds the only slot; once cancelled, the next request gets it."""
    eng = CpuBatchEngine(loaded.model, eos_token_ids=loaded.eos_token_ids, max_batch=1,
                         context_length=loaded.context_length, prefill_chunk_tokens=32)
    eng.start()
    try:
        long = long_request(tokenizer, "long")
        c = Collector([long])
        eng.submit(long, c.emit)
        wait_until(lambda: eng.stats().running_sequences == 1 and eng.stats().kv_cache_bytes > 0, 300,
                   "the long prompt to be part-way through its prefill")
        assert not c.results["long"].tokens.get(0) and not c.done.is_set()
        eng.cancel("long")
        assert c.done.wait(300)
        assert c.results["long"].finish[0] == "cancelled" and not c.results["long"].tokens.get(0)
        wait_until(lambda: eng.stats().running_sequences == 0 and eng.stats().kv_cache_bytes == 0, 60,
                   "the engine to free the cancelled prefill")
        after = GenerationRequest("after", chat_ids(tokenizer, "Name three colours."),
                                  SamplingParams(max_tokens=8, temperature=0.0))
        assert run_requests(eng, [after], timeout=300)["after"].finish[0] in ("stop", "length")
    finally:
        eng.stop()
