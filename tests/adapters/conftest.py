"""Builders that write real adapter directories (PEFT-saved where peft is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from adapterserve.adapters.spec import BaseFingerprint

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=384,
)
MAX_RANK = 16


@pytest.fixture
def fingerprint() -> BaseFingerprint:
    return BaseFingerprint.from_hf_config(TINY)


def write_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter directory by hand: adapter_config.json + adapter_model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def save_peft_adapter(path: Path, peft_config, seed: int = 0, **overrides):
    """get_peft_model on a tiny random Llama, random non-zero adapter weights, save_pretrained.

    Returns (directory, peft model) so that tests compare against the model's own parameters.
    """
    pytest.importorskip("peft")
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(seed, **overrides), peft_config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:  # adapter weights only: the base is frozen
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return path, model


def bottleneck_tensors(
    fingerprint: BaseFingerprint, size: int, targets: dict[str, tuple[int, int]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """LLM-Adapters key names: <module>.adapter_down.weight (size, d_in), .adapter_up (d_out, size).

    targets: module path under a layer ("mlp.up_proj") -> (d_in, d_out) of the adapter.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(fingerprint.num_layers):
        for module, (d_in, d_out) in targets.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.adapter_down.weight"] = torch.randn(size, d_in, generator=generator)
            tensors[f"{prefix}.adapter_up.weight"] = torch.randn(d_out, size, generator=generator)
    return tensors


def bottleneck_config(**overrides) -> dict:
    """A BottleneckConfig as LLM-Adapters' save_pretrained writes it (asdict of the dataclass)."""
    config = {
        "peft_type": "BOTTLENECK",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "inference_mode": True,
        "bottleneck_size": 8,
        "non_linearity": "tanh",
        "adapter_dropout": 0.0,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "use_parallel_adapter": False,
        "scaling": 1.0,
        "bias": "none",
        "init_weights": "bert",
        "modules_to_save": None,
    }
    return {**config, **overrides}
