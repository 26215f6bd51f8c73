"""The adapter a fine-tuning job trains: the job's `adapter` object (our extension of OpenAI's
API), the trainable model it makes of the base, and the folder it is saved as.

peft trains the kinds it has (LoRA, DoRA, rsLoRA, prefix tuning, prompt tuning, IA3) and saves
them with its own `save_pretrained`; the LLM-Adapters bottlenecks (series, parallel) are ours,
written as LLM-Adapters defines them (its peft fork's `bottleneck.py`):
- each target gains `adapter_down` (size x d_in, nn.Linear's default init) and `adapter_up`
  (d_out x size, zeros, so training starts at the base), and with scaling "learned" a scalar
  `adapter_scaling` initialized to 1;
- series on gate/up ("mh_adapter"): y = W (x + s U f(D drop(x))); on down ("output_adapter"):
  z = W x, y = z + s U f(D drop(z)); parallel: y = W x + s U f(D drop(x));
- saved as LLM-Adapters saves them (peft_type BOTTLENECK, keys
  `base_model.model.<module>.adapter_down.weight`), in safetensors, which the server reads.
Defaults are the LLM-Adapters paper's: LoRA r 8, alpha 16, dropout 0.05 on q/k/v/up/down;
bottleneck size 256 with tanh, series on gate/up/down, parallel on q/k/v.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

Target = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NonLinearity = Literal["tanh", "relu", "gelu", "silu", "sigmoid", "identity"]
ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraOptions(_Options):
    kind: Literal["lora", "dora"]
    r: int = Field(8, ge=1, le=1024, description="rank")
    alpha: float = Field(16.0, gt=0, description="lora_alpha: the update is scaled alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[Target] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    use_rslora: bool = Field(False, description="scale alpha / sqrt(r) (rsLoRA)")
    use_dora: bool = Field(False, description="DoRA (kind 'dora' sets it)")


class BottleneckOptions(_Options):
    kind: Literal["series", "parallel"]
    bottleneck_size: int = Field(256, ge=1, le=4096)
    non_linearity: NonLinearity = "tanh"
    scaling: float | Literal["learned"] = Field(1.0, description="a number, or 'learned'")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Target] | None = Field(
        None, description="default: gate/up/down for series, q/k/v for parallel (LLM-Adapters)"
    )

    def targets(self) -> list[str]:
        if self.target_modules is not None:
            return list(self.target_modules)
        return (
            ["gate_proj", "up_proj", "down_proj"]
            if self.kind == "series"
            else [
                "q_proj",
                "k_proj",
                "v_proj",
            ]
        )


class PrefixOptions(_Options):
    kind: Literal["prefix"]
    num_virtual_tokens: int = Field(20, ge=1, le=512)


class PromptOptions(_Options):
    kind: Literal["prompt"]
    num_virtual_tokens: int = Field(20, ge=1, le=512)
    init_text: str | None = Field(
        None,
        max_length=2000,
        description="start from this text's token embeddings; default: embeddings of tokens "
        "sampled from the vocabulary",
    )


class Ia3Options(_Options):
    kind: Literal["ia3"]
    target_modules: list[Target] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"], min_length=1
    )
    feedforward_modules: list[Target] = Field(default_factory=lambda: ["down_proj"])


AdapterOptions = Annotated[
    LoraOptions | BottleneckOptions | PrefixOptions | PromptOptions | Ia3Options,
    Field(discriminator="kind"),
]


def check_options(options: Any, max_rank: int) -> str | None:
    """Why the server could not serve what these options train (a field and a reason), or None."""
    if isinstance(options, LoraOptions) and options.r > max_rank:
        return f"adapter.r: {options.r} is above this server's --max-adapter-rank {max_rank}"
    if isinstance(options, BottleneckOptions):
        if options.bottleneck_size > max_rank:
            return (
                f"adapter.bottleneck_size: {options.bottleneck_size} is above this server's "
                f"--max-adapter-rank {max_rank}"
            )
        if options.kind == "series" and set(options.targets()) - {
            "gate_proj",
            "up_proj",
            "down_proj",
        }:
            return "adapter.target_modules: series adapters sit on gate_proj/up_proj/down_proj"
    if isinstance(options, Ia3Options) and set(options.feedforward_modules) - set(
        options.target_modules
    ):
        return "adapter.feedforward_modules must be among adapter.target_modules"
    return None


# ---------------------------------------------------------------- peft kinds


def peft_config(options: Any, model_dir: Path) -> Any:
    import peft

    if isinstance(options, LoraOptions):
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=list(options.target_modules),
            use_rslora=options.use_rslora,
            use_dora=options.use_dora or options.kind == "dora",
            bias="none",
        )
    if isinstance(options, PrefixOptions):
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens
        )
    if isinstance(options, PromptOptions):
        if options.init_text:
            return peft.PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=options.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=options.init_text,
                tokenizer_name_or_path=str(model_dir),  # the base's own, a local folder
            )
        return peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB,
        )
    if isinstance(options, Ia3Options):
        return peft.IA3Config(
            task_type="CAUSAL_LM",
            target_modules=list(options.target_modules),
            feedforward_modules=list(options.feedforward_modules),
        )
    raise TypeError(f"not a peft kind: {options!r}")


# ---------------------------------------------------------------- LLM-Adapters bottlenecks


class BottleneckLinear(nn.Module):
    """A frozen projection with an LLM-Adapters bottleneck on its input ("input"), its output
    ("output", series) or beside it ("parallel")."""

    def __init__(self, base: nn.Module, placement: str, options: BottleneckOptions) -> None:
        super().__init__()
        self.base, self.placement = base, placement
        width = base.out_features if placement == "output" else base.in_features
        d_out = base.out_features if placement == "parallel" else width
        self.adapter_down = nn.Linear(width, options.bottleneck_size, bias=False)
        self.adapter_up = nn.Linear(options.bottleneck_size, d_out, bias=False)
        nn.init.zeros_(self.adapter_up.weight)
        self.act = ACTIVATIONS[options.non_linearity]
        self.dropout = nn.Dropout(options.dropout)
        if options.scaling == "learned":
            self.adapter_scaling = nn.Parameter(torch.ones(1))
        else:
            self.scaling = float(options.scaling)

    def _delta(self, u: torch.Tensor) -> torch.Tensor:
        down = self.adapter_down.weight
        h = self.adapter_up(self.act(self.adapter_down(self.dropout(u.to(down.dtype)))))
        scale = self.adapter_scaling if hasattr(self, "adapter_scaling") else self.scaling
        return (h * scale).to(u.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "input":
            return self.base(x + self._delta(x))
        y = self.base(x)
        return y + self._delta(y if self.placement == "output" else x)


def attach_bottleneck(model: nn.Module, options: BottleneckOptions) -> nn.Module:
    """Wrap every target projection of `model` (a transformers causal LM) in place."""
    targets = set(options.targets())
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or not isinstance(module, nn.Linear):
            continue
        if options.kind == "parallel":
            placement = "parallel"
        else:
            placement = "output" if leaf == "down_proj" else "input"
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, leaf, BottleneckLinear(module, placement, options))
    return model


def bottleneck_config(options: BottleneckOptions) -> dict[str, Any]:
    """adapter_config.json as LLM-Adapters' BottleneckConfig saves it."""
    return {
        "peft_type": "BOTTLENECK",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "inference_mode": True,
        "bottleneck_size": options.bottleneck_size,
        "non_linearity": options.non_linearity,
        "adapter_dropout": options.dropout,
        "use_parallel_adapter": options.kind == "parallel",
        "use_adapterp": False,
        "target_modules": options.targets(),
        "scaling": options.scaling,
        "bias": "none",
        "init_weights": "bert",
        "modules_to_save": None,
    }


def bottleneck_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under LLM-Adapters' key names."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BottleneckLinear):
            prefix = f"base_model.model.{name}"
            out[f"{prefix}.adapter_down.weight"] = module.adapter_down.weight
            out[f"{prefix}.adapter_up.weight"] = module.adapter_up.weight
            if hasattr(module, "adapter_scaling"):
                out[f"{prefix}.adapter_scaling"] = module.adapter_scaling
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- one entry point per step


def attach(model: nn.Module, options: Any, model_dir: Path) -> nn.Module:
    """The trainable model: `model` (frozen) with a fresh adapter of `options`."""
    if isinstance(options, BottleneckOptions):
        return attach_bottleneck(model, options)
    import peft

    return peft.get_peft_model(model, peft_config(options, model_dir))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (checkpoints; the names are the model's own)."""
    return {
        n: p.detach().float().cpu().clone()  # a copy: the parameter moves on
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if missing or set(state) - set(params):
        raise ValueError(f"checkpoint does not fit the adapter (e.g. {missing[:2]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_adapter(model: nn.Module, options: Any, out: Path) -> Path:
    """The adapter as a servable folder: adapter_config.json + adapter_model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(options, BottleneckOptions):
        (out / "adapter_config.json").write_text(json.dumps(bottleneck_config(options), indent=2))
        save_file(bottleneck_state(model), str(out / "adapter_model.safetensors"))
        return out
    model.save_pretrained(str(out), safe_serialization=True)
    for extra in ("README.md",):  # peft's model card names the local base path: not needed
        (out / extra).unlink(missing_ok=True)
    return out
