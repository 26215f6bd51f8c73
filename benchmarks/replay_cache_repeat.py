"""Issue 24 item 6 replayed on a real server: the same greedy request (prompts longer than a KV
block, so the repeat is a prefix-cache hit) sent twice to each of two fresh random LoRA r8 on
q,k,v over the default (int4) base. Prints, per request, whether the repeat's text and
log-probs are bit-identical (before the batch-invariant kernels they differed from the first
token: -0.739 vs -0.743), and writes JSON.

    .venv/bin/python -P benchmarks/replay_cache_repeat.py [--output bench-results/replay_cache_repeat.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import peft
import torch
from transformers import AutoModelForCausalLM

from adapterserve.server.config import Settings
from adapterserve.server.model.weights import resolve_model_dir

PROMPTS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is "
    "Rome. The capital of Spain is",
    "Write a short poem about the sea, the wind and the sky, in four lines, with a rhyme at the "
    "end of every second line.\n",
)


def make_loras(root: Path) -> list[Path]:
    model_dir = resolve_model_dir(None, Settings().cache_dir)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        config = peft.LoraConfig(
            r=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False
        )
        peft.get_peft_model(model, config).save_pretrained(str(root / f"lora{seed}"))
        paths.append(root / f"lora{seed}")
    return paths


def wait_ready(base: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=Path("bench-results/replay_cache_repeat.json")
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    adapters = [f"a{i}={path}" for i, path in enumerate(make_loras(root), 1)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-P", "-m", "adapterserve", "serve", "--port", str(port)]
    for adapter in adapters:
        command += ["--adapter", adapter]
    with (root / "server.log").open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base, results = f"http://127.0.0.1:{port}", {}
    try:
        wait_ready(base, server)
        for model in ("a1", "a2"):
            for prompt in PROMPTS:
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": 16,
                    "temperature": 0,
                    "logprobs": 1,
                }
                first, repeat = (
                    httpx.post(base + "/v1/completions", json=body, timeout=120).json()["choices"][
                        0
                    ]
                    for _ in range(2)
                )
                a, b = first["logprobs"]["token_logprobs"], repeat["logprobs"]["token_logprobs"]
                same = a == b and first["text"] == repeat["text"]
                print(
                    f"{model} {prompt[:24]!r}: {'identical' if same else 'DIFFERENT'}  {a[:3]} / {b[:3]}"
                )
                results[f"{model}: {prompt[:30]}"] = {"identical": same, "first": a, "repeat": b}
    finally:
        server.terminate()
        server.wait(60)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
