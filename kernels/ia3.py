"""Triton IA3: per-token elementwise scaling by the token's slot vector.

Same signature and semantics as kernels.reference.ia3_scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapterserve.kernels.batch import AdapterBatch


@triton.jit
def _ia3_kernel(
    # pointers
    x_ptr,
    vectors_ptr,
    out_ptr,
    slot_ids_ptr,
    # sizes
    d,
    # strides
    stride_xt,
    stride_xd,
    stride_vs,
    stride_vd,
    stride_ot,
    stride_od,
    # meta-parameters
    BLOCK_D: tl.constexpr,
):
    token, block = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ids_ptr + token)
    offs = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < d
    x = tl.load(x_ptr + token * stride_xt + offs * stride_xd, mask=mask, other=0.0)
    out_ptrs = out_ptr + token * stride_ot + offs * stride_od
    if slot < 0:  # base-model token: a copy of x, no vector read
        tl.store(out_ptrs, x, mask=mask)
        return
    v = tl.load(vectors_ptr + slot * stride_vs + offs * stride_vd, mask=mask, other=0.0)
    out = (x.to(tl.float32) * v.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=mask)


def ia3_scale(x: torch.Tensor, vectors: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    """Triton kernels.reference.ia3_scale: out (T, d) = x * vectors[slot], x where slot == -1,
    one program per (row, BLOCK_D columns) for every row of the step."""
    slot_ids = batch.slot_ids
    if x.dim() != 2 or vectors.dim() != 2 or vectors.shape[1] != x.shape[1]:
        raise ValueError(
            f"expected x (T, d) and vectors (S, d), got {tuple(x.shape)} and {tuple(vectors.shape)}"
        )
    if slot_ids.shape != (x.shape[0],):
        raise ValueError(f"expected slot_ids ({x.shape[0]},), got {tuple(slot_ids.shape)}")
    out = torch.empty_like(x)  # (T, d)
    if x.numel():
        block_d = max(16, min(1024, triton.next_power_of_2(x.shape[1])))
        _ia3_kernel[(x.shape[0], triton.cdiv(x.shape[1], block_d))](
            x,
            vectors,
            out,
            slot_ids,
            x.shape[1],
            *x.stride(),
            *vectors.stride(),
            *out.stride(),
            BLOCK_D=block_d,
        )
    return out
