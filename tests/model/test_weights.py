"""Model location and loading: the embedded GGUF, the conversion cache, refusals with reasons."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterserve.server.model import weights
from adapterserve.server.model.weights import ModelLoadError, load_model, resolve_model_dir
from tests.helpers import make_tiny_llama


def test_default_model_is_found_through_package_metadata():
    path = weights.default_model_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_gguf_conversion_is_cached(default_model_dir, tmp_path, monkeypatch):
    # The session fixture already converted the file; a second resolve must not convert again.
    def no_conversion(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(weights, "_write_hf_dir", no_conversion)
    from adapterserve.server.config import Settings

    assert resolve_model_dir(None, Settings().cache_dir) == default_model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (default_model_dir / name).is_file()


def test_conversion_failure_leaves_no_partial_cache(tmp_path, monkeypatch):
    def broken(gguf, out, complete=True):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "_write_hf_dir", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(OSError):
        weights.convert_gguf(gguf, tmp_path / "cache")
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_gguf_projections_read_as_floats_equal_transformers(default_model_dir):
    """Every projection read from the GGUF as floats (what a server conversion, which leaves
    them out, loads for --quantization none) equals transformers' reader's tensor bit for bit,
    q/k rows un-permuted as transformers does."""
    from adapterserve.server.model.gguf_quant import read_floats

    tensors = load_file(str(default_model_dir / "model.safetensors"))
    names = {
        k.removeprefix("model.").removesuffix(".weight")
        for k in tensors
        if weights.PROJECTION_KEY.fullmatch(k)
    }
    floats = read_floats(weights.default_model_path(), names)
    assert len(names) == len(floats) == 210
    for name, weight in floats.items():
        assert torch.equal(weight, tensors[f"model.{name}.weight"]), name


def test_the_server_conversion_leaves_the_projections_in_the_gguf(
    default_model_dir, tmp_path, monkeypatch
):
    """The server's conversion (complete=False) holds no projection weights; the model loaded
    from it and the GGUF in fp32 equals the one loaded from the complete conversion; and a
    complete conversion, when present, serves the server's request too (no second one)."""
    gguf = weights.default_model_path()
    light = weights.convert_gguf(gguf, tmp_path / "c", complete=False)
    assert light.name.endswith("-light")
    kept = load_file(str(light / "model.safetensors"))
    assert not any(weights.PROJECTION_KEY.fullmatch(k) for k in kept)
    assert "model.embed_tokens.weight" in kept and "model.layers.29.input_layernorm.weight" in kept
    size = (light / "model.safetensors").stat().st_size
    assert size < (default_model_dir / "model.safetensors").stat().st_size / 3
    cpu = torch.device("cpu")
    ours = load_model(light, cpu, torch.float32, "none", gguf).state_dict()
    want = load_model(default_model_dir, cpu, torch.float32, "none").state_dict()
    assert ours.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(ours[key], value), key

    monkeypatch.setattr(weights, "_write_hf_dir", lambda *_: pytest.fail("converted again"))
    (tmp_path / "c" / "gguf" / default_model_dir.name).symlink_to(default_model_dir)
    assert weights.convert_gguf(gguf, tmp_path / "c", complete=False).name == default_model_dir.name


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_llama(tmp_path / "m")


def test_pickle_only_checkpoint_is_refused(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(model_dir, torch.device("cpu"), torch.float32)


def test_unsupported_architecture_is_refused(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_model(model_dir, torch.device("cpu"), torch.float32)


def test_shape_mismatch_names_the_tensor(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.0\.mlp\.up_proj.*\(3, 3\)"):
        load_model(model_dir, torch.device("cpu"), torch.float32)


def test_missing_tensor_is_reported(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="norm.weight"):
        load_model(model_dir, torch.device("cpu"), torch.float32)


def test_hub_cache_layout_resolves_to_snapshot(model_dir, tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(model_dir, snapshot)
    assert resolve_model_dir(str(tmp_path / "models--org--tiny"), tmp_path) == snapshot


def test_not_a_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_dir(str(tmp_path), tmp_path)


def test_token_bytes_rebuild_multibyte_text(default_model_dir, tiny_model_dir):
    from adapterserve.server.model.tokenizer import Tokenizer

    for path in (default_model_dir, tiny_model_dir):
        tok = Tokenizer(path)
        text = "€ café 日本 🙂"
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.token_bytes(i) for i in ids]
        assert b"".join(pieces).decode("utf-8") == text
        assert any(len(p) and not _is_utf8(p) for p in pieces)  # some tokens split a character


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(
    ("quantization", "complete"), [("auto", False), ("int8", False), ("none", True)]
)
def test_the_server_converts_a_gguf_completely_only_to_serve_it_as_floats(
    default_model_dir, monkeypatch, tmp_path, quantization, complete
):
    """Served quantized, the GGUF's conversion leaves the projections in the file (read as
    codes); served as floats it is complete (converted once, not dequantized at every start)."""
    from adapterserve.server.config import Settings
    from adapterserve.server.engine.bootstrap import plan_engine

    asked = []
    monkeypatch.setattr(
        weights,
        "convert_gguf",
        lambda _p, _c, complete=True: asked.append(complete) or default_model_dir,
    )
    plan = plan_engine(Settings(device="cpu", quantization=quantization, cache_dir=tmp_path))
    assert asked == [complete] and plan.quantization == (
        "int4" if quantization == "auto" else quantization
    )
