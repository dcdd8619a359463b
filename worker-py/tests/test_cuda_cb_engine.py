"""CudaContinuousBatchingEngine on CPU with a tiny random Qwen2: the real Transformers CB manager, no fakes.

Skipped only where the installed Transformers has no continuous-batching API.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers.GenerationMixin, "init_continuous_batching"):
    pytest.skip("transformers has no continuous batching API", allow_module_level=True)

try:
    import llm_worker  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conftest import wait_until  # noqa: E402
from llm_worker.config import load_config  # noqa: E402
from llm_worker.engine import create_engine  # noqa: E402
from llm_worker.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from llm_worker.engine.cuda import (  # noqa: E402
    SUPPORTED_TRANSFORMERS,
    VARLEN_ATTN,
    CudaCBConfig,
    CudaContinuousBatchingEngine,
    UnsupportedParameter,
    UnsupportedTransformersVersion,
    check_transformers_version,
)
from llm_worker.errors import ConfigError  # noqa: E402

from cuda_util import VOCAB, Collector, prompt, reference_greedy, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ref_model():
    """Same weights as ``model`` (same seed), kept out of the engine: ``generate`` needs plain sdpa attention."""
    return tiny_model()


@pytest.fixture(params=["paged|sdpa", VARLEN_ATTN])
def engine(request, model):
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation=request.param, block_size=16,
                                                           cpu_cache_bytes=8 << 20, max_batch_tokens=128))
    eng.start()
    yield eng
    eng.stop()


def test_cache_is_sized_from_the_budget_not_the_host(engine):
    # 8 MiB / (16 tokens x 2 (K,V) x 2 layers x 2 heads x 16 dims x 4 bytes) = 1024 blocks
    assert engine.cache_info["num_blocks"] == 1024
    assert engine.cache_info["kv_cache_capacity_bytes"] <= 8 << 20


def test_greedy_matches_generate_alone_and_in_a_batch(engine, ref_model):
    prompts = {f"r{i}": prompt(i, 5 + 7 * i) for i in range(6)}
    want = {rid: reference_greedy(ref_model, ids, 12) for rid, ids in prompts.items()}
    col = Collector()
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for rid, ids in prompts.items():
        engine.submit(GenerationRequest(rid, ids, greedy), col)
    col.wait({rid: 1 for rid in prompts})
    for rid in prompts:
        assert col.tokens[rid][0] == want[rid], rid
        assert col.finish[rid][0] == "length"


def test_n_choices_sampling_and_max_tokens(engine):
    col = Collector()
    engine.submit(GenerationRequest("many", prompt(40, 20), SamplingParams(max_tokens=9, n=3, temperature=1.0,
                                                                             top_p=0.9, top_k=20)), col)
    engine.submit(GenerationRequest("short", prompt(41, 3), SamplingParams(max_tokens=1, temperature=0.7)), col)
    col.wait({"many": 3, "short": 1})
    assert sorted(col.tokens["many"]) == [0, 1, 2]
    assert all(len(col.tokens["many"][i]) == 9 for i in range(3))
    assert len(col.tokens["short"][0]) == 1
    assert all(0 <= t < VOCAB for toks in col.tokens["many"].values() for t in toks)


def test_eos_stops_and_is_not_emitted(model, ref_model):
    ids = prompt(7, 11)
    ref = reference_greedy(ref_model, ids, 8)
    eos = ref[3]
    first = ref.index(eos)
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation="paged|sdpa", block_size=16,
                                                           cpu_cache_bytes=4 << 20), eos_token_ids=[eos])
    eng.start()
    try:
        col = Collector()
        eng.submit(GenerationRequest("eos", ids, SamplingParams(max_tokens=8, temperature=0.0)), col)
        eng.submit(GenerationRequest("ign", ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)), col)
        col.wait({"eos": 1, "ign": 1})
        assert col.finish["eos"][0] == "stop" and col.tokens["eos"][0] == ref[:first]
        assert col.finish["ign"][0] == "length" and col.tokens["ign"][0] == ref
    finally:
        eng.stop()


def test_cancel_frees_the_sequence_and_its_cache(engine):
    col = Collector()
    engine.submit(GenerationRequest("long", prompt(9, 40), SamplingParams(max_tokens=400, ignore_eos=True)), col)
    # Deadlines below only bound a hang (a loaded machine is slow; a passing run never waits for them).
    col.wait_for(lambda: bool(col.tokens.get("long")), "the first token", 300)
    assert engine.stats().kv_cache_bytes > 0
    engine.cancel("long")
    col.wait({"long": 1}, timeout=120)
    assert col.finish["long"][0] == "cancelled"

    def freed():
        s = engine.stats()
        return not (s.running_sequences or s.kv_cache_bytes)

    wait_until(freed, 60, "the sequence and its cache to be freed", interval=0.01)
    assert len(col.tokens["long"][0]) < 400


def test_deadline_cuts_with_length(engine):
    col = Collector()
    req = GenerationRequest("late", prompt(3, 8), SamplingParams(max_tokens=400, ignore_eos=True),
                            deadline=time.time() + 0.3)
    engine.submit(req, col)
    col.wait({"late": 1}, timeout=120)
    assert col.finish["late"][0] == "length"
    assert len(col.tokens["late"][0]) < 400


@pytest.mark.parametrize("params,param", [
    (SamplingParams(logit_bias={5: 100.0}), "logit_bias"),
    (SamplingParams(presence_penalty=0.5), "presence_penalty"),
    (SamplingParams(frequency_penalty=0.5), "frequency_penalty"),
    (SamplingParams(repetition_penalty=1.2), "repetition_penalty"),
    (SamplingParams(min_p=0.1), "min_p"),
    (SamplingParams(logprobs=True), "logprobs"),
    (SamplingParams(prompt_logprobs=0), "logprobs"),  # echo + logprobs: no prompt scoring beside the manager
    (SamplingParams(seed=3, temperature=1.0), "seed"),
])
def test_unsupported_parameters_are_refused_by_name(engine, params, param):
    with pytest.raises(UnsupportedParameter) as err:
        engine.submit(GenerationRequest("bad", [1, 2, 3], params), lambda *_: None)
    assert err.value.param == param and err.value.code == "invalid_request"
    assert engine.stats().waiting_requests == 0


def test_seed_is_accepted_when_greedy(engine):
    col = Collector()
    engine.submit(GenerationRequest("g", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, seed=1)), col)
    col.wait({"g": 1})
    assert len(col.tokens["g"][0]) == 2


# ---- Transformers version guard (engine/cuda/patches.py): the version it reads is monkeypatched, nothing reinstalled
def pretend_transformers(monkeypatch, version: str) -> None:
    # The module object in sys.modules, which the guard imports: building a model from a config swaps Transformers'
    # lazy module for a new object, so the `transformers` bound at the top of this file may no longer be it.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)


def test_the_pinned_transformers_is_supported():
    # requirements.txt pins 5.17.0: the guard's range is written around the pin
    assert sys.modules["transformers"].__version__ == "5.17.0"
    assert check_transformers_version() == "5.17.0"


@pytest.mark.parametrize("version", ["5.17.3", "5.17.1.dev0"])
def test_patch_releases_of_the_pin_are_accepted(monkeypatch, version):
    pretend_transformers(monkeypatch, version)
    assert check_transformers_version() == version


@pytest.mark.parametrize("version", ["5.18.0", "5.18.0.dev0", "5.16.2", "6.0.0"])
def test_another_transformers_stops_the_engine_at_start(monkeypatch, model, version):
    pretend_transformers(monkeypatch, version)
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation="paged|sdpa", cpu_cache_bytes=1 << 20))
    with pytest.raises(UnsupportedTransformersVersion) as err:
        eng.start()
    message = str(err.value)
    assert f"transformers {version} is installed" in message
    assert SUPPORTED_TRANSFORMERS in message and "CUDA_PATCHES_ALLOW_ANY_TRANSFORMERS=1" in message
    assert eng.manager is None  # refused before the manager (or any patch) was created
    assert isinstance(err.value, ConfigError)  # __main__ exits with status 2 and logs the message


def test_the_escape_hatch_warns_and_starts(monkeypatch, model, caplog):
    pretend_transformers(monkeypatch, "5.99.0")
    # The worker setting reaches the engine's config (config.py → create_engine → CudaCBConfig).
    cfg = load_config({"CUDA_PATCHES_ALLOW_ANY_TRANSFORMERS": "1"})
    assert cfg.cuda_patches_allow_any_transformers is True
    assert load_config({}).cuda_patches_allow_any_transformers is False
    wired = create_engine("cuda-cb", model, eos_token_ids=set(), max_batch=4, context_length=512,
                          cuda_allow_any_transformers=cfg.cuda_patches_allow_any_transformers)
    assert wired.config.allow_any_transformers is True
    eng = CudaContinuousBatchingEngine(model, CudaCBConfig(attn_implementation="paged|sdpa", block_size=16,
                                                           cpu_cache_bytes=1 << 20, allow_any_transformers=True))
    with caplog.at_level(logging.WARNING, logger="llm_worker.engine.cuda.patches"):
        eng.start()
    try:
        warned = [r.getMessage() for r in caplog.records if r.name == "llm_worker.engine.cuda.patches"]
        assert any("transformers 5.99.0 is installed" in m and "CUDA_PATCHES_ALLOW_ANY_TRANSFORMERS=1" in m
                   for m in warned), warned
        col = Collector()
        eng.submit(GenerationRequest("after", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0)), col)
        col.wait({"after": 1})
        assert col.finish["after"][0] == "length" and len(col.tokens["after"][0]) == 3
    finally:
        eng.stop()
