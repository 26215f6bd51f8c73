"""Real `adapterserve serve` processes on free ports, and clients that talk to them over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import make_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MAX_N = 8
MAX_PROMPT_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
MAX_MODEL_LEN = 256
MULTIBYTE_CHAR = "\u20ac"  # not in the tiny tokenizer's corpus: its 3 UTF-8 bytes are 3 tokens


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None
) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-P",  # the repository's kernels/ must not shadow Hugging Face's `kernels`
        "-m",
        "adapterserve.server.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    command += ["--device", "cpu", "--kv-cache-memory-mb", "16", *flags]
    # Each server gets its own adapter store and cache dir (evaluation jobs, registered
    # datasets) unless the test names them: the user's ~/.cache/adapterserve must neither leak
    # into tests nor receive what they create.
    private = {
        "ADAPTERSERVE_ADAPTER_STORE_DIR": str(log_path.parent / f"adapter-store-{port}"),
        "ADAPTERSERVE_CACHE_DIR": str(log_path.parent / f"cache-{port}"),
    }
    full_env = os.environ | {"TOKENIZERS_PARALLELISM": "false"} | private | (env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=log_path.parent, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    api_key = next((flags[i + 1] for i, f in enumerate(flags) if f == "--api-key"), None)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, api_key)
    _wait_healthy(server)
    return server


def _wait_healthy(server: Server, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}"
            )
        try:
            if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {timeout_s} s:\n{server.log()[-4000:]}")


def stop_server(server: Server, timeout_s: float = 30.0) -> int:
    """SIGTERM, then wait for the graceful shutdown; returns the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        server.process.kill()
        return server.process.wait()


@contextmanager
def lora_server(model_dir: Path, root: Path, *flags: str) -> Iterator[Server]:
    """A server of `model_dir` served as "tiny", with one LoRA ("lora": r 4 on q_proj and
    v_proj) and `flags`; stopped after, and its log must show no traceback."""
    import peft

    from tests.adapters.makers import save_peft

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    lora = save_peft(root / "lora", model_dir, config, 1)
    srv = start_server(
        model_dir,
        root / "server.log",
        "--served-model-name",
        "tiny",
        "--adapter",
        f"lora={lora}",
        *flags,
    )
    try:
        yield srv
    finally:
        status = stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
    assert status in (0, -signal.SIGTERM)


def make_bigram_llama(path: Path, text: str = MULTIBYTE_CHAR) -> tuple[Path, list[int]]:
    """A tiny Llama whose greedy continuation of `text`'s last token is `text` again, forever.

    Attention and MLP outputs are zeroed, so the final hidden state depends only on the current
    token; lm_head then maps each token of `text` onto the next one (the last onto the first).
    With a character whose bytes are separate tokens, every generated character is split
    across tokens: what streaming detokenization must put back together.
    """
    from transformers import AutoTokenizer

    make_tiny_llama(path)
    ids = AutoTokenizer.from_pretrained(str(path)).encode(text, add_special_tokens=False)
    assert len(ids) >= 2, f"{text!r} must span several tokens, got {ids}"
    weights = load_file(str(path / "model.safetensors"))
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    hidden = _final_hidden(weights, ids)  # (k, d)
    for current, following in zip(ids, ids[1:] + ids[:1], strict=True):
        weights["lm_head.weight"][following] = (
            20 * hidden[ids.index(current)] / hidden[ids.index(current)].norm()
        )
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, ids


def _final_hidden(weights: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    x = weights["model.embed_tokens.weight"][ids]  # (k, d): residual stream = embedding
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x * weights["model.norm.weight"]


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The main server: API key on, small caps so that limits are cheap to hit."""
    env = {
        "ADAPTERSERVE_MAX_N": str(MAX_N),
        "ADAPTERSERVE_MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
        "ADAPTERSERVE_MAX_REQUEST_BODY_BYTES": str(MAX_BODY_BYTES),
    }
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        tiny_model_dir,
        log_path,
        "--api-key",
        API_KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--served-model-name",
        "tiny",
        env=env,
    )
    yield srv
    status = stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
    assert status in (0, -signal.SIGTERM), f"exit status {status}"


@pytest.fixture(scope="session")
def bigram_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One running sequence and no queue: a second concurrent request is refused (503)."""
    model_dir, _ = make_bigram_llama(tmp_path_factory.mktemp("bigram-llama"))
    log_path = model_dir.parent / "bigram-server.log"
    srv = start_server(
        model_dir,
        log_path,
        "--max-num-seqs",
        "1",
        "--max-queue-len",
        "0",
        "--served-model-name",
        "bigram",
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60
    )


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as http_client:
        yield http_client
