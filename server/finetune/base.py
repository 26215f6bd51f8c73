"""The model a fine-tuning job trains: transformers' own model class, assembled from the very
weights the server serves.

The server's `Transformer` is loaded as the engine loads it (`load_model`, same settings: the
GGUF's int4 / int8 codes as they ship, or float weights), and a transformers model of the same
config is assembled around its tensors: embeddings and norms are shared, and every projection
(and the LM head) becomes a `FrozenLinear` that runs the served layer itself. So peft wraps a
plain `nn.Linear` subclass, and what a job trains sees exactly the base the server serves.

On a quantized base this is QLoRA's recipe: the weights stay frozen codes; the forward is the
served weight-only kernel, and the backward dequantizes them for the input's gradient only (a
frozen weight gets none). Adapters are trained in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterserve.server.config import Settings
from adapterserve.server.model.quant import (
    COMPUTE_DTYPE,
    Int4Codes,
    Int4Linear,
    Int8Codes,
    Int8GroupLinear,
    Int8Linear,
    QuantLinear,
)

CACHE_BELOW = 10**9  # projection weights: below, a quantized base's bf16 dequantization is kept
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


class _FrozenMatmul(torch.autograd.Function):
    """y = x @ W^T (+ b) for a frozen W: the backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, frozen: FrozenLinear) -> torch.Tensor:
        ctx.frozen = frozen
        return frozen.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.frozen.compute_weight()
        return (grad.to(weight.dtype) @ weight).to(grad.dtype), None


class FrozenLinear(nn.Linear):
    """One frozen base projection of the served model, as an `nn.Linear` (what peft wraps).

    `weight` is the float weight, dequantized for a quantized layer (what DoRA's norm and peft's
    checks read); it never trains. A quantized layer keeps its codes (unpacked once here) and
    dequantizes them for each matmul, forward and backward, in bfloat16 (the served kernel's
    compute dtype: the weight-only kernels are made for a few decode rows, a dense bf16 matmul
    is many times faster over a training batch's thousands). `cache`: keep the dequantized bf16
    weights instead (2 bytes a weight, the default for bases under 1 B projection weights,
    where the memory is small and dequantizing twice a step is a large share of the time)."""

    def __init__(self, layer: nn.Module, cache: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        object.__setattr__(self, "layer", layer)  # not a submodule: nothing of it is trained
        self.bias = None  # the layer's own bias is added in matmul()
        self._codes: Int4Codes | Int8Codes | None = None
        self._cached: torch.Tensor | None = None
        if isinstance(layer, Int8GroupLinear):
            self._codes = layer.int8_codes()
        elif isinstance(layer, Int4Linear):
            self._codes = Int4Codes(layer.codes(), layer.scales, layer.zeros, layer.group_size)
        elif isinstance(layer, Int8Linear):
            self._codes = Int8Codes(layer.codes, layer.scales)
        elif isinstance(layer, QuantLinear):
            raise TypeError(f"no backward for {type(layer).__name__}")
        if self._codes is not None and cache:
            self._cached = self._codes.dequantize().to(COMPUTE_DTYPE)
            self._codes = None

    @property
    def quantized(self) -> bool:
        return self._codes is not None or self._cached is not None

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        if self._cached is not None:
            return self._cached.float()
        if self._codes is None:
            return self.layer.weight
        return self._codes.dequantize()

    def compute_weight(self) -> torch.Tensor:
        """The weight in the dtype the matmuls use (bf16 for a quantized layer)."""
        if self._cached is not None:
            return self._cached
        return self.weight.to(COMPUTE_DTYPE)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(COMPUTE_DTYPE), self.compute_weight()).to(x.dtype)
        bias = getattr(self.layer, "bias", None)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.layer.weight, self.layer.bias)
        return _FrozenMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, served={type(self.layer).__name__}"


@dataclass
class TrainingBase:
    """A transformers causal LM over the served weights, its tokenizer, and where they came
    from (the engine's plan: model id, directory, quantization)."""

    model: nn.Module
    tokenizer: Any  # transformers' tokenizer of the model directory
    model_id: str
    model_dir: Path
    quantization: str
    device: torch.device


def load_training_base(settings: Settings) -> TrainingBase:
    """Load the base as `adapterserve serve` with these settings would serve it, and assemble
    the transformers model around its tensors (no weight is copied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adapterserve.server.engine.bootstrap import plan_engine
    from adapterserve.server.model.weights import load_model

    plan = plan_engine(settings)
    ours = load_model(
        plan.model_dir, plan.device, plan.dtype, plan.quantization, plan.gguf, settings.cache_dir
    )
    config = AutoConfig.from_pretrained(str(plan.model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
    inner = model.model
    cache = _projection_weights(ours) < CACHE_BELOW
    inner.embed_tokens = ours.embed_tokens
    inner.norm.weight = ours.norm.weight
    for i, (layer, served) in enumerate(zip(inner.layers, ours.layers, strict=True)):
        layer.input_layernorm.weight = served.input_layernorm.weight
        layer.post_attention_layernorm.weight = served.post_attention_layernorm.weight
        for part, names in PROJECTIONS.items():
            for name in names:
                source = getattr(getattr(served, part), name)
                if not isinstance(source, (nn.Linear, QuantLinear)):
                    raise TypeError(f"layers.{i}.{part}.{name}: {type(source).__name__}")
                setattr(getattr(layer, part), name, FrozenLinear(source, cache))
    head = ours.head if isinstance(ours.head, QuantLinear) else ours.lm_head
    model.lm_head = FrozenLinear(head, cache)
    model.model.rotary_emb = type(inner.rotary_emb)(config=config).to(plan.device)
    _check_materialized(model)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(plan.model_dir))
    return TrainingBase(
        model.eval(), tokenizer, plan.model_id, plan.model_dir, plan.quantization, plan.device
    )


def _projection_weights(model: nn.Module) -> int:
    return sum(
        m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, (nn.Linear, QuantLinear))
    )


def _check_materialized(model: nn.Module) -> None:
    """Every parameter and buffer came from the served model (none left on the meta device)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"training model: {len(left)} tensors not assembled, e.g. {left[:3]}")
