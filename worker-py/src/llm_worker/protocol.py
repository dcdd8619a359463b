"""Wire types of the gateway ↔ worker contract: docs/PROTOCOL.md, mirrored from gateway/src/protocol/job.ts (zod).

Change both together; tests/fixtures/protocol/*.json are parsed by both sides (tests/test_protocol.py here).
Only this module and transport/ see these types: ``JobParams.to_sampling_params`` converts once into engine terms.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .engine.base import SamplingParams
from .grammar import GrammarError, GrammarSpec

PROTOCOL_VERSION = 1
# Mirrors job.ts: the queue of a model is "gen." + id with every char outside [A-Za-z0-9._-] replaced by "_".
_QUEUE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

WORKERS_ZSET = "llm:workers"
CANCEL_CHANNEL = "llm:cancel"


def queue_name(model_id: str) -> str:
    return "gen." + _QUEUE_UNSAFE.sub("_", model_id)


def worker_key(worker_id: str) -> str:
    return f"llm:worker:{worker_id}"


def tokenizer_key(model_id: str) -> str:
    return f"llm:tokenizer:{model_id}"


def job_channel(job_id: str) -> str:
    return f"llm:job:{job_id}"


def cancelled_key(job_id: str) -> str:
    return f"llm:cancelled:{job_id}"


def events_key(job_id: str) -> str:
    """job.ts `eventsKey`: the LIST of the job's published events, kept so that a dropped stream can be resumed."""
    return f"llm:events:{job_id}"


# job.ts `TRUNCATED_EVENT`: the last element of an events list that reached its byte bound; nothing follows it.
TRUNCATED_MARKER = '{"type":"truncated"}'


class _Wire(BaseModel):
    # Unknown fields are ignored (a newer gateway may add optional ones); known ones are type-checked.
    model_config = ConfigDict(extra="ignore")


class Message(_Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class ResponseFormat(_Wire):
    """job.ts `ResponseFormat`: constrain every choice's text. ``json_object``: any JSON object; ``json_schema``: a JSON
    value valid against ``schema`` (the gateway has unwrapped OpenAI's ``json_schema.schema``); ``lark``: a grammar
    the gateway built itself (tool calls that must be made)."""

    type: Literal["json_object", "json_schema", "lark"]
    # "schema" shadows a BaseModel attribute in pydantic, hence the alias.
    json_schema: Optional[Any] = Field(None, alias="schema")
    # type "lark": a grammar the gateway built (tool calls), and the request field its errors name ("tools").
    grammar: Optional[str] = None
    param: Optional[str] = None

    def grammar_spec(self) -> GrammarSpec:
        if self.type == "lark":
            if not self.grammar:
                raise GrammarError("a lark response format needs a grammar")
            return GrammarSpec("lark", self.grammar)
        if self.type == "json_object":
            return GrammarSpec.json_schema({"type": "object"})
        if self.json_schema is None:
            raise GrammarError("response_format json_schema needs a schema")
        return GrammarSpec.json_schema(self.json_schema)


class JobParams(_Wire):
    """job.ts `JobParams`. Ranges mirror the gateway's validation; the gateway has already answered 400 for these."""

    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0 keeps only the most likely token
    seed: Optional[int] = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] = Field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    response_format: Optional[ResponseFormat] = None
    # /v1/completions echo + logprobs: score the prompt's tokens too, with this many alternatives (job.ts).
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def to_sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        """The one conversion from wire params to engine params (raises ValueError for a bad logit_bias)."""
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            tid = int(key)
            if not 0 <= tid < vocab_size:
                raise ValueError(f"logit_bias token id {tid} is outside the vocabulary (0..{vocab_size - 1})")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias value {value} for token {tid} is outside -100..100")
            bias[tid] = float(value)
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, n=self.n,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, logit_bias=bias,
            logprobs=self.logprobs or self.top_logprobs > 0, top_logprobs=self.top_logprobs, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
            prompt_logprobs=self.prompt_logprobs)


class StoreEvents(_Wire):
    """job.ts `StoreEvents`: keep every event published for the job in LIST llm:events:{jobId} (PROTOCOL.md)."""

    # The list's expiry, set again with every append: it outlives the job's last event by this long.
    ttl_ms: int = Field(ge=1000)
    # Bytes of events the list may hold; the event that would pass it is replaced by TRUNCATED_MARKER and nothing more
    # is appended (the events are still published).
    max_bytes: int = Field(ge=1)


class JobData(_Wire):
    """job.ts `JobData`: the BullMQ job's data (job name "chat", job id = completion id)."""

    v: Literal[1] = 1
    request_id: str
    model: str
    # Exactly one of the two (job.ts): a chat, rendered with the chat template, or a raw prompt (/v1/completions),
    # sent to the model as is and encoded as plain text (model.raw_prompt_ids).
    messages: Optional[list[Message]] = Field(None, min_length=1)
    prompt: Optional[str] = None
    params: JobParams = Field(default_factory=JobParams)
    stream: bool = False
    prompt_tokens: Optional[int] = None
    enqueued_at_ms: Optional[int] = None
    deadline_ms: Optional[int] = None
    # By then generation must have started, also while waiting inside this worker for room in the batch (job.ts).
    start_deadline_ms: Optional[int] = None
    # Absent: the events are only published (a gateway that does not resume streams, or a request that is not one).
    store_events: Optional[StoreEvents] = None

    @model_validator(mode="after")
    def _one_input(self) -> "JobData":
        # Mirrors the refine of job.ts jobDataSchema.
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages and prompt must be set")
        return self


class WorkerInfo(_Wire):
    """job.ts `WorkerInfo`: value of llm:worker:{workerId}."""

    worker_id: str
    model: str
    queue: str
    context_length: int
    max_batch: int
    device: str
    dtype: str
    engine: str
    tokenizer_hash: str
    started_at_ms: int
    ready: bool
    pid: int
    host: str
    version: str
    # Tokens of KV cache the engine may hold at once (rows × longest reserved context); gateways refuse with a 400 a
    # request whose n × (prompt + max_tokens) exceeds it. None: the engine does not report one.
    kv_token_budget: Optional[int] = None


class ChoiceResult(_Wire):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    # A list of OpenAI ChatCompletionTokenLogprob objects when logprobs were requested (the same shape as in a
    # delta; the gateway wraps it as {"content": [...]}), else null.
    logprobs: Optional[list[dict[str, Any]]] = None


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int


class Timing(_Wire):
    picked_up_ms: int
    first_token_ms: Optional[int] = None
    finished_ms: int


class JobResult(_Wire):
    """job.ts `JobResult`: the processor's return value (BullMQ returnvalue) and the `done` event's result."""

    choices: list[ChoiceResult]
    usage: Usage
    worker_id: str
    timing: Timing


class DeltaChoice(_Wire):
    index: int
    text: str
    tokens: int
    logprobs: Optional[list[dict[str, Any]]] = None


class StartedEvent(_Wire):
    type: Literal["started"] = "started"
    worker_id: str
    prompt_tokens: int
    ts_ms: int


class DeltaEvent(_Wire):
    type: Literal["delta"] = "delta"
    seq: int
    ts_ms: int
    choices: list[DeltaChoice]


class DoneEvent(_Wire):
    type: Literal["done"] = "done"
    seq: int
    ts_ms: int
    result: JobResult


class ErrorBody(_Wire):
    code: Literal["context_length_exceeded", "invalid_request", "queue_timeout", "cancelled", "internal_error"]
    message: str
    # The request field at fault (OpenAI's error.param), when the worker knows it: e.g. "response_format".
    param: Optional[str] = None


class ErrorEvent(_Wire):
    type: Literal["error"] = "error"
    seq: int
    ts_ms: int
    error: ErrorBody
