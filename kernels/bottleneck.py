"""Triton adapter delta: kernels.reference.add_delta as one shrink and one expand launch per
kind of rows (decode rows per token, prefill segments per tile), for all n slices at once. The
shrink applies each (slice, slot)'s activation then scaling in its epilogue, so a bottleneck
adapter costs what a LoRA does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterserve.kernels.batch import AdapterBatch, DeltaWeights
from adapterserve.kernels.lora import lora_expand, lora_shrink


def add_delta(
    y: torch.Tensor,
    u: torch.Tensor,
    weights: DeltaWeights,
    batch: AdapterBatch,
    y_offsets: Sequence[int] = (0,),
    y_slice_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Triton kernels.reference.add_delta: in place on y, fp32 accumulation, rounded once into
    y's dtype."""
    h = lora_shrink(u, weights, batch)  # (n, T, R) fp32, computed before y changes (series)
    n = weights.b.shape[0]
    sizes = list(y_slice_sizes) if y_slice_sizes is not None else [weights.b.shape[-1]] * n
    return lora_expand(y, h, weights, batch, list(y_offsets), sizes)
