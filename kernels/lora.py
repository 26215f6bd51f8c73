"""Triton LoRA shrink / expand over the slot pool: BGMV-style (one program per token) for a
step's decode rows, SGMV (one program per segment tile) for its prefill chunks.

`lora_shrink` then `lora_expand` compute kernels.reference.add_delta. In every kernel a
slot's own rank bounds the rank loop (no work on the pool's zero padding), and tokens with
slot -1 do nothing (per-token) or are never visited (segmented). Grids come from host facts of
the step (its decode rows, its segments), never from a device read.
Tile products (`_dot`) accumulate in fp32: with fp32 inputs exactly ("ieee", as the reference;
TF32 would miss it), with bf16/fp16 inputs as tensor-core dots of the inputs' own dtype (on a
GPU an fp32 "ieee" dot is many times slower, and rank-r ops are memory bound anyway).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from adapterserve.kernels.batch import AdapterBatch, DeltaWeights

BLOCK_R = 16

# _INT64_NOTE: every kernel turns `slot` and the slice index `n` into int64 before they meet a
# stride. Each stride fits in int32, but slot * stride need not: an lm_head LoRA's B stack is
# (1, S, R, vocab), and slot 224 * (64 * 150k) passes 2^31. Triton multiplies two int32s in
# int32 on the GPU, where it wraps to a wrong address (the interpreter computes in int64, so
# the CPU tests cannot show it; tests/kernels/test_lora.py reads the compiled TTIR instead).


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
def _dot(a, b, acc, NATIVE_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation: a bf16/fp16 `a` as a tensor-core dot of its own dtype
    (b cast to it) when NATIVE_DOT, else both in fp32 "ieee" (fp32 inputs; Triton's CPU
    interpreter, whose bf16 dots are not exact)."""
    if NATIVE_DOT and a.dtype != tl.float32:
        return tl.dot(a, b.to(a.dtype), acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _shrink_epilogue(acc, offs_r, meta, rank, scaling_ptr, act_ptr, HAS_ACTIVATION: tl.constexpr):
    """scaling * f(acc), zero on columns >= rank (f(0) need not be 0, e.g. sigmoid); `meta` is
    the (slice, slot) offset into the (n, S) scaling and activation tables."""
    if HAS_ACTIVATION:
        acc = _activate(acc, tl.load(act_ptr + meta))
    scaling = tl.load(scaling_ptr + meta).to(tl.float32)
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
    stride_pn,  # slice stride of the (n, S) ranks / scalings / activations tables
    # meta-parameters
    HAS_ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token, n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ids_ptr + token).to(tl.int64)  # int64 offsets: see _INT64_NOTE
    meta = n * stride_pn + tl.maximum(slot, 0)
    rank = tl.load(ranks_ptr + meta)
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
        h = _shrink_epilogue(acc, offs_r, meta, rank, scaling_ptr, act_ptr, HAS_ACTIVATION)
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
    stride_pn,
    # meta-parameters
    HAS_ACTIVATION: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg, tile, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    count = tl.load(seg_counts_ptr + seg)
    if tile * BLOCK_T >= count:  # grid is sized by the largest segment
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)  # int64 offsets: see _INT64_NOTE
    meta = n * stride_pn + slot
    rank = tl.load(ranks_ptr + meta)
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
                acc = _dot(x, a, acc, NATIVE_DOT)
            acc = _shrink_epilogue(
                acc, offs_r[None, :], meta, rank, scaling_ptr, act_ptr, HAS_ACTIVATION
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
    stride_pn,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token, col_block, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    slot = tl.load(slot_ids_ptr + token).to(tl.int64)  # int64 offsets: see _INT64_NOTE
    size = tl.load(sizes_ptr + n)
    if (slot < 0) | (col_block * BLOCK_N >= size):  # base-model token / beyond this slice
        return
    rank = tl.load(ranks_ptr + n * stride_pn + slot)
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
    stride_pn,
    # meta-parameters
    NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    seg, tile_col, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    tile, col_block = tile_col // col_blocks, tile_col % col_blocks
    count = tl.load(seg_counts_ptr + seg)
    size = tl.load(sizes_ptr + n)
    if (tile * BLOCK_T >= count) | (col_block * BLOCK_N >= size):
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)  # int64 offsets: see _INT64_NOTE
    rank = tl.load(ranks_ptr + n * stride_pn + slot)
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
        acc = _dot(h.to(b.dtype), b, acc, NATIVE_DOT)
    y_ptrs = (
        y_ptr
        + tokens[:, None] * stride_yt
        + (tl.load(offsets_ptr + n) + offs_o)[None, :] * stride_yo
    )
    y_mask = t_mask[:, None] & (offs_o[None, :] < size)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _native_dot(tensor: torch.Tensor) -> bool:
    """Tensor-core dots for bf16/fp16 on a GPU; the interpreter computes its tiles in fp32."""
    return tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _check(u: torch.Tensor, w: DeltaWeights, batch: AdapterBatch) -> None:
    n, S, R, d_in = w.a.shape
    if u.dim() != 2 or u.shape[1] != d_in or w.b.shape[:3] != (n, S, R):
        raise ValueError(
            f"expected u (T, {d_in}), a (n, S, R, in) and b (n, S, R, out), got "
            f"{tuple(u.shape)}, {tuple(w.a.shape)} and {tuple(w.b.shape)}"
        )
    for name in ("ranks", "scalings", "activations"):
        table = getattr(w, name)
        if table.shape != (n, S) or not table.is_contiguous():
            raise ValueError(f"expected contiguous {name} ({n}, {S}), got {tuple(table.shape)}")
    if batch.slot_ids.shape != (u.shape[0],):
        raise ValueError(f"expected slot_ids ({u.shape[0]},), got {tuple(batch.slot_ids.shape)}")


def lora_shrink(u: torch.Tensor, weights: DeltaWeights, batch: AdapterBatch) -> torch.Tensor:
    """h[i, t] = scalings[i, s] * f_{i,s}(u[t] @ A[i, s, :ranks[i, s]].T), s = slot_ids[t]:
    (n, T, R) fp32, zero beyond each slot's rank and for rows no program visits (base rows
    of prefill chunks). Decode rows: one program per (row, slice) (BGMV); prefill segments:
    one per (segment, BLOCK_T rows, slice) (SGMV)."""
    _check(u, weights, batch)
    n, S, R, d_in = weights.a.shape
    T, D = u.shape[0], batch.num_decode
    h = torch.zeros(n, T, R, dtype=torch.float32, device=u.device)  # (n, T, R)
    has_act = bool(weights.codes)
    common = dict(HAS_ACTIVATION=has_act, BLOCK_R=BLOCK_R)
    pointers = (weights.ranks, weights.scalings, weights.activations)
    strides = (*u.stride(), *weights.a.stride(), *h.stride(), weights.ranks.stride(0))
    if D:
        _shrink_per_token_kernel[(D, n)](
            u,
            weights.a,
            h,
            batch.slot_ids,
            *pointers,
            d_in,
            R,
            *strides,
            BLOCK_K=_block(d_in, 16, 128),
            **common,
        )
    if batch.segments:
        block_t = _block(batch.max_segment, 16, 64)
        grid = (len(batch.segments), triton.cdiv(batch.max_segment, block_t), n)
        _shrink_segmented_kernel[grid](
            u,
            weights.a,
            h,
            batch.rows,
            batch.seg_slots,
            batch.seg_starts,
            batch.seg_counts,
            *pointers,
            d_in,
            R,
            *strides,
            NATIVE_DOT=_native_dot(u),
            BLOCK_T=block_t,
            BLOCK_K=_block(d_in, 16, 64),
            **common,
        )
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    weights: DeltaWeights,
    batch: AdapterBatch,
    y_offsets: Sequence[int],
    y_slice_sizes: Sequence[int],
) -> torch.Tensor:
    """y[t, off_i : off_i + size_i] += h[i, t, :rank] @ B[i, s, :rank, :size_i], s = slot_ids[t]
    >= 0; in place on y (returned). Rows of slot -1 and columns outside the slices untouched."""
    offsets, sizes = _slice_tensors(tuple(y_offsets), tuple(y_slice_sizes), y.device)
    b = weights.b
    if h.shape != (b.shape[0], y.shape[0], b.shape[2]) or max(y_slice_sizes) > b.shape[3]:
        raise ValueError(
            f"expected h (n, T, R) for b {tuple(b.shape)}, y {tuple(y.shape)} and slices of at "
            f"most {b.shape[3]} columns, got h {tuple(h.shape)} and sizes {list(y_slice_sizes)}"
        )
    max_size = max(y_slice_sizes)
    # b is rank-major (n, S, R, out); the kernels take (slice, slot, out, rank) strides
    strides = (
        *y.stride(),
        *h.stride(),
        b.stride(0),
        b.stride(1),
        b.stride(3),
        b.stride(2),
        weights.ranks.stride(0),
    )
    if batch.num_decode:
        block_n = _block(max_size, 16, 128)
        grid = (batch.num_decode, triton.cdiv(max_size, block_n), b.shape[0])
        _expand_per_token_kernel[grid](
            y,
            h,
            b,
            batch.slot_ids,
            weights.ranks,
            offsets,
            sizes,
            *strides,
            BLOCK_N=block_n,
            BLOCK_R=BLOCK_R,
        )
    if batch.segments:
        block_t, block_n = _block(batch.max_segment, 16, 64), _block(max_size, 16, 64)
        col_blocks = triton.cdiv(max_size, block_n)
        grid = (
            len(batch.segments),
            triton.cdiv(batch.max_segment, block_t) * col_blocks,
            b.shape[0],
        )
        _expand_segmented_kernel[grid](
            y,
            h,
            b,
            batch.rows,
            batch.seg_slots,
            batch.seg_starts,
            batch.seg_counts,
            weights.ranks,
            offsets,
            sizes,
            col_blocks,
            *strides,
            NATIVE_DOT=_native_dot(y),
            BLOCK_T=block_t,
            BLOCK_N=block_n,
            BLOCK_R=BLOCK_R,
        )
    return y


@functools.cache
def _slice_tensors(offsets: tuple[int, ...], sizes: tuple[int, ...], device: torch.device):
    """Per-slice offsets and sizes on the device, made once per shape (not a host to device
    copy at every call). Kept for the life of the process, never evicted: a captured CUDA graph
    reads these tensors by address, so freeing one would leave a graph reading freed memory.
    The keys are the model's fused-site layouts (q|k|v, gate|up, ...): a handful per model."""
    return tuple(torch.tensor(v, dtype=torch.int64, device=device) for v in (offsets, sizes))
