"""schemathesis against a live server's /openapi.json (SECURITY.md, "How to test it"): requests
drawn from the schema (positive) must be accepted, requests that break it (negative) refused,
and every answer must be documented, in the documented content type and shape, and never a 5xx.

The CLI runs it (schemathesis.toml: checks, seed, exclusions, each justified there;
schemathesis_hooks.py: the rules JSON Schema cannot state). Its working dir, the server's cache,
adapter store and data dir are pytest tmp dirs: nothing is written anywhere else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import schemathesis_hooks as hooks
from tests.server.conftest import start_server, stop_server

CONFIG = Path(__file__).with_name("schemathesis.toml")
TIMEOUT_S = 600


@pytest.mark.slow
def test_the_server_does_what_its_schema_says(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()  # no evaluation data: a drawn job is refused (404), never run
    env = {
        "ADAPTERSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "ADAPTERSERVE_ADAPTER_STORE_DIR": str(tmp_path / "store"),
        "ADAPTERSERVE_DATA_DIR": str(tmp_path / "data"),
        "ADAPTERSERVE_MAX_N": str(hooks.MAX_N),
        "ADAPTERSERVE_MAX_NUM_SEQS": str(hooks.MAX_NUM_SEQS),
        "ADAPTERSERVE_MAX_QUEUE_LEN": str(hooks.MAX_QUEUE_LEN),
        "ADAPTERSERVE_MAX_PROMPT_CHARS": str(hooks.MAX_PROMPT_CHARS),
    }
    flags = ("--max-model-len", str(hooks.MAX_MODEL_LEN), "--served-model-name", "tiny")
    server = start_server(tiny_model_dir, tmp_path / "server.log", *flags, env=env)
    try:
        run = run_schemathesis(f"{server.base_url}/openapi.json", tmp_path / "run")
    finally:
        stop_server(server)
    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-20000:]}"
    assert "Traceback" not in server.log(), server.log()[-4000:]


def run_schemathesis(url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir()
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", url]
    hooks_dir = Path(__file__).resolve().parent  # not the repo root: its kernels/ shadows HF's
    path = os.pathsep.join(filter(None, [str(hooks_dir), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "NO_COLOR": "1"}  # PYTHONPATH: to import the hooks
    run = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
    )
    print(run.stdout[-6000:])  # the summary, shown with -s or -rA
    return run
