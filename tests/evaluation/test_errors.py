"""server/api/errors.py answers each typed error of server/evaluation/errors.py (EVALUATION_ERRORS)
as the evaluation API answered before evaluation had its own errors."""

from __future__ import annotations

import pytest

from adapterserve.server.api.errors import (
    ENGINE_ERRORS,
    EVALUATION_ERRORS,
    evaluation_error,
    truncate,
)
from adapterserve.server.engine import errors as engine_errors
from adapterserve.server.evaluation import errors
from adapterserve.server.evaluation.runner import RETRY_QUEUED_S
from adapterserve.server.evaluation.worker import RETRYABLE_ENGINE_ERRORS

# What the evaluation API answered for each refusal before the typed errors: (status, type, code)
ANSWERED = {
    errors.InvalidJobError: (400, "invalid_request_error", None),
    errors.InvalidDatasetError: (400, "invalid_request_error", None),
    errors.JobNotFoundError: (404, "not_found_error", "evaluation_not_found"),
    errors.JobModelNotFoundError: (404, "not_found_error", "model_not_found"),
    errors.DatasetNotFoundError: (404, "not_found_error", "dataset_not_found"),
    errors.DatasetExistsError: (409, "conflict_error", "dataset_exists"),
    errors.BuiltinDatasetError: (409, "conflict_error", "dataset_builtin"),
    errors.DatasetLimitError: (409, "conflict_error", "dataset_limit"),
    errors.JobQueueFullError: (429, "rate_limit_error", "evaluation_queue_full"),
    errors.DatasetFileError: (500, "server_error", None),
    errors.ExampleFailedError: (500, "server_error", None),
}


def test_every_evaluation_error_is_answered_as_before() -> None:
    declared = {getattr(errors, name) for name in errors.__all__ if name.endswith("Error")}
    assert declared - {errors.EvaluationError} == set(ANSWERED)
    assert dict(EVALUATION_ERRORS) == ANSWERED


@pytest.mark.parametrize(
    "cls", sorted(ANSWERED, key=lambda c: c.__name__), ids=lambda c: c.__name__
)
def test_evaluation_error_in_openai_shape(cls: type[errors.EvaluationError]) -> None:
    exc = cls("what to change", 7) if cls is errors.JobQueueFullError else cls("what to change")
    error = evaluation_error(exc)
    assert (error.status, error.type, error.code) == ANSWERED[cls]
    assert error.message == "what to change" and error.param is None
    assert error.headers == ({"Retry-After": "7"} if cls is errors.JobQueueFullError else {})


def test_param_and_retry_after_come_from_the_error() -> None:
    assert evaluation_error(errors.InvalidJobError("no", "datasets")).param == "datasets"
    full = evaluation_error(errors.JobQueueFullError("wait", RETRY_QUEUED_S))
    assert full.headers == {"Retry-After": "30"}


def test_an_error_without_an_answer_is_a_bug() -> None:
    class Unmapped(errors.EvaluationError):
        pass

    class Subtype(errors.JobNotFoundError):
        pass

    assert evaluation_error(Subtype("gone")).code == "evaluation_not_found"  # by its MRO
    with pytest.raises(TypeError, match="EVALUATION_ERRORS"):
        evaluation_error(Unmapped("?"))


def test_examples_pass_the_engine_refusals_the_api_asks_to_retry() -> None:
    """The worker waits out exactly the engine errors that clients are told to retry,
    EngineRestartingError included (a ReplicaLostError)."""
    for cls, answer in ENGINE_ERRORS.items():
        assert issubclass(cls, RETRYABLE_ENGINE_ERRORS) == answer.retry_after, cls.__name__
    assert issubclass(engine_errors.EngineRestartingError, RETRYABLE_ENGINE_ERRORS)


def test_quoted_is_the_servers_truncate() -> None:
    for value in ("short", "x" * 200, ["a", 1], None):
        assert errors.quoted(value) == truncate(value)
