"""The served /openapi.json says what the server accepts and answers (SECURITY.md, "How to test
it"): every status a route can return is documented with its real content type, the server's
own caps are in the schema, and requests the schema allows are accepted. schemathesis checks the
same at random in test_schemathesis.py; these are the cases it found, kept as fixed rows."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from adapterserve.server.api.routers.openapi import decimal_below, openapi_document
from adapterserve.server.config import Settings
from adapterserve.server.main import create_app
from tests.server.conftest import MAX_MODEL_LEN, MAX_N, Server

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
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


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, p): op for p, ops in doc["paths"].items() for m, op in ops.items()}


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
        ("/v1/files", {"GET", "POST"}),
        ("/v1/files/file-1", {"GET", "DELETE"}),
        ("/v1/fine_tuning/jobs", {"GET", "POST"}),
        ("/v1/fine_tuning/jobs/ftjob-1/cancel", {"POST"}),
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


# What each operation can answer on this server (API key set): 401 from the key check on every
# route but /health, 400 and 413 from the body guard on routes with a body, 500 from the
# catch-all handler, and the statuses of the route itself.
COMMON = {401, 500}
BODY = COMMON | {400, 408, 413, 415}  # RequestGuard: bad JSON, stalled, too large, wrong type
STATUSES = {
    ("post", COMPLETIONS): BODY | {200, 404, 503},
    ("post", CHAT): BODY | {200, 404, 503},
    ("post", "/v1/responses"): BODY | {200, 404, 503},
    ("get", "/v1/models"): COMMON | {200},
    ("get", "/v1/models/{model_id}"): COMMON | {200, 404},
    ("post", "/v1/adapters"): BODY | {201, 403, 409, 503},  # 403: a user key, not the admin
    ("get", "/v1/adapters"): COMMON | {200, 503},
    ("get", "/v1/adapters/{name}"): COMMON | {200, 404, 503},
    ("delete", "/v1/adapters/{name}"): COMMON | {200, 403, 404, 503},
    ("post", "/v1/load_lora_adapter"): BODY | {200, 403, 404, 409, 503},
    ("post", "/v1/unload_lora_adapter"): BODY | {200, 403, 404, 503},
    ("get", "/health"): {200, 500, 503},
    ("get", "/ready"): {200, 500, 503},  # public: load balancers probe it without a key
    ("get", "/metrics"): COMMON | {200},
    ("get", "/v1/evaluations"): COMMON | {200},
    ("post", "/v1/evaluations"): BODY | {202, 404, 429},
    ("get", "/v1/evaluations/{job_id}"): COMMON | {200, 404},
    ("delete", "/v1/evaluations/{job_id}"): COMMON | {200, 404},  # 404: not its creator either
    ("get", "/v1/evaluations/{job_id}/results"): COMMON | {200, 404},
    ("get", "/v1/datasets"): COMMON | {200},
    ("post", "/v1/datasets"): BODY | {201, 403, 409},
    ("delete", "/v1/datasets/{name}"): COMMON | {200, 403, 404, 409},  # 409: built-in, or in use
    ("post", "/v1/files"): BODY | {200, 409},  # 409: the store's file count or bytes
    ("get", "/v1/files"): COMMON | {200, 400},  # 400: bad limit / order, unknown `after`
    ("get", "/v1/files/{file_id}"): COMMON | {200, 404},
    ("get", "/v1/files/{file_id}/content"): COMMON | {200, 404},
    ("delete", "/v1/files/{file_id}"): COMMON | {200, 404},  # 404: another key's file too
    # 503: a server without the job manager (a cluster's ingress); 429: the queue is full
    ("post", "/v1/fine_tuning/jobs"): BODY | {200, 403, 404, 429, 503},
    ("get", "/v1/fine_tuning/jobs"): COMMON | {200, 400, 503},  # 400: bad limit, unknown `after`
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): COMMON | {200, 404, 503},
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): COMMON
    | {200, 400, 403, 404, 503},
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): COMMON | {200, 400, 404, 503},
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): COMMON | {200, 400, 404, 503},
    ("post", "/tokenize"): BODY | {200, 404},
    ("post", "/detokenize"): BODY | {200, 404},
    ("get", "/tokenizer_info"): COMMON | {200},
}


def test_every_operation_documents_exactly_the_statuses_it_can_answer(
    doc: dict[str, Any],
) -> None:
    documented = {key: {int(s) for s in op["responses"]} for key, op in operations(doc).items()}
    assert documented == STATUSES


def test_every_error_response_is_json_in_openais_shape(doc: dict[str, Any]) -> None:
    for (method, path), op in operations(doc).items():
        for status, response in op["responses"].items():
            if int(status) >= 400 and (path, status) not in (("/health", "503"), ("/ready", "503")):
                assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (
                    method,
                    path,
                    status,
                )
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # 422 is never answered


def test_streamed_completions_are_documented_as_event_streams(doc: dict[str, Any]) -> None:
    """Before OpenAPI 3.2 the schema of text/event-stream describes one event: an object whose
    `data` is the chunk (schemathesis checks every event against it)."""
    for path in (COMPLETIONS, CHAT, "/v1/responses"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        event = content["text/event-stream"]["schema"]
        assert event["required"] == ["data"] and event["properties"]["data"]["type"] == "string"


def test_api_key_is_documented_as_a_bearer_scheme(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for (_, path), op in operations(doc).items():
        public = path in ("/health", "/ready")
        assert op.get("security") == (None if public else [{"bearer": []}]), path


# ---------------------------------------------------------------- the server's own caps


def test_n_maximum_is_the_servers_cap(doc: dict[str, Any], http: httpx.Client) -> None:
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        assert branch(prop(doc, model, "n"), "integer")["maximum"] == MAX_N
    response = http.post(COMPLETIONS, json=completion(n=MAX_N, max_tokens=1))
    assert response.status_code == 200, response.text


def test_a_request_that_can_never_fit_is_400_not_503(bigram_server: Server) -> None:
    """The bigram server holds one sequence and queues none: two choices can never run, so
    the answer is a 400 naming the limit, not a 503 that invites a retry (SECURITY.md 25);
    the schema says so with n and prompt-list maxima."""
    with httpx.Client(base_url=bigram_server.base_url, timeout=60) as http:
        doc = http.get("/openapi.json").json()
        assert branch(prop(doc, "ChatCompletionRequest", "n"), "integer")["maximum"] == 1
        prompt = prop(doc, "CompletionRequest", "prompt")["anyOf"]
        lists = [m for m in prompt if m["type"] == "array" and m["items"]["type"] != "integer"]
        assert [m["maxItems"] for m in lists] == [1, 1]  # strings, token-id lists
        for path, body, param in (
            (CHAT, chat(model="bigram", n=2), "n"),
            (COMPLETIONS, completion(model="bigram", prompt=["a", "b"]), "prompt"),
            (COMPLETIONS, completion(model="bigram", prompt=""), "prompt"),  # was a 500
        ):
            response = http.post(path, json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
        for prompt in ("Hello", [[1, 2, 3]], [1, 2, 3]):  # one prompt each
            body = completion(model="bigram", prompt=prompt, max_tokens=1)
            assert http.post(COMPLETIONS, json=body).status_code == 200


def test_token_ids_and_lengths_carry_the_models_caps(
    doc: dict[str, Any], http: httpx.Client
) -> None:
    vocab = http.get("/v1/models/tiny").json()["vocab_size"]
    prompt = prop(doc, "CompletionRequest", "prompt")["anyOf"]
    ids = next(m for m in prompt if m["type"] == "array" and m["items"]["type"] == "integer")
    assert ids["items"]["maximum"] == vocab - 1 and ids["maxItems"] == MAX_MODEL_LEN
    assert branch(prop(doc, "CompletionRequest", "max_tokens"), "integer")["maximum"] == (
        MAX_MODEL_LEN - 1
    )
    bias_schema = branch(prop(doc, "CompletionRequest", "logit_bias"), "object")
    pattern = bias_schema["propertyNames"]["pattern"]
    bias = {str(vocab - 1): 1, f"00{vocab // 2}": 1}
    assert http.post(COMPLETIONS, json=completion(logit_bias=bias)).status_code == 200
    # the documented pattern admits exactly the ids the server takes
    assert all(re.fullmatch(pattern, key) for key in bias)
    assert not any(re.fullmatch(pattern, key) for key in (str(vocab), "-1", "1e3", ""))


def test_an_overridden_max_tokens_is_still_held_to_its_maximum(
    doc: dict[str, Any], http: httpx.Client
) -> None:
    """max_completion_tokens wins over max_tokens, but the schema caps both: a max_tokens that
    can never fit is refused even beside a valid max_completion_tokens."""
    cap = branch(prop(doc, "ChatCompletionRequest", "max_tokens"), "integer")["maximum"]
    response = http.post(CHAT, json=chat(max_tokens=cap + 1, max_completion_tokens=1))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_tokens"
    assert http.post(CHAT, json=chat(max_tokens=cap, max_completion_tokens=1)).status_code == 200


@pytest.mark.parametrize(
    "model,path,body",
    [
        ("CompletionRequest", COMPLETIONS, completion()),
        ("EvaluationRequest", "/v1/evaluations", {"models": ["base"], "datasets": ["none-such"]}),
    ],
)
def test_the_largest_documented_seed_is_accepted(
    doc: dict[str, Any], http: httpx.Client, model: str, path: str, body: dict[str, Any]
) -> None:
    """Bounds are rendered as JSON numbers, i.e. doubles: 2**63 - 1 printed as 9.2e18 meant
    2**63, one more than the server took. Exclusive powers of two survive the trip."""
    seed = branch(prop(doc, model, "seed"), "integer")
    assert isinstance(seed["exclusiveMaximum"], int)  # not 9.223372036854776e+18
    largest = int(seed["maximum"]) if "maximum" in seed else int(seed["exclusiveMaximum"]) - 1
    response = http.post(path, json=body | {"seed": largest})
    assert response.status_code in (200, 404), response.text  # 404: the dataset does not exist
    assert http.post(path, json=body | {"seed": largest + 1}).status_code == 400


def integer_bounds(node: Any) -> list[Any]:
    """Every bound of every integer schema in `node`."""
    if isinstance(node, list):
        return [bound for item in node for bound in integer_bounds(item)]
    if not isinstance(node, dict):
        return []
    found = [node[key] for key in node if key in BOUNDS] if node.get("type") == "integer" else []
    return found + [bound for value in node.values() for bound in integer_bounds(value)]


def test_integer_bounds_are_printed_as_integers(doc: dict[str, Any]) -> None:
    bounds = integer_bounds(doc)
    assert len(bounds) > 20 and all(isinstance(bound, int) for bound in bounds)


# ---------------------------------------------------------------- the schema allows it: accepted


@pytest.mark.parametrize(
    "model,path,body",
    [("CompletionRequest", COMPLETIONS, completion()), ("ChatCompletionRequest", CHAT, chat())],
)
def test_null_is_documented_wherever_it_means_default(
    doc: dict[str, Any], http: httpx.Client, model: str, path: str, body: dict[str, Any]
) -> None:
    schema = component(doc, model)
    optional = set(schema["properties"]) - set(schema["required"])
    for name in optional:
        field = schema["properties"][name]
        assert field.get("type") == "null" or {"type": "null"} in field["anyOf"], name
    nulls = dict.fromkeys(optional - set(body))
    assert http.post(path, json=body | nulls).status_code == 200


def test_an_empty_suffix_is_accepted_and_documented(
    doc: dict[str, Any], http: httpx.Client
) -> None:
    assert branch(prop(doc, "CompletionRequest", "suffix"), "string")["maxLength"] == 0
    for suffix in ("", None):
        response = http.post(COMPLETIONS, json=completion(suffix=suffix))
        assert response.status_code == 200, response.text
    refused = http.post(COMPLETIONS, json=completion(suffix="tail"))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "suffix"


@pytest.mark.parametrize("top_logprobs", [0, 3])
def test_top_logprobs_without_logprobs_is_ignored(http: httpx.Client, top_logprobs: int) -> None:
    response = http.post(CHAT, json=chat(logprobs=False, top_logprobs=top_logprobs))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"] is None


def test_refused_chat_options_are_documented_as_such(
    doc: dict[str, Any], http: httpx.Client
) -> None:
    assert branch(prop(doc, "ChatCompletionRequest", "tools"), "array")["maxItems"] == 128
    assert prop(doc, "ChatCompletionRequest", "chat_template")["type"] == "null"
    assert prop(doc, "ChatCompletionRequest", "chat_template_kwargs")["type"] == "null"
    kinds = branch(prop(doc, "ResponseFormat", "type"), "string")["enum"]
    assert kinds == ["text", "json_object", "json_schema"]
    accepted = chat(tools=[], response_format={}, chat_template=None, chat_template_kwargs=None)
    assert http.post(CHAT, json=accepted).status_code == 200
    for response_format in ({"type": None}, {"type": "text"}):  # null means default: text
        body = chat(response_format=response_format)
        assert http.post(CHAT, json=body).status_code == 200, response_format
    refused = http.post(CHAT, json=chat(response_format={"type": "xml"}))
    assert refused.status_code == 400 and refused.json()["error"]["param"].startswith(
        "response_format"
    )


def test_stop_limits_are_documented(doc: dict[str, Any]) -> None:
    stop = prop(doc, "CompletionRequest", "stop")
    assert branch(stop, "string")["minLength"] == 1
    listed = branch(stop, "array")
    assert listed["maxItems"] == 4 and listed["items"]["minLength"] == 1


def test_evaluation_lists_are_unique_items(doc: dict[str, Any], http: httpx.Client) -> None:
    for name in ("models", "datasets"):
        assert prop(doc, "EvaluationRequest", name)["uniqueItems"] is True
    body = {"models": ["base", "base"], "datasets": ["gsm8k"]}
    refused = http.post("/v1/evaluations", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "models"


@pytest.mark.parametrize(
    "path,body,param",
    [
        (COMPLETIONS, completion(n="2"), "n"),
        (COMPLETIONS, completion(temperature="0.5"), "temperature"),
        (COMPLETIONS, completion(echo=1), "echo"),
        (CHAT, chat(stream="false"), "stream"),
        (CHAT, chat(logprobs="true"), "logprobs"),
        ("/v1/evaluations", {"models": ["base"], "datasets": ["x"], "limit": "5"}, "limit"),
    ],
)
def test_values_of_the_wrong_json_type_are_refused(
    http: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    """The schema says integer / number / boolean; a string or a number in its place is not
    silently converted."""
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_integral_floats_are_integers(http: httpx.Client) -> None:
    """JSON Schema counts 2.0 as an integer, so the server takes it as one."""
    body = completion(n=2.0, max_tokens=1.0, prompt=[1.0, 2])
    assert http.post(COMPLETIONS, json=body).status_code == 200


# ---------------------------------------------------------------- vLLM's load endpoint


def test_load_lora_adapter_name_is_documented(doc: dict[str, Any]) -> None:
    """The registry's rule (1-64 letters, digits, '.', '_', '-', starting with a letter or
    digit, no '..'), so that a name the schema allows is not refused as invalid."""
    name = prop(doc, "LoadLoraAdapterRequest", "lora_name")
    assert name["maxLength"] == 64
    for valid in ("lora-a.v2_1", "a.", "A", "a.b.c"):
        assert re.fullmatch(name["pattern"], valid), valid
    for invalid in ("a..b", ".hidden", "-x", "a/b", "a b", "a\x00"):
        assert not re.fullmatch(name["pattern"], invalid), invalid


def test_upload_name_is_documented(doc: dict[str, Any]) -> None:
    body = doc["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]
    name = body["schema"]["properties"]["name"]
    assert name["pattern"] == prop(doc, "LoadLoraAdapterRequest", "lora_name")["pattern"]
    assert (name["minLength"], name["maxLength"]) == (1, 64)


def test_load_without_adapter_roots_is_403_without_probing_the_path(http: httpx.Client) -> None:
    """This server has no --adapter-root: loading by path is off, and whether a path exists
    on the server is not revealed (it used to be 400 for a folder, 404 for nothing)."""
    for path in ("/", "/no/such/folder"):
        body = {"lora_name": "probe", "lora_path": path}
        response = http.post("/v1/load_lora_adapter", json=body)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["param"] == "lora_path"


# ---------------------------------------------------------------- the document, in process


def served(**settings: Any) -> dict[str, Any]:
    """The document of an app that was never started (no engine: no model limits)."""
    return openapi_document(create_app(Settings(**settings)))


def test_placeholders_become_the_settings_caps() -> None:
    doc = served(max_n=3, max_prompt_chars=100)
    assert branch(prop(doc, "CompletionRequest", "n"), "integer")["maximum"] == 3
    assert branch(prop(doc, "CompletionRequest", "prompt"), "string")["maxLength"] == 100
    assert "x-server-limit" not in json.dumps(doc)  # unknown limits (no model) are dropped
    assert "maximum" not in branch(prop(doc, "CompletionRequest", "max_tokens"), "integer")


def test_401_and_the_bearer_scheme_only_with_a_key() -> None:
    without = served()
    assert "securitySchemes" not in without["components"]
    assert all("401" not in op["responses"] for op in operations(without).values())
    with_key = served(api_key="k")
    assert with_key["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "401" in with_key["paths"]["/v1/models"]["get"]["responses"]


def test_error_schemas_are_registered_and_422_is_gone() -> None:
    doc = served()
    assert {"ErrorResponse", "ErrorDetail"} <= set(doc["components"]["schemas"])
    assert all("422" not in op["responses"] for op in operations(doc).values())


@pytest.mark.parametrize("limit", [1, 7, 10, 384, 1000, 49152])
def test_decimal_below_matches_exactly_the_ids_under_the_limit(limit: int) -> None:
    pattern = decimal_below(limit)
    for value in range(min(2 * limit + 20, 120_000)):
        for text in (str(value), f"00{value}"):
            assert bool(re.fullmatch(pattern, text)) == (value < limit), (pattern, text)
    assert not any(re.search(pattern, text) for text in ("", "-1", " 1", "1 ", "1e3", "x"))
