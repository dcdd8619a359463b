"""The sampler in isolation, on synthetic logits: filters keep exactly the tokens they should; draws follow probs."""

from __future__ import annotations

import torch

from llm_worker.engine.base import SamplingParams
from llm_worker.engine.sampling import ChoiceSampler, sample

V = 1000


def sampler(**kw):
    return ChoiceSampler(SamplingParams(**kw), [], V, 0)


def support(logits, s, draws=400):
    seen = set()
    for _ in range(draws):
        seen.add(sample(logits.clone().unsqueeze(0), [s])[0][0])
    return seen


def peaked():
    x = torch.full((V,), -20.0)
    x[[5, 6, 7, 8]] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    return x


def test_top_k_top_p_min_p_supports():
    assert support(peaked(), sampler(temperature=1.0, seed=1, top_k=2)) == {5, 6}
    assert support(peaked(), sampler(temperature=1.0, seed=1, top_p=0.7)) == {5, 6}  # 0.5 < 0.7 ≤ 0.8
    assert support(peaked(), sampler(temperature=1.0, seed=1, top_p=0.85)) == {5, 6, 7}
    assert support(peaked(), sampler(temperature=1.0, seed=1, min_p=0.2)) == {5, 6, 7}  # 0.05 < 0.2 * 0.5
    assert support(peaked(), sampler(temperature=1.0, seed=1, top_p=0.0)) == {5}


def test_top_p_on_a_flat_distribution_uses_the_fallback():
    x = -torch.arange(V, dtype=torch.float32) * 1e-4  # near flat: top-64 holds ~6.6 % of the mass
    kept = support(x, sampler(temperature=1.0, seed=2, top_p=0.5), draws=3000)
    assert 400 <= len(kept) <= 520 and max(kept) < 520  # only the first ~half of the (sorted) vocabulary


def test_draw_frequencies_follow_probabilities():
    s = sampler(temperature=1.0, seed=3)
    counts = torch.zeros(V)
    for _ in range(2000):
        counts[sample(peaked().unsqueeze(0), [s])[0][0]] += 1
    freq = counts[[5, 6, 7, 8]] / 2000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def test_seeded_rows_do_not_depend_on_neighbours():
    a = [sample(torch.randn(1, V), [sampler(temperature=1.0, seed=9)])[0][0] for _ in range(1)]
    torch.manual_seed(0)
    x = torch.randn(3, V)
    alone = sample(x[1:2].clone(), [sampler(temperature=0.8, seed=42)])[0][0]
    together = sample(x.clone(), [sampler(temperature=1.0, seed=1), sampler(temperature=0.8, seed=42),
                                  sampler(temperature=0.0)])[1][0]
    assert alone == together and a


def test_penalties_and_bias():
    x = torch.zeros(V)
    x[10] = 1.0
    s = sampler(temperature=0.0, frequency_penalty=2.0)
    assert sample(x.clone().unsqueeze(0), [s])[0][0] == 10
    assert sample(x.clone().unsqueeze(0), [s])[0][0] != 10  # 1.0 - 2.0 * 1 < 0
    s = sampler(temperature=0.0, logit_bias={3: 100.0})
    assert sample(x.clone().unsqueeze(0), [s])[0][0] == 3
    r = ChoiceSampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), [10], V, 0)
    y = torch.zeros(V)
    y[10], y[11] = 1.0, 0.6
    assert sample(y.unsqueeze(0), [r])[0][0] == 11  # 1.0 / 2 < 0.6
