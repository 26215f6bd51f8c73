"""Weight-only quantized linear layers for the base model's projections and LM head.

Adapters stay full precision: a quantized layer replaces only the base matmul, so every hook
(LoRA deltas on the output, bottleneck and IA3 inputs, prefix and prompt tuning) runs as on a
float base.

- `int8`: one int8 code per weight, one scale per output channel (symmetric, absmax / 127).
- `int4`: unsigned 4-bit codes in groups of `group_size` along the input, one scale and one
  zero point per group: w = (q - 8) * scale + zero, q in [0, 15]. This is exactly GGUF's Q4_1
  (w = d * q + m, 32 per block) with scale = d, zero = m + 8 d, so a Q4_1 tensor loads as it
  ships (server/model/gguf_quant.py).

The matmuls are torch's own weight-only kernels (`_weight_int8pack_mm`, and
`_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` on CUDA): they take bfloat16
activations for their fast paths (fp32 activations fall back to a slow reference loop,
many times slower on CPU; BENCHMARKS.md, 'Figures quoted from the code'), so a quantized layer computes in bf16 (scales included) and returns the
caller's dtype. The bf16 rounding of activations, scales and outputs (2**-9 relative) is the
error a quantized layer adds on top of its codes; tests bound it as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Mode = Literal["none", "int8", "int4"]
COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # the CPU packing's block of output rows (CUDA needs 8)


@dataclass(frozen=True)
class Int4Codes:
    """One projection's int4 representation: codes (out, in) integers in [0, 15]; scales and
    zeros (out, in / group_size) float32; w = (q - 8) * scale + zero."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Codes:
        """Asymmetric min/max quantization per group of `group_size` inputs."""
        w = weight.detach().float()
        out_features, in_features = w.shape
        if group_size not in INT4_GROUP_SIZES or in_features % group_size:
            raise ValueError(
                f"int4 needs an input size ({in_features}) that is a multiple of the group size "
                f"({group_size}, one of {INT4_GROUP_SIZES})"
            )
        groups = w.view(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
        return cls(
            codes.view(out_features, in_features).to(torch.uint8),
            scales,
            low + 8 * scales,
            group_size,
        )

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        q = self.codes.float().view(out_features, -1, self.group_size)
        w = (q - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.view(out_features, in_features)

    @staticmethod
    def cat(parts: list[Int4Codes]) -> Int4Codes:
        """Rows of `parts` one after the other (one fused layer)."""
        assert len({p.group_size for p in parts}) == 1
        return Int4Codes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            parts[0].group_size,
        )


@dataclass(frozen=True)
class Int8Codes:
    """One projection's int8 representation: codes (out, in) int8 and float32 scales, either
    one per output channel, scales (out,) (symmetric, absmax / 127: what `quantize` makes), or
    one per group of `group_size` inputs, scales (out, in / group_size) (GGUF's Q8_0, read as
    it ships: group 32); w = q * scale."""

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int | None = None  # None: per output channel

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Codes:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        return cls(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales)

    def dequantize(self) -> torch.Tensor:
        if self.group_size is None:
            return self.codes.float() * self.scales[:, None]
        out_features, in_features = self.codes.shape
        q = self.codes.float().view(out_features, -1, self.group_size)
        return (q * self.scales[..., None]).view(out_features, in_features)

    def grouped(self, group_size: int = 32) -> Int8Codes:
        """The same weights with a scale per group (a channel's scale repeated: exact)."""
        if self.group_size is not None:
            if self.group_size != group_size:
                raise ValueError(
                    f"int8 groups of {self.group_size} and {group_size} cannot be fused"
                )
            return self
        out_features, in_features = self.codes.shape
        if in_features % group_size:
            raise ValueError(
                f"{in_features} inputs are not a multiple of the group size {group_size}"
            )
        scales = self.scales[:, None].expand(out_features, in_features // group_size)
        return Int8Codes(self.codes, scales.contiguous(), group_size)

    def planes(self) -> Int4Codes:
        """The group-scaled codes as int4 codes over twice the inputs, for the int4 kernel:
        q = 16 hi + lo (hi = q >> 4 in [-8, 7], lo = q & 15 in [0, 15]); the first half holds
        hi + 8 with scale 16 s and zero 0, the second lo with scale s and zero 8 s, so that
        x @ W^T = [x, x] @ [W_hi, W_lo]^T with every code kept."""
        assert self.group_size is not None
        q = self.codes.to(torch.int16)
        codes = torch.cat([(q >> 4) + 8, q & 15], dim=1).to(torch.uint8)
        s = self.scales.float()
        return Int4Codes(
            codes,
            torch.cat([16 * s, s], dim=1),
            torch.cat([torch.zeros_like(s), 8 * s], dim=1),
            self.group_size,
        )

    @staticmethod
    def cat(parts: list[Int8Codes]) -> Int8Codes:
        assert len({p.group_size for p in parts}) == 1
        return Int8Codes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            parts[0].group_size,
        )


Codes = Int8Codes | Int4Codes


def codes_for(weight: torch.Tensor | Codes, mode: Mode, group_size: int = 32) -> Codes:
    """`weight` (float, or codes already) as `mode` codes: int8 from int4 codes goes through
    their float values."""
    if mode == "int8":
        if isinstance(weight, Int8Codes):
            return weight
        return Int8Codes.quantize(weight.dequantize() if isinstance(weight, Int4Codes) else weight)
    if mode == "int4":
        if isinstance(weight, Int4Codes):
            return weight
        return Int4Codes.quantize(
            weight.dequantize() if isinstance(weight, Int8Codes) else weight, group_size
        )
    raise ValueError(f"quantization must be int8 or int4, got {mode!r}")


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T (+ b), computed by a weight-only kernel; a drop-in for `Dense` and
    for one target's `nn.Linear` (split projections)."""

    mode: Mode = "none"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the model's activations are (tokens, features): one op less each way
            return self.forward(x.reshape(-1, self.in_features)).reshape(
                *x.shape[:-1], self.out_features
            )
        y = self._mm(x.to(COMPUTE_DTYPE).contiguous()).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 weights (out, in) the codes stand for, with fp32 scales."""
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        """Bytes a matmul reads: codes and scales (and zero points)."""
        raise NotImplementedError


# On CUDA, torch's `_weight_int8pack_mm` is a naive kernel (one thread per output, a scalar loop
# over K, the weights read uncoalesced): fine for a decode row or a few, seconds for a long
# prefill. From this many rows on (prefill chunks), an int8 layer on CUDA dequantizes its weights
# to bf16 for the call and multiplies on cuBLAS instead. Where the kernel starts to lose is for
# a GPU to measure (`bench_kernels.time_int8_paths`, run by benchmarks/run_kernels_gpu.sh).
CUDA_DEQUANT_ROWS = 16


def dequantizes(device_type: str, rows: int) -> bool:
    """Whether an int8 matmul of `rows` rows on `device_type` takes the dequantized bf16 path."""
    return device_type == "cuda" and rows >= CUDA_DEQUANT_ROWS


class Int8Linear(QuantLinear):
    mode: Mode = "int8"

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__(codes.shape[0], codes.shape[1], bias)
        assert codes.dtype == torch.int8 and scales.shape == (codes.shape[0],)
        self.codes = codes.contiguous()  # (out, in)
        if self.bias is not None:
            self.bias = self.bias.to(codes.device)
        self.scales = scales.float()  # (out,), kept exact for dequantize()
        self.kernel_scales = scales.to(COMPUTE_DTYPE)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        return cls.of(Int8Codes.quantize(weight), bias)

    @classmethod
    def of(
        cls, source: Int8Codes, bias: torch.Tensor | None = None, device: torch.device | None = None
    ) -> Int8Linear:
        device = device or source.codes.device
        return cls(source.codes.to(device), source.scales.to(device), bias)

    def rows(self, start: int, stop: int, bias: torch.Tensor | None = None) -> Int8Linear:
        """Output rows [start, stop) as a layer of their own, sharing this one's memory."""
        part = Int8Linear.__new__(Int8Linear)
        QuantLinear.__init__(part, stop - start, self.in_features, bias)
        part.codes, part.scales = self.codes[start:stop], self.scales[start:stop]
        part.kernel_scales = self.kernel_scales[start:stop]
        return part

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if dequantizes(x.device.type, x.shape[0]):
            return self._dequantized_mm(x)
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.kernel_scales)

    def _dequantized_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (codes * scales)^T with the weights in x's dtype for this call (codes are exact in
        bf16; each product rounds once, as the kernel's output does)."""
        return x @ (self.codes.to(x.dtype) * self.kernel_scales[:, None].to(x.dtype)).t()

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]

    @property
    def weight_bytes(self) -> int:
        return self.codes.numel() + self.kernel_scales.numel() * 2


class Int4Linear(QuantLinear):
    mode: Mode = "int4"

    def __init__(
        self,
        source: Int4Codes,
        bias: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        out_features, in_features = source.codes.shape
        super().__init__(out_features, in_features, bias)
        if source.group_size not in INT4_GROUP_SIZES or in_features % source.group_size:
            raise ValueError(f"bad int4 group size {source.group_size} for {in_features} inputs")
        device = device or source.codes.device
        if out_features % INT4_ROW_MULTIPLE or in_features % 32:
            raise ValueError(
                f"int4 kernels need outputs a multiple of {INT4_ROW_MULTIPLE} and inputs a "
                f"multiple of 32, got a {out_features} x {in_features} projection"
            )
        self.group_size = source.group_size
        self.scales, self.zeros = source.scales.float().to(device), source.zeros.float().to(device)
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (in/g, out, 2)
        self.scales_and_zeros = sz.to(COMPUTE_DTYPE).contiguous()
        q = source.codes.to(device=device, dtype=torch.int32)
        if device.type == "cuda":
            packed_bytes = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        if self.bias is not None:
            self.bias = self.bias.to(device)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None
    ) -> Int4Linear:
        return cls(Int4Codes.quantize(weight, group_size), bias)

    def _mm(self, x: torch.Tensor, scales_and_zeros: torch.Tensor | None = None) -> torch.Tensor:
        sz = self.scales_and_zeros if scales_and_zeros is None else scales_and_zeros
        if x.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, sz)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes back from the packed layout (for tests): the kernel applied to the
        identity with scale 1 and zero 8 (so w = q), every code exact in bf16."""
        eye = torch.eye(self.in_features, dtype=COMPUTE_DTYPE, device=self.packed.device)
        unit = torch.ones_like(self.scales_and_zeros)
        unit[..., 1] = 8
        return self._mm(eye, unit).float().t().round().to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        return Int4Codes(self.codes(), self.scales, self.zeros, self.group_size).dequantize()

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features // 2 + self.scales_and_zeros.numel() * 2


class Int8GroupLinear(Int4Linear):
    """int8 codes with a scale per group of inputs (GGUF's Q8_0 as it ships), computed by the
    int4 kernel over two 4-bit planes of the codes (`Int8Codes.planes`): one call on [x, x].
    Torch has no group-scaled int8 kernel; this one reads as many code bytes as int8 and
    keeps every code and block scale (the scales in bf16, as for int4)."""

    mode: Mode = "int8"

    def __init__(
        self,
        source: Int8Codes,
        bias: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(source.planes(), bias, device)
        self.in_features = source.codes.shape[1]
        self.scales8 = source.scales.float().to(self.scales.device)
        self.group_size8 = source.group_size

    def _mm(self, x: torch.Tensor, scales_and_zeros: torch.Tensor | None = None) -> torch.Tensor:
        if scales_and_zeros is None:
            x = torch.cat([x, x], dim=1)
        return super()._mm(x, scales_and_zeros)

    def codes(self) -> torch.Tensor:
        """The plane codes (out, 2 in), as Int4Linear.codes reads them."""
        eye = torch.eye(2 * self.in_features, dtype=COMPUTE_DTYPE, device=self.packed.device)
        unit = torch.ones_like(self.scales_and_zeros)
        unit[..., 1] = 8
        return super()._mm(eye, unit).float().t().round().to(torch.uint8)

    def int8_codes(self) -> Int8Codes:
        planes = self.codes().to(torch.int16)
        q = 16 * (planes[:, : self.in_features] - 8) + planes[:, self.in_features :]
        return Int8Codes(q.to(torch.int8), self.scales8, self.group_size8)

    def dequantize(self) -> torch.Tensor:
        return self.int8_codes().dequantize()

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features + self.scales_and_zeros.numel() * 2


def quantize_group(
    weights: list[torch.Tensor | Codes],
    biases: list[torch.Tensor | None],
    mode: Mode,
    device: torch.device,
    group_size: int = 32,
) -> tuple[QuantLinear, list[QuantLinear]]:
    """One fused layer over the rows of `weights` (float, or codes: read as they ship or from
    the cache) and one layer per part, for the split path of input-side adapters. int8: the
    parts are row views of the fused layer; int4: packed apart (the packed layout cannot be
    sliced), the same codes. A single part is its own fused layer. Both schemes quantize each
    output row on its own, so fused and apart give the same codes."""
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases]).to(device)
    codes = [codes_for(w, mode, group_size) for w in weights]
    if mode == "int8" and any(c.group_size is not None for c in codes):  # a Q8_0 part: all grouped
        grouped = [c.grouped(next(c.group_size for c in codes if c.group_size)) for c in codes]
        fused8 = Int8GroupLinear(Int8Codes.cat(grouped), bias, device)
        if len(grouped) == 1:
            return fused8, [fused8]
        return fused8, [Int8GroupLinear(c, b, device) for c, b in zip(grouped, biases, strict=True)]
    if mode == "int8":
        fused = Int8Linear.of(Int8Codes.cat(codes), bias, device)
        parts, start = [], 0
        for c, b in zip(codes, biases, strict=True):
            rows = c.codes.shape[0]
            parts.append(fused.rows(start, start + rows, None if b is None else b.to(device)))
            start += rows
        return (fused, [fused]) if len(parts) == 1 else (fused, parts)
    fused = Int4Linear(Int4Codes.cat(codes), bias, device)
    if len(codes) == 1:
        return fused, [fused]
    parts = [Int4Linear(c, b, device) for c, b in zip(codes, biases, strict=True)]
    return fused, parts


def compute_supported(device: torch.device) -> bool:
    """Whether this device runs the bf16 weight-only kernels (a bf16 matmul works)."""
    try:
        x = torch.ones(1, 32, dtype=COMPUTE_DTYPE, device=device)
        torch.ops.aten._weight_int8pack_mm(
            x,
            torch.ones(8, 32, dtype=torch.int8, device=device),
            torch.ones(8, dtype=COMPUTE_DTYPE, device=device),
        )
        return True
    except (RuntimeError, NotImplementedError):
        return False
