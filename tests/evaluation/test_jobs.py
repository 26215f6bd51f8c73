"""Evaluation jobs over HTTP on the tiny random model: every answer kind, both protocols,
bad requests, cancellation, shared engine steps, metrics."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from adapterserve.server.evaluation.datasets import BUILTIN_SPECS
from adapterserve.server.evaluation.extract import extract, is_correct, split_response
from adapterserve.server.evaluation.prompts import generate_prompt
from tests.evaluation.conftest import SERVED_NAME, results, wait_for

# The models of the shared-steps job. Today only the base model exists (under its alias and
# its id); add adapter names here once the test server loads some.
SHARED_STEP_MODELS = ["base", SERVED_NAME]
ROW_FIELDS = {
    "model",
    "dataset",
    "index",
    "instruction",
    "response",
    "extracted",
    "gold",
    "correct",
}


def submit(client: TestClient, **body) -> dict:
    response = client.post("/v1/evaluations", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("eval-")
    return job


def test_generate_job_over_every_answer_kind(client: TestClient) -> None:
    datasets = ["gsm8k", "AQuA", "boolq", "piqa"]
    job = submit(client, models=["base"], datasets=datasets, limit=4, max_tokens=8)
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded", job
    assert "4-beam search" in job["note"]
    assert job["progress"] == {"done": 16, "total": 16, "eta_s": None}
    for cell in job["results"]:
        assert cell["done"] == cell["total"] == 4 and 0 <= cell["accuracy"] <= 1
    rows = results(client, job["id"])
    assert len(rows) == 16 and {r["dataset"] for r in rows} == set(datasets)
    for row in rows:
        assert row.keys() >= ROW_FIELDS
        spec = BUILTIN_SPECS[row["dataset"]]
        assert row["extracted"] == extract(row["response"], spec)
        assert row["correct"] == is_correct(row["extracted"], row["gold"], spec)
    _check_same_as_completions(client, rows[0])


def _check_same_as_completions(client: TestClient, row: dict) -> None:
    """The job's response is the paper's split of prompt + a greedy completion of the prompt."""
    prompt = generate_prompt(row["instruction"])
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert row["response"] == split_response(prompt + text)


def test_loglikelihood_picks_the_best_scored_word(client: TestClient) -> None:
    job = submit(
        client, models=["base"], datasets=["boolq", "AQuA"], limit=3, protocol="loglikelihood"
    )
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded", job
    assert "not comparable" in job["note"]
    rows = results(client, job["id"])
    assert len(rows) == 6
    for row in rows:
        assert row["extracted"] == max(row["scores"], key=row["scores"].get)
        assert row["correct"] == (row["extracted"] == row["gold"])
    boolq = next(r for r in rows if r["dataset"] == "boolq")
    assert set(boolq["scores"]) == {"true", "false"}
    for word, score in boolq["scores"].items():
        assert score == pytest.approx(_echo_score(client, boolq["instruction"], word), abs=1e-3)


def _echo_score(client: TestClient, instruction: str, word: str) -> float:
    """The same score through /v1/completions: echo + logprobs with max_tokens 0."""
    tokenizer = client.app.state.engine.tokenizer
    prompt = generate_prompt(instruction)
    context = tokenizer.encode(prompt.rstrip())
    continuation = tokenizer.encode(prompt[len(prompt.rstrip()) :] + word, add_special_tokens=False)
    body = {
        "model": SERVED_NAME,
        "prompt": context + continuation,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    }
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    return sum(choice["logprobs"]["token_logprobs"][-len(continuation) :])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"models": ["base"], "datasets": ["nope"]}, 404, "datasets"),
        ({"models": ["base"], "datasets": ["hellaswag"]}, 404, "datasets"),  # no file supplied
        ({"models": ["no-such-adapter"], "datasets": ["gsm8k"]}, 404, "models"),
        ({"models": ["base"], "datasets": ["gsm8k"], "limit": 0}, 400, "limit"),
        ({"models": ["base"], "datasets": ["gsm8k"], "limit": -3}, 400, "limit"),
        ({"models": ["base"], "datasets": ["gsm8k"], "protocol": "loglikelihood"}, 400, "protocol"),
        ({"models": ["base"], "datasets": ["boolq"], "protocol": "beam"}, 400, "protocol"),
        ({"models": ["base", "base"], "datasets": ["boolq"]}, 400, "models"),
        ({"models": [], "datasets": ["boolq"]}, 400, "models"),
        ({"models": ["base"], "datasets": ["boolq", "BoolQ"]}, 400, "datasets"),
        ({"datasets": ["boolq"]}, 400, "models"),
    ],
)
def test_bad_requests(client: TestClient, body: dict, status: int, param: str) -> None:
    response = client.post("/v1/evaluations", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/evaluations/eval-nope"),
        ("get", "/v1/evaluations/eval-nope/results"),
        ("delete", "/v1/evaluations/eval-nope"),
    ],
)
def test_unknown_job_is_404(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_cancel_mid_job_frees_its_requests(client: TestClient) -> None:
    records = [{"instruction": f"Count to {i}.", "answer": str(i)} for i in range(80)]
    upload = {"name": "counting", "answer_kind": "number", "records": records}
    assert client.post("/v1/datasets", json=upload).status_code == 201
    job = submit(client, models=["base"], datasets=["counting"], max_tokens=48)
    wait_for(client, job["id"], lambda j: j["progress"]["done"] >= 2)
    cancelled = client.delete(f"/v1/evaluations/{job['id']}").json()
    assert cancelled["status"] == "cancelled"
    engine = client.app.state.engine
    deadline = time.monotonic() + 10
    while engine.num_kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_kv_blocks_used == 0
    done = cancelled["progress"]["done"]
    time.sleep(0.3)
    job = client.get(f"/v1/evaluations/{job['id']}").json()
    assert job["status"] == "cancelled" and job["progress"]["done"] == done < 80
    assert len(results(client, job["id"])) == done
    again = client.delete(f"/v1/evaluations/{job['id']}")  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_models_share_engine_steps(client: TestClient) -> None:
    """One job over several models x two datasets decodes its models in the same steps."""
    job = submit(
        client, models=SHARED_STEP_MODELS, datasets=["gsm8k", "boolq"], limit=4, max_tokens=8
    )
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded", job
    assert len(results(client, job["id"])) == len(SHARED_STEP_MODELS) * 2 * 4
    prefix = f"{job['id']}-"
    steps = [
        {
            request_id.removeprefix(prefix).split("-")[0]
            for request_id, _ in step
            if request_id.startswith(prefix)
        }
        for step in client.app.state.engine.step_log
    ]
    mixed = [models for models in steps if len(models) >= 2]
    assert mixed, "no engine step ran requests of two models of the job together"
    assert max(len(m) for m in steps) == len(SHARED_STEP_MODELS)


def test_list_and_metrics(client: TestClient) -> None:
    job = submit(client, models=["base"], datasets=["boolq"], limit=2, max_tokens=4)
    wait_for(client, job["id"])
    listed = client.get("/v1/evaluations").json()
    assert listed["object"] == "list" and job["id"] in {j["id"] for j in listed["data"]}
    metrics = client.get("/metrics").text
    assert 'adapterserve_evaluation_jobs{state="succeeded"}' in metrics
    assert 'adapterserve_evaluation_examples_scored_total{dataset="boolq",model="base"}' in metrics


@pytest.mark.parametrize("protocol", ["generate", "loglikelihood"])
def test_prompt_longer_than_the_context_is_a_wrong_row(client: TestClient, protocol: str) -> None:
    name = f"too-long-{protocol}"
    records = [{"instruction": "fox " * 600, "answer": "yes"}]
    upload = {
        "name": name,
        "answer_kind": "words",
        "answer_words": ["yes", "no"],
        "records": records,
    }
    assert client.post("/v1/datasets", json=upload).status_code == 201
    job = wait_for(
        client, submit(client, models=["base"], datasets=[name], protocol=protocol)["id"]
    )
    assert job["status"] == "succeeded", job
    (row,) = results(client, job["id"])
    assert row["correct"] is False and row["extracted"] is None and "context" in row["error"]
