"""The GPU benchmark's plumbing on CPU: one tiny case per adapter op through the Triton
interpreter (inputs, popularity mixes, bytes-moved arithmetic, correctness check); timing is
replaced by a single call. The numbers themselves need a GPU: benchmarks/bench_kernels.py."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.kernels.conftest import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
COPY_BYTES_PER_S = 1e9


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module
    spec.loader.exec_module(module)
    return module


def one_call(fn) -> float:
    """Stands in for the timer: runs once, reports 1 ms."""
    fn()
    return 1.0


@pytest.mark.parametrize(
    ("pattern", "batch", "pool", "counts"),
    [
        ("distinct", 8, 64, [1] * 8),
        ("distinct", 8, 3, [3, 3, 2]),
        ("uniform", 16, 64, [4, 4, 4, 4]),
        ("uniform", 10, 64, [3, 3, 2, 2]),
        ("skewed", 16, 64, [9, 3, 2, 1, 1]),  # 1, 1, 2, 3, 5 (=12); the 4 left to the largest
        ("skewed", 16, 3, [14, 1, 1]),
        ("identical", 16, 64, [16]),
        ("skewed", 1, 64, [1]),
    ],
)
def test_popularity_mixes(bench, pattern, batch, pool, counts):
    assert bench.popularity_counts(pattern, batch, pool) == counts
    slots = bench.popularity_slots(pattern, batch, pool)
    assert slots.dtype == torch.int32 and slots.shape == (batch,)
    assert torch.bincount(slots.long()).tolist() == counts


def test_lora_bytes(bench):
    shape = bench.LoraShape("t", 32, (16, 8))
    slot_ids = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32)
    # 2 adapters * r4 * (2 slices * 32 in + 24 out) + 4 adapter tokens * (32 + 2 * 24), in bf16
    assert bench.lora_bytes(shape, 4, slot_ids, 2) == (2 * 4 * (64 + 24) + 4 * (32 + 48)) * 2


def test_lora_case(bench):
    shape = bench.LoraShape("tiny_qkv", 40, (24, 8, 8))  # packed, sizes off the block sizes
    rows = bench.bench_lora_case(
        shape, 5, 6, "skewed", 64, torch.bfloat16, COPY_BYTES_PER_S, "cpu", one_call
    )
    assert [r["variant"] for r in rows] == ["decode", "prefill"]
    expected_bytes = bench.lora_bytes(shape, 5, bench.popularity_slots("skewed", 6, 64), 2)
    for row in rows:
        assert row["bytes"] == expected_bytes and row["distinct"] == 3  # counts 3, 1, 2 -> 3
        assert row["gb_per_s"] == pytest.approx(expected_bytes / 1e-3 / 1e9)
        assert row["speedup"] == 1.0
    # decode rows run the per-token kernels, and the decode aims are judged there
    assert [r["dispatched"] for r in rows] == [True, False]
    assert rows[0]["aim_met"] is not None and rows[1]["aim_met"] is None
    assert "MISS" in bench.format_row(rows[0]) or "ok" in bench.format_row(rows[0])


def test_lora_case_single_slice(bench):
    shape = bench.LoraShape("tiny_down", 24, (16,))
    rows = bench.bench_lora_case(
        shape, 4, 3, "distinct", 8, torch.float16, COPY_BYTES_PER_S, "cpu", one_call
    )
    assert len(rows) == 2 and rows[0]["distinct"] == 3


@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_lora_check_catches_a_wrong_kernel(bench, monkeypatch, variant):
    """A kernel that is wrong only for one layout (decode rows: per-token; prefill: segmented)
    is caught, and the error names the layout."""
    lora = importlib.import_module("adapterserve.kernels.lora")
    right_expand = lora.lora_expand

    def wrong_expand(y, h, weights, batch, *args):
        out = right_expand(y, h, weights, batch, *args)
        return out.add_(1.0) if bool(batch.segments) == (variant == "prefill") else out

    monkeypatch.setattr(bench.bottleneck, "lora_expand", wrong_expand)
    shape = bench.LoraShape("tiny_qkv", 16, (8, 4, 4))
    with pytest.raises(AssertionError, match=variant):
        bench.bench_lora_case(
            shape, 4, 3, "uniform", 4, torch.float32, COPY_BYTES_PER_S, "cpu", one_call
        )


def test_bottleneck_case(bench, monkeypatch):
    monkeypatch.setitem(bench.BOTTLENECK_SHAPES, "tiny", (24, 40))
    row = bench.bench_bottleneck_case(
        "tiny",
        4,
        bench.Activation.GELU,
        torch.bfloat16,
        COPY_BYTES_PER_S,
        rank=6,
        device="cpu",
        timer=one_call,
    )
    # uniform over 4 tokens: 2 adapters, each reads down and up at rank 6; every token reads
    # its input and reads and writes its output row (add_delta is in place)
    assert row["distinct"] == 2
    assert row["bytes"] == (2 * 6 * (24 + 40) + 4 * (24 + 2 * 40)) * 2


def test_ia3_case(bench):
    row = bench.bench_ia3_case(40, 5, torch.float16, COPY_BYTES_PER_S, device="cpu", timer=one_call)
    assert row["distinct"] == 3  # ceil(sqrt(5))
    assert row["bytes"] == (2 * 5 * 40 + 3 * 40) * 2


def test_tables_cover_rows(bench):
    assert set(bench.TABLES) == set(bench.BENCHES)
    assert bench.parse_ops(["lora,ia3", "attention", "lora"]) == ["lora", "ia3", "attention"]
    with pytest.raises(SystemExit):
        bench.parse_ops(["nope"])


def test_the_benchmark_model_runs_the_ops_of_its_device(bench, monkeypatch):
    """Layers start on the CPU op table; the engine's bootstrap hands them `ops_for(device)`,
    and so must the benchmark's model, or a CUDA run would time the reference attention and KV
    writes instead of the Triton kernels."""
    from adapterserve.server.model.llama import ModelArgs, Transformer

    handed = []
    monkeypatch.setattr(Transformer, "use_ops", lambda self, ops: handed.append(ops))
    # raising=False: before the fix the module had no ops_for, and the assert below is what fails
    monkeypatch.setattr(bench, "ops_for", lambda device: ("ops for", str(device)), raising=False)
    args = ModelArgs(
        vocab_size=64, dim=16, intermediate_size=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8
    )
    bench.build_random_model(args, torch.float32, device="cpu")
    assert handed == [("ops for", "cpu")]


def test_e2e_decode_plumbing(bench):
    """The e2e driver (random model on meta -> device, scheduler, greedy decode) on a tiny model."""
    from adapterserve.server.model.llama import KVCache, ModelArgs

    args = ModelArgs(
        vocab_size=128,
        dim=32,
        intermediate_size=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
    )
    model = bench.build_random_model(args, torch.float32, device="cpu")
    assert torch.isfinite(model.inv_freq).all() and model.layers[0].self_attn.wqkv is not None
    cache = KVCache(args, 16, 4, torch.float32, "cpu")
    result = bench.run_decode(model, cache, 3, 5, 4, block_size=4, num_blocks=16)
    assert result["decode_steps"] == 3 and result["decode_tokens"] == 9  # token 1 from prefill
    assert result["decode_tok_s"] > 0 and result["total_tok_s"] > 0


def test_e2e_adapter_runs(bench, monkeypatch):
    """base, lora64 and mixed on a tiny model through the reference ops: one row per run, the
    adapter runs as ratios to the base run, and adapters that change the greedy outputs."""
    import argparse

    from adapterserve.server.model.llama import ModelArgs

    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    model_args = ModelArgs(
        vocab_size=128,
        dim=32,
        intermediate_size=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
    )
    args = argparse.Namespace(
        e2e_concurrency=12,
        e2e_prompt_len=5,
        e2e_output_len=6,
        e2e_runs=["mixed", "lora64"],
        e2e_model_args=model_args,
        e2e_adapters=6,
        e2e_dtype=torch.float32,
    )
    rows = bench.bench_e2e(args, device="cpu")
    assert [r["run"] for r in rows] == ["base", "mixed", "lora64"]  # base first: the denominator
    base, mixed, lora64 = rows
    assert base["adapters"] == 0 and base["changed"] == 0 and base["vs_base"] == 1.0
    assert mixed["kinds"] == ",".join(bench.E2E_MIXED_KINDS) and lora64["kinds"] == "lora"
    for row in (mixed, lora64):
        assert row["adapters"] == 6 and row["decode_tokens"] == 12 * 5  # token 1 from prefill
        assert row["vs_base"] == pytest.approx(row["decode_tok_s"] / base["decode_tok_s"])
        assert row["changed"] > 0  # the adapters act on the outputs
    assert lora64["aim_met"] == (lora64["vs_base"] >= bench.E2E_AIM) and mixed["aim_met"] is None


def test_e2e_quantized_runs(bench, monkeypatch):
    """--e2e-quantization none int8 int4: the runs again on the model quantized as served, each
    row naming its mode, /none the ratio to the same unquantized run; the quantized layers are
    really in place."""
    import argparse

    from adapterserve.server.model.llama import ModelArgs
    from adapterserve.server.model.quant import QuantLinear

    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    model_args = ModelArgs(
        vocab_size=128,
        dim=64,
        intermediate_size=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
    )
    built = []
    build = bench.build_random_model
    monkeypatch.setattr(
        bench, "build_random_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    )
    args = argparse.Namespace(
        e2e_concurrency=3,
        e2e_prompt_len=5,
        e2e_output_len=4,
        e2e_runs=["lora64"],
        e2e_model_args=model_args,
        e2e_adapters=3,
        e2e_dtype=torch.float32,
        e2e_quantization=["none", "int8", "int4"],
    )
    rows = bench.bench_e2e(args, device="cpu")
    assert [(r["quantization"], r["run"]) for r in rows] == [
        (q, run) for q in ("none", "int8", "int4") for run in ("base", "lora64")
    ]
    for row in rows:
        assert row["decode_tokens"] == 3 * 3
        want = 1.0 if row["quantization"] == "none" else None
        none = next(r for r in rows if r["quantization"] == "none" and r["run"] == row["run"])
        assert row["vs_none"] == (want or pytest.approx(row["decode_tok_s"] / none["decode_tok_s"]))
    assert [type(m.layers[0].mlp.w13).__name__ for m in built] == [
        "Dense",
        "Int8Linear",
        "Int4Linear",
    ]
    assert all(isinstance(m.head, QuantLinear) for m in built[1:])


def test_e2e_compiled_mode(bench, monkeypatch):
    """--e2e-compile: each run also through the compiled decode step (CPU: no CUDA graphs),
    its ratio to eager reported, and its adapters acting on the outputs."""
    import argparse

    from adapterserve.server.model.llama import ModelArgs

    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "reference")
    model_args = ModelArgs(
        vocab_size=128,
        dim=32,
        intermediate_size=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
    )
    args = argparse.Namespace(
        e2e_concurrency=4,
        e2e_prompt_len=5,
        e2e_output_len=5,
        e2e_runs=["lora64"],
        e2e_model_args=model_args,
        e2e_adapters=4,
        e2e_dtype=torch.float32,
        e2e_compile=True,
    )
    rows = bench.bench_e2e(args, device="cpu")
    assert [(r["run"], r["mode"]) for r in rows] == [
        ("base", "eager"),
        ("base", "compiled"),
        ("lora64", "eager"),
        ("lora64", "compiled"),
    ]
    for row in rows:
        assert row["decode_tokens"] == 4 * 4
        assert row["vs_eager"] == (
            1.0
            if row["mode"] == "eager"
            else pytest.approx(row["decode_tok_s"] / rows[rows.index(row) - 1]["decode_tok_s"])
        )
    assert rows[3]["changed"] > 0  # compiled adapters act too


@pytest.mark.parametrize("kind", ["lora", "series", "parallel", "prefix", "prompt", "ia3"])
def test_random_spec_loads_into_a_pool(bench, kind):
    """Every kind's random spec fits the pool the way parsed adapters do."""
    from adapterserve.adapters.kinds import kind_for
    from adapterserve.adapters.pool import AdapterPool
    from adapterserve.server.model.llama import ModelArgs

    model_args = ModelArgs(
        vocab_size=64, dim=16, intermediate_size=40, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4
    )
    fp = bench.fingerprint_of(model_args)
    spec = bench.random_spec("a", kind, fp, 4, 3, seed=0)
    pool = AdapterPool(fp, 2, 4, "cpu", torch.float32)
    kind_for(spec.kind).load(pool, 1, spec)
    assert pool.kind_of(1).value == kind
    stacks = [
        *pool.post.values(),
        *pool.series_in.values(),
        *pool.series_out.values(),
        *pool.ia3_in.values(),
        *pool.post_scale.values(),
    ]
    if kind in ("prefix", "prompt"):
        assert not stacks and spec.num_virtual_tokens == 3
    else:
        assert stacks and all(1 in s.loaded for s in stacks)


def test_e2e_needs_no_web_stack():
    """The device image has torch and triton but no pydantic or fastapi: the e2e bench (model,
    scheduler, adapter pool) must run without them. Run in a child with them blocked."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import argparse, importlib.util, sys
        for name in ("pydantic", "pydantic_settings", "fastapi", "uvicorn", "multipart"):
            sys.modules[name] = None
        spec = importlib.util.spec_from_file_location("bench_kernels", {str(SCRIPT)!r})
        bench = sys.modules["bench_kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        import torch
        from adapterserve.server.model.llama import ModelArgs
        model_args = ModelArgs(vocab_size=160, dim=16, intermediate_size=40, n_layers=1,
                               n_heads=2, n_kv_heads=1, head_dim=8)
        args = argparse.Namespace(e2e_concurrency=6, e2e_prompt_len=3, e2e_output_len=2,
                                  e2e_runs=["mixed"], e2e_model_args=model_args,
                                  e2e_adapters=6, e2e_dtype=torch.float32)
        rows = bench.bench_e2e(args, device="cpu")
        assert [r["run"] for r in rows] == ["base", "mixed"], rows
        print("E2E-OK")
    """)
    env = {**os.environ, "ADAPTERSERVE_KERNELS": "reference"}
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=SCRIPT.parents[1],
        timeout=300,
    )
    assert "E2E-OK" in done.stdout, done.stderr[-3000:]


def test_the_quantized_layer_check_stops_a_broken_kernel(bench, monkeypatch, capsys):
    """The check before a quantized decode passes the real layers (here on the CPU) and stops
    on one whose kernel computes the wrong thing (its packing read transposed, say)."""
    from adapterserve.server.model.quant import Int4Linear

    bench.check_quant_layers("cpu")
    assert capsys.readouterr().out.count("max relative error") == 3
    real = Int4Linear._mm
    monkeypatch.setattr(Int4Linear, "_mm", lambda self, x, sz=None: real(self, x.flip(-1), sz))
    with pytest.raises(AssertionError, match="int4 on cpu"):
        bench.check_quant_layers("cpu")


def test_the_int8_paths_table_times_each_path_and_names_the_served_one(bench):
    """The GPU run's answer to where torch's naive CUDA int8 kernel loses: here on the CPU with
    a stand-in timer (each path runs once), a small layer."""
    table = bench.time_int8_paths("cpu", rows_list=(1, 32), features=64, timer=one_call)
    assert [row["rows"] for row in table] == [1, 32]
    assert all(
        row[k] == 1.0 for row in table for k in ("int8_kernel_ms", "int8_dequantized_ms", "bf16_ms")
    )
    assert {row["path"] for row in table} == {"kernel"}  # only CUDA takes the dequantized path


def e2e_setup(bench):
    from adapterserve.adapters.hooks import PoolHooks
    from adapterserve.server.model.llama import KVCache, ModelArgs

    args = ModelArgs(
        vocab_size=160,
        dim=32,
        intermediate_size=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
    )
    model = bench.build_random_model(args, torch.float32, device="cpu")
    pool = bench.build_pool(args, bench.E2E_MIXED_KINDS, 6, torch.float32, "cpu")
    model.hooks = PoolHooks(pool)
    block_size, prompt_len = 16, 5
    max_len = bench.E2E_VIRTUAL_TOKENS + prompt_len + 2
    num_blocks = 6 * -(-max_len // block_size) + 6
    cache = KVCache(args, num_blocks, block_size, torch.float32, "cpu")
    return model, cache, pool, (6, prompt_len, block_size, num_blocks)


def test_the_e2e_check_compares_the_triton_step_with_the_reference(bench, monkeypatch):
    """Before an e2e run is timed, its first steps through the device's ops (here Triton, in the
    interpreter) must equal the reference ops' on every kind of a mixed run; a broken kernel
    (attention returning zeros) stops the run."""
    model, cache, pool, sizes = e2e_setup(bench)
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")  # ops_for("cpu") is then Triton
    error = bench.check_e2e(model, cache, pool, "cpu", *sizes, "mixed")
    assert error < 1e-4  # fp32: summation order only
    attention = importlib.import_module("adapterserve.kernels.attention")
    monkeypatch.setattr(attention, "paged_decode_attention", lambda q, *args: torch.zeros_like(q))
    with pytest.raises(AssertionError, match="relative error"):
        bench.check_e2e(model, cache, pool, "cpu", *sizes, "mixed")


def test_the_gpu_script_runs_bounded_stages_in_order_and_keeps_what_finished(tmp_path):
    """benchmarks/run_kernels_gpu.sh with a stand-in interpreter: every stage runs in the
    printed order, QUICK by default; a stage past its time is cut off and the next ones still
    run; the log holds each stage's output as it came."""
    import subprocess

    stub = tmp_path / "python"
    stub.write_text(
        '#!/usr/bin/env bash\necho "bench $*"\nif [[ " $* " == *" lora "* ]]; then sleep 30; fi\n'
    )
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"), "STAGE_TIMEOUT_S": "3"}
    env.pop("QUICK", None)
    done = subprocess.run(
        ["bash", str(SCRIPT.with_name("run_kernels_gpu.sh"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # one stage cut off
    log = (tmp_path / "out" / "gpu_stages.log").read_text()
    order = ["e2e", "quant1", "others", "lora", "quant32", "compiled"]
    assert log.splitlines()[0].startswith(f"GPU stages, in order: {' '.join(order)}")
    starts = [
        line.split()[2]
        for line in log.splitlines()
        if line.startswith("=== stage ")
        and "(" in line
        and "done" not in line
        and "cut off" not in line
    ]
    assert starts == order, log
    assert "=== stage lora cut off at 3 s" in log, log
    assert "=== stage compiled done" in log, log
    benches = [line for line in log.splitlines() if line.startswith("bench ")]
    assert "--ops lora --dtype bfloat16 --quick" in benches[3], benches
    assert "--e2e-quantization none int8 int4" in benches[1] and "--e2e-compile" in benches[-1]
    one = subprocess.run(
        ["bash", str(SCRIPT.with_name("run_kernels_gpu.sh"))],
        env={**env, "STAGE": "nope"},
        capture_output=True,
        text=True,
    )
    assert one.returncode == 2 and "STAGE must be one of" in one.stderr
