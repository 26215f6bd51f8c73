"""AdapterSpec: the one validated in-memory form that every on-disk adapter format parses into.

All tensors are fp32, CPU, contiguous. Per-(layer, target) weights are laid out so that a slot
pool can copy them straight into stacked tensors: LoRA `a (r, in)` -> `A[slot, :r, :]`,
`b (out, r)` -> `B[slot, :, :r]`; bottleneck `down`/`up` likewise (their in/out depend on the
placement, see `BottleneckWeights`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from adapterserve.adapters.errors import AdapterFormatError
from adapterserve.kernels import Activation
from adapterserve.kernels.batch import TARGETS as TARGETS  # one definition, for the model too

# LoRA's model-level targets, outside the layers (peft's module names): the token embeddings
# (lora_embedding_A (r, vocab) / lora_embedding_B (hidden, r), a gathered delta) and the LM head
# (lora_A (r, hidden) / lora_B (vocab, r), a delta on the logits)
MODEL_TARGETS = ("embed_tokens", "lm_head")


class AdapterKind(str, enum.Enum):
    LORA = "lora"
    SERIES = "series"
    PARALLEL = "parallel"
    PREFIX = "prefix"
    PROMPT = "prompt"
    IA3 = "ia3"


@dataclass(frozen=True)
class BaseFingerprint:
    """The base-model dimensions an adapter must fit; a mismatch is refused at load."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: Mapping) -> BaseFingerprint:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
        )

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def in_out(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of the base linear `target` (one of TARGETS)."""
        hidden, q_dim, inter = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.intermediate_size,
        )
        shapes = {
            "q": (hidden, q_dim),
            "k": (hidden, self.kv_dim),
            "v": (hidden, self.kv_dim),
            "o": (q_dim, hidden),
            "gate": (hidden, inter),
            "up": (hidden, inter),
            "down": (inter, hidden),
        }
        return shapes[target]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """y = W x + scaling * b @ (a @ x); a (r, in), b (out, r). DoRA: y = g * (W x + scaling *
    b @ (a @ x)) with g (out,) = magnitude / ||W + scaling * b @ a|| per output row, computed
    once from the base weights when the adapter is read."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    output_scale: torch.Tensor | None = None  # DoRA's g

    @property
    def rank(self) -> int:
        return self.a.shape[0]


Placement = Literal["input", "output", "parallel"]


@dataclass(frozen=True, eq=False)
class BottleneckWeights:
    """h = scaling * up @ f(down @ u), f = `activation`; down (r, d_in), up (d_out, r).

    placement "input" (series on gate/up): u = x, y = W (x + h); d_in = d_out = linear's in.
    placement "output" (series on down): z = W x, u = z, y = z + h; d_in = d_out = linear's out.
    placement "parallel": u = x, y = W x + h; d_in = linear's in, d_out = linear's out.
    """

    down: torch.Tensor
    up: torch.Tensor
    scaling: float
    activation: Activation
    placement: Placement

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True, eq=False)
class IA3Weights:
    """Elementwise scale of a linear's output or input.

    placement "output" (k, v): y = vector * (W x); "input" (down): y = W (vector * x).
    """

    vector: torch.Tensor  # (features,)
    placement: Literal["input", "output"]


ModuleWeights = LoraWeights | BottleneckWeights | IA3Weights


def adapter_io(fingerprint: BaseFingerprint, target: str, placement: Placement) -> tuple[int, int]:
    """(d_in, d_out) of a bottleneck on `target` with `placement` (see BottleneckWeights)."""
    d_in, d_out = fingerprint.in_out(target)
    return {"input": (d_in, d_in), "output": (d_out, d_out), "parallel": (d_in, d_out)}[placement]


@dataclass(frozen=True, eq=False)
class AdapterSpec:
    """One adapter, validated against a base model. Exactly one kind per adapter.

    modules: (layer, target) -> weights for lora / series / parallel / ia3 (empty otherwise).
    model_modules: LoRA on MODEL_TARGETS, name -> LoraWeights: "embed_tokens" with a (r, vocab)
        and b (hidden, r) (delta[t] = scaling * b @ a[:, token_t]); "lm_head" with a (r, hidden)
        and b (vocab, r) (logits += scaling * b @ a @ h).
    prefix_kv: (num_layers, 2, num_virtual_tokens, num_kv_heads, head_dim), [:, 0] keys and
        [:, 1] values, for prefix tuning. prompt_embeddings: (num_virtual_tokens, hidden) for
        prompt tuning. rank: largest rank / bottleneck size over modules (0 for the others).
    """

    name: str
    kind: AdapterKind
    fingerprint: BaseFingerprint
    rank: int
    targets: tuple[str, ...]
    modules: Mapping[tuple[int, str], ModuleWeights]
    prefix_kv: torch.Tensor | None = None
    prompt_embeddings: torch.Tensor | None = None
    num_virtual_tokens: int = 0
    model_modules: Mapping[str, LoraWeights] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )

    def tensors(self) -> list[torch.Tensor]:
        found = [self.prefix_kv, self.prompt_embeddings]
        for weights in [*self.modules.values(), *self.model_modules.values()]:
            found += [getattr(weights, field, None) for field in ("a", "b", "down", "up", "vector")]
        return [t for t in found if t is not None]

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Shape and finiteness of a loaded weight -> the weight as fp32 contiguous CPU."""
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterFormatError(
            name,
            f"tensor {name!r} does not fit the base model: expected shape {tuple(shape)}, "
            f"got {tuple(tensor.shape)}",
        )
    tensor = tensor.to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterFormatError(name, f"tensor {name!r} has NaN or Inf values")
    return tensor


def check_rank(param: str, rank: object, max_rank: int) -> int:
    """A config rank (r, rank_pattern value, bottleneck_size): a positive int <= max_rank."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterFormatError(param, f"{param}: expected a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterFormatError(
            param, f"{param}: expected a rank <= {max_rank} (the server's maximum), got {rank}"
        )
    return rank


def check_number(param: str, value: object) -> float:
    """A finite real config number (ints accepted, bools not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterFormatError(param, f"{param}: expected a finite number, got {value!r}")
    return float(value)


def refuse_options(config: Mapping, unsupported: Mapping[str, str]) -> None:
    """Refuse every config field in `unsupported` (field -> why) that is set (truthy)."""
    for field, why in unsupported.items():
        if config.get(field):
            raise AdapterFormatError(
                field, f"{field}: not supported ({why}); expected it unset, got {config[field]!r}"
            )


def refuse_bias(config: Mapping) -> None:
    """Bias training (LoRA's and the bottlenecks' `bias` option) is not served: only "none"."""
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            "bias", f"bias: expected 'none' (biases are not served), got {config['bias']!r}"
        )


# PEFT / LLM-Adapters state-dict key of a Llama-family linear, e.g.
# "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" -> (3, "q", "lora_A.weight").
# ASCII digits only ([0-9], not \d): module names stay ASCII, on which the config patterns
# (adapters.formats.patterns) match the same under RE2 as under Python's `re`.
MODULE_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>model\.layers\.(?P<layer>[0-9]+)\."
    r"(?:self_attn\.(?P<attn>q|k|v|o)|mlp\.(?P<mlp>gate|up|down))_proj)\.(?P<rest>.+)"
)


@dataclass(frozen=True)
class ModuleKey:
    layer: int
    target: str  # one of TARGETS
    module: str  # PEFT's module name, "model.layers.3.self_attn.q_proj" (patterns match it)
    rest: str  # what follows the module name, "lora_A.weight"


def parse_module_key(key: str, fingerprint: BaseFingerprint) -> ModuleKey | None:
    """The linear a state-dict key belongs to, or None when it names no q..down linear."""
    match = MODULE_KEY.fullmatch(key)
    if match is None:
        return None
    layer = int(match["layer"])
    if layer >= fingerprint.num_layers:
        raise AdapterFormatError(
            key, f"tensor {key!r}: expected a layer < {fingerprint.num_layers}, got {layer}"
        )
    target = match["attn"] or match["mlp"]
    return ModuleKey(layer, target, match["module"], match["rest"])
