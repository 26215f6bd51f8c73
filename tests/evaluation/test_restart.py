"""A restart keeps finished jobs and their rows; a job cut off by shutdown keeps the rows it
scored; a job that was running when the process died comes back failed."""

from __future__ import annotations

import json
import os
import signal
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


def test_a_job_runs_on_when_its_engine_core_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The engine core process dies mid-job: the examples it cut are run again on the new
    core, and the job ends succeeded with every example scored once."""
    data_dir = make_data_dir(tmp_path / "data", size=24)
    settings = eval_settings(
        tiny_model_dir, data_dir, tmp_path / "cache", eval_max_inflight=2, engine_process=True
    )
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine
        body = {"models": ["base"], "datasets": ["gsm8k"], "max_tokens": 48}
        job = client.post("/v1/evaluations", json=body).json()
        wait_for(client, job["id"], lambda j: j["progress"]["done"] >= 2)
        os.kill(engine.core_pid, signal.SIGKILL)
        done = wait_for(client, job["id"], timeout_s=300)
        assert engine.restarts == 1
        assert done["status"] == "succeeded", done
        rows = results(client, job["id"])
        assert sorted(row["index"] for row in rows) == list(range(24))
