"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) on the live server:
round trips against the model's own tokenizer, the chat template applied as
/v1/chat/completions applies it, bad input, and lm-evaluation-harness's remote-tokenizer probe
replayed request for request (lm_eval/utils.py: check_remote_tokenizer_support, RemoteTokenizer)."""

from __future__ import annotations

from pathlib import Path

import httpx
import jinja2
import openai
import pytest
from transformers import AutoTokenizer

from tests.server.conftest import MAX_PROMPT_CHARS, Server

TEXTS = ["hello world", "The quick brown fox", "  spaces and\nnewlines\t", "ünïcödé ✓"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [True, False])
def test_tokenize_and_detokenize_round_trip(http: httpx.Client, tokenizer, text, special) -> None:
    body = {"prompt": text, "add_special_tokens": special, "return_token_strs": True}
    out = http.post("/tokenize", json=body).json()
    assert out["tokens"] == tokenizer.encode(text, add_special_tokens=special)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    back = http.post("/detokenize", json={"tokens": out["tokens"]}).json()["prompt"]
    assert back == tokenizer.decode(out["tokens"])
    assert http.post("/tokenize", json={"prompt": text}).json()["token_strs"] is None


def test_messages_render_as_chat_completions_does(
    http: httpx.Client, client: openai.OpenAI, tokenizer
) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    out = http.post("/tokenize", json={"messages": messages}).json()
    assert out["tokens"] == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]
    plain = http.post(
        "/tokenize", json={"messages": messages, "add_generation_prompt": False}
    ).json()
    assert out["tokens"][: plain["count"]] == plain["tokens"] and plain["count"] < out["count"]


def test_lm_eval_remote_tokenizer_probe(server: Server, tokenizer) -> None:
    """check_remote_tokenizer_support's two requests, then RemoteTokenizer's use of the answers:
    eos_token_id = encode(eos_token)[0], and the chat template rendered with jinja2."""
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as lm_eval:
        info = lm_eval.get("/tokenizer_info").json()
        assert isinstance(info, dict) and "eos_token" in info
        tokens = lm_eval.post(
            "/tokenize", json={"prompt": "test", "add_special_tokens": False}
        ).json()["tokens"]
        assert isinstance(tokens, list) and tokens == tokenizer.encode(
            "test", add_special_tokens=False
        )
        eos = lm_eval.post(
            "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}
        )
        assert eos.json()["tokens"][0] == tokenizer.eos_token_id
        assert info["eos_token_ids"] == [tokenizer.eos_token_id]
        messages = [{"role": "user", "content": "hi"}]
        rendered = (
            jinja2.Environment()
            .from_string(info["chat_template"])
            .render(messages=messages, add_generation_prompt=True)
        )
        want = lm_eval.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert tokenizer.encode(rendered, add_special_tokens=False) == want


def test_the_key_is_required(server: Server) -> None:
    for method, path in (
        ("GET", "/tokenizer_info"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    ):
        response = httpx.request(method, server.base_url + path, json={"prompt": "x"})
        assert response.status_code == 401, path


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, None),
        ("/tokenize", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "no-such-model"}, 404, "model"),
    ],
)
def test_bad_requests(http: httpx.Client, path, body, status, param) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert param in ((error["param"] or "") + error["message"]), error


def test_detokenize_of_nothing_is_empty(http: httpx.Client) -> None:
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
