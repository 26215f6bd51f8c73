"""adapterserve.server.api.errors.ADAPTER_ERRORS: every typed refusal of the adapters package answers with the
HTTP status, error type and code the API gave before the refusals lost their `.status`."""

from __future__ import annotations

import inspect

import pytest

from adapterserve.adapters import errors as adapter_errors
from adapterserve.adapters.errors import AdapterError
from adapterserve.server.api.errors import (
    ADAPTER_ERRORS,
    adapter_error_status,
    error_type,
    from_adapter_error,
)

# type -> (status, code) as the API answered it when the exceptions carried their status
# (RegistryError / StoreError), and AdapterFormatError's fixed 400.
BEFORE = {
    "AdapterFormatError": (400, None),
    "InvalidNameError": (400, None),  # StoreError(400, "name") from validate_name
    "InvalidUploadError": (400, None),  # StoreError(400, "files" | "archive")
    "InvalidPathError": (400, None),  # RegistryError(400, "lora_path")
    "NoAdapterRootsError": (403, None),  # as the route answers before the path is read
    "PathNotAllowedError": (403, None),  # ... roots configured, the path outside them
    "UnknownAdapterError": (404, "model_not_found"),  # every 404 had code model_not_found
    "AdapterPathNotFoundError": (404, "model_not_found"),  # RegistryError(404, "lora_path")
    "AdapterExistsError": (409, None),
    "AdapterLimitError": (409, None),  # StoreError(409, "name"): the store is full
    "NoAdapterStoreError": (409, None),
    "UploadTooLargeError": (413, None),
    "AdapterLoadError": (500, None),
}


def typed_errors() -> list[type[AdapterError]]:
    return [
        cls
        for _, cls in inspect.getmembers(adapter_errors, inspect.isclass)
        if issubclass(cls, AdapterError) and cls is not AdapterError
    ]


def test_every_typed_error_is_in_the_table() -> None:
    assert {cls.__name__ for cls in typed_errors()} == set(BEFORE)
    assert set(ADAPTER_ERRORS) == set(typed_errors())


@pytest.mark.parametrize("cls", typed_errors(), ids=lambda cls: cls.__name__)
def test_status_type_and_code_are_as_before(cls: type[AdapterError]) -> None:
    status, code = BEFORE[cls.__name__]
    error = cls("lora_path", "what to change")
    assert adapter_error_status(error) == (status, error_type(status), code)
    api = from_adapter_error(error)
    assert (api.status, api.type, api.param, api.code) == (
        status,
        error_type(status),
        "lora_path",
        code,
    )
    assert api.message == "what to change"
    assert from_adapter_error(error, "scrubbed").message == "scrubbed"


def test_a_subclass_maps_as_its_nearest_listed_base() -> None:
    class Narrower(adapter_errors.UploadTooLargeError):
        pass

    assert adapter_error_status(Narrower("files", "x"))[0] == 413
    with pytest.raises(TypeError, match="add it to ADAPTER_ERRORS"):
        adapter_error_status(AdapterError(None, "no type of its own"))


def test_format_errors_stay_value_errors() -> None:
    """Callers that catch ValueError around a parse (registry.load_store) still catch them."""
    assert issubclass(adapter_errors.AdapterFormatError, ValueError)
