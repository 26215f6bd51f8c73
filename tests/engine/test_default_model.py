"""The embedded SmolLM2-135M-Instruct: greedy text through our engine equals transformers' generate."""

from __future__ import annotations

import asyncio

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.model.tokenizer import Tokenizer
from tests.engine.conftest import collect, serve

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a short poem about the sea:\n",
    "Q: What is 12 times 7?\nA:",
]


def test_greedy_text_equals_transformers(engine_settings, default_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    tokenizer = Tokenizer(default_model_dir)
    chat = tokenizer.encode_chat([{"role": "user", "content": "Name three colors."}])
    prompts = [tokenizer.encode(p) for p in PROMPTS] + [chat]

    async def go(engine):
        params = SamplingParams(max_tokens=24, temperature=0.0)
        return await asyncio.gather(*[collect(engine, p, params) for p in prompts])

    results, engine = serve(engine_settings(model_dir=default_model_dir), go)
    for prompt, (ids, text, _) in zip(prompts, results, strict=True):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[
            0, len(prompt) :
        ]
        assert ids == out.tolist()
        assert text == hf_tok.decode(out, skip_special_tokens=True)
    assert engine.allocator.num_used == 0


def test_beam_search_equals_transformers(engine_settings, default_model_dir):
    """generate(num_beams=k, do_sample=False), k = 2 and 4 (the LLM-Adapters protocol), the n
    best beams, EOS included: token for token (fp32 both; the prompts were not picked for it)."""
    from tests.engine.test_beam_search import beam_answers, hf_beams

    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    tokenizer = Tokenizer(default_model_dir)
    chat = tokenizer.encode_chat([{"role": "user", "content": "What is 3 + 4? Answer briefly."}])
    cases = [
        (tokenizer.encode(PROMPTS[0]), 2, 2),
        (tokenizer.encode(PROMPTS[3]), 4, 1),
        (chat, 4, 2),
    ]

    async def go(engine):
        return await asyncio.gather(
            *[
                beam_answers(engine, ids, k, 20, n=n, tag=f"b{i}")
                for i, (ids, k, n) in enumerate(cases)
            ]
        )

    results, engine = serve(engine_settings(model_dir=default_model_dir), go)
    eos = hf.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    for (ids, k, n), got in zip(cases, results, strict=True):
        assert got == hf_beams(hf, ids, k, 20, eos, n=n), (ids, k)
    assert engine.allocator.num_used == 0


def test_dora_adapter_equals_peft(engine_settings, default_model_dir, tmp_path):
    """A DoRA adapter (r 8 on q, v, down) on the embedded model: greedy tokens equal peft's."""
    import peft

    from tests.adapters.makers import save_peft

    config = peft.LoraConfig(
        r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    adapter = save_peft(tmp_path / "dora", default_model_dir, config, seed=5, scale=0.05)
    tokenizer = Tokenizer(default_model_dir)
    ids = tokenizer.encode(PROMPTS[0])

    async def go(engine):
        params = SamplingParams(max_tokens=16, temperature=0.0)
        return [t async for out in engine.add_request(ids, params, "dora") for t in out.token_ids]

    settings = engine_settings(model_dir=default_model_dir).model_copy(
        update={"adapters": [f"dora={adapter}"], "max_adapter_rank": 8}
    )
    got, engine = serve(settings, go)
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert got == want[0, len(ids) :].tolist()
    assert engine.allocator.num_used == 0
