"""Triton kernels vs the PyTorch reference on a CUDA GPU: time per call, bandwidth, speedup.

Each op's bench checks the Triton output against kernels.reference, then times both. Decode ops
are memory-bound, so bandwidth (bytes the op must read and write / time) is reported as a fraction
of a device-to-device copy measured in the same run. Prints a table per op, writes one JSON.

    .venv/bin/python benchmarks/bench_kernels.py [--ops lora,bottleneck,ia3,attention,e2e]
        [--dtype bfloat16] [--quick] [--e2e-runs base lora64 mixed] [--json bench-results/kernels.json]

Ops: lora (add_delta -- the op the model calls, all slices in one call -- as decode rows
(per-token kernels) and as prefill chunks (segmented kernels), Llama-2-7B q/k/v, gate/up,
down), bottleneck (every activation at rank 16), ia3, attention (paged decode), e2e (Llama-2-7B-shaped decode
tok/s through our model and scheduler: base only, 64 distinct rank-16 LoRA adapters on all
seven projections, 64 adapters of six kinds; the adapter runs as ratios to the base run).

Adding an op: write bench_<op>(args, copy_bytes_per_s) -> list[dict] of rows (op, shape,
times, bandwidth), give it a column list in TABLES, and register it in BENCHES; --ops then
selects it. The case builders take `device` and `timer`, so tests/kernels/
test_bench_kernels_cpu.py runs them on CPU (Triton interpreter, one call instead of timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings; never the root (its kernels/ shadows HF's)

from random_adapters import fingerprint_of, random_spec  # noqa: E402

from adapterserve.kernels import (  # noqa: E402
    AdapterBatch,
    DeltaWeights,
    attention,
    ia3,
    ops_for,
    reference,
)
from adapterserve.kernels.reference import Activation  # noqa: E402

# `kernels.bottleneck` the attribute is the dispatching op; the Triton module itself:
bottleneck = importlib.import_module("adapterserve.kernels.bottleneck")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECK_SEQS = 8  # correctness is checked on the first sequences only: rows are independent
REFERENCE_MEMORY_LIMIT = 24 * 2**30  # skip timing the reference past this (it gathers K/V in fp32)
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}


Timer = Callable[[Callable[[], object]], float]


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms per call; triton's do_bench clears L2 between calls so small shapes hit DRAM."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(num_bytes: int = 2**30, iters: int = 20) -> float:
    """Bytes/s of a device-to-device copy (read + write), timed with CUDA events."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * num_bytes * iters / (start.elapsed_time(end) / 1e3)


def attention_inputs(
    batch: int,
    context: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """Every sequence at `context` tokens, its blocks scattered over the pool (a shuffled table)."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device="cuda")
    return q, k_cache, v_cache, tables, lens


def attention_bytes(q: torch.Tensor, k_cache: torch.Tensor, lens: torch.Tensor) -> int:
    """Bytes the op must move: K and V of every context token, q in, out, tables and lengths."""
    token_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    return 2 * int(lens.sum()) * token_bytes + 2 * q.numel() * q.element_size()


def bench_attention_case(
    batch: int,
    context: int,
    heads: int,
    kv_heads: int,
    dtype: torch.dtype,
    copy_bytes_per_s: float,
    head_dim: int = 128,
    block_size: int = 16,
) -> dict:
    inputs = attention_inputs(batch, context, heads, kv_heads, head_dim, block_size, dtype)
    q, k_cache, v_cache, tables, lens = inputs
    scale = head_dim**-0.5
    head = (q[:CHECK_SEQS], k_cache, v_cache, tables[:CHECK_SEQS], lens[:CHECK_SEQS], scale)
    out = attention.paged_decode_attention(*head)
    torch.testing.assert_close(out, reference.paged_decode_attention(*head), **TOLERANCES[dtype])

    num_splits = attention._choose_num_splits(q, k_cache, tables)
    triton_ms = time_ms(lambda: attention.paged_decode_attention(*inputs, scale))
    single_ms = triton_ms
    if num_splits > 1:  # how much the split-K path buys over one pass
        single_ms = time_ms(lambda: attention.paged_decode_attention_split(*inputs, scale, 1))
    # The reference gathers K and V (dtype), then copies them to fp32 twice (float, transpose).
    reference_bytes = 2 * batch * context * kv_heads * head_dim * (q.element_size() + 2 * 4)
    reference_ms = None
    if reference_bytes < REFERENCE_MEMORY_LIMIT:
        reference_ms = time_ms(lambda: reference.paged_decode_attention(*inputs, scale))
    bytes_per_s = attention_bytes(q, k_cache, lens) / (triton_ms / 1e3)
    return dict(
        op="attention",
        batch=batch,
        context=context,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=str(dtype).removeprefix("torch."),
        num_splits=num_splits,
        triton_ms=triton_ms,
        single_pass_ms=single_ms,
        reference_ms=reference_ms,
        gb_per_s=bytes_per_s / 1e9,
        fraction_of_copy=bytes_per_s / copy_bytes_per_s,
        speedup=None if reference_ms is None else reference_ms / triton_ms,
    )


def bench_attention(args: argparse.Namespace, copy_bytes_per_s: float) -> list[dict]:
    """Llama-2-7B decode shapes (d=128, block 16): MHA (32/32 heads) and GQA (32/8)."""
    batches = [1, 16, 64] if args.quick else [1, 4, 16, 64, 128, 256]
    contexts = [128, 1024] if args.quick else [128, 512, 1024, 2048, 4096]
    rows = []
    print_header("attention")
    for heads, kv_heads in [(32, 32), (32, 8)]:
        for batch in batches:
            for context in contexts:
                row = bench_attention_case(
                    batch, context, heads, kv_heads, args.dtype, copy_bytes_per_s
                )
                print_row(row)
                rows.append(row)
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Adapter ops. Case builders are device-agnostic (tests run them on CPU in interpreter mode).
# ---------------------------------------------------------------------------------------------

PATTERNS = ("distinct", "uniform", "skewed", "identical")
DECODE_AIM_FRACTION, DECODE_AIM_SPEEDUP = 0.6, 5.0  # issue 4: decode LoRA op vs copy / reference
E2E_AIM = 0.8  # issue 4: decode tok/s with 64 distinct LoRA adapters / base-only


@dataclass(frozen=True)
class LoraShape:
    """One adapted projection: x (T, in) -> n slices of y, packed side by side in one launch."""

    name: str
    in_features: int
    out_sizes: tuple[int, ...]

    @property
    def packed(self) -> bool:
        return len(self.out_sizes) > 1


LORA_SHAPES = {  # Llama-2-7B: hidden 4096, intermediate 11008, MHA (k/v as wide as q)
    "qkv": LoraShape("qkv", 4096, (4096, 4096, 4096)),
    "gate_up": LoraShape("gate_up", 4096, (11008, 11008)),
    "down": LoraShape("down", 11008, (4096,)),
}


def popularity_counts(pattern: str, batch: int, num_adapters: int) -> list[int]:
    """Tokens per adapter (most popular first) for a Punica popularity mix (BENCHMARKS.md, B).

    The pool holds n = min(num_adapters, batch) adapters; the pattern picks how many are used:
    distinct: every token its own adapter (n of them, round-robin once batch > n); uniform:
    ceil(sqrt(batch)) adapters (at most n), equal counts; skewed: Zipf-1.5 group sizes
    floor(1.5^k), k = 0, 1, ..., while they fit (at most n groups), the remainder to the most
    popular; identical: one adapter.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    n = max(1, min(num_adapters, batch))
    if pattern == "identical":
        groups = 1
    elif pattern == "distinct":
        groups = n
    elif pattern == "uniform":
        groups = min(math.ceil(math.sqrt(batch)), n)
    else:
        sizes: list[int] = []
        k = 0
        while len(sizes) < n and sum(sizes) + math.floor(1.5**k) <= batch:
            sizes.append(math.floor(1.5**k))
            k += 1
        sizes.sort(reverse=True)
        sizes[0] += batch - sum(sizes)
        return sizes
    return [batch // groups + (i < batch % groups) for i in range(groups)]


def popularity_slots(pattern: str, batch: int, num_adapters: int, seed: int = 0) -> torch.Tensor:
    """(batch,) int32 slot per token: adapter i (slot i) on counts[i] tokens, order shuffled."""
    counts = popularity_counts(pattern, batch, num_adapters)
    slots = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    return slots[order].to(torch.int32)


@dataclass
class LoraInputs:
    """One projection's adapter op inputs, laid out two ways: every token a decode row (the
    per-token kernels), or tokens grouped into one prefill chunk per adapter (segmented)."""

    shape: LoraShape
    rank: int
    u: torch.Tensor  # (T, in)
    weights: DeltaWeights  # n slices over S slots at `rank`
    y: torch.Tensor  # (T, sum(out_sizes))
    slot_ids: torch.Tensor  # (T,) int32, host
    decode: AdapterBatch  # rows in slot_ids order, all decode rows
    prefill: AdapterBatch  # rows sorted by slot: one segment per adapter
    order: torch.Tensor  # (T,) the prefill layout's row order

    @property
    def offsets(self) -> list[int]:
        return [sum(self.shape.out_sizes[:i]) for i in range(len(self.shape.out_sizes))]

    @property
    def sizes(self) -> list[int]:
        return list(self.shape.out_sizes)

    def rows(self, variant: str) -> tuple[torch.Tensor, torch.Tensor, AdapterBatch]:
        """(u, y, batch) of a layout: 'decode' or 'prefill'."""
        if variant == "decode":
            return self.u, self.y, self.decode
        return self.u[self.order], self.y[self.order], self.prefill


def lora_inputs(
    shape: LoraShape,
    rank: int,
    slot_ids: torch.Tensor,
    dtype: torch.dtype,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> LoraInputs:
    """Random pool of max(slot_ids)+1 adapters of one rank (pool R = rank), delta ~ O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    T, S, n = slot_ids.shape[0], int(slot_ids.max()) + 1, len(shape.out_sizes)

    def randn(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(size, generator=g, device=device) * std).to(dtype)

    weights = DeltaWeights(
        a=randn(n, S, rank, shape.in_features, std=shape.in_features**-0.5),
        b=randn(n, S, rank, max(shape.out_sizes), std=rank**-0.5),
        ranks=torch.full((n, S), rank, dtype=torch.int32, device=device),
        scalings=torch.rand(n, S, generator=g, device=device) + 0.5,
        activations=torch.zeros(n, S, dtype=torch.int32, device=device),
    )
    order = torch.argsort(slot_ids, stable=True)
    ids = slot_ids.tolist()
    return LoraInputs(
        shape=shape,
        rank=rank,
        u=randn(T, shape.in_features, std=1.0),
        weights=weights,
        y=randn(T, sum(shape.out_sizes), std=1.0),
        slot_ids=slot_ids,
        decode=AdapterBatch.build(ids, S, device=device),
        prefill=AdapterBatch.build(slot_ids[order].tolist(), S, num_decode=0, device=device),
        order=order.to(device),
    )


def lora_bytes(shape: LoraShape, rank: int, slot_ids: torch.Tensor, element_size: int) -> int:
    """Bytes an adapter op must move: each distinct adapter's A and B up to its rank, u of
    every adapter token, and that token's y columns read and written (h, fp32 scratch, left out)."""
    live = slot_ids[slot_ids >= 0]
    adapters, tokens = int(torch.unique(live).numel()), int(live.numel())
    n = len(shape.out_sizes)
    weights = adapters * rank * (n * shape.in_features + sum(shape.out_sizes))
    activations = tokens * (shape.in_features + 2 * sum(shape.out_sizes))
    return (weights + activations) * element_size


def fp32(weights: DeltaWeights) -> DeltaWeights:
    return dataclasses.replace(weights, a=weights.a.float(), b=weights.b.float())


def check_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Kernel output (dtype) vs fp32 reference, at dtype's tolerance."""
    try:
        torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])
    except AssertionError as e:
        raise AssertionError(f"{what}: Triton output differs from the reference\n{e}") from None


LORA_VARIANTS = ("decode", "prefill")  # per-token kernels / segmented kernels


def bench_lora_case(
    shape: LoraShape,
    rank: int,
    batch: int,
    pattern: str,
    num_adapters: int,
    dtype: torch.dtype,
    copy_bytes_per_s: float,
    device: str | torch.device = "cuda",
    timer: Timer = time_ms,
) -> list[dict]:
    """add_delta, the op the model calls (all slices in one call), as decode rows and as
    prefill chunks: check Triton against the fp32 reference on the same inputs, then time both.
    One row per layout."""
    slot_ids = popularity_slots(pattern, batch, num_adapters)
    inp = lora_inputs(shape, rank, slot_ids, dtype, device)
    what = f"lora {shape.name} r{rank} T{batch} {pattern}/{num_adapters}"
    num_bytes = lora_bytes(shape, rank, inp.slot_ids, inp.u.element_size())
    counts = popularity_counts(pattern, batch, num_adapters)
    # Timed calls accumulate into a scratch y; tiny scalings keep it finite over thousands of
    # calls (fp16) without changing the work done.
    timed = dataclasses.replace(inp.weights, scalings=inp.weights.scalings * 1e-3)
    rows = []
    for variant in LORA_VARIANTS:
        u, y, rows_batch = inp.rows(variant)
        expected = reference.add_delta(
            y.float().clone(), u.float(), fp32(inp.weights), rows_batch, inp.offsets, inp.sizes
        )
        got = bottleneck.add_delta(y.clone(), u, inp.weights, rows_batch, inp.offsets, inp.sizes)
        check_close(got, expected, dtype, f"{what} {variant}")
        call = (y.clone(), u, timed, rows_batch, inp.offsets, inp.sizes)
        ms = timer(functools.partial(bottleneck.add_delta, *call))
        reference_ms = timer(functools.partial(reference.add_delta, *call))
        bytes_per_s = num_bytes / (ms / 1e3)
        row = dict(
            op="lora",
            shape=shape.name,
            in_features=shape.in_features,
            out_features=sum(shape.out_sizes),
            slices=len(shape.out_sizes),
            rank=rank,
            batch=batch,
            pattern=pattern,
            pool_adapters=min(num_adapters, batch),
            distinct=len(counts),
            counts=counts,
            variant=variant,
            dispatched=variant == "decode",
            dtype=str(dtype).removeprefix("torch."),
            triton_ms=ms,
            reference_ms=reference_ms,
            bytes=num_bytes,
            gb_per_s=bytes_per_s / 1e9,
            fraction_of_copy=bytes_per_s / copy_bytes_per_s,
            speedup=reference_ms / ms,
        )
        row["aim_met"] = (
            row["fraction_of_copy"] >= DECODE_AIM_FRACTION and row["speedup"] >= DECODE_AIM_SPEEDUP
            if variant == "decode"
            else None
        )
        rows.append(row)
    return rows


def bench_lora(args: argparse.Namespace, copy_bytes_per_s: float) -> list[dict]:
    """Llama-2-7B q/k/v, gate/up and down; ranks x batches x pool sizes x popularity mixes.

    Mixes that give the same tokens-per-adapter histogram (e.g. `identical` at every pool size)
    run once."""
    ranks = [16, 64] if args.quick else [8, 16, 32, 64]
    batches = [1, 16, 256] if args.quick else [1, 4, 16, 64, 256]
    pools = [8, 64] if args.quick else [1, 8, 64]
    patterns = ["distinct", "skewed", "identical"] if args.quick else list(PATTERNS)
    rows: list[dict] = []
    print_header("lora")
    for shape in LORA_SHAPES.values():
        for rank in ranks:
            for batch in batches:
                seen: set[tuple[int, ...]] = set()
                for pattern in patterns:
                    for pool in pools:
                        key = tuple(popularity_counts(pattern, batch, pool))
                        if key in seen:
                            continue
                        seen.add(key)
                        case = bench_lora_case(
                            shape, rank, batch, pattern, pool, args.dtype, copy_bytes_per_s
                        )
                        for row in case:
                            print_row(row)
                        rows += case
                torch.cuda.empty_cache()
    print_aims("lora", rows)
    return rows


BOTTLENECK_SHAPES = {  # (in, out): around a hidden-width, an up and a down projection
    "4096>4096": (4096, 4096),
    "4096>11008": (4096, 11008),
    "11008>4096": (11008, 4096),
}


def bench_bottleneck_case(
    name: str,
    batch: int,
    activation: Activation,
    dtype: torch.dtype,
    copy_bytes_per_s: float,
    rank: int = 16,
    num_adapters: int = 8,
    pattern: str = "uniform",
    device: str | torch.device = "cuda",
    timer: Timer = time_ms,
) -> dict:
    """add_delta with an activation (a bottleneck adapter), decode rows."""
    in_features, out_features = BOTTLENECK_SHAPES[name]
    shape = LoraShape("bottleneck", in_features, (out_features,))
    slot_ids = popularity_slots(pattern, batch, num_adapters)
    inp = lora_inputs(shape, rank, slot_ids, dtype, device)
    weights = dataclasses.replace(
        inp.weights,
        activations=torch.full_like(inp.weights.activations, int(activation)),
        codes=() if activation == Activation.IDENTITY else (int(activation),),
    )
    expected = reference.add_delta(inp.y.float().clone(), inp.u.float(), fp32(weights), inp.decode)
    got = bottleneck.add_delta(inp.y.clone(), inp.u, weights, inp.decode)
    check_close(got, expected, dtype, f"bottleneck {name}")
    scratch = inp.y.clone()
    reference_ms = timer(lambda: reference.add_delta(scratch, inp.u, weights, inp.decode))
    ms = timer(lambda: bottleneck.add_delta(scratch, inp.u, weights, inp.decode))
    num_bytes = lora_bytes(shape, rank, slot_ids, inp.u.element_size())
    bytes_per_s = num_bytes / (ms / 1e3)
    return dict(
        op="bottleneck",
        shape=name,
        in_features=in_features,
        out_features=out_features,
        rank=rank,
        batch=batch,
        pattern=pattern,
        distinct=len(popularity_counts(pattern, batch, num_adapters)),
        activation=activation.name.lower(),
        dtype=str(dtype).removeprefix("torch."),
        triton_ms=ms,
        reference_ms=reference_ms,
        bytes=num_bytes,
        gb_per_s=bytes_per_s / 1e9,
        fraction_of_copy=bytes_per_s / copy_bytes_per_s,
        speedup=reference_ms / ms,
    )


def bench_bottleneck(args: argparse.Namespace, copy_bytes_per_s: float) -> list[dict]:
    """Every activation once at rank 16, 8 adapters in a uniform mix, on the three shapes."""
    batches = [1, 64] if args.quick else [1, 16, 64, 256]
    rows = []
    print_header("bottleneck")
    for name in BOTTLENECK_SHAPES:
        for batch in batches:
            for activation in Activation:
                row = bench_bottleneck_case(name, batch, activation, args.dtype, copy_bytes_per_s)
                print_row(row)
                rows.append(row)
        torch.cuda.empty_cache()
    return rows


def ia3_inputs(
    d: int,
    slot_ids: torch.Tensor,
    dtype: torch.dtype,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, d), vectors (S, d) around 1, slot_ids (T,) on device."""
    g = torch.Generator(device=device).manual_seed(seed)
    S = int(slot_ids.max()) + 1
    x = torch.randn(slot_ids.shape[0], d, generator=g, device=device).to(dtype)
    vectors = (1 + 0.1 * torch.randn(S, d, generator=g, device=device)).to(dtype)
    return x, vectors, slot_ids.to(device)


def ia3_bytes(x: torch.Tensor, vectors: torch.Tensor, slot_ids: torch.Tensor) -> int:
    """x read, out written, each distinct adapter's vector read once."""
    adapters = int(torch.unique(slot_ids[slot_ids >= 0]).numel())
    return (2 * x.numel() + adapters * vectors.shape[1]) * x.element_size()


def bench_ia3_case(
    d: int,
    batch: int,
    dtype: torch.dtype,
    copy_bytes_per_s: float,
    num_adapters: int = 8,
    pattern: str = "uniform",
    device: str | torch.device = "cuda",
    timer: Timer = time_ms,
) -> dict:
    x, vectors, slot_ids = ia3_inputs(
        d, popularity_slots(pattern, batch, num_adapters), dtype, device
    )
    rows = AdapterBatch.build(slot_ids.tolist(), vectors.shape[0], device=device)
    expected = reference.ia3_scale(x.float(), vectors.float(), rows)
    check_close(ia3.ia3_scale(x, vectors, rows), expected, dtype, f"ia3 d{d}")
    reference_ms = timer(lambda: reference.ia3_scale(x, vectors, rows))
    ms = timer(lambda: ia3.ia3_scale(x, vectors, rows))
    num_bytes = ia3_bytes(x, vectors, slot_ids)
    bytes_per_s = num_bytes / (ms / 1e3)
    return dict(
        op="ia3",
        shape=f"d{d}",
        d=d,
        batch=batch,
        pattern=pattern,
        distinct=len(popularity_counts(pattern, batch, num_adapters)),
        dtype=str(dtype).removeprefix("torch."),
        triton_ms=ms,
        reference_ms=reference_ms,
        bytes=num_bytes,
        gb_per_s=bytes_per_s / 1e9,
        fraction_of_copy=bytes_per_s / copy_bytes_per_s,
        speedup=reference_ms / ms,
    )


def bench_ia3(args: argparse.Namespace, copy_bytes_per_s: float) -> list[dict]:
    """Hidden (4096) and intermediate (11008) widths; 8 adapters in a uniform mix."""
    batches = [1, 64, 256] if args.quick else [1, 4, 16, 64, 256]
    rows = []
    print_header("ia3")
    for d in (4096, 11008):
        for batch in batches:
            row = bench_ia3_case(d, batch, args.dtype, copy_bytes_per_s)
            print_row(row)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# End to end: our model and scheduler, Llama-2-7B-shaped, random bf16 weights.
# ---------------------------------------------------------------------------------------------

E2E_RUNS = ("base", "lora64", "mixed")
E2E_ADAPTERS, E2E_RANK, E2E_VIRTUAL_TOKENS = 64, 16, 16
E2E_MIXED_KINDS = ("lora", "series", "parallel", "prefix", "prompt", "ia3")


def llama2_7b_args():
    from adapterserve.server.model.llama import ModelArgs

    return ModelArgs(
        vocab_size=32000,
        dim=4096,
        intermediate_size=11008,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
    )


def build_random_model(model_args, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """Our Transformer on the meta device, materialized on `device`, random weights, fused."""
    from adapterserve.server.model.llama import Transformer, rope_inv_freq

    with torch.device("meta"):
        model = Transformer(model_args)
    model = model.to(dtype=dtype).to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=g)
        model.inv_freq = rope_inv_freq(model_args).float().to(device)  # a non-persistent buffer
    model.fuse(cpu=device == "cpu")
    # as the engine's bootstrap does: layers start on the CPU table (reference attention and
    # KV writes), so without this a CUDA model would time the reference, not the Triton kernels
    model.use_ops(ops_for(device))
    return model


def e2e_kinds(run: str) -> tuple[str, ...] | None:
    """The adapter kinds an e2e run spreads over E2E_ADAPTERS adapters (None: base model)."""
    runs = {"base": None, "lora64": ("lora",), "mixed": E2E_MIXED_KINDS}
    if run not in runs:
        raise ValueError(f"unknown e2e run {run!r}; choose from {E2E_RUNS}")
    return runs[run]


def build_pool(model_args, kinds: tuple[str, ...], num_adapters: int, dtype, device):
    """AdapterPool with `num_adapters` random adapters, kind kinds[i % len(kinds)] in slot i."""
    from adapterserve.adapters.kinds import kind_for
    from adapterserve.adapters.pool import AdapterPool

    fp = fingerprint_of(model_args)
    pool = AdapterPool(fp, num_adapters, E2E_RANK, device, dtype)
    for slot in range(num_adapters):
        kind = kinds[slot % len(kinds)]
        spec = random_spec(f"{kind}-{slot}", kind, fp, E2E_RANK, E2E_VIRTUAL_TOKENS, seed=slot)
        kind_for(spec.kind).load(pool, slot, spec)
    return pool


def step_forward(model, cache, concurrency: int, max_len: int, pool=None, compiled: bool = False):
    """plan -> logits as Engine._forward does: a BatchBuilder over the cache, and with
    `compiled` the compiled decode step for decode-only plans (on CUDA: padded buckets captured
    as CUDA graphs, captured on each bucket's first use)."""
    from adapterserve.server.engine.batch import BatchBuilder
    from adapterserve.server.model.compiled import CompiledDecode, buckets_for

    device = next(model.parameters()).device
    buckets = buckets_for(device, concurrency) if compiled else None
    builder = BatchBuilder(
        max_num_seqs=concurrency,
        max_num_batched_tokens=concurrency * max_len,
        block_size=cache.block_size,
        max_blocks_per_seq=math.ceil(max_len / cache.block_size),
        trash_block=cache.trash_block,
        num_adapter_slots=pool.num_slots if pool is not None else 1,
        device=device,
        full_width=buckets is not None,
    )
    decode = CompiledDecode(model, cache, builder, buckets) if compiled else None

    def forward(plan):
        if decode is not None and plan.num_decodes == len(plan.work):
            return decode.forward(builder.build(plan, decode.pad_to(plan.num_decodes), dense=True))
        return model(builder.build(plan), cache)

    return forward


def run_decode(
    model,
    cache,
    concurrency: int,
    prompt_len: int,
    output_len: int,
    block_size: int,
    num_blocks: int,
    pool=None,
    seed: int = 0,
    forward=None,
) -> dict:
    """Admit `concurrency` random prompts at once, decode greedily to `output_len` tokens each.
    With a `pool`, sequence i uses the adapter in slot i % num_slots, bound as the engine binds
    it (slot ids for the hook points, prefix K/V placed at admission, prompt embeddings).

    Drives Scheduler + (by default, eager) step_forward as Engine.step does (no HTTP, no
    detokenizer)."""
    from adapterserve.adapters.kinds import kind_for
    from adapterserve.adapters.spec import AdapterKind
    from adapterserve.server.engine.kv_cache import BlockAllocator
    from adapterserve.server.engine.sampling import SamplingParams
    from adapterserve.server.engine.scheduler import Scheduler, Sequence

    def admit_prefix(seq: Sequence) -> None:  # as ModelRunner.write_prefix does
        slots = seq.cache_slots(range(seq.num_virtual), block_size)
        flat = torch.tensor(slots, dtype=torch.long, device=cache.k.device)
        kind_for(AdapterKind.PREFIX).admit(seq.binding, cache, flat)

    budget = concurrency * (prompt_len + E2E_VIRTUAL_TOKENS)
    sched = Scheduler(BlockAllocator(num_blocks, block_size), concurrency, budget)
    max_len = E2E_VIRTUAL_TOKENS + prompt_len + output_len
    forward = forward or step_forward(model, cache, concurrency, max_len, pool)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    seqs = []
    for i, prompt in enumerate(
        torch.randint(100, model.args.vocab_size, (concurrency, prompt_len), generator=g).tolist()
    ):
        seq = Sequence(f"r{i}", prompt, params, "bench", None)
        if pool is not None:
            slot = i % pool.num_slots
            nvt = E2E_VIRTUAL_TOKENS if pool.kinds[slot].value in ("prefix", "prompt") else 0
            seq.bind(kind_for(pool.kinds[slot]).bind(pool, slot, nvt))
        seqs.append(seq)
        sched.add(seq)
    prefill_s, decode_steps, decode_tokens, step_ms = 0.0, 0, 0, []
    while sched.has_work():
        step = sched.schedule()
        assert step is not None and not step.preempted, "the KV cache is too small for this run"
        is_decode = step.num_decodes == len(step.work)
        for seq in step.prefix_writes:
            admit_prefix(seq)
        start = time.perf_counter()
        logits = forward(step)
        tokens = logits.argmax(-1).tolist()  # syncs, as the engine's sampling does
        elapsed = time.perf_counter() - start
        if is_decode:
            decode_steps, decode_tokens = decode_steps + 1, decode_tokens + len(step.work)
            step_ms.append(elapsed * 1e3)
        else:
            prefill_s += elapsed
        row = 0
        for seq, n in step.work:
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(tokens[row])
                row += 1
                if len(seq.output_ids) >= output_len:
                    sched.remove(seq)
    decode_s = sum(step_ms) / 1e3
    return dict(
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_steps=decode_steps,
        decode_tokens=decode_tokens,
        decode_tok_s=decode_tokens / decode_s if decode_s else None,
        median_step_ms=statistics.median(step_ms) if step_ms else None,
        total_tok_s=concurrency * output_len / (prefill_s + decode_s),
        outputs=[seq.output_ids for seq in seqs],
    )


def bench_e2e(args: argparse.Namespace, device: str = "cuda") -> list[dict]:
    """Decode tok/s at a fixed concurrency: base model only, then each adapter run (E2E_RUNS)
    with the pool's hooks on the model, as ratios to the base run measured in the same process,
    eager and (with --e2e-compile) through the compiled decode step (CUDA graphs per batch
    bucket), each mode's ratios against its own base run, plus compiled / eager. `changed` is
    the share of sequences whose greedy output differs from the base run's: a check that the
    adapters act at all (it should be close to 1). With --e2e-quantization, the whole set again
    for each weight-only mode (the random projections quantized int8 / int4, the head int8, as
    `--quantization` serves them), `vs_none` against the same run and mode unquantized."""
    rows: list[dict] = []
    for quantization in getattr(args, "e2e_quantization", None) or ["none"]:
        rows += _bench_e2e(args, device, quantization, rows)
    return rows


def check_quant_layers(device: str) -> None:
    """Before the first quantized decode on a device: each weight-only layer (int8 per channel,
    int4 groups of 32, group-scaled int8 as GGUF's Q8_0 is served) at 1 and 32 rows against x @
    W^T in fp32 over its own dequantized weights. The bound, 2**-6 of the output's scale, is
    bf16's (activations and scales rounded to bf16, 2**-9 each, plus the output's rounding)
    with room for accumulation order; a wrong packing or layout misses it by orders of
    magnitude. Raises on a miss, so no number is reported for a broken kernel."""
    from adapterserve.server.model.quant import (
        Int4Codes,
        Int4Linear,
        Int8Codes,
        Int8GroupLinear,
        Int8Linear,
    )

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=g)
    grouped = Int8Codes(
        torch.randint(-128, 128, (256, 512), generator=g, dtype=torch.int8),
        torch.rand(256, 16, generator=g) * 1e-2,
        32,
    )
    at = torch.device(device)
    int8, int4 = Int8Codes.quantize(weight), Int4Codes.quantize(weight)
    layers = {
        "int8": (Int8Linear.of(int8, None, at), int8),
        "int4": (Int4Linear(int4, None, at), int4),
        "int8 group 32 (Q8_0)": (Int8GroupLinear(grouped, None, at), grouped),
    }
    for name, (layer, source) in layers.items():
        w = source.dequantize()  # the codes' own weights, computed without the kernel
        errors = []
        for rows in (1, 32):
            x = torch.randn(rows, 512, generator=g)
            want = x.bfloat16().float() @ w.t()
            got = layer(x.to(at)).float().cpu()
            errors.append(((got - want).abs().max() / want.abs().max()).item())
        if max(errors) > 2**-6:
            raise AssertionError(
                f"{name} on {device}: relative error {max(errors):.2e} > {2**-6:.2e}"
            )
        print(
            f"quantized layer {name} on {device}: max relative error {max(errors):.1e} (bound {2**-6:.1e})"
        )


# A run's logits through the device's ops against the reference ops on the same model, cache
# and adapters, relative to the logits' scale. Summation order over 32 bf16 layers stays far
# below it; a kernel reading the wrong slot, layout or block misses it by an order of magnitude.
E2E_CHECK_BOUND = 2.0**-4


def check_e2e(
    model,
    cache,
    pool,
    device: str,
    concurrency: int,
    prompt_len: int,
    block_size: int,
    num_blocks: int,
    what: str,
) -> float:
    """Before a run is timed: its first two steps (prefill, one decode) through ops_for(device)
    (Triton on CUDA) vs the PyTorch reference, up to 6 sequences (every kind of a mixed run).
    Raises on a miss, so no number is reported for a broken step; returns the relative error."""
    from adapterserve import kernels

    sequences = min(concurrency, len(E2E_MIXED_KINDS))
    max_len = E2E_VIRTUAL_TOKENS + prompt_len + 2

    def logits_with(ops) -> list[torch.Tensor]:
        model.use_ops(ops)
        forward, seen = step_forward(model, cache, sequences, max_len, pool), []

        def recording(step):
            logits = forward(step)
            seen.append(logits.float().cpu())
            return logits

        run_decode(
            model, cache, sequences, prompt_len, 2, block_size, num_blocks, pool, forward=recording
        )
        return seen

    device_ops = kernels.ops_for(device)
    try:
        want = logits_with(kernels.Ops(False))
    finally:
        model.use_ops(device_ops)
    got = logits_with(device_ops)
    # the decode step compares only when the prefill chose the same tokens
    steps = 2 if torch.equal(got[0].argmax(-1), want[0].argmax(-1)) else 1
    error = max(
        ((g - w).abs().max() / w.abs().max().clamp(min=1e-6)).item()
        for g, w in zip(got[:steps], want[:steps], strict=True)
    )
    if not error <= E2E_CHECK_BOUND:
        raise AssertionError(
            f"e2e {what} on {device}: logits through {device_ops} vs the reference: "
            f"relative error {error:.2e} > {E2E_CHECK_BOUND:.2e}"
        )
    print(
        f"e2e {what} on {device}: logits vs the reference ops, relative error {error:.1e} "
        f"(bound {E2E_CHECK_BOUND:.1e})",
        flush=True,
    )
    return error


def time_int8_paths(
    device: str,
    rows_list=(1, 4, 16, 64, 256, 1024),
    features: int = 4096,
    timer: Callable[[Callable[[], object]], float] = time_ms,
) -> list[dict]:
    """One 7B-shaped (4096 x 4096) int8 layer: torch's weight-only kernel vs the bf16 matmul over
    weights dequantized for the call (what Int8Linear runs on CUDA from CUDA_DEQUANT_ROWS rows)
    vs plain bf16, by rows; ms per call. Where the kernel stops winning is CUDA_DEQUANT_ROWS."""
    from adapterserve.server.model.quant import CUDA_DEQUANT_ROWS, Int8Linear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(features, features, generator=g)
    layer = Int8Linear.quantize(weight.to(device))
    dense = layer.dequantize().to(device, torch.bfloat16)
    table = []
    for rows in rows_list:
        x = torch.randn(rows, features, generator=g).to(device, torch.bfloat16)
        kernel = timer(
            lambda x=x: torch.ops.aten._weight_int8pack_mm(x, layer.codes, layer.kernel_scales)
        )
        dequantized = timer(lambda x=x: layer._dequantized_mm(x))
        bf16 = timer(lambda x=x: x @ dense.t())
        table.append(
            {
                "rows": rows,
                "int8_kernel_ms": kernel,
                "int8_dequantized_ms": dequantized,
                "bf16_ms": bf16,
                "path": "dequantized"
                if rows >= CUDA_DEQUANT_ROWS and device == "cuda"
                else "kernel",
            }
        )
        print(
            f"int8 layer {features}x{features} on {device}, {rows} rows: kernel {kernel:.3f} ms, "
            f"dequantized {dequantized:.3f} ms, bf16 {bf16:.3f} ms (served: {table[-1]['path']})",
            flush=True,
        )
    return table


def _bench_e2e(
    args: argparse.Namespace, device: str, quantization: str, earlier: list[dict]
) -> list[dict]:
    from adapterserve.adapters.hooks import PoolHooks
    from adapterserve.server.model.llama import KVCache

    concurrency, prompt_len = args.e2e_concurrency, args.e2e_prompt_len
    output_len, block_size = args.e2e_output_len, 16
    dtype = getattr(args, "e2e_dtype", torch.bfloat16)
    runs = list(dict.fromkeys(["base", *args.e2e_runs]))  # the ratios need the base run first
    kinds = {run: e2e_kinds(run) for run in runs}  # unknown runs fail before the model is built
    model_args = getattr(args, "e2e_model_args", None) or llama2_7b_args()
    num_adapters = getattr(args, "e2e_adapters", E2E_ADAPTERS)
    model = build_random_model(model_args, dtype, device)
    if quantization != "none":
        if not earlier or all(r.get("quantization") == "none" for r in earlier):
            check_quant_layers(device)  # once, before the first quantized run
        if quantization == "int8" and device == "cuda":
            time_int8_paths(device)  # where torch's naive CUDA int8 kernel loses (issue 28)
        model.quantize(quantization, {}, torch.device(device))  # from the random float weights
    max_len = E2E_VIRTUAL_TOKENS + prompt_len + output_len
    num_blocks = concurrency * math.ceil(max_len / block_size) + concurrency
    cache = KVCache(model_args, num_blocks, block_size, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    modes = ("eager", "compiled") if getattr(args, "e2e_compile", False) else ("eager",)
    unquantized = {
        (r["run"], r["mode"]): r["decode_tok_s"] for r in earlier if r.get("quantization") == "none"
    }
    rows, base, eager = [], {}, {}
    print_header("e2e")
    for run in runs:
        pool = (
            None
            if kinds[run] is None
            else build_pool(model_args, kinds[run], num_adapters, dtype, device)
        )
        model.hooks = None if pool is None else PoolHooks(pool)
        check_e2e(
            model,
            cache,
            pool,
            device,
            concurrency,
            prompt_len,
            block_size,
            num_blocks,
            f"{run} ({quantization})",
        )
        for mode in modes:
            forward = step_forward(model, cache, concurrency, max_len, pool, mode == "compiled")
            # The same run twice: the first compiles (Triton kernels, the compiled step),
            # captures the CUDA graphs and warms the allocator.
            for _ in range(2):
                result = run_decode(
                    model,
                    cache,
                    concurrency,
                    prompt_len,
                    output_len,
                    block_size,
                    num_blocks,
                    pool,
                    forward=forward,
                )
                sync()
            outputs = result.pop("outputs")
            base.setdefault(mode, dict(result, outputs=outputs))
            row = dict(
                op="e2e",
                run=run,
                mode=mode,
                model=f"random, Llama-2-7B-shaped "
                f"({model_args.n_layers} layers, dim {model_args.dim})",
                dtype=str(dtype).removeprefix("torch."),
                quantization=quantization,
                concurrency=concurrency,
                prompt_len=prompt_len,
                output_len=output_len,
                adapters=0 if pool is None else pool.num_slots,
                kinds=",".join(kinds[run] or ()),
                **result,
            )
            row["vs_base"] = result["decode_tok_s"] / base[mode]["decode_tok_s"]
            row["vs_eager"] = result["decode_tok_s"] / eager.setdefault(run, result["decode_tok_s"])
            reference = (
                result["decode_tok_s"] if quantization == "none" else unquantized.get((run, mode))
            )
            row["vs_none"] = None if reference is None else result["decode_tok_s"] / reference
            row["changed"] = sum(
                o != b for o, b in zip(outputs, base[mode]["outputs"], strict=True)
            ) / len(outputs)
            row["aim_met"] = row["vs_base"] >= E2E_AIM if run == "lora64" else None
            print_row(row)
            rows.append(row)
        model.hooks = pool = None
        if device == "cuda":
            torch.cuda.empty_cache()
    del model, cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


BENCHES: dict[str, Callable[[argparse.Namespace, float], list[dict]]] = {
    "lora": bench_lora,
    "bottleneck": bench_bottleneck,
    "ia3": bench_ia3,
    "attention": bench_attention,
    "e2e": lambda args, copy_bytes_per_s: bench_e2e(args),
}

# Per op: (row key, header, width, format); a None value prints "-".
_TIME = [("triton_ms", "triton ms", 9, ".4f"), ("reference_ms", "ref ms", 9, ".4f")]
_BW = [
    ("gb_per_s", "GB/s", 7, ".0f"),
    ("fraction_of_copy", "/copy", 6, ".2f"),
    ("speedup", "speedup", 8, ".1f"),
]
TABLES: dict[str, list[tuple[str, str, int, str]]] = {
    "lora": [
        ("shape", "shape", 7, ""),
        ("rank", "r", 3, ""),
        ("batch", "T", 4, ""),
        ("pattern", "pattern", 9, ""),
        ("distinct", "adp", 4, ""),
        ("variant", "variant", 9, ""),
        ("dispatched", "used", 4, ""),
        *_TIME,
        *_BW,
        ("aim_met", "aim", 5, ""),
    ],
    "bottleneck": [
        ("shape", "shape", 10, ""),
        ("activation", "act", 9, ""),
        ("rank", "r", 3, ""),
        ("batch", "T", 4, ""),
        ("distinct", "adp", 4, ""),
        *_TIME,
        *_BW,
    ],
    "ia3": [("d", "d", 6, ""), ("batch", "T", 4, ""), ("distinct", "adp", 4, ""), *_TIME, *_BW],
    "attention": [
        ("heads", "H", 3, ""),
        ("kv_heads", "kvh", 3, ""),
        ("batch", "batch", 5, ""),
        ("context", "ctx", 6, ""),
        ("num_splits", "splits", 6, ""),
        ("triton_ms", "triton ms", 9, ".3f"),
        ("single_pass_ms", "1-pass ms", 9, ".3f"),
        ("reference_ms", "ref ms", 9, ".3f"),
        *_BW,
    ],
    "e2e": [
        ("run", "run", 6, ""),
        ("mode", "mode", 8, ""),
        ("quantization", "quant", 5, ""),
        ("concurrency", "conc", 5, ""),
        ("prompt_len", "prompt", 6, ""),
        ("output_len", "output", 6, ""),
        ("adapters", "adp", 4, ""),
        ("decode_tok_s", "decode tok/s", 12, ".0f"),
        ("median_step_ms", "step ms", 8, ".2f"),
        ("total_tok_s", "total tok/s", 11, ".0f"),
        ("prefill_s", "prefill s", 9, ".3f"),
        ("vs_base", "vs base", 7, ".2f"),
        ("vs_eager", "/eager", 6, ".2f"),
        ("vs_none", "/none", 6, ".2f"),
        ("changed", "changed", 7, ".2f"),
        ("aim_met", "aim", 5, ""),
    ],
}


def print_header(op: str) -> None:
    cols = TABLES[op]
    print(f"\n== {op}")
    print(" ".join(f"{header:>{width}}" for _, header, width, _ in cols))


def format_row(row: dict) -> str:
    cells = []
    for key, _, width, fmt in TABLES[row["op"]]:
        value = row.get(key)
        if value is None:
            text = "-"
        elif key == "dispatched":
            text = "*" if value else ""
        elif isinstance(value, bool):
            text = "ok" if value else "MISS"
        else:
            text = format(value, fmt)
        cells.append(f"{text:>{width}}")
    return " ".join(cells)


def print_row(row: dict) -> None:
    print(format_row(row), flush=True)


def print_aims(op: str, rows: list[dict]) -> None:
    """One line: how many rows of the variant the public op dispatches meet the decode aims."""
    decode = [r for r in rows if r.get("aim_met") is not None]
    if decode:
        met = sum(r["aim_met"] for r in decode)
        aims = (
            f">= {DECODE_AIM_FRACTION:.0%} of copy and >= {DECODE_AIM_SPEEDUP:.0f}x the reference"
        )
        print(f"{op} decode aims ({aims}): met in {met} of {len(decode)} dispatched cases")


def parse_ops(values: list[str]) -> list[str]:
    """--ops accepts `lora,ia3`, `lora ia3` or both; keeps the given order, drops repeats."""
    ops = [op for value in values for op in value.split(",") if op]
    unknown = [op for op in ops if op not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown --ops {unknown}; choose from {', '.join(BENCHES)}")
    return list(dict.fromkeys(ops))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ops_help = f"comma- or space-separated, from {','.join(BENCHES)} (default: all)"
    ap.add_argument("--ops", nargs="+", default=list(BENCHES), help=ops_help)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    e2e_help = "adapter runs after the base run (always run: it is the ratios' denominator)"
    ap.add_argument(
        "--e2e-runs", nargs="+", choices=E2E_RUNS, default=list(E2E_RUNS), help=e2e_help
    )
    ap.add_argument("--e2e-concurrency", type=int, default=32)
    ap.add_argument(
        "--e2e-quantization",
        nargs="+",
        choices=("none", "int8", "int4"),
        default=["none"],
        help="e2e: weight-only modes to run (none first for /none)",
    )
    ap.add_argument("--e2e-prompt-len", type=int, default=128)
    ap.add_argument("--e2e-output-len", type=int, default=128)
    ap.add_argument(
        "--e2e-compile",
        action="store_true",
        help="also run each e2e configuration through the compiled decode step",
    )
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "kernels.json")
    args = ap.parse_args()
    args.ops = parse_ops(args.ops)
    if not torch.cuda.is_available():
        sys.exit(
            "bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "on CPU, run the kernel tests instead: pytest tests/kernels"
        )
    args.dtype = DTYPES[args.dtype]
    copy_bytes_per_s = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bytes_per_s / 1e9:.0f} GB/s"
    )
    rows = [row for op in args.ops for row in BENCHES[op](args, copy_bytes_per_s)]
    meta = dict(
        device=torch.cuda.get_device_name(),
        copy_gb_per_s=copy_bytes_per_s / 1e9,
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=str(args.dtype).removeprefix("torch."),
        quick=args.quick,
        ops=args.ops,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
