"""adapterserve.server.api.errors.ENGINE_ERRORS: every typed error of the engine answers with the status, type,
param, code, message and Retry-After the API gave when the routers mapped engine exceptions
themselves (and failed outputs carried an HTTP status)."""

from __future__ import annotations

import inspect

import pytest

from adapterserve.adapters.errors import AdapterFormatError, AdapterLoadError, UnknownAdapterError
from adapterserve.server.api.errors import ENGINE_ERRORS, engine_error, failure_error
from adapterserve.server.engine import errors as engine_errors_module
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestAbortedError,
)

RETRY_AFTER_S = 7
LISTS = "GET /v1/models lists the served models."
# error -> (status, type, param, code, message, headers) as answered before
BEFORE = [
    (InvalidRequestError("too long", "max_tokens"),
     (400, "invalid_request_error", "max_tokens", None, "too long", {})),
    (ModelNotFoundError("gone"),
     (404, "invalid_request_error", "model", "model_not_found",
      f"The model 'gone' does not exist; {LISTS}", {})),
    (QueueFullError("full"),
     (503, "service_unavailable_error", None, "queue_full",
      f"The server is overloaded: its request queue is full. Retry after {RETRY_AFTER_S} s.",
      {"Retry-After": str(RETRY_AFTER_S)})),
    (EngineDeadError("dead"),
     (503, "service_unavailable_error", None, "engine_unavailable",
      "The inference engine has failed and the server is restarting.", {})),
    (RequestAbortedError("stopped"),
     (503, "service_unavailable_error", None, "aborted",
      "The request was aborted by the server (shutting down).", {})),
    # failures a request finished with: its adapter refused at admission
    (AdapterLoadError("model", "adapter 'x' could not be loaded: gone"),
     (500, "server_error", None, None,
      "The engine failed while generating: adapter 'x' could not be loaded: gone", {})),
    (UnknownAdapterError("model", "adapter 'x' does not exist"),
     (404, "invalid_request_error", "model", "model_not_found",
      f"adapter 'x' does not exist; {LISTS}", {})),
    (AdapterFormatError("r", "bad rank"), (400, "invalid_request_error", None, None, "bad rank", {})),
]  # fmt: skip


def engine_errors() -> list[type[EngineError]]:
    return [
        cls
        for _, cls in inspect.getmembers(engine_errors_module, inspect.isclass)
        if issubclass(cls, EngineError) and cls is not EngineError
    ]


def test_every_engine_error_is_in_the_table() -> None:
    assert set(ENGINE_ERRORS) == set(engine_errors())


@pytest.mark.parametrize("error, want", BEFORE, ids=lambda e: type(e).__name__)
def test_answers_are_as_before(error, want) -> None:
    api = failure_error(error, RETRY_AFTER_S)
    assert (api.status, api.type, api.param, api.code, api.message, api.headers) == want
    if isinstance(error, EngineError):
        assert vars(engine_error(error, RETRY_AFTER_S)) == vars(api)


def test_a_subclass_maps_as_its_base_and_an_unlisted_error_is_a_bug() -> None:
    class Narrower(QueueFullError):
        pass

    assert engine_error(Narrower("x"), 1).code == "queue_full"
    with pytest.raises(TypeError, match="add it to ENGINE_ERRORS"):
        engine_error(EngineError("no type of its own"), 1)
