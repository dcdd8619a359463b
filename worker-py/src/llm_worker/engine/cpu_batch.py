"""Continuous batching on CPU: one engine thread, up to ``max_batch`` choices share every forward pass.

Each loop turn: apply cancellations (rows leave, cache freed) → admit waiting requests (prefill; their first
tokens are sampled and emitted at once, so time to first token does not wait for a decode step) → one decode step
for every row → emit → rows that finished leave. See ``kv.py`` for the cache layout.
Single-choice newcomers that wait together are prefilled together, left-padded, ``prefill_group_tokens`` padded
tokens per forward pass (bigger matmuls: a burst of 16 short prompts is prefilled in ~3 passes instead of 16); a
request with n > 1 is prefilled alone and its n choices share that prefill.
A prompt longer than ``prefill_chunk_tokens`` (PREFILL_CHUNK_TOKENS) is prefilled a chunk per loop turn (prefill.py),
so running rows get a token after every chunk instead of stalling behind the whole prompt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import attention, linear, scoring
from .base import ChoiceOutput, EmitFn, EngineStats, FinishReason, GenerationRequest, ThreadedEngine
from .cpus import usable_cpus
from .kv import BatchCache
from .prefill import ChunkedPrefill, ChunkSizer
from .sampling import ChoiceSampler, sample

log = logging.getLogger("llm_worker.engine.cpu_batch")


@dataclass(eq=False)  # identity: `in` and `remove` must find this request, not an equal-looking one
class _Request:
    req: GenerationRequest
    emit: EmitFn
    seq: int  # admission order: between requests holding as many rows, the older one goes first
    final_len: int  # the context one of its rows may reach: prompt + max_tokens, capped by the context length
    open_choices: int = 0
    running: int = 0  # its rows in the batch
    parked: list["_Row"] = field(default_factory=list)  # its rows waiting for room: preempted, or not started yet


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int
    sampler: ChoiceSampler
    last_token: int = 0
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # generated so far: a preempted row is prefilled again from them
    pending: list[ChoiceOutput] = field(default_factory=list)


class CpuBatchEngine(ThreadedEngine):
    thread_name = "cpu-batch-engine"

    def __init__(self, model, *, eos_token_ids: set[int], max_batch: int = 16, context_length: int = 8192,
                 prefill_budget_tokens: int = 1024, prefill_group_tokens: int = 512, num_threads: Optional[int] = None,
                 kv_token_budget: Optional[int] = None, prefill_chunk_tokens: int = 0,
                 prefill_chunk_step_ratio: float = 0.0):
        super().__init__()
        self.model = model
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch = max_batch
        self.context_length = context_length
        # Prompt tokens prefilled per loop turn before running rows get their next token (bounds their stall).
        self.prefill_budget_tokens = prefill_budget_tokens
        # Prompts longer than this are prefilled in chunks of it, one per turn (0 = off: any prompt in one pass). When
        # on, it is also the turn's whole prefill budget: a turn's prefill work never exceeds one chunk.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        if prefill_chunk_tokens > 0:
            self.prefill_budget_tokens = prefill_chunk_tokens
        # Chunks beside running rows are sized by time, at most prefill_chunk_tokens (prefill.ChunkSizer; 0 = fixed).
        self._chunk_sizer = ChunkSizer(prefill_chunk_tokens, prefill_chunk_step_ratio)
        # Padded tokens per forward pass when waiting requests are prefilled together (see _admit).
        self.prefill_group_tokens = prefill_group_tokens
        # rows × longest reserved context never exceeds this (kv.kv_token_budget; None = bounded by max_batch only).
        self.kv_token_budget = kv_token_budget
        self.num_threads = num_threads or usable_cpus()
        self.vocab_size = int(model.config.vocab_size)
        # Named for CPU, but nothing here is CPU-only: ENGINE=cpu-batch also runs a model placed on one GPU.
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":  # two CPU-only speed-ups, each measured in its module's docstring
            attention.install(model)
            linear.install(model)
        self._batch = BatchCache(self.device)
        self._rows: list[_Row] = []
        self._parked: list[_Request] = []  # requests with parked rows, in the order they were first parked
        self._prefilling: Optional[ChunkedPrefill] = None  # its rows hold their batch slots (request.running)
        self._seq = 0
        self._last_batch = 0
        self._generated_total = 0
        self._kv_bytes = 0
        self.preempted_total = 0  # rows taken out of the batch to make room for another request (fair admission)

    # -- public, thread-safe (submit/cancel/stop_choice: ThreadedEngine) --------------------------------------
    def stats(self) -> EngineStats:
        prefilling = len(self._prefilling.rows) if self._prefilling else 0
        return EngineStats(running_sequences=len(self._rows) + prefilling, waiting_requests=len(self._waiting) + len(self._parked),
                           batch_size_last_step=self._last_batch, kv_cache_bytes=self._kv_bytes,
                           generated_tokens_total=self._generated_total)

    def score_prompt(self, prompt_ids: list[int], top: int):
        """A future of the prompt's own token logprobs (engine/scoring.py), computed on the engine thread."""
        return self.call(lambda: scoring.prompt_logprobs(self.model, prompt_ids, top))

    # -- engine thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while (inbox := self.take(busy=bool(self._rows or self._parked or self._prefilling))) is not None:
                try:
                    self._apply_cancels(inbox.cancelled, inbox.stopped_choices)
                    now = time.time()
                    self.expire_waiting(now)
                    self._sweep_parked(now)
                    self._admit()
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # a failed forward pass fails every request in the batch, not the worker
                    log.exception("engine step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                self._kv_bytes = self._kv_nbytes()
        self._fail_all(None)

    def _kv_nbytes(self) -> int:
        return self._batch.nbytes() + (self._prefilling.nbytes() if self._prefilling else 0)

    def _apply_cancels(self, cancelled: set[str], stopped: set[tuple[str, int]]) -> None:
        if cancelled:
            with self._cv:
                gone = [w for w in self._waiting if w[0].request_id in cancelled]
                for w in gone:
                    self._waiting.remove(w)
            for request, emit in gone:
                self.emit_cancelled(request, emit)
        if not (cancelled or stopped):
            return
        self._end_parked(lambda row: row.request.req.request_id in cancelled
                         or (row.request.req.request_id, row.index) in stopped, "cancelled")
        if self._prefilling is not None:
            self._end_prefilling(lambda row: row.request.req.request_id in cancelled
                                 or (row.request.req.request_id, row.index) in stopped, "cancelled")
        if not self._rows:
            return
        for row in self._rows:
            rid = row.request.req.request_id
            if rid in cancelled or (rid, row.index) in stopped:
                self._finish(row, "cancelled")
        self._flush_and_compact()

    def _sweep_parked(self, now: float) -> None:
        """Parked rows past their request's deadline end with "length", as running ones do."""
        if self._parked:
            self._end_parked(lambda row: row.request.req.deadline is not None and now >= row.request.req.deadline,
                             "length")

    def _end_parked(self, which, reason: FinishReason) -> None:
        ended: list[_Row] = []
        for r in self._parked:
            keep = []
            for row in r.parked:
                (ended if which(row) else keep).append(row)
            r.parked = keep
        self._parked = [r for r in self._parked if r.parked]
        for row in ended:
            self._finish(row, reason)
        self._emit(ended)

    # -- admission ------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start or resume rows until the batch is full or this turn's ``prefill_budget_tokens`` is spent.

        Fair between requests: each request wanting rows (running, parked or waiting) is entitled to an equal share
        of ``max_batch``; the request holding the fewest rows goes first (the older one on a tie), and a request
        over its share gives rows back (they are parked, to be prefilled again from prompt + tokens so far) when an
        entitled one finds no room. So one n=16 stream no longer holds all 16 rows while another client's first
        token waits for it to finish (issue 11: 58 s). Room is rows and KV: rows × the longest reserved context
        (prompt + max_tokens) stays within ``kv_token_budget``; a request may start some of its n choices now and
        the rest later.

        Single-choice requests that wait together are prefilled together, left-padded, in forward passes of up to
        ``prefill_group_tokens`` padded tokens: a 71-token prompt alone ran its matmuls with 71 rows and took
        120-150 ms here, so the 16th request of a burst waited ~2 s for the 15 before it (bench/RESULTS.md).

        With chunked prefill on, the prefill in progress takes its next chunk first (it was admitted before anyone
        still waiting); a longer prompt than one chunk takes its rows now and starts on what is left of this turn's
        budget; only one such prefill runs at a time.
        """
        budget = self.prefill_budget_tokens
        if self._prefilling is not None:
            budget -= self._prefill_chunk(budget)
        started = False
        group: list[_Row] = []  # first rows of single-choice requests, prefilled together
        while (step := self._next_step(group, budget)) is not None:
            r, rows = step
            cost = len(r.req.prompt_ids) + sum(max(0, len(row.tokens) - 1) for row in rows)
            if self._chunked(cost):
                self._start_chunked(r, rows)
                started = True
                continue
            budget -= cost
            fresh = all(not row.tokens for row in rows)
            if fresh and r.req.params.n == 1:
                longest = max(len(x.request.req.prompt_ids) for x in group + rows)
                if not group or longest * (len(group) + 1) <= self.prefill_group_tokens:
                    group.extend(rows)
                    continue
            if group:  # the group is full, or the next one cannot join it
                self._prefill_fresh(group)
                group = []
            if fresh and r.req.params.n == 1:
                group.extend(rows)
            elif fresh:
                self._prefill_fresh(rows)
            else:
                self._resume(rows)
        if group:
            self._prefill_fresh(group)
        if started and budget > 0 and self._prefilling is not None:
            self._prefill_chunk(budget)

    def _chunked(self, cost: int) -> bool:
        """Whether a prefill of ``cost`` tokens is split into chunks."""
        return 0 < self.prefill_chunk_tokens < cost

    def _next_step(self, group: list[_Row], budget: int) -> Optional[tuple[_Request, list[_Row]]]:
        """The next rows to prefill (taken out of the waiting line or a request's parked rows), or None."""
        with self._cv:
            while self._waiting and self._waiting[0][0].request_id in self._cancelled:
                request, emit = self._waiting.popleft()  # cancelled while earlier newcomers were prefilled
                self.emit_cancelled(request, emit)
            wanting = {id(row.request) for row in self._rows} | {id(r) for r in self._parked}
            wanting |= {id(row.request) for row in group}
            if self._prefilling is not None:
                wanting |= {id(row.request) for row in self._prefilling.rows}
            share = max(1, self.max_batch // max(1, len(wanting) + len(self._waiting)))
            candidates = [r for r in self._parked if r.running < share]
            head = self._waiting[0] if self._waiting else None
        # Fewest rows first; a waiting request (0 rows) after an older parked one holding none.
        candidates.sort(key=lambda r: (r.running, r.seq))
        r = candidates[0] if candidates else None
        if head is not None and (r is None or r.running > 0):
            r = None
            request, emit = head
            plen = len(request.prompt_ids)
            if self._chunked(plen):
                if self._prefilling is not None:
                    return None  # one chunked prefill at a time: this one waits for the one in progress
            elif budget < plen and budget != self.prefill_budget_tokens:
                return None
            final = min(plen + request.params.max_tokens, self.context_length)
            if self.kv_token_budget is not None and final > self.kv_token_budget:
                with self._cv:
                    self._waiting.popleft()
                err = f"this request needs {final} tokens of KV cache per choice; this worker holds at most " \
                      f"{self.kv_token_budget} (KV_CACHE_BYTES / KV_MEMORY_FRACTION)"
                emit(request.request_id, [ChoiceOutput(i, [], finish_reason="error", error=err)
                                          for i in range(request.params.n)])
                return self._next_step(group, budget)
            wanted = min(request.params.n, share)
            if self._room(group, final, wanted) < 1 and not self._make_room(group, final, wanted, share):
                return None
            with self._cv:
                self._waiting.popleft()
            self._seq += 1
            new = _Request(request, emit, self._seq, final, open_choices=request.params.n)
            new.parked = [_Row(new, i, ChoiceSampler(request.params, request.prompt_ids, self.vocab_size, i))
                          for i in range(request.params.n)]
            r = new
        elif r is None:
            return None
        else:
            cost = len(r.req.prompt_ids) + max(len(r.parked[0].tokens) - 1, 0)
            if self._chunked(cost):
                if self._prefilling is not None:
                    return None
            elif budget < cost and budget != self.prefill_budget_tokens:
                return None
            wanted = min(len(r.parked), share - r.running)
            if self._room(group, r.final_len, wanted) < 1 and not self._make_room(group, r.final_len, wanted, share):
                return None
        k = max(1, min(self._room(group, r.final_len, wanted), wanted))
        # Rows that share a prefill: not-started ones together (their prompt once), a preempted one alone.
        fresh = [row for row in r.parked if not row.tokens]
        take = fresh[:k] if fresh else r.parked[:1]
        r.parked = [row for row in r.parked if all(row is not t for t in take)]
        if r.parked and r not in self._parked:
            self._parked.append(r)
        elif not r.parked and r in self._parked:
            self._parked.remove(r)
        return r, take

    def _room(self, group: list[_Row], final_len: int, wanted: int, without: frozenset[int] = frozenset()) -> int:
        """How many rows reaching ``final_len`` tokens could join the batch now, up to ``wanted`` (``without``: ids
        of running rows to count as gone)."""
        running = [row for row in self._rows if id(row) not in without] + group
        if self._prefilling is not None:  # rows in a chunked prefill hold their slots already
            running += self._prefilling.rows
        fit = min(wanted, self.max_batch - len(running))
        if self.kv_token_budget is not None:
            longest = max([final_len] + [row.request.final_len for row in running])
            fit = min(fit, self.kv_token_budget // longest - len(running))
        return fit

    def _make_room(self, group: list[_Row], final_len: int, wanted: int, share: int) -> bool:
        """Park rows of requests over their fair share until ``wanted`` rows fit (or no one is over its share).
        Returns whether at least one row fits now. Rows that generated least are parked first: their recompute is
        the cheapest."""
        held = {id(row.request): row.request.running for row in self._rows}
        victims: list[_Row] = []
        for row in sorted(self._rows, key=lambda row: (-row.request.running, row.generated)):
            if self._room(group, final_len, wanted, frozenset(map(id, victims))) >= wanted:
                break
            if held[id(row.request)] > share:
                held[id(row.request)] -= 1
                victims.append(row)
        if victims:
            self._park(victims)
        return self._room(group, final_len, wanted) >= 1

    def _park(self, victims: list[_Row]) -> None:
        """Take running rows out of the batch (their cache is freed); they wait in their request's parked rows."""
        gone = {id(v) for v in victims}
        keep = [i for i, row in enumerate(self._rows) if id(row) not in gone]
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        for row in victims:
            row.request.running -= 1
            row.request.parked.append(row)
            row.request.parked.sort(key=lambda x: x.index)
            if row.request not in self._parked:
                self._parked.append(row.request)
            self.preempted_total += 1
        self._kv_bytes = self._kv_nbytes()

    # -- prefill --------------------------------------------------------------------------------------------------
    def _prefill_fresh(self, rows: list[_Row]) -> None:
        """Prefill rows that have not started: choices of one request (they share the pass) or the first rows of
        several single-choice requests together, left-padded (``_admit`` forms the groups). A request alone gets
        exactly the forward pass it would get by itself."""
        now = time.time()
        late = [row for row in rows if row.request.req.deadline is not None and now >= row.request.req.deadline]
        if late:
            for row in late:
                self._finish(row, "length")
            self._emit(late)
            rows = [row for row in rows if not any(row is x for x in late)]
        if not rows:
            return
        requests: list[_Request] = []
        for row in rows:
            if not any(row.request is r for r in requests):
                requests.append(row.request)
        length = max(len(r.req.prompt_ids) for r in requests)
        mask: Optional[torch.Tensor] = None  # [requests, length], 0 = left padding; None when alone
        try:
            if len(requests) == 1:
                ids = torch.tensor([requests[0].req.prompt_ids], dtype=torch.long, device=self.device)
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                ids = torch.zeros((len(requests), length), dtype=torch.long)
                mask = torch.zeros((len(requests), length), dtype=torch.long)
                for i, r in enumerate(requests):
                    ids[i, length - len(r.req.prompt_ids):] = torch.tensor(r.req.prompt_ids, dtype=torch.long)
                    mask[i, length - len(r.req.prompt_ids):] = 1
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(self.device), use_cache=True,
                                 logits_to_keep=1)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail_rows(rows, f"{type(exc).__name__}: {exc}")
            return
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float().cpu()  # sampling runs on CPU tensors
        if len(requests) == 1 and len(rows) > 1:  # choices of one request share its prefill
            cache.batch_repeat_interleave(len(rows))
            logits = logits.expand(len(rows), -1).clone()
        self._accept(rows, logits)
        self._join(rows, cache, length, mask)

    def _start_chunked(self, r: _Request, rows: list[_Row]) -> None:
        """Rows take their slots now; their prompt (a resumed row: prompt + its tokens but the last, as ``_resume``) is
        prefilled a chunk per turn by ``_prefill_chunk``."""
        fresh = all(not row.tokens for row in rows)
        ids = r.req.prompt_ids if fresh else r.req.prompt_ids + rows[0].tokens[:-1]
        self._prefilling = ChunkedPrefill(rows, ids, fresh)
        r.running += len(rows)

    def _prefill_chunk(self, budget: int) -> int:
        """One chunk (at most ``budget`` tokens) of the prefill in progress; when it was the last, its rows' first
        tokens are sampled and the rows join the batch, as ``_prefill_fresh`` / ``_resume`` do. Returns tokens used."""
        p = self._prefilling
        now = time.time()
        self._end_prefilling(lambda row: row.request.req.deadline is not None and now >= row.request.req.deadline,
                             "length")
        if self._prefilling is None:
            return 0
        before = p.done
        decoding = bool(self._rows)
        tokens = min(budget, self._chunk_sizer.next_tokens(decoding) or budget)  # 0: no size of its own
        started = time.perf_counter()
        try:
            logits = p.step(self.model, self.device, tokens)
            self._chunk_sizer.observe_chunk(p.done - before, time.perf_counter() - started, decoding)
        except Exception as exc:
            log.exception("prefill failed")
            rows = p.rows
            self._drop_prefilling(rows)
            self._fail_rows(rows, f"{type(exc).__name__}: {exc}")
            return p.done - before
        if logits is not None:
            rows = p.rows
            self._drop_prefilling(rows)  # _join counts them in request.running again
            cache = p.cache
            if p.fresh:
                if len(rows) > 1:  # choices of one request share its prefill
                    cache.batch_repeat_interleave(len(rows))
                    logits = logits.expand(len(rows), -1).clone()
                self._accept(rows, logits)
            self._join(rows, cache, len(p.ids), None)
        return p.done - before

    def _drop_prefilling(self, rows: list[_Row]) -> None:
        """``rows`` leave the prefill in progress (and give back their slots); with none left, its cache is freed."""
        p = self._prefilling
        p.rows = [row for row in p.rows if all(row is not x for x in rows)]
        for row in rows:
            row.request.running -= 1
        if not p.rows:
            self._prefilling = None
            self._kv_bytes = self._kv_nbytes()

    def _end_prefilling(self, which, reason: FinishReason) -> None:
        """Rows of the prefill in progress that ``which`` picks end now with ``reason`` (cancelled, past deadline)."""
        ended = [row for row in self._prefilling.rows if which(row)]
        if ended:
            self._drop_prefilling(ended)
            for row in ended:
                self._finish(row, reason)
            self._emit(ended)

    def _resume(self, rows: list[_Row]) -> None:
        """Prefill a preempted row again from its prompt and the tokens it generated (all but the last, which the next
        decode step feeds as before): it goes on where it stopped, sampler state included."""
        (row,) = rows
        ids = row.request.req.prompt_ids + row.tokens[:-1]
        try:
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device), use_cache=True,
                             logits_to_keep=1)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail_rows(rows, f"{type(exc).__name__}: {exc}")
            return
        self._join(rows, out.past_key_values, len(ids), None)

    def _join(self, rows: list[_Row], cache, length: int, mask: Optional[torch.Tensor]) -> None:
        """Rows whose prefill is done join the batch (those that already finished do not); outputs are emitted."""
        keep = [i for i, row in enumerate(rows) if not (row.pending and row.pending[-1].finish_reason)]
        self._emit(rows)
        if keep:
            if len(keep) < len(rows):
                idx = torch.tensor(keep, dtype=torch.long, device=cache.layers[0].keys.device)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[idx], layer.values[idx]
                if mask is not None:
                    mask = mask[keep]
            self._batch.add(cache, length, mask=mask)
            for i in keep:
                rows[i].request.running += 1
                self._rows.append(rows[i])
            self._kv_bytes = self._kv_nbytes()

    def _fail_rows(self, rows: list[_Row], error: str) -> None:
        for row in rows:
            row.pending.append(ChoiceOutput(row.index, [], finish_reason="error", error=error))
            row.request.open_choices -= 1
        self._emit(rows)
        # The request's other choices cannot go on either: end its parked rows too.
        failed = {id(row.request) for row in rows}
        self._end_parked(lambda row: id(row.request) in failed, "error")

    # -- decode ---------------------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        started = time.perf_counter()
        self._decode_forward()
        self._chunk_sizer.observe_step(time.perf_counter() - started)

    def _decode_forward(self) -> None:
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
            row.tokens.append(token)
            row.pending.append(ChoiceOutput(row.index, [token], [info] if info is not None else None))
            if row.sampler.matcher is not None and row.sampler.matcher.done:
                self._finish(row, "stop")  # the grammar's output is complete: nothing else may follow
                continue
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
            for i in finished:
                self._rows[i].request.running -= 1
            keep = [i for i in range(len(self._rows)) if i not in done]
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]
            self._kv_bytes = self._kv_nbytes()

    def _fail_all(self, error: Optional[str]) -> None:
        """Engine stop (error None → "cancelled") or a failed step: every request ends now and the cache is freed."""
        reason: FinishReason = "error" if error else "cancelled"
        for row in self._rows:
            row.pending.append(ChoiceOutput(row.index, [], finish_reason=reason, error=error))
            row.request.running -= 1
        self._emit(self._rows)
        self._rows = []
        self._batch.keep([])
        if self._prefilling is not None:
            rows = self._prefilling.rows
            self._drop_prefilling(rows)
            for row in rows:
                row.pending.append(ChoiceOutput(row.index, [], finish_reason=reason, error=error))
            self._emit(rows)
        for r in self._parked:
            for row in r.parked:
                row.pending.append(ChoiceOutput(row.index, [], finish_reason=reason, error=error))
            self._emit(r.parked)
            r.parked = []
        self._parked = []
        if error is None:
            for request, emit in self.take_waiting():
                self.emit_cancelled(request, emit)
