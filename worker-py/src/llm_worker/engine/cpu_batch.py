"""Continuous batching on CPU: one engine thread, up to ``max_batch`` choices share every forward pass.

Each loop turn: apply cancellations (rows leave, cache freed) → admit waiting requests (prefill; their first
tokens are sampled and emitted at once, so time to first token does not wait for a decode step) → one decode step
for every row → emit → rows that finished leave. See ``kv.py`` for the cache layout.
Single-choice newcomers that wait together are prefilled together, left-padded, ``prefill_group_tokens`` padded
tokens per forward pass (bigger matmuls: a burst of 16 short prompts is prefilled in ~3 passes instead of 16); a
request with n > 1 is prefilled alone and its n choices share that prefill.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import attention, linear
from .base import ChoiceOutput, EmitFn, EngineStats, FinishReason, GenerationRequest, ThreadedEngine
from .cpus import usable_cpus
from .kv import BatchCache
from .sampling import ChoiceSampler, sample

log = logging.getLogger("llm_worker.engine.cpu_batch")


@dataclass
class _Request:
    req: GenerationRequest
    emit: EmitFn
    open_choices: int = 0


@dataclass
class _Row:
    request: _Request
    index: int
    sampler: ChoiceSampler
    last_token: int = 0
    generated: int = 0
    pending: list[ChoiceOutput] = field(default_factory=list)


class CpuBatchEngine(ThreadedEngine):
    thread_name = "cpu-batch-engine"

    def __init__(self, model, *, eos_token_ids: set[int], max_batch: int = 16, context_length: int = 8192,
                 prefill_budget_tokens: int = 1024, prefill_group_tokens: int = 512, num_threads: Optional[int] = None):
        super().__init__()
        self.model = model
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch = max_batch
        self.context_length = context_length
        # Prompt tokens prefilled per loop turn before running rows get their next token (bounds their stall).
        self.prefill_budget_tokens = prefill_budget_tokens
        # Padded tokens per forward pass when waiting requests are prefilled together (see _admit).
        self.prefill_group_tokens = prefill_group_tokens
        self.num_threads = num_threads or usable_cpus()
        self.vocab_size = int(model.config.vocab_size)
        # Named for CPU, but nothing here is CPU-only: ENGINE=cpu-batch also runs a model placed on one GPU.
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":  # two CPU-only speed-ups, each measured in its module's docstring
            attention.install(model)
            linear.install(model)
        self._batch = BatchCache(self.device)
        self._rows: list[_Row] = []
        self._last_batch = 0
        self._generated_total = 0
        self._kv_bytes = 0

    # -- public, thread-safe (submit/cancel/stop_choice: ThreadedEngine) --------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(running_sequences=len(self._rows), waiting_requests=len(self._waiting),
                           batch_size_last_step=self._last_batch, kv_cache_bytes=self._kv_bytes,
                           generated_tokens_total=self._generated_total)

    # -- engine thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while (inbox := self.take(busy=bool(self._rows))) is not None:
                try:
                    self._apply_cancels(inbox.cancelled, inbox.stopped_choices)
                    self.expire_waiting(time.time())
                    self._admit()
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # a failed forward pass fails every request in the batch, not the worker
                    log.exception("engine step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                self._kv_bytes = self._batch.nbytes()
        self._fail_all(None)

    def _apply_cancels(self, cancelled: set[str], stopped: set[tuple[str, int]]) -> None:
        if cancelled:
            with self._cv:
                gone = [w for w in self._waiting if w[0].request_id in cancelled]
                for w in gone:
                    self._waiting.remove(w)
            for request, emit in gone:
                self.emit_cancelled(request, emit)
        if not (cancelled or stopped) or not self._rows:
            return
        for row in self._rows:
            rid = row.request.req.request_id
            if rid in cancelled or (rid, row.index) in stopped:
                self._finish(row, "cancelled")
        self._flush_and_compact()

    def _admit(self) -> None:
        """Prefill waiting requests, oldest first, up to ``prefill_budget_tokens`` prompt tokens this turn.

        Single-choice requests that wait together are prefilled together, left-padded, in forward passes of up to
        ``prefill_group_tokens`` padded tokens: a 71-token prompt alone ran its matmuls with 71 rows and took
        120-150 ms here, so the 16th request of a burst waited ~2 s for the 15 before it (bench/RESULTS.md).
        """
        budget = self.prefill_budget_tokens
        group: list[_Request] = []
        while True:
            with self._cv:
                nxt = None
                if self._waiting:
                    request, emit = self._waiting[0]
                    if request.request_id in self._cancelled:  # cancelled while earlier newcomers were prefilled
                        self._waiting.popleft()
                        self.emit_cancelled(request, emit)
                        continue
                    n, plen = request.params.n, len(request.prompt_ids)
                    # A request wider than max_batch may still run alone; otherwise wait for room at a token boundary.
                    rows_after = len(self._rows) + len(group) + n
                    fits = rows_after <= self.max_batch or not (self._rows or group)
                    if fits and (budget >= plen or budget == self.prefill_budget_tokens):
                        self._waiting.popleft()
                        nxt = _Request(request, emit)
            if nxt is not None and nxt.req.params.n == 1:
                longest = max([len(nxt.req.prompt_ids)] + [len(g.req.prompt_ids) for g in group])
                if not group or longest * (len(group) + 1) <= self.prefill_group_tokens:
                    group.append(nxt)
                    budget -= len(nxt.req.prompt_ids)
                    continue
            if group:  # the group is full, or the next one cannot join it
                self._prefill(group)
                group = []
            if nxt is None:
                return
            if nxt.req.params.n == 1:
                group.append(nxt)
            else:
                self._prefill([nxt])
            budget -= len(nxt.req.prompt_ids)

    def _prefill(self, group: list[_Request]) -> None:
        """Prefill one request (its n choices share the pass) or several single-choice requests together, left-padded
        (``_admit`` forms the groups). A request alone gets exactly the forward pass it would get by itself."""
        now = time.time()
        live = []
        for r in group:
            if r.req.deadline is not None and now >= r.req.deadline:
                r.emit(r.req.request_id, [ChoiceOutput(i, [], finish_reason="length") for i in range(r.req.params.n)])
            else:
                live.append(r)
        if not live:
            return
        length = max(len(r.req.prompt_ids) for r in live)
        mask: Optional[torch.Tensor] = None  # [rows, length], 0 = left padding; None when alone
        try:
            if len(live) == 1:
                ids = torch.tensor([live[0].req.prompt_ids], dtype=torch.long, device=self.device)
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                ids = torch.zeros((len(live), length), dtype=torch.long)
                mask = torch.zeros((len(live), length), dtype=torch.long)
                for i, r in enumerate(live):
                    ids[i, length - len(r.req.prompt_ids):] = torch.tensor(r.req.prompt_ids, dtype=torch.long)
                    mask[i, length - len(r.req.prompt_ids):] = 1
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(self.device), use_cache=True,
                                 logits_to_keep=1)
        except Exception as exc:
            log.exception("prefill failed")
            for r in live:
                r.emit(r.req.request_id, [ChoiceOutput(i, [], finish_reason="error", error=f"{type(exc).__name__}: {exc}")
                                          for i in range(r.req.params.n)])
            return
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float().cpu()  # sampling runs on CPU tensors
        n = live[0].req.params.n
        if n > 1:  # a request with n > 1 is always prefilled alone: its choices share the prefill
            cache.batch_repeat_interleave(n)
            logits = logits.expand(n, -1).clone()
        rows = []
        for r in live:
            r.open_choices = r.req.params.n
            rows.extend(_Row(r, i, ChoiceSampler(r.req.params, r.req.prompt_ids, self.vocab_size, i))
                        for i in range(r.req.params.n))
        self._accept(rows, logits)
        keep = [i for i, row in enumerate(rows) if row.pending[-1].finish_reason is None]
        self._emit(rows)
        if keep:
            if len(keep) < len(rows):
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            self._batch.add(cache, length, mask=None if mask is None else mask[keep])
            self._rows.extend(rows[i] for i in keep)
            self._kv_bytes = self._batch.nbytes()

    def _decode_step(self) -> None:
        rows = self._rows
        input_ids = torch.tensor([[row.last_token] for row in rows], dtype=torch.long, device=self.device)
        mask, position_ids = self._batch.step_inputs()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=self._batch.cache, use_cache=True)
        self._last_batch = len(rows)
        self._accept(rows, out.logits[:, -1, :].float().cpu())
        self._flush_and_compact()

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row, record it as pending output, and decide which rows are finished."""
        now = time.time()
        for row, (token, info) in zip(rows, sample(logits, [row.sampler for row in rows])):
            req, p = row.request.req, row.request.req.params
            self._generated_total += 1
            if token in self.eos_token_ids and not p.ignore_eos:
                self._finish(row, "stop")  # the stop token itself is not part of the text
                continue
            row.generated += 1
            row.last_token = token
            row.pending.append(ChoiceOutput(row.index, [token], [info] if info is not None else None))
            at_context_end = len(req.prompt_ids) + row.generated >= self.context_length
            past_deadline = req.deadline is not None and now >= req.deadline
            if row.generated >= p.max_tokens or at_context_end or past_deadline:
                self._finish(row, "length")

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        if row.pending and row.pending[-1].finish_reason is not None:
            return
        row.pending.append(ChoiceOutput(row.index, [], finish_reason=reason))
        row.request.open_choices -= 1

    def _emit(self, rows: list[_Row]) -> None:
        """One emit per request with every choice's new tokens merged (one ChoiceOutput per choice)."""
        by_request: dict[int, tuple[_Request, list[ChoiceOutput]]] = {}
        for row in rows:
            if not row.pending:
                continue
            merged = ChoiceOutput(row.index, [], None)
            for part in row.pending:
                merged.token_ids.extend(part.token_ids)
                if part.logprobs:
                    merged.logprobs = (merged.logprobs or []) + part.logprobs
                merged.finish_reason = part.finish_reason or merged.finish_reason
                merged.error = part.error or merged.error
            row.pending.clear()
            by_request.setdefault(id(row.request), (row.request, []))[1].append(merged)
        for r, outputs in by_request.values():
            try:
                r.emit(r.req.request_id, outputs)
            except Exception:  # the transport's bug must not kill the batch
                log.exception("emit failed")

    def _flush_and_compact(self) -> None:
        finished = [i for i, row in enumerate(self._rows) if row.pending and row.pending[-1].finish_reason]
        self._emit(self._rows)
        if finished:
            done = set(finished)
            keep = [i for i in range(len(self._rows)) if i not in done]
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]
            self._kv_bytes = self._batch.nbytes()

    def _fail_all(self, error: Optional[str]) -> None:
        """Engine stop (error None → "cancelled") or a failed step: every request ends now and the cache is freed."""
        reason: FinishReason = "error" if error else "cancelled"
        for row in self._rows:
            row.pending.append(ChoiceOutput(row.index, [], finish_reason=reason, error=error))
        self._emit(self._rows)
        self._rows = []
        self._batch.keep([])
        if error is None:
            for request, emit in self.take_waiting():
                self.emit_cancelled(request, emit)
