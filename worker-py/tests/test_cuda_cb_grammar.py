"""Structured outputs on the cuda-cb engine, on CPU: the real Transformers CB manager with the tiny random Qwen2 of
test_cuda_cb_engine.py and a byte-level tokenizer for its 256 tokens (one token = one byte), so llguidance compiles real
JSON-schema grammars for it and the bytes decode to the text the schema is checked against.

What is checked: constrained requests (greedy and sampled, n=2, a prompt prefilled over several steps, two schemas in
one batch) always parse and validate and finish "stop"; a greedy constrained request picks exactly the tokens a
step-by-step masked argmax over the same model picks (so each mask lands on its own request's row); free requests in
the same batches compute exactly what ``model.generate`` computes alone; a step with masks runs eagerly when CUDA
graphs are on; cancelled requests leave no grammar state behind; with structured outputs off grammars are refused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
if not hasattr(transformers.GenerationMixin, "init_continuous_batching"):
    pytest.skip("transformers has no continuous batching API", allow_module_level=True)

try:
    import llm_worker  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from llm_worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from llm_worker.engine.cuda import (  # noqa: E402
    VARLEN_ATTN,
    CudaCBConfig,
    CudaContinuousBatchingEngine,
    UnsupportedParameter,
)
from llm_worker.engine.cuda.config import async_batching  # noqa: E402
from llm_worker.engine.cuda.constrained import ConstrainedRequest  # noqa: E402
from llm_worker.engine.cuda.engine import _finish_reason  # noqa: E402
from llm_worker.grammar import GrammarCompiler, GrammarSpec, allocate_masks, apply_masks  # noqa: E402

from cuda_util import VOCAB, Collector, prompt, reference_greedy, tiny_model  # noqa: E402

# Byte 0 doubles as the stop token llguidance requires (the worker passes its stop tokens): NUL never occurs in JSON.
EOS = 0

COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer", "minimum": 0,
                                                                          "maximum": 999}},
    "required": ["color", "size"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}, "ok": {"type": "boolean"}},
    "required": ["x", "ok"],
    "additionalProperties": False,
}


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b is the character ByteLevel writes for it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A fast tokenizer of exactly 256 tokens, token id = byte value (ByteLevel pre-tokenizer and decoder)."""
    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def grammars():
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == VOCAB and tokenizer.encode('{"a":1}', add_special_tokens=False) == list(b'{"a":1}')
    return GrammarCompiler(tokenizer, VOCAB, [EOS])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ref_model():
    return tiny_model()  # same weights; kept out of the engine (generate needs plain sdpa attention)


@pytest.fixture(params=["paged|sdpa", VARLEN_ATTN])
def engine(request, model):
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation=request.param, block_size=16,
                                                           cpu_cache_bytes=8 << 20, max_batch_tokens=128),
                                       eos_token_ids=[EOS])
    eng.start()
    yield eng
    eng.stop()


def text_of(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8")


def masked_greedy(model, ids: list[int], grammar, max_new: int) -> list[int]:
    """The reference: one full forward per token, the grammar's mask on the last logits, argmax, until it is done."""
    model.set_attn_implementation("sdpa")
    matcher, out = grammar.matcher(), []
    mask = allocate_masks(1, VOCAB)
    with torch.no_grad():
        while len(out) < max_new and not matcher.done:
            logits = model(torch.tensor([ids + out])).logits[:, -1, :].float()
            matcher.fill(mask, 0)
            apply_masks(logits, mask)
            out.append(int(logits.argmax(dim=-1)))
            matcher.consume(out[-1])
    return out


def test_constrained_requests_validate_and_stop_beside_free_rows(engine, ref_model, grammars):
    color, point = grammars.compile(GrammarSpec.json_schema(COLOR)), grammars.compile(GrammarSpec.json_schema(POINT))
    constrained = {  # request id -> (prompt, params, schema)
        "g-color": (prompt(1, 9), SamplingParams(max_tokens=64, temperature=0.0, grammar=color), COLOR),
        "g-point": (prompt(2, 14), SamplingParams(max_tokens=64, temperature=0.0, grammar=point), POINT),
        # 300 tokens with 128 per forward pass: the prompt is prefilled over three steps, its row comes in the last
        "g-long": (prompt(3, 300), SamplingParams(max_tokens=64, temperature=0.0, grammar=color), COLOR),
        "s-color": (prompt(4, 6), SamplingParams(max_tokens=64, temperature=1.0, grammar=color), COLOR),
        "s-point-n2": (prompt(5, 20), SamplingParams(max_tokens=64, temperature=1.2, top_p=0.9, top_k=40, n=2,
                                                     grammar=point), POINT),
        "s-color-topk": (prompt(6, 11), SamplingParams(max_tokens=64, temperature=0.8, top_k=5, grammar=color), COLOR),
    }
    free = {f"free{i}": prompt(20 + i, 5 + 9 * i) for i in range(4)}
    want_free = {rid: reference_greedy(ref_model, ids, 24) for rid, ids in free.items()}
    want_greedy = {rid: masked_greedy(ref_model, ids, p.grammar, p.max_tokens)
                   for rid, (ids, p, _) in constrained.items() if p.temperature == 0.0}
    col = Collector()
    for i, (rid, ids) in enumerate(free.items()):  # interleaved with the constrained ones: rows of every kind mix
        engine.submit(GenerationRequest(rid, ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)), col)
        if i == 1:
            engine.submit(GenerationRequest("s-free", prompt(30, 7), SamplingParams(max_tokens=24, temperature=1.0,
                                                                                  ignore_eos=True)), col)
        for rid_c, (ids_c, params, _) in list(constrained.items())[i * 2: i * 2 + 2]:
            engine.submit(GenerationRequest(rid_c, ids_c, params), col)
    col.wait({**{rid: p.n for rid, (_, p, _) in constrained.items()}, **{rid: 1 for rid in free}, "s-free": 1},
             timeout=300)
    for rid, (_, params, schema) in constrained.items():
        for index in range(params.n):
            tokens = col.tokens[rid][index]
            assert col.finish[rid][index] == "stop", (rid, index, tokens)
            jsonschema.validate(json.loads(text_of(tokens)), schema)
    assert col.tokens["s-point-n2"][0] and col.tokens["s-point-n2"][1]
    for rid, want in want_greedy.items():
        assert col.tokens[rid][0] == want, rid  # the mask was on this request's own row, at every step
    for rid, want in want_free.items():
        assert col.tokens[rid][0] == want and col.finish[rid][0] == "length", rid
    assert len(col.tokens["s-free"][0]) == 24 and col.finish["s-free"][0] == "length"
    assert not engine._grammars  # every constrained request left the table when it finished
    assert engine.stats().running_sequences == 0


def test_a_constrained_step_runs_eagerly_when_graphs_are_on(model, grammars):
    # CUDA graphs cannot run on CPU, so turning the runner's graph flags on makes any graphed step fail here: a
    # constrained request still completing proves that steps with grammar masks take the eager path.
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation="paged|sdpa", block_size=16,
                                                           cpu_cache_bytes=4 << 20), eos_token_ids=[EOS])
    eng.start()
    try:
        runner = eng.manager.batch_processor.model_runner
        runner.use_cuda_graph_varlen = runner.use_cuda_graph_decode = True
        col = Collector()
        grammar = grammars.compile(GrammarSpec.json_schema(COLOR))
        params = SamplingParams(max_tokens=64, temperature=0.0, grammar=grammar)
        eng.submit(GenerationRequest("eager", prompt(8, 10), params), col)
        col.wait({"eager": 1}, timeout=120)
        assert col.finish["eager"][0] == "stop", col.errors
        jsonschema.validate(json.loads(text_of(col.tokens["eager"][0])), COLOR)
        assert (runner.use_cuda_graph_varlen, runner.use_cuda_graph_decode) == (True, True)  # restored after the step
    finally:
        eng.manager.batch_processor.model_runner.use_cuda_graph_varlen = False
        eng.manager.batch_processor.model_runner.use_cuda_graph_decode = False
        eng.stop()


def test_structured_outputs_off_refuses_grammars_and_allows_async_batching(model, grammars):
    grammar = grammars.compile(GrammarSpec.json_schema(COLOR))
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation="paged|sdpa", block_size=16,
                                                           cpu_cache_bytes=1 << 20, structured_outputs=False))
    with pytest.raises(UnsupportedParameter) as err:
        eng.check_params(SamplingParams(grammar=grammar))
    assert err.value.param == "response_format" and "CUDA_STRUCTURED_OUTPUTS=false" in str(err.value)
    # The manager's use_async_batching on CUDA: off with structured outputs (the default), Transformers' choice (None:
    # on with CUDA graphs) or the configured value without them; never on CPU.
    assert async_batching(CudaCBConfig(), on_cuda=True) is False
    assert async_batching(CudaCBConfig(structured_outputs=False), on_cuda=True) is None
    assert async_batching(CudaCBConfig(structured_outputs=False, use_async_batching=True), on_cuda=True) is True
    assert async_batching(CudaCBConfig(structured_outputs=False, use_async_batching=True), on_cuda=False) is False
    # Asking for both (masks one token late) is refused when the engine is built.
    with pytest.raises(ValueError, match="use_async_batching=True needs structured_outputs=False"):
        CudaContinuousBatchingEngine(model, CudaCBConfig(use_async_batching=True))


def test_a_cancelled_constrained_request_leaves_nothing_behind(engine, grammars):
    col = Collector()
    grammar = grammars.compile(GrammarSpec.json_schema(POINT))
    params = SamplingParams(max_tokens=64, temperature=1.0, n=2, grammar=grammar)
    engine.submit(GenerationRequest("gone", prompt(9, 12), params), col)
    engine.cancel("gone")
    col.wait({"gone": 2}, timeout=120)
    assert set(col.finish["gone"].values()) <= {"cancelled", "stop"}
    assert not engine._grammars
    engine.submit(GenerationRequest("next", prompt(10, 12), replace(params, n=1)), col)  # the engine still serves
    col.wait({"next": 1}, timeout=120)
    assert col.finish["next"][0] == "stop"
    jsonschema.validate(json.loads(text_of(col.tokens["next"][0])), POINT)


def test_a_token_the_grammar_refuses_ends_the_request_with_an_error(grammars):
    # Cannot happen through the masks; if it ever did (a mask on the wrong row), the request ends as "error".
    request = ConstrainedRequest(grammars.compile(GrammarSpec.json_schema(POINT)).matcher())
    request.accept(ord("{"))
    assert not request.ended
    request.accept(ord("x"))
    assert request.ended and not request.finished and "doesn't satisfy the grammar" in request.error
    reason, error, _ = _finish_reason(list(b"{x"), frozenset({EOS}), request)
    assert (reason, error) == ("error", f"structured output: {request.error}")
    assert _finish_reason(list(b"{}") + [EOS], frozenset({EOS}), request) == ("stop", None, True)  # EOS first
