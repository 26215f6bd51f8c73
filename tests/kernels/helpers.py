"""Random slot pools and adapter-popularity patterns shared by the kernel tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICE = (
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
)
PATTERNS = ["distinct", "uniform", "skewed", "identical", "with_base", "all_base"]
RANKS = [3, 24, 17, 8, 1]  # mixed ranks; r_max = 24 is not a multiple of BLOCK_R = 16
# Output tolerances. fp32 results differ only in summation order (~1e-6 on these sizes).
# fp16/bf16 results: both paths accumulate the same rounded inputs in fp32 and round once at the
# end, so they differ by at most one ulp of the output (fp16 2**-10, bf16 2**-7 relative); atol
# covers one ulp at the |delta| ~ 2 scale of these inputs. fp32 intermediates (shrink's h) use
# the fp32 tolerance whatever the input dtype, since fp16/bf16 -> fp32 products are exact.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


def slot_ids_for(pattern: str, T: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """(T,) int32 slot ids following an adapter-popularity pattern over S slots (-1 = base)."""
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
    return ids.to(torch.int32).to(DEVICE)


@dataclass(frozen=True)
class Pool:
    """One target's stacked slot weights, zero-padded beyond each slot's rank (as adapters.pool)."""

    a: torch.Tensor  # (n, S, r_max, in) down / A
    b: torch.Tensor  # (n, S, out_max, r_max) up / B
    ranks: torch.Tensor  # (S,) int32
    scalings: torch.Tensor  # (S,) fp32


def make_pool(
    n: int, in_features: int, out_features: int, dtype: torch.dtype, gen: torch.Generator
) -> Pool:
    S, r_max = len(RANKS), max(RANKS)
    a = torch.randn(n, S, r_max, in_features, generator=gen) / in_features**0.5
    b = torch.randn(n, S, out_features, r_max, generator=gen) / r_max**0.5
    for s, r in enumerate(RANKS):
        a[:, s, r:] = 0
        b[:, s, :, r:] = 0
    scalings = torch.rand(S, generator=gen) + 0.5
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    return Pool(a.to(DEVICE, dtype), b.to(DEVICE, dtype), ranks.to(DEVICE), scalings.to(DEVICE))


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def poison_padding(pool: Pool) -> Pool:
    """The pool with NaN in every slot's padding: a kernel that reads beyond a rank fails."""
    a, b = pool.a.clone(), pool.b.clone()
    for s, r in enumerate(RANKS):
        a[:, s, r:] = float("nan")
        b[:, s, :, r:] = float("nan")
    return Pool(a, b, pool.ranks, pool.scalings)


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


def loop_shrink(x, a, slot_ids, ranks, scalings, activations=None) -> torch.Tensor:
    """Plain per-token fp64 loop: h (n, T, r_max)."""
    n, T, r_max = a.shape[0], x.shape[0], a.shape[2]
    h = torch.zeros(n, T, r_max, dtype=torch.float64)
    for i in range(n):
        for t in range(T):
            s = int(slot_ids[t])
            if s < 0:
                continue
            r = int(ranks[s])
            v = a[i, s, :r].double().cpu() @ x[t].double().cpu()
            if activations is not None:
                v = ACTIVATIONS_FP64[int(activations[s])](v)
            h[i, t, :r] = float(scalings[s]) * v
    return h


def loop_expand(y, h, b, slot_ids, ranks, offsets, sizes) -> torch.Tensor:
    """Plain per-token fp64 loop: y (T, out_total) + each slice's delta, as a new fp64 tensor."""
    y = y.double().cpu().clone()
    for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
        for t in range(y.shape[0]):
            s = int(slot_ids[t])
            if s >= 0:
                r = int(ranks[s])
                y[t, off : off + size] += (
                    b[i, s, :size, :r].double().cpu() @ h[i, t, :r].double().cpu()
                )
    return y
