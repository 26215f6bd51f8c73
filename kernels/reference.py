"""Pure-PyTorch reference ops (fp32 accumulation). They define correct behaviour for kernels/."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.segments import version_of


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


def activate(h: torch.Tensor, codes: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
    """h (T, ..., r) fp32, codes (T,) int Activation per token -> f_code[t](h[t]).
    `present`: the distinct codes, when the caller knows them (saves a device read)."""
    if present is None:
        present = codes.unique().tolist()  # the few codes in use, not one per token
    if len(present) == 1:
        f = _ACTIVATIONS.get(Activation(present[0]))
        return h if f is None else f(h)
    codes = codes.view(-1, *([1] * (h.dim() - 1)))  # broadcast over the token's row
    out = h
    for code in present:
        f = _ACTIVATIONS.get(Activation(code))
        if f is not None:
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


BIG_SEGMENT = 16  # a slot with more tokens in a step (a prefill chunk) gets its own matmuls
MAX_RUNS = 3  # more runs of consecutive small-segment slots than this: gather their weights


@dataclass
class _Run:
    """Small segments whose slots `index` selects (a slice: a view of the stacks; a tensor:
    a gather), blocks [first, first + ns) of the padded layout."""

    index: slice | torch.Tensor
    first: int
    ns: int
    flat: torch.Tensor  # (n,) positions of the run's tokens in the whole padded layout
    rows: torch.Tensor  # (n,) their token indices
    local: torch.Tensor  # (n,) their positions within the run's own blocks (flat - first * c)


@dataclass
class _Layout:
    """Adapter tokens by slot. Segments longer than BIG_SEGMENT: (slot, token indices), one
    pair of matmuls each on views of that slot's weights. The rest: laid out block by block
    (one block per slot, padded to c, the largest such count) in runs of consecutive slots,
    so that a run is two batched matmuls on strided views of the stacks (no weight copies)."""

    big: list[tuple[int, torch.Tensor]]
    runs: list[_Run]
    c: int
    blocks: int
    flat: torch.Tensor  # (n_small,) all small-segment tokens' layout positions
    rows: torch.Tensor  # (n_small,) their token indices

    @classmethod
    def build(cls, safe: torch.Tensor, valid: torch.Tensor) -> _Layout:
        rows = torch.nonzero(valid).squeeze(1)  # (N,)
        slots = safe[rows]
        order = torch.argsort(slots, stable=True)
        rows, slots = rows[order], slots[order]  # grouped by slot
        uniq, counts = torch.unique_consecutive(slots, return_counts=True)
        big, small, start = [], [], 0
        for slot, count in zip(uniq.tolist(), counts.tolist(), strict=True):
            seg = (slot, start, count)
            (big if count > BIG_SEGMENT else small).append(seg)
            start += count
        big_rows = [(slot, rows[a : a + n]) for slot, a, n in big]
        c = max((n for _, _, n in small), default=0)
        groups: list[list[tuple[int, int, int]]] = []
        for seg in small:  # consecutive slot ids form a run
            if groups and seg[0] == groups[-1][-1][0] + 1:
                groups[-1].append(seg)
            else:
                groups.append([seg])
        if len(groups) > MAX_RUNS:
            groups = [small]
        runs, flats, all_rows, block = [], [], [], 0
        for group in groups:
            flat_parts, row_parts = [], []
            for i, (_, a, n) in enumerate(group):
                flat_parts.append(torch.arange(n, device=rows.device) + (block + i) * c)
                row_parts.append(rows[a : a + n])
            ids = [slot for slot, _, _ in group]
            consecutive = ids == list(range(ids[0], ids[0] + len(ids)))
            index = (slice(ids[0], ids[-1] + 1) if consecutive
                     else torch.tensor(ids, device=rows.device))
            flat, run_rows = torch.cat(flat_parts), torch.cat(row_parts)
            runs.append(_Run(index, block, len(group), flat, run_rows, flat - block * c))
            flats.append(flat)
            all_rows.append(run_rows)
            block += len(group)
        empty = rows.new_zeros(0)
        return cls(big_rows, runs, c, block, torch.cat(flats) if flats else empty,
                   torch.cat(all_rows) if all_rows else empty)


class _BatchPlan:
    """What every adapter op of one batch shares, computed once per `slot_ids` tensor: the
    distinct slots used (u,), each token's index into them (T,), the tokens with an adapter, and
    per (ranks, scalings) pair of a stack, its largest used rank r and the (T, r) factor
    scalings[s] * (column < ranks[s]) * (s >= 0). A step calls the ops ~10 times per layer with
    the same slot_ids; recomputing this each time cost more than the matmuls on CPU."""

    def __init__(self, slot_ids: torch.Tensor):
        self.slot_ids, self.version = slot_ids, version_of(slot_ids)
        self.safe = slot_ids.long().clamp(min=0)  # (T,) -1 reads slot 0, masked below
        self.used, self.inverse = torch.unique(self.safe, return_inverse=True)
        self.valid = slot_ids >= 0  # (T,)
        self._factors: dict[tuple, tuple] = {}
        # The tensors whose ids key _factors, held so that no new tensor takes one of their
        # ids while this plan lives (a batch reused over another pool would read stale factors).
        self._keep: list[torch.Tensor | None] = []
        self._layout: _Layout | None = None

    def layout(self) -> _Layout:
        """The batch's adapter tokens grouped by slot (computed once per batch)."""
        if self._layout is None:
            self._layout = _Layout.build(self.safe, self.valid)
        return self._layout

    def slot_factor(
        self, ranks: torch.Tensor, scalings: torch.Tensor, index: slice | torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """For the slots `index` picks: the largest rank r among the batch's slots, and the
        (ns, 1, r) factor scalings[s] * (column < ranks[s]), cached per stack for the batch."""
        where = (index.start, index.stop) if isinstance(index, slice) else id(index)
        key = ("slot", id(ranks), version_of(ranks), id(scalings), version_of(scalings), where)
        found = self._factors.get(key)
        if found is None:
            r = self.factor(ranks, None)[0]
            live = torch.arange(r, device=ranks.device) < ranks[index, None]  # (ns, r)
            found = (r, (live * scalings[index, None].float())[:, None, :].to(self.safe.device))
            self._factors[key] = found
            self._keep += [ranks, scalings, index if isinstance(index, torch.Tensor) else None]
        return found

    def slot_codes(
        self, activations: torch.Tensor, index: slice | torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """The activation codes of the slots `index` picks and their distinct values, cached
        per stack for the batch (activate() would read them back at every call)."""
        where = (index.start, index.stop) if isinstance(index, slice) else id(index)
        key = ("codes", id(activations), version_of(activations), where)
        found = self._factors.get(key)
        if found is None:
            codes = activations[index]
            found = self._factors[key] = (codes, codes.unique().tolist())
            self._keep += [activations, index if isinstance(index, torch.Tensor) else None]
        return found

    def laid_out(self, u: torch.Tensor) -> torch.Tensor:
        """u's rows of the small segments in the padded layout (blocks * c, in), fp32; reused
        while the same input tensor comes back (q, k and v share theirs, as do gate and up)."""
        cached = getattr(self, "_laid_out", None)
        if cached is not None and cached[0] is u and cached[1] == version_of(u):
            return cached[2]
        lay = self.layout()
        xp = torch.zeros(lay.blocks * lay.c, u.shape[1], dtype=torch.float32, device=u.device)
        xp.index_copy_(0, lay.flat, u[lay.rows].float())
        self._laid_out = (u, version_of(u), xp)
        return xp

    def matches(self, slot_ids: torch.Tensor) -> bool:
        return slot_ids is self.slot_ids and version_of(slot_ids) == self.version

    def factor(self, ranks: torch.Tensor, scalings: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        key = (id(ranks), version_of(ranks), id(scalings), version_of(scalings))
        found = self._factors.get(key)
        if found is None:
            token_ranks = ranks.to(self.safe.device)[self.safe]  # (T,)
            r = int(token_ranks[self.valid].max()) if bool(self.valid.any()) else 0
            live = torch.arange(r, device=self.safe.device) < token_ranks[:, None]  # (T, r)
            live &= self.valid[:, None]
            f = live.float()
            if scalings is not None:
                f = f * scalings.float().to(f.device)[self.safe, None]
            found = self._factors[key] = (r, f)
            self._keep += [ranks, scalings]
        return found


_last_plan: list[_BatchPlan] = []


def _plan(slot_ids: torch.Tensor) -> _BatchPlan:
    if _last_plan and _last_plan[0].matches(slot_ids):
        return _last_plan[0]
    plan = _BatchPlan(slot_ids)
    _last_plan[:] = [plan]
    return plan


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

    CPU-friendly form: one matmul of x against the A rows of the u distinct slots in the batch
    (u * r columns, r = their largest rank), then each token keeps its own slot's r columns.
    The weights of each used slot are read once per call, not once per token.
    """
    a4 = _stack_slices(a_stack, 3)  # (n, S, r_max, in)
    n, r_max, T = a4.shape[0], a4.shape[2], x.shape[0]
    plan = _plan(slot_ids)
    r, factor = plan.factor(ranks, None if activations is not None else scalings)
    h = torch.zeros(n, T, r_max, dtype=torch.float32, device=x.device)
    if r == 0 or T == 0:
        return h[0] if a_stack.dim() == 3 else h
    a_used = a4[:, plan.used, :r]  # (n, u, r, in): each used slot's weights, once
    u = a_used.shape[1]
    full = torch.matmul(x.float(), a_used.float().reshape(n, u * r, -1).transpose(1, 2))
    pick = plan.inverse.view(1, T, 1, 1).expand(n, T, 1, r)
    part = full.view(n, T, u, r).gather(2, pick).squeeze(2)  # (n, T, r) own slot's columns
    if activations is not None:
        part = activate(part.transpose(0, 1), activations[plan.safe]).transpose(0, 1)
        part = part * plan.factor(ranks, scalings)[1]
    else:
        part = part * factor
    h[..., :r] = part
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

    CPU-friendly form: each token's h goes into its slot's row block of a (u, T, r) tensor
    (zeros elsewhere); one batched matmul against the u distinct slots' B, summed over u.
    """
    h3, b4 = _stack_slices(h, 2), _stack_slices(b_stack, 3)  # (n, T, r), (n, S, out_max, r)
    offsets, sizes = _as_list(y_offsets), _as_list(y_slice_sizes)
    T = y.shape[0]
    plan = _plan(slot_ids)
    r, live = plan.factor(ranks, None)
    r = min(r, h3.shape[-1])
    if r == 0 or T == 0:
        return y
    u = plan.used.numel()
    pick = plan.inverse.view(1, T, 1).expand(1, T, r)
    for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):  # n <= 3 slices
        blocks = torch.zeros(u, T, r, dtype=torch.float32, device=y.device)
        blocks.scatter_(0, pick, (h3[i, :, :r].float() * live[:, :r])[None])
        b_used = b4[i, plan.used, :size, :r].float()  # (u, size, r)
        delta = torch.bmm(blocks, b_used.transpose(1, 2)).sum(0)  # (T, size)
        rows = y[:, off : off + size]
        rows.copy_((rows.float() + delta).to(y.dtype))
    return y


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
    """out[t] = y[t] + scalings[s] * B[s, :, :ranks[s]] f_s(A[s, :ranks[s]] u[t]), s = slot_ids[t];
    out[t] = y[t] where s == -1. A new tensor in y's dtype; the adapter math is fp32.

    y (T, out); u (T, in) (the linear's input for LoRA / parallel, y itself for output-side
    series); a_stack (S, r_max, in); b_stack (S, out, r_max); ranks, scalings, activations (S,)
    as in lora_shrink (None = identity, LoRA). Semantically lora_shrink then lora_expand.
    n slices of a fused projection sharing u (q|k|v, gate|up) in one call: a_stack
    (n, S, r_max, in), b_stack (n, S, out_max, r_max), y (T, out_total), and slice i adds into
    y[:, y_offsets[i] : y_offsets[i] + y_slice_sizes[i]] (as lora_expand's slices).

    CPU form (see _Layout): long segments (prefill chunks) run two matmuls on views of their
    slot's weights; short ones (decode tokens) are laid out slot by slot, padded, and run as
    batched matmuls over runs of consecutive slots, all slices at once. Weights are read in
    place, each used slot once, with no Python loop over tokens and none over slots for
    decode-sized segments.
    """
    a4, b4 = _stack_slices(a_stack, 3), _stack_slices(b_stack, 3)  # (n, S, r, in), (n, S, o, r)
    offsets = _as_list(y_offsets)
    sizes = [b4.shape[2]] if y_slice_sizes is None else _as_list(y_slice_sizes)
    n = a4.shape[0]
    if not len(offsets) == len(sizes) == n == b4.shape[0]:
        raise ValueError(f"expected {n} slices of A and B, offsets {offsets} and sizes {sizes}")
    plan = _plan(slot_ids)
    out = y.float()
    out = out.clone() if out is y else out  # (T, out) fp32
    r, _ = plan.factor(ranks, None)
    if r == 0:
        return out.to(y.dtype)
    lay = plan.layout()
    slices = list(zip(offsets, sizes, strict=True))
    for slot, rows in lay.big:
        rank = int(ranks[slot])
        if rank == 0:
            continue
        x_rows, scaling = u[rows].float(), float(scalings[slot])
        for i, (off, size) in enumerate(slices):
            h = x_rows @ a4[i, slot, :rank].float().t()  # (m, rank)
            if activations is not None:
                h = activate(h, activations[slot].expand(h.shape[0]))
            delta = (h * scaling) @ b4[i, slot, :size, :rank].float().t()  # (m, size)
            out[:, off : off + size].index_add_(0, rows, delta)
    if lay.runs:
        xp = plan.laid_out(u)  # (blocks * c, in)
        tiled = offsets == [sum(sizes[:i]) for i in range(n)] and sum(sizes) == out.shape[1]
        for run in lay.runs:
            ns, c = run.ns, lay.c
            x_run = xp[run.first * c : (run.first + ns) * c].view(ns, c, -1)
            factor = plan.slot_factor(ranks, scalings, run.index)[1]  # (ns, 1, r)
            deltas = []
            for i, size in enumerate(sizes):
                a = a4[i, run.index, :r].float()  # (ns, r, in): a view when index is a slice
                h = torch.bmm(x_run, a.transpose(1, 2))  # (ns, c, r)
                if activations is not None:
                    h = activate(h, *plan.slot_codes(activations, run.index))
                b = b4[i, run.index, :size, :r].float()  # (ns, size, r)
                deltas.append(torch.bmm(h * factor, b.transpose(1, 2)).view(ns * c, size))
            if tiled:  # the slices cover y side by side: one scatter of all their columns
                delta = deltas[0] if n == 1 else torch.cat(deltas, dim=1)
                out.index_add_(0, run.rows, delta[run.local])
            else:
                for (off, size), delta in zip(slices, deltas, strict=True):
                    out[:, off : off + size].index_add_(0, run.rows, delta[run.local])
    return out.to(y.dtype)


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
