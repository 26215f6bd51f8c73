"""The engine core in its own process (server/engine/process.py, core.py): a core killed
mid-stream ends every request cleanly and is restarted; adapters come back from the store; a
crash loop stops; a silent core is killed; SIGTERM drains both processes; /metrics merges both.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.server.config import Settings
from adapterserve.server.main import create_app
from adapterserve.server.metrics import Exposition, merge_expositions
from tests.adapters.conftest import TINY
from tests.adapters.test_formats import lora_dir
from tests.server.conftest import start_server, stop_server

PROMPT = "Once upon a time"
READY_WAIT_S = 120.0


def settings(model_dir: Path, tmp: Path, **overrides) -> Settings:
    values = dict(
        model=str(model_dir),
        device="cpu",
        kv_cache_memory_mb=16,
        max_model_len=256,
        served_model_name="tiny",
        adapter_store_dir=str(tmp / "store"),
        cache_dir=tmp / "cache",
        engine_process=True,
    )
    return Settings(**(values | overrides))


@pytest.fixture
def app_client(tiny_model_dir: Path, tmp_path: Path, request) -> Iterator[TestClient]:
    overrides = getattr(request, "param", {})

    def exit_(exc: BaseException) -> None:  # what the CLI does: shut down, exit 1
        app.state.exited = exc

    app = create_app(settings(tiny_model_dir, tmp_path, **overrides), on_fatal=exit_)
    with TestClient(app) as client:
        yield client


def wait_ready(client: TestClient, timeout_s: float = READY_WAIT_S) -> float:
    began = time.monotonic()
    while client.get("/ready").status_code != 200:
        assert time.monotonic() - began < timeout_s, client.get("/ready").json()
        time.sleep(0.05)
    return time.monotonic() - began


def core_pid(client: TestClient) -> int:
    pid = client.app.state.engine.core_pid
    assert pid is not None and pid != os.getpid()
    return pid


def kill_core(client: TestClient, sig: int = signal.SIGKILL) -> int:
    """Kill the core and wait until the front end has noticed (a request sent in between
    gets the same 503 engine_restarting as those in flight)."""
    engine = client.app.state.engine
    pid, restarts = core_pid(client), engine.restarts
    os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while engine.restarts == restarts and engine.healthy:
        assert time.monotonic() < deadline, "the core's death went unnoticed"
        time.sleep(0.02)
    return pid


def greedy(client: TestClient, model: str = "tiny", max_tokens: int = 8) -> list[int]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
    }
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def long_body(stream: bool) -> dict:
    return {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": stream,
    }


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_killed_core_ends_every_request_cleanly_and_comes_back(
    app_client: TestClient, sig: signal.Signals, caplog: pytest.LogCaptureFixture
) -> None:
    client = app_client
    before = greedy(client)
    pid = core_pid(client)
    caplog.set_level(logging.ERROR, "adapterserve.server.engine.process")
    with (
        ThreadPoolExecutor(1) as pool,
        client.stream("POST", "/v1/completions", json=long_body(True)) as stream,
    ):
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] is not None
        plain = pool.submit(client.post, "/v1/completions", json=long_body(False))
        time.sleep(0.2)  # the plain request is in the core too
        os.kill(pid, sig)
        rest = [line for line in lines if line]
        answer = plain.result(60)
    # the stream: an error event, then [DONE]; the plain request: a 503 with Retry-After
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_restarting" and error["type"] == "service_unavailable_error"
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "engine_restarting"
    assert answer.headers["Retry-After"] == "1"
    # until the new core is up: /ready says so, and new requests get the same retryable 503
    ready = client.get("/ready")
    if ready.status_code == 503:
        assert ready.json()["status"] == "restarting"
        refused = client.post("/v1/completions", json=long_body(False))
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert client.get("/health").status_code == 200  # the server itself lives on
    wait_ready(client)
    assert core_pid(client) != pid
    assert greedy(client) == before  # the same model, the same answer
    metrics = client.get("/metrics").text
    assert "adapterserve_engine_restarts_total 1.0" in metrics
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"killed by signal {int(sig)} ({sig.name})" in logged


def test_adapters_come_back_from_the_store_after_a_restart(
    app_client: TestClient, tmp_path: Path
) -> None:
    client = app_client
    folder = lora_dir(tmp_path / "lora", BaseFingerprint.from_hf_config(TINY), r=4)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    response = client.post("/v1/adapters", data={"name": "kept"}, files=files)
    assert response.status_code == 201, response.text
    with_adapter = greedy(client, "kept")
    assert with_adapter != greedy(client)  # the adapter changes the answer
    kill_core(client)
    wait_ready(client)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "kept"]
    assert greedy(client, "kept") == with_adapter
    assert client.delete("/v1/adapters/kept").status_code == 200  # a change after a restart
    assert client.post("/v1/completions", json={"model": "kept", "prompt": "x"}).status_code == 404


def test_adapters_loaded_by_path_are_loaded_again_into_a_new_core(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "roots"
    folder = lora_dir(root / "pathlora", BaseFingerprint.from_hf_config(TINY), r=4)
    gone = lora_dir(root / "gone", BaseFingerprint.from_hf_config(TINY), r=4)
    app = create_app(settings(tiny_model_dir, tmp_path, adapter_roots=[root]))
    with TestClient(app) as client:
        for name, path in (("by-path", folder), ("by-path-gone", gone)):
            body = {"lora_name": name, "lora_path": str(path)}
            response = client.post("/v1/load_lora_adapter", json=body)
            assert response.status_code == 200, response.text
        with_adapter = greedy(client, "by-path")
        for item in gone.iterdir():  # its files go while the server runs
            item.unlink()
        kill_core(client)
        wait_ready(client)
        # ready only once it is back: no 404 in between
        assert greedy(client, "by-path") == with_adapter
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert names == ["tiny", "by-path"]  # the one whose files went is dropped, logged
        unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "by-path"})
        assert unload.status_code == 200
        kill_core(client)
        wait_ready(client)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


@pytest.mark.parametrize("app_client", [{"engine_max_restarts": 1}], indirect=True)
def test_a_crash_loop_stops_restarting(app_client: TestClient) -> None:
    client = app_client
    kill_core(client)
    wait_ready(client)
    kill_core(client)  # the second death within a minute: give up
    deadline = time.monotonic() + 30
    while client.get("/health").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get("/health").json() == {"status": "engine_failed"}
    assert "keeps dying" in str(client.app.state.exited)  # the CLI's on_fatal: exit 1
    assert client.app.state.engine.core_pid is None


@pytest.mark.parametrize("app_client", [{"engine_heartbeat_timeout_s": 1.5}], indirect=True)
def test_a_silent_core_is_killed_and_restarted(
    app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = app_client
    caplog.set_level(logging.ERROR, "adapterserve.server.engine.process")
    pid = core_pid(client)
    os.kill(pid, signal.SIGSTOP)  # alive, but silent: a hung core
    try:
        deadline = time.monotonic() + 30
        while client.app.state.engine.core_pid in (pid, None):
            assert time.monotonic() < deadline, "the stuck core was not replaced"
            time.sleep(0.05)
    finally:
        with_pid_gone = not Path(f"/proc/{pid}").exists() or _zombie(pid)
        if not with_pid_gone:
            os.kill(pid, signal.SIGKILL)
    wait_ready(client)
    greedy(client)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "missed its heartbeat" in logged and "no heartbeat for 1.5 s" in logged


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_metrics_of_both_processes_merge_into_one_exposition() -> None:
    front = (
        "# HELP r_total Finished\n# TYPE r_total counter\n"
        'r_total{model="m",outcome="not_found"} 2.0\nr_created{model="m"} 50.0\n'
        "# HELP x_total Restarts\n# TYPE x_total counter\nx_total 1.0\n"
    )
    core = (
        "# HELP r_total Finished\n# TYPE r_total counter\n"
        'r_total{model="m",outcome="not_found"} 1.0\nr_total{model="m",outcome="stop"} 3.0\n'
        'r_created{model="m"} 40.0\n# HELP g Running\n# TYPE g gauge\ng 4.0\n'
    )
    merged = merge_expositions(front, core).splitlines()
    assert merged.count("# HELP r_total Finished") == 1
    assert merged.count("# TYPE r_total counter") == 1
    assert 'r_total{model="m",outcome="not_found"} 3.0' in merged  # summed
    assert 'r_total{model="m",outcome="stop"} 3.0' in merged
    assert 'r_created{model="m"} 40.0' in merged  # the earliest creation
    assert "x_total 1.0" in merged and "g 4.0" in merged


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def test_sigterm_drains_both_processes_of_a_real_server(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A server started from outside the repository: a stream in flight when SIGTERM comes
    finishes whole, then the server and its engine core both exit (no orphan core)."""
    server = start_server(
        tiny_model_dir,
        tmp_path / "server.log",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "256",
    )
    try:
        cores = [
            pid
            for pid in _children(server.process.pid)
            if "adapterserve.server.engine.core" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert len(cores) == 1, cores
        body = long_body(True) | {"max_tokens": 60}
        lines: list[str] = []

        def read() -> None:
            with httpx.stream(
                "POST", f"{server.base_url}/v1/completions", json=body, timeout=60
            ) as response:
                lines.extend(line for line in response.iter_lines() if line)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # drained, not cut
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{cores[0]}").exists() and not _zombie(cores[0]):
            assert time.monotonic() < deadline, "the engine core outlived the server"
            time.sleep(0.05)
    finally:
        stop_server(server)
    assert "Traceback" not in server.log(), server.log()[-4000:]


def test_merged_expositions_label_replicas_and_keep_non_finite_values() -> None:
    """The cluster's ingress merges its own families (only those it counts) with each replica's,
    labelled; a NaN or infinite sample survives the merge as Prometheus writes it."""
    ingress = (
        "# HELP a_total A\n# TYPE a_total counter\na_total 1.0\n# HELP g G\n# TYPE g gauge\ng 9.0\n"
    )
    replica = '# HELP g G\n# TYPE g gauge\ng 2.0\n# HELP h H\n# TYPE h gauge\nh{x="1"} NaN\nh{x="2"} +Inf\n'
    merged = Exposition()
    merged.add(ingress, only=("a_",))
    merged.add(replica, "r0")
    merged.add(replica, "r1")
    lines = merged.render().splitlines()
    assert "a_total 1.0" in lines and "g 9.0" not in lines
    assert 'g{replica="r0"} 2.0' in lines and 'g{replica="r1"} 2.0' in lines
    assert 'h{replica="r0",x="1"} NaN' in lines and 'h{replica="r1",x="2"} +Inf' in lines
    assert lines.count("# TYPE g gauge") == 1
