"""Triton paged decode attention: one query token per sequence against its paged K/V (GQA).

One program handles one (sequence, KV head) pair and all query heads that share that KV head, so
each K/V tile is loaded once per group rather than once per query head. Long contexts with few
sequences split the keys into chunks (flash-decoding): each chunk writes a partial output and its
log-sum-exp, and a second kernel merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
TILE_ELEMENTS = 8192  # BLOCK_G * BLOCK_N * BLOCK_D held at once in the broadcast product
MAX_BLOCK_N = 64
# Above this many tile elements a program runs 8 warps, not 4: compiled for sm_90a, a tile of
# 8192 at 4 warps spills (MHA d128 BLOCK_N 64: 1140 bytes of spill stores per thread; GQA group 4
# d64 BLOCK_N 32: 76), and at 8 warps none of the tiles this module picks does.
# `benchmarks/attention_spills.py` prints the table (BENCHMARKS.md, "Paged attention spills").
WIDE_TILE = 4096
MIN_SPLIT_TOKENS = 512  # a split below this many keys costs more in merging than it saves


@triton.jit
def _paged_decode_kernel(
    # pointers
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    lse_ptr,
    # sizes
    group_size,
    head_dim,
    block_size,
    split_len,
    # strides
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_pos,
    stride_k_head,
    stride_v_block,
    stride_v_pos,
    stride_v_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    stride_out_split,
    stride_lse_seq,
    stride_lse_head,
    # meta-parameters
    qk_scale,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Grid (S, kvh, num_splits): keys [split * split_len, min(ctx, (split + 1) * split_len))."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)  # query heads of this KV head
    offs_n = tl.arange(0, BLOCK_N)  # key positions within a tile
    offs_d = tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < group_size, offs_d < head_dim
    heads = kv_head * group_size + offs_g  # (BLOCK_G,)

    q_offs = seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(tl.float32) * qk_scale  # (BLOCK_G, BLOCK_D), log2 domain: softmax via exp2

    context_len = tl.load(context_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(context_len, start + split_len)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n  # (BLOCK_N,) token positions in the sequence
        n_mask = pos < end
        # Table entries past ceil(ctx / block_size) are never read: their loads are masked.
        block = tl.load(block_tables_ptr + seq * stride_table_seq + pos // block_size, mask=n_mask)
        slot = pos % block_size
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_offs = block[:, None] * stride_k_block + slot[:, None] * stride_k_pos + offs_d[None, :]
        k = tl.load(k_cache_ptr + k_offs + kv_head * stride_k_head, mask=kv_mask, other=0.0)
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # (BLOCK_G, BLOCK_N)
        scores = tl.where(n_mask[None, :], scores, float("-inf"))

        # Every tile holds at least one valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # (BLOCK_G, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_offs = block[:, None] * stride_v_block + slot[:, None] * stride_v_pos + offs_d[None, :]
        v = tl.load(v_cache_ptr + v_offs + kv_head * stride_v_head, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    # An empty split (start >= ctx) writes zeros and lse = -inf, so the merge gives it no weight.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_offs = seq * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        out_offs += split * stride_out_split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        lse_offs = seq * stride_lse_seq + heads * stride_lse_head + split
        tl.store(lse_ptr + lse_offs, lse, mask=g_mask)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    # pointers
    partial_ptr,
    lse_ptr,
    out_ptr,
    # sizes
    num_splits,
    head_dim,
    # strides
    stride_partial_seq,
    stride_partial_head,
    stride_partial_split,
    stride_lse_seq,
    stride_lse_head,
    stride_out_seq,
    stride_out_head,
    # meta-parameters
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (S, H): out = sum_j w_j * partial_j / sum_j w_j with w_j = 2 ** lse_j."""
    seq, head = tl.program_id(0), tl.program_id(1)
    offs_j = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    j_mask, d_mask = offs_j < num_splits, offs_d < head_dim
    lse = tl.load(
        lse_ptr + seq * stride_lse_seq + head * stride_lse_head + offs_j,
        mask=j_mask,
        other=float("-inf"),
    )  # (BLOCK_SPLITS,)
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # empty splits: exp2(-inf) = 0
    partial_offs = (
        seq * stride_partial_seq
        + head * stride_partial_head
        + offs_j[:, None] * stride_partial_split
        + offs_d[None, :]
    )
    partial = tl.load(partial_ptr + partial_offs, mask=j_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights, axis=0)  # (BLOCK_D,)
    out_offs = seq * stride_out_seq + head * stride_out_head + offs_d
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its paged K/V (GQA).

    out[s, h] = softmax(q[s, h] . K[s, :ctx[s], h // (H/kvh)] * scale) @ V[s, :ctx[s], h // (H/kvh)]
    q (S, H, d); k_cache/v_cache (num_blocks, block_size, kvh, d); block_tables (S, nb) int64;
    context_lens (S,) int64 -> (S, H, d) in q's dtype.

    Every context_lens[s] must be in [1, nb * block_size]; block_size must be a power of two.
    Long contexts over few (sequence, KV head) pairs on a GPU are split across programs.
    """
    num_splits = _choose_num_splits(q, k_cache, block_tables)
    return paged_decode_attention_split(
        q, k_cache, v_cache, block_tables, context_lens, scale, num_splits
    )


def paged_decode_attention_split(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """paged_decode_attention with an explicit number of key splits (1: a single pass)."""
    S, H, d, kvh, block_size = _check_shapes(q, k_cache, v_cache, block_tables, context_lens)
    out = torch.empty((S, H, d), dtype=q.dtype, device=q.device)
    if S == 0:
        return out
    group_size = H // kvh
    BLOCK_G, BLOCK_N, BLOCK_D, num_warps = launch_config(group_size, d)
    max_len = block_tables.shape[1] * block_size  # bound on ctx without a device sync
    split_len = triton.cdiv(triton.cdiv(max_len, num_splits), BLOCK_N) * BLOCK_N
    split = num_splits > 1
    if split:
        partial = torch.empty((S, H, num_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((S, H, num_splits), dtype=torch.float32, device=q.device)
    else:  # (S, H, 1, d) view of out; lse is never touched
        partial, lse = out.unsqueeze(2), out
    _paged_decode_kernel[(S, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse,
        group_size, d, block_size, split_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        scale * LOG2E,
        BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SPLIT=split, num_warps=num_warps,
    )  # fmt: skip
    if split:
        _merge_splits_kernel[(S, H)](
            partial, lse, out,
            num_splits, d,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out


def launch_config(group_size: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_G, BLOCK_N, BLOCK_D, num_warps) of the decode kernel for a GQA group and head_dim:
    a tile of at most TILE_ELEMENTS, and 8 warps for a tile above WIDE_TILE (no spills)."""
    block_g, block_d = triton.next_power_of_2(group_size), triton.next_power_of_2(head_dim)
    block_n = max(1, min(MAX_BLOCK_N, TILE_ELEMENTS // (block_g * block_d)))
    return block_g, block_n, block_d, 8 if block_g * block_n * block_d > WIDE_TILE else 4


def _check_shapes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """(S, H, d, kvh, block_size); the kernel needs unit stride along head_dim."""
    S, H, d = q.shape
    num_blocks, block_size, kvh, d_cache = k_cache.shape
    assert v_cache.shape == k_cache.shape, (
        f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    )
    assert d_cache == d, f"cache head_dim {d_cache} != q head_dim {d}"
    assert H % kvh == 0, f"query heads {H} not a multiple of KV heads {kvh}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} not a power of two"
    assert block_tables.dim() == 2 and block_tables.shape[0] == S, (
        f"block_tables {tuple(block_tables.shape)} for S={S}"
    )
    assert context_lens.shape == (S,), f"context_lens {tuple(context_lens.shape)} for S={S}"
    assert k_cache.dtype == v_cache.dtype == q.dtype, (
        f"dtypes q {q.dtype} k {k_cache.dtype} v {v_cache.dtype}"
    )
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    return S, H, d, kvh, block_size


def _choose_num_splits(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor) -> int:
    """Split keys only when (sequence, KV head) programs alone would leave the GPU's SMs idle."""
    if q.device.type != "cuda":
        return 1
    programs = q.shape[0] * k_cache.shape[2]
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    max_len = block_tables.shape[1] * k_cache.shape[1]
    if programs >= sm_count:
        return 1
    return max(1, min(triton.cdiv(sm_count, programs), max_len // MIN_SPLIT_TOKENS))
