"""GGUF projections served as they ship: Q4_0, Q4_1 and Q4_K blocks read straight into int4
codes, scales and zero points, Q8_0 blocks into group-scaled int8 codes (no float round trip),
for the base's seven projections per layer.

Q8_0: a block holds 32 weights along the input: fp16 `d`, then 32 int8 `q`; w = d * q, so an
`Int8Codes` with group 32 and scale d (served by `Int8GroupLinear`).

Q4_0 / Q4_1: a block holds 32 weights along the input: fp16 `d` (Q4_1: then fp16 `m`), then 16
bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31. Q4_1: w = d * q + m, so
as an `Int4Linear` (group 32) scale = d, zero = m + 8 d; Q4_0: w = d * (q - 8), scale = d,
zero = 0. Q4_K (llama.cpp's k-quant, the 4-bit half of the common Q4_K_M files): a super-block
of 256 weights is fp16 `d` and `dmin`, 12 bytes of eight 6-bit (scale, min) pairs, then 128
bytes of nibbles, 32 bytes per 64 weights (low nibbles the first 32, high the next); sub-block
j of 32 weights is w = d * sc_j * q - dmin * m_j: group 32 again, scale = d sc_j, zero =
8 d sc_j - dmin m_j. llama.cpp stores a llama's q and k rows permuted for
its RoPE layout; they are put back in the order transformers' GGUF reader uses (rows only, so
blocks stay whole). Tensors of any other type are not read here: the model loads them from
the converted float checkpoint as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adapterserve.server.model.quant import INT4_ROW_MULTIPLE, Codes, Int4Codes, Int8Codes, Mode

BLOCK = 32
HEADER_BYTES = {"Q4_0": 2, "Q4_1": 4}  # fp16 d (and fp16 m), then 16 bytes of nibbles
Q4_K_BYTES, Q4_K_WEIGHTS = 144, 256  # fp16 d, fp16 dmin, 12 bytes of scales, 128 of nibbles
INT4_TYPES = frozenset({*HEADER_BYTES, "Q4_K"})
Q8_0_BYTES = 2 + BLOCK  # fp16 d, then 32 int8 codes
INT8_TYPES = frozenset({"Q8_0"})
TARGETS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def projection_types(path: Path) -> dict[str, str]:
    """GGUF type name (Q4_1, Q8_0, F16, ...) of each layer projection in the file."""
    from gguf import GGUFReader

    return {
        t.name: t.tensor_type.name
        for t in GGUFReader(str(path)).tensors
        if t.name.split(".")[2:3] and t.name.split(".")[2] in TARGETS
    }


def read_int4(path: Path) -> dict[str, Codes]:
    """Every Q4_0 / Q4_1 / Q4_K projection of the file as int4 codes, keyed by our module name
    (`layers.3.mlp.up_proj`)."""
    return read_codes(path, "int4")


def read_codes(path: Path, mode: Mode, tied: bool = False) -> dict[str, Codes]:
    """Every projection of the file whose type `mode` serves as it ships (int4: Q4_0, Q4_1,
    Q4_K; int8: Q8_0), keyed by our module name; and, under either mode (the head is int8 in
    both), the LM head as `lm_head` when it is Q8_0 in the file (`tied`: the embeddings)."""
    from gguf import GGUFReader

    types = {"int4": INT4_TYPES, "int8": INT8_TYPES}.get(mode, frozenset())

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    out: dict[str, Codes] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")  # blk.3.ffn_up.weight
        kind = tensor.tensor_type.name
        if (
            kind not in types
            or len(parts) != 4
            or parts[0] != "blk"
            or parts[2] not in TARGETS
            or parts[3] != "weight"
        ):
            continue
        data = np.asarray(tensor.data)
        codes = int8_blocks(data) if kind in INT8_TYPES else int4_blocks(data, kind)
        if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            codes = _unpermute(codes, heads if parts[2] == "attn_q" else kv_heads)
        out[f"layers.{parts[1]}.{TARGETS[parts[2]]}"] = codes
    head = next(
        (t for t in reader.tensors if t.name == ("token_embd.weight" if tied else "output.weight")),
        None,
    )
    if (
        mode in ("int4", "int8")
        and head is not None
        and head.tensor_type.name in INT8_TYPES
        and head.data.shape[0] % INT4_ROW_MULTIPLE == 0
    ):
        out["lm_head"] = int8_blocks(np.asarray(head.data))
    return out


def read_floats(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The projections named in `names` (our module names) as float weights, dequantized by
    gguf-py (the reader transformers uses) with q/k rows put back as transformers does: the
    same tensors transformers' GGUF reader gives, for projections the cached conversion does
    not hold."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in TARGETS or parts[3] != "weight":
            continue
        name = f"layers.{parts[1]}.{TARGETS[parts[2]]}"
        if name not in names:
            continue
        weight = torch.from_numpy(np.array(dequantize(np.asarray(tensor.data), tensor.tensor_type)))
        if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            weight = weight[
                _unpermute_order(weight.shape[0], heads if parts[2] == "attn_q" else kv_heads)
            ]
        out[name] = weight
    return out


def int4_blocks(data: np.ndarray, kind: str) -> Int4Codes:
    """(out, in / 32 * block bytes) bytes of Q4_0 or Q4_1 blocks (or Q4_K super-blocks) ->
    Int4Codes."""
    if kind == "Q4_K":
        return _q4_k_blocks(data)
    rows, header = data.shape[0], HEADER_BYTES[kind]
    blocks = data.reshape(rows, -1, header + BLOCK // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., header:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # (out, blocks, 32)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + 8 * d
    else:
        zeros = np.zeros_like(d)
    return Int4Codes(
        torch.from_numpy(q.reshape(rows, -1).copy()),
        torch.from_numpy(d),
        torch.from_numpy(zeros),
        BLOCK,
    )


def int8_blocks(data: np.ndarray) -> Int8Codes:
    """(out, in / 32 * 34) bytes of Q8_0 blocks -> Int8Codes with a scale per group of 32."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (out, blocks)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return Int8Codes(torch.from_numpy(q), torch.from_numpy(d), BLOCK)


def _q4_k_blocks(data: np.ndarray) -> Int4Codes:
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, Q4_K_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (out, supers)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mins = _q4_k_scales(blocks[..., 4:16])  # (out, supers, 8) each, 6-bit
    nibbles = blocks[..., 16:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    q = (nibbles & 0x0F).reshape(rows, -1)  # sub-blocks: chunk 0 low, chunk 0 high, chunk 1 ...
    scales = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)  # exact: 11 x 6 bits
    offsets = (dmin[..., None] * mins.astype(np.float32)).reshape(rows, -1)
    return Int4Codes(
        torch.from_numpy(q.copy()),
        torch.from_numpy(scales),
        torch.from_numpy(8 * scales - offsets),
        BLOCK,
    )


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> eight 6-bit scales and mins: bytes 0-3 hold scales 0-3 (low 6 bits) and the
    high 2 bits of scales 4-7, bytes 4-7 the same for mins, bytes 8-11 the low 4 bits of scale
    (low nibble) and min (high nibble) 4-7."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    return sc, mins


def _unpermute_order(rows: int, heads: int) -> torch.Tensor:
    """transformers' reverse permutation of a llama's q (heads = the head count) or k rows
    (heads = the kv head count): row i of the result is row order[i] of the file (the inverse
    of llama.cpp's permute)."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def _unpermute(codes: Codes, heads: int) -> Codes:
    """_unpermute_order applied to the rows of codes, scales (and zeros)."""
    order = _unpermute_order(codes.codes.shape[0], heads)
    if isinstance(codes, Int8Codes):
        return Int8Codes(codes.codes[order], codes.scales[order], codes.group_size)
    return Int4Codes(codes.codes[order], codes.scales[order], codes.zeros[order], codes.group_size)


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode()
    return int(value[0])
