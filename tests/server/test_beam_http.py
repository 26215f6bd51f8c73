"""Beam search over HTTP (vLLM's extra parameters on /v1/completions, sent by the openai client
as extra_body), against Hugging Face's generate(num_beams=k, do_sample=False) on the same
weights; the requests beam search refuses; n > 1 sharing the prompt's blocks."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.engine.test_beam_search import hf_beams
from tests.server.test_http_api import metric

BLOCK_SIZE = 16  # the server's default


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    torch.set_num_threads(1)  # the server process has the cores
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def hf_answers(model, ids: list[int], k: int, max_new: int, n: int, **kw) -> list[list[int]]:
    """generate's n best of k beams, each cut after its first EOS."""
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    return hf_beams(model, ids, k, max_new, eos, n=n, **kw)


def prompt_ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(length)]


@pytest.mark.parametrize(
    ("k", "n", "extra"),
    [
        (2, 1, {}),
        (4, 2, {"length_penalty": 2.0}),
        (4, 4, {"early_stopping": True}),
        (3, 2, {"length_penalty": -0.5, "early_stopping": "never"}),
    ],
)
def test_beam_search_answers_equal_transformers(
    client: openai.OpenAI, reference, k, n, extra
) -> None:
    model, tokenizer = reference
    eos = model.generation_config.eos_token_id
    for seed in range(3):
        ids = prompt_ids(100 * k + seed, 5 + 3 * seed)
        out = client.completions.create(
            model="tiny",
            prompt=ids,
            max_tokens=10,
            n=n,
            extra_body={"use_beam_search": True, "best_of": k, **extra},
        )
        want = hf_answers(model, ids, k, 10, n, **extra)
        assert [c.index for c in out.choices] == list(range(n))
        for choice, tokens in zip(out.choices, want, strict=True):
            ended = tokens[-1] == eos
            assert choice.text == tokenizer.decode(tokens[:-1] if ended else tokens), (seed, choice)
            assert choice.finish_reason == ("stop" if ended else "length")
        assert out.usage.completion_tokens == sum(len(t) for t in want)
        assert out.usage.prompt_tokens == len(ids)


def test_streamed_beams_equal_the_whole_answer(client: openai.OpenAI) -> None:
    body = {"model": "tiny", "prompt": prompt_ids(7, 9), "max_tokens": 8, "n": 2}
    beams = {"use_beam_search": True, "best_of": 3}
    whole = client.completions.create(**body, extra_body=beams)
    texts, finish = {}, {}
    for chunk in client.completions.create(**body, extra_body=beams, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert [texts[c.index] for c in whole.choices] == [c.text for c in whole.choices]
    assert [finish[c.index] for c in whole.choices] == [c.finish_reason for c in whole.choices]


def test_one_beam_is_greedy_decoding(client: openai.OpenAI) -> None:
    ids = prompt_ids(3, 12)
    greedy = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    for beams in ({"use_beam_search": True}, {"use_beam_search": True, "best_of": 1}):
        out = client.completions.create(model="tiny", prompt=ids, max_tokens=12, extra_body=beams)
        assert out.choices[0].text == greedy.choices[0].text


def test_a_prompt_batch_searches_each_prompt(client: openai.OpenAI, reference) -> None:
    model, tokenizer = reference
    prompts = [prompt_ids(40 + i, 4 + 5 * i) for i in range(3)]
    out = client.completions.create(
        model="tiny",
        prompt=prompts,
        max_tokens=6,
        n=2,
        extra_body={"use_beam_search": True, "best_of": 2},
    )
    eos = model.generation_config.eos_token_id
    for p, ids in enumerate(prompts):
        for i, tokens in enumerate(hf_answers(model, ids, 2, 6, 2)):
            tokens = tokens[:-1] if tokens[-1] == eos else tokens
            assert out.choices[p * 2 + i].text == tokenizer.decode(tokens)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3, "best_of": 2}, "n"),
        ({"best_of": 2, "temperature": 0.7}, "temperature"),
        ({"best_of": 2, "top_p": 0.5}, "top_p"),
        ({"best_of": 2, "top_k": 5}, "top_k"),
        ({"best_of": 2, "stop": ["x"]}, "stop"),
        ({"best_of": 2, "logprobs": 1}, "logprobs"),
        ({"best_of": 2, "presence_penalty": 0.5}, "presence_penalty"),
        ({"best_of": 2, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"best_of": 2, "logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"best_of": 2, "max_tokens": 0}, "max_tokens"),
        ({"best_of": 2, "length_penalty": 11}, "length_penalty"),
        ({"best_of": 2, "early_stopping": "sometimes"}, "early_stopping"),
        ({"best_of": 9}, "best_of"),  # above the server's --max-n 8
    ],
)
def test_what_beam_search_refuses_is_a_400_naming_the_field(
    http: httpx.Client, fields, param
) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "use_beam_search": True, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") + error["message"], error


CHAT = [{"role": "user", "content": "Tell me about the sea"}]


@pytest.mark.parametrize(("k", "n", "extra"), [(3, 2, {}), (2, 2, {"length_penalty": 0.5})])
def test_chat_beam_search_equals_transformers(
    client: openai.OpenAI, http: httpx.Client, reference, k, n, extra
) -> None:
    """Chat: the conversation through the model's template (as /tokenize renders it), then
    generate(num_beams=k)'s n best; streamed, the same messages."""
    model, tokenizer = reference
    ids = http.post("/tokenize", json={"model": "tiny", "messages": CHAT}).json()["tokens"]
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 8, "n": n}
    beams = {"use_beam_search": True, "best_of": k, **extra}
    out = client.chat.completions.create(**body, extra_body=beams)
    want = hf_answers(model, ids, k, 8, n, **extra)
    eos = model.generation_config.eos_token_id
    assert [c.index for c in out.choices] == list(range(n))
    for choice, tokens in zip(out.choices, want, strict=True):
        ended = tokens[-1] == eos
        assert choice.message.content == tokenizer.decode(tokens[:-1] if ended else tokens)
        assert choice.finish_reason == ("stop" if ended else "length")
    assert out.usage.prompt_tokens == len(ids)
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(**body, extra_body=beams, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[c.index] for c in out.choices] == [c.message.content for c in out.choices]


def test_chat_one_beam_is_greedy(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, temperature=0
    )
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, extra_body={"use_beam_search": True}
    )
    assert out.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"use_beam_search": True, "best_of": 2, "logprobs": True}, "logprobs"),
        ({"use_beam_search": True, "best_of": 2, "temperature": 0.5}, "temperature"),
        ({"use_beam_search": True, "best_of": 2, "max_tokens": 0}, "max_tokens"),
        (
            {"use_beam_search": True, "best_of": 2, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"best_of": 2}, "best_of"),  # without beam search best_of must equal n
    ],
)
def test_chat_beam_refusals(http: httpx.Client, fields, param) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error["param"] or "") + error["message"], error


def test_n_choices_share_the_prompt_blocks_in_one_step(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """n = 4 sampled choices of a new prompt: the first prefills it, the other three (admitted
    in the same step) reuse its full blocks, all but the last token's."""
    ids = prompt_ids(991, 70)
    hits = metric(http, "adapterserve_prefix_cache_hits_total")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=3, n=4, seed=5)
    assert len(out.choices) == 4
    assert (
        metric(http, "adapterserve_prefix_cache_hits_total") - hits
        == 3 * (69 // BLOCK_SIZE) * BLOCK_SIZE
    )
