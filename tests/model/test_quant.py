"""Weight-only quantized base (server/model/quant.py, gguf_quant.py).

Layers: each against a float64 formula over the *same* codes and the kernel's own inputs
(activations and scales rounded to bfloat16, as the kernels take them): what is left is fp32
accumulation order and the bf16 rounding of the output, bounded by 2**-8 relative to the
output's scale. GGUF: Q4_1 read as it ships dequantizes bit for bit to transformers' reader.
Models: a quantized engine against the float engine on the dequantized weights (the same
effective weights), over every adapter kind, teacher-forced so that no sampled divergence hides
or causes a difference; and the default model served as it ships against transformers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterserve.server.config import Settings
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.model import quant
from adapterserve.server.model.quant import (
    COMPUTE_DTYPE,
    Int4Codes,
    Int4Linear,
    Int8Linear,
    quantize_group,
)
from tests.engine.conftest import serve

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: a rounded value is within 2**-9, twice that
# covers the output rounding plus the fp32-accumulated products' own error at these sizes


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T in float64 from x as the kernel sees it (bf16)."""
    return x.to(COMPUTE_DTYPE).double() @ weight.double().t()


def within_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
    err = ((got.double() - want) / scale).abs().max().item()
    assert err <= BF16_EPS, f"relative error {err:.2e} > {BF16_EPS:.2e}"


@pytest.mark.parametrize("path", ["kernel", "dequantized"])
@pytest.mark.parametrize("rows", [1, 3, 16, 33])
def test_int8_layer_equals_its_dequantized_weights(rows, path, monkeypatch):
    """Both int8 paths: torch's weight-only kernel, and the bf16 matmul over weights dequantized
    for the call that long CUDA prefills take (forced here on the CPU)."""
    monkeypatch.setattr(quant, "dequantizes", lambda device_type, rows: path == "dequantized")
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 160, generator=g), torch.randn(96, generator=g)
    layer = Int8Linear.quantize(weight, bias)
    assert layer.codes.dtype == torch.int8 and layer.codes.abs().max() == 127
    effective = layer.codes.double() * layer.kernel_scales.double()[:, None]  # bf16 scales
    if path == "dequantized":  # its weights are bf16: each code x scale rounded once
        effective = effective.to(torch.bfloat16).double()
    assert (layer.dequantize() - weight).abs().max() <= layer.scales.max() / 2 + 1e-6  # rounding
    x = torch.randn(rows, 160, generator=g)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    within_bf16(got - bias, reference(x, effective))


def test_int8_takes_cuda_s_naive_kernel_only_for_a_few_rows():
    """torch's CUDA int8 weight-only kernel is one thread per output: prefill chunks go through
    dequantized bf16 weights on CUDA; the CPU kernel (a real one) serves every size."""
    limit = quant.CUDA_DEQUANT_ROWS
    assert not quant.dequantizes("cuda", 1) and not quant.dequantizes("cuda", limit - 1)
    assert quant.dequantizes("cuda", limit) and quant.dequantizes("cuda", 4096)
    assert not any(quant.dequantizes("cpu", rows) for rows in (1, limit, 4096))


@pytest.mark.parametrize(("rows", "group"), [(1, 32), (5, 64), (16, 32), (40, 128)])
def test_int4_layer_equals_its_dequantized_weights(rows, group):
    g = torch.Generator().manual_seed(rows + group)
    weight = torch.randn(80, 256, generator=g)
    source = Int4Codes.quantize(weight, group)
    layer = Int4Linear(source)
    assert torch.equal(layer.codes(), source.codes)  # packed and unpacked, every code kept
    assert torch.equal(layer.dequantize(), source.dequantize())
    assert (source.dequantize() - weight).abs().max() <= source.scales.max() / 2 + 1e-5
    sz = layer.scales_and_zeros.double()  # (in/g, out, 2): the kernel's bf16 scales and zeros
    q = source.codes.double().view(80, -1, group)
    effective = ((q - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(80, 256)
    x = torch.randn(rows, 256, generator=g)
    within_bf16(layer(x), reference(x, effective))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_fused_group_and_its_parts_agree(mode):
    """The fused q|k|v layer's output columns are the per-target layers' outputs (the split
    path of input-side adapters computes those)."""
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(n, 64, generator=g) for n in (64, 32, 32)]
    biases = [torch.randn(n, generator=g) for n in (64, 32, 32)]
    fused, parts = quantize_group(weights, biases, mode, torch.device("cpu"))
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)


def test_bad_int4_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        Int4Codes.quantize(torch.randn(8, 48), 32)
    with pytest.raises(ValueError, match="group size"):
        Int4Codes.quantize(torch.randn(8, 64), 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear(Int4Codes.quantize(torch.randn(24, 64), 32))


# ---------------------------------------------------------------- GGUF as it ships


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    from adapterserve.server.model.weights import ModelLoadError, default_model_path

    try:
        return default_model_path()
    except ModelLoadError as exc:
        pytest.skip(f"the default model is not installed: {exc}")


def test_q4_1_projections_dequantize_bit_for_bit_to_transformers(default_gguf, default_model_dir):
    """Every Q4_1 projection read as int4 codes, (q - 8) * d + (m + 8 d), equals what
    transformers' GGUF reader wrote for it (d * q + m, q/k rows un-permuted) exactly."""
    from adapterserve.server.model.gguf_quant import projection_types, read_int4

    codes = read_int4(default_gguf)
    assert len(codes) == sum(t == "Q4_1" for t in projection_types(default_gguf).values()) == 210
    tensors = load_file(str(default_model_dir / "model.safetensors"))
    for name, source in codes.items():
        assert torch.equal(source.dequantize(), tensors[f"model.{name}.weight"].float()), name


# ---------------------------------------------------------------- engines


def dequantized_copy(base_dir: Path, out: Path, mode: str) -> Path:
    """`base_dir` with every projection (and the LM head, int8) replaced by its quantized
    weights dequantized: a float model whose weights a quantized engine holds exactly."""
    shutil.copytree(base_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    for key, value in tensors.items():
        if key.endswith("proj.weight"):
            source = Int4Codes.quantize(value) if mode == "int4" else Int8Linear.quantize(value)
            tensors[key] = source.dequantize().contiguous()
        elif key == "lm_head.weight":
            tensors[key] = Int8Linear.quantize(value).dequantize().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    return out


def prompt_logprobs(settings: Settings, cases: list[tuple[str | None, list[int]]]):
    """Each case's prompt log-probs (teacher forced), all requests at once."""

    async def one(engine, model, ids):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        async for out in engine.add_request(ids, params, model):
            if out.prompt_logprobs:
                return torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
        raise AssertionError("no prompt logprobs")

    async def go(engine):
        return await asyncio.gather(*[one(engine, m, ids) for m, ids in cases])

    results, engine = serve(settings, go)
    assert engine.model.quantization == settings.quantization or settings.quantization == "auto"
    return results


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tests.engine.test_adapters_engine import Adapters

    return Adapters(tmp_path_factory.mktemp("quant-adapters"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_adapter_kind_on_a_quantized_base_equals_the_dequantized_base(
    adapters, tmp_path, mode
):
    """Base and every kind, mixed in one batch: the quantized engine's prompt log-probs equal
    the float engine's on the dequantized weights within the bf16 rounding of each matmul's
    inputs and output (2 layers here: a few 1e-3 nats); and the quantized engine gives each
    request the same log-probs in the mixed batch as alone (rows are independent in the
    weight-only kernels)."""
    from tests.engine.test_adapters_engine import prompt

    base = dequantized_copy(adapters.base_dir, tmp_path / "deq", mode)
    names = [None, *adapters.names]
    cases = [(m, prompt(400 + i, 12 + i, adapters.vocab)) for i, m in enumerate(names)]

    def settings(quantization: str, sub: str) -> Settings:
        return adapters.settings(tmp_path / sub, model=str(base), quantization=quantization)

    floats = prompt_logprobs(settings("none", "f"), cases)
    mixed = prompt_logprobs(settings(mode, "q"), cases)
    for (name, _), want, got in zip(cases, floats, mixed, strict=True):
        assert (got - want).abs().max().item() < 0.02, (name, (got - want).abs().max().item())
    for case, got in zip(cases, mixed, strict=True):
        [alone] = prompt_logprobs(settings(mode, "a"), [case])
        torch.testing.assert_close(alone, got, rtol=0, atol=1e-6)


def test_the_default_model_served_as_it_ships(default_gguf, default_model_dir, tmp_path):
    """The embedded GGUF, --quantization auto on CPU: Q4_1 projections as int4, the head
    (tied: the file's Q8_0 embeddings) int8 with its block scales. Against transformers in fp32
    on the dequantized weights (the same codes: only bf16 scales and activations differ),
    teacher-forced log-probs of a chat prompt. The
    bound is the dtype's own: our layers take bf16 inputs, so the yardstick is transformers
    computing the same prompt in bfloat16 end to end, whose gap to its fp32 run we measure here
    (0.29 nats at most, 0.06 on average, on this prompt); ours must stay within 1.5x of it. The
    greedy continuation is reported with the point where it leaves transformers'."""

    from adapterserve.server.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model_dir)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Name three colors of the sea."}])
    settings = Settings(device="cpu", quantization="auto", cache_dir=tmp_path, compile="off")

    async def go(engine):
        from gguf import GGUFReader

        from adapterserve.server.model.gguf_quant import int8_blocks
        from adapterserve.server.model.quant import Int8GroupLinear

        assert engine.model.quantization == "int4"
        embd = next(
            t for t in GGUFReader(str(default_gguf)).tensors if t.name == "token_embd.weight"
        )
        assert isinstance(engine.model.head, Int8GroupLinear)
        assert torch.equal(engine.model.head.int8_codes().codes, int8_blocks(embd.data).codes)
        params = SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=0)
        tokens, logprobs = [], None
        async for out in engine.add_request(ids, params):
            tokens += out.token_ids
            logprobs = out.prompt_logprobs or logprobs
        return tokens, torch.tensor([e.logprob for e in logprobs[1:]])

    (tokens, ours), _ = serve(settings, go)
    hf = within_transformers_bf16_gap(ours, default_model_dir, ids, "int4")
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    same = next(
        (
            i
            for i, (a, b) in enumerate(zip(tokens, greedy[0, len(ids) :].tolist(), strict=False))
            if a != b
        ),
        len(tokens),
    )
    print(f"greedy equal to transformers' for {same} of {len(tokens)} tokens")
    assert same >= 4


def within_transformers_bf16_gap(ours: torch.Tensor, model_dir: Path, ids: list[int], label: str):
    """`ours` (teacher-forced log-probs of ids[1:]) against transformers fp32 on `model_dir`:
    the gap, max and mean, at most 1.5x transformers' own bf16 run's gap to its fp32 run (the
    dtype's yardstick). Returns the fp32 model."""
    from transformers import AutoModelForCausalLM

    runs, models = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        models[dtype] = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        with torch.no_grad():
            logits = (
                models[dtype](input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            )
        runs[dtype] = logits.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    want = runs[torch.float32]
    gap, yardstick = (ours - want).abs(), (runs[torch.bfloat16] - want).abs()
    print(
        f"{label} gap to fp32 max {gap.max():.4f} mean {gap.mean():.4f}; transformers bf16 max "
        f"{yardstick.max():.4f} mean {yardstick.mean():.4f}"
    )
    assert gap.max() <= 1.5 * yardstick.max() and gap.mean() <= 1.5 * yardstick.mean()
    return models[torch.float32]


@pytest.mark.parametrize(
    ("flag", "message"),
    [("int3", "quantization"), ("fp8", "quantization")],
)
def test_a_bad_quantization_value_is_one_line_and_exit_2(flag, message, tmp_path):
    run = subprocess.run(
        [sys.executable, "-P", "-m", "adapterserve.server.cli", "serve", "--quantization", flag],
        capture_output=True,
        text=True,
        timeout=120,
        env={"ADAPTERSERVE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len([line for line in run.stderr.splitlines() if line.strip()]) <= 2, run.stderr


def test_the_model_card_shows_the_quantization(tmp_path):
    from fastapi.testclient import TestClient

    from adapterserve.server.main import create_app
    from tests.helpers import make_tiny_llama

    model = make_tiny_llama(tmp_path / "m", seed=2)
    settings = Settings(
        model=str(model), device="cpu", cache_dir=tmp_path / "c", quantization="int8"
    )
    with TestClient(create_app(settings)) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["quantization"] == "int8"
    assert json.loads((model / "config.json").read_text())["hidden_size"] == card["hidden_size"]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_int4_blocks_dequantize_bit_for_bit_to_gguf_py(kind):
    """Q4_0 and Q4_1 blocks made by gguf-py's own quantizer (the reader transformers uses):
    our codes, scales and zeros dequantize to exactly what gguf-py dequantizes them to, and an
    Int4Linear made from them keeps every code."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from adapterserve.server.model.gguf_quant import int4_blocks

    kind_id = GGMLQuantizationType[kind]
    weights = np.random.default_rng(3).standard_normal((48, 128)).astype(np.float32) * 0.05
    raw = quantize(weights, kind_id)
    codes = int4_blocks(raw, kind)
    assert torch.equal(codes.dequantize(), torch.from_numpy(dequantize(raw, kind_id)))
    assert torch.equal(Int4Linear(codes).codes(), codes.codes)


def test_q4_k_blocks_dequantize_bit_for_bit_to_gguf_py():
    """Q4_K super-blocks of random bytes (finite fp16 d and dmin, every 6-bit scale and min
    and nibble drawn): our codes, scales and zeros dequantize to exactly what gguf-py's
    reader does, and an Int4Linear made from them keeps every code."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from adapterserve.server.model.gguf_quant import int4_blocks

    rng = np.random.default_rng(11)
    rows, supers = 32, 3  # 768 inputs
    raw = rng.integers(0, 256, (rows, supers, 144), dtype=np.uint8)
    d = (rng.random((rows, supers, 2)) * [1e-3, 1e-3]).astype(np.float16)
    raw[..., 0:4] = d.view(np.uint8).reshape(rows, supers, 4)
    raw = raw.reshape(rows, -1)
    codes = int4_blocks(raw, "Q4_K")
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_K))
    assert codes.codes.shape == (rows, 768) and int(codes.codes.max()) <= 15
    assert torch.equal(codes.dequantize(), want)
    assert torch.equal(Int4Linear(codes).codes(), codes.codes)


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF" + bytes(60)])
def test_an_unreadable_gguf_is_one_line_and_exit_2(content, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    run = subprocess.run(
        [sys.executable, "-P", "-m", "adapterserve.server.cli", "serve", "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"ADAPTERSERVE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert "Traceback" not in run.stderr and len(lines) <= 2, run.stderr
    assert "broken.gguf" in run.stderr


def test_quantized_codes_are_cached_and_the_next_start_reuses_them(tmp_path, monkeypatch):
    """The first int8 / int4 start of a float checkpoint writes its codes under cache_dir;
    the next start of the same files builds the same layers from them without quantizing
    anything; new weights get a new file."""
    from adapterserve.server.model.quant import Int8Codes
    from adapterserve.server.model.weights import load_model
    from tests.helpers import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "m", seed=4)
    cpu = torch.device("cpu")
    for mode in ("int8", "int4"):
        first = load_model(model_dir, cpu, torch.float32, mode, None, tmp_path / "cache")
        [cached] = (tmp_path / "cache" / "quantized").glob(f"*-{mode}-*.safetensors")

        def refuse(*_a, **_k):
            raise AssertionError("quantized again instead of reading the cache")

        with monkeypatch.context() as patch:
            patch.setattr(Int8Codes, "quantize", refuse)
            patch.setattr(Int4Codes, "quantize", refuse)
            second = load_model(model_dir, cpu, torch.float32, mode, None, tmp_path / "cache")
        for a, b in (
            (first.layers[1].self_attn.wqkv, second.layers[1].self_attn.wqkv),
            (first.layers[0].mlp.w2, second.layers[0].mlp.w2),
            (first.head, second.head),
        ):
            x = torch.randn(3, a.in_features)
            assert torch.equal(a(x), b(x)) and torch.equal(a.dequantize(), b.dequantize())
        assert second.quantization == mode and cached.stat().st_size > 0
        if mode == "int4":  # two codes a byte on disk
            from safetensors import safe_open

            with safe_open(str(cached), framework="pt") as f:
                stored = f.get_tensor("layers.0.mlp.down_proj.codes")
            assert stored.shape[1] * 2 == first.layers[0].mlp.w2.in_features
    make_tiny_llama(tmp_path / "m2", seed=5)
    shutil.copy(tmp_path / "m2" / "model.safetensors", model_dir / "model.safetensors")
    load_model(model_dir, cpu, torch.float32, "int8", None, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "quantized").glob("*-int8-*.safetensors"))) == 2


# ---------------------------------------------------------------- Q8_0 as it ships


def test_q8_0_blocks_dequantize_bit_for_bit_to_gguf_py():
    """Q8_0 blocks made by gguf-py's quantizer and of random bytes (every int8 code, -128
    included): our group-scaled codes dequantize to exactly what gguf-py does; the layer keeps
    every code in its two int4 planes and equals a float64 formula over the same codes and the
    kernel's bf16 scales within the bf16 bound."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from adapterserve.server.model.gguf_quant import int8_blocks
    from adapterserve.server.model.quant import Int8GroupLinear

    rng = np.random.default_rng(12)
    made = quantize(
        rng.standard_normal((48, 128)).astype(np.float32) * 0.05, GGMLQuantizationType.Q8_0
    )
    drawn = rng.integers(0, 256, (32, 5, 34), dtype=np.uint8)
    drawn[..., 0:2] = (rng.random((32, 5, 1)) * 1e-2).astype(np.float16).view(np.uint8)
    for raw in (made, drawn.reshape(32, -1)):
        codes = int8_blocks(raw)
        assert codes.group_size == 32 and codes.scales.shape == (raw.shape[0], raw.shape[1] // 34)
        assert torch.equal(
            codes.dequantize(), torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0))
        )
        layer = Int8GroupLinear(codes)
        assert torch.equal(layer.int8_codes().codes, codes.codes)  # both planes, every code
        assert torch.equal(layer.dequantize(), codes.dequantize())
        out_features, in_features = codes.codes.shape
        sz = layer.scales_and_zeros.double()  # (2 in / 32, out, 2): the planes' bf16 scales, zeros
        planes = layer.codes().double().view(out_features, -1, 32)
        both = ((planes - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(
            out_features, -1
        )
        effective = both[:, :in_features] + both[:, in_features:]
        assert int(codes.codes.min()) < -64 and int(codes.codes.max()) > 64
        for rows in (1, 7, 16):
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
            within_bf16(layer(x), reference(x, effective))


def test_a_fused_group_with_a_q8_0_part_keeps_its_block_scales():
    """q|k|v where one part is Q8_0 and the others float: the fused layer is group-scaled,
    the Q8_0 part's codes and scales are kept exactly, the float parts get per-channel int8
    (repeated per group: the same weights), and fused == its parts."""
    from adapterserve.server.model.quant import Int8Codes, Int8GroupLinear

    g = torch.Generator().manual_seed(13)
    q8 = Int8Codes(
        torch.randint(-127, 128, (64, 64), generator=g, dtype=torch.int8),
        torch.rand(64, 2, generator=g) * 1e-2,
        32,
    )
    floats = [torch.randn(32, 64, generator=g) for _ in range(2)]
    fused, parts = quantize_group([q8, *floats], [None] * 3, "int8", torch.device("cpu"))
    assert isinstance(fused, Int8GroupLinear) and all(isinstance(p, Int8GroupLinear) for p in parts)
    assert torch.equal(parts[0].dequantize(), q8.dequantize())
    assert torch.equal(parts[1].dequantize(), Int8Linear.quantize(floats[0]).dequantize())
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)


def two_layer_q8_0_gguf(source: Path, out: Path) -> Path:
    """The default GGUF cut to its first two blocks, with their projections re-quantized to
    Q8_0 by gguf-py (everything else, tokenizer included, copied as it is)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from adapterserve.server.model.gguf_quant import TARGETS

    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), arch="llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        value = 2 if field.name == "llama.block_count" else field.contents()
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= 2:
            continue
        data = np.asarray(tensor.data)
        if parts[0] == "blk" and parts[2] in TARGETS:
            floats = dequantize(data, tensor.tensor_type)
            writer.add_tensor(
                tensor.name,
                quantize(floats, GGMLQuantizationType.Q8_0),
                raw_dtype=GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_a_q8_0_gguf_is_served_as_it_ships(default_gguf, tmp_path):
    """A Q8_0 GGUF (the default model cut to two blocks, projections in Q8_0): `auto` serves
    it int8 with every projection's codes and block scales as the file has them (no per-channel
    re-rounding), the head too (the file's Q8_0 embeddings), and its teacher-forced log-probs
    stay within the bf16 yardstick of transformers reading the same file (fp32 vs bf16, as for
    the int4 default model)."""
    from gguf import GGUFReader

    from adapterserve.server.model.gguf_quant import int8_blocks
    from adapterserve.server.model.quant import Int8GroupLinear
    from adapterserve.server.model.weights import resolve_model_dir

    path = two_layer_q8_0_gguf(default_gguf, tmp_path / "two-q8.gguf")
    raw = {t.name: t.data for t in GGUFReader(str(path)).tensors}
    ids = list(range(1000, 1040))
    settings = Settings(
        model=str(path), device="cpu", quantization="auto", cache_dir=tmp_path / "c", compile="off"
    )

    async def go(engine):
        model = engine.model
        assert model.quantization == "int8" and len(model.layers) == 2
        assert isinstance(model.layers[1].mlp.w2, Int8GroupLinear)
        down = int8_blocks(raw["blk.1.ffn_down.weight"])  # not permuted: compare as read
        assert torch.equal(model.layers[1].mlp.w2.int8_codes().codes, down.codes)
        assert torch.equal(model.layers[1].mlp.w2.scales8, down.scales)
        assert isinstance(model.head, Int8GroupLinear)  # tied: the file's Q8_0 embeddings
        assert torch.equal(
            model.head.int8_codes().codes, int8_blocks(raw["token_embd.weight"]).codes
        )
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        async for out in engine.add_request(ids, params):
            if out.prompt_logprobs:
                return torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])

    ours, _ = serve(settings, go)
    within_transformers_bf16_gap(ours, resolve_model_dir(str(path), tmp_path / "c"), ids, "Q8_0")


def test_group_scaled_int8_codes_survive_the_cache(tmp_path):
    """The codes cache keeps Q8_0's block scales (and per-channel int8 stays per channel)."""
    from adapterserve.server.model.quant import Int8Codes
    from adapterserve.server.model.weights import _read_codes, _write_codes

    g = torch.Generator().manual_seed(14)
    grouped = Int8Codes(
        torch.randint(-128, 128, (16, 64), generator=g, dtype=torch.int8),
        torch.rand(16, 2, generator=g),
        32,
    )
    channel = Int8Codes.quantize(torch.randn(16, 64, generator=g))
    _write_codes(tmp_path / "c.safetensors", {"a": grouped, "b": channel})
    back = _read_codes(tmp_path / "c.safetensors")
    assert back["a"].group_size == 32 and back["b"].group_size is None
    for name, codes in (("a", grouped), ("b", channel)):
        assert torch.equal(back[name].codes, codes.codes) and torch.equal(
            back[name].scales, codes.scales
        )
