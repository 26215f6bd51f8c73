"""Sampler pieces against plain per-row references."""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.sampling import (
    SamplingParams,
    _filter_top_k_top_p,
    apply_penalties,
    sample,
)


def reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Tokens kept: the top-k, then the smallest prefix whose mass reaches p (at least one)."""
    order = row.argsort(descending=True).tolist()
    if k > 0:
        order = order[:k]
    probs = (row / 1.0).softmax(-1)
    kept, mass = [], 0.0
    for t in order:
        if kept and mass >= p:
            break
        kept.append(t)
        mass += float(probs[t])
    return set(kept)


@pytest.mark.parametrize("k,p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8), (1, 0.3), (0, 1e-9)])
def test_top_k_top_p_keep_the_reference_set(k, p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(k))
    out = _filter_top_k_top_p(logits.clone(), torch.full((6,), k), torch.full((6,), p))
    for row in range(6):
        kept = set(torch.nonzero(out[row] > float("-inf")).flatten().tolist())
        assert kept == reference_keep(logits[row], k, p)
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])


def test_penalties_and_logit_bias():
    logits = torch.zeros(2, 10)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((9, 3.0),)),
        SamplingParams(),
    ]
    out = apply_penalties(logits, [[1, 1, 2], [1]], params)
    want = torch.zeros(2, 10)
    want[0, 1], want[0, 2], want[0, 9] = -(0.5 + 0.5), -(0.5 + 0.25), 3.0
    torch.testing.assert_close(out, want)


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=0.5)] * 4000
    tokens = sample(logits, params, [gen] * 4000)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    want = (logits[0] / 0.5).softmax(-1)
    assert torch.allclose(freq, want, atol=0.03)  # ~4 sigma at n=4000
    assert torch.equal(
        sample(logits[:3], [SamplingParams(temperature=0.0)] * 3, [None] * 3),
        torch.tensor([2, 2, 2]),
    )
