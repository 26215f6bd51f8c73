"""Triton paged decode attention against the PyTorch reference.

CPU through TRITON_INTERPRET=1 by default; `TRITON_INTERPRET=0 pytest ...` runs natively on a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from adapterserve.kernels import attention, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
# fp32: both paths accumulate in fp32 and differ only in summation order (measured ~2e-7).
# fp16/bf16: both accumulate in fp32 from the same rounded inputs, so they differ by at most one
# ulp of the output after the final rounding (fp16: 2**-10 relative, bf16: 2**-7; measured: 0 and
# exactly one bf16 ulp). Outputs are convex combinations of V ~ N(0, 1), so |out| stays below ~2
# and atol = two ulps at 1.0 plus rtol = one ulp covers it.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}


def make_inputs(
    context_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random q and a paged cache whose blocks are scattered in a larger pool.

    Blocks no sequence uses hold NaN, and each table row is padded with two extra columns of junk
    pointing at those NaN blocks, so a kernel that reads past ceil(ctx / block_size) blocks fails.
    Returns q, k_cache, v_cache (NaN in unused blocks), block_tables, context_lens, and clean
    copies of the caches (zeros in unused blocks) for the reference.
    """
    g = torch.Generator().manual_seed(seed)
    used = [math.ceil(n / block_size) for n in context_lens]
    width = max(used) + 2
    num_blocks = 2 * sum(used) + 3
    order = torch.randperm(num_blocks, generator=g)
    live, dead = order[: sum(used)], order[sum(used) :]
    tables = dead[torch.randint(len(dead), (len(context_lens), width), generator=g)]
    for s, blocks in enumerate(live.split(used)):
        tables[s, : len(blocks)] = blocks
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_clean, v_clean = (torch.randn(shape, generator=g) for _ in range(2))
    k_clean[dead], v_clean[dead] = 0.0, 0.0
    k_cache, v_cache = k_clean.clone(), v_clean.clone()
    k_cache[dead], v_cache[dead] = float("nan"), float("nan")
    q = torch.randn(len(context_lens), heads, head_dim, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int64)
    on = lambda t: t.to(DEVICE, dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return tuple(on(t) for t in (q, k_cache, v_cache, tables, lens, k_clean, v_clean))


def check_against_reference(
    context_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    num_splits: int = 1,
) -> None:
    q, k_cache, v_cache, tables, lens, k_clean, v_clean = make_inputs(
        context_lens, heads, kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    out = attention.paged_decode_attention_split(
        q, k_cache, v_cache, tables, lens, scale, num_splits
    )
    expected = reference.paged_decode_attention(q, k_clean, v_clean, tables, lens, scale)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "kernel read a block beyond the sequence's context"
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (3, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_gqa_and_block_sizes(heads: int, kv_heads: int, block_size: int) -> None:
    # 1 token, exact block multiples (16, 32) and non-multiples, mixed in one batch.
    check_against_reference([1, 16, 7, 32, 21], heads, kv_heads, 16, block_size)


@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_head_dims(head_dim: int) -> None:
    check_against_reference([5, 40, 12], 6, 2, head_dim, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (6, 2, 24)])
def test_half_dtypes(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    check_against_reference([3, 16, 29], heads, kv_heads, head_dim, 4, dtype)


@pytest.mark.parametrize(
    "num_splits,dtype",
    [(2, torch.float32), (3, torch.float32), (8, torch.float32), (3, torch.bfloat16)],
    ids=["2-fp32", "3-fp32", "8-fp32", "3-bf16"],
)
def test_split_keys(num_splits: int, dtype: torch.dtype) -> None:
    # 8 splits of a 40-key table leave empty splits for the short sequences.
    check_against_reference([1, 40, 17, 8], 6, 2, 24, 4, dtype, num_splits)


def test_many_query_heads_per_kv_head() -> None:
    check_against_reference([9, 33], 16, 1, 16, 8)


def test_strided_query_like_fused_qkv() -> None:
    """llama.py passes q as a view of the fused (T, H + 2 * kvh, d) projection."""
    q, k_cache, v_cache, tables, lens, k_clean, v_clean = make_inputs([4, 19], 4, 2, 16, 4)
    qkv = torch.cat([q, torch.randn(2, 4, 16, device=DEVICE)], dim=1)  # (S, H + 2 * kvh, d)
    q_view = qkv[:, :4]
    out = attention.paged_decode_attention(q_view, k_cache, v_cache, tables, lens, 0.25)
    expected = reference.paged_decode_attention(q, k_clean, v_clean, tables, lens, 0.25)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_rejects_non_power_of_two_block_size() -> None:
    q, k_cache, v_cache, tables, lens, *_ = make_inputs([3], 2, 2, 16, 3)
    with pytest.raises(AssertionError, match="power of two"):
        attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)


def loop_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per-sequence fp64 attention, materializing K/V by walking the block table token by token."""
    S, H, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(S, H, d, dtype=torch.float64)
    for s in range(S):
        n = int(lens[s])
        slots = [(int(tables[s, i // block_size]), i % block_size) for i in range(n)]
        keys = torch.stack([k_cache[b, p] for b, p in slots]).double()  # (n, kvh, d)
        values = torch.stack([v_cache[b, p] for b, p in slots]).double()
        for h in range(H):
            kv = h // (H // kv_heads)
            weights = torch.softmax(keys[:, kv] @ q[s, h].double() * scale, dim=0)  # (n,)
            out[s, h] = weights @ values[:, kv]
    return out


@pytest.mark.parametrize("heads,kv_heads,block_size", [(4, 4, 1), (6, 2, 4), (3, 1, 16)])
def test_reference_matches_python_loop(heads: int, kv_heads: int, block_size: int) -> None:
    q, _, _, tables, lens, k_clean, v_clean = make_inputs(
        [1, 16, 7, 33], heads, kv_heads, 24, block_size
    )
    q, k_clean, v_clean, tables, lens = (t.cpu() for t in (q, k_clean, v_clean, tables, lens))
    expected = loop_attention(q, k_clean, v_clean, tables, lens, 0.2)
    out = reference.paged_decode_attention(q, k_clean, v_clean, tables, lens, 0.2)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_the_launch_configs_compile_for_sm90_without_spills(tmp_path):
    """Each (GQA group, head_dim) launch_config picks, compiled for sm_90a here (Triton's PTX,
    its bundled ptxas -v; no GPU), has no register spills: at 4 warps the MHA d128 tile spilled
    1140 bytes per thread."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend to compile for")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_spills.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "spills.json"
    done = subprocess.run(
        [sys.executable, "-P", str(script), "--chosen", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["group"], r["head_dim"]) for r in rows} == {
        (g, d) for g in (1, 2, 4, 8) for d in (64, 128)
    }
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
