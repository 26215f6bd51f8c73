"""Pure-PyTorch reference ops (fp32 accumulation). They define correct behaviour for kernels/."""

from __future__ import annotations

import enum
from collections.abc import Sequence

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
        q.unsqueeze(2).float(),
        keys.float(),
        values.float(),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )  # (S, H, 1, d)
    return out.squeeze(2).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Adapter ops over the slot pool: A[S, r_max, in], B[S, out, r_max], ranks[S], scalings[S].
# A slot's rows/columns beyond its rank are zero, so the reference may compute on them; the
# Triton kernels never do. Scaling is applied at the end of the shrink (on the small rank-r
# intermediate, after the nonlinearity), so expand is a pure scatter-add.
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


def activate(h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """h (T, ..., r) fp32, codes (T,) int Activation per token -> f_code[t](h[t])."""
    codes = codes.view(-1, *([1] * (h.dim() - 1)))  # broadcast over the token's row
    out = h
    for code, f in _ACTIVATIONS.items():  # a fixed handful of codes, not tokens
        out = torch.where(codes == code, f(h), out)
    return out


_ACTIVATIONS = {
    Activation.RELU: torch.relu,
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: lambda h: F.gelu(h, approximate="tanh"),
    Activation.SILU: F.silu,
    Activation.SIGMOID: torch.sigmoid,
    Activation.TANH: torch.tanh,
}


def _stack_slices(stack: torch.Tensor, slot_dims: int) -> torch.Tensor:
    """Add a leading slice axis to a single-slice stack (slot_dims = dims of one slice)."""
    return stack.unsqueeze(0) if stack.dim() == slot_dims else stack


def lora_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """h[t] = scalings[s] * f_s(x[t] @ A[s, :ranks[s]].T), s = slot_ids[t]; 0 where s == -1.

    x (T, in); a_stack (S, r_max, in) -> h (T, r_max) fp32, or a_stack (n, S, r_max, in) for n
    target slices sharing x (q/k/v, gate/up) -> h (n, T, r_max). Columns >= ranks[s] are 0.
    slot_ids (T,) int, -1 = base model; ranks (S,) int; scalings (S,) float; activations (S,)
    int Activation codes, None = identity (LoRA).
    """
    a4 = _stack_slices(a_stack, 3)  # (n, S, r_max, in)
    safe = slot_ids.long().clamp(min=0)  # (T,) -1 tokens read slot 0, then get masked to 0
    a_tok = a4[:, safe].float()  # (n, T, r_max, in): gather by slot
    h = torch.einsum("ti,ntri->ntr", x.float(), a_tok)  # (n, T, r_max)
    if activations is not None:
        h = activate(h.transpose(0, 1), activations[safe]).transpose(0, 1)
    r_max = a4.shape[2]
    live = torch.arange(r_max, device=x.device) < ranks.to(x.device)[safe, None]  # (T, r_max)
    live &= (slot_ids >= 0)[:, None]
    h = h * scalings.float()[safe, None] * live  # (n, T, r_max)
    return h[0] if a_stack.dim() == 3 else h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    y_offsets: int | Sequence[int],
    y_slice_sizes: int | Sequence[int],
) -> torch.Tensor:
    """y[t, off_i : off_i + size_i] += h[i, t] @ B[i, s, :size_i, :ranks[s]].T, s = slot_ids[t] >= 0.

    In place on y (T, out_total), returned. One slice: h (T, r_max), b_stack (S, out, r_max),
    int offset/size. n slices in one call: h (n, T, r_max), b_stack (n, S, out_max, r_max) with
    each slice's rows beyond its size zero-padded, offsets/sizes sequences of n ints. Tokens
    with slot -1 and columns outside the slices are left untouched. fp32 accumulation.
    """
    h3, b4 = _stack_slices(h, 2), _stack_slices(b_stack, 3)  # (n, T, r), (n, S, out_max, r)
    offsets, sizes = _as_list(y_offsets), _as_list(y_slice_sizes)
    rows = torch.nonzero(slot_ids >= 0).squeeze(1)  # (N,) adapter tokens only
    slots = slot_ids[rows].long()  # (N,)
    for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):  # n <= 3 slices
        b_tok = b4[i, slots, :size].float()  # (N, size, r_max): gather by slot
        delta = torch.einsum("tr,tor->to", h3[i, rows].float(), b_tok)  # (N, size)
        y[rows, off : off + size] = (y[rows, off : off + size].float() + delta).to(y.dtype)
    return y


def _as_list(value: int | Sequence[int]) -> list[int]:
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def bottleneck(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    activations: torch.Tensor,
) -> torch.Tensor:
    """delta[t] = scalings[s] * up[s] @ f_s(down[s] @ x[t]), s = slot_ids[t]; 0 where s == -1.

    x (T, in); down (S, r_max, in); up (S, out, r_max); ranks (S,) bottleneck sizes; scalings
    (S,); activations (S,) int Activation codes -> delta (T, out) in x's dtype. LoRA is the
    IDENTITY case; the caller adds delta where the adapter acts (series or parallel).
    """
    h = lora_shrink(x, down, slot_ids, ranks, scalings, activations)  # (T, r_max) fp32
    delta = torch.zeros(x.shape[0], up.shape[1], dtype=x.dtype, device=x.device)  # (T, out)
    return lora_expand(delta, h, up, slot_ids, ranks, 0, up.shape[1])


def ia3_scale(x: torch.Tensor, vectors: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """out[t] = x[t] * vectors[s] for s = slot_ids[t] >= 0; out[t] = x[t] where s == -1.

    x (T, d); vectors (S, d); slot_ids (T,) int -> new tensor (T, d) in x's dtype (fp32 product).
    """
    safe = slot_ids.long().clamp(min=0)  # (T,)
    scaled = (x.float() * vectors[safe].float()).to(x.dtype)  # (T, d)
    return torch.where((slot_ids >= 0)[:, None], scaled, x)
