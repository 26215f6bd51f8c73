"""Triton bottleneck adapter delta: the LoRA shrink/expand kernels with a per-slot activation.

Same signature and semantics as kernels.reference.bottleneck. The shrink kernel applies the
slot's Activation then its scaling in its epilogue (HAS_ACTIVATION), so a bottleneck costs
exactly one shrink and one expand launch, like LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.lora import lora_expand, lora_shrink


def bottleneck(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor,
) -> torch.Tensor:
    """Triton kernels.reference.bottleneck: delta (T, out) = s * up(f(down(x))), 0 for slot -1."""
    if up.dim() != 3 or up.shape[0] != down.shape[0] or up.shape[2] != down.shape[1]:
        raise ValueError(
            f"expected down (S, r_max, in) and up (S, out, r_max), got "
            f"{tuple(down.shape)} and {tuple(up.shape)}"
        )
    if activations.shape != ranks.shape:
        raise ValueError(
            f"expected activations {tuple(ranks.shape)}, got {tuple(activations.shape)}"
        )
    h = lora_shrink(x, down, slot_ids, ranks, scalings, activations)  # (T, r_max) fp32
    # Base-model tokens are skipped by expand, so their delta must start at zero.
    delta = torch.zeros(x.shape[0], up.shape[1], dtype=x.dtype, device=x.device)  # (T, out)
    return lora_expand(delta, h, up, slot_ids, ranks, 0, up.shape[1])


def add_delta(
    y: torch.Tensor,
    u: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor | None = None,
    y_offsets: int | Sequence[int] = 0,
    y_slice_sizes: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Triton kernels.reference.add_delta: one shrink and one expand launch for all slices,
    fp32 accumulation."""
    h = lora_shrink(u, a_stack, slot_ids, ranks, scalings, activations)  # ([n,] T, r_max) fp32
    sizes = b_stack.shape[-2] if y_slice_sizes is None else y_slice_sizes
    # expand adds in fp32 and rounds once into y's dtype, as the reference's (y.float() + d).to()
    return lora_expand(y.clone(), h, b_stack, slot_ids, ranks, y_offsets, sizes)
