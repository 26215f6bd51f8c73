"""The worker against a scripted engine: the refusals and failures clients are told to retry
(a full queue, a lost replica, a restarting engine) run the example again; any other fails the
job with a message that names the example."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineRestartingError,
    InvalidRequestError,
    QueueFullError,
    ReplicaLostError,
    RequestAbortedError,
)
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.evaluation.datasets import DatasetCatalog
from adapterserve.server.evaluation.jobs import JobOptions
from adapterserve.server.evaluation.runner import EvaluationRunner
from adapterserve.server.metrics import Metrics
from tests.evaluation.conftest import TERMINAL, make_data_dir


class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1, 2, 3]


class Stream:
    """One output: the answer, or the error the request finished with."""

    def __init__(self, request_id: str, error: Exception | None) -> None:
        reason = "stop" if error is None else "error"
        self.output = RequestOutput(
            request_id, " The answer is 1.", [], finished=True, finish_reason=reason, error=error
        )

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        yield self.output


class ScriptedEngine:
    """Refuses the first requests with `refusals`, then finishes the next with `failures`."""

    model_id, max_model_len, tokenizer = "tiny", 512, Tokenizer()

    def __init__(self, refusals: list[Exception], failures: list[Exception]) -> None:
        self.refusals, self.failures, self.calls = list(refusals), list(failures), 0

    def add_request(self, ids, params, model, request_id) -> Stream:
        self.calls += 1
        if self.refusals:
            raise self.refusals.pop(0)
        return Stream(request_id, self.failures.pop(0) if self.failures else None)

    async def confirm(self, streams: list[Stream]) -> None:
        pass


def run_job(tmp_path: Path, engine: ScriptedEngine) -> dict:
    async def main() -> dict:
        catalog = DatasetCatalog(make_data_dir(tmp_path / "data", size=1), tmp_path / "user")
        runner = EvaluationRunner(engine, catalog, tmp_path / "jobs", 1, Metrics())  # type: ignore[arg-type]
        await runner.start()
        try:
            job = runner.submit(JobOptions(models=["base"], datasets=["gsm8k"]))
            async with asyncio.timeout(30):
                while job.status not in TERMINAL:
                    await asyncio.sleep(0.01)
            return job.to_dict()
        finally:
            await runner.stop()

    return asyncio.run(main())


@pytest.mark.parametrize(
    "refusal",
    [QueueFullError("full"), ReplicaLostError("gone"), EngineRestartingError("up")],
    ids=lambda e: type(e).__name__,
)
def test_a_retryable_refusal_is_submitted_again(tmp_path: Path, refusal: Exception) -> None:
    engine = ScriptedEngine([refusal, refusal], [])
    job = run_job(tmp_path, engine)
    assert job["status"] == "succeeded" and job["progress"]["done"] == 1, job
    assert engine.calls == 3


@pytest.mark.parametrize(
    "failure",
    [ReplicaLostError("gone"), EngineRestartingError("restarting")],
    ids=lambda e: type(e).__name__,
)
def test_an_example_whose_replica_was_lost_runs_again(tmp_path: Path, failure: Exception) -> None:
    engine = ScriptedEngine([], [failure])
    job = run_job(tmp_path, engine)
    assert job["status"] == "succeeded" and job["progress"]["done"] == 1, job
    assert engine.calls == 2


def test_a_refusal_that_never_passes_fails_the_job(tmp_path: Path) -> None:
    job = run_job(tmp_path, ScriptedEngine([InvalidRequestError("too many virtual tokens")], []))
    assert job["status"] == "failed"
    assert job["error"] == "gsm8k example 0: too many virtual tokens"


def test_a_failed_example_fails_the_job(tmp_path: Path) -> None:
    job = run_job(tmp_path, ScriptedEngine([], [RequestAbortedError("stopping")]))
    assert job["status"] == "failed"
    assert job["error"] == "the engine failed on base / gsm8k: stopping"


def test_a_dead_engine_fails_the_job(tmp_path: Path) -> None:
    job = run_job(tmp_path, ScriptedEngine([], [EngineDeadError("fault")]))
    assert job["status"] == "failed" and job["error"] == "the inference engine stopped"
