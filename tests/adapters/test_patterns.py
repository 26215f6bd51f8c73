"""Config regexes (rank_pattern, alpha_pattern, target_modules, feedforward_modules,
layers_pattern): matched with RE2 in linear time, bounded, and with peft's own results
(SECURITY row 21)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adapterserve.adapters.formats import load_adapter
from adapterserve.adapters.formats.patterns import FULL, PEFT_KEY, compile_pattern, first_match
from adapterserve.adapters.spec import AdapterFormatError, AdapterKind, BaseFingerprint
from tests.adapters.conftest import bottleneck_config, bottleneck_tensors, write_adapter
from tests.adapters.test_formats import ia3_dir, lora_dir

REPO = Path(__file__).resolve().parents[2]
# Exponential for a backtracking engine on any module name (no "Z" in it): (2^31 ways to split
# a 31-character name); linear for RE2.
CRAFTED = r"(?:[a-z_.0-9]|[a-z_.0-9]){0,40}Z"
MODULES = [
    f"model.layers.{layer}.{module}"
    for layer in (0, 1, 12)
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")
]
# Patterns both engines accept, on which they must agree (peft uses Python's `re`).
PARITY = [
    "down_proj",
    r"layers\.1\.self_attn\.o_proj",
    "o_proj|k_proj",
    r"(?i:Q_PROJ)",
    "[qk]_proj",
    r"model\.layers\.\d+\.mlp\.down_proj",
    r"layers\.(0|12)\.self_attn\.(q|k)_proj$",
    ".*",
    "",
    r"^model\.layers\.1\..*",
    r"\w+_proj",
    r"self_attn\.[^k]_proj",
    r"layers\.1",
    "q",
    r"(?:layers\.1\.)?self_attn\.q_proj",
    r"\bo_proj",
    r"1\d?\.self_attn\.k_proj",
    "x{0}q_proj",
]


def test_crafted_rank_pattern_parses_promptly(tmp_path: Path, fingerprint: BaseFingerprint):
    """The key that froze the server: parsed in a child process that must finish in 20 s."""
    directory = lora_dir(tmp_path / "a", fingerprint, rank_pattern={CRAFTED: 2})
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from adapterserve.adapters.formats import load_adapter
        from adapterserve.adapters.spec import BaseFingerprint
        fingerprint = BaseFingerprint(*{dataclasses.astuple(fingerprint)!r})
        spec = load_adapter(Path({str(directory)!r}), "a", fingerprint, 8)
        print(spec.kind.value, spec.rank)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail("parsing an adapter with a crafted rank_pattern key took over 20 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["lora", "4"]  # the key matches no module: rank stays r


@pytest.mark.parametrize("pattern", PARITY)
def test_matches_agree_with_python_re(pattern: str):
    table = [(compile_pattern("rank_pattern", pattern, PEFT_KEY), 1.0)]
    full = compile_pattern("feedforward_modules", pattern, FULL)
    for module in MODULES:
        peft_match = re.match(rf"(.*\.)?({pattern})$", module) is not None
        assert (first_match(table, module, 0.0) == 1.0) == peft_match, module
        assert (full.fullmatch(module) is not None) == (re.fullmatch(pattern, module) is not None)


def test_first_key_in_config_order_wins(tmp_path: Path, fingerprint: BaseFingerprint):
    patterns = {"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
    spec = load_adapter(
        lora_dir(tmp_path / "a", fingerprint, rank_pattern=patterns, tensors=_ranks(2, 2)),
        "a",
        fingerprint,
        8,
    )
    assert [spec.modules[layer, "q"].rank for layer in (0, 1)] == [2, 2]


def _ranks(rank0: int, rank1: int):
    def build(tensors):
        q = "base_model.model.model.layers.{}.self_attn.q_proj"
        out = {}
        for layer, rank in ((0, rank0), (1, rank1)):
            out[f"{q.format(layer)}.lora_A.weight"] = torch.randn(rank, 64)
            out[f"{q.format(layer)}.lora_B.weight"] = torch.randn(64, rank)
        return out

    return build


def test_config_patterns_never_reach_python_re_matching(tmp_path, fingerprint, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a config pattern was matched with Python's re")

    lora = lora_dir(
        tmp_path / "lora",
        fingerprint,
        rank_pattern={"q_proj": 2},
        alpha_pattern={r"layers\.1\..*": 3},
        tensors=_ranks(2, 2),
    )
    ia3 = _ia3(tmp_path / "ia3", fingerprint, feedforward_modules=r".*\.mlp\.down_proj")
    for name in ("match", "fullmatch", "search"):
        monkeypatch.setattr(re, name, never)
    spec = load_adapter(lora, "lora", fingerprint, 8)
    assert [spec.modules[i, "q"].scaling for i in (0, 1)] == [8 / 2, 3 / 2]
    spec = load_adapter(ia3, "ia3", fingerprint, 8)
    assert spec.kind is AdapterKind.IA3 and spec.modules[0, "k"].placement == "output"


def _bottleneck(path: Path, fp: BaseFingerprint, **config) -> Path:
    tensors = bottleneck_tensors(fp, 8, {"mlp.up_proj": (64, 64)})
    return write_adapter(path, bottleneck_config(**config), tensors)


def _ia3(path: Path, fp: BaseFingerprint, **config) -> Path:
    directory = ia3_dir(path, fp)
    base = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return directory


TOO_LONG = "q_proj|" * 40 + "k_proj"  # 286 characters
# id -> (builder, param, words the message must hold)
REFUSED = {
    "rank-key-too-long": (
        lambda p, fp: lora_dir(p, fp, rank_pattern={TOO_LONG: 2}),
        "rank_pattern",
        ["at most 256 characters", "got 286"],
    ),
    "alpha-too-many-keys": (
        lambda p, fp: lora_dir(p, fp, alpha_pattern={f"x{i}": 1 for i in range(1025)}),
        "alpha_pattern",
        ["at most 1024 patterns", "got 1025"],
    ),
    "rank-backreference": (
        lambda p, fp: lora_dir(p, fp, rank_pattern={r"(q)\1?_proj": 2}),
        "rank_pattern",
        ["RE2", "no backreferences", r"(q)\\1?_proj"],
    ),
    "alpha-lookbehind": (
        lambda p, fp: lora_dir(p, fp, alpha_pattern={r"(?<=attn\.)q_proj": 2}),
        "alpha_pattern",
        ["RE2", "lookaround", "(?<="],
    ),
    "rank-python-only-repeat": (
        lambda p, fp: lora_dir(p, fp, rank_pattern={"q{,1}_proj": 2}),
        "rank_pattern",
        ["'{,'", "got 'q{,1}_proj'"],
    ),
    "rank-program-too-large": (
        lambda p, fp: lora_dir(p, fp, rank_pattern={"q_proj(?:_x){0,600}": 2}),
        "rank_pattern",
        ["at most 1024 RE2 instructions", "got "],
    ),
    "lora-target-modules-lookahead": (
        lambda p, fp: lora_dir(p, fp, target_modules=r".*(?=q_proj)q_proj"),
        "target_modules",
        ["RE2", "lookaround"],
    ),
    "lora-layers-pattern-too-many": (
        lambda p, fp: lora_dir(p, fp, layers_pattern=["layers"] * 1025),
        "layers_pattern",
        ["at most 1024 patterns", "got 1025"],
    ),
    "lora-layers-pattern-backreference": (
        lambda p, fp: lora_dir(p, fp, layers_pattern=r"(layer)s\1?"),
        "layers_pattern",
        ["RE2"],
    ),
    "ia3-feedforward-lookahead": (
        lambda p, fp: _ia3(p, fp, feedforward_modules=r"(?!x).*down_proj"),
        "feedforward_modules",
        ["RE2", "lookaround"],
    ),
    "ia3-feedforward-too-many-names": (
        lambda p, fp: _ia3(p, fp, feedforward_modules=["down_proj"] * 1025),
        "feedforward_modules",
        ["at most 1024 names", "got 1025"],
    ),
    "ia3-target-modules-too-long": (
        lambda p, fp: _ia3(p, fp, target_modules=TOO_LONG),
        "target_modules",
        ["at most 256 characters"],
    ),
    "bottleneck-target-modules-backreference": (
        lambda p, fp: _bottleneck(p, fp, target_modules=r"(up)_proj|\1"),
        "target_modules",
        ["RE2"],
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_unbounded_or_non_re2_patterns_are_refused(tmp_path, fingerprint, case):
    build, param, words = REFUSED[case]
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(build(tmp_path / "a", fingerprint), "a", fingerprint, 8)
    message = str(caught.value)
    assert caught.value.param == param, message
    assert message.startswith(f"{param}: expected"), message
    assert all(word in message for word in words), message
    assert len(message) < 400 and str(tmp_path) not in message
