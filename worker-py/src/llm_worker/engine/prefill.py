"""Chunked prefill for the CPU engine: a long prompt is prefilled a chunk per engine turn, between decode steps.

Why: a 4,000-token prompt prefilled in one forward pass holds the engine thread for seconds, and every running stream
waits that long for its next token (issue 14). Split into chunks of ``PREFILL_CHUNK_TOKENS``, each turn runs one chunk
and then the running rows' decode step, so their stall per token is bounded by one chunk's time.

Why the chunk is not fused into the decode step's forward pass: the running batch's cache (kv.py) is one padded
[rows, heads, T, dim] tensor per layer and every row of a forward pass feeds the same number of tokens; a chunk of C
tokens beside rows of 1 token would need every row padded to C queries (C × the decode work) or a packed/varlen layout
this cache does not have. So the chunk runs as its own forward pass over a cache of its own, and joins the batch
(``BatchCache.add``) when its last chunk is done, exactly as an unchunked prefill would.

Each chunk continues the same ``DynamicCache`` with its positions following on (Transformers derives them from the
cache length); a chunk after the first sees a kv length larger than its query length, so the attention gets an
explicit causal mask rather than ``is_causal`` (see attention.py), which keeps the result that of one pass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class ChunkedPrefill:
    """The prefill in progress of ``rows``: the choices of one new request (they share the prompt) or one preempted
    row being prefilled again from prompt + generated tokens (``fresh`` False: no token is sampled at the end)."""

    def __init__(self, rows: list[Any], ids: list[int], fresh: bool) -> None:
        self.rows = rows
        self.ids = ids
        self.fresh = fresh
        self.done = 0  # tokens of ``ids`` already in ``cache``
        self.cache = None  # the model's DynamicCache, made by the first chunk's forward pass

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done

    @property
    def finished(self) -> bool:
        return self.done >= len(self.ids)

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)

    def step(self, model, device: torch.device, tokens: int) -> Optional[torch.Tensor]:
        """Prefill the next ``tokens`` tokens (at most what remains). Returns the last position's logits ([1, vocab],
        fp32 on CPU, for sampling) once the whole of ``ids`` is in the cache, else None."""
        end = min(len(self.ids), self.done + max(1, tokens))
        ids = torch.tensor([self.ids[self.done:end]], dtype=torch.long, device=device)
        out = model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.done = end
        if not self.finished:
            return None
        return out.logits[:, -1, :].float().cpu()


class ChunkSizer:
    """How many tokens the next prefill chunk gets, so that a turn with a chunk costs at most (1 + ``step_ratio``) ×
    a plain decode step (issue 14 target 2: the running streams' ITL p99 ≤ 2 × their median).

    Why by time and not a fixed count: what a chunk costs beside the step depends on the machine, the dtype, the batch
    and how deep into its prompt the chunk is (every query attends to all the tokens before it): 64 tokens at depth
    ~3,500 cost 1.2 decode steps on the 2-core Xeon in bf16 while 16 cost 0.5 (bench/cpu/chunk_cost.py, bench/RESULTS.md);
    a fixed 256 held the streams for 3-9 steps a turn. So each chunk is sized from the engine's own timings: an
    exponential average of the decode step, and the per-token time of the last chunk (a chunk of C tokens costs about
    overhead + C × per-token, so sizing by ``C × target / last time`` settles on the C that meets the target while the
    overhead stays below it). Growth is capped at 2× per chunk, so a noisy fast chunk does not overshoot.

    With no rows decoding nobody waits: the chunk is the largest allowed (``max_tokens``).
    """

    FIRST = 32  # the first chunk beside running rows, before any chunk was timed
    MIN = 4  # below this a chunk's fixed cost dominates and the prompt would take too many turns

    def __init__(self, max_tokens: int, step_ratio: float) -> None:
        self.max_tokens = max_tokens
        self.step_ratio = step_ratio  # 0: fixed chunks of max_tokens
        self.step_s: Optional[float] = None  # exponential average of the decode step (seconds)
        self.last: Optional[tuple[int, float]] = None  # (tokens, seconds) of the last chunk timed beside decode steps

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else 0.8 * self.step_s + 0.2 * seconds

    def observe_chunk(self, tokens: int, seconds: float, beside_rows: bool) -> None:
        if beside_rows:
            self.last = (tokens, seconds)

    def next_tokens(self, decoding: bool) -> int:
        if self.step_ratio <= 0 or not decoding:
            return self.max_tokens
        if self.last is None or self.step_s is None:
            return min(self.max_tokens, self.FIRST)
        tokens, seconds = self.last
        wanted = tokens * (self.step_ratio * self.step_s) / max(seconds, 1e-6)
        return max(self.MIN, min(self.max_tokens, 2 * tokens, int(wanted)))
