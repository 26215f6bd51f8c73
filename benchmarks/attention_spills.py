"""Registers and spills of the paged decode attention kernel, compiled for sm_90a with no GPU.

Triton compiles to PTX here; its bundled ptxas (`-v`) reports each configuration's registers
per thread, stack frame and spill stores / loads, the numbers that decide a launch config before
a GPU is ever lent. Prints a table per (GQA group, head_dim, BLOCK_N, num_warps) and writes JSON.

    TRITON_INTERPRET= .venv/bin/python benchmarks/attention_spills.py            # the sweep
    TRITON_INTERPRET= .venv/bin/python benchmarks/attention_spills.py --chosen   # launch_config's

TRITON_INTERPRET must be unset (the interpreter has no compiler to ask).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = (1, 2, 4, 8)
HEAD_DIMS = (64, 128)


def compile_stats(
    group: int, head_dim: int, block_n: int, num_warps: int, dtype: str = "bf16"
) -> dict:
    """ptxas's report for _paged_decode_kernel (single pass) at one configuration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adapterserve.kernels import attention

    kernel = attention._paged_decode_kernel
    pointer_types = {"block_tables_ptr": "*i64", "context_lens_ptr": "*i64", "lse_ptr": "*fp32"}
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointer_types.get(p.name, f"*{dtype}")
        else:
            signature[p.name] = "fp32" if p.name == "qk_scale" else "i32"
    constexprs = {
        "BLOCK_G": triton.next_power_of_2(group),
        "BLOCK_N": block_n,
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "SPLIT": False,
    }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        done = subprocess.run(
            [
                str(ptxas),
                "-v",
                "--gpu-name",
                "sm_90a",
                str(ptx),
                "-o",
                str(Path(tmp) / "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {report[-2000:]}")
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    stack, stores, loads = map(
        int,
        re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report
        ).groups(),
    )
    return {
        "group": group,
        "head_dim": head_dim,
        "block_n": block_n,
        "num_warps": num_warps,
        "registers": registers,
        "stack_bytes": stack,
        "spill_stores": stores,
        "spill_loads": loads,
    }


def chosen() -> list[dict]:
    """What attention.launch_config picks for each group and head_dim."""
    from adapterserve.kernels.attention import launch_config

    rows = []
    for group in GROUPS:
        for head_dim in HEAD_DIMS:
            _, block_n, _, warps = launch_config(group, head_dim)
            rows.append(compile_stats(group, head_dim, block_n, warps) | {"chosen": True})
    return rows


def sweep() -> list[dict]:
    from adapterserve.kernels.attention import TILE_ELEMENTS, launch_config

    rows = []
    for group in GROUPS:
        for head_dim in HEAD_DIMS:
            picked = launch_config(group, head_dim)
            for block_n in (8, 16, 32, 64):
                if group * block_n * head_dim > 2 * TILE_ELEMENTS:
                    continue
                for warps in (4, 8):
                    row = compile_stats(group, head_dim, block_n, warps)
                    rows.append(row | {"chosen": (block_n, warps) == (picked[1], picked[3])})
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| group | head_dim | BLOCK_N | warps | registers | stack B | spill stores B | "
        "spill loads B | launch_config |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['group']} | {r['head_dim']} | {r['block_n']} | {r['num_warps']} | "
            f"{r['registers']} | {r['stack_bytes']} | {r['spill_stores']} | "
            f"{r['spill_loads']} | {'yes' if r['chosen'] else ''} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chosen", action="store_true", help="only launch_config's configurations")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "attention_spills.json")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = chosen() if args.chosen else sweep()
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
