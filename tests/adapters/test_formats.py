"""Adapter formats -> AdapterSpec: parity with real peft, LLM-Adapters bottleneck, refusals."""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import logging
import math
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from adapterserve.adapters import formats as adapter_formats
from adapterserve.adapters.formats import MAX_HEADER_BYTES, load_adapter, max_tensors
from adapterserve.adapters.spec import (
    AdapterFormatError,
    AdapterKind,
    BaseFingerprint,
    BottleneckWeights,
    IA3Weights,
    LoraWeights,
)
from adapterserve.kernels import Activation
from tests.adapters.conftest import (
    MAX_RANK,
    TINY,
    bottleneck_config,
    bottleneck_tensors,
    save_peft_adapter,
    tiny_llama,
    write_adapter,
)

SHORT = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def peft_module(model, layer: int, target: str):
    return model.get_submodule(f"base_model.model.model.layers.{layer}.{SHORT[target]}")


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_from_hf_config_and_in_out(fingerprint: BaseFingerprint):
    assert fingerprint == BaseFingerprint(64, 2, 4, 2, 16, 128, 384)
    expected = {
        "q": (64, 64),
        "k": (64, 32),
        "v": (64, 32),
        "o": (64, 64),
        "gate": (64, 128),
        "up": (64, 128),
        "down": (128, 64),
    }
    assert {t: fingerprint.in_out(t) for t in expected} == expected
    explicit = BaseFingerprint.from_hf_config({**TINY, "head_dim": 32})
    assert explicit.head_dim == 32 and explicit.in_out("q") == (64, 128)


# --- parity with real peft ----------------------------------------------------------------------

LORA_CASES = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8-all-rslora": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    "r2-mlp": dict(r=2, lora_alpha=3, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj", "down_proj"],
        rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.o_proj": 6},
        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 5, "o_proj": 12},
    ),
    "patterns-rslora": dict(
        r=16,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["k_proj", "up_proj"],
        rank_pattern={"up_proj": 3},
        alpha_pattern={"k_proj": 9},
    ),
    "layers-to-transform": dict(r=4, target_modules=["q_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("case", LORA_CASES, ids=list(LORA_CASES))
def test_lora_matches_peft(tmp_path: Path, fingerprint: BaseFingerprint, case: str):
    peft = pytest.importorskip("peft")
    directory, model = save_peft_adapter(tmp_path / case, peft.LoraConfig(**LORA_CASES[case]))
    spec = load_adapter(directory, "a", fingerprint, MAX_RANK)
    assert spec.kind is AdapterKind.LORA and spec.name == "a"
    expected = {
        (layer, target): peft_module(model, layer, target)
        for layer in range(fingerprint.num_layers)
        for target in SHORT
        if hasattr(peft_module(model, layer, target), "lora_A")
    }
    assert set(spec.modules) == set(expected)
    for key, module in expected.items():
        weights = spec.modules[key]
        assert isinstance(weights, LoraWeights)
        assert torch.equal(weights.a, module.lora_A["default"].weight), key
        assert torch.equal(weights.b, module.lora_B["default"].weight), key
        assert weights.scaling == pytest.approx(module.scaling["default"], rel=1e-12), key
        assert weights.a.dtype == torch.float32 and weights.a.is_contiguous()
    assert spec.rank == max(module.r["default"] for module in expected.values())
    assert spec.targets == tuple(t for t in SHORT if any(k[1] == t for k in expected))


def test_prefix_matches_peft(tmp_path: Path, fingerprint: BaseFingerprint):
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    directory, model = save_peft_adapter(tmp_path / "prefix", config)
    spec = load_adapter(directory, "p", fingerprint, MAX_RANK)
    assert spec.kind is AdapterKind.PREFIX and spec.num_virtual_tokens == 5
    assert spec.prefix_kv.shape == (2, 2, 5, 2, 16)  # (L, 2, nvt, kvh, d)
    cache = model.get_prompt(batch_size=1)  # peft's own per-layer K/V
    for layer in range(fingerprint.num_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (kvh, nvt, d)
        assert torch.equal(spec.prefix_kv[layer, 0], keys.transpose(0, 1))
        assert torch.equal(spec.prefix_kv[layer, 1], values.transpose(0, 1))


def test_prompt_matches_peft(tmp_path: Path, fingerprint: BaseFingerprint):
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    directory, model = save_peft_adapter(tmp_path / "prompt", config)
    spec = load_adapter(directory, "p", fingerprint, MAX_RANK)
    assert spec.kind is AdapterKind.PROMPT and spec.num_virtual_tokens == 4
    assert torch.equal(spec.prompt_embeddings, model.prompt_encoder["default"].embedding.weight)
    assert spec.size_bytes == 4 * 64 * 4


@pytest.mark.parametrize(
    "targets,feedforward",
    [(["k_proj", "v_proj", "down_proj"], ["down_proj"]), (["v_proj", "up_proj"], ["up_proj"])],
)
def test_ia3_matches_peft(tmp_path: Path, fingerprint: BaseFingerprint, targets, feedforward):
    peft = pytest.importorskip("peft")
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    directory, model = save_peft_adapter(tmp_path / "ia3", config)
    spec = load_adapter(directory, "i", fingerprint, MAX_RANK)
    assert spec.kind is AdapterKind.IA3
    assert len(spec.modules) == len(targets) * fingerprint.num_layers
    for (layer, target), weights in spec.modules.items():
        module = peft_module(model, layer, target)
        assert isinstance(weights, IA3Weights)
        assert torch.equal(weights.vector, module.ia3_l["default"].flatten())
        assert weights.placement == ("input" if module.is_feedforward else "output")


def test_config_paths_and_code_are_ignored(tmp_path: Path, fingerprint: BaseFingerprint):
    """SECURITY row 5: base_model_name_or_path / auto_map are never followed."""
    config, tensors = lora_files(fingerprint)
    config |= {
        "base_model_name_or_path": str(tmp_path / "does-not-exist"),
        "auto_map": {"AutoModel": "evil.Model"},
        "auto_mapping": {"base_model_class": "Evil", "parent_library": "os"},
        "revision": "../../etc",
    }
    spec = load_adapter(write_adapter(tmp_path / "a", config, tensors), "a", fingerprint, 8)
    assert spec.kind is AdapterKind.LORA and spec.rank == 4


# --- LLM-Adapters bottleneck --------------------------------------------------------------------


def test_series_bottleneck(tmp_path: Path, fingerprint: BaseFingerprint):
    targets = {"mlp.gate_proj": (64, 64), "mlp.up_proj": (64, 64), "mlp.down_proj": (64, 64)}
    tensors = bottleneck_tensors(fingerprint, 8, targets)
    config = bottleneck_config(non_linearity="relu", scaling=0.5)
    spec = load_adapter(write_adapter(tmp_path / "s", config, tensors), "s", fingerprint, 8)
    assert spec.kind is AdapterKind.SERIES and spec.rank == 8
    assert spec.targets == ("gate", "up", "down")
    placements = {"gate": "input", "up": "input", "down": "output"}
    for (layer, target), weights in spec.modules.items():
        key = f"base_model.model.model.layers.{layer}.{SHORT[target]}"
        assert isinstance(weights, BottleneckWeights)
        assert torch.equal(weights.down, tensors[f"{key}.adapter_down.weight"])
        assert torch.equal(weights.up, tensors[f"{key}.adapter_up.weight"])
        assert weights.placement == placements[target]
        assert weights.activation is Activation.RELU and weights.scaling == 0.5


@pytest.mark.parametrize(
    "non_linearity,activation",
    [
        ("tanh", Activation.TANH),
        ("gelu", Activation.GELU),
        ("gelu_new", Activation.GELU_TANH),
        ("silu", Activation.SILU),
        ("swish", Activation.SILU),
        ("sigmoid", Activation.SIGMOID),
    ],
)
def test_parallel_bottleneck(tmp_path: Path, fingerprint, non_linearity, activation):
    targets = {
        "self_attn.q_proj": (64, 64),
        "self_attn.v_proj": (64, 32),
        "mlp.down_proj": (128, 64),
    }
    tensors = bottleneck_tensors(fingerprint, 4, targets)
    config = bottleneck_config(
        use_parallel_adapter=True, bottleneck_size=4, non_linearity=non_linearity, scaling=2
    )
    spec = load_adapter(write_adapter(tmp_path / "p", config, tensors), "p", fingerprint, 8)
    assert spec.kind is AdapterKind.PARALLEL and spec.targets == ("q", "v", "down")
    for (_, target), weights in spec.modules.items():
        d_in, d_out = fingerprint.in_out(target)
        assert weights.down.shape == (4, d_in) and weights.up.shape == (d_out, 4)
        assert weights.placement == "parallel" and weights.activation is activation
        assert weights.scaling == 2.0


def test_half_precision_weights_become_fp32(tmp_path: Path, fingerprint: BaseFingerprint):
    config, tensors = lora_files(fingerprint)
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    spec = load_adapter(write_adapter(tmp_path / "a", config, tensors), "a", fingerprint, 8)
    weights = spec.modules[0, "q"]
    assert weights.a.dtype == torch.float32 and weights.scaling == 2.0
    assert spec.size_bytes == 2 * (4 * 64 + 64 * 4) * 4


# --- refusals -----------------------------------------------------------------------------------

Q = "base_model.model.model.layers.{}.self_attn.q_proj"


def lora_files(fingerprint: BaseFingerprint, r: int = 4, hidden: int = 64, **config):
    """A valid hand-written PEFT LoRA: rank r on q_proj of every layer."""
    tensors = {}
    for layer in range(fingerprint.num_layers):
        tensors[f"{Q.format(layer)}.lora_A.weight"] = torch.randn(r, hidden)
        tensors[f"{Q.format(layer)}.lora_B.weight"] = torch.randn(hidden, r)
    base = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    return {**base, **config}, tensors


def lora_dir(path: Path, fingerprint, r: int = 4, hidden: int = 64, tensors=None, **config):
    config, made = lora_files(fingerprint, r, hidden, **config)
    return write_adapter(path, config, made if tensors is None else tensors(made))


def with_tensor(key: str, value):
    return lambda tensors: {**tensors, key: value}


def with_tensors(extra: dict):
    return lambda tensors: {**tensors, **extra}


EMB_A = "base_model.model.model.embed_tokens.lora_embedding_A"
EMB_B = "base_model.model.model.embed_tokens.lora_embedding_B"
HEAD_A = "base_model.model.lm_head.lora_A.weight"
HEAD_B = "base_model.model.lm_head.lora_B.weight"


def poisoned(value: float):
    def poison(tensors):
        tensor = tensors[f"{Q.format(1)}.lora_B.weight"].clone()
        tensor[3, 1] = value
        return {**tensors, f"{Q.format(1)}.lora_B.weight": tensor}

    return poison


def raw_weights(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None):
    """A LoRA dir whose adapter_model.safetensors is written byte by byte (a lying header)."""
    lora_dir(path, BaseFingerprint.from_hf_config(TINY))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    (path / "adapter_model.safetensors").write_bytes(length.to_bytes(8, "little") + raw + data)
    return path


A0 = f"{Q.format(0)}.lora_A.weight"


def truncated_weights(path: Path, fp):
    lora_dir(path, fp)
    (path / "adapter_model.safetensors").write_bytes(b"\1\0")
    return path


def entry(dtype="F32", shape=(4, 64), offsets=(0, 1024)):
    return {A0: {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def text_config(path: Path, text: str):
    lora_dir(path, BaseFingerprint.from_hf_config(TINY))
    (path / "adapter_config.json").write_text(text)
    return path


PICKLE = b"\x80\x04K\x01."  # pickle.dumps(1): never opened, let alone loaded


def pickle_only(name: str):
    """A LoRA whose weights are only a pickle `name` (no adapter_model.safetensors)."""

    def build(path: Path, fp):
        lora_dir(path, fp)
        (path / "adapter_model.safetensors").unlink()
        (path / name).write_bytes(PICKLE)
        return path

    return build


def with_symlink(allowed: str, target: str | None = None):
    """An allow-listed file replaced by a link (to a valid copy of itself, by default)."""

    def build(path: Path, fp):
        lora_dir(path, fp)
        (path / "README.md").write_text("a LoRA")
        real = path.parent / f"real-{allowed}"
        (path / allowed).rename(real)
        (path / allowed).symlink_to(target or real)
        return path

    return build


def as_folder(allowed: str):
    def build(path: Path, fp):
        lora_dir(path, fp)
        (path / allowed).mkdir()
        return path

    return build


def without_weights(path: Path, fp):
    lora_dir(path, fp)
    (path / "adapter_model.safetensors").unlink()
    return path


def bottleneck_dir(path: Path, fp, targets=None, size=8, extra=None, **config):
    targets = targets or {"mlp.up_proj": (64, 64)}
    tensors = bottleneck_tensors(fp, size, targets) | (extra or {})
    return write_adapter(path, bottleneck_config(bottleneck_size=size, **config), tensors)


UP = "base_model.model.model.layers.0.mlp.up_proj"
UP1 = "base_model.model.model.layers.1.mlp.up_proj"


def prompt_dir(path: Path, fp, kind="PROMPT_TUNING", shape=(3, 64), **config):
    base = {"peft_type": kind, "num_virtual_tokens": 3, "num_transformer_submodules": 1}
    return write_adapter(path, {**base, **config}, {"prompt_embeddings": torch.randn(shape)})


def ia3_dir(path: Path, fp, shape=(32, 1)):
    tensors = {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.ones(shape)}
    return write_adapter(path, {"peft_type": "IA3", "feedforward_modules": ["down_proj"]}, tensors)


NEGATIVE = {
    # adapter_config.json
    "config-not-json": (lambda p, fp: text_config(p, "{'r': 4"), "adapter_config.json"),
    "config-not-object": (lambda p, fp: text_config(p, "[1, 2]"), "adapter_config.json"),
    "unknown-peft-type": (lambda p, fp: lora_dir(p, fp, peft_type="LOHA"), "peft_type"),
    "missing-peft-type": (lambda p, fp: text_config(p, '{"r": 4}'), "peft_type"),
    # files: extra files are ignored (test_extra_files_are_ignored_unopened), but not these
    "pickle-only-bin": (pickle_only("adapter_model.bin"), "adapter_model.safetensors"),
    "pickle-only-pt": (pickle_only("weights.pt"), "adapter_model.safetensors"),
    "pickle-only-ckpt": (pickle_only("model.ckpt"), "adapter_model.safetensors"),
    "symlink-readme": (with_symlink("README.md", "/etc/passwd"), "README.md"),
    "symlink-config": (with_symlink("adapter_config.json"), "adapter_config.json"),
    "symlink-weights": (with_symlink("adapter_model.safetensors"), "adapter_model.safetensors"),
    "readme-folder": (as_folder("README.md"), "README.md"),
    "missing-weights": (without_weights, "adapter_model.safetensors"),
    # safetensors header (SECURITY row 3)
    "header-offsets-past-eof": (
        lambda p, fp: raw_weights(p, entry(offsets=(0, 10**9)), b"\0" * 1024),
        "adapter_model.safetensors",
    ),
    "header-shape-bytes-mismatch": (
        lambda p, fp: raw_weights(p, entry(shape=(400, 64)), b"\0" * 1024),
        "adapter_model.safetensors",
    ),
    "header-absurd-length": (
        lambda p, fp: raw_weights(p, entry(), b"\0" * 1024, header_len=2**62),
        "adapter_model.safetensors",
    ),
    "header-not-json": (
        lambda p, fp: raw_weights(p, b"{not json", b""),
        "adapter_model.safetensors",
    ),
    "header-int-dtype": (
        lambda p, fp: raw_weights(p, entry(dtype="I32"), b"\0" * 1024),
        "adapter_model.safetensors",
    ),
    "header-truncated": (truncated_weights, "adapter_model.safetensors"),
    # LoRA values
    "rank-above-max": (lambda p, fp: lora_dir(p, fp, r=32), "r"),
    "rank-pattern-above-max": (
        lambda p, fp: lora_dir(p, fp, rank_pattern={"q_proj": 64}),
        "rank_pattern",
    ),
    "rank-not-int": (lambda p, fp: text_config(p, '{"peft_type": "LORA", "r": "4"}'), "r"),
    "alpha-nan": (
        lambda p, fp: text_config(p, '{"peft_type": "LORA", "lora_alpha": NaN}'),
        "lora_alpha",
    ),
    "shape-mismatch": (
        lambda p, fp: lora_dir(p, fp, tensors=with_tensor(A0, torch.randn(4, 63))),
        A0,
    ),
    "rank-disagrees-with-config": (
        lambda p, fp: lora_dir(p, fp, tensors=with_tensor(A0, torch.randn(3, 64))),
        A0,
    ),
    "fingerprint-hidden-size": (lambda p, fp: lora_dir(p, fp, hidden=96), A0),
    "layer-beyond-base": (
        lambda p, fp: lora_dir(
            p, fp, tensors=with_tensor(A0.replace("layers.0", "layers.7"), torch.randn(4, 64))
        ),
        A0.replace("layers.0", "layers.7"),
    ),
    "nan-weight": (
        lambda p, fp: lora_dir(p, fp, tensors=poisoned(math.nan)),
        f"{Q.format(1)}.lora_B.weight",
    ),
    "inf-weight": (
        lambda p, fp: lora_dir(p, fp, tensors=poisoned(-math.inf)),
        f"{Q.format(1)}.lora_B.weight",
    ),
    "lone-lora-a": (lambda p, fp: lora_dir(p, fp, tensors=lambda t: {A0: t[A0]}), A0),
    "unknown-module": (
        lambda p, fp: lora_dir(
            p,
            fp,
            tensors=with_tensor(
                "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight", torch.ones(4, 64)
            ),
        ),
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight",
    ),
    "embedding-a-without-b": (
        lambda p, fp: lora_dir(p, fp, tensors=with_tensor(EMB_A, torch.ones(4, 384))),
        EMB_A,
    ),
    "embedding-a-vocab-mismatch": (
        lambda p, fp: lora_dir(
            p, fp, tensors=with_tensors({EMB_A: torch.ones(4, 383), EMB_B: torch.ones(64, 4)})
        ),
        EMB_A,
    ),
    "lm-head-b-rank-mismatch": (
        lambda p, fp: lora_dir(
            p, fp, tensors=with_tensors({HEAD_A: torch.ones(4, 64), HEAD_B: torch.ones(384, 3)})
        ),
        HEAD_B,
    ),
    "resized-vocabulary-base-copy": (  # peft's saved copy of a resized embedding
        lambda p, fp: lora_dir(
            p,
            fp,
            tensors=with_tensors(
                {
                    EMB_A: torch.ones(4, 384),
                    EMB_B: torch.ones(64, 4),
                    "base_model.model.model.embed_tokens.base_layer.weight": torch.ones(390, 64),
                }
            ),
        ),
        "base_model.model.model.embed_tokens.base_layer.weight",
    ),
    "modules-to-save-tensor": (
        lambda p, fp: lora_dir(
            p,
            fp,
            tensors=with_tensor(
                "base_model.model.lm_head.modules_to_save.default.weight", torch.ones(384, 64)
            ),
        ),
        "base_model.model.lm_head.modules_to_save.default.weight",
    ),
    "lora-bias-tensor": (
        lambda p, fp: lora_dir(
            p, fp, tensors=with_tensor(f"{Q.format(0)}.lora_B.bias", torch.ones(64))
        ),
        f"{Q.format(0)}.lora_B.bias",
    ),
    # LoRA options we do not serve
    "dora": (lambda p, fp: lora_dir(p, fp, use_dora=True), "use_dora"),
    "modules-to-save": (
        lambda p, fp: lora_dir(p, fp, modules_to_save=["lm_head"]),
        "modules_to_save",
    ),
    "wte-target": (  # an embedding name the Llama family does not have
        lambda p, fp: lora_dir(p, fp, target_modules=["q_proj", "wte"]),
        "target_modules",
    ),
    "bias-all": (lambda p, fp: lora_dir(p, fp, bias="all"), "bias"),
    "fan-in-fan-out": (lambda p, fp: lora_dir(p, fp, fan_in_fan_out=True), "fan_in_fan_out"),
    "layers-to-transform": (lambda p, fp: lora_dir(p, fp, layers_to_transform=[1]), A0),
    "bad-pattern-regex": (lambda p, fp: lora_dir(p, fp, alpha_pattern={"(": 2}), "alpha_pattern"),
    # bottleneck
    "unknown-non-linearity": (
        lambda p, fp: bottleneck_dir(p, fp, non_linearity="leaky_softmax"),
        "non_linearity",
    ),
    "learned-scaling-missing": (
        lambda p, fp: bottleneck_dir(p, fp, scaling="learned"),
        f"{UP}.adapter_down.weight",
    ),
    "learned-scaling-shape": (
        lambda p, fp: bottleneck_dir(
            p,
            fp,
            scaling="learned",
            extra={f"{UP}.adapter_scaling": torch.ones(2), f"{UP1}.adapter_scaling": torch.ones(1)},
        ),
        f"{UP}.adapter_scaling",
    ),
    "learned-scaling-nan": (
        lambda p, fp: bottleneck_dir(
            p,
            fp,
            scaling="learned",
            extra={
                f"{UP}.adapter_scaling": torch.tensor([float("nan")]),
                f"{UP1}.adapter_scaling": torch.ones(1),
            },
        ),
        f"{UP}.adapter_scaling",
    ),
    "scaling-tensor-with-fixed-scaling": (
        lambda p, fp: bottleneck_dir(p, fp, extra={f"{UP}.adapter_scaling": torch.ones(1)}),
        f"{UP}.adapter_scaling",
    ),
    "scaling-string": (lambda p, fp: bottleneck_dir(p, fp, scaling="learnt"), "scaling"),
    "bottleneck-size-above-max": (lambda p, fp: bottleneck_dir(p, fp, size=32), "bottleneck_size"),
    "bottleneck-bias": (lambda p, fp: bottleneck_dir(p, fp, bias="adapter_only"), "bias"),
    "series-on-attention": (
        lambda p, fp: bottleneck_dir(p, fp, targets={"self_attn.q_proj": (64, 64)}),
        "base_model.model.model.layers.0.self_attn.q_proj.adapter_down.weight",
    ),
    "series-down-wrong-side": (
        lambda p, fp: bottleneck_dir(p, fp, targets={"mlp.down_proj": (128, 64)}),
        "base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight",
    ),
    # prefix / prompt / ia3
    "prefix-projection": (
        lambda p, fp: prompt_dir(p, fp, "PREFIX_TUNING", (3, 128), prefix_projection=True),
        "prefix_projection",
    ),
    "prefix-token-dim": (
        lambda p, fp: prompt_dir(p, fp, "PREFIX_TUNING", (3, 256), token_dim=64),
        "token_dim",
    ),
    "prefix-layers": (
        lambda p, fp: prompt_dir(p, fp, "PREFIX_TUNING", (3, 192), num_layers=3),
        "num_layers",
    ),
    "prefix-shape": (
        lambda p, fp: prompt_dir(p, fp, "PREFIX_TUNING", (3, 192)),
        "prompt_embeddings",
    ),
    "prompt-hidden-size": (lambda p, fp: prompt_dir(p, fp, shape=(3, 96)), "prompt_embeddings"),
    "prompt-no-virtual-tokens": (
        lambda p, fp: prompt_dir(p, fp, num_virtual_tokens=None),
        "num_virtual_tokens",
    ),
    "prompt-encoder-decoder": (
        lambda p, fp: prompt_dir(p, fp, num_transformer_submodules=2),
        "num_transformer_submodules",
    ),
    "ia3-shape": (
        lambda p, fp: ia3_dir(p, fp, shape=(1, 64)),
        "base_model.model.model.layers.0.self_attn.k_proj.ia3_l",
    ),
}


@pytest.mark.parametrize("case", NEGATIVE, ids=list(NEGATIVE))
def test_refused(tmp_path: Path, fingerprint: BaseFingerprint, case: str):
    build, param = NEGATIVE[case]
    directory = build(tmp_path / "adapter", fingerprint)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "bad", fingerprint, max_rank=8)
    assert caught.value.param == param
    message = str(caught.value)
    assert message and len(message) < 400 and str(tmp_path) not in message


@pytest.mark.parametrize("case", [c for c in NEGATIVE if c.startswith("header-")])
def test_lying_header_refused_before_loading(tmp_path, fingerprint, case, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("tensors loaded despite a lying header")

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    with pytest.raises(AdapterFormatError):
        load_adapter(NEGATIVE[case][0](tmp_path / "a", fingerprint), "a", fingerprint, 8)


def test_refusal_messages_say_expected_and_got(tmp_path: Path, fingerprint: BaseFingerprint):
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(lora_dir(tmp_path / "a", fingerprint, hidden=96), "a", fingerprint, 8)
    assert "expected shape (4, 64), got (4, 96)" in str(caught.value)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(lora_dir(tmp_path / "b", fingerprint, r=32), "b", fingerprint, 8)
    assert "expected a rank <= 8" in str(caught.value) and "got 32" in str(caught.value)


# --- caps before parsing -----------------------------------------------------------------------

WEIGHTS = "adapter_model.safetensors"


def zero_size_tensors(count: int) -> dict:
    return {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}


def test_header_of_300k_zero_size_tensors_is_refused_by_its_length(tmp_path, fingerprint):
    """20 MB of header: refused by MAX_HEADER_BYTES, never parsed (it was slow to refuse
    before; BENCHMARKS.md, 'Figures quoted from the code')."""
    directory = raw_weights(tmp_path / "a", zero_size_tensors(300_000), b"")
    header_len = (directory / WEIGHTS).stat().st_size - 8
    assert header_len > 4 * MAX_HEADER_BYTES  # ~20 MB
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "a", fingerprint, 8)
    assert caught.value.param == WEIGHTS
    message = str(caught.value)
    assert f"expected a header length <= {4 << 20} bytes" in message, message
    assert f"got {header_len}" in message, message


def test_header_over_the_byte_cap_is_refused_unread(tmp_path, fingerprint, monkeypatch):
    directory = lora_dir(tmp_path / "a", fingerprint)
    with (directory / WEIGHTS).open("wb") as f:  # a sparse 50 MiB "header" of zeros
        f.write((50 << 20).to_bytes(8, "little"))
        f.truncate(8 + (50 << 20))
    reads = spy_reads(monkeypatch, WEIGHTS)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "a", fingerprint, 8)
    assert caught.value.param == WEIGHTS
    assert f"<= {MAX_HEADER_BYTES} bytes" in str(caught.value)
    assert f"got {50 << 20}" in str(caught.value)
    assert reads and max(reads) <= 8, reads  # the length prefix only


def spy_reads(monkeypatch, name: str) -> list[int]:
    """Sizes of every read() on files called `name` opened through Path.open."""
    reads: list[int] = []
    real_open = Path.open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def read(self, size: int = -1) -> bytes:
            data = self.handle.read(size)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def spying_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        return Spy(handle) if self.name == name else handle

    monkeypatch.setattr(Path, "open", spying_open)
    return reads


def test_tensor_count_is_capped_before_the_entries_are_read(tmp_path, fingerprint, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("header entries checked one by one despite the tensor cap")

    monkeypatch.setattr(adapter_formats, "check_header_entries", never)
    cap = max_tensors(fingerprint)
    assert cap == 2 * 7 * 3 + 8  # layers * projections * (DoRA's A, B, magnitude) + slack
    directory = raw_weights(tmp_path / "a", zero_size_tensors(20_000), b"")
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "a", fingerprint, 8)
    assert caught.value.param == WEIGHTS
    assert f"expected at most {cap} tensors for this base model" in str(caught.value)
    assert "got 20000" in str(caught.value)


def nested(depth: int) -> str:
    """A JSON list nested `depth` deep."""
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth,refused", [(63, False), (64, True), (100_000, True)])
def test_config_nesting_is_capped(tmp_path, fingerprint, depth: int, refused: bool):
    """The config object is level 1: a field holding `depth` lists is at 1 + depth."""
    directory = lora_dir(tmp_path / "a", fingerprint)
    config = json.loads((directory / "adapter_config.json").read_text())
    text = json.dumps(config)[:-1] + f', "notes": {nested(depth)}}}'
    (directory / "adapter_config.json").write_text(text)
    if not refused:
        assert load_adapter(directory, "a", fingerprint, 8).kind is AdapterKind.LORA
        return
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "a", fingerprint, 8)
    assert caught.value.param == "adapter_config.json"
    message = str(caught.value)
    assert f"expected JSON nested at most 64 levels deep, got {depth + 1}" in message, message


def test_header_nesting_is_capped(tmp_path, fingerprint):
    """A valid LoRA whose header metadata is nested 100 deep (level 1 is the header itself)."""
    directory = lora_dir(tmp_path / "a", fingerprint)
    data = (directory / WEIGHTS).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"] = {"format": json.loads(nested(100))}
    raw = json.dumps(header).encode()
    tensor_bytes = data[8 + header_len :]
    (directory / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + tensor_bytes)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "a", fingerprint, 8)
    assert caught.value.param == WEIGHTS
    assert "expected JSON nested at most 64 levels deep, got 102" in str(caught.value)


# --- files outside the allow-list -----------------------------------------------------------

HUB_EXTRAS = {
    "tokenizer.json": b"{}",
    "special_tokens_map.json": b"{}",
    "training_args.bin": PICKLE,
    "adapter_model.bin": PICKLE,
    "adapter_model.gguf": b"GGUF",
}


def hub_download(path: Path, fp: BaseFingerprint) -> Path:
    """A LoRA folder as the hub serves it: tokenizer files, pickles, a checkpoint, a link."""
    lora_dir(path, fp)
    for name, data in HUB_EXTRAS.items():
        (path / name).write_bytes(data)
    (path / "checkpoint-100").mkdir()
    (path / "checkpoint-100" / "optimizer.pt").write_bytes(PICKLE)
    (path / "checkpoint-100" / "adapter_config.json").write_text("not json")
    (path / "notes.md").symlink_to("/etc/passwd")
    return path


def spy_opened(monkeypatch) -> list[str]:
    """Names of the files opened through Python's open (pathlib included)."""
    opened: list[str] = []
    real_open = io.open

    def spying_open(file, *args, **kwargs):
        opened.append(Path(os.fsdecode(file)).name if not isinstance(file, int) else "<fd>")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spying_open)
    monkeypatch.setattr(builtins, "open", spying_open)
    return opened


def test_extra_files_are_ignored_unopened(tmp_path, fingerprint, monkeypatch, caplog):
    directory = hub_download(tmp_path / "a", fingerprint)
    opened = spy_opened(monkeypatch)
    with caplog.at_level(logging.INFO, logger="adapterserve.adapters.formats"):
        spec = load_adapter(directory, "hub", fingerprint, 8)
    assert spec.kind is AdapterKind.LORA and set(spec.modules) == {(0, "q"), (1, "q")}
    assert opened and set(opened) <= {"adapter_config.json", "adapter_model.safetensors"}
    ignored = sorted([*HUB_EXTRAS, "checkpoint-100/", "notes.md"])
    [record] = [r for r in caplog.records if r.name == "adapterserve.adapters.formats"]
    assert f"'hub': ignoring {len(ignored)} entries outside the allow-list" in record.message
    assert all(repr(name) in record.message for name in ignored), record.message


def test_ignored_names_in_the_log_line_are_truncated(tmp_path, fingerprint, caplog):
    directory = lora_dir(tmp_path / "a", fingerprint)
    for i in range(20):
        (directory / f"{'x' * 150}-{i:02d}.txt").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="adapterserve.adapters.formats"):
        load_adapter(directory, "many", fingerprint, 8)
    [record] = [r for r in caplog.records if r.name == "adapterserve.adapters.formats"]
    assert "ignoring 20 entries" in record.message and "and 12 more" in record.message
    assert "-19.txt" not in record.message and len(record.message) < 1200


def test_pickle_only_weights_keep_the_conversion_hint(tmp_path, fingerprint, monkeypatch):
    directory = pickle_only("adapter_model.bin")(tmp_path / "a", fingerprint)
    (directory / "tokenizer.json").write_bytes(b"{}")
    opened = spy_opened(monkeypatch)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(directory, "a", fingerprint, 8)
    message = str(caught.value)
    assert caught.value.param == "adapter_model.safetensors"
    assert "got only pickle weights ['adapter_model.bin']" in message, message
    assert "never pickle .bin/.pt" in message and "convert them once, offline" in message
    assert "adapter_model.bin" not in opened


def test_no_pickle_reader_is_used(tmp_path: Path, fingerprint, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", never)
    spec = load_adapter(lora_dir(tmp_path / "a", fingerprint), "a", fingerprint, 8)
    assert spec.kind is AdapterKind.LORA
    assert not any(name.endswith((".bin", ".pt")) for name in os.listdir(tmp_path / "a"))


def test_key_variants_and_frozen_spec(tmp_path: Path, fingerprint: BaseFingerprint):
    """Keys with the adapter-name segment or without the base_model.model prefix also load."""
    config, tensors = lora_files(fingerprint)
    renamed = {
        key.replace("lora_A.weight", "lora_A.default.weight").replace("base_model.model.", ""): v
        for key, v in tensors.items()
    }
    spec = load_adapter(write_adapter(tmp_path / "a", config, renamed), "a", fingerprint, 8)
    assert set(spec.modules) == {(0, "q"), (1, "q")}
    assert torch.equal(spec.modules[1, "q"].b, tensors[f"{Q.format(1)}.lora_B.weight"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 2
    with pytest.raises(TypeError):
        spec.modules[0, "k"] = spec.modules[0, "q"]


def test_dora_reads_magnitudes_against_the_base_weights(
    tmp_path: Path, fingerprint: BaseFingerprint
):
    """use_dora with the base's weights at hand: g = m / ||W + s B A|| per output row (checked
    against that formula in float64); a missing or misshaped magnitude, or no base weights,
    is refused naming what to fix."""
    g = torch.Generator().manual_seed(0)
    bases = {layer: torch.randn(64, 64, generator=g) for layer in range(fingerprint.num_layers)}

    def base_weight(layer: int, target: str) -> torch.Tensor:
        assert target == "q"
        return bases[layer]

    def with_magnitudes(shape):
        def add(tensors):
            return {
                **tensors,
                **{
                    f"{Q.format(layer)}.lora_magnitude_vector": torch.rand(shape) + 0.5
                    for layer in range(fingerprint.num_layers)
                },
            }

        return add

    good = lora_dir(tmp_path / "ok", fingerprint, use_dora=True, tensors=with_magnitudes((64,)))
    spec = load_adapter(good, "dora", fingerprint, max_rank=8, base_weight=base_weight)
    tensors = safetensors.torch.load_file(str(good / "adapter_model.safetensors"))
    for layer in range(fingerprint.num_layers):
        a, b = (
            tensors[f"{Q.format(layer)}.lora_A.weight"],
            tensors[f"{Q.format(layer)}.lora_B.weight"],
        )
        merged = bases[layer].double() + 2.0 * (b.double() @ a.double())  # alpha / r = 8 / 4
        want = tensors[f"{Q.format(layer)}.lora_magnitude_vector"].double() / merged.norm(dim=1)
        got = spec.modules[layer, "q"].output_scale
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(good, "dora", fingerprint, max_rank=8)  # no model to take norms of
    assert caught.value.param == "use_dora"
    bad = lora_dir(tmp_path / "bad", fingerprint, use_dora=True, tensors=with_magnitudes((32,)))
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(bad, "dora", fingerprint, max_rank=8, base_weight=base_weight)
    assert caught.value.param == f"{Q.format(0)}.lora_magnitude_vector"
    missing = lora_dir(tmp_path / "missing", fingerprint, use_dora=True)
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector"):
        load_adapter(missing, "dora", fingerprint, max_rank=8, base_weight=base_weight)
    stray = lora_dir(tmp_path / "stray", fingerprint, tensors=with_magnitudes((64,)))  # no use_dora
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector"):
        load_adapter(stray, "lora", fingerprint, max_rank=8, base_weight=base_weight)


def test_dora_on_every_projection_of_every_layer_fits_the_tensor_cap(tmp_path, fingerprint):
    """DoRA stores three tensors per projection (A, B and the magnitude vector): an adapter on
    all 7 projections of every layer was refused by the header's tensor cap (2 per projection)."""
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    directory, _ = save_peft_adapter(tmp_path / "dora", config)
    with safetensors.safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == fingerprint.num_layers * len(targets) * 3
    base = tiny_llama(0).state_dict()  # the base save_peft_adapter put the adapter on

    def base_weight(layer: int, target: str) -> torch.Tensor:
        return base[f"model.layers.{layer}.{SHORT[target]}.weight"]

    spec = load_adapter(directory, "dora", fingerprint, 8, base_weight=base_weight)
    assert len(spec.modules) == fingerprint.num_layers * len(targets)
