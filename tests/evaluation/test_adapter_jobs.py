"""A job over the base model and three adapters of different kinds x two datasets: its
requests share engine steps (the engine's step records), and adapters change the answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.server.main import create_app
from tests.adapters.conftest import bottleneck_config
from tests.adapters.makers import bottleneck_dir, save_peft
from tests.evaluation.conftest import eval_settings, make_data_dir, results, wait_for

peft = pytest.importorskip("peft")

ADAPTER_NAMES = ["lora", "ia3", "series"]


def make_adapters(root: Path, base_dir: Path) -> dict[str, Path]:
    fingerprint = BaseFingerprint.from_hf_config(json.loads((base_dir / "config.json").read_text()))
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    ia3 = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    series = bottleneck_config(bottleneck_size=6, non_linearity="tanh", scaling=0.5)
    return {
        "lora": save_peft(root / "lora", base_dir, lora, seed=1, scale=0.5),
        "ia3": save_peft(root / "ia3", base_dir, ia3, seed=2, scale=0.5),
        "series": bottleneck_dir(root / "series", fingerprint, series, seed=3),
    }


@pytest.fixture(scope="module")
def adapter_client(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("eval-adapters")
    dirs = make_adapters(root, tiny_model_dir)
    settings = eval_settings(
        tiny_model_dir,
        make_data_dir(root / "data", size=4),
        root / "cache",
        adapters=[f"{name}={path}" for name, path in dirs.items()],
        max_adapter_rank=16,
        max_num_seqs=16,
        eval_max_inflight=8,
        engine_process=False,  # the tests read the engine's step_log
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_adapters_are_evaluated_in_shared_steps(adapter_client: TestClient) -> None:
    models = ["base", *ADAPTER_NAMES]
    body = {"models": models, "datasets": ["gsm8k", "boolq"], "limit": 4, "max_tokens": 8}
    job = wait_for(adapter_client, adapter_client.post("/v1/evaluations", json=body).json()["id"])
    assert job["status"] == "succeeded", job
    rows = results(adapter_client, job["id"])
    assert len(rows) == len(models) * 2 * 4
    steps = [
        {model for request_id, model in step if request_id.startswith(f"{job['id']}-")}
        for step in adapter_client.app.state.engine.step_log
    ]
    assert max(len(step) for step in steps) == len(models), "the models were not batched together"
    served = set().union(*steps)
    assert set(ADAPTER_NAMES) <= served  # every adapter really ran, under its own name
    by_model = {m: [r["response"] for r in rows if r["model"] == m] for m in models}
    assert any(by_model[name] != by_model["base"] for name in ADAPTER_NAMES)


def test_a_beam_job_answers_as_transformers_beam_search(
    adapter_client: TestClient, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """decoding 'beam': each row's response is the paper's split of prompt + the best beam of
    generate(num_beams=4, do_sample=False) on the same model (the peft model for an adapter),
    computed here per example."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterserve.server.evaluation.extract import split_response
    from adapterserve.server.evaluation.prompts import generate_prompt

    torch.set_num_threads(1)  # the engine thread has the cores
    models = ["base", "lora", "ia3"]
    body = {
        "models": models,
        "datasets": ["gsm8k", "boolq"],
        "limit": 3,
        "max_tokens": 8,
        "decoding": "beam",
    }
    job = wait_for(adapter_client, adapter_client.post("/v1/evaluations", json=body).json()["id"])
    assert job["status"] == "succeeded", job
    assert job["decoding"] == "beam" and "Decoded as the LLM-Adapters paper did" in job["note"]
    assert "can differ" not in job["note"]
    rows = results(adapter_client, job["id"])
    assert len(rows) == 3 * 2 * 3
    engine_tokenizer = adapter_client.app.state.engine.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dirs = make_adapters(tmp_path, tiny_model_dir)  # the same seeds: the same weights
    for name in models:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
        if name != "base":
            model = peft.PeftModel.from_pretrained(model, str(dirs[name])).eval()
        eos = model.generation_config.eos_token_id
        for row in (r for r in rows if r["model"] == name):
            prompt = generate_prompt(row["instruction"])
            ids = engine_tokenizer.encode(prompt)
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor([ids]),
                    num_beams=4,
                    do_sample=False,
                    max_new_tokens=8,
                    pad_token_id=0,
                )[0, len(ids) :].tolist()
            out = out[: out.index(eos)] if eos in out else out
            assert row["response"] == split_response(prompt + tokenizer.decode(out)), (name, row)


def test_beam_decoding_refuses_what_it_cannot_run(adapter_client: TestClient) -> None:
    for extra, param in (
        ({"temperature": 0.5}, "temperature"),
        ({"protocol": "loglikelihood"}, "decoding"),
    ):
        body = {"models": ["base"], "datasets": ["boolq"], "decoding": "beam", **extra}
        response = adapter_client.post("/v1/evaluations", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
