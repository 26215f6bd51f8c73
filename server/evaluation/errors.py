"""Typed refusals and failures of evaluation jobs and datasets: each says what to change.

They carry no HTTP status: the server maps each type to one (server/api/errors.py,
EVALUATION_ERRORS), so that `evaluation` never speaks HTTP, as the engine's and the adapters'
own errors do not.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BuiltinDatasetError",
    "DatasetExistsError",
    "DatasetFileError",
    "DatasetLimitError",
    "DatasetNotFoundError",
    "EvaluationError",
    "ExampleFailedError",
    "InvalidDatasetError",
    "InvalidJobError",
    "JobModelNotFoundError",
    "JobNotFoundError",
    "JobQueueFullError",
    "quoted",
]

MAX_QUOTED_CHARS = 80  # longest excerpt of client input quoted back (server.errors.truncate's)


class EvaluationError(Exception):
    """A refused or failed evaluation operation; `param` names the request field at fault (None
    when no one field is). `retry_after_s` is set on the retryable ones: the seconds to wait."""

    retry_after_s: int | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class InvalidJobError(EvaluationError):
    """A job request that can never run: a repeated model or dataset, a protocol or decoding
    the datasets or the other options do not allow."""


class JobModelNotFoundError(EvaluationError):
    """A job names a model that is neither the base model nor a served adapter."""


class JobNotFoundError(EvaluationError):
    """No job of that id, or one that another API key created."""


class JobQueueFullError(EvaluationError):
    """As many jobs wait to run as the server keeps: retryable after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DatasetNotFoundError(EvaluationError):
    """No dataset of that name, or a built-in one whose data file is not on this server."""


class DatasetExistsError(EvaluationError):
    """The name is taken: by a built-in dataset, or by a registered one without replace."""


class BuiltinDatasetError(EvaluationError):
    """A built-in dataset is a data file: it cannot be deleted."""


class DatasetLimitError(EvaluationError):
    """One more registered dataset (or its bytes) would pass the server's caps."""


class InvalidDatasetError(EvaluationError):
    """An upload we refuse: its name, answer kind or one of its records."""


class DatasetFileError(EvaluationError):
    """A dataset's data file on this server is unreadable as a test set (the server's fault)."""


class ExampleFailedError(EvaluationError):
    """The engine failed or refused an example: the job fails with this message."""


def quoted(value: Any, limit: int = MAX_QUOTED_CHARS) -> str:
    """A short repr of client input, safe to quote back in a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
