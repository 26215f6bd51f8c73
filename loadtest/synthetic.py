"""Synthetic adapters with random weights, written in the on-disk formats the server accepts
(PEFT LoRA / PREFIX_TUNING / PROMPT_TUNING / IA3, LLM-Adapters BOTTLENECK), and their upload
through `POST /v1/adapters`. Only numpy and safetensors: no torch, no server imports.

Weights are small (std 0.02; IA3 vectors near 1) so that outputs stay sane.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save

log = logging.getLogger(__name__)

KINDS = ("lora", "series", "parallel", "prefix", "prompt", "ia3")
DEFAULT_RANKS = (64, 32, 16, 8)
DIM_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
PREFIX = "base_model.model.model.layers"
ATTN = ("q", "k", "v", "o")


@dataclass(frozen=True)
class BaseDims:
    """The base model's shapes an adapter must match (HF config.json field names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict) -> BaseDims:
        """From an HF config.json dict (or a model card with the same fields)."""
        missing = [f for f in DIM_FIELDS if f != "num_key_value_heads" and config.get(f) is None]
        if missing:
            raise ValueError(f"base model config lacks {missing}; pass --base-config config.json")
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or 0),
        )

    def in_out(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of the base linear `target`."""
        hidden, q_dim, inter = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q": (hidden, q_dim),
            "k": (hidden, self.kv_dim),
            "v": (hidden, self.kv_dim),
            "o": (q_dim, hidden),
            "gate": (hidden, inter),
            "up": (hidden, inter),
            "down": (inter, hidden),
        }[target]


def module_name(layer: int, target: str) -> str:
    group = "self_attn" if target in ATTN else "mlp"
    return f"{PREFIX}.{layer}.{group}.{target}_proj"


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def lora(dims: BaseDims, rank: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """PEFT LoRA on q, k, v, o of every layer; lora_alpha = 2r."""
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
    }
    tensors = {}
    for layer in range(dims.num_hidden_layers):
        for target in ATTN:
            d_in, d_out = dims.in_out(target)
            tensors[f"{module_name(layer, target)}.lora_A.weight"] = _normal(rng, rank, d_in)
            tensors[f"{module_name(layer, target)}.lora_B.weight"] = _normal(rng, d_out, rank)
    return config, tensors


def bottleneck(
    dims: BaseDims, size: int, rng: np.random.Generator, parallel: bool
) -> tuple[dict, dict]:
    """LLM-Adapters bottleneck: series on down_proj's output (d = hidden), or parallel beside
    up_proj (hidden -> intermediate)."""
    target = "up" if parallel else "down"
    config = {
        "peft_type": "BOTTLENECK",
        "bottleneck_size": size,
        "non_linearity": "tanh",
        "adapter_dropout": 0.0,
        "use_parallel_adapter": parallel,
        "use_adapterp": False,
        "target_modules": [f"{target}_proj"],
        "scaling": 1.0,
        "task_type": "CAUSAL_LM",
    }
    d_in, d_out = dims.in_out(target) if parallel else (dims.hidden_size, dims.hidden_size)
    tensors = {}
    for layer in range(dims.num_hidden_layers):
        name = module_name(layer, target)
        tensors[f"{name}.adapter_down.weight"] = _normal(rng, size, d_in)
        tensors[f"{name}.adapter_up.weight"] = _normal(rng, d_out, size)
    return config, tensors


def prefix(dims: BaseDims, tokens: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """PEFT prefix tuning without projection; peft stores kv_dim as token_dim and the KV
    head count as num_attention_heads for GQA models."""
    config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": tokens,
        "prefix_projection": False,
        "task_type": "CAUSAL_LM",
        "num_layers": dims.num_hidden_layers,
        "token_dim": dims.kv_dim,
        "num_attention_heads": dims.num_key_value_heads,
        "num_transformer_submodules": 1,
    }
    width = 2 * dims.num_hidden_layers * dims.kv_dim
    return config, {"prompt_embeddings": _normal(rng, tokens, width)}


def prompt(dims: BaseDims, tokens: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """PEFT prompt tuning: virtual token embeddings (tokens, hidden)."""
    config = {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": tokens,
        "task_type": "CAUSAL_LM",
        "token_dim": dims.hidden_size,
        "num_transformer_submodules": 1,
        "num_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads,
    }
    return config, {"prompt_embeddings": _normal(rng, tokens, dims.hidden_size)}


def ia3(dims: BaseDims, rng: np.random.Generator) -> tuple[dict, dict]:
    """PEFT IA3 on k, v (output scaling) and down_proj (input scaling), values near 1."""
    config = {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
        "task_type": "CAUSAL_LM",
    }
    tensors = {}
    for layer in range(dims.num_hidden_layers):
        for target in ("k", "v"):
            tensors[f"{module_name(layer, target)}.ia3_l.weight"] = 1 + _normal(rng, dims.kv_dim, 1)
        tensors[f"{module_name(layer, 'down')}.ia3_l.weight"] = 1 + _normal(
            rng, 1, dims.intermediate_size
        )
    return config, tensors


def make_adapter(dims: BaseDims, kind: str, rank: int, seed: int) -> tuple[dict, dict]:
    """(adapter_config dict, tensors) of one synthetic adapter. `rank` is the LoRA rank, the
    bottleneck size, or the number of virtual tokens (prefix/prompt); IA3 ignores it."""
    rng = np.random.default_rng(seed)
    if kind == "lora":
        return lora(dims, rank, rng)
    if kind in ("series", "parallel"):
        return bottleneck(dims, rank, rng, parallel=kind == "parallel")
    if kind == "prefix":
        return prefix(dims, rank, rng)
    if kind == "prompt":
        return prompt(dims, rank, rng)
    if kind == "ia3":
        return ia3(dims, rng)
    raise ValueError(f"adapter kind must be one of {KINDS}, got {kind!r}")


def adapter_files(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The two files of an adapter directory, as bytes."""
    return {
        "adapter_config.json": json.dumps(config, indent=1).encode(),
        "adapter_model.safetensors": save(tensors, metadata={"format": "pt"}),
    }


def write_adapter(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(config, tensors).items():
        (directory / name).write_bytes(data)
    return directory


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    kind: str
    rank: int
    seed: int


def plan_adapters(
    count: int, kinds: Sequence[str], ranks: Sequence[int], prefix_name: str = "lt", seed: int = 0
) -> list[AdapterPlan]:
    """Kinds and ranks assigned round-robin; names sort in creation order."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or not ranks:
        raise ValueError(
            f"kinds must be non-empty, from {KINDS}; ranks non-empty; got {kinds}, {ranks}"
        )
    return [
        AdapterPlan(
            f"{prefix_name}-{i:04d}-{kinds[i % len(kinds)]}-r{ranks[i % len(ranks)]}",
            kinds[i % len(kinds)],
            ranks[i % len(ranks)],
            seed * 100_003 + i,
        )
        for i in range(count)
    ]


async def fetch_base_dims(
    client: httpx.AsyncClient, base_id: str, base_card: dict, base_config: Path | None
) -> BaseDims:
    """Base shapes from --base-config, else the /v1/models card, else GET /v1/models/{base}."""
    if base_config is not None:
        return BaseDims.from_config(json.loads(Path(base_config).read_text()))
    if all(base_card.get(f) is not None for f in DIM_FIELDS if f != "num_key_value_heads"):
        return BaseDims.from_config(base_card)
    response = await client.get(f"/v1/models/{base_id}")
    card = response.json() if response.status_code == 200 else {}
    try:
        return BaseDims.from_config(card)
    except ValueError:
        raise ValueError(
            f"the server's model card for {base_id!r} has no {list(DIM_FIELDS)}; "
            "pass --base-config PATH to the base model's HF config.json"
        ) from None


async def upload_adapter(
    client: httpx.AsyncClient, name: str, files: dict[str, bytes], replace: bool
) -> httpx.Response:
    """POST /v1/adapters (multipart: text field `name`, one `files` field per file)."""
    parts = [
        ("files", (file_name, data, "application/octet-stream"))
        for file_name, data in files.items()
    ]
    params = {"replace": "true"} if replace else {}
    return await client.post("/v1/adapters", data={"name": name}, files=parts, params=params)


@dataclass(frozen=True)
class UploadResult:
    name: str
    kind: str
    rank: int
    status: int
    error: str | None


async def upload_adapters(
    client: httpx.AsyncClient,
    dims: BaseDims,
    plans: Sequence[AdapterPlan],
    replace: bool = True,
    on_done: Callable[[UploadResult], None] | None = None,
) -> list[UploadResult]:
    """Generate and upload each planned adapter in turn; failures are recorded, not raised."""
    results = []
    for plan in plans:
        config, tensors = make_adapter(dims, plan.kind, plan.rank, plan.seed)
        response = await upload_adapter(client, plan.name, adapter_files(config, tensors), replace)
        error = None if response.is_success else _error_text(response)
        if error:
            log.warning("upload of %s failed (%d): %s", plan.name, response.status_code, error)
        results.append(UploadResult(plan.name, plan.kind, plan.rank, response.status_code, error))
        if on_done is not None:
            on_done(results[-1])
    return results


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error", {}).get("message") or body)
    except ValueError:
        return response.text[:300]
