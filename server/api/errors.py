"""OpenAI-style error JSON, the exceptions routers raise, the one map from the engine's, the
adapters', the evaluations' and the file store's typed errors (they carry no HTTP status) to
answers, and the app's exception handlers.

Every error body is `{"error": {"message", "type", "param", "code"}}`. Messages say what to
change; they never carry a traceback, a server path, or more than a short excerpt of input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapterserve.adapters.errors import (
    AdapterError,
    AdapterExistsError,
    AdapterFormatError,
    AdapterLimitError,
    AdapterLoadError,
    AdapterPathNotFoundError,
    InvalidNameError,
    InvalidPathError,
    InvalidUploadError,
    NoAdapterRootsError,
    NoAdapterStoreError,
    PathNotAllowedError,
    UnknownAdapterError,
    UploadTooLargeError,
)
from adapterserve.server.api.schemas.common import UNKNOWN_FIELD
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineFailure,
    EngineRestartingError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    ReplicaLostError,
    RequestAbortedError,
)
from adapterserve.server.evaluation.errors import (
    BuiltinDatasetError,
    DatasetExistsError,
    DatasetFileError,
    DatasetLimitError,
    DatasetNotFoundError,
    EvaluationError,
    ExampleFailedError,
    InvalidDatasetError,
    InvalidJobError,
    JobModelNotFoundError,
    JobNotFoundError,
    JobQueueFullError,
)
from adapterserve.server.finetune.files import (
    FileError,
    FileLimitError,
    FileTooLargeError,
    InvalidFileError,
    UnknownFileError,
)

log = logging.getLogger(__name__)

MAX_ECHO_CHARS = 80  # longest excerpt of client input quoted back in a message
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
# Every typed refusal of the adapters package -> (HTTP status, OpenAI error type, code). An
# exception maps as the first class of its MRO listed here.
ADAPTER_ERRORS: Mapping[type[AdapterError], tuple[int, str, str | None]] = {
    AdapterFormatError: (400, "invalid_request_error", None),
    InvalidNameError: (400, "invalid_request_error", None),
    InvalidUploadError: (400, "invalid_request_error", None),
    InvalidPathError: (400, "invalid_request_error", None),
    PathNotAllowedError: (403, "permission_error", None),
    NoAdapterRootsError: (403, "permission_error", None),  # as the route, before any path look-up
    UnknownAdapterError: (404, "not_found_error", "model_not_found"),
    AdapterPathNotFoundError: (404, "not_found_error", "model_not_found"),
    AdapterExistsError: (409, "conflict_error", None),
    AdapterLimitError: (409, "conflict_error", None),
    NoAdapterStoreError: (409, "conflict_error", None),
    UploadTooLargeError: (413, "invalid_request_error", None),
    AdapterLoadError: (500, "server_error", None),
}
# Every typed error of evaluation jobs and datasets (server/evaluation/errors.py) -> (HTTP
# status, OpenAI error type, code); `param` is the exception's, and one that carries
# `retry_after_s` (JobQueueFullError) is answered with that Retry-After.
EVALUATION_ERRORS: Mapping[type[EvaluationError], tuple[int, str, str | None]] = {
    InvalidJobError: (400, "invalid_request_error", None),
    InvalidDatasetError: (400, "invalid_request_error", None),
    JobNotFoundError: (404, "not_found_error", "evaluation_not_found"),
    JobModelNotFoundError: (404, "not_found_error", "model_not_found"),
    DatasetNotFoundError: (404, "not_found_error", "dataset_not_found"),
    DatasetExistsError: (409, "conflict_error", "dataset_exists"),
    BuiltinDatasetError: (409, "conflict_error", "dataset_builtin"),
    DatasetLimitError: (409, "conflict_error", "dataset_limit"),
    JobQueueFullError: (429, "rate_limit_error", "evaluation_queue_full"),
    DatasetFileError: (500, "server_error", None),
    ExampleFailedError: (500, "server_error", None),  # fails its job; never an HTTP answer today
}

# Every typed refusal of the fine-tuning file store (server/finetune/files.py) -> (HTTP status,
# OpenAI error type, code); `param` is the exception's. A missing file is a 404 of type
# invalid_request_error, as OpenAI answers it (and as a missing model is answered here): /v1/files
# is OpenAI's route; our own routes (adapters, evaluations) answer not_found_error.
FILE_ERRORS: Mapping[type[FileError], tuple[int, str, str | None]] = {
    InvalidFileError: (400, "invalid_request_error", None),
    UnknownFileError: (404, "invalid_request_error", "file_not_found"),
    FileLimitError: (409, "conflict_error", "file_limit"),
    FileTooLargeError: (413, "invalid_request_error", "file_too_large"),
}


@dataclass(frozen=True)
class EngineAnswer:
    """How an engine error is answered."""

    status: int
    type: str
    code: str | None = None
    retry_after: bool = False  # retryable: a Retry-After header of settings.retry_after_s
    message: str | None = None  # the client's message ({name}, {retry_after_s}); None: the error's


# Every typed error of the engine (server/engine/errors.py), raised by add_requests or carried
# by a failed RequestOutput -> its answer. An exception maps as the first class of its MRO
# listed here; `param` is the exception's.
ENGINE_ERRORS: Mapping[type[EngineError], EngineAnswer] = {
    InvalidRequestError: EngineAnswer(400, "invalid_request_error"),
    ModelNotFoundError: EngineAnswer(
        404, "invalid_request_error", "model_not_found",
        message="The model {name} does not exist; GET /v1/models lists the served models.",
    ),
    QueueFullError: EngineAnswer(
        503, "service_unavailable_error", "queue_full", retry_after=True,
        message="The server is overloaded: its request queue is full. Retry after "
        "{retry_after_s} s.",
    ),
    EngineDeadError: EngineAnswer(
        503, "service_unavailable_error", "engine_unavailable",
        message="The inference engine has failed and the server is restarting.",
    ),
    EngineRestartingError: EngineAnswer(
        503, "service_unavailable_error", "engine_restarting", retry_after=True,
        message="The inference engine stopped and is restarting; retry after {retry_after_s} s.",
    ),
    ReplicaLostError: EngineAnswer(
        503, "service_unavailable_error", "replica_unavailable", retry_after=True,
        message="The replica serving this request went away; retry after {retry_after_s} s.",
    ),
    RequestAbortedError: EngineAnswer(
        503, "service_unavailable_error", "aborted",
        message="The request was aborted by the server (shutting down).",
    ),
}  # fmt: skip

# What each error status means on this server, for the API description.
_DESCRIPTION_BY_STATUS = {
    400: "Invalid request: the message says what to change",
    401: "Missing or wrong API key",
    403: "Not allowed: by this server's configuration, or to this API key",
    404: "Unknown model, adapter, evaluation job, dataset or file",
    408: "The request body stalled: the connection closes",
    409: "A conflict: the name is taken, a limit is reached, or the resource is in use",
    413: "The request body exceeds the server's limit",
    415: "This route does not take the request's Content-Type",
    429: "Too many evaluation jobs are waiting: retry after Retry-After seconds",
    500: "The server failed to process the request",
    503: "Overloaded, draining or not ready: retry after Retry-After seconds",
}
ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"
_NOT_AN_OBJECT = frozenset({"model_type", "model_attributes_type", "dict_type"})
_OUTCOME_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    413: "too_large",
    503: "unavailable",
}


class APIError(Exception):
    """An error answered in OpenAI's shape; raise it anywhere below a router."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model {truncate(name)} does not exist; GET /v1/models lists the served models.",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def adapter_error_status(exc: AdapterError) -> tuple[int, str, str | None]:
    """(HTTP status, error type, code) of an adapters refusal, from ADAPTER_ERRORS."""
    for cls in type(exc).__mro__:
        if cls in ADAPTER_ERRORS:
            return ADAPTER_ERRORS[cls]
    raise TypeError(f"no HTTP status for {type(exc).__name__}: add it to ADAPTER_ERRORS")


def from_adapter_error(exc: AdapterError, message: str | None = None) -> APIError:
    """An adapters refusal in OpenAI's shape; `message` replaces the exception's (scrubbed)."""
    status, openai_type, code = adapter_error_status(exc)
    text = exc.message if message is None else message
    return APIError(status, text, openai_type, exc.param, code)


def evaluation_error(exc: EvaluationError) -> APIError:
    """An evaluation refusal in OpenAI's shape (EVALUATION_ERRORS)."""
    answer = next((EVALUATION_ERRORS[c] for c in type(exc).__mro__ if c in EVALUATION_ERRORS), None)
    if answer is None:
        raise TypeError(f"no HTTP status for {type(exc).__name__}: add it to EVALUATION_ERRORS")
    status, openai_type, code = answer
    retry_after = exc.retry_after_s
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return APIError(status, exc.message, openai_type, exc.param, code, headers)


def file_error(exc: FileError) -> APIError:
    """A file store refusal in OpenAI's shape (FILE_ERRORS)."""
    answer = next((FILE_ERRORS[c] for c in type(exc).__mro__ if c in FILE_ERRORS), None)
    if answer is None:
        raise TypeError(f"no HTTP status for {type(exc).__name__}: add it to FILE_ERRORS")
    status, openai_type, code = answer
    return APIError(status, exc.message, openai_type, exc.param, code)


def engine_answer(exc: EngineError) -> EngineAnswer:
    """The answer of an engine error, from ENGINE_ERRORS."""
    for cls in type(exc).__mro__:
        if cls in ENGINE_ERRORS:
            return ENGINE_ERRORS[cls]
    raise TypeError(f"no answer for {type(exc).__name__}: add it to ENGINE_ERRORS")


def engine_error(exc: EngineError, retry_after_s: int) -> APIError:
    """An engine error in OpenAI's shape (ENGINE_ERRORS)."""
    answer = engine_answer(exc)
    message = exc.message
    if answer.message is not None:
        name = truncate(getattr(exc, "name", ""))
        message = answer.message.format(name=name, retry_after_s=retry_after_s)
    headers = {"Retry-After": str(retry_after_s)} if answer.retry_after else None
    return APIError(answer.status, message, answer.type, exc.param, answer.code, headers)


def failure_error(error: EngineFailure, retry_after_s: int) -> APIError:
    """The answer for a request the engine finished with an error (RequestOutput.error): an
    engine error, or the adapters' refusal of its adapter at admission."""
    if isinstance(error, EngineError):
        return engine_error(error, retry_after_s)
    status, _, _ = adapter_error_status(error)
    if status == 404:
        return APIError(
            404,
            f"{error.message}; GET /v1/models lists the served models.",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )
    if status < 500:
        return APIError(status, error.message)
    return APIError(
        500, f"The engine failed while generating: {error.message[:200]}", "server_error"
    )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: each status answers an ErrorResponse as JSON, whatever the
    route's own media type (server/api/routers/openapi.py registers the ErrorResponse schema)."""
    content = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
    return {s: {"description": _DESCRIPTION_BY_STATUS[s], "content": content} for s in statuses}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def truncate(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """A short repr of client input, safe to quote back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.message, error.type, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)


def record_rejection(request: Request, status: int) -> None:
    if getattr(request.state, "submitted", False):
        return  # the engine records the outcome of every request it accepted
    # Only a resolved model name is used as a label: client-chosen names would grow the series.
    count_rejection(
        request.app, request.url.path, getattr(request.state, "model", None) or "", status
    )


def count_rejection(app: Any, path: str, model: str, status: int) -> None:
    """Count a refused inference request in adapterserve_requests{outcome=...}."""
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is None or path not in INFERENCE_PATHS:
        return
    outcome = _OUTCOME_BY_STATUS.get(status, "error" if status >= 500 else "rejected")
    metrics.on_request_rejected(model, outcome)


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _describe(error: Mapping[str, Any], param: str | None) -> str:
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == UNKNOWN_FIELD:
        return f"{message}."
    if error.get("type") == "missing":
        return f"'{param}' is required." if param else "A JSON request body is required."
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON."
    if param is None and error.get("type") in _NOT_AN_OBJECT:
        return "The request body must be a JSON object sent with Content-Type: application/json."
    prefix = f"Invalid '{param}': " if param else "Invalid request body: "
    value = error.get("input")
    shown = "" if error.get("type") in _NOT_AN_OBJECT else f" (got {truncate(value)})"
    return f"{prefix}{message}{shown}."


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error as a 400 that names the field and the allowed values."""
    errors = exc.errors()
    if not errors:
        return invalid_request("The request is invalid.")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == UNKNOWN_FIELD:  # raised by the model: the field is in its ctx
        loc += (first["ctx"]["field"],)
    param = _param_from_loc(loc)
    message = _describe(first, param)
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more error(s) in the request.)"
    return invalid_request(message, param)


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    record_rejection(request, exc.status)
    return error_response(exc)


async def _evaluation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EvaluationError)
    error = evaluation_error(exc)
    record_rejection(request, error.status)
    return error_response(error)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = validation_error(exc)
    record_rejection(request, error.status)
    return error_response(error)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"No route {request.method} {truncate(request.url.path)}; see GET /v1/models."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {truncate(request.url.path)}."
    else:
        message = str(exc.detail)
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    # An unknown route or method is invalid_request_error, as OpenAI answers it.
    kind = "invalid_request_error" if exc.status_code in (404, 405) else None
    error = APIError(exc.status_code, message, kind, headers=headers)
    record_rejection(request, error.status)
    return error_response(error)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own Allow header names only
    the route that matched the path first: GET for /v1/adapters/{name}, not DELETE."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    ]


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    record_rejection(request, 500)
    body = error_body("The server had an error while processing the request.", "server_error")
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, including unknown routes and crashes, in OpenAI's shape."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(EvaluationError, _evaluation_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
