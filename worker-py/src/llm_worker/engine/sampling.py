"""Per-choice sampling over one batched logits tensor.

Order of logits processing (the same for every engine step and for the first token after prefill):
  1. ``logit_bias`` is added (OpenAI semantics: ±100 bans/forces a token);
  2. ``repetition_penalty`` (HF/vLLM semantics: over prompt + generated tokens, >0 logits divided, <0 multiplied);
  3. ``presence_penalty`` / ``frequency_penalty`` (OpenAI semantics: over generated tokens only);
  3b. a grammar's token mask (structured outputs), on the constrained rows only: what it forbids is -inf, so neither
     bias nor sampling can pick it;
  4. logprobs are taken here, from the adjusted logits before temperature (vLLM's "processed" logprobs minus
     temperature, so that a greedy request reports the distribution it picked from);
  5. temperature 0 → argmax; else temperature, top_k, top_p, min_p, then one uniform draw from the choice's own
     ``torch.Generator`` (inverse CDF) so that a seeded choice gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import secrets
from typing import Optional

import torch

from ..grammar import allocate_masks, apply_masks, fill_masks
from .base import SamplingParams, TokenLogprob

# Below this a temperature is treated as greedy: dividing by it would overflow to inf/nan.
_GREEDY_EPS = 1e-5


class ChoiceSampler:
    """Sampling state of one choice: its RNG, penalty counters and bias."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, index: int):
        self.params = params
        self.greedy = params.temperature < _GREEDY_EPS
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            # seed + index: the n choices of one seeded request differ from each other but repeat across runs.
            seed = params.seed + index if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        self.bias_ids: Optional[torch.Tensor] = None
        self.bias_vals: Optional[torch.Tensor] = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            self.bias_vals = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        self.counts: Optional[torch.Tensor] = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.seen: Optional[torch.Tensor] = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        # One grammar state per choice (n choices of one request diverge), kept across preemption with the rest.
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self.needs_adjust = self.bias_ids is not None or self.counts is not None or self.seen is not None
        self.needs_filter = not self.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)

    def adjust(self, row: torch.Tensor) -> None:
        """Apply bias and penalties to one row of logits, in place."""
        if self.bias_ids is not None:
            row.index_add_(0, self.bias_ids, self.bias_vals)
        if self.seen is not None:
            penalty = self.params.repetition_penalty
            picked = row[self.seen]
            row[self.seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if self.counts is not None:
            row -= self.counts * self.params.frequency_penalty
            row -= (self.counts > 0).float() * self.params.presence_penalty

    def observe(self, token_id: int) -> None:
        if self.matcher is not None:
            self.matcher.consume(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1.0
        if self.seen is not None:
            self.seen[token_id] = True


def _filter(x: torch.Tensor, samplers: list[ChoiceSampler]) -> torch.Tensor:
    """top_k / top_p / min_p on temperature-scaled logits [S, V], all rows at once, without a full-vocabulary sort.

    A sort of [16, 49152] took ~115 ms on this CPU (a whole decode step is ~90 ms); ``topk`` of a few dozen entries is
    enough for top_p whenever those entries already hold top_p of the mass, and the full sort is the fallback.
    """
    vocab = x.shape[-1]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in samplers], dtype=torch.long)
    top_p = torch.tensor([s.params.top_p for s in samplers], dtype=torch.float32)
    min_p = torch.tensor([s.params.min_p for s in samplers], dtype=torch.float32)
    probs = x.softmax(dim=-1)
    keep_from = torch.zeros(len(samplers), dtype=torch.float32)  # per row: probabilities below this are dropped
    if bool((top_k < vocab).any()):
        kmax = int(top_k[top_k < vocab].max())
        vals = probs.topk(min(kmax, vocab), dim=-1).values
        kth = vals.gather(1, (top_k.clamp(max=kmax) - 1).unsqueeze(1)).squeeze(1)
        keep_from = torch.where(top_k < vocab, kth, keep_from)
    need_p = top_p < 1.0
    if bool(need_p.any()):
        keep_from = torch.maximum(keep_from, _top_p_threshold(probs, top_p, need_p))
    pmax = probs.max(dim=-1).values
    keep_from = torch.maximum(keep_from, min_p * pmax)
    keep_from = torch.minimum(keep_from, pmax)  # the best token always survives
    return x.masked_fill(probs < keep_from.unsqueeze(1), float("-inf"))


def _top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Smallest probability kept by top_p per row (0 for rows without top_p): the nucleus is the shortest prefix of the
    sorted distribution whose mass reaches top_p; a token is dropped when the mass before it already reaches top_p."""
    vocab = probs.shape[-1]
    out = torch.zeros(probs.shape[0], dtype=torch.float32)
    for k in (64, 1024, vocab):
        vals = probs.topk(min(k, vocab), dim=-1).values if k < vocab else probs.sort(dim=-1, descending=True).values
        cum = vals.cumsum(dim=-1)
        done = rows & ((cum[:, -1] >= top_p) | (k >= vocab))
        kept = ((cum - vals) < top_p.unsqueeze(1)).sum(dim=-1).clamp(min=1)
        thresh = vals.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
        out = torch.where(done, thresh, out)
        rows = rows & ~done
        if not bool(rows.any()):
            break
    return out


def _apply_grammars(logits: torch.Tensor, samplers: list[ChoiceSampler]) -> None:
    """Step 3b: each constrained row's grammar mask, on those rows only (free rows pay nothing)."""
    constrained = [i for i, s in enumerate(samplers) if s.matcher is not None]
    if not constrained:
        return
    masks = allocate_masks(len(constrained), logits.shape[-1])
    fill_masks([samplers[i].matcher for i in constrained], masks)
    apply_masks(logits, masks, constrained)


def sample(logits: torch.Tensor, samplers: list[ChoiceSampler]) -> list[tuple[int, Optional[TokenLogprob]]]:
    """Pick one token per row of ``logits`` [B, V] (fp32, modified in place). Returns (token, logprob info)."""
    for i, s in enumerate(samplers):
        if s.needs_adjust:
            s.adjust(logits[i])
    _apply_grammars(logits, samplers)
    tokens: list[int] = [0] * len(samplers)
    greedy_rows = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy_rows:
        picked = logits[greedy_rows].argmax(dim=-1).tolist()
        for i, t in zip(greedy_rows, picked):
            tokens[i] = t
    sampled_rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if sampled_rows:
        group = [samplers[i] for i in sampled_rows]
        temps = torch.tensor([s.params.temperature for s in group], dtype=torch.float32).unsqueeze(1)
        x = logits[sampled_rows] / temps
        if any(s.needs_filter for s in group):
            x = _filter(x, group)
        # Inverse-CDF draw, one uniform number from each choice's own generator: torch.multinomial per row drew
        # ~49k random numbers per call and cost ~10 ms a row here; this costs one batched cumsum.
        cdf = x.softmax(dim=-1).cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=s.generator) for s in group]).unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(1).tolist()
        for i, t in zip(sampled_rows, picked):
            tokens[i] = t
    out: list[tuple[int, Optional[TokenLogprob]]] = []
    for i, s in enumerate(samplers):
        info = None
        if s.params.logprobs:
            lp = logits[i].log_softmax(dim=-1)
            top: list[tuple[int, float]] = []
            if s.params.top_logprobs > 0:
                vals, ids = lp.topk(s.params.top_logprobs)
                # Tokens a grammar forbids are -inf, which JSON cannot carry; OpenAI lists only possible tokens.
                top = [(t, v) for t, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf")]
            info = TokenLogprob(token_id=tokens[i], logprob=float(lp[tokens[i]]), top=top)
        s.observe(tokens[i])
        out.append((tokens[i], info))
    return out
