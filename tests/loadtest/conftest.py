"""A tiny-model adapterserve and a PEFT baseline on the same tiny model, for end-to-end runs.

Server processes reuse tests/server/conftest.py's helpers (free port, health wait, SIGTERM).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapterserve.loadtest import cli
from adapterserve.loadtest.synthetic import (
    KINDS,
    BaseDims,
    make_adapter,
    plan_adapters,
    write_adapter,
)
from tests.server.conftest import (
    Server,
    _wait_healthy,
    free_port,
    start_server,
    stop_server,
)

TINY_DIMS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)


@pytest.fixture(scope="session")
def synthetic_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter of each of the six kinds (ranks 8 and 4) for the tiny model."""

    config = json.loads((tiny_model_dir / "config.json").read_text())
    dims = BaseDims.from_config(config)
    root = tmp_path_factory.mktemp("synthetic-adapters")
    for plan in plan_adapters(len(KINDS), KINDS, [8, 4]):
        write_adapter(root / plan.name, *make_adapter(dims, plan.kind, plan.rank, plan.seed))
    return root


@dataclass(frozen=True)
class Servers:
    ours: Server  # adapterserve on the tiny model
    peft: Server  # the PEFT baseline on the same model, supported synthetic adapters preloaded


@pytest.fixture(scope="session")
def servers(
    tiny_model_dir: Path, synthetic_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """Both servers, started side by side (their start-up times overlap)."""
    root = tmp_path_factory.mktemp("loadtest-servers")
    peft = launch_peft(tiny_model_dir, synthetic_adapter_dir, root)
    try:
        env = {"ADAPTERSERVE_ADAPTER_STORE_DIR": str(root / "store")}
        ours = start_server(
            tiny_model_dir,
            root / "server.log",
            "--max-model-len",
            "256",
            "--served-model-name",
            "tiny",
            env=env,
        )
        _wait_healthy(peft)
    except BaseException:
        stop_server(peft)
        raise
    yield Servers(ours, peft)
    stop_server(ours)
    stop_server(peft)
    assert "Traceback" not in peft.log(), peft.log()[-4000:]


def launch_peft(model_dir: Path, adapter_dir: Path, root: Path) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-P",
        "-m",
        "adapterserve.loadtest.baselines.peft_server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--adapter-dir",
        str(adapter_dir),
        "--storage-dir",
        str(root / "peft-store"),
        "--log-level",
        "warning",
    ]
    log_path = root / "peft.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    return Server(f"http://127.0.0.1:{port}", process, log_path, None)


def run_loadtest(capsys: pytest.CaptureFixture, *args: str) -> tuple[str, str]:
    """`adapterserve-loadtest ARGS` in-process (saves an interpreter start); (stdout, stderr)."""
    cli.main(list(args))
    captured = capsys.readouterr()
    return captured.out, captured.err
