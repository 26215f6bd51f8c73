"""Datasets: the built-in listing, and registering user sets (JSON or JSONL) with 400s that
name the bad field."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from adapterserve.server.evaluation.datasets import ARITHMETIC_SETS, BUILTIN_SPECS
from tests.evaluation.conftest import results, wait_for

WORDS = {"answer_kind": "words", "answer_words": ["yes", "no"]}


def test_builtin_listing(client: TestClient) -> None:
    listed = {d["name"]: d for d in client.get("/v1/datasets").json()["data"]}
    assert set(BUILTIN_SPECS) <= set(listed)
    assert listed["gsm8k"]["available"] and listed["gsm8k"]["source"] == "builtin"
    assert listed["gsm8k"]["num_records"] == 6 and listed["gsm8k"]["max_new_tokens"] == 256
    assert listed["boolq"]["answer_words"] == ["true", "false"]
    assert listed["boolq"]["max_new_tokens"] == 32
    assert listed["AQuA"]["answer_kind"] == "letter"
    assert not listed["hellaswag"]["available"] and listed["hellaswag"]["num_records"] is None
    assert all(BUILTIN_SPECS[name].kind in ("number", "letter") for name in ARITHMETIC_SETS)


def test_register_json_and_jsonl_then_evaluate(client: TestClient) -> None:
    records = [
        {"instruction": f"Is {i} small? Answer yes or no.", "answer": "yes"} for i in range(3)
    ]
    created = client.post("/v1/datasets", json={"name": "small-yes", **WORDS, "records": records})
    assert created.status_code == 201, created.text
    assert created.json()["num_records"] == 3 and created.json()["source"] == "user"
    jsonl = "\n".join(json.dumps({"instruction": f"{i}+{i}=?", "answer": 2 * i}) for i in range(3))
    created = client.post(
        "/v1/datasets", json={"name": "sums", "answer_kind": "number", "jsonl": jsonl + "\n\n"}
    )
    assert created.status_code == 201, created.text
    names = {d["name"] for d in client.get("/v1/datasets").json()["data"]}
    assert {"small-yes", "sums"} <= names
    job = client.post(
        "/v1/evaluations",
        json={"models": ["base"], "datasets": ["small-yes", "sums"], "max_tokens": 4},
    ).json()
    assert wait_for(client, job["id"])["status"] == "succeeded"
    rows = results(client, job["id"])
    assert {r["gold"] for r in rows if r["dataset"] == "sums"} == {"0", "2", "4"}
    loglikelihood = client.post(
        "/v1/evaluations",
        json={"models": ["base"], "datasets": ["small-yes"], "protocol": "loglikelihood"},
    ).json()
    finished = wait_for(client, loglikelihood["id"])
    assert finished["status"] == "succeeded" and finished["results"][0]["done"] == 3


def test_duplicate_and_builtin_names_conflict(client: TestClient) -> None:
    body = {"name": "twice", **WORDS, "records": [{"instruction": "q", "answer": "no"}]}
    assert client.post("/v1/datasets", json=body).status_code == 201
    assert client.post("/v1/datasets", json=body).status_code == 409
    assert client.post("/v1/datasets", json=body | {"replace": True}).status_code == 201
    builtin = client.post("/v1/datasets", json=body | {"name": "GSM8K"})
    assert builtin.status_code == 409 and builtin.json()["error"]["param"] == "name"


GOOD = [{"instruction": "q", "answer": "yes"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "../escape", **WORDS, "records": GOOD}, "name"),
        ({"name": "a b", **WORDS, "records": GOOD}, "name"),
        ({"name": "x", "answer_kind": "choice", "records": GOOD}, "answer_kind"),
        ({"name": "x", "answer_kind": "words", "records": GOOD}, "answer_words"),
        (
            {"name": "x", "answer_kind": "words", "answer_words": ["only"], "records": GOOD},
            "answer_words",
        ),
        (
            {"name": "x", "answer_kind": "words", "answer_words": ["a", "a"], "records": GOOD},
            "answer_words",
        ),
        (
            {"name": "x", "answer_kind": "words", "answer_words": ["a", " b"], "records": GOOD},
            "answer_words[1]",
        ),
        (
            {"name": "x", "answer_kind": "number", "answer_words": ["a", "b"], "records": GOOD},
            "answer_words",
        ),
        ({"name": "x", **WORDS}, "records"),
        ({"name": "x", **WORDS, "records": GOOD, "jsonl": "{}"}, "records"),
        ({"name": "x", **WORDS, "records": []}, "records"),
        ({"name": "x", **WORDS, "records": [GOOD[0], "text"]}, "records[1]"),
        ({"name": "x", **WORDS, "records": [GOOD[0], {"answer": "yes"}]}, "records[1].instruction"),
        (
            {"name": "x", **WORDS, "records": [{"instruction": " ", "answer": "yes"}]},
            "records[0].instruction",
        ),
        ({"name": "x", **WORDS, "records": [{"instruction": "q"}]}, "records[0].answer"),
        (
            {"name": "x", **WORDS, "records": [{"instruction": "q", "answer": "maybe"}]},
            "records[0].answer",
        ),
        (
            {
                "name": "x",
                **WORDS,
                "records": [{"instruction": "q", "input": "i", "answer": "yes"}],
            },
            "records[0].input",
        ),
        (
            {
                "name": "x",
                "answer_kind": "number",
                "records": [{"instruction": "q", "answer": "ten"}],
            },
            "records[0].answer",
        ),
        (
            {
                "name": "x",
                "answer_kind": "number",
                "records": [{"instruction": "q", "answer": "nan"}],
            },
            "records[0].answer",
        ),
        (
            {
                "name": "x",
                "answer_kind": "letter",
                "records": [{"instruction": "q", "answer": "F"}],
            },
            "records[0].answer",
        ),
        (
            {
                "name": "x",
                "answer_kind": "number",
                "jsonl": '{"instruction": "q", "answer": 1}\n{bad',
            },
            "jsonl",
        ),
        (  # nested past Python's recursion limit: was a RecursionError and a 500
            {"name": "x", "answer_kind": "number", "jsonl": "[" * 5000 + "]" * 5000},
            "jsonl",
        ),
        (  # past the body limit (64 levels), which every parser of client text shares
            {"name": "x", "answer_kind": "number", "jsonl": "[" * 65 + "]" * 65},
            "jsonl",
        ),
    ],
)
def test_malformed_dataset_is_400_naming_the_field(
    client: TestClient, body: dict, param: str
) -> None:
    response = client.post("/v1/datasets", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert "x" not in {d["name"] for d in client.get("/v1/datasets").json()["data"]}
