"""Pure-PyTorch reference ops (fp32 accumulation). They define correct behaviour for kernels/."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """cache (num_blocks, block_size, kvh, d), block_tables (S, nb) -> (S, kvh, max_len, d)."""
    blocks = cache[block_tables]  # (S, nb, bs, kvh, d)
    seqs = blocks.flatten(1, 2)[:, :max_len]  # (S, L, kvh, d)
    return seqs.transpose(1, 2)


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
    """
    max_len = int(context_lens.max())
    keys = gather_kv(k_cache, block_tables, max_len)  # (S, kvh, L, d)
    values = gather_kv(v_cache, block_tables, max_len)
    valid = torch.arange(max_len, device=q.device) < context_lens.unsqueeze(1)  # (S, L)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).float(), keys.float(), values.float(),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
    )  # (S, H, 1, d)
    return out.squeeze(2).to(q.dtype)
