"""Pure-PyTorch reference ops (fp32 accumulation). They define correct behaviour for kernels/.

Every op takes what it needs as arguments (the step's AdapterBatch, a site's DeltaWeights): no
state survives a call, and no op reads a tensor back to the host, so a decode step runs the
same sequence of ops whatever adapters it holds, and torch.compile traces it whole.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.batch import AdapterBatch, DeltaWeights


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
    q (S, H, d); k_cache/v_cache (num_blocks, block_size, kvh, d); block_tables (S, nb) int;
    context_lens (S,) int -> (S, H, d) in q's dtype. Keys are gathered up to the tables' width
    (nb * block_size, masked past each context), so no length is read back to the host: the
    caller sizes nb to the step's longest context.
    """
    max_len = block_tables.shape[1] * k_cache.shape[1]
    keys = gather_kv(k_cache, block_tables, max_len)  # (S, kvh, L, d)
    values = gather_kv(v_cache, block_tables, max_len)
    valid = torch.arange(max_len, device=q.device) < context_lens.unsqueeze(1)  # (S, L)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).float(),
        keys.float(),
        values.float(),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )  # (S, H, 1, d)
    return out.squeeze(2).to(q.dtype)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor,
) -> None:  # fmt: skip
    """k_cache.flat[slots[t]] = k[t] (and v), in place; k_cache (num_blocks, bs, kvh, d), k (T, kvh, d)."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(v_cache.dtype))


# ---------------------------------------------------------------------------------------------
# Adapter ops over the slot pool (see kernels/batch.py for the row layout and the weights).
# ---------------------------------------------------------------------------------------------


class Activation(enum.IntEnum):
    """Per-slot nonlinearity code of a bottleneck adapter (LoRA is IDENTITY)."""

    IDENTITY = 0
    RELU = 1
    GELU = 2  # exact (erf)
    GELU_TANH = 3  # tanh approximation
    SILU = 4
    SIGMOID = 5
    TANH = 6


_ACTIVATIONS = {
    Activation.RELU: torch.relu,
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: lambda h: F.gelu(h, approximate="tanh"),
    Activation.SILU: F.silu,
    Activation.SIGMOID: torch.sigmoid,
    Activation.TANH: torch.tanh,
}


def activate(h: torch.Tensor, codes: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
    """f_code(h) elementwise, `codes` broadcast against h; only the codes in `present` (a host
    fact) are computed, so LoRA (none present) costs nothing and no code is read back."""
    out = h
    for code in present:
        out = torch.where(codes == code, _ACTIVATIONS[Activation(code)](h), out)
    return out


def add_delta(
    y: torch.Tensor,
    u: torch.Tensor,
    weights: DeltaWeights,
    batch: AdapterBatch,
    y_offsets: Sequence[int] = (0,),
    y_slice_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """y[t, off_i : off_i + size_i] += scalings[i, s] * f_{i,s}(u[t] @ A[i, s].T) @ B[i, s, :, :size_i]
    for s = slot_ids[t] >= 0 (rows of slot -1 untouched); in place on y, which is returned.

    y (T, out_total); u (T, d_in) (the linear's input for LoRA / parallel / series input-side,
    y itself for output-side series: the delta is computed before it is added); weights: n
    slices (DeltaWeights). Adapter math in fp32, added into y's dtype.

    Decode rows: one matmul of u against every slot's A rows at once (D, n*S*R), the slot mask
    and scaling, then per slice one matmul against every slot's B: each slot's weights are read
    once per call, never gathered per token. Prefill segments: two matmuls on their slot's
    weights.
    """
    n, S, R, d_in = weights.a.shape
    sizes = list(y_slice_sizes) if y_slice_sizes is not None else [weights.b.shape[-1]] * n
    slices = list(zip(y_offsets, sizes, strict=True))
    D = batch.num_decode
    if D:
        h = (u[:D].float() @ weights.a.reshape(n * S * R, d_in).float().t()).view(D, n, S, R)
        h = activate(h, weights.activations[None, :, :, None], weights.codes)
        h = h * (batch.onehot[:, None, :] * weights.scalings[None])[..., None]  # (D, n, S, R)
        for i, (off, size) in enumerate(slices):
            b = weights.b[i].reshape(S * R, -1)[:, :size].float()  # (S*R, size)
            y[:D, off : off + size] += (h[:, i].reshape(D, S * R) @ b).to(y.dtype)
    for slot, start, count in batch.segments:
        rows = slice(start, start + count)
        x = u[rows].float()  # (c, d_in)
        for i, (off, size) in enumerate(slices):
            h = activate(x @ weights.a[i, slot].float().t(), weights.activations[i, slot],
                         weights.codes) * weights.scalings[i, slot]  # fmt: skip  (c, R)
            y[rows, off : off + size] += (h @ weights.b[i, slot, :, :size].float()).to(y.dtype)
    return y


def ia3_scale(x: torch.Tensor, vectors: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    """out[t] = x[t] * vectors[s] for s = slot_ids[t] >= 0; out[t] = x[t] where s == -1.

    x (T, d); vectors (S, d) (1.0 for slots with no vector here) -> new tensor (T, d) in x's
    dtype (fp32 product). Decode rows scale by onehot @ vectors (+1 for base rows)."""
    D = batch.num_decode
    scale = batch.onehot @ vectors.float() + batch.base_rows  # (D, d)
    if not batch.segments:
        out = x[:D].float() * scale
        return out.to(x.dtype) if x.shape[0] == D else torch.cat([out.to(x.dtype), x[D:]])
    out = x.float().clone()
    out[:D] *= scale
    for slot, start, count in batch.segments:
        out[start : start + count] *= vectors[slot].float()
    return out.to(x.dtype)
