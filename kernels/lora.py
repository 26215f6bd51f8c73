"""Triton LoRA shrink / expand over the slot pool (SGMV for prefill, BGMV-style for decode).

Same signatures and semantics as kernels.reference.lora_shrink / lora_expand. Each public op
picks a variant by token count; `*_segmented` and `*_per_token` are exposed for tests and
benchmarks. In every kernel a slot's own rank bounds the rank loop (no work on the pool's zero
padding), and tokens with slot -1 do nothing (per-token) or are never visited (segmented).
Dot products run in fp32 ("ieee"): rank-r ops are memory bound, and TF32 would miss the
reference's fp32 accumulation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.segments import Segments, step_segments

SEGMENTED_MIN_TOKENS = 32  # below this (decode), one program per token beats sorting
BLOCK_R = 16


@triton.jit
def _activate(h, code):
    """Activation (kernels.reference.Activation) `code` applied to an fp32 tile."""
    if code == 1:
        h = tl.maximum(h, 0.0)
    elif code == 2:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif code == 3:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = 0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif code == 4:
        h = h * tl.sigmoid(h)
    elif code == 5:
        h = tl.sigmoid(h)
    elif code == 6:
        h = 2.0 * tl.sigmoid(2.0 * h) - 1.0
    return h


@triton.jit
def _shrink_epilogue(acc, offs_r, slot, rank, scaling_ptr, act_ptr, HAS_ACTIVATION: tl.constexpr):
    """scaling * f(acc), zero on columns >= rank (f(0) need not be 0, e.g. sigmoid)."""
    if HAS_ACTIVATION:
        acc = _activate(acc, tl.load(act_ptr + slot))
    scaling = tl.load(scaling_ptr + slot).to(tl.float32)
    return tl.where(offs_r < rank, acc * scaling, 0.0)


@triton.jit
def _shrink_per_token_kernel(
    # pointers
    x_ptr,
    a_ptr,
    h_ptr,
    slot_ids_ptr,
    ranks_ptr,
    scaling_ptr,
    act_ptr,
    # sizes
    in_features,
    r_max,
    # strides
    stride_xt,
    stride_xk,
    stride_an,
    stride_as,
    stride_ar,
    stride_ak,
    stride_hn,
    stride_ht,
    stride_hr,
    # meta-parameters
    HAS_ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token, n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ids_ptr + token)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    rank = tl.where(slot < 0, 0, rank)  # base-model tokens: rank loop empty, zeros stored
    offs_k = tl.arange(0, BLOCK_K)
    h_row = h_ptr + n * stride_hn + token * stride_ht
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a_rows = a_ptr + n * stride_an + slot * stride_as + offs_r[:, None] * stride_ar
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_ptr + token * stride_xt + k * stride_xk, mask=k < in_features, other=0.0)
            a_mask = (offs_r[:, None] < rank) & (k[None, :] < in_features)
            a = tl.load(a_rows + k[None, :] * stride_ak, mask=a_mask, other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        h = _shrink_epilogue(acc, offs_r, slot, rank, scaling_ptr, act_ptr, HAS_ACTIVATION)
        tl.store(h_row + offs_r * stride_hr, h, mask=offs_r < r_max)
    for r0 in range(tl.cdiv(rank, BLOCK_R) * BLOCK_R, r_max, BLOCK_R):  # padding columns: 0
        offs_r = r0 + tl.arange(0, BLOCK_R)
        tl.store(h_row + offs_r * stride_hr, tl.zeros((BLOCK_R,), tl.float32), mask=offs_r < r_max)


@triton.jit
def _shrink_segmented_kernel(
    # pointers
    x_ptr,
    a_ptr,
    h_ptr,
    order_ptr,
    seg_slots_ptr,
    seg_starts_ptr,
    seg_counts_ptr,
    ranks_ptr,
    scaling_ptr,
    act_ptr,
    # sizes
    in_features,
    r_max,
    # strides
    stride_xt,
    stride_xk,
    stride_an,
    stride_as,
    stride_ar,
    stride_ak,
    stride_hn,
    stride_ht,
    stride_hr,
    # meta-parameters
    HAS_ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg, tile, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(seg_counts_ptr + seg)
    if tile * BLOCK_T >= count:  # grid is sized by the largest segment
        return
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < count
    tokens = tl.load(order_ptr + tl.load(seg_starts_ptr + seg) + offs_t, mask=t_mask, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + n * stride_hn + tokens[:, None] * stride_ht
    for r0 in range(0, r_max, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        if r0 < rank:  # rank bounds the work; padding blocks only store zeros
            a_rows = a_ptr + n * stride_an + slot * stride_as + offs_r[None, :] * stride_ar
            for k0 in range(0, in_features, BLOCK_K):
                k = k0 + offs_k
                x_mask = t_mask[:, None] & (k[None, :] < in_features)
                x = tl.load(
                    x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xk,
                    mask=x_mask,
                    other=0.0,
                )  # (BLOCK_T, BLOCK_K)
                a_mask = (k[:, None] < in_features) & (offs_r[None, :] < rank)
                a = tl.load(a_rows + k[:, None] * stride_ak, mask=a_mask, other=0.0)  # (K, R)
                acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
            acc = _shrink_epilogue(
                acc, offs_r[None, :], slot, rank, scaling_ptr, act_ptr, HAS_ACTIVATION
            )
        tl.store(
            h_rows + offs_r[None, :] * stride_hr,
            acc,
            mask=t_mask[:, None] & (offs_r[None, :] < r_max),
        )


@triton.jit
def _expand_per_token_kernel(
    # pointers
    y_ptr,
    h_ptr,
    b_ptr,
    slot_ids_ptr,
    ranks_ptr,
    offsets_ptr,
    sizes_ptr,
    # sizes: none beyond the per-slice offsets/sizes
    # strides
    stride_yt,
    stride_yo,
    stride_hn,
    stride_ht,
    stride_hr,
    stride_bn,
    stride_bs,
    stride_bo,
    stride_br,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token, col_block, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ids_ptr + token)
    size = tl.load(sizes_ptr + n)
    if (slot < 0) | (col_block * BLOCK_N >= size):  # base-model token / beyond this slice
        return
    rank = tl.load(ranks_ptr + slot)
    offs_o = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(
            h_ptr + n * stride_hn + token * stride_ht + offs_r * stride_hr,
            mask=offs_r < rank,
            other=0.0,
        )
        b_ptrs = (
            b_ptr
            + n * stride_bn
            + slot * stride_bs
            + offs_o[:, None] * stride_bo
            + offs_r[None, :] * stride_br
        )
        b = tl.load(b_ptrs, mask=(offs_o[:, None] < size) & (offs_r[None, :] < rank), other=0.0)
        acc += tl.sum(b.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
    y_ptrs = y_ptr + token * stride_yt + (tl.load(offsets_ptr + n) + offs_o) * stride_yo
    y = tl.load(y_ptrs, mask=offs_o < size, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=offs_o < size)


@triton.jit
def _expand_segmented_kernel(
    # pointers
    y_ptr,
    h_ptr,
    b_ptr,
    order_ptr,
    seg_slots_ptr,
    seg_starts_ptr,
    seg_counts_ptr,
    ranks_ptr,
    offsets_ptr,
    sizes_ptr,
    # sizes
    col_blocks,
    # strides
    stride_yt,
    stride_yo,
    stride_hn,
    stride_ht,
    stride_hr,
    stride_bn,
    stride_bs,
    stride_bo,
    stride_br,
    # meta-parameters
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    seg, tile_col, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tile, col_block = tile_col // col_blocks, tile_col % col_blocks
    count = tl.load(seg_counts_ptr + seg)
    size = tl.load(sizes_ptr + n)
    if (tile * BLOCK_T >= count) | (col_block * BLOCK_N >= size):
        return
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < count
    tokens = tl.load(order_ptr + tl.load(seg_starts_ptr + seg) + offs_t, mask=t_mask, other=0)
    offs_o = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h_ptrs = h_ptr + n * stride_hn + tokens[:, None] * stride_ht + offs_r[None, :] * stride_hr
        h = tl.load(h_ptrs, mask=t_mask[:, None] & (offs_r[None, :] < rank), other=0.0)
        b_ptrs = (
            b_ptr
            + n * stride_bn
            + slot * stride_bs
            + offs_r[:, None] * stride_br
            + offs_o[None, :] * stride_bo
        )  # (BLOCK_R, BLOCK_N) view of B^T
        b = tl.load(b_ptrs, mask=(offs_r[:, None] < rank) & (offs_o[None, :] < size), other=0.0)
        acc = tl.dot(h.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    y_ptrs = (
        y_ptr
        + tokens[:, None] * stride_yt
        + (tl.load(offsets_ptr + n) + offs_o)[None, :] * stride_yo
    )
    y_mask = t_mask[:, None] & (offs_o[None, :] < size)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _check_shrink(x, a_stack, slot_ids, ranks, scalings) -> torch.Tensor:
    a4 = a_stack.unsqueeze(0) if a_stack.dim() == 3 else a_stack  # (n, S, r_max, in)
    if x.dim() != 2 or a4.dim() != 4 or a4.shape[3] != x.shape[1]:
        raise ValueError(
            f"expected x (T, in) and a_stack ([n,] S, r_max, in), got "
            f"{tuple(x.shape)} and {tuple(a_stack.shape)}"
        )
    if (
        slot_ids.shape != (x.shape[0],)
        or ranks.shape != (a4.shape[1],)
        or scalings.shape != ranks.shape
    ):
        raise ValueError(
            f"expected slot_ids ({x.shape[0]},), ranks/scalings ({a4.shape[1]},), "
            f"got {tuple(slot_ids.shape)}, {tuple(ranks.shape)}, {tuple(scalings.shape)}"
        )
    return a4


def lora_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton kernels.reference.lora_shrink: segmented for prefill-sized T, per-token otherwise."""
    variant = lora_shrink_segmented if x.shape[0] >= SEGMENTED_MIN_TOKENS else lora_shrink_per_token
    return variant(x, a_stack, slot_ids, ranks, scalings, activations)


def lora_shrink_per_token(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """BGMV-style lora_shrink: one program per (token, slice); every element of h is written."""
    a4 = _check_shrink(x, a_stack, slot_ids, ranks, scalings)
    n, T, r_max = a4.shape[0], x.shape[0], a4.shape[2]
    h = torch.empty(n, T, r_max, dtype=torch.float32, device=x.device)  # (n, T, r_max)
    if T:
        act = activations if activations is not None else ranks  # dummy pointer when unused
        _shrink_per_token_kernel[(T, n)](
            x,
            a4,
            h,
            slot_ids,
            ranks,
            scalings,
            act,
            x.shape[1],
            r_max,
            *x.stride(),
            *a4.stride(),
            *h.stride(),
            HAS_ACTIVATION=activations is not None,
            BLOCK_R=BLOCK_R,
            BLOCK_K=_block(x.shape[1], 16, 128),
        )
    return h[0] if a_stack.dim() == 3 else h


def lora_shrink_segmented(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor | None = None,
    segs: Segments | None = None,
) -> torch.Tensor:
    """SGMV lora_shrink: one program per (slot segment, BLOCK_T tokens, slice).

    h starts at zero because base-model tokens are in no segment and are never visited.
    """
    a4 = _check_shrink(x, a_stack, slot_ids, ranks, scalings)
    segs = segs if segs is not None else step_segments(slot_ids)
    n, T, r_max = a4.shape[0], x.shape[0], a4.shape[2]
    h = torch.zeros(n, T, r_max, dtype=torch.float32, device=x.device)  # (n, T, r_max)
    if segs.max_count:
        block_t = _block(segs.max_count, 16, 64)
        act = activations if activations is not None else ranks
        grid = (segs.num_segments, triton.cdiv(segs.max_count, block_t), n)
        _shrink_segmented_kernel[grid](
            x,
            a4,
            h,
            segs.order,
            segs.slots,
            segs.starts,
            segs.counts,
            ranks,
            scalings,
            act,
            x.shape[1],
            r_max,
            *x.stride(),
            *a4.stride(),
            *h.stride(),
            HAS_ACTIVATION=activations is not None,
            BLOCK_T=block_t,
            BLOCK_R=BLOCK_R,
            BLOCK_K=_block(x.shape[1], 16, 64),
        )
    return h[0] if a_stack.dim() == 3 else h


def _expand_args(y, h, b_stack, slot_ids, ranks, y_offsets, y_slice_sizes):
    """Checked (n, T, r), (n, S, out_max, r) views and per-slice offset/size tensors."""
    h3 = h.unsqueeze(0) if h.dim() == 2 else h
    b4 = b_stack.unsqueeze(0) if b_stack.dim() == 3 else b_stack
    offsets = [y_offsets] if isinstance(y_offsets, int) else list(y_offsets)
    sizes = [y_slice_sizes] if isinstance(y_slice_sizes, int) else list(y_slice_sizes)
    n = b4.shape[0]
    if h3.shape[0] != n or len(offsets) != n or len(sizes) != n or h3.shape[1] != y.shape[0]:
        raise ValueError(
            f"expected h (n, T, r), b_stack (n, S, out, r) and n offsets/sizes, got "
            f"{tuple(h.shape)}, {tuple(b_stack.shape)}, {offsets}, {sizes}"
        )
    if h3.shape[2] != b4.shape[3] or max(sizes) > b4.shape[2]:
        raise ValueError(
            f"rank or slice size mismatch: h {tuple(h.shape)}, b {tuple(b_stack.shape)}, sizes {sizes}"
        )
    if any(o < 0 or o + s > y.shape[1] for o, s in zip(offsets, sizes, strict=True)):
        raise ValueError(
            f"slices {list(zip(offsets, sizes, strict=True))} exceed y's {y.shape[1]} columns"
        )
    return h3, b4, *_slice_tensors(tuple(offsets), tuple(sizes), y.device), max(sizes)


@functools.lru_cache(maxsize=256)
def _slice_tensors(offsets: tuple[int, ...], sizes: tuple[int, ...], device: torch.device):
    """Per-slice offsets and sizes on the device, made once per shape (not per call: a host to
    device copy each time the model calls an op)."""
    return tuple(torch.tensor(v, dtype=torch.int64, device=device) for v in (offsets, sizes))


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: int | Sequence[int],
    y_slice_sizes: int | Sequence[int],
) -> torch.Tensor:
    """Triton kernels.reference.lora_expand: segmented for prefill-sized T, per-token otherwise."""
    variant = lora_expand_segmented if y.shape[0] >= SEGMENTED_MIN_TOKENS else lora_expand_per_token
    return variant(y, h, b_stack, slot_ids, ranks, y_offsets, y_slice_sizes)


def lora_expand_per_token(
    y: torch.Tensor,
    h: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: int | Sequence[int],
    y_slice_sizes: int | Sequence[int],
) -> torch.Tensor:
    """BGMV-style lora_expand: one program per (token, BLOCK_N output columns, slice)."""
    h3, b4, offsets, sizes, max_size = _expand_args(
        y, h, b_stack, slot_ids, ranks, y_offsets, y_slice_sizes
    )
    block_n = _block(max_size, 16, 128)
    if y.shape[0]:
        _expand_per_token_kernel[(y.shape[0], triton.cdiv(max_size, block_n), b4.shape[0])](
            y,
            h3,
            b4,
            slot_ids,
            ranks,
            offsets,
            sizes,
            *y.stride(),
            *h3.stride(),
            *b4.stride(),
            BLOCK_N=block_n,
            BLOCK_R=BLOCK_R,
        )
    return y


def lora_expand_segmented(
    y: torch.Tensor,
    h: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: int | Sequence[int],
    y_slice_sizes: int | Sequence[int],
    segs: Segments | None = None,
) -> torch.Tensor:
    """SGMV lora_expand: one program per (slot segment, token tile x column block, slice)."""
    h3, b4, offsets, sizes, max_size = _expand_args(
        y, h, b_stack, slot_ids, ranks, y_offsets, y_slice_sizes
    )
    segs = segs if segs is not None else step_segments(slot_ids)
    if segs.max_count:
        block_t, block_n = _block(segs.max_count, 16, 64), _block(max_size, 16, 64)
        col_blocks = triton.cdiv(max_size, block_n)
        grid = (segs.num_segments, triton.cdiv(segs.max_count, block_t) * col_blocks, b4.shape[0])
        _expand_segmented_kernel[grid](
            y,
            h3,
            b4,
            segs.order,
            segs.slots,
            segs.starts,
            segs.counts,
            ranks,
            offsets,
            sizes,
            col_blocks,
            *y.stride(),
            *h3.stride(),
            *b4.stride(),
            BLOCK_T=block_t,
            BLOCK_N=block_n,
            BLOCK_R=BLOCK_R,
        )
    return y
