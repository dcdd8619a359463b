"""The shared fixtures (tests/fixtures/protocol/*.json, also parsed by the gateway's zod schemas) parse here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llm_worker import protocol as p

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "protocol"
MODELS = {"job": p.JobData, "job_full": p.JobData, "job_structured": p.JobData, "job_prompt": p.JobData,
          "event_error_param": p.ErrorEvent, "worker_info": p.WorkerInfo, "job_result": p.JobResult,
          "event_started": p.StartedEvent, "event_delta": p.DeltaEvent, "event_delta_logprobs": p.DeltaEvent,
          "event_done": p.DoneEvent, "event_error": p.ErrorEvent}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fixture_parses_and_round_trips(name):
    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    parsed = MODELS[name].model_validate(raw)
    # exclude_unset: optional fields a fixture leaves out (response_format, an error's param, a chat job's `prompt`)
    # stay out.
    assert parsed.model_dump(mode="json", exclude_unset=True, by_alias=True) == raw


def test_every_fixture_is_covered():
    assert {f.stem for f in FIXTURES.glob("*.json")} <= set(MODELS)


def test_queue_name_mapping():
    assert p.queue_name("smollm2-135m-instruct") == "gen.smollm2-135m-instruct"
    assert p.queue_name("qwen:7b/chat") == "gen.qwen_7b_chat"


def test_to_sampling_params_converts_logit_bias():
    job = p.JobData.model_validate(json.loads((FIXTURES / "job_full.json").read_text()))
    sp = job.params.to_sampling_params(32, 49152)
    assert sp.logit_bias == {198: -100.0, 28: 5.0} and sp.n == 3 and sp.logprobs and sp.top_logprobs == 2


@pytest.mark.parametrize("bias", [{"49152": 1}, {"-1": 1}, {"abc": 1}, {"5": 101}])
def test_bad_logit_bias_is_rejected(bias):
    with pytest.raises(ValueError):
        p.JobParams(logit_bias=bias).to_sampling_params(16, 49152)


def test_bad_params_fail_validation():
    with pytest.raises(ValidationError):
        p.JobParams(n=0)
    with pytest.raises(ValidationError):
        p.JobParams(top_logprobs=21)


def test_response_format_becomes_a_grammar_spec():
    job = p.JobData.model_validate(json.loads((FIXTURES / "job_structured.json").read_text()))
    spec = job.params.response_format.grammar_spec()
    assert spec.kind == "json_schema" and json.loads(spec.source)["required"] == ["city", "population"]
    assert p.ResponseFormat.model_validate({"type": "json_object"}).grammar_spec().source == '{"type":"object"}'
    with pytest.raises(ValidationError):
        p.ResponseFormat.model_validate({"type": "regex"})


def test_job_error_carries_its_param():
    from llm_worker.errors import JobError

    err = JobError("invalid_request", "bad schema", "response_format")
    assert str(err) == "invalid_request[response_format]: bad schema"
    assert p.ErrorBody.model_validate(err.to_event()).param == "response_format"
    assert str(JobError("cancelled", "gone")) == "cancelled: gone" and "param" not in JobError("cancelled", "x").to_event()


def test_job_carries_messages_or_a_raw_prompt_never_both():
    chat = json.loads((FIXTURES / "job.json").read_text())
    raw = json.loads((FIXTURES / "job_prompt.json").read_text())
    assert p.JobData.model_validate(raw).prompt.startswith("Once upon a time")
    assert p.JobData.model_validate(raw).messages is None
    with pytest.raises(ValidationError, match="exactly one"):
        p.JobData.model_validate({**chat, "prompt": "also this"})
    with pytest.raises(ValidationError, match="exactly one"):
        p.JobData.model_validate({k: v for k, v in chat.items() if k != "messages"})
