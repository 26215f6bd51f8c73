"""An in-process app (FastAPI TestClient runs the real lifespan: engine thread, runner) on the
tiny random model, with small generated datasets of every answer kind in a data directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterserve.server.config import Settings
from adapterserve.server.main import create_app

SERVED_NAME = "tiny"
TERMINAL = ("succeeded", "failed", "cancelled")


def write_dataset(data_dir: Path, name: str, records: list[dict]) -> None:
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    full = [
        {"instruction": r["instruction"], "input": "", "output": "", "answer": r["answer"]}
        for r in records
    ]
    (folder / "test.json").write_text(json.dumps(full))


def make_data_dir(path: Path, size: int = 6) -> Path:
    """Built-in names with generated records: numbers, letters, and answer words."""
    write_dataset(
        path,
        "gsm8k",
        [
            {"instruction": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)}
            for i in range(size)
        ],
    )
    write_dataset(
        path,
        "AQuA",
        [
            {
                "instruction": f"Pick {i}. Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5",
                "answer": "ABCDE"[i % 5],
            }
            for i in range(size)
        ],
    )
    write_dataset(
        path,
        "boolq",
        [
            {
                "instruction": f"Is {i} even?\n\nAnswer format: true/false",
                "answer": "true" if i % 2 == 0 else "false",
            }
            for i in range(size)
        ],
    )
    write_dataset(
        path,
        "piqa",
        [
            {
                "instruction": f"Goal {i}\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2",
                "answer": f"solution{1 + i % 2}",
            }
            for i in range(size)
        ],
    )
    return path


def eval_settings(model_dir: Path, data_dir: Path, cache_dir: Path, **overrides) -> Settings:
    values = dict(
        model=str(model_dir),
        device="cpu",
        served_model_name=SERVED_NAME,
        kv_cache_memory_mb=16,
        max_model_len=512,
        max_num_seqs=8,
        eval_max_inflight=4,
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    return Settings(**(values | overrides))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, data_dir: Path, cache_dir: Path) -> Iterator[TestClient]:
    # in this process: tests look inside the engine (its step_log, its KV blocks); the
    # engine core process runs the jobs of test_restart.py, test_limits.py, test_error_answers.py
    app = create_app(eval_settings(tiny_model_dir, data_dir, cache_dir, engine_process=False))
    with TestClient(app) as test_client:
        yield test_client


def wait_for(
    client: TestClient,
    job_id: str,
    done: Callable[[dict], bool] | None = None,
    timeout_s: float = 60.0,
) -> dict:
    """Poll the job until `done(job)` (default: a terminal status)."""
    done = done or (lambda job: job["status"] in TERMINAL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/evaluations/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not done after {timeout_s} s: {job}")


def results(client: TestClient, job_id: str) -> list[dict]:
    response = client.get(f"/v1/evaluations/{job_id}/results")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]
