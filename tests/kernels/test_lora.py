"""Triton LoRA shrink / expand (per-token for decode rows, segmented for prefill chunks) against
plain per-token fp64 loops, on NaN-padded pools (reading beyond a rank would show), and the
dispatch point."""

from __future__ import annotations

import pytest
import torch

from adapterserve import kernels
from tests.kernels.helpers import (
    DEVICE,
    LAYOUTS,
    PATTERNS,
    TOLERANCES,
    loop_expand,
    loop_shrink,
    make_weights,
    poison_padding,
    randn,
    step_rows,
)

IN = 50  # not a multiple of any block size
SLICE_SIZES, SLICE_OFFSETS, Y_WIDTH = [40, 24, 24], [0, 48, 76], 103  # q/k/v-like, with gaps
FP32 = TOLERANCES[torch.float32]
T = 29


def case(pattern: str, layout: str, n: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weights = make_weights(n, IN, max(SLICE_SIZES), dtype, gen)
    u = randn(T, IN, dtype=dtype, gen=gen)  # (T, in)
    return u, weights, step_rows(pattern, layout, T, weights.a.shape[1], gen)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_shrink_matches_loop(triton_module, poison_allocations, pattern, layout) -> None:
    u, weights, batch = case(pattern, layout, 1, torch.float32, seed=4)
    got = triton_module("lora").lora_shrink(u, poison_padding(weights), batch)  # (1, T, R)
    expected = loop_shrink(u, weights, batch.slot_ids.tolist())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), expected, **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shrink_dtypes_and_slices(triton_module, poison_allocations, layout, dtype) -> None:
    u, weights, batch = case("with_base", layout, 2, dtype, seed=5)
    got = triton_module("lora").lora_shrink(u, poison_padding(weights), batch)  # (2, T, R)
    expected = loop_shrink(u, weights, batch.slot_ids.tolist())
    # fp16/bf16 inputs, fp32 products and accumulation: only the summation order differs
    torch.testing.assert_close(got.double().cpu(), expected, **FP32)


def check_expand(lora, pattern: str, layout: str, dtype: torch.dtype, seed: int) -> None:
    u, weights, batch = case(pattern, layout, 3, dtype, seed)
    slot_ids = batch.slot_ids.tolist()
    h = loop_shrink(u, weights, slot_ids).float().to(DEVICE)  # (3, T, R)
    y0 = randn(T, Y_WIDTH, dtype=dtype, gen=torch.Generator().manual_seed(seed + 1))
    expected = loop_expand(y0, h, weights, slot_ids, SLICE_OFFSETS, SLICE_SIZES)
    ids = batch.slot_ids
    h_poisoned = h.clone()
    h_poisoned[:, ids < 0] = float("nan")  # base-model rows must never be read
    for i, row in enumerate(weights.ranks.tolist()):
        for s, r in enumerate(row):
            h_poisoned[i, ids == s, r:] = float("nan")  # nor columns beyond the rank
    y = y0.clone()
    out = lora.lora_expand(
        y, h_poisoned, poison_padding(weights), batch, SLICE_OFFSETS, SLICE_SIZES
    )
    assert out is y  # in place
    torch.testing.assert_close(y.double().cpu(), expected, **TOLERANCES[dtype])
    base = ids < 0
    assert torch.equal(y[base], y0[base]), "tokens with slot -1 were modified"
    gaps = torch.ones(Y_WIDTH, dtype=torch.bool)
    for off, size in zip(SLICE_OFFSETS, SLICE_SIZES, strict=True):
        gaps[off : off + size] = False
    assert torch.equal(y[:, gaps.to(DEVICE)], y0[:, gaps.to(DEVICE)]), "columns outside slices"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_expand_matches_loop(triton_module, pattern, layout) -> None:
    check_expand(triton_module("lora"), pattern, layout, torch.float32, seed=6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_expand_dtypes(triton_module, layout, dtype) -> None:
    check_expand(triton_module("lora"), "with_base", layout, dtype, seed=7)


def test_empty_batch(triton_module) -> None:
    lora = triton_module("lora")
    gen = torch.Generator().manual_seed(8)
    weights = make_weights(1, IN, 40, torch.float32, gen)
    batch = kernels.AdapterBatch.build([], weights.a.shape[1], device=DEVICE)
    h = lora.lora_shrink(torch.zeros(0, IN, device=DEVICE), weights, batch)
    assert h.shape == (1, 0, weights.a.shape[2])
    lora.lora_expand(torch.zeros(0, 40, device=DEVICE), h, weights, batch, [0], [40])


def test_shapes_are_checked(triton_module) -> None:
    u, weights, batch = case("uniform", "decode", 1, torch.float32, seed=9)
    with pytest.raises(ValueError, match="expected u"):
        triton_module("lora").lora_shrink(u[:, :10], weights, batch)


def test_dispatch_follows_environment(triton_module, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.ops_for / the module-level ops pick Triton or the reference from the device and
    ADAPTERSERVE_KERNELS, read at each call."""
    u, weights, batch = case("uniform", "decode", 1, torch.float32, seed=10)
    calls = []
    bottleneck = triton_module("bottleneck")
    real = bottleneck.add_delta
    monkeypatch.setattr(bottleneck, "add_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = randn(T, max(SLICE_SIZES), dtype=torch.float32, gen=torch.Generator().manual_seed(1))
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    assert kernels.ops_for(DEVICE).triton
    via_triton = kernels.add_delta(y.clone(), u, weights, batch)
    assert calls == [1]
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    via_reference = kernels.add_delta(y.clone(), u, weights, batch)
    assert calls == [1] and not kernels.ops_for(DEVICE).triton
    torch.testing.assert_close(via_triton, via_reference, **FP32)
    monkeypatch.delenv("ADAPTERSERVE_KERNELS")
    assert kernels.ops_for(DEVICE).triton == (DEVICE == "cuda")
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="got 'cuda'"):
        kernels.ops_for(DEVICE)


def test_slice_tensors_are_never_evicted(triton_module) -> None:
    """A captured CUDA graph reads the per-slice offset tensors by address: the cache that owns
    them must keep every one for the life of the process, however many layouts pass through."""
    lora = triton_module("lora")
    first = lora._slice_tensors((0, 64), (64, 32), torch.device("cpu"))
    for n in range(1, 400):  # more layouts than any bounded cache of a few hundred keeps
        lora._slice_tensors((0, n), (n, 7), torch.device("cpu"))
    again = lora._slice_tensors((0, 64), (64, 32), torch.device("cpu"))
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert [t.tolist() for t in again] == [[0, 64], [64, 32]]


COMPILE_FOR_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adapterserve.kernels import lora

INT_PTRS = {"slot_ids_ptr", "seg_slots_ptr", "seg_starts_ptr", "seg_counts_ptr", "order_ptr",
            "ranks_ptr", "act_ptr"}
out = {}
for name in sys.argv[1:]:
    kernel = getattr(lora, name)
    signature, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = {"HAS_ACTIVATION": True, "NATIVE_DOT": False}.get(p.name, 16)
        elif p.name.endswith("_ptr"):
            signature[p.name] = ("*i32" if p.name in INT_PTRS else
                                 "*i64" if p.name in ("offsets_ptr", "sizes_ptr") else "*fp32")
        else:
            signature[p.name] = "i32"  # every stride fits int32; a product of two need not
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    out[name] = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
json.dump(out, sys.stdout)
"""
SLOT_STRIDES = {  # kernel -> the strides a slot index and a slice index multiply
    "_shrink_per_token_kernel": ("stride_as", "stride_an"),
    "_shrink_segmented_kernel": ("stride_as", "stride_an"),
    "_expand_per_token_kernel": ("stride_bs", "stride_bn"),
    "_expand_segmented_kernel": ("stride_bs", "stride_bn"),
}


def test_slot_offsets_are_int64_in_the_compiled_kernels(triton_module, tmp_path) -> None:
    """slot * stride passes 2^31 for a large stack (an lm_head LoRA: slot 224 of a
    (1, S, 64, 150k) B stack). The interpreter computes in int64, so only the code Triton
    compiles for a GPU shows the width: each kernel is compiled for sm_90 here (no GPU needed)
    and its TTIR must multiply those strides in int64, never in int32."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    triton_module("lora")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run(
        [sys.executable, "-P", "-c", COMPILE_FOR_SM90, *SLOT_STRIDES],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ttir = json.loads(done.stdout)
    for kernel, strides in SLOT_STRIDES.items():
        lines = ttir[kernel].splitlines()
        for stride in strides:
            narrow = [
                line
                for line in lines
                if "arith.muli" in line and f"%{stride} " in line and ": i32" in line
            ]
            assert not narrow, (kernel, narrow)
            assert any(f"arith.extsi %{stride} : i32 to i64" in line for line in lines), kernel
