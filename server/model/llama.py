"""Own compact Llama-family model (Llama 1/2/3, SmolLM, TinyLlama, Mistral-style, Qwen2 qkv bias).

Runs on a flattened, paged batch (`ForwardBatch`): no padding, K/V written into a block cache.
Adapters plug in through `AdapterHooks`: every linear projection calls `pre` on its input and
`post` on its output with the batch's per-token `slot_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from server.engine.batch import ForwardBatch, PrefillChunk

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


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
    """Where adapters act. `target` is one of TARGETS; tensors are (T, features) over the batch."""

    def pre(self, layer: int, target: str, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...

    def post(
        self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor: ...

    def post_fused(
        self, layer: int, targets: tuple[str, ...], x: torch.Tensor, fused: torch.Tensor,
        sizes: tuple[int, ...], batch: ForwardBatch,
    ) -> torch.Tensor:  # fmt: skip
        """`post` of each of `targets` on its columns of fused = [W_t1 x | W_t2 x | ...] (widths
        `sizes`), as one call so that the adapters can act on all of them at once."""
        ...

    def acts_before(self, layer: int, targets: tuple[str, ...], batch: ForwardBatch) -> bool:
        """Whether `pre` changes the input of any of `targets` in this batch. When it does not,
        the model keeps its fused q|k|v and gate|up matmuls and calls `post_fused`."""
        ...


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
    """x (T, heads, d) in HF's half-split layout; cos/sin (T, d/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (T, h, d/2) each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, d/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def fuse(self, cpu: bool) -> None:
        """Concatenate q/k/v into one matmul; called once after weights are loaded."""
        linears = (self.q_proj, self.k_proj, self.v_proj)
        bias = fuse_weights([lin.bias for lin in linears]) if self.args.attention_bias else None
        self.wqkv = Dense(fuse_weights([lin.weight for lin in linears]), bias, cpu)
        self.qkv_sizes = tuple(lin.out_features for lin in linears)
        self.wo = Dense(self.o_proj.weight.detach(), None, cpu)

    def qkv(self, x: torch.Tensor, batch: ForwardBatch, hooks: AdapterHooks | None) -> torch.Tensor:
        """(T, H + 2*kvh, d): query heads, then key heads, then value heads."""
        a = self.args
        if hooks is None and self.wqkv is not None:
            out = self.wqkv(x)
        elif self.wqkv is not None and not hooks.acts_before(self.layer, QKV, batch):
            out = hooks.post_fused(self.layer, QKV, x, self.wqkv(x), self.qkv_sizes, batch)
        else:
            projections = (("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj))
            out = torch.cat([project(self.layer, t, lin, x, batch, hooks) for t, lin in projections], dim=-1)
        return out.view(x.shape[0], a.n_heads + 2 * a.n_kv_heads, a.head_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache,
        batch: ForwardBatch, hooks: AdapterHooks | None,
    ) -> torch.Tensor:
        a, T = self.args, x.shape[0]
        qkv = self.qkv(x, batch, hooks)  # (T, H + 2*kvh, d)
        qk = apply_rope(qkv[:, : a.n_heads + a.n_kv_heads], *rope)  # one rotation for q and k
        q, k = qk[:, : a.n_heads], qk[:, a.n_heads :]  # (T, H, d), (T, kvh, d)
        v = qkv[:, a.n_heads + a.n_kv_heads :]  # (T, kvh, d)
        k_cache, v_cache = cache.layer(self.layer)
        cache.write(self.layer, batch.slot_mapping, k, v)
        out = q.new_empty(q.shape)  # (T, H, d), contiguous (q is a strided view)
        scale = 1.0 / math.sqrt(a.head_dim)
        D = batch.num_decode
        if D:
            out[:D] = kernels.paged_decode_attention(
                q[:D], k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, scale
            )
        for chunk in batch.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            out[rows] = prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
        if hooks is None and self.wo is not None:
            return self.wo(out.view(T, -1))
        return project(self.layer, "o", self.wo or self.o_proj, out.view(T, -1), batch, hooks)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, chunk: PrefillChunk, scale: float,
) -> torch.Tensor:
    """Causal attention of one prompt chunk; earlier chunks' keys come from the paged cache."""
    past = chunk.context_len - chunk.length
    if past == 0:  # whole prompt in this step: keys are the chunk itself
        keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
    else:
        keys = kernels.gather_kv(k_cache, chunk.block_table[None], chunk.context_len)[0]  # (kvh, L, d)
        values = kernels.gather_kv(v_cache, chunk.block_table[None], chunk.context_len)[0]
        query_pos = torch.arange(past, chunk.context_len, device=q.device)
        mask = torch.arange(chunk.context_len, device=q.device)[None, :] <= query_pos[:, None]
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )  # (H, Tc, d)
    return out.transpose(0, 1)


def fuse_weights(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate along dim 0 and re-point each parameter at its slice (no second copy)."""
    fused = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


class Dense:
    """y = x @ W^T + b for the fused fast path (no adapter hooks).

    On CPU it picks the MKL call that measured fastest for the row count (AVX2, 2 threads,
    `benchmarks/bench_engine.py`): one row reads an in-major copy of W (x @ W^T as a GEMV, ~1.4x
    faster); more rows compute (W @ x^T)^T on the row-major W (1.3-2.5x faster at 2-32 rows
    than F.linear). The in-major copy doubles weight memory on CPU only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cpu: bool) -> None:
        self.weight, self.bias = weight, bias  # (out, in), (out,)
        self.in_major = weight.t().contiguous().t() if cpu else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_major is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] == 1:
            return F.linear(x, self.in_major, self.bias)
        y = torch.mm(self.weight, x.t()).t().contiguous()  # (T, out)
        return y if self.bias is None else y + self.bias


QKV = ("q", "k", "v")
GATE_UP = ("gate", "up")


def project(
    layer: int, target: str, linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
    batch: ForwardBatch, hooks: AdapterHooks | None,
) -> torch.Tensor:
    """y = linear(x) with the adapter hook points around it."""
    if hooks is None:
        return linear(x)
    x_in = hooks.pre(layer, target, x, batch)
    return hooks.post(layer, target, x_in, linear(x_in), batch)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.w13: Dense | None = None  # fused gate|up, built by fuse()
        self.w2: Dense | None = None

    def fuse(self, cpu: bool) -> None:
        if self.gate_proj.bias is None:
            self.w13 = Dense(fuse_weights([self.gate_proj.weight, self.up_proj.weight]), None, cpu)
            self.w2 = Dense(self.down_proj.weight.detach(), None, cpu)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, hooks: AdapterHooks | None) -> torch.Tensor:
        if hooks is None and self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        if self.w13 is not None and not hooks.acts_before(self.layer, GATE_UP, batch):
            inter = self.gate_proj.out_features
            fused = hooks.post_fused(self.layer, GATE_UP, x, self.w13(x), (inter, inter), batch)
            gate, up = fused.chunk(2, dim=-1)
        else:
            gate = project(self.layer, "gate", self.gate_proj, x, batch, hooks)
            up = project(self.layer, "up", self.up_proj, x, batch, hooks)
        down = self.w2 or self.down_proj
        return project(self.layer, "down", down, F.silu(gate) * up, batch, hooks)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = FeedForward(args, layer)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache, batch, hooks) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, cache, batch, hooks)
        return h + self.mlp(self.post_attention_layernorm(h), batch, hooks)


class KVCache:
    """Paged K/V: per layer (num_blocks, block_size, kvh, d) buffers, preallocated once."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype, device) -> None:
        shape = (args.n_layers, num_blocks, block_size, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def write_all_layers(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Place given K/V at flat `slots` (n,) in every layer; kv (L, 2, n, kvh, d) (prefix
        tuning's virtual tokens, stored as is: they are not rotated)."""
        layers = self.k.shape[0]
        self.k.view(layers, -1, *self.k.shape[3:])[:, slots] = kv[:, 0].to(self.k.dtype)
        self.v.view(layers, -1, *self.v.shape[3:])[:, slots] = kv[:, 1].to(self.v.dtype)

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[i].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[i].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

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
        self.register_buffer("inv_freq", rope_inv_freq(args).float(), persistent=False)

    def fuse(self, cpu: bool = False) -> None:
        """Fuse q|k|v and gate|up into single matmuls; `cpu` picks CPU-specific matmul forms."""
        for block in self.layers:
            block.self_attn.fuse(cpu)
            block.mlp.fuse(cpu)
        self.head = Dense(self.lm_head.weight.detach(), None, cpu)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, d/2)
        return angles.cos(), angles.sin()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the batch, filling the cache; returns fp32 logits (N, vocab) for batch.logits_indices."""
        x = self.embed_tokens(batch.token_ids) if embeds is None else embeds  # (T, dim)
        if batch.embed_rows is not None:  # prompt tuning's virtual tokens
            x = x.index_copy(0, batch.embed_rows, batch.embed_values.to(x.dtype))
        rope = self.rope(batch.positions)
        if batch.adapter_slots is not None:
            with_adapters = bool(batch.adapter_slots)
        else:
            with_adapters = bool((batch.slot_ids >= 0).any())
        hooks = self.hooks if self.hooks is not None and with_adapters else None
        for block in self.layers:  # a step with no adapter token keeps the fused fast path
            x = block(x, rope, cache, batch, hooks)
        x = self.norm(x[batch.logits_indices])  # (N, dim)
        head = self.lm_head if self.head is None else self.head
        return head(x).float()  # (N, vocab)
