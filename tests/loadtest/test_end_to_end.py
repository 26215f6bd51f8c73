"""The client against real servers: a consistent JSON, baselines, comparison, uploads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterserve.loadtest import cli
from adapterserve.loadtest.synthetic import KINDS, plan_adapters
from tests.loadtest.conftest import Servers, run_loadtest

LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
SHORT = ("--input-len", "4,12", "--output-len", "3,8", "--no-progress", "--seed", "3")
# The six synthetic adapters the PEFT baseline was started with (it refused the bottlenecks).
SIX = ",".join(p.name for p in plan_adapters(len(KINDS), KINDS, [8, 4]))


def check_run(run: dict) -> None:
    """Every BENCHMARKS.md field is present, and the numbers agree with each other."""
    requests = run["requests"]
    assert requests["sent"] > 0
    assert requests["completed"] + requests["failed"] + requests["rejected"] == requests["sent"]
    assert run["duration_s"] > 0
    for key in ("name", "loop", "rate", "cv", "concurrency", "seed", "input_len", "output_len"):
        assert key in run["workload"]
    throughput = run["throughput"]
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert throughput[key] > 0
    assert throughput["total_tokens_include_prompt"] is True
    assert throughput["total_tokens_per_s"] > throughput["output_tokens_per_s"]
    for metric in LATENCIES:
        s = run["latency"][metric]
        assert None not in (s["mean"], s["median"], s["p90"], s["p99"]), metric
        assert 0 <= s["median"] <= s["p90"] <= s["p99"], (metric, s)
    ttft, e2e = run["latency"]["ttft_s"], run["latency"]["e2e_s"]
    for key in ("mean", "median", "p90", "p99"):
        assert ttft[key] <= e2e[key]
    assert 0 <= run["slo"]["attainment"] <= 1 and run["slo"]["ttft_s"] == 6.0
    assert "registered" in run["adapters"]
    for entry in run["server_metrics"].values():  # a value, or null with the reason
        assert entry["value"] is not None or entry["note"]


def test_open_loop_run_writes_a_consistent_json(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, _ = run_loadtest(
        capsys,
        "run",
        "--url",
        servers.ours.base_url,
        "--base-only",
        "--workload",
        "A",
        "--rate",
        "8",
        "--cv",
        "2",
        "--duration",
        "2",
        *SHORT,
        "--out-dir",
        str(tmp_path),
        "--name",
        "a",
    )
    document = json.loads((tmp_path / "a.json").read_text())
    (run,) = document["runs"]
    check_run(run)
    assert run["requests"]["completed"] == run["requests"]["sent"]
    workload = run["workload"]
    assert (workload["rate"], workload["cv"], workload["loop"]) == (8, 2, "open")
    assert run["target"]["base_only"] and run["target"]["base_model"] == "tiny"
    # the engine's per-step histogram exists, so the mean is a number (0: base model only)
    assert run["server_metrics"]["distinct_adapters_per_step"]["value"] == 0
    (cdf,) = tmp_path.glob("a-cdf-A-*.png")
    assert cdf.stat().st_size > 0
    assert "req/s" in out and "TTFT" in out


def test_compare_peft_baseline_and_base_only(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Workload C on the PEFT baseline: bottleneck adapters fail (404: refused at load), the
    rest complete; the same trace on our server's base model; ratios between them."""
    run_loadtest(
        capsys,
        "run",
        "--workload",
        "C",
        "--num-adapters",
        "6",
        "--concurrency",
        "2",
        "--num-requests",
        "10",
        *SHORT,
        "--out-dir",
        str(tmp_path),
        "--name",
        "c",
        "--compare",
        f"peft={servers.peft.base_url},base={servers.ours.base_url}#base-only",
        "--adapters",
        SIX,
    )
    document = json.loads((tmp_path / "c.json").read_text())
    peft, base = document["runs"]
    for run in (peft, base):
        assert run["requests"]["sent"] == 10
        assert run["workload"]["concurrency"] == 2 and run["workload"]["loop"] == "closed"
    check_run(base)
    assert base["requests"]["completed"] == 10
    assert peft["requests"]["failed"] > 0 and peft["requests"]["completed"] > 0
    assert all("does not exist" in e["error"] for e in peft["errors"])
    assert all("series" in e["error"] or "parallel" in e["error"] for e in peft["errors"])
    assert peft["adapters"]["registered"] == 4
    assert peft["server_metrics"]["adapter_loads"]["note"] == "the server has no /metrics endpoint"
    assert document["ratios"]["C-n6"]["base"]["throughput.requests_per_s"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--rate", "2"], "--duration"),
        (["run", "--rate", "-1", "--duration", "1"], "expected a number > 0"),
        (["run", "--rate", "1", "--concurrency", "2", "--duration", "1"], "not allowed with"),
        (["run", "--concurrency", "2", "--workload", "B", "--duration", "1"], "--num-requests"),
        (["run", "--rate", "1", "--duration", "1", "--mix", "zipf"], "expected a comma list"),
        (["run", "--rate", "1", "--duration", "1", "--compare", "ftp://x"], "expected a target"),
        (["run", "--rate", "1", "--duration", "1", "--input-len", "9,3"], "LOW < HIGH"),
        (["setup", "--num-adapters", "2", "--kinds", "dora"], "expected a comma list"),
    ],
)
def test_bad_cli_input_is_refused_with_a_reason(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_upload_synthetic_adapters_and_run_over_them(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--setup uploads six adapters (one per kind) through POST /v1/adapters, then workload C."""
    run_loadtest(
        capsys,
        "run",
        "--url",
        servers.ours.base_url,
        "--workload",
        "C",
        "--setup",
        "--num-adapters",
        "6",
        "--ranks",
        "8,4",
        "--rate",
        "12",
        "--num-requests",
        "12",
        *SHORT,
        "--out-dir",
        str(tmp_path),
        "--name",
        "up",
        "--no-plots",
    )
    document = json.loads((tmp_path / "up.json").read_text())
    uploads = document["uploads"][servers.ours.base_url]
    assert [u["error"] for u in uploads] == [None] * 6, uploads
    (run,) = document["runs"]
    check_run(run)
    assert run["requests"]["completed"] == 12
    assert run["adapters"]["registered"] >= 6
    assert run["server_metrics"]["cache_hit_rate"]["value"] is not None
    assert run["server_metrics"]["distinct_adapters_per_step"]["value"] > 0


def test_setup_command_against_the_baseline(
    servers: Servers, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "setup",
                "--url",
                servers.peft.base_url,
                "--num-adapters",
                "3",
                "--kinds",
                "lora,series,ia3",
                "--adapter-prefix",
                "st",
            ]
        )
    assert exit_info.value.code == 1  # the series adapter is refused by the baseline
    captured = capsys.readouterr()
    assert "not supported by the PEFT baseline" in captured.out
    assert "uploaded 2 of 3 adapters" in captured.err
