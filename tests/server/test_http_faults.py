"""Runtime faults (SECURITY.md rows 17-19): an engine error mid-stream, a fatal engine fault,
and SIGTERM draining. Servers here run uvicorn in a thread (to inject a fault into the engine)
or as a process (to signal it)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from adapterserve.server import cli
from adapterserve.server.config import Settings
from adapterserve.server.engine import bootstrap
from adapterserve.server.main import create_app
from tests.server.conftest import free_port, start_server, stop_server

LONG = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}


class FailingModel:
    """Wraps the engine's model: every forward raises once `armed` is set."""

    def __init__(self, model: Any, armed: threading.Event) -> None:
        self._model, self._armed = model, armed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._armed.is_set():
            raise RuntimeError("injected device fault")
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@pytest.fixture
def armed(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Engines built while this fixture is active fail their next step once the event is set."""
    event = threading.Event()
    real_build = bootstrap.build_engine

    def build(settings: Settings, metrics: Any, plan: Any = None) -> Any:
        engine = real_build(settings, metrics, plan)
        engine.model = FailingModel(engine.model, event)
        return engine

    monkeypatch.setattr(bootstrap, "build_engine", build)
    return event


def settings_for(model_dir: Path) -> Settings:
    return Settings(
        model=str(model_dir),
        device="cpu",
        port=free_port(),
        kv_cache_memory_mb=16,
        max_model_len=256,
        shutdown_timeout_s=5,
        log_level="warning",
        engine_process=False,  # the fault is injected into this process's engine
    )


def wait_healthy(base_url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not start")


@pytest.fixture
def threaded_app(
    tiny_model_dir: Path, armed: threading.Event
) -> Iterator[tuple[str, list[BaseException]]]:
    fatal: list[BaseException] = []
    settings = settings_for(tiny_model_dir)
    app = create_app(settings, on_fatal=fatal.append)
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    wait_healthy(base_url)
    yield base_url, fatal
    uv.should_exit = True
    thread.join(30)


def data_lines(response: httpx.Response, on_first: Any) -> list[str]:
    lines = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            if not lines:
                on_first()
            lines.append(line.removeprefix("data: "))
    return lines


def test_engine_fault_mid_stream_sends_an_error_event_then_done(
    threaded_app, armed: threading.Event
) -> None:
    base_url, fatal = threaded_app
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as response:
            lines = data_lines(response, armed.set)
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] in ("server_error", "service_unavailable_error")
        assert "Traceback" not in lines[-2] and "injected" not in lines[-2]
        deadline = time.monotonic() + 10
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fatal, "on_fatal was not called"
        assert http.get("/health").status_code == 503
        refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_unavailable"


def test_fatal_fault_makes_serve_exit_nonzero(tiny_model_dir: Path, armed: threading.Event) -> None:
    settings = settings_for(tiny_model_dir)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(cli.serve(settings)), daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    wait_healthy(base_url)
    armed.set()
    response = httpx.post(
        f"{base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30
    )
    assert response.status_code in (500, 503)
    thread.join(60)
    assert result == [1]


def test_sigterm_lets_in_flight_streams_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_model_dir, tmp_path / "server.log", "--max-model-len", "256")
    try:
        with (
            httpx.Client(base_url=srv.base_url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=LONG | {"max_tokens": 150}) as response,
        ):
            lines = data_lines(response, lambda: srv.process.send_signal(signal.SIGTERM))
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
        assert srv.process.wait(30) in (0, -signal.SIGTERM)
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log()
