"""Own compact Llama-family model (Llama 1/2/3, SmolLM, TinyLlama, Mistral-style, Qwen2 qkv bias).

Runs on a flattened, paged batch (`ForwardBatch`), K/V written into a block cache. Adapters
plug in through `AdapterHooks` at each projection site (q|k|v, o, gate|up, down): `pre` on a
target's input, `post` on the site's output, with the step's AdapterBatch. A block takes its
layer's state as arguments (its cache views, its adapter stacks), so one compiled block serves
every layer (server/model/compiled.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from adapterserve import kernels
from adapterserve.kernels import AdapterBatch
from adapterserve.server.model.batch import ForwardBatch, PrefillChunk
from adapterserve.server.model.quant import (
    Codes,
    Int8GroupLinear,
    Int8Linear,
    Mode,
    QuantLinear,
    codes_for,
    quantize_group,
)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # HF rope_scaling / rope_parameters items
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            mlp_bias=cfg.get("mlp_bias", False),
        )

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class AdapterHooks(Protocol):
    """Where adapters act (adapters.hooks.PoolHooks). `layer(i)` is layer i's adapter state
    (its `sites` in SITE order), passed back to `pre` / `post`."""

    def layer(self, i: int) -> Any: ...

    def pre(self, site: Any, i: int, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor: ...

    def post(
        self,
        site: Any,
        x: torch.Tensor | tuple[torch.Tensor, ...],
        y: torch.Tensor,
        batch: AdapterBatch,
    ) -> torch.Tensor: ...

    def embed(self, x: torch.Tensor, token_ids: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """The token embeddings with LoRA on embed_tokens applied."""
        ...

    def head(self, logits: torch.Tensor, h: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """The logits with LoRA on lm_head applied (batch: over the logits' rows)."""
        ...


@dataclass(frozen=True, eq=False)
class Adapting:
    """A layer's adapter state for one step: the hooks, the layer's sites, the step's batch."""

    hooks: AdapterHooks
    sites: tuple[Any, ...]  # the hooks' per-site state, in SITE order (qkv, o, gate_up, down)
    batch: AdapterBatch

    def project(
        self, index: int, linears: tuple[Callable, ...], fused: Callable | None, x: torch.Tensor
    ) -> torch.Tensor:
        """A site's output with its adapters: fused into one matmul unless a target needs its
        own input (an input-side adapter), then split."""
        site = self.sites[index]
        if fused is not None and not site.splits:
            return self.hooks.post(site, x, fused(x), self.batch)
        inputs = tuple(self.hooks.pre(site, i, x, self.batch) for i in range(len(linears)))
        if len(inputs) == 1:
            return self.hooks.post(site, inputs[0], linears[0](inputs[0]), self.batch)
        y = torch.cat([lin(u) for lin, u in zip(linears, inputs, strict=True)], dim=-1)
        return self.hooks.post(site, inputs, y, self.batch)


SITE_QKV, SITE_O, SITE_GATE_UP, SITE_DOWN = range(4)  # adapters.pool.SITES order


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear or Llama-3 scaling when the config asks."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = dict(args.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    if kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, d) in HF's half-split layout; cos (T, 1, d) = [cos, cos] and sin (T, 1, d) =
    [-sin, sin] per position (Transformer.rope): [x1 cos - x2 sin, x2 cos + x1 sin] as four
    ops, the halves swapped by a roll (a - b == a + (-b) exactly, so HF's values bit for bit)."""
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one op: same math
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # fp32 statistics, as HF does
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.args, self.layer = args, layer
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: Dense | None = None  # fused q|k|v, built by fuse()
        self.wo: Dense | None = None
        self.targets: tuple[Callable, ...] | None = None  # q, k, v apart (split path), by fuse()
        self.ops = kernels.ops_for("cpu")  # set by Transformer.use_ops

    def fuse(self, cpu: bool) -> None:
        """Concatenate q/k/v into one matmul; called once after weights are loaded."""
        if isinstance(self.wqkv, QuantLinear):
            return
        linears = (self.q_proj, self.k_proj, self.v_proj)
        bias = fuse_weights([lin.bias for lin in linears]) if self.args.attention_bias else None
        self.wqkv = Dense(fuse_weights([lin.weight for lin in linears]), bias, cpu)
        self.wo = Dense(self.o_proj.weight.detach(), None, cpu)
        self.targets = _parts(self.wqkv, [lin.out_features for lin in linears])

    def quantize(self, mode: Mode, sources: dict[str, Codes], device: torch.device) -> None:
        """Quantized fused q|k|v and o (and per-target layers for the split path); `sources`:
        int4 codes read as they ship, by target name, else the loaded float weights."""
        names = ("q_proj", "k_proj", "v_proj")
        self.wqkv, parts = _quantized(self, names, sources, mode, device)
        for name, part in zip(names, parts, strict=True):
            setattr(self, name, part)
        self.targets = tuple(parts)
        self.wo, [self.o_proj] = _quantized(self, ("o_proj",), sources, mode, device)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: LayerKV,
        step: AttentionStep,
        adapting: Adapting | None,
    ) -> torch.Tensor:
        a, T = self.args, x.shape[0]
        targets = self.targets or (self.q_proj, self.k_proj, self.v_proj)
        qkv = self._project(SITE_QKV, targets, self.wqkv, x, adapting)
        qkv = qkv.view(T, a.n_heads + 2 * a.n_kv_heads, a.head_dim)
        qk = apply_rope(qkv[:, : a.n_heads + a.n_kv_heads], *rope)  # one rotation for q and k
        q, k = qk[:, : a.n_heads], qk[:, a.n_heads :]  # (T, H, d), (T, kvh, d)
        v = qkv[:, a.n_heads + a.n_kv_heads :]  # (T, kvh, d)
        self.ops.write_kv(kv.k, kv.v, step.slot_mapping, k, v)
        out = self._attend(q, k, v, kv, step).view(T, -1)  # (T, H*d)
        return self._project(SITE_O, (self.wo or self.o_proj,), self.wo, out, adapting)

    def _project(self, index, linears, fused, x, adapting: Adapting | None) -> torch.Tensor:
        if adapting is not None:
            return adapting.project(index, linears, fused, x)
        if fused is not None:
            return fused(x)
        return torch.cat([lin(x) for lin in linears], dim=-1)

    def _attend(self, q, k, v, kv: LayerKV, step: AttentionStep) -> torch.Tensor:
        """(T, H, d): decode rows against the paged cache, prefill chunks causally."""
        scale = 1.0 / math.sqrt(self.args.head_dim)
        D = step.decode_context_lens.shape[0]
        if not step.prefills:  # decode rows only: the op's output is the whole result
            return self.ops.paged_decode_attention(
                q.contiguous(),
                kv.k,
                kv.v,
                step.decode_block_tables,
                step.decode_context_lens,
                scale,
            )
        out = q.new_empty(q.shape)  # (T, H, d), contiguous (q is a strided view)
        if D:
            out[:D] = self.ops.paged_decode_attention(
                q[:D].contiguous(),
                kv.k,
                kv.v,
                step.decode_block_tables,
                step.decode_context_lens,
                scale,
            )
        for chunk in step.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            out[rows] = prefill_attention(q[rows], k[rows], v[rows], kv.k, kv.v, chunk, scale)
        return out


@dataclass(frozen=True, eq=False)
class LayerKV:
    """One layer's paged cache: (num_blocks + 1, block_size, kvh, d) each (the last block is
    the trash block that padding rows write to)."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True, eq=False)
class AttentionStep:
    """What attention needs of a step (the fields of ForwardBatch it reads)."""

    slot_mapping: torch.Tensor  # (T,) int64
    decode_block_tables: torch.Tensor  # (D, nb) int64
    decode_context_lens: torch.Tensor  # (D,) int64
    prefills: tuple[PrefillChunk, ...] = ()

    @classmethod
    def of(cls, batch: ForwardBatch) -> AttentionStep:
        return cls(
            batch.slot_mapping, batch.decode_block_tables, batch.decode_context_lens, batch.prefills
        )


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one prompt chunk; earlier chunks' keys come from the paged cache.
    On CPU every row is computed as `kernels.attend` does (the same bits whatever the chunk)."""
    past = chunk.context_len - chunk.length
    if q.device.type == "cpu":
        return _invariant_prefill_attention(q, k, v, k_cache, v_cache, chunk, scale)
    if past == 0:  # whole prompt in this step: keys are the chunk itself
        keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
    else:
        keys = kernels.gather_kv(k_cache, chunk.block_table[None], chunk.context_len)[
            0
        ]  # (kvh, L, d)
        values = kernels.gather_kv(v_cache, chunk.block_table[None], chunk.context_len)[0]
        query_pos = torch.arange(past, chunk.context_len, device=q.device)
        mask = torch.arange(chunk.context_len, device=q.device)[None, :] <= query_pos[:, None]
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys,
        values,
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )  # (H, Tc, d)
    return out.transpose(0, 1)


def _invariant_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    """prefill_attention through kernels.attend: q (Tc, H, d) -> (Tc, H, d) in q's dtype."""
    Tc, H, d = q.shape
    kvh, past = k.shape[1], chunk.context_len - chunk.length
    if past == 0:  # whole prompt in this step: keys are the chunk itself
        keys, values = k.transpose(0, 1), v.transpose(0, 1)  # (kvh, Tc, d)
    else:
        keys = kernels.gather_kv(k_cache, chunk.block_table[None], chunk.context_len)[
            0
        ]  # (kvh, L, d)
        values = kernels.gather_kv(v_cache, chunk.block_table[None], chunk.context_len)[0]
    rows = q.transpose(0, 1).reshape(kvh, H // kvh * Tc, d)  # a KV head's query heads, stacked
    positions = torch.arange(past, chunk.context_len, device=q.device).repeat(H // kvh)[None]
    out = kernels.attend(rows, keys, values, positions, scale)  # (kvh, g * Tc, d)
    return out.view(H, Tc, d).transpose(0, 1).to(q.dtype)


def fuse_weights(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate along dim 0 and re-point each parameter at its slice (no second copy)."""
    fused = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


class Dense:
    """y = x @ W^T + b for a float base's projections and LM head.

    On CPU every row is computed the same way whatever the step's row count (batch invariance:
    a prompt's last token alone after a prefix-cache hit, or inside a whole prefill, gives the
    same bits): `kernels.rows_mm` over an in-major copy of W, in tiles of a fixed number of
    rows. MKL's fastest call by row count (a GEMV for one row, (W @ x^T)^T for a few) sums in
    another order for each. The in-major copy doubles weight memory on CPU only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cpu: bool) -> None:
        self.weight, self.bias = weight, bias  # (out, in), (out,)
        self.in_major = weight.t().contiguous().t() if cpu else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_major is None:
            return F.linear(x, self.weight, self.bias)
        y = kernels.rows_mm(x, self.in_major.t())  # (T, out)
        return y if self.bias is None else y + self.bias

    def rows(self, start: int, stop: int) -> Dense:
        """Output rows [start, stop) as a layer of their own (views: one target of a fused
        layer, for the split path of input-side adapters)."""
        part = Dense.__new__(Dense)
        part.weight = self.weight[start:stop]
        part.bias = None if self.bias is None else self.bias[start:stop]
        part.in_major = None if self.in_major is None else self.in_major[start:stop]
        return part


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.w13: Dense | None = None  # fused gate|up, built by fuse()
        self.w2: Dense | None = None
        self.targets: tuple[Callable, ...] | None = None  # gate, up apart (split path)

    def fuse(self, cpu: bool) -> None:
        if isinstance(self.w13, QuantLinear):
            return
        if self.gate_proj.bias is None:
            self.w13 = Dense(fuse_weights([self.gate_proj.weight, self.up_proj.weight]), None, cpu)
            self.w2 = Dense(self.down_proj.weight.detach(), None, cpu)
            self.targets = _parts(
                self.w13, [self.gate_proj.out_features, self.up_proj.out_features]
            )

    def quantize(self, mode: Mode, sources: dict[str, Codes], device: torch.device) -> None:
        names = ("gate_proj", "up_proj")
        self.w13, parts = _quantized(self, names, sources, mode, device)
        self.gate_proj, self.up_proj = parts
        self.targets = tuple(parts)
        self.w2, [self.down_proj] = _quantized(self, ("down_proj",), sources, mode, device)

    def forward(self, x: torch.Tensor, adapting: Adapting | None) -> torch.Tensor:
        linears = self.targets or (self.gate_proj, self.up_proj)
        if adapting is None:
            fused = self.w13(x) if self.w13 is not None else torch.cat([f(x) for f in linears], -1)
        else:
            fused = adapting.project(SITE_GATE_UP, linears, self.w13, x)
        gate, up = fused.chunk(2, dim=-1)
        h = F.silu(gate) * up
        down = self.w2 or self.down_proj
        return down(h) if adapting is None else adapting.project(SITE_DOWN, (down,), None, h)


def _parts(fused: Dense, sizes: list[int]) -> tuple[Dense, ...]:
    """The fused layer's targets apart, as views of its rows."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(fused.rows(start, start + size) for start, size in zip(starts, sizes, strict=True))


def _quantized(
    module: nn.Module,
    names: tuple[str, ...],
    sources: dict[str, Codes],
    mode: Mode,
    device: torch.device,
) -> tuple[QuantLinear, list[QuantLinear]]:
    linears = [getattr(module, name) for name in names]
    weights = [sources.get(n, lin.weight) for n, lin in zip(names, linears, strict=True)]
    return quantize_group(weights, [lin.bias for lin in linears], mode, device)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = FeedForward(args, layer)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: LayerKV,
        step: AttentionStep,
        adapting: Adapting | None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, kv, step, adapting)
        return h + self.mlp(self.post_attention_layernorm(h), adapting)


def run_block(
    block: TransformerBlock,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: LayerKV,
    step: AttentionStep,
    adapting: Adapting | None,
) -> torch.Tensor:
    """One block as a plain function of its inputs (the unit server/model/compiled.py compiles:
    every layer's arguments have the same shapes, so one compiled graph serves them all)."""
    return block(x, (cos, sin), kv, step, adapting)


class KVCache:
    """Paged K/V: per layer (num_blocks + 1, block_size, kvh, d) buffers, preallocated once. Block
    `num_blocks` (the last) is the trash block: padding rows write there, no sequence owns it."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype, device) -> None:
        shape = (args.n_layers, num_blocks + 1, block_size, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [LayerKV(self.k[i], self.v[i]) for i in range(args.n_layers)]

    @property
    def trash_block(self) -> int:
        return self.num_blocks

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def write_all_layers(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Place given K/V at flat `slots` (n,) in every layer; kv (L, 2, n, kvh, d) (prefix
        tuning's virtual tokens, stored as is: they are not rotated)."""
        layers = self.k.shape[0]
        self.k.view(layers, -1, *self.k.shape[3:])[:, slots] = kv[:, 0].to(self.k.dtype)
        self.v.view(layers, -1, *self.v.shape[3:])[:, slots] = kv[:, 1].to(self.v.dtype)

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * args.n_layers * block_size * args.kv_dim * elem


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.hooks: AdapterHooks | None = None
        self.head: Dense | None = None
        self.quantization: Mode = "none"
        self.register_buffer("inv_freq", rope_inv_freq(args).float(), persistent=False)

    def fuse(self, cpu: bool = False) -> None:
        """Fuse q|k|v and gate|up into single matmuls; `cpu` picks CPU-specific matmul forms."""
        for block in self.layers:
            block.self_attn.fuse(cpu)
            block.mlp.fuse(cpu)
        if not isinstance(self.head, QuantLinear):
            self.head = Dense(self.lm_head.weight.detach(), None, cpu)

    def quantize(self, mode: Mode, sources: dict[str, Codes], device: torch.device) -> None:
        """Every projection `mode` (codes from `sources`, keyed `layers.3.mlp.up_proj` and
        `lm_head`: as they ship, or cached; the rest quantized from the loaded float weights)
        and the LM head int8 per
        output channel (its rows are the vocabulary: groups of 32 would not pay there), or with
        the GGUF's Q8_0 block scales when the file has it so. The
        float projection weights are dropped; embeddings and norms stay as loaded."""
        for i, block in enumerate(self.layers):
            mine = {
                k.removeprefix(f"layers.{i}."): v
                for k, v in sources.items()
                if k.startswith(f"layers.{i}.")
            }
            for part, module in (("self_attn.", block.self_attn), ("mlp.", block.mlp)):
                module.quantize(
                    mode,
                    {k.removeprefix(part): v for k, v in mine.items() if k.startswith(part)},
                    device,
                )
        head = codes_for(sources.get("lm_head", self.lm_head.weight), "int8")
        if head.group_size is not None:  # a GGUF's Q8_0 head (or embeddings), as it ships
            self.head = Int8GroupLinear(head, None, device)
        else:
            self.head = Int8Linear.of(head, None, device)
        self.quantization = mode
        if not self.args.tie_word_embeddings:
            self.lm_head = self.head  # the float head is not kept

    def base_weight(self, layer: int, target: str) -> torch.Tensor:
        """A projection's float32 weight (out, in) on the CPU (dequantized when the base is
        quantized): what adapters that derive from the base (DoRA's norms) read."""
        block = self.layers[layer]
        module = {
            "q": block.self_attn.q_proj,
            "k": block.self_attn.k_proj,
            "v": block.self_attn.v_proj,
            "o": block.self_attn.o_proj,
            "gate": block.mlp.gate_proj,
            "up": block.mlp.up_proj,
            "down": block.mlp.down_proj,
        }[target]
        weight = module.dequantize() if isinstance(module, QuantLinear) else module.weight
        return weight.detach().to(device="cpu", dtype=torch.float32)

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every projection, the LM head, the norms
        (embeddings: one row per token, not counted)."""

        def size(layer) -> int:
            if isinstance(layer, QuantLinear):
                return layer.weight_bytes
            return layer.weight.numel() * layer.weight.element_size()

        layers = []
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            layers += (
                [attn.wqkv, attn.wo]
                if attn.wqkv is not None
                else [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            )
            layers += (
                [mlp.w13, mlp.w2]
                if mlp.w13 is not None
                else [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            )
        total = sum(size(layer) for layer in layers)
        norms = sum(p.numel() * p.element_size() for n, p in self.named_parameters() if "norm" in n)
        return total + size(self.head) + norms

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every row's angles in apply_rope's layout, once per step: (T, 1, d)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, d/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]

    def use_ops(self, ops: kernels.Ops) -> None:
        """The kernel implementation every layer calls (resolved once, by the engine)."""
        for block in self.layers:
            block.self_attn.ops = ops

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Runs the batch, filling the cache; returns fp32 logits (N, vocab) for batch.logits_indices."""
        return self.finish(self.run_layers(self.embed(batch), batch, cache, run_block), batch)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.token_ids)  # (T, dim)
        if self.hooks is not None and batch.adapters is not None:  # LoRA on embed_tokens
            x = self.hooks.embed(x, batch.token_ids, batch.adapters)
        if batch.embed_rows is not None:  # prompt tuning's virtual tokens
            x = x.index_copy(0, batch.embed_rows, batch.embed_values.to(x.dtype))
        return x

    def run_layers(
        self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, block_fn: Callable
    ) -> torch.Tensor:
        """Every block through `block_fn` (run_block, or its compiled form). A step with no
        adapter token runs no hook at all."""
        cos, sin = self.rope(batch.positions)
        step = AttentionStep.of(batch)
        adapters = batch.adapters if self.hooks is not None else None
        for i, block in enumerate(self.layers):
            adapting = None
            if adapters is not None:
                adapting = Adapting(self.hooks, self.hooks.layer(i).sites, adapters)
            x = block_fn(block, x, cos, sin, cache.layers[i], step, adapting)
        return x

    def finish(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.norm(x[batch.logits_indices])  # (N, dim)
        head = self.lm_head if self.head is None else self.head
        logits = head(x).float()  # (N, vocab)
        if self.hooks is not None and batch.head_adapters is not None:  # LoRA on lm_head
            logits = self.hooks.head(logits, x, batch.head_adapters)
        return logits
