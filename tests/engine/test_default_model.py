"""The embedded SmolLM2-135M-Instruct: greedy text through our engine equals transformers' generate."""

from __future__ import annotations

import asyncio

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.sampling import SamplingParams
from server.model.tokenizer import Tokenizer
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
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        assert ids == out.tolist()
        assert text == hf_tok.decode(out, skip_special_tokens=True)
    assert engine.allocator.num_used == 0
