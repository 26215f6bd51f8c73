"""Triton kernels vs the PyTorch reference on a CUDA GPU: time per call, bandwidth, speedup.

Each op's bench checks the Triton output against kernels.reference, then times both. Decode ops
are memory-bound, so bandwidth (bytes the op must read and write / time) is reported as a fraction
of a device-to-device copy measured in the same run. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_kernels.py [--ops attention] [--dtype float16] [--quick]
        [--json bench-results/kernels.json]

Adding an op: write bench_<op>(args, copy_bytes_per_s) -> list[dict] of rows (op, shape,
times, bandwidth) and register it in BENCHES; --ops then selects it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import attention, reference  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECK_SEQS = 8  # correctness is checked on the first sequences only: rows are independent
REFERENCE_MEMORY_LIMIT = 24 * 2**30  # skip timing the reference past this (it gathers K/V in fp32)
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}


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
        op="attention", batch=batch, context=context, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, block_size=block_size, dtype=str(dtype).removeprefix("torch."),
        num_splits=num_splits, triton_ms=triton_ms, single_pass_ms=single_ms,
        reference_ms=reference_ms, gb_per_s=bytes_per_s / 1e9,
        fraction_of_copy=bytes_per_s / copy_bytes_per_s,
        speedup=None if reference_ms is None else reference_ms / triton_ms,
    )  # fmt: skip


def bench_attention(args: argparse.Namespace, copy_bytes_per_s: float) -> list[dict]:
    """Llama-2-7B decode shapes (d=128, block 16): MHA (32/32 heads) and GQA (32/8)."""
    batches = [1, 16, 64] if args.quick else [1, 4, 16, 64, 128, 256]
    contexts = [128, 1024] if args.quick else [128, 512, 1024, 2048, 4096]
    rows = []
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


BENCHES: dict[str, Callable[[argparse.Namespace, float], list[dict]]] = {
    "attention": bench_attention,
}


def print_row(row: dict) -> None:
    reference = "-" if row["reference_ms"] is None else f"{row['reference_ms']:.3f}"
    speedup = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
    print(
        f"{row['op']:<10} {row['heads']:>3}/{row['kv_heads']:<3} {row['batch']:>5} {row['context']:>6}"
        f" {row['num_splits']:>6} {row['triton_ms']:>9.3f} {row['single_pass_ms']:>9.3f}"
        f" {reference:>9} {row['gb_per_s']:>8.0f} {row['fraction_of_copy']:>6.2f} {speedup:>8}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ops", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU, run the kernel tests instead: pytest tests/kernels")  # fmt: skip
    args.dtype = DTYPES[args.dtype]
    copy_bytes_per_s = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bytes_per_s / 1e9:.0f} GB/s"
    )
    print(
        f"{'op':<10} {'H/kvh':<7} {'batch':>5} {'ctx':>6} {'splits':>6} {'triton ms':>9}"
        f" {'1-pass ms':>9} {'ref ms':>9} {'GB/s':>8} {'/copy':>6} {'speedup':>8}"
    )
    rows = [row for op in args.ops for row in BENCHES[op](args, copy_bytes_per_s)]
    meta = dict(device=torch.cuda.get_device_name(), copy_gb_per_s=copy_bytes_per_s / 1e9,
                torch=torch.__version__, dtype=str(args.dtype).removeprefix("torch."))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
