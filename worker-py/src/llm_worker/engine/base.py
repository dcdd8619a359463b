"""The engine interface: token ids in, token ids out, many requests per forward pass.

The engine knows nothing of Redis, BullMQ, JSON or text: the transport (``llm_worker.transport``) turns jobs into
``GenerationRequest`` objects and turns the token ids it gets back into text (detokenizer, stop strings). Two engines
implement this interface: ``cpu_batch.CpuBatchEngine`` (our own continuous batching over a padded KV cache, for CPU) and
``cuda.CudaContinuousBatchingEngine`` (Transformers' continuous-batching manager with a paged cache, for GPU).
"""

from __future__ import annotations

import abc
import threading
from concurrent.futures import Future
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

# "error" (an extension): the engine could not continue this request; ChoiceOutput.error says why.
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Engine-side sampling parameters; built once from the job's ``params`` (see protocol.py)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    # A compiled grammar (llm_worker.grammar.CompiledGrammar) every choice's tokens must follow, or None. Engines that
    # cannot apply one per row must refuse the request (UnsupportedParameter), never ignore it.
    grammar: Optional[Any] = None
    # /v1/completions echo + logprobs: the prompt's tokens are scored too (engine.score_prompt, before the request is
    # submitted), each with this many alternatives; None = not asked. Engines without score_prompt refuse it.
    prompt_logprobs: Optional[int] = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Wall-clock (time.time()) second at which generation is cut with finish_reason "length"; None = no deadline.
    deadline: Optional[float] = None
    # Wall-clock second by which the request must have joined the batch; a request still waiting then ends with every
    # choice "not_started" (the transport reports queue_timeout). None = it may wait as long as it takes.
    start_deadline: Optional[float] = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the top_logprobs alternatives, best first


@dataclass
class ChoiceOutput:
    """New tokens of one choice since the previous emit."""

    index: int
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[FinishReason] = None  # set on the last emit of this choice
    error: Optional[str] = None  # with finish_reason "error" only


# Called from the engine's own thread: emit(request_id, outputs). Must be cheap and must not block.
EmitFn = Callable[[str, list[ChoiceOutput]], None]


@dataclass
class EngineStats:
    running_sequences: int
    waiting_requests: int
    batch_size_last_step: int
    kv_cache_bytes: int  # bytes held by the KV cache right now
    generated_tokens_total: int


class Engine(abc.ABC):
    """A generation engine. ``submit`` and ``cancel`` are thread-safe and return at once."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the engine thread; running requests end with finish_reason "cancelled"."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, emit: EmitFn) -> None:
        """Queue a request. Its n choices join the running batch at the next token boundary."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Remove a request's sequences from the batch at the next token boundary and free their cache.
        Each unfinished choice gets a final emit with finish_reason "cancelled"."""

    def stop_choice(self, request_id: str, index: int) -> None:
        """Let one choice of a request leave the batch (the transport found a stop string in its text).
        Optional: the default does nothing and the transport drops that choice's later tokens; it then calls
        ``cancel`` once every choice is finished. Engines that can free one row early override this."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...


@dataclass
class Inbox:
    """What a loop turn takes from the engine's inbox (see ``ThreadedEngine.take``)."""

    cancelled: set[str]
    stopped_choices: set[tuple[str, int]]


class ThreadedEngine(Engine):
    """An engine whose model runs on one thread of its own, fed by a thread-safe inbox.

    ``submit``/``cancel``/``stop_choice`` (called from the transport's asyncio thread) only record what they are
    asked and wake the engine thread; the engine thread applies all of it at its next token boundary, so the batch is
    never changed in the middle of a forward pass. Subclasses implement ``_run`` (the loop) and ``stats``.
    """

    thread_name = "engine"
    join_timeout_s = 30.0

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, EmitFn]] = deque()  # submitted, not yet admitted
        self._cancelled: set[str] = set()
        self._stopped_choices: set[tuple[str, int]] = set()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # see call()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)
        with self._cv:
            calls, self._calls = list(self._calls), deque()
        for _, done in calls:
            done.set_exception(RuntimeError("the engine stopped"))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs ``fn`` on the engine thread at its next token boundary (between two steps, as submits are applied)
        and resolves the returned future with its result. For work on the model outside the batch (scoring a prompt):
        it runs on the thread that owns the model and its CPU threads, and never during a forward pass."""
        done: Future = Future()
        with self._cv:
            if self._stopping:
                done.set_exception(RuntimeError("the engine stopped"))
                return done
            self._calls.append((fn, done))
            self._cv.notify_all()
        return done

    def submit(self, request: GenerationRequest, emit: EmitFn) -> None:
        with self._cv:
            self._waiting.append((request, emit))
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancelled.add(request_id)
            self._cv.notify_all()

    def stop_choice(self, request_id: str, index: int) -> None:
        with self._cv:
            self._stopped_choices.add((request_id, index))
            self._cv.notify_all()

    @abc.abstractmethod
    def _run(self) -> None:
        """The engine thread's loop."""

    def take(self, busy: bool) -> Optional[Inbox]:
        """Block until there is work (``busy``: rows are running, so never block), then take the cancellations and
        stopped choices recorded since the last call. None once ``stop`` was called."""
        with self._cv:
            while not (self._waiting or busy or self._stopping or self._calls):
                self._cv.wait()
            if self._stopping:
                return None
            inbox = Inbox(self._cancelled, self._stopped_choices)
            self._cancelled, self._stopped_choices = set(), set()
            calls, self._calls = list(self._calls), deque()
        for fn, done in calls:  # outside the lock: submits and cancels are not held up by the work
            try:
                done.set_result(fn())
            except Exception as exc:  # the caller's failure, not the engine's
                done.set_exception(exc)
        return inbox

    def take_waiting(self) -> list[tuple[GenerationRequest, EmitFn]]:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            return waiting

    def expire_waiting(self, now: float) -> None:
        """Ends the waiting requests whose start deadline has passed (engine thread, before admitting)."""
        with self._cv:
            expired = [w for w in self._waiting if w[0].start_deadline is not None and now >= w[0].start_deadline]
            for w in expired:
                self._waiting.remove(w)
        for request, emit in expired:
            emit(request.request_id, [ChoiceOutput(i, [], finish_reason="not_started") for i in range(request.params.n)])

    @staticmethod
    def emit_cancelled(request: GenerationRequest, emit: EmitFn) -> None:
        """The final emit of a request that never joined the batch: every choice "cancelled"."""
        emit(request.request_id, [ChoiceOutput(i, [], finish_reason="cancelled") for i in range(request.params.n)])
