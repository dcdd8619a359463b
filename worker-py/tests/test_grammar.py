"""Structured outputs on the CPU batch engine with the bundled model: every constrained choice parses and validates,
inside a batch shared with free rows, which compute exactly what they compute alone."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llm_worker.engine.base import GenerationRequest, SamplingParams
from llm_worker.grammar import GrammarCompiler, GrammarError, GrammarSpec, allocate_masks, apply_masks, fill_masks

from conftest import chat_ids
from engine_util import run_requests

# Nested objects, arrays, enums, required fields, integer bounds. Strings and arrays are bounded so that a sampled
# choice of a 135M model always closes them within max_tokens (finish_reason "length" would be allowed but incomplete).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["engineer", "doctor", "artist", "teacher"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "skills", "active"],
    "additionalProperties": False,
}

PROMPTS = [f"Describe {who} as a JSON object." for who in (
    "a nurse from Lyon", "a retired pilot", "a young painter", "a chess teacher", "a software engineer in Oslo",
    "a farmer", "a violinist", "a surgeon", "a baker in Rome", "a student of physics", "a sailor", "a librarian",
    "a carpenter", "an astronaut", "a poet from Chile", "a bus driver", "a marathon runner", "a chef in Tokyo",
    "a museum guide", "a beekeeper", "a lighthouse keeper", "a data scientist")]


@pytest.fixture(scope="module")
def grammars(loaded):
    return GrammarCompiler(loaded.tokenizer, int(loaded.model.config.vocab_size), sorted(loaded.eos_token_ids))


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_every_constrained_choice_validates_beside_free_rows(engine, tokenizer, grammars):
    grammar = grammars.compile(GrammarSpec.json_schema(PERSON))
    requests = []
    for i, prompt in enumerate(PROMPTS):
        # Greedy and sampled choices (seeded), and one n=2 request: each row has its own grammar state.
        params = SamplingParams(max_tokens=160, temperature=0.0 if i % 2 else 0.9, seed=i, n=2 if i == 3 else 1,
                                grammar=grammar)
        requests.append(GenerationRequest(f"c{i}", chat_ids(tokenizer, prompt), params))
    free = [GenerationRequest(f"f{i}", chat_ids(tokenizer, p), SamplingParams(max_tokens=24, temperature=0.0))
            for i, p in enumerate(PROMPTS[:4])]
    results = run_requests(engine, requests + free)
    validated = 0
    for r in requests:
        for index in range(r.params.n):
            out = results[r.request_id]
            text = _text(tokenizer, out.tokens[index])
            assert out.finish[index] == "stop", (r.request_id, text)
            jsonschema.validate(json.loads(text), PERSON)
            validated += 1
    assert validated >= 20
    for r in free:
        assert results[r.request_id].finish[0] == "length"  # the free rows were not cut short by anyone's grammar


def test_free_rows_compute_what_they_compute_alone(engine, tokenizer, grammars):
    grammar = grammars.compile(GrammarSpec.json_schema(PERSON))
    free = GenerationRequest("alone", chat_ids(tokenizer, "Tell me about the sea."), SamplingParams(max_tokens=20,
                                                                                                      temperature=0.0))
    alone = run_requests(engine, [free])["alone"].tokens[0]
    mixed = [GenerationRequest(f"j{i}", chat_ids(tokenizer, p), SamplingParams(max_tokens=160, temperature=0.0,
                                                                                grammar=grammar))
             for i, p in enumerate(PROMPTS[:6])]
    beside = GenerationRequest("beside", free.prompt_ids, free.params)
    results = run_requests(engine, mixed + [beside])
    assert results["beside"].tokens[0] == alone
    for r in mixed:
        assert results[r.request_id].finish[0] == "stop"
        jsonschema.validate(json.loads(_text(tokenizer, results[r.request_id].tokens[0])), PERSON)


def test_json_object_rows_end_as_one_object(engine, tokenizer, grammars):
    """Any JSON object: a 135M model may ramble inside one until max_tokens (finish "length", allowed and documented);
    a choice that ends by itself is exactly one object."""
    grammar = grammars.compile(GrammarSpec.json_schema({"type": "object"}))
    requests = [GenerationRequest(f"o{i}", chat_ids(tokenizer, p), SamplingParams(max_tokens=120, temperature=0.0,
                                                                                   grammar=grammar))
                for i, p in enumerate(PROMPTS[:8])]
    results = run_requests(engine, requests)
    ended = [r for r in requests if results[r.request_id].finish[0] == "stop"]
    assert ended, "no json_object choice ended by itself"
    for r in ended:
        assert isinstance(json.loads(_text(tokenizer, results[r.request_id].tokens[0])), dict)
    for r in requests:
        assert _text(tokenizer, results[r.request_id].tokens[0]).startswith("{")


def test_unsupported_or_unsatisfiable_schemas_are_named(grammars):
    with pytest.raises(GrammarError, match='"not"'):
        grammars.compile(GrammarSpec.json_schema({"not": {"type": "string"}}))
    with pytest.raises(GrammarError, match="minimum"):
        grammars.compile(GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 3}))
    with pytest.raises(GrammarError, match="strin"):
        grammars.compile(GrammarSpec.json_schema({"type": "strin"}))
    with pytest.raises(GrammarError):
        GrammarSpec.json_schema([1, 2])


def test_compiled_once_per_schema(grammars):
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}}
    before = grammars.compiled_total
    first = grammars.compile(GrammarSpec.json_schema(schema))
    again = grammars.compile(GrammarSpec.json_schema(json.loads(json.dumps(schema))))
    assert first is again and grammars.compiled_total == before + 1


def test_masks_forbid_exactly_the_cleared_bits():
    import torch

    logits = torch.zeros(2, 70)
    masks = allocate_masks(2, 70)
    masks[0, 0] = 0b101  # row 0: only tokens 0 and 2 of the first word (words 1-2 all allowed)
    masks[1, 2] = 0  # row 1: tokens 64..69 forbidden
    apply_masks(logits, masks)
    assert torch.isinf(logits[0, :32]).sum() == 30 and logits[0, 0] == 0 and logits[0, 2] == 0
    assert torch.isinf(logits[1, 64:]).all() and not torch.isinf(logits[1, :64]).any()


def test_masks_apply_to_the_named_rows_only():
    import torch

    logits = torch.zeros(3, 70)
    masks = allocate_masks(2, 70)
    masks[0, 1] = 0  # → logits row 2: tokens 32..63 forbidden
    masks[1, 0] = 1  # → logits row 0: only token 0 of the first word
    apply_masks(logits, masks, [2, 0])
    assert torch.isinf(logits[2, 32:64]).all() and torch.isinf(logits[2]).sum() == 32
    assert torch.isinf(logits[0, 1:32]).all() and torch.isinf(logits[0]).sum() == 31
    assert not torch.isinf(logits[1]).any()  # a free row beside them


def test_one_batched_fill_gives_each_row_its_own_mask(tokenizer, grammars):
    """fill_masks, through llguidance's pool (all rows in one call) or row by row: each row gets exactly the mask its
    own matcher computes alone, whatever state the others are in."""
    import torch

    grammar = grammars.compile(GrammarSpec.json_schema(PERSON))
    text = ('{"name":"Ann","age":41,"role":"doctor","address":{"city":"Lyon","zip":"69001"},"skills":["x"],'
            '"active":true}')
    ids = tokenizer.encode(text, add_special_tokens=False)
    prefixes = [0, 1, 3, 7, len(ids) // 2, len(ids) - 1]
    together, alone = [grammar.matcher() for _ in prefixes], [grammar.matcher() for _ in prefixes]
    for n, a, b in zip(prefixes, together, alone):
        for token in ids[:n]:
            a.consume(token)
            b.consume(token)
    pooled = allocate_masks(len(prefixes), grammars.vocab_size)
    looped = allocate_masks(len(prefixes), grammars.vocab_size)
    fill_masks(together, pooled, pool=True)  # llguidance's thread pool (where 4+ CPUs are usable)
    fill_masks(alone, looped, pool=False)  # one call per row (this 2-core machine's default)
    for j, m in enumerate(alone):
        one = allocate_masks(1, grammars.vocab_size)
        m.fill(one, 0)
        assert torch.equal(pooled[j], one[0]) and torch.equal(looped[j], one[0]), f"row {j} (after {prefixes[j]})"
    assert len({tuple(r.tolist()) for r in pooled}) > 3  # the rows were in different states
