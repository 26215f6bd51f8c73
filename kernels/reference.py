"""Pure-PyTorch reference ops (fp32 accumulation). They define correct behaviour for kernels/.

Every op takes what it needs as arguments (the step's AdapterBatch, a site's DeltaWeights): no
state survives a call, and no op reads a tensor back to the host, so a decode step runs the
same sequence of ops whatever adapters it holds, and torch.compile traces it whole.

Batch invariance (eager steps): a row's result does not depend, bit for bit, on the other rows
of its step, so a token's log-prob is the same alone or beside others, in a whole prefill or a
chunk, after a prefix-cache hit or not. Every matmul whose rows are tokens goes through
`rows_mm` / `rows_bmm` (one GEMM shape per call, whatever the row count) and attention through
`attend` (keys in fixed tiles from key 0). The dense form a compiled decode step traces
(`_decode_run`) is inductor's to lower and is not held to this.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adapterserve.kernels.batch import AdapterBatch, DeltaWeights


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """cache (num_blocks, block_size, kvh, d), block_tables (S, nb) -> (S, kvh, max_len, d)."""
    # index_select, not cache[block_tables]: the same copy, faster on CPU at decode sizes
    # (BENCHMARKS.md, 'Figures quoted from the code')
    blocks = cache.index_select(0, block_tables.reshape(-1)).view(
        *block_tables.shape, *cache.shape[1:]
    )
    seqs = blocks.flatten(1, 2)  # (S, nb * block_size, kvh, d)
    if seqs.shape[1] != max_len:
        seqs = seqs[:, :max_len]  # (S, L, kvh, d)
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
    S, H, d = q.shape
    max_len = block_tables.shape[1] * k_cache.shape[1]
    kvh = k_cache.shape[2]
    keys = gather_kv(k_cache, block_tables, max_len).reshape(S * kvh, max_len, d)  # (S*kvh, L, d)
    values = gather_kv(v_cache, block_tables, max_len).reshape(S * kvh, max_len, d)
    last_key = (context_lens - 1).repeat_interleave(kvh)[:, None]  # (S*kvh, 1)
    out = attend_rows(
        q.reshape(S * kvh, H // kvh, d), keys, values, last_key, scale
    )  # (S*kvh, g, d)
    out = out.view(S, H, d)
    return out if out.dtype == q.dtype else out.to(q.dtype)


KEY_TILE = 64  # keys per step of `attend`'s online softmax


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last_key: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of each query row over its group's keys [0, last_key], every row's
    result bit for bit independent of how many rows and keys the call holds (batch invariance).

    out[g, r] = softmax(q[g, r] . keys[g, :last_key[g, r] + 1] * scale) @ values[g, :last_key[g, r] + 1]
    q (G, M, d); keys, values (G, L, d); last_key (G or 1, M) int -> (G, M, d) fp32.

    Flash attention's online softmax over tiles of KEY_TILE keys from key 0: a tile's products are
    `rows_bmm`'s fixed-shape GEMMs (the last tile zero-padded), its sums fixed-length reductions,
    and tiles fold in in key order. A tile past a row's last key adds exactly nothing (its max is
    -inf, its weights 0, the running sums scaled by exp(0) = 1), so the same row gives the same
    bits in a whole prefill or in a one-token chunk after a prefix-cache hit (torch's SDPA
    splits its queries and keys by their counts). Decode attention uses `attend_rows`.
    """
    q = _fp32(q) * scale
    for start in range(0, keys.shape[1], KEY_TILE):
        k, v = (_tile(_fp32(t[:, start : start + KEY_TILE])) for t in (keys, values))  # (G, KT, d)
        s = rows_bmm(q, k.transpose(1, 2).contiguous())  # (G, M, KT)
        index = torch.arange(start, start + KEY_TILE, device=q.device)
        s = s.masked_fill(index > last_key[..., None], float("-inf"))
        if start == 0:  # key 0 is every row's: the max is finite (the general step, with m = -inf)
            m = s.amax(-1)  # running max (G, M)
            p = torch.exp(s - m[..., None])  # (G, M, KT)
            total, acc = p.sum(-1), rows_bmm(p, v)  # running sum of exp(score - m); (G, M, d)
            continue
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[..., None])
        alpha = torch.exp(m - m_new)
        total = total * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + rows_bmm(p, v)
        m = m_new
    return acc / total[..., None]


def attend_rows(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last_key: torch.Tensor, scale: float
) -> torch.Tensor:
    """`attend` for calls whose row count per group M never changes (decode: one token's query
    heads per KV head), every key tile at once: each (group, key tile) is one (M, d) @ (d, KT)
    GEMM, the softmax takes the row's max over all keys (exact in any order), each tile's sum
    has a fixed length and the tiles add up in key order (a cumulative sum), so trailing tiles
    (a longer sequence beside it) add exact zeros. A constant number of ops, not one loop step
    per key tile: decode attention is ~30 calls a step."""
    G, M, d = q.shape
    tiles = (keys.shape[1] + KEY_TILE - 1) // KEY_TILE
    k, v = (_tile(_fp32(t), tiles * KEY_TILE).view(G * tiles, KEY_TILE, d) for t in (keys, values))
    q = (_fp32(q) * scale)[:, None].expand(G, tiles, M, d).reshape(G * tiles, M, d)
    s = torch.bmm(q, k.transpose(1, 2)).view(G, tiles, M, KEY_TILE)
    index = torch.arange(tiles * KEY_TILE, device=q.device).view(tiles, 1, KEY_TILE)
    s = s.masked_fill(index > last_key[:, None, :, None], float("-inf"))
    p = torch.exp(s - s.amax(dim=(1, 3))[:, None, :, None])  # (G, tiles, M, KT)
    total = p.sum(-1).cumsum(1)[:, -1]  # (G, M)
    acc = torch.bmm(p.view(G * tiles, M, KEY_TILE), v).view(G, tiles, M, d).cumsum(1)[:, -1]
    return acc / total[..., None]


def _tile(t: torch.Tensor, length: int = KEY_TILE) -> torch.Tensor:
    """t (G, n, d) zero-padded to `length` rows, contiguous."""
    short = length - t.shape[1]
    if short == 0:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(t.shape[0], short, t.shape[2])], dim=1)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 (a decode step calls these ops 30+ times: no call at all when it is)."""
    return t if t.dtype == torch.float32 else t.float()


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """k_cache.flat[slots[t]] = k[t] (and v), in place; k_cache (num_blocks, bs, kvh, d), k (T, kvh, d)."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(
        0, slots, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype)
    )
    v_cache.view(-1, *v.shape[1:]).index_copy_(
        0, slots, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype)
    )


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


MAX_RUNS = 4  # more runs of consecutive used slots than this: one run over their whole range

# Rows per matmul call in `rows_mm` / `rows_bmm`: every call multiplies this many rows, so that
# a row's result never depends on how many rows its step has (batch invariance).
ROW_TILE = 16


def rows_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w, each row's result bit for bit independent of how many rows x has.

    x (M, K), w (K, N) -> (M, N). A BLAS picks its kernel and blocking by the sizes: MKL on this
    CPU runs a GEMV for one row and other kernels for a few rows, which sum over K in another
    order, so a prompt's last token computed alone (a prefix-cache hit) and inside a whole
    prefill differed in the last bits. Here every call is the same GEMM, (ROW_TILE, K) @ (K, N):
    the rows go in tiles of ROW_TILE (the last one zero-padded), one batched matmul over the
    tiles against w broadcast (not copied).
    """
    return rows_bmm(x[None], w[None])[0]


def rows_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch.bmm(x, w) as `rows_mm` computes each row: x (G, M, K), w (G, K, N) -> (G, M, N),
    every row of group g from one (ROW_TILE, K) @ (K, N) product against w[g]. With G > 1 the
    products read a contiguous copy of w, with G == 1 w as given: a caller whose G depends on
    the batch passes w contiguous, so that the GEMM sees one layout."""
    G, M, K = x.shape
    tiles = (M + ROW_TILE - 1) // ROW_TILE
    x = torch.cat([x, x.new_zeros(G, tiles * ROW_TILE - M, K)], dim=1)  # (G, tiles * ROW_TILE, K)
    N = w.shape[-1]
    w = w[:, None].expand(G, tiles, K, N).reshape(G * tiles, K, N)  # a view when G == 1
    out = torch.bmm(x.view(G * tiles, ROW_TILE, K), w)  # (G * tiles, ROW_TILE, N)
    return out.view(G, tiles * ROW_TILE, N)[:, :M]


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

    Decode rows: one matmul of u against the A rows of a run of consecutive slots at once (D,
    slots*n*R), the slot mask and scaling, then per slice one matmul against the same slots' B:
    weights are read in place (a slot-major A makes a run one contiguous block), once per call,
    never gathered per token. The runs are the slots decode rows use that hold weights here
    (`batch.decode_slots`, `weights.loaded`: host facts, so no op runs for a stack no row uses);
    with `decode_slots` None (a compiled step) one run covers every slot. Prefill segments: two
    matmuls on their slot's weights.
    """
    n = weights.a.shape[0]
    sizes = list(y_slice_sizes) if y_slice_sizes is not None else [weights.b.shape[-1]] * n
    slices = list(zip(y_offsets, sizes, strict=True))
    D = batch.num_decode
    if D:
        for first, end in slot_runs(weights, batch):
            if batch.group_rows is not None:
                _grouped_run(y[:D], u[:D], weights, batch, first, end, slices)
            else:
                _decode_run(y[:D], u[:D], weights, batch.onehot[:, first:end], first, end, slices)
    for slot, start, count in batch.segments:
        if weights.loaded is not None and slot not in weights.loaded:
            continue
        rows = slice(start, start + count)
        x = u[rows].float()  # (c, d_in)
        for i, (off, size) in enumerate(slices):
            h = (
                activate(
                    rows_mm(x, weights.a[i, slot].float().t()),
                    weights.activations[i, slot],
                    weights.codes,
                )
                * weights.scalings[i, slot]
            )  # (c, R)
            y[rows, off : off + size] += rows_mm(h, weights.b[i, slot, :, :size].float()).to(
                y.dtype
            )
    return y


def slot_runs(weights: DeltaWeights, batch: AdapterBatch) -> list[tuple[int, int]]:
    """[first, end) ranges of slots the decode rows need from `weights` (host facts only)."""
    S = weights.a.shape[1]
    if batch.decode_slots is None:
        return [(0, S)]
    used = batch.decode_slots if weights.loaded is None else batch.decode_slots & weights.loaded
    found: list[tuple[int, int]] = []
    for slot in sorted(used):
        if found and found[-1][1] == slot:
            found[-1] = (found[-1][0], slot + 1)
        else:
            found.append((slot, slot + 1))
    return found if len(found) <= MAX_RUNS else [(found[0][0], found[-1][1])]


def _decode_run(
    y: torch.Tensor,
    u: torch.Tensor,
    weights: DeltaWeights,
    onehot: torch.Tensor,
    first: int,
    end: int,
    slices: list[tuple[int, int]],
) -> None:
    """The decode rows' delta from slots [first, end): y (D, out), u (D, d_in), onehot (D, k)."""
    n, _, R, d_in = weights.a.shape
    k, D = end - first, u.shape[0]
    a = weights.a[:, first:end].transpose(0, 1).reshape(k * n * R, d_in)  # a view if slot-major
    h = (u.float() @ a.float().t()).view(D, k, n, R)
    h = activate(h, weights.activations[:, first:end].t()[None, :, :, None], weights.codes)
    h = h * (onehot[:, :, None] * weights.scalings[:, first:end].t()[None])[..., None]
    for i, (off, size) in enumerate(slices):
        b = weights.b[i, first:end].reshape(k * R, -1)[:, :size].float()  # (k*R, size)
        y[:, off : off + size] += (h[:, :, i].reshape(D, k * R) @ b).to(y.dtype)


def _grouped_run(
    y: torch.Tensor,
    u: torch.Tensor,
    weights: DeltaWeights,
    batch: AdapterBatch,
    first: int,
    end: int,
    slices: list[tuple[int, int]],
) -> None:
    """_decode_run with the rows grouped by slot (batch.group_rows): one batched matmul per
    factor, each slot's rows against that slot's weights only, so the work is the rows' own
    (padded to the largest group), not every row times every slot of the run; the weights are
    still read in place, once. Padding rows are row 0 again, masked to a zero delta."""
    n, _, R, d_in = weights.a.shape
    k = end - first
    rows = batch.group_rows[first:end]  # (k, P)
    P = rows.shape[1]
    flat = rows.reshape(-1)
    x = u.index_select(0, flat).view(k, P, d_in).float()
    a = weights.a[:, first:end].transpose(0, 1).reshape(k, n * R, d_in)  # a view if slot-major
    h = rows_bmm(x, a.float().transpose(1, 2).contiguous()).view(k, P, n, R)
    h = activate(h, weights.activations[:, first:end].t()[:, None, :, None], weights.codes)
    h = (
        h
        * (batch.group_mask[first:end, :, None] * weights.scalings[:, first:end].t()[:, None])[
            ..., None
        ]
    )
    deltas = [
        rows_bmm(h[:, :, i], weights.b[i, first:end, :, :size].float().contiguous())
        for i, (_, size) in enumerate(slices)
    ]
    if [off for off, _ in slices] == [sum(sz for _, sz in slices[:i]) for i in range(n)] and sum(
        sz for _, sz in slices
    ) == y.shape[1]:  # the slices tile y: one add into it whole
        y.index_add_(0, flat, torch.cat(deltas, dim=-1).view(k * P, -1).to(y.dtype))
        return
    for (off, size), delta in zip(slices, deltas, strict=True):  # index_add_ on a column slice
        y[:, off : off + size].index_add_(0, flat, delta.view(k * P, size).to(y.dtype))


def ia3_scale(
    x: torch.Tensor,
    vectors: torch.Tensor,
    batch: AdapterBatch,
    loaded: frozenset[int] | set[int] | None = None,
) -> torch.Tensor:
    """out[t] = x[t] * vectors[s] for s = slot_ids[t] >= 0; out[t] = x[t] where s == -1.

    x (T, d); vectors (S, d) (1.0 for slots with no vector here) -> (T, d) in x's dtype (fp32
    product). Decode rows scale by onehot @ vectors (+1 for base rows). With host facts (the
    batch's decode slots, the `loaded` slots) a batch none of whose rows has a vector here
    returns x itself."""
    D = batch.num_decode
    decode = D > 0 and not (
        batch.decode_slots is not None and loaded is not None and not batch.decode_slots & loaded
    )
    segments = [s for s in batch.segments if loaded is None or s[0] in loaded]
    if not decode and not segments:
        return x
    if decode and not segments:
        out = x[:D].float() * (batch.onehot @ vectors.float() + batch.base_rows)  # (D, d)
        return out.to(x.dtype) if x.shape[0] == D else torch.cat([out.to(x.dtype), x[D:]])
    out = x.float().clone()
    if decode:
        out[:D] *= batch.onehot @ vectors.float() + batch.base_rows
    for slot, start, count in segments:
        out[start : start + count] *= vectors[slot].float()
    return out.to(x.dtype)
