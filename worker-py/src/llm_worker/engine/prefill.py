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
