"""Fine-tuning jobs through the HTTP API (server/api/routers/fine_tuning.py over
server/finetune/jobs.py), with real worker processes training a tiny random model: a job
trains, is served under its `ft:` name and lists its events and checkpoints (the `openai` SDK
reads them unchanged); refusals name their field; cancel stops a worker within seconds; the
queue is bounded; a worker over its memory budget, or killed, fails its job with the reason;
a server killed mid-job resumes it from its last checkpoint at the next start; and
`adapterserve finetune` writes a folder that `serve --adapter` serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from adapterserve.server.config import Settings
from adapterserve.server.main import create_app
from tests.server.conftest import start_server, stop_server

ADMIN, USER = "admin-key", "user-key"
WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


def records(n: int = 12) -> bytes:
    lines = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
        lines.append({"prompt": prompt, "completion": " " + WORDS[(i + 5) % len(WORDS)]})
    return "".join(json.dumps(r) + "\n" for r in lines).encode()


def job_body(file_id: str, **extra) -> dict:
    body = {
        "model": "tiny",
        "training_file": file_id,
        "suffix": "t",
        "seed": 3,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        },
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "training": {"checkpoint_every": 1, "micro_batch_size": 2},
    }
    return {**body, **extra}


def wait_for(get, done, timeout_s: float = 240.0, what: str = "") -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = get()
        if done(value):
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {value}")


def final(client, job_id: str, timeout_s: float = 240.0) -> dict:
    return wait_for(
        lambda: client.get(f"/v1/fine_tuning/jobs/{job_id}").json(),
        lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
        timeout_s,
        f"job {job_id}",
    )


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        model=str(tiny_model_dir),
        served_model_name="tiny",
        device="cpu",
        kv_cache_memory_mb=16,
        engine_process=False,
        warm_grammars=False,
        cache_dir=tmp_path_factory.mktemp("ft-cache"),
        api_key=USER,
        admin_api_key=ADMIN,
        finetune_threads=1,
        finetune_max_queued=2,
    )
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        yield client


@pytest.fixture(scope="module")
def training_file(app: TestClient) -> str:
    files = {"file": ("train.jsonl", records(), "application/jsonl")}
    response = app.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_a_job_trains_is_served_and_reports(app: TestClient, training_file: str) -> None:
    created = app.post("/v1/fine_tuning/jobs", json=job_body(training_file))
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "fine_tuning.job" and job["status"] in ("queued", "running")
    assert job["hyperparameters"] == {
        "n_epochs": 1,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
    }
    assert job["fine_tuned_model"] is None
    done = final(app, job["id"])
    assert done["status"] == "succeeded", done["error"]
    name = done["fine_tuned_model"]
    assert name == f"ft:tiny:t:{job['id'].removeprefix('ftjob-')[:8]}"
    assert done["trained_tokens"] > 0 and done["progress"] == {"step": 3, "total_steps": 3}
    assert name in [m["id"] for m in app.get("/v1/models").json()["data"]]
    answer = app.post(
        "/v1/completions", json={"model": name, "prompt": "The quick", "max_tokens": 3}
    )
    assert answer.status_code == 200, answer.text

    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key=ADMIN, http_client=app, max_retries=0
    )
    assert client.fine_tuning.jobs.retrieve(job["id"]).fine_tuned_model == name
    assert job["id"] in [j.id for j in client.fine_tuning.jobs.list()]
    events = client.fine_tuning.jobs.list_events(job["id"], limit=100).data
    metrics = [e.data for e in events if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [3, 2, 1]  # newest first, as OpenAI lists them
    for m in metrics:
        assert m["train_loss"] > 0 and m["tokens_per_second"] > 0 and "learning_rate" in m
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job["id"]).data
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{name}:ckpt-step-2"
    assert checkpoints[0].metrics.train_loss == pytest.approx(metrics[1]["train_loss"])


@pytest.mark.parametrize(
    ("change", "status", "param", "words"),
    [
        ({"model": "other"}, 400, "model", "this server's base"),
        ({"training_file": "file-" + "0" * 24}, 404, "training_file", ""),
        ({"method": {"type": "dpo"}}, 400, "method.type", "only 'supervised'"),
        ({"integrations": [{"type": "wandb"}]}, 400, "integrations", ""),
        (
            {"adapter": {"kind": "series", "bottleneck_size": 512}},
            400,
            "adapter.bottleneck_size",
            "max-adapter-rank",
        ),
        ({"adapter": {"kind": "lora", "r": 0}}, 400, "adapter.lora.r", ""),
        (
            {"adapter": {"kind": "series", "target_modules": ["q_proj"]}},
            400,
            "adapter.target_modules",
            "series",
        ),
        ({"evaluations": {"datasets": ["no-such-set"]}}, 404, None, "no-such-set"),
        ({"hyperparameters": {"n_epochs": 2}}, 400, "hyperparameters", "not both"),
    ],
)
def test_refusals_name_the_field(
    app: TestClient, training_file: str, change: dict, status: int, param: str | None, words: str
) -> None:
    before = len(app.get("/v1/fine_tuning/jobs").json()["data"])
    response = app.post("/v1/fine_tuning/jobs", json={**job_body(training_file), **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert words in error["message"]
    assert len(app.get("/v1/fine_tuning/jobs").json()["data"]) == before


def test_keys_an_ordinary_key_cannot_train_nor_see_others_jobs(
    app: TestClient, training_file: str
) -> None:
    user = {"Authorization": f"Bearer {USER}"}
    refused = app.post("/v1/fine_tuning/jobs", json=job_body(training_file), headers=user)
    assert refused.status_code == 403
    jobs = app.get("/v1/fine_tuning/jobs").json()["data"]
    assert jobs and app.get("/v1/fine_tuning/jobs", headers=user).json()["data"] == []
    assert app.get(f"/v1/fine_tuning/jobs/{jobs[0]['id']}", headers=user).status_code == 404


def test_cancel_stops_the_worker_within_seconds_and_the_queue_is_bounded(
    app: TestClient, training_file: str
) -> None:
    long = job_body(training_file, training={"max_steps": 100_000, "checkpoint_every": 0})
    long["method"]["supervised"]["hyperparameters"]["n_epochs"] = 50
    running = app.post("/v1/fine_tuning/jobs", json=long).json()
    wait_for(
        lambda: app.get(f"/v1/fine_tuning/jobs/{running['id']}").json(),
        lambda j: j["progress"]["step"] >= 1,
        what="the first step",
    )
    served = app.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 4})
    assert served.status_code == 200, served.text  # serving answers while the job trains
    queued = [app.post("/v1/fine_tuning/jobs", json=long) for _ in range(3)]
    assert [r.status_code for r in queued] == [200, 200, 429]
    assert queued[2].json()["error"]["type"] == "rate_limit_exceeded"
    manager = app.app.state.fine_tuning
    pid = manager.procs[running["id"]].pid
    began = time.monotonic()
    cancelled = app.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and time.monotonic() - began < 15
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    for response in queued[:2]:
        job_id = response.json()["id"]
        assert app.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    again = app.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
    assert again.status_code == 400 and "already cancelled" in again.json()["error"]["message"]


def test_a_killed_worker_and_one_over_its_memory_budget_fail_with_the_reason(
    app: TestClient, training_file: str
) -> None:
    manager = app.app.state.fine_tuning
    long = job_body(training_file, training={"max_steps": 100_000, "checkpoint_every": 0})
    long["method"]["supervised"]["hyperparameters"]["n_epochs"] = 50
    job = app.post("/v1/fine_tuning/jobs", json=long).json()
    wait_for(lambda: manager.procs.get(job["id"]), bool, what="the worker")
    os.kill(manager.procs[job["id"]].pid, signal.SIGKILL)
    failed = final(app, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_failed"
    assert "exit status -9" in failed["error"]["message"]

    budget, manager.memory_mb = manager.memory_mb, 256  # torch alone is more than that
    try:
        job = app.post("/v1/fine_tuning/jobs", json=long).json()
        failed = final(app, job["id"])
    finally:
        manager.memory_mb = budget
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "memory_budget_exceeded"
    assert "256 MB" in failed["error"]["message"]


def test_a_job_resumes_from_its_checkpoint_after_the_server_is_killed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    env = {"ADAPTERSERVE_CACHE_DIR": str(cache)}
    flags = ("--served-model-name", "tiny", "--finetune-threads", "1")
    server = start_server(tiny_model_dir, tmp_path / "one.log", *flags, env=env)
    body = job_body("", training={"checkpoint_every": 1, "micro_batch_size": 1})
    body["method"]["supervised"]["hyperparameters"].update(n_epochs=50, batch_size=2)
    try:
        client = httpx.Client(base_url=server.base_url, timeout=60)
        files = {"file": ("train.jsonl", records(8), "application/jsonl")}
        body["training_file"] = client.post(
            "/v1/files", files=files, data={"purpose": "fine-tune"}
        ).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        wait_for(
            lambda: client.get(f"/v1/fine_tuning/jobs/{job['id']}").json(),
            lambda j: j["progress"]["step"] >= 3,
            what="three steps",
        )
    finally:
        server.process.kill()  # no drain: as a crash
        server.process.wait()
    worker_gone = wait_for(
        lambda: (
            subprocess.run(
                ["pgrep", "-f", f"finetune.worker {cache}"], capture_output=True
            ).returncode
        ),
        lambda code: code == 1,
        60,
        "the orphaned worker to stop",
    )
    assert worker_gone == 1
    server = start_server(tiny_model_dir, tmp_path / "two.log", *flags, env=env)
    try:
        client = httpx.Client(base_url=server.base_url, timeout=60)
        done = final(client, job["id"], 300)
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]
        served = [m["id"] for m in client.get("/v1/models").json()["data"]]
    finally:
        stop_server(server)
    assert done["status"] == "succeeded", done["error"]
    resumed = [e for e in events if e["message"].startswith("Resumed from the checkpoint")]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 3
    steps = [e["data"]["step"] for e in events[::-1] if e["type"] == "metrics"]
    assert steps[-1] == done["progress"]["total_steps"] == 200
    assert done["fine_tuned_model"] in served


def test_the_cli_writes_a_folder_that_serve_accepts(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(records(6))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-P",
        "-m",
        "adapterserve.server.cli",
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--training-file",
        str(data),
        "--output",
        str(out),
        "--kind",
        "series",
        "--adapter",
        '{"bottleneck_size": 8}',
        "--n-epochs",
        "1",
        "--batch-size",
        "2",
        "--warmup-steps",
        "0",
        "--threads",
        "1",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 3/3" in run.stdout and f"adapter written to {out / 'adapter'}" in run.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["bottleneck_size"] == 8
    server = start_server(
        tiny_model_dir, tmp_path / "serve.log", "--adapter", f"mine={out / 'adapter'}"
    )
    try:
        answer = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "mine", "prompt": "The quick", "max_tokens": 3},
            timeout=60,
        )
    finally:
        stop_server(server)
    assert answer.status_code == 200, answer.text

    bad = subprocess.run(
        [*command[:-10], "--kind", "lora", "--adapter", '{"r": 99999}'],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "adapter" in bad.stderr


RETAIN_THEN_TRIM = """
import json
from adapterserve.server.finetune.worker import release_free_memory, resident_mb
keep = [b"\\x01" * 2**20 for _ in range(300)]  # 300 MB in 1 MB blocks, then one small one
tail = b"\\x02" * 100
before = resident_mb()
del keep[:]
held = resident_mb()
trimmed = release_free_memory()
print(json.dumps([before, held, trimmed, resident_mb()]))
"""


def test_the_worker_gives_freed_memory_back_after_a_step() -> None:
    """The worker runs with glibc keeping freed memory (jobs.MALLOC_ENV): over a long job that
    grew past the memory budget and failed the job. It trims after each step."""
    from adapterserve.server.finetune.jobs import MALLOC_ENV

    out = subprocess.run(
        [sys.executable, "-P", "-c", RETAIN_THEN_TRIM],
        env={**os.environ, **MALLOC_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2].parent,
    )
    assert out.returncode == 0, out.stderr
    before, held, trimmed, after = json.loads(out.stdout)
    assert held > before - 50, "glibc gave the freed blocks back on its own: nothing to test"
    assert trimmed and after < held - 200, (held, after)
