"""The prompt's own tokens scored: what /v1/completions' ``echo`` with ``logprobs`` returns for the echoed text.

One forward pass over the prompt without a cache, outside the batch (``ThreadedEngine.call`` runs it on the engine
thread between two steps, so it costs the running rows one prefill's worth of time, as a newcomer's prefill does).
The vocabulary projection runs over ``CHUNK`` positions at a time: [prompt × vocabulary] logits at once would be
~0.8 GB in fp32 for a 4,000-token prompt on the bundled model's 49k vocabulary. Logprobs are the model's raw
distribution (log-softmax of the logits, no sampling adjustments: a prompt is not sampled).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import TokenLogprob

CHUNK = 256


def prompt_logprobs(model, prompt_ids: list[int], top: int) -> list[Optional[TokenLogprob]]:
    """One entry per prompt token: None for the first (nothing precedes it), then each token's logprob given the
    tokens before it, with its ``top`` most likely alternatives."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
        head = model.get_output_embeddings()
        out: list[Optional[TokenLogprob]] = [None]
        for start in range(0, len(prompt_ids) - 1, CHUNK):
            # Position p predicts token p + 1.
            lp = head(hidden[start:start + CHUNK]).float().log_softmax(dim=-1)[: len(prompt_ids) - 1 - start]
            targets = ids[0, start + 1:start + 1 + lp.shape[0]]
            picked = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            alts = lp.topk(top, dim=-1) if top > 0 else None
            for j, (tid, value) in enumerate(zip(targets.tolist(), picked)):
                alt = [] if alts is None else list(zip(alts.indices[j].tolist(), alts.values[j].tolist()))
                out.append(TokenLogprob(token_id=tid, logprob=value, top=alt))
    return out
