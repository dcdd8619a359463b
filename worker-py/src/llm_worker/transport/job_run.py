"""One job from pick-up to its result: checks, prompt tokens, engine request, text per choice, events, result.

Runs on the asyncio loop. The engine's emits arrive from the engine thread through ``loop.call_soon_threadsafe``,
so all per-choice text state (detokenizer, stop matcher) is touched by the loop thread only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..engine.base import ChoiceOutput, Engine, GenerationRequest
from ..errors import JobError
from ..grammar import BackgroundGrammarCompiler, CompiledGrammar, GrammarError
from ..log import now_ms
from ..model import ForgedTurnError, chat_prompt_ids, raw_prompt_ids
from ..protocol import JobData
from ..text.detokenizer import StreamDetokenizer
from ..text.logprobs import AlignedLogprobs, LogprobFormatter
from ..text.stops import StopMatcher
from .publisher import JobStream

log = logging.getLogger("llm_worker.transport.job_run")


class _LoopInbox:
    """Engine-thread emits handed to the loop, one loop wake-up for all that arrive together.

    Why: an engine step emits once per request (512 at GPU batch sizes); one ``call_soon_threadsafe`` each was 512
    self-pipe writes and loop wake-ups per step (py-spy, bench/cpu/transport_rate.py). Order is kept: one FIFO.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, fn, *args) -> None:  # any thread
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # loop thread
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # _on_outputs catches its own; one bad handler must not drop the others' outputs
                log.exception("engine output handler failed")


_inboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox]" = weakref.WeakKeyDictionary()


def _inbox_for(loop: asyncio.AbstractEventLoop) -> _LoopInbox:
    box = _inboxes.get(loop)
    if box is None:
        box = _inboxes[loop] = _LoopInbox(loop)
    return box


@dataclass
class _Choice:
    detok: StreamDetokenizer
    stops: StopMatcher
    text: str = ""
    tokens: int = 0
    logprobs: Optional[AlignedLogprobs] = None  # None when the request asked for none
    finish_reason: Optional[str] = None
    # Echo + logprobs: the prompt's own entries (flagged "prompt"), sent before this choice's first entries.
    prompt_entries: Optional[list[dict[str, Any]]] = None
    prompt_unsent: bool = False


@dataclass
class JobContext:
    """What every job needs from the worker: shared, read-only."""

    engine: Engine
    tokenizer: Any
    logprob_formatter: LogprobFormatter
    worker_id: str
    context_length: int
    vocab_size: int
    default_max_tokens: int
    flush_ms: int
    log_prompts: bool
    grammars: Optional[BackgroundGrammarCompiler] = None  # None: this worker serves no response_format
    grammar_timeout_s: float = 5.0

    def after_ready(self) -> None:
        """Start-up work that waits until the worker has registered (READY): building the grammar compiler."""
        if self.grammars is not None:
            self.grammars.start()


@dataclass
class JobRun:
    ctx: JobContext
    redis: Any
    job_id: str
    data: JobData
    picked_up_ms: int = field(default_factory=now_ms)
    first_token_ms: Optional[int] = None
    cancelled: bool = False
    _choices: dict[int, _Choice] = field(default_factory=dict)
    _done: Optional[asyncio.Future] = None
    _engine_error: Optional[str] = None
    _submitted: bool = False
    events_sent: bool = False  # execute() published its done/error event

    async def execute(self) -> dict[str, Any]:
        """Return the JobResult; raise JobError (after publishing the error event) when the job fails."""
        stream = JobStream(self.redis, self.job_id, self.ctx.flush_ms, self.data.store_events)
        try:
            result = await self._generate(stream)
        except JobError as err:
            await self.publish_error(err, stream)
            raise
        except Exception as exc:
            log.exception("job failed", extra={"jobId": self.job_id})
            err = JobError("internal_error", f"{type(exc).__name__}: {exc}")
            await self.publish_error(err, stream)
            raise err from exc
        await stream.finish({"type": "done", "result": result})
        self.events_sent = True
        return result

    async def publish_error(self, err: JobError, stream: Optional[JobStream] = None) -> None:
        stream = stream or JobStream(self.redis, self.job_id, self.ctx.flush_ms, self.data.store_events)
        await stream.finish({"type": "error", "error": err.to_event()})
        self.events_sent = True

    def cancel(self) -> None:
        self.cancelled = True
        if self._submitted:
            self.ctx.engine.cancel(self.job_id)
        elif self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _generate(self, stream: JobStream) -> dict[str, Any]:
        d, ctx = self.data, self.ctx
        if d.deadline_ms is not None and now_ms() >= d.deadline_ms:
            raise JobError("queue_timeout", f"job waited in the queue past its deadline ({d.deadline_ms})")
        max_batch = getattr(ctx.engine, "max_batch", None)
        if max_batch is not None and d.params.n > max_batch:
            # The gateway refuses these too (worker info max_batch); a wider request would grow the batch, and its
            # cache, past what MAX_BATCH sized it for.
            raise JobError("invalid_request", f"n={d.params.n} exceeds this worker's MAX_BATCH ({max_batch})")
        prompt_ids = await self._prompt_ids()
        if not prompt_ids:
            raise JobError("invalid_request", "prompt: the prompt is empty")
        room = ctx.context_length - len(prompt_ids)
        if room < 1:
            raise JobError("context_length_exceeded",
                           f"prompt has {len(prompt_ids)} tokens; the model's context is {ctx.context_length}")
        max_tokens = min(d.params.max_tokens or ctx.default_max_tokens, room)
        try:
            params = d.params.to_sampling_params(max_tokens, ctx.vocab_size)
        except ValueError as exc:
            raise JobError("invalid_request", str(exc)) from exc
        if d.params.response_format is not None:
            params = replace(params, grammar=await self._compile_grammar())
        check = getattr(ctx.engine, "check_params", None)
        if check is not None:  # an engine that cannot honour a parameter per request refuses it, naming it
            try:
                check(params)
            except ValueError as exc:
                param = getattr(exc, "param", None)
                fmt = d.params.response_format
                if param == "response_format" and fmt is not None and fmt.param:
                    param = fmt.param  # the grammar of a forced tool call: the client asked for it with "tools"
                raise JobError("invalid_request", str(exc), param) from exc
        for i in range(params.n):
            self._choices[i] = _Choice(StreamDetokenizer(ctx.tokenizer, prompt_ids), StopMatcher(d.params.stop),
                                       logprobs=AlignedLogprobs() if params.logprobs else None)
        await stream.publish_started(ctx.worker_id, len(prompt_ids))
        if params.prompt_logprobs is not None:
            entries = await self._score_prompt(prompt_ids, params.prompt_logprobs)
            for c in self._choices.values():
                c.prompt_entries, c.prompt_unsent = entries, True
        loop = asyncio.get_running_loop()
        inbox = _inbox_for(loop)
        self._done = loop.create_future()
        deadline = d.deadline_ms / 1000 if d.deadline_ms is not None else None
        if self.cancelled:
            raise JobError("cancelled", "cancelled by the client")

        def emit(_rid: str, outputs: list[ChoiceOutput]) -> None:  # engine thread
            if not loop.is_closed():  # after a forced shutdown the engine's final "cancelled" emits go nowhere
                inbox.put(self._on_outputs, stream, outputs)

        self._submitted = True
        start_deadline = d.start_deadline_ms / 1000 if d.start_deadline_ms is not None else None
        ctx.engine.submit(GenerationRequest(self.job_id, prompt_ids, params, deadline, start_deadline), emit)
        try:
            await self._done
        finally:
            if not self._done.done():  # the processor itself was cancelled (forced shutdown): free the rows
                ctx.engine.cancel(self.job_id)
        if self._engine_error is not None:
            raise JobError("internal_error", self._engine_error)
        if self.cancelled and any(c.finish_reason in (None, "cancelled") for c in self._choices.values()):
            raise JobError("cancelled", "cancelled by the client")
        if any(c.finish_reason == "not_started" for c in self._choices.values()):
            raise JobError("queue_timeout", "no room in this worker's batch before the request's queue timeout")
        return self._result(len(prompt_ids))

    async def _compile_grammar(self) -> CompiledGrammar:
        """The request's response_format compiled (or taken from the compiler's cache), off the event loop."""
        fmt, ctx = self.data.params.response_format, self.ctx
        param = fmt.param or "response_format"  # "tools" for the grammar of a forced tool call
        # Built after READY (grammar.BackgroundGrammarCompiler): a job arriving before that waits for it here.
        compiler = await ctx.grammars.get() if ctx.grammars is not None else None
        if compiler is None:
            raise JobError("invalid_request", f"this worker cannot serve {param} that constrain the output", param)
        try:
            spec = fmt.grammar_spec()
            hit = compiler.cached(spec)
            if hit is not None:
                return hit
            compiling = asyncio.get_running_loop().run_in_executor(compiler.executor, compiler.compile, spec)
            return await asyncio.wait_for(compiling, ctx.grammar_timeout_s)
        except GrammarError as exc:
            raise JobError("invalid_request", f"{param}: {exc}", param) from exc
        except asyncio.TimeoutError as exc:
            # Queued behind other compiles, or slow itself: the compile goes on in its thread (llguidance's own limits
            # bound it) and lands in the cache unused.
            raise JobError("invalid_request", f"{param}: the schema's grammar took longer than "
                           f"{ctx.grammar_timeout_s:g} s to compile; simplify the schema", param) from exc

    async def _score_prompt(self, prompt_ids: list[int], top: int) -> list[dict[str, Any]]:
        """The prompt's own tokens as logprob entries (/v1/completions echo + logprobs), flagged ``prompt``: the
        gateway renders them with the echoed text. The first has no logprob (nothing precedes it)."""
        score = getattr(self.ctx.engine, "score_prompt", None)
        if score is None:
            raise JobError("invalid_request", "logprobs: this worker's engine does not score prompts, so 'echo' cannot be "
                           "combined with 'logprobs' here", "logprobs")
        infos = await asyncio.wrap_future(score(prompt_ids, top))
        fmt = self.ctx.logprob_formatter
        # Client text is encoded with special tokens split (model.raw_prompt_ids), so a special id here is one the
        # tokenizer added (a BOS): context for the scores, but not part of the echoed text.
        added = set(getattr(self.ctx.tokenizer, "all_special_ids", []) or [])
        entries = []
        for token_id, info in zip(prompt_ids, infos):
            if token_id in added:
                continue
            if info is None:
                text, raw = fmt.token(token_id)
                entry = {"token": text, "logprob": None, "bytes": raw, "top_logprobs": []}
            else:
                entry = fmt.format(info)
            entries.append({**entry, "prompt": True})
        return entries

    async def _prompt_ids(self) -> list[int]:
        """A chat through the template, or a raw prompt (/v1/completions) as is; both encode client text as plain text."""
        d, ctx = self.data, self.ctx
        if d.prompt is not None:
            field, what, encode, arg = "prompt", {"prompt": d.prompt}, raw_prompt_ids, d.prompt
        else:
            messages = [m.model_dump() for m in d.messages or []]
            field, what, encode, arg = "messages", {"messages": messages}, chat_prompt_ids, messages
        try:
            ids = await asyncio.to_thread(encode, ctx.tokenizer, arg)
        except (ForgedTurnError, UnicodeError) as exc:  # the client's content, not our fault (the gateway checks too)
            raise JobError("invalid_request", f"{field}: {exc}") from exc
        if ctx.log_prompts:
            log.info("prompt", extra={"jobId": self.job_id, **what})
        return ids

    def _on_outputs(self, stream: JobStream, outputs: list[ChoiceOutput]) -> None:
        try:
            self._consume(stream, outputs)
        except Exception as exc:  # a bug here must fail the job, not leave it waiting forever
            log.exception("output handling failed", extra={"jobId": self.job_id})
            self._engine_error = f"{type(exc).__name__}: {exc}"
            self.ctx.engine.cancel(self.job_id)
            if not self._done.done():
                self._done.set_result(None)

    def _consume(self, stream: JobStream, outputs: list[ChoiceOutput]) -> None:
        if self._done.done():
            return
        for out in outputs:
            c = self._choices.get(out.index)
            if c is None or c.finish_reason is not None:
                continue  # a choice already ended by a stop string: the engine may still send a token or two
            if out.token_ids and self.first_token_ms is None:
                self.first_token_ms = now_ms()
            c.tokens += len(out.token_ids)
            if c.logprobs is None:
                produced = c.detok.add(out.token_ids)
            else:  # token by token: each entry needs the offset where its token's text begins
                produced = ""
                infos = out.logprobs or []
                for i, token_id in enumerate(out.token_ids):
                    piece = c.detok.add([token_id])
                    c.logprobs.token(self.ctx.logprob_formatter.format(infos[i]) if i < len(infos) else None, piece)
                    produced += piece
            text, hit_stop = c.stops.feed(produced)
            if out.finish_reason is not None and not hit_stop:
                tail, hit_stop = c.stops.feed(c.detok.flush())
                text += tail
                if not hit_stop:
                    text += c.stops.flush()
            lps = None
            if c.logprobs is not None:
                ended_whole = out.finish_reason is not None and not hit_stop
                lps = c.logprobs.release_all() if ended_whole else c.logprobs.release(len(c.text) + len(text))
            if c.prompt_unsent:  # the echoed prompt's entries go first, with the choice's first output
                lps, c.prompt_unsent = (c.prompt_entries or []) + (lps or []), False
            c.text += text
            stream.add(out.index, text, len(out.token_ids), lps)
            if hit_stop:
                c.finish_reason = "stop"
                if out.finish_reason is None:
                    self.ctx.engine.stop_choice(self.job_id, out.index)
            elif out.finish_reason is not None:
                c.finish_reason = out.finish_reason
                if out.finish_reason == "error":
                    self._engine_error = out.error or "engine error"
        if all(c.finish_reason is not None for c in self._choices.values()) and not self._done.done():
            if any(out.finish_reason is None for out in outputs):
                self.ctx.engine.cancel(self.job_id)  # every choice ended by stop strings: free what is left
            self._done.set_result(None)

    def _result(self, prompt_tokens: int) -> dict[str, Any]:
        choices = []
        for i, c in sorted(self._choices.items()):
            reason = "stop" if c.finish_reason == "stop" else "length"
            logprobs = None if c.logprobs is None else (c.prompt_entries or []) + c.logprobs.sent
            choices.append({"index": i, "text": c.text, "finish_reason": reason, "logprobs": logprobs})
        if self.ctx.log_prompts:
            log.info("completion", extra={"jobId": self.job_id, "texts": [c["text"] for c in choices]})
        return {"choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(c.tokens for c in self._choices.values())},
                "worker_id": self.ctx.worker_id,
                "timing": {"picked_up_ms": self.picked_up_ms, "first_token_ms": self.first_token_ms,
                           "finished_ms": now_ms()}}
