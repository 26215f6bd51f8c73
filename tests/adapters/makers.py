"""Adapter directories for tests on a tiny base saved by tests.helpers.make_tiny_llama: PEFT
adapters saved by peft itself, LLM-Adapters bottlenecks, and an independent transformers
reference for the bottleneck math."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterserve.adapters.spec import BaseFingerprint
from tests.adapters.conftest import bottleneck_tensors, write_adapter

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


def hf_model(base_dir: Path):
    from transformers import AutoModelForCausalLM as auto

    return auto.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def save_peft(path: Path, base_dir: Path, config, seed: int, scale: float = 0.15) -> Path:
    """get_peft_model on our base, random non-zero adapter weights (peft zeroes LoRA B), saved."""
    import peft

    model = peft.get_peft_model(hf_model(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                if "lora_magnitude_vector" in name:  # DoRA: around its init, the row norms
                    param.mul_(1 + 0.3 * noise)
                else:
                    param.copy_(1 + 0.3 * noise if "ia3_l" in name else scale * noise)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def bottleneck_dir(path: Path, fingerprint: BaseFingerprint, config: dict, seed: int) -> Path:
    """LLM-Adapters weights on the targets of `config`, with (d_in, d_out) per placement."""
    hidden, inter = fingerprint.hidden_size, fingerprint.intermediate_size
    parallel = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, fingerprint.kv_dim),
    }
    parallel["mlp.down_proj"] = (inter, hidden)
    series = {"mlp.gate_proj": (hidden, hidden), "mlp.up_proj": (hidden, hidden)}
    series["mlp.down_proj"] = (hidden, hidden)
    targets = parallel if config["use_parallel_adapter"] else series
    tensors = {
        k: 0.1 * v
        for k, v in bottleneck_tensors(
            fingerprint, config["bottleneck_size"], targets, seed
        ).items()
    }
    if config["scaling"] == "learned":  # a trained scalar per module, away from its init 1
        g = torch.Generator().manual_seed(seed + 1000)
        for key in [k for k in tensors if k.endswith(".adapter_down.weight")]:
            module = key.removesuffix(".adapter_down.weight")
            tensors[f"{module}.adapter_scaling"] = 0.25 + 2 * torch.rand(1, generator=g)
    return write_adapter(path, config, tensors)


def bottleneck_reference(base_dir: Path, adapter_dir: Path):
    """transformers' Llama with the LLM-Adapters math in torch hooks, written independently:
    series on gate/up: y = W(x + s U f(D x)); on down: z = W x, y = z + s U f(D z);
    parallel: y = W x + s U f(D x); s the config's scaling, or with scaling "learned" the
    module's own `adapter_scaling` tensor (multiplied after up, as LLM-Adapters does)."""
    import safetensors.torch

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(str(adapter_dir / "adapter_model.safetensors"))
    f, scaling = ACTIVATIONS[config["non_linearity"]], config["scaling"]
    model = hf_model(base_dir)

    def delta(prefix: str, u: torch.Tensor) -> torch.Tensor:
        down, up = tensors[f"{prefix}.adapter_down.weight"], tensors[f"{prefix}.adapter_up.weight"]
        s = tensors[f"{prefix}.adapter_scaling"] if scaling == "learned" else scaling  # (1,)
        return F.linear(f(F.linear(u, down)), up) * s

    for name, module in model.named_modules():
        prefix = f"base_model.model.{name}"
        if f"{prefix}.adapter_down.weight" not in tensors:
            continue
        if config["use_parallel_adapter"]:
            module.register_forward_hook(lambda m, args, out, p=prefix: out + delta(p, args[0]))
        elif name.endswith("down_proj"):
            module.register_forward_hook(lambda m, args, out, p=prefix: out + delta(p, out))
        else:
            module.register_forward_pre_hook(
                lambda m, args, p=prefix: (args[0] + delta(p, args[0]),)
            )
    return model
