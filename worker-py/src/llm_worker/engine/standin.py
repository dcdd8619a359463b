"""BENCHMARK STAND-IN ENGINE — no model, not for serving. Selected only by ENGINE=standin.

``StandInEngine`` implements the ``Engine`` interface (base.py) without running any model: it emits fixed token ids at
a fixed rate, so that a benchmark of the *stack* (gateway → Redis/BullMQ → worker transport → pub/sub → SSE) is not
limited by the model. bench/cpu/ measures the stack's own TTFT overhead at 16 and 200 concurrent streams with it.

What it keeps from a real engine, so the transport is exercised exactly as in production:
- one engine thread; ``submit``/``cancel``/``stop_choice`` are thread-safe and return at once;
- requests join the running batch at a step boundary and get their first token at once (as cpu_batch.py's prefill);
  then every running choice gets one token per step, every ``step_ms`` milliseconds (default 20 ms = 50 tokens/s per
  sequence, close to a GPU's decode rate; the environment variable STANDIN_STEP_MS overrides it — read here, not in
  config.py, because it is a benchmark knob of this stand-in only), emitted through ``emit`` like a real engine does;
- ``max_tokens``, ``n``, the deadline, cancellation (final emit "cancelled") and ``stats()``.
What it does not do: sampling parameters, logprobs, stop on EOS. Output tokens are the prompt's own ids, cycled
(EOS, BOS, pad and unk ids left out), so the detokenizer sees ordinary text of the right tokenizer; ``token_ids=`` overrides that.
Every choice ends with finish_reason "length" after exactly ``max_tokens`` tokens (as with ``ignore_eos``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from .base import ChoiceOutput, EmitFn, EngineStats, GenerationRequest, ThreadedEngine

log = logging.getLogger("llm_worker.engine.standin")


@dataclass(eq=False)
class _Choice:
    request_id: str
    index: int
    ids: list[int]
    max_tokens: int
    deadline: Optional[float]
    emit: EmitFn
    generated: int = 0


class StandInEngine(ThreadedEngine):
    """Benchmark stand-in: fixed tokens at a fixed rate, no model (see the module docstring)."""

    thread_name = "standin-engine"
    join_timeout_s = 10.0

    def __init__(self, model=None, *, eos_token_ids: Sequence[int] = (), max_batch: int = 1024,
                 context_length: int = 8192, step_ms: Optional[float] = None, token_ids: Optional[Sequence[int]] = None,
                 **_ignored):
        super().__init__()
        # ``model`` and unknown keyword arguments are accepted and ignored so that the worker's factory can build this
        # engine with the same arguments as the real ones.
        self.eos_token_ids = set(eos_token_ids)
        # Left out of the echoed ids with the EOS ids: special tokens the model's config names (BOS is <|im_start|> in
        # SmolLM2), which detokenize to no text and would delay the first visible text by a step.
        cfg = getattr(model, "config", None)
        self.skip_ids = self.eos_token_ids | {getattr(cfg, k, None) for k in ("bos_token_id", "pad_token_id",
                                                                             "unk_token_id")} - {None}
        self.max_batch = max_batch  # informational: the transport already bounds concurrency with MAX_BATCH
        self.context_length = context_length
        if step_ms is None:
            step_ms = float(os.environ.get("STANDIN_STEP_MS", "20"))
        self.step_s = step_ms / 1000.0
        self.token_ids = list(token_ids) if token_ids else None
        self._rows: list[_Choice] = []
        self._last_batch = 0
        self._generated_total = 0

    # -- public, thread-safe (submit/cancel/stop_choice: ThreadedEngine) --------------------------------------
    def start(self) -> None:
        log.warning("ENGINE=standin: a benchmark stand-in that emits fixed tokens without a model")
        super().start()

    def stats(self) -> EngineStats:
        return EngineStats(running_sequences=len(self._rows), waiting_requests=len(self._waiting),
                           batch_size_last_step=self._last_batch, kv_cache_bytes=0,
                           generated_tokens_total=self._generated_total)

    # -- engine thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_step = time.monotonic()
        while (inbox := self.take(busy=bool(self._rows))) is not None:
            if not self._rows:  # was idle: the step clock starts with this newcomer
                next_step = max(next_step, time.monotonic())
            waiting = self.take_waiting()
            self._drop(inbox.cancelled, inbox.stopped_choices, waiting)
            for request, emit in waiting:  # join now; the first token goes out at once (no step wait)
                self._admit(request, emit)
            now = time.monotonic()
            if self._rows and now >= next_step:
                self._step()
                next_step = max(next_step + self.step_s, now)
            with self._cv:  # sleep until the next step, waking early for newcomers, cancels or stop
                delay = next_step - time.monotonic()
                if delay > 0 and not (self._waiting or self._cancelled or self._stopped_choices or self._stopping
                                      or self._calls):
                    self._cv.wait(delay if self._rows else None)
        for row in self._rows:
            row.emit(row.request_id, [ChoiceOutput(row.index, [], finish_reason="cancelled")])
        self._rows = []

    def _drop(self, cancelled: set[str], stopped: set[tuple[str, int]], waiting) -> None:
        if not (cancelled or stopped):
            return
        for request, emit in [w for w in waiting if w[0].request_id in cancelled]:
            waiting.remove((request, emit))
            self.emit_cancelled(request, emit)
        keep = []
        for row in self._rows:
            if row.request_id in cancelled or (row.request_id, row.index) in stopped:
                row.emit(row.request_id, [ChoiceOutput(row.index, [], finish_reason="cancelled")])
            else:
                keep.append(row)
        self._rows = keep

    def _admit(self, request: GenerationRequest, emit: EmitFn) -> None:
        ids = self.token_ids or [t for t in request.prompt_ids if t not in self.skip_ids] or [0]
        rows = [_Choice(request.request_id, i, ids, request.params.max_tokens, request.deadline, emit)
                for i in range(request.params.n)]
        self._rows.extend(self._emit_tokens(rows))

    def _step(self) -> None:
        self._last_batch = len(self._rows)
        self._rows = self._emit_tokens(self._rows)

    def _emit_tokens(self, rows: list[_Choice]) -> list[_Choice]:
        """One token for each row, one emit per request (all its choices together); returns the rows that go on."""
        now = time.time()
        by_request: dict[str, list[tuple[_Choice, ChoiceOutput]]] = {}
        for row in rows:
            tok = row.ids[row.generated % len(row.ids)]
            row.generated += 1
            finish = "length" if row.generated >= row.max_tokens or (row.deadline and now >= row.deadline) else None
            by_request.setdefault(row.request_id, []).append((row, ChoiceOutput(row.index, [tok], finish_reason=finish)))
        self._generated_total += len(rows)
        for outs in by_request.values():
            emit = outs[0][0].emit
            try:
                emit(outs[0][0].request_id, [o for _, o in outs])
            except Exception:  # the transport's bug must not stop the other streams
                log.exception("emit failed")
        return [r for r in rows if r.generated < r.max_tokens and not (r.deadline and now >= r.deadline)]
