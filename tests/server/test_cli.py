"""`adapterserve serve` refuses settings that cannot work with a one-line reason and exit 2."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapterserve.server import cli
from adapterserve.server.config import Settings


def test_missing_model_exits_2_with_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert cli.serve(Settings(model=str(tmp_path / "nope"), port=0)) == 2
    assert "neither a .gguf file nor a directory with config.json" in caplog.text


def test_kv_cache_smaller_than_context_exits_2(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        model=str(tiny_model_dir), port=0, max_model_len=512, num_kv_blocks=4, block_size=16
    )
    with caplog.at_level(logging.ERROR):
        assert cli.serve(settings) == 2
    assert "fewer than max_model_len=512" in caplog.text


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("ADAPTERSERVE_PORT", "9001")
    args = cli.build_parser().parse_args(["serve", "--port", "9002"])
    settings = cli.settings_from_args(args)
    assert settings.max_num_seqs == 7 and settings.port == 9002


def test_max_request_share_flag_and_its_bounds() -> None:
    args = cli.build_parser().parse_args(["serve", "--max-request-share", "0.25"])
    assert cli.settings_from_args(args).max_request_share == 0.25
    assert Settings().max_request_share == 0.5
    for bad in ("0", "1.5"):
        args = cli.build_parser().parse_args(["serve", "--max-request-share", bad])
        with pytest.raises(ValueError, match="max_request_share"):
            cli.settings_from_args(args)
