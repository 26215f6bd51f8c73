"""The served /openapi.json says what the server accepts and answers (SECURITY.md, "How to test
it"): every status a route can return is documented with its real content type, the server's
own caps are in the schema, and requests the schema allows are accepted. schemathesis checks the
same at random in test_schemathesis.py; these are the cases it found, kept as fixed rows."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def doc(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


def component(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def prop(doc: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    return component(doc, model)["properties"][name]


def branch(schema: dict[str, Any], type_: str) -> dict[str, Any]:
    """The `anyOf` member of `schema` (or `schema` itself) whose type is `type_`."""
    members = schema.get("anyOf", [schema])
    return next(m for m in members if m.get("type") == type_)


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 2} | fields


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "max_tokens": 2} | fields


# ---------------------------------------------------------------- methods and statuses


@pytest.mark.parametrize(
    "path,allowed",
    [
        ("/v1/adapters", {"GET", "POST"}),
        ("/v1/adapters/some-name", {"GET", "DELETE"}),
        ("/v1/evaluations", {"GET", "POST"}),
        ("/v1/evaluations/eval-1", {"GET", "DELETE"}),
        ("/v1/datasets", {"GET", "POST"}),
        (COMPLETIONS, {"POST"}),
    ],
)
@pytest.mark.parametrize("method", ["OPTIONS", "PUT"])
def test_405_lists_every_method_of_the_path(
    http: httpx.Client, path: str, allowed: set[str], method: str
) -> None:
    response = http.request(method, path)
    assert response.status_code == 405, response.text
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert response.json()["error"]["type"] == "invalid_request_error"
