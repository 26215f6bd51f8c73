"""Bad input against a real server: one row per SECURITY.md case (9-14, 20) that a single request
can trigger. Every row checks the status and OpenAI's error shape; afterwards the server still
serves. Queue full (16) and disconnects (15) are in test_http_api.py; faults (17, 19) in
test_http_faults.py."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.server.conftest import (
    API_KEY,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    MAX_N,
    MAX_PROMPT_CHARS,
    Server,
)

VOCAB = 384  # upper bound of the tiny tokenizer's vocabulary; ids at or past it are invalid
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class Case:
    id: str
    row: int  # SECURITY.md row
    path: str
    body: dict[str, Any] | None = None
    raw: bytes | None = None  # sent as-is instead of `body`
    headers: dict[str, Any] = field(default_factory=dict)
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    method: str = "POST"


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 2} | fields


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "max_tokens": 2} | fields


def raw_json(text: str) -> bytes:
    return text.encode()


CASES = [
    # 9: sampling parameters out of range or not finite
    Case(
        "temperature-nan-literal",
        9,
        COMPLETIONS,
        raw=raw_json('{"prompt": "Hi", "temperature": NaN}'),
        param="temperature",
    ),
    Case(
        "temperature-infinity",
        9,
        COMPLETIONS,
        raw=raw_json('{"prompt": "Hi", "temperature": Infinity}'),
        param="temperature",
    ),
    Case(
        "temperature-overflow",
        9,
        COMPLETIONS,
        raw=raw_json('{"prompt": "Hi", "temperature": 1e999}'),
        param="temperature",
    ),
    Case("temperature-above-2", 9, COMPLETIONS, completion(temperature=2.5), param="temperature"),
    Case("temperature-negative", 9, CHAT, chat(temperature=-0.1), param="temperature"),
    Case("top-p-above-1", 9, COMPLETIONS, completion(top_p=1.5), param="top_p"),
    Case(
        "top-p-nan",
        9,
        CHAT,
        raw=raw_json('{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}'),
        param="top_p",
    ),
    Case(
        "presence-penalty-above-2",
        9,
        COMPLETIONS,
        completion(presence_penalty=3),
        param="presence_penalty",
    ),
    Case(
        "frequency-penalty-neg-inf",
        9,
        CHAT,
        raw=raw_json(
            '{"messages": [{"role": "user", "content": "x"}], "frequency_penalty": -Infinity}'
        ),
        param="frequency_penalty",
    ),
    # the sampler packs top_k into an int64: 2**63 was a fatal engine fault (the server exited)
    Case(
        "top-k-beyond-int64", 9, COMPLETIONS, completion(top_k=2**63, temperature=1), param="top_k"
    ),
    Case("n-zero", 9, COMPLETIONS, completion(n=0), param="n"),
    Case("n-above-server-cap", 9, COMPLETIONS, completion(n=MAX_N + 1), param="n"),
    Case("n-above-openai-cap", 9, CHAT, chat(n=129), param="n"),
    Case("logprobs-above-5", 9, COMPLETIONS, completion(logprobs=6), param="logprobs"),
    Case(
        "logprobs-bool-on-completions", 9, COMPLETIONS, completion(logprobs=True), param="logprobs"
    ),
    Case(
        "top-logprobs-above-20", 9, CHAT, chat(logprobs=True, top_logprobs=21), param="top_logprobs"
    ),
    Case(
        "five-stop-strings",
        9,
        COMPLETIONS,
        completion(stop=["a", "b", "c", "d", "e"]),
        param="stop",
    ),
    Case("stop-not-strings", 9, CHAT, chat(stop=[1, 2]), param="stop"),
    Case(
        "logit-bias-above-100",
        9,
        COMPLETIONS,
        completion(logit_bias={"5": 101}),
        param="logit_bias.5",
    ),
    Case(
        "logit-bias-nan",
        9,
        COMPLETIONS,
        raw=raw_json('{"prompt": "Hi", "logit_bias": {"5": NaN}}'),
        param="logit_bias.5",
    ),
    Case("best-of-differs-from-n", 9, COMPLETIONS, completion(best_of=3), param="best_of"),
    Case("suffix-given", 9, COMPLETIONS, completion(suffix="tail"), param="suffix"),
    Case(
        "min-tokens-above-max-tokens", 9, COMPLETIONS, completion(min_tokens=5), param="min_tokens"
    ),
    # 10: lengths
    Case("max-tokens-negative", 10, COMPLETIONS, completion(max_tokens=-1), param="max_tokens"),
    Case(
        "prompt-plus-max-tokens-over-context",
        10,
        COMPLETIONS,
        completion(max_tokens=MAX_MODEL_LEN),
        param="max_tokens",
    ),
    Case(
        "max-completion-tokens-over-context",
        10,
        CHAT,
        chat(max_completion_tokens=10**12),
        param="max_completion_tokens",
    ),
    Case(
        "token-prompt-longer-than-context",
        10,
        COMPLETIONS,
        completion(prompt=[1] * (MAX_MODEL_LEN + 1)),
        param="prompt",
    ),
    Case(
        "prompt-over-char-cap",
        10,
        COMPLETIONS,
        completion(prompt="a" * (MAX_PROMPT_CHARS + 1)),
        param="prompt",
    ),
    Case(
        "messages-over-char-cap",
        10,
        CHAT,
        chat(messages=[{"role": "user", "content": "a" * (MAX_PROMPT_CHARS + 1)}]),
        param="messages",
    ),
    Case("prompt-empty-list", 10, COMPLETIONS, completion(prompt=[]), param="prompt"),
    Case("prompt-missing", 10, COMPLETIONS, {"model": "tiny"}, param="prompt"),
    Case("messages-empty", 10, CHAT, chat(messages=[]), param="messages"),
    # 11: token ids out of range
    Case(
        "prompt-token-id-past-vocab",
        11,
        COMPLETIONS,
        completion(prompt=[1, 2, 10**6]),
        param="prompt",
    ),
    Case("prompt-token-id-negative", 11, COMPLETIONS, completion(prompt=[[1, -1]]), param="prompt"),
    Case("prompt-mixed-types", 11, COMPLETIONS, completion(prompt=[1, "a"]), param="prompt"),
    Case(
        "logit-bias-key-past-vocab",
        11,
        COMPLETIONS,
        completion(logit_bias={str(VOCAB * 100): 1}),
        param="logit_bias",
    ),
    Case("logit-bias-key-not-an-id", 11, CHAT, chat(logit_bias={"hello": 1}), param="logit_bias"),
    Case(
        "stop-token-id-past-vocab",
        11,
        COMPLETIONS,
        completion(stop_token_ids=[VOCAB * 100]),
        param="stop_token_ids",
    ),
    # 12: templates from the request are never executed
    Case(
        "chat-template-given",
        12,
        CHAT,
        chat(chat_template="{{ raise_exception('pwned') }}"),
        param="chat_template",
    ),
    Case(
        "chat-template-kwargs-given",
        12,
        CHAT,
        chat(chat_template_kwargs={"x": 1}),
        param="chat_template_kwargs",
    ),
    Case(
        "image-content-part",
        12,
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        param="messages[0].content",
    ),
    Case(
        "unknown-role",
        12,
        CHAT,
        chat(messages=[{"role": "wizard", "content": "x"}]),
        param="messages[0].role",
    ),
    # 13: bodies
    Case(
        "content-type-text-plain",
        13,
        COMPLETIONS,
        raw=b'{"prompt": "Hi"}',
        headers={"content-type": "text/plain"},
        status=415,
    ),
    Case(
        "content-type-form",
        13,
        CHAT,
        raw=b"prompt=Hi",
        headers={"content-type": "application/x-www-form-urlencoded"},
        status=415,
    ),
    Case(
        "multipart-body",
        13,
        COMPLETIONS,
        raw=b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nHi\r\n--x--\r\n',
        headers={"content-type": "multipart/form-data; boundary=x"},
        status=415,
    ),
    Case("body-is-array", 13, COMPLETIONS, raw=b"[1, 2]"),
    Case("body-is-string", 13, CHAT, raw=b'"hello"'),
    Case("body-not-json", 13, COMPLETIONS, raw=b'{"prompt": '),
    Case("body-empty", 13, COMPLETIONS, raw=b""),
    Case(
        "json-nested-5000-deep",
        13,
        COMPLETIONS,
        raw=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ),
    Case("json-nested-100-deep", 13, CHAT, raw=b'{"x": ' + b"[" * 100 + b"]" * 100 + b"}"),
    Case("body-too-large", 13, COMPLETIONS, completion(prompt="a" * MAX_BODY_BYTES), status=413),
    Case("wrong-field-type", 13, COMPLETIONS, completion(max_tokens="many"), param="max_tokens"),
    # 14: encodings
    Case("invalid-utf8", 14, COMPLETIONS, raw=b'{"prompt": "caf\xc3"}'),
    Case("lone-surrogate-in-prompt", 14, COMPLETIONS, raw=raw_json('{"prompt": "a\\ud800b"}')),
    Case(
        "lone-surrogate-in-message",
        14,
        CHAT,
        raw=raw_json('{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ),
    Case("utf16-body", 14, COMPLETIONS, raw='{"prompt": "Hi"}'.encode("utf-16")),
    # unknown model and route
    Case("unknown-model", 0, COMPLETIONS, completion(model="gpt-5"), status=404, param="model"),
    Case(
        "unknown-route",
        0,
        "/v1/nothing-here",
        completion(),
        status=404,
        type="invalid_request_error",
    ),
    Case("wrong-method", 0, COMPLETIONS, method="GET", status=405),
    # 20: auth
    Case(
        "no-key-completions",
        20,
        COMPLETIONS,
        completion(),
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
    Case(
        "wrong-key-chat",
        20,
        CHAT,
        chat(),
        headers={"authorization": "Bearer nope"},
        status=401,
        type="authentication_error",
    ),
    Case(
        "non-ascii-key",
        20,
        CHAT,
        chat(),
        headers={"authorization": "Bearer caf\u00e9".encode()},
        status=401,
        type="authentication_error",
    ),
    Case(
        "basic-auth-scheme",
        20,
        COMPLETIONS,
        completion(),
        headers={"authorization": f"Basic {API_KEY}"},
        status=401,
        type="authentication_error",
    ),
    Case(
        "no-key-models",
        20,
        "/v1/models",
        method="GET",
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
    Case(
        "no-key-metrics",
        20,
        "/metrics",
        method="GET",
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
    # route probing without a key learns nothing: 401 before 404 / 405 (SECURITY row 20)
    Case(
        "no-key-unknown-route",
        20,
        "/v1/nothing-here",
        method="GET",
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
    Case(
        "no-key-wrong-method",
        20,
        COMPLETIONS,
        method="GET",
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
    Case(
        "no-key-options",
        20,
        CHAT,
        method="OPTIONS",
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
    Case(
        "no-key-openapi",
        20,
        "/openapi.json",
        method="GET",
        headers={"authorization": None},
        status=401,
        type="authentication_error",
    ),
]


def send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = {k: v for k, v in (dict(http.headers) | case.headers).items() if v is not None}
    if case.raw is not None:
        content = case.raw
        headers.setdefault("content-type", "application/json")
    else:
        content = json.dumps(case.body).encode() if case.body is not None else None
        if content is not None:
            headers["content-type"] = "application/json"
    request = httpx.Request(
        case.method, http.base_url.join(case.path), content=content, headers=headers
    )
    return http.send(request)


@pytest.mark.parametrize("case", CASES, ids=[f"row{c.row}-{c.id}" for c in CASES])
def test_bad_request_is_refused_in_openai_shape(http: httpx.Client, case: Case) -> None:
    response = send(http, case)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == case.type
    if case.param is not None:
        assert error["param"] == case.param
    assert 0 < len(error["message"]) <= 400
    assert (
        "Traceback" not in response.text
        and "/work/" not in response.text
        and ".py" not in response.text
    )
    if case.status == 401:
        assert response.headers.get("www-authenticate") == "Bearer"


def test_health_needs_no_key(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_error_messages_do_not_echo_huge_input(http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, json=completion(temperature="x" * 10_000))
    assert response.status_code == 400
    assert len(response.text) < 1000


def test_server_still_serves_after_the_table(http: httpx.Client, server: Server) -> None:
    response = http.post(COMPLETIONS, json=completion(max_tokens=3, temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3
    assert server.process.poll() is None
    counted = [
        line
        for line in http.get("/metrics").text.splitlines()
        if 'outcome="invalid_request"' in line
    ]
    assert counted, "refusals are counted in adapterserve_requests_total"


def test_extra_fields_are_ignored_and_nulls_mean_default(http: httpx.Client) -> None:
    body = completion(
        temperature=None, stop=None, seed=None, some_future_openai_field={"x": 1}, top_k=-1
    )
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path,body,unknown,accepted",
    [
        (
            "/v1/evaluations",
            {"models": ["base"], "datasets": ["none-such"], "limt": 5},
            "limt",
            "limit",
        ),
        (
            "/v1/datasets",
            {
                "name": "typo-set",
                "answer_kind": "number",
                "records": [{"instruction": "1+1?", "answer": "2"}],
                "replce": True,
            },
            "replce",
            "replace",
        ),
        (
            "/v1/load_lora_adapter",
            {"lora_name": "typo", "lora_path": "/no/such", "load_in_place": True},
            "load_in_place",
            "load_inplace",
        ),
        ("/v1/unload_lora_adapter", {"lora_name": "typo", "lora_id": 1}, "lora_id", "lora_int_id"),
    ],
    ids=["evaluations", "datasets", "load-lora", "unload-lora"],
)
def test_unknown_fields_of_our_own_endpoints_are_refused(
    http: httpx.Client, path: str, body: dict[str, Any], unknown: str, accepted: str
) -> None:
    """A misspelt option must not run a job the client did not ask for."""
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == unknown
    assert unknown in error["message"] and accepted in error["message"]


def test_a_huge_unknown_field_name_is_not_echoed(http: httpx.Client) -> None:
    body = {"models": ["base"], "datasets": ["none-such"], "x" * 5000: 1}
    response = http.post("/v1/evaluations", json=body)
    assert response.status_code == 400 and len(response.text) < 1000


def test_ignored_fields_of_openai_routes_are_logged_by_name_only(
    http: httpx.Client, server: Server
) -> None:
    """OpenAI clients send fields this server does not know; they are accepted, and the log
    says which were ignored (names only: values may be private)."""
    fields = {"zz_future_option": "SECRET-VALUE-1", "zz_other": {"x": "SECRET-VALUE-2"}}
    for path, body in ((COMPLETIONS, completion(**fields)), (CHAT, chat(**fields))):
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 5
    while "zz_future_option" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log().splitlines() if "zz_future_option" in line]
    assert len(lines) == 2 and all("zz_other" in line for line in lines), lines
    assert "SECRET-VALUE" not in server.log()


def test_a_subnormal_temperature_is_greedy(http: httpx.Client, server: Server) -> None:
    """1e-309 is 0 in float32: the sampler divided by it, got NaN probabilities, and the engine
    died with every request in it (found by schemathesis). Below 1e-5 now means greedy."""
    texts = []
    for temperature in (1e-309, 1e-6, 0):
        response = http.post(CHAT, json=chat(temperature=temperature, max_tokens=4))
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["message"]["content"])
    assert texts[0] == texts[1] == texts[2]
    assert server.process.poll() is None
