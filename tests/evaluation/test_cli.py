"""`adapterserve eval`: in-process and against a running server (--url); the paper's table
printed and written as JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from adapterserve.server import cli
from tests.evaluation.conftest import make_data_dir
from tests.server.conftest import start_server, stop_server


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def check_reports(out: Path, models: list[str], datasets: list[str], rows: int) -> None:
    table = list(csv.reader((out / "results.csv").open()))
    assert table[0] == ["model", *datasets, "Average"]
    assert [row[0] for row in table[1:]] == models
    for row in table[1:]:
        values = [float(v) for v in row[1:]]
        assert all(0 <= v <= 100 for v in values)
        assert values[-1] == pytest.approx(sum(values[:-1]) / len(datasets), abs=0.06)
    report = json.loads((out / "results.json").read_text())
    assert report["job"]["status"] == "succeeded" and len(report["table"]) == len(models)
    assert (out / "results.md").read_text().startswith("| model | " + " | ".join(datasets))
    assert len((out / "results.jsonl").read_text().splitlines()) == rows


@pytest.mark.parametrize(
    ("decoding", "shown"), [("greedy", "decoding: greedy;"), ("beam", "decoding: 4-beam search")]
)
def test_eval_in_process(
    decoding: str,
    shown: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ADAPTERSERVE_CACHE_DIR", str(tmp_path / "cache"))
    data_dir = make_data_dir(tmp_path / "data", size=3)
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--served-model-name",
        "tiny",
        "--kv-cache-memory-mb",
        "16",
        "--max-model-len",
        "512",
        "--datasets",
        "gsm8k,boolq",
        "--models",
        "base,tiny",
        "--limit",
        "2",
        "--max-tokens",
        "4",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--no-progress",
        "--decoding",
        decoding,
    ]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["model", "gsm8k", "boolq", "Average"]
    assert shown in printed  # which decoding ran
    assert ("can differ from the published" in printed) == (decoding == "greedy")
    assert f"decoding `{decoding}`" in (out / "results.md").read_text()
    check_reports(out, ["base", "tiny"], ["gsm8k", "boolq"], rows=8)


def test_eval_against_a_running_server(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = make_data_dir(tmp_path / "data", size=3)
    env = {
        "ADAPTERSERVE_DATA_DIR": str(data_dir),
        "ADAPTERSERVE_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = start_server(
        tiny_model_dir, tmp_path / "server.log", "--max-model-len", "512", env=env
    )
    try:
        out = tmp_path / "out"
        argv = [
            "eval",
            "--url",
            server.base_url,
            "--datasets",
            "all",
            "--models",
            "base",
            "--protocol",
            "loglikelihood",
            "--limit",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
        assert run_cli(argv) == 0
        check_reports(out, ["base"], ["AQuA", "boolq", "piqa"], rows=6)
        bad = ["eval", "--url", server.base_url, "--datasets", "nope", "--out", str(out)]
        assert run_cli(bad) == 2
        assert "does not exist" in capsys.readouterr().err
    finally:
        stop_server(server)
    assert "Traceback" not in server.log()
