"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, penalties, seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence decoding parameters, checked where requests come in (server/api/serving.py)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-k alternatives per generated token; None = no logprobs
    prompt_logprobs: int | None = None  # same for prompt tokens (`echo` with logprobs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False
    # beam search (server/engine/beam.py): a width above 1 turns it on; the sampling fields
    # above then do not apply (beam search is deterministic)
    beam_width: int = 1
    length_penalty: float = 1.0  # a finished beam scores sum(logprobs) / length**length_penalty
    early_stopping: bool | str = False  # True | False | "never", as Hugging Face defines them
    # structured outputs (server/engine/constraint.py): this sequence's own grammar matcher,
    # made where the request came in; not part of the parameters' identity
    constraint: Any = field(default=None, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token and its top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


def apply_penalties(
    logits: torch.Tensor, output_ids: list[list[int]], params: list[SamplingParams]
) -> torch.Tensor:
    """OpenAI presence / frequency penalties and logit_bias, in place on rows that ask for them."""
    for row, (ids, p) in enumerate(zip(output_ids, params, strict=True)):
        if p.logit_bias:
            idx = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
            val = torch.tensor(
                [b for _, b in p.logit_bias], dtype=logits.dtype, device=logits.device
            )
            logits[row].index_add_(0, idx, val)
        if ids and (p.presence_penalty or p.frequency_penalty):
            tokens, counts = torch.tensor(ids, device=logits.device).unique(return_counts=True)
            penalty = p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
            logits[row].index_add_(0, tokens, -penalty)
    return logits


def _filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus top-p; rows keep at least one token."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)  # (B, 1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability mass of strictly better tokens
    drop = (ranks >= k) | (mass_before >= top_p.unsqueeze(1))
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Pick one token per row. logits: (B, V) fp32. Returns (B,) int64."""
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens
    temperature = torch.tensor(
        [p.temperature if not p.greedy else 1.0 for p in params], device=logits.device
    )
    top_k = torch.tensor([p.top_k for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
    probs = _filter_top_k_top_p(logits / temperature.unsqueeze(1), top_k, top_p).softmax(dim=-1)
    out = greedy_tokens.clone()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:  # per-row draw so that a seeded request is reproducible in any batch
            out[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
    return out


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logprobs: (N, V) log-softmax rows; chosen: (N,) token ids -> per-row TokenLogprob with top-k."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    if k > 0:
        top_val, top_idx = logprobs.topk(k, dim=-1)
        tops = [
            dict(zip(i, v, strict=True))
            for i, v in zip(top_idx.tolist(), top_val.tolist(), strict=True)
        ]
    else:
        tops = [{} for _ in chosen_lp]
    return [
        TokenLogprob(t, lp, top)
        for t, lp, top in zip(chosen.tolist(), chosen_lp, tops, strict=True)
    ]
