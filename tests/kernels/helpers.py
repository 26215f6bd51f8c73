"""Random slot pools, adapter-popularity patterns and step layouts shared by the kernel tests,
with plain per-token fp64 loops as the independent reference."""

from __future__ import annotations

import os

import torch

from adapterserve.kernels import AdapterBatch, DeltaWeights
from adapterserve.kernels.reference import Activation

DEVICE = (
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
)
PATTERNS = ["distinct", "uniform", "skewed", "identical", "with_base", "all_base"]
LAYOUTS = ["decode", "mixed"]  # every row a decode row; decode rows then prefill chunks
RANKS = [3, 24, 17, 8, 1]  # mixed ranks; R = 24 is not a multiple of BLOCK_R = 16
# Output tolerances. fp32 results differ only in summation order (~1e-6 on these sizes).
# fp16/bf16 results: both paths accumulate the same rounded inputs in fp32 and round once at the
# end (Triton rounds the rank-r intermediate to the input dtype before its tensor-core product:
# one more rounding of relative size 2**-11 / 2**-8), so they differ by about one ulp of the
# output (fp16 2**-10, bf16 2**-7 relative); atol covers that at the |delta| ~ 2 scale here.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


def slot_ids_for(pattern: str, T: int, S: int, gen: torch.Generator) -> list[int]:
    """T slot ids following an adapter-popularity pattern over S slots (-1 = base)."""
    if pattern == "distinct":  # every token its own slot as far as slots go, in shuffled order
        ids = torch.arange(T) % S
        ids = ids[torch.randperm(T, generator=gen)]
    elif pattern == "uniform":
        ids = torch.randint(0, S, (T,), generator=gen)
    elif pattern == "skewed":  # one hot adapter, a few others, some slots empty
        ids = torch.where(
            torch.rand(T, generator=gen) < 0.8, 1, torch.randint(0, S, (T,), generator=gen)
        )
    elif pattern == "identical":
        ids = torch.full((T,), 2)
    elif pattern == "with_base":  # about a third of the tokens use no adapter
        ids = torch.randint(-1, S, (T,), generator=gen)
        ids[torch.rand(T, generator=gen) < 0.2] = -1
    elif pattern == "all_base":
        ids = torch.full((T,), -1)
    else:
        raise ValueError(pattern)
    return ids.tolist()


def step_rows(pattern: str, layout: str, T: int, S: int, gen: torch.Generator) -> AdapterBatch:
    """A step of T rows over S slots: all decode rows ('decode'), or 7 decode rows then prefill
    chunks of 1, 4 and T - 12 rows ('mixed'), each chunk one sequence's (one slot, or base)."""
    if layout == "decode":
        return AdapterBatch.build(slot_ids_for(pattern, T, S, gen), S, device=DEVICE)
    decode = slot_ids_for(pattern, 7, S, gen)
    chunk_slots = slot_ids_for(pattern, 3, S, gen)
    ids = decode + [chunk_slots[0]] + [chunk_slots[1]] * 4 + [chunk_slots[2]] * (T - 12)
    return AdapterBatch.build(ids, S, num_decode=7, device=DEVICE)


def make_weights(
    n: int,
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    codes: list[list[int]] | None = None,
) -> DeltaWeights:
    """n slices over len(RANKS) slots, each slice with its own ranks (RANKS rolled by slice) and
    scalings; zero beyond each rank. `codes` (n, S) Activation codes (default identity)."""
    S, R = len(RANKS), max(RANKS)
    ranks = torch.tensor([RANKS[i:] + RANKS[:i] for i in range(n)], dtype=torch.int32)
    a = torch.randn(n, S, R, d_in, generator=gen) / d_in**0.5
    b = torch.randn(n, S, R, d_out, generator=gen) / R**0.5
    for i in range(n):
        for s in range(S):
            a[i, s, ranks[i, s] :] = 0
            b[i, s, ranks[i, s] :] = 0
    scalings = torch.rand(n, S, generator=gen) + 0.5
    activations = torch.tensor(codes if codes is not None else [[0] * S] * n, dtype=torch.int32)
    present = tuple(sorted({c for row in activations.tolist() for c in row} - {0}))
    return DeltaWeights(
        a.to(DEVICE, dtype),
        b.to(DEVICE, dtype),
        ranks.to(DEVICE),
        scalings.to(DEVICE),
        activations.to(DEVICE),
        present,
    )


def poison_padding(w: DeltaWeights) -> DeltaWeights:
    """The weights with NaN beyond every slot's rank: a kernel that reads there fails. (The
    reference may compute over the padding, so it never gets poisoned weights.)"""
    a, b = w.a.clone(), w.b.clone()
    for i, row in enumerate(w.ranks.tolist()):
        for s, r in enumerate(row):
            a[i, s, r:] = float("nan")
            b[i, s, r:] = float("nan")
    return DeltaWeights(a, b, w.ranks, w.scalings, w.activations, w.codes)


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


_GELU_TANH_C = (2 / torch.pi) ** 0.5
ACTIVATIONS_FP64 = [  # indexed by kernels.reference.Activation, written out independently
    lambda v: v,
    lambda v: v.clamp(min=0),
    lambda v: 0.5 * v * (1 + torch.erf(v / 2**0.5)),
    lambda v: 0.5 * v * (1 + torch.tanh(_GELU_TANH_C * (v + 0.044715 * v**3))),
    lambda v: v / (1 + torch.exp(-v)),
    lambda v: 1 / (1 + torch.exp(-v)),
    torch.tanh,
]
assert len(ACTIVATIONS_FP64) == len(Activation)


def loop_shrink(u: torch.Tensor, w: DeltaWeights, slot_ids: list[int]) -> torch.Tensor:
    """Plain per-token fp64 loop: h (n, T, R), zero for base rows and beyond ranks."""
    n, _, R, _ = w.a.shape
    h = torch.zeros(n, u.shape[0], R, dtype=torch.float64)
    for i in range(n):
        for t, s in enumerate(slot_ids):
            if s < 0:
                continue
            r = int(w.ranks[i, s])
            v = w.a[i, s, :r].double().cpu() @ u[t].double().cpu()
            v = ACTIVATIONS_FP64[int(w.activations[i, s])](v)
            h[i, t, :r] = float(w.scalings[i, s]) * v
    return h


def loop_expand(y, h, w: DeltaWeights, slot_ids: list[int], offsets, sizes) -> torch.Tensor:
    """Plain per-token fp64 loop: y (T, out_total) + each slice's h @ B, as a new fp64 tensor."""
    y = y.double().cpu().clone()
    for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
        for t, s in enumerate(slot_ids):
            if s >= 0:
                r = int(w.ranks[i, s])
                y[t, off : off + size] += (
                    h[i, t, :r].double().cpu() @ w.b[i, s, :r, :size].double().cpu()
                )
    return y
