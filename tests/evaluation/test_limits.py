"""Nothing a client creates grows without bound (SECURITY row 24): registered datasets (count
and bytes), queued evaluation jobs (429), kept jobs (the oldest finished go), and the metric
series of deleted datasets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterserve.server.main import create_app
from tests.evaluation.conftest import eval_settings, make_data_dir, wait_for

MAX_BYTES = 4096
WORDS = {"answer_kind": "words", "answer_words": ["yes", "no"]}


def dataset(name: str, size: int = 2, text: str = "q") -> dict:
    return {"name": name, **WORDS, "records": [{"instruction": text, "answer": "yes"}] * size}


@pytest.fixture(scope="module")
def capped(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("limits")
    settings = eval_settings(
        tiny_model_dir,
        make_data_dir(root / "data", size=40),
        root / "cache",
        max_datasets=2,
        max_dataset_bytes=MAX_BYTES,
        max_queued_evaluations=2,
        max_evaluation_jobs=4,
        eval_max_inflight=1,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_dataset_count_and_bytes_are_capped(capped: TestClient) -> None:
    assert capped.post("/v1/datasets", json=dataset("one")).status_code == 201
    assert capped.post("/v1/datasets", json=dataset("two")).status_code == 201
    third = capped.post("/v1/datasets", json=dataset("three"))
    assert third.status_code == 409 and third.json()["error"]["code"] == "dataset_limit", third.text
    assert "DELETE /v1/datasets" in third.json()["error"]["message"]
    replaced = capped.post("/v1/datasets", json=dataset("two", size=3) | {"replace": True})
    assert replaced.status_code == 201  # replacing does not count twice
    assert capped.delete("/v1/datasets/one").status_code == 200
    too_big = capped.post("/v1/datasets", json=dataset("big", size=1, text="x" * MAX_BYTES))
    assert too_big.status_code == 409 and too_big.json()["error"]["code"] == "dataset_limit"
    assert capped.post("/v1/datasets", json=dataset("three")).status_code == 201
    names = {d["name"] for d in capped.get("/v1/datasets").json()["data"]}
    assert {"two", "three"} <= names and not {"one", "big"} & names
    for name in ("two", "three"):
        assert capped.delete(f"/v1/datasets/{name}").status_code == 200


def test_dataset_delete_refusals(capped: TestClient) -> None:
    builtin = capped.delete("/v1/datasets/gsm8k")
    assert builtin.status_code == 409 and builtin.json()["error"]["code"] == "dataset_builtin"
    missing = capped.delete("/v1/datasets/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "dataset_not_found"
    assert capped.post("/v1/datasets", json=dataset("busy", size=30)).status_code == 201
    body = {"models": ["base"], "datasets": ["busy"], "max_tokens": 32}
    job = capped.post("/v1/evaluations", json=body).json()
    in_use = capped.delete("/v1/datasets/busy")
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "dataset_in_use"
    capped.delete(f"/v1/evaluations/{job['id']}")
    assert capped.delete("/v1/datasets/busy").status_code == 200


def test_queued_jobs_are_capped_with_429(capped: TestClient) -> None:
    body = {"models": ["base"], "datasets": ["gsm8k"], "max_tokens": 48}
    accepted = []
    for _ in range(3):  # one runs, two wait
        response = capped.post("/v1/evaluations", json=body)
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
        wait_for(capped, accepted[0], lambda job: job["status"] == "running")
    refused = capped.post("/v1/evaluations", json=body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "evaluation_queue_full"
    assert int(refused.headers["retry-after"]) > 0
    for job_id in accepted:
        capped.delete(f"/v1/evaluations/{job_id}")


def test_only_the_newest_jobs_are_kept(capped: TestClient) -> None:
    body = {"models": ["base"], "datasets": ["boolq"], "limit": 1, "max_tokens": 2}
    ids = []
    for _ in range(6):
        ids.append(capped.post("/v1/evaluations", json=body).json()["id"])
        wait_for(capped, ids[-1])
    listed = [job["id"] for job in capped.get("/v1/evaluations").json()["data"]]
    assert len(listed) == 4 and set(ids[-3:]) <= set(listed) and ids[0] not in listed
    assert capped.get(f"/v1/evaluations/{ids[0]}").status_code == 404
    settings = capped.app.state.settings
    assert not (settings.eval_jobs_dir / ids[0]).exists()


def test_deleted_dataset_leaves_no_metric_series(capped: TestClient) -> None:
    assert capped.post("/v1/datasets", json=dataset("scored")).status_code == 201
    job = capped.post(
        "/v1/evaluations", json={"models": ["base"], "datasets": ["scored"], "max_tokens": 2}
    ).json()
    assert wait_for(capped, job["id"])["status"] == "succeeded"
    assert 'dataset="scored"' in capped.get("/metrics").text
    assert capped.delete("/v1/datasets/scored").status_code == 200
    assert 'dataset="scored"' not in capped.get("/metrics").text
