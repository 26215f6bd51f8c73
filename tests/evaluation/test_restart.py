"""A restart keeps finished jobs and their rows; a job cut off by shutdown keeps the rows it
scored; a job that was running when the process died comes back failed."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from adapterserve.server.main import create_app
from tests.evaluation.conftest import eval_settings, make_data_dir, results, wait_for


def test_restart_keeps_finished_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "data", size=40)
    settings = eval_settings(tiny_model_dir, data_dir, tmp_path / "cache", eval_max_inflight=2)
    with TestClient(create_app(settings)) as client:
        body = {"models": ["base"], "datasets": ["boolq"], "limit": 3, "max_tokens": 4}
        finished = wait_for(client, client.post("/v1/evaluations", json=body).json()["id"])
        assert finished["status"] == "succeeded"
        finished_rows = results(client, finished["id"])
        long = {"models": ["base"], "datasets": ["gsm8k"], "max_tokens": 48}
        cut = client.post("/v1/evaluations", json=long).json()
        wait_for(client, cut["id"], lambda j: j["progress"]["done"] >= 1)
    # the with-block shut the app down mid-job
    with TestClient(create_app(settings)) as client:
        again = client.get(f"/v1/evaluations/{finished['id']}").json()
        assert again["status"] == "succeeded" and again["results"] == finished["results"]
        assert results(client, finished["id"]) == finished_rows
        cut = client.get(f"/v1/evaluations/{cut['id']}").json()
        assert cut["status"] == "cancelled" and "shut down" in cut["error"]
        assert 1 <= cut["progress"]["done"] == len(results(client, cut["id"])) < 40
    job_file = settings.eval_jobs_dir / cut["id"] / "job.json"
    record = json.loads(job_file.read_text())
    job_file.write_text(json.dumps(record | {"status": "running", "error": None}))  # as if killed
    with TestClient(create_app(settings)) as client:
        died = client.get(f"/v1/evaluations/{cut['id']}").json()
        assert died["status"] == "failed" and "interrupted" in died["error"]
        assert died["progress"]["done"] == cut["progress"]["done"]
        listed = {j["id"] for j in client.get("/v1/evaluations").json()["data"]}
        assert {finished["id"], cut["id"]} <= listed
