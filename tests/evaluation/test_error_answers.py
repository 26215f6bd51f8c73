"""Every refusal of the evaluation API, field by field over HTTP (status, type, code, param,
message, no Retry-After): the answers that evaluation's typed errors must keep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterserve.server.main import create_app
from tests.evaluation.conftest import eval_settings, make_data_dir


@pytest.fixture(scope="module")
def app_client(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("eval-errors")
    data_dir = make_data_dir(root / "data", size=2)
    (data_dir / "SVAMP").mkdir()
    (data_dir / "SVAMP" / "test.json").write_text(json.dumps({"not": "a list"}))
    with TestClient(create_app(eval_settings(tiny_model_dir, data_dir, root / "cache"))) as client:
        yield client


def _error(status: int, type: str, message: str, param=None, code=None) -> tuple[int, dict]:
    return status, {"message": message, "type": type, "param": param, "code": code}


REFUSALS = [
    (
        "GET", "/v1/evaluations/eval-nope", None,
        _error(404, "not_found_error", "No evaluation job 'eval-nope'; GET /v1/evaluations lists "
               "them.", code="evaluation_not_found"),
    ),
    (
        "DELETE", "/v1/evaluations/eval-nope", None,
        _error(404, "not_found_error", "No evaluation job 'eval-nope'; GET /v1/evaluations lists "
               "them.", code="evaluation_not_found"),
    ),
    (
        "POST", "/v1/evaluations", {"models": ["ghost"], "datasets": ["gsm8k"]},
        _error(404, "not_found_error", "The model 'ghost' does not exist; GET /v1/models lists "
               "the served models ('base' selects the base model).", "models", "model_not_found"),
    ),
    (
        "POST", "/v1/evaluations", {"models": ["base", "base"], "datasets": ["gsm8k"]},
        _error(400, "invalid_request_error", "'models' lists 'base' more than once.", "models"),
    ),
    (
        "POST", "/v1/evaluations", {"models": ["base"], "datasets": ["nope"]},
        _error(404, "not_found_error", "The dataset 'nope' does not exist; GET /v1/datasets lists "
               "them.", "datasets", "dataset_not_found"),
    ),
    (
        "POST", "/v1/evaluations", {"models": ["base"], "datasets": ["ARC-Easy"]},
        _error(404, "not_found_error", "The dataset 'ARC-Easy' has no data on this server; put "
               "its test.json under ARC-Easy/ in the data directory (--data-dir).", "datasets",
               "dataset_not_found"),
    ),
    (
        "POST", "/v1/evaluations",
        {"models": ["base"], "datasets": ["gsm8k"], "protocol": "loglikelihood"},
        _error(400, "invalid_request_error", "The dataset 'gsm8k' has numeric answers: it can "
               "only be evaluated with protocol 'generate'.", "protocol"),
    ),
    (
        "POST", "/v1/evaluations", {"models": ["base"], "datasets": ["SVAMP"]},
        _error(500, "server_error", "The data file of 'SVAMP' is not a JSON array."),
    ),
    (
        "POST", "/v1/datasets",
        {"name": "boolq", "answer_kind": "number", "records": [{"instruction": "q", "answer": 1}]},
        _error(409, "conflict_error", "'boolq' is a built-in dataset name; pick another name.",
               "name", "dataset_exists"),
    ),
    (
        "POST", "/v1/datasets",
        {"name": "-bad", "answer_kind": "number", "records": [{"instruction": "q", "answer": 1}]},
        _error(400, "invalid_request_error", "'name' must be 1-64 characters of letters, digits, "
               "'.', '_' or '-', starting with a letter or digit; got '-bad'.", "name"),
    ),
    (
        "POST", "/v1/datasets",
        {"name": "mine", "answer_kind": "number", "records": [{"instruction": "q", "answer": "x"}]},
        _error(400, "invalid_request_error", "records[0].answer must be a number for answer_kind "
               "'number'; got 'x'.", "records[0].answer"),
    ),
    (
        "POST", "/v1/datasets", {"name": "mine", "answer_kind": "number", "jsonl": "{\n"},
        _error(400, "invalid_request_error", "jsonl line 1 is not valid JSON: Expecting property "
               "name enclosed in double quotes: line 1 column 2 (char 1).", "jsonl"),
    ),
    (
        "DELETE", "/v1/datasets/gsm8k", None,
        _error(409, "conflict_error", "'gsm8k' is a built-in dataset; it cannot be deleted.",
               "name", "dataset_builtin"),
    ),
    (
        "DELETE", "/v1/datasets/nope", None,
        _error(404, "not_found_error", "The dataset 'nope' does not exist; GET /v1/datasets lists "
               "them.", "datasets", "dataset_not_found"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "expected"), REFUSALS)
def test_refusals_answer_as_before(
    app_client: TestClient, method: str, path: str, body: dict | None, expected: tuple[int, dict]
) -> None:
    response = app_client.request(method, path, json=body)
    assert (response.status_code, response.json()["error"]) == expected, response.text
    assert "retry-after" not in response.headers
