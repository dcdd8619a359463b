"""Structured outputs on the CUDA engine: one grammar state per CB request, advanced by the tokens the manager itself
generated, and a token mask on that request's row of every step's scores.

The manager samples inside its own step (model_runner), so the grammar cannot sit after sampling as in the CPU engine
(sampling.py). patches.py wires this module into three places of the manager's loop, all on the manager's thread:

1. *Before a step* (the host's ``prepare_batch_tensors``): each constrained request of the batch that will get a new
   token first consumes every token it generated so far that its matcher has not seen (``ConstrainedRequest.catch_up``),
   then fills its row of the batch's bitmask (``GrammarTable.masks_for``). Rows are the batch's requests *with a new
   token*, in batch order: that is how the manager lays out ``logits_indices`` and the processors' per-row arguments.
   A request whose prompt is split over steps gets no row (and no token) in its early chunks.
2. *In the step* (the logits-processor list's ``__call__``): ``BatchMasks.apply`` sets the forbidden tokens of those
   rows to -inf before temperature, top-k/top-p and the argmax or draw, so neither greedy nor sampled rows can pick
   them; the other rows are not touched (they compute exactly what they compute without a constrained neighbour).
3. *After a step* (``update_batch``): the new token is consumed at once; when it completes the grammar (or the
   matcher reports an error) the request is ended *with this token* by lowering its token limit, so the manager
   finishes it, frees its blocks and never schedules it again. The engine then reports finish_reason "stop" (or
   "error"), reading only the plain flags set here: llguidance matchers are Rust objects that must not be touched
   from two threads at once.

Why this is sound, and what it excludes:

- *Async batching* (Transformers' ``use_async_batching``, on by default with CUDA graphs) prepares step N+1 on the host
  while step N runs, before N's tokens reach the host: a mask built then would lag one token behind. It is refused:
  with structured outputs on (``CudaCBConfig.structured_outputs``, the default), the engine runs the manager with
  synchronous batching, where step N is updated before N+1 is prepared. The price is the host/device overlap that async
  batching buys, on every batch (it cannot be switched per batch: the manager builds its IO pairs once). Turning
  structured outputs off gives async batching back and refuses ``response_format`` / forced tool calls with a 400.
- *CUDA graphs*: a captured step would replay whatever mask tensor it was captured with. A batch with a constrained
  row runs its step eagerly instead (patches.py turns the runner's graph flags off for that one call); other batches
  replay their graphs as before.
- *n > 1* is n CB requests (one matcher each); prefix block sharing shares KV blocks, never tokens. A request the
  manager re-prefills after offloading keeps its id and its generated tokens (moved into its prompt), so
  ``catch_up`` sees the same token sequence and consumes nothing twice.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...grammar import RowMatcher, allocate_masks, apply_masks


class ConstrainedRequest:
    """The grammar state of one CB request. Matcher calls happen on the manager's thread only; ``finished`` and
    ``error`` are plain attributes the engine's emitter thread reads."""

    __slots__ = ("matcher", "consumed", "finished", "error")

    def __init__(self, matcher: RowMatcher) -> None:
        self.matcher = matcher
        self.consumed = 0  # tokens of the request's output the matcher has consumed
        self.finished = False  # the grammar is complete: the request ends with its last token
        self.error: Optional[str] = None

    def catch_up(self, produced: list[int]) -> None:
        """Consume the tokens of ``produced`` (the request's whole output so far) not consumed yet."""
        for token in produced[self.consumed:]:
            self.accept(token)

    def accept(self, token: int) -> None:
        if self.finished or self.error is not None:
            return
        self.matcher.consume(token)
        self.consumed += 1
        error = self.matcher.error
        if error is not None:
            self.error = " ".join(error.split())[:300]
        elif self.matcher.done:
            self.finished = True

    @property
    def ended(self) -> bool:
        return self.finished or self.error is not None


class BatchMasks:
    """The bitmask of one step's constrained rows: ``rows`` index the step's scores, ``masks`` [len(rows), words]."""

    __slots__ = ("rows", "masks")

    def __init__(self, rows: list[int], masks: torch.Tensor) -> None:
        self.rows = rows
        self.masks = masks

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """Forbidden tokens of the constrained rows of ``scores`` [rows, vocab] → -inf (in place; returns scores). On
        CUDA this runs inside the step, on the compute stream, so the host-to-device copies are ordered before use."""
        masks = self.masks.to(scores.device)
        if self.rows == list(range(len(self.rows))):  # the common case: constrained rows first, or all of them
            apply_masks(scores[: len(self.rows)], masks)  # a view: masked in place
            return scores
        index = torch.tensor(self.rows, dtype=torch.long).to(scores.device)
        picked = scores.index_select(0, index)
        apply_masks(picked, masks)
        scores.index_copy_(0, index, picked)
        return scores


class GrammarTable:
    """The constrained CB requests by id. Added on the submitting thread before the manager sees the request, removed
    by the engine when the request is over; dict operations are atomic, so the manager's thread reads it unlocked."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._by_id: dict[str, ConstrainedRequest] = {}

    def add(self, cb_id: str, matcher: RowMatcher) -> ConstrainedRequest:
        request = ConstrainedRequest(matcher)
        self._by_id[cb_id] = request
        return request

    def remove(self, cb_id: str) -> None:
        self._by_id.pop(cb_id, None)

    def get(self, cb_id: str) -> Optional[ConstrainedRequest]:
        return self._by_id.get(cb_id)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def masks_for(self, rows: list[tuple[ConstrainedRequest, list[int]]], positions: list[int]) -> Optional[BatchMasks]:
        """Masks of one step: ``rows[i]`` is a constrained request with its output so far, ``positions[i]`` its row in
        the step's scores. Each matcher first catches up with its output. A request whose grammar already ended (it
        is finished by the update of the step that ended it) is left unconstrained: its token is never used."""
        live = []
        for (request, produced), row in zip(rows, positions):
            request.catch_up(produced)
            if not request.ended:
                live.append((request, row))
        if not live:
            return None
        masks = allocate_masks(len(live), self.vocab_size)
        for i, (request, _) in enumerate(live):
            request.matcher.fill(masks, i)
        return BatchMasks([row for _, row in live], masks)
