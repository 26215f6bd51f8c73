"""The OpenAI-compatible API against a real server process, through the official client."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server.conftest import MULTIBYTE_CHAR, Server

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def stream_text(chunks) -> tuple[list[str], str | None]:
    deltas, finish = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            deltas.append(choice.text)
            finish = choice.finish_reason or finish
    return deltas, finish


# ---------------------------------------------------------------- models, health, metrics


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_health_ready_and_metrics(server: Server, http: httpx.Client) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}  # no key needed
    assert http.get("/ready").status_code == 200
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in (
        "adapterserve_requests_running",
        "adapterserve_kv_blocks_used",
        "adapterserve_requests_total",
        "adapterserve_prefix_cache_hits_total",
        "adapterserve_prefix_cache_queries_total",
        "adapterserve_prefix_cache_hit_rate",
        "adapterserve_prefix_cache_blocks",
    ):
        assert name in response.text


def test_a_repeated_prompt_hits_the_prefix_cache_in_metrics(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """The second identical request reuses the first's full blocks (all but the last token's),
    and answers the same; /metrics counts it."""
    text = "alpha beta gamma delta " * 12
    hits = metric(http, "adapterserve_prefix_cache_hits_total")
    queries = metric(http, "adapterserve_prefix_cache_queries_total")
    first = client.completions.create(model="tiny", prompt=text, max_tokens=4, **GREEDY)
    assert metric(http, "adapterserve_prefix_cache_hits_total") == hits  # new text: no hit
    second = client.completions.create(model="tiny", prompt=text, max_tokens=4, **GREEDY)
    assert second.choices[0].text == first.choices[0].text
    prompt_tokens = first.usage.prompt_tokens
    gained = metric(http, "adapterserve_prefix_cache_hits_total") - hits
    assert gained == (prompt_tokens - 1) // 16 * 16 > 0  # block_size 16
    assert metric(http, "adapterserve_prefix_cache_queries_total") - queries == 2 * prompt_tokens
    assert 0 < metric(http, "adapterserve_prefix_cache_hit_rate") <= 1
    assert metric(http, 'adapterserve_prefix_cache_blocks{state="cached"}') > 0


def test_openapi_schema_lists_the_routes(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


# ---------------------------------------------------------------- completions


def test_completion_usage_and_length(client: openai.OpenAI, tokenizer) -> None:
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, **GREEDY)
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_greedy_is_deterministic_and_token_prompts_match_text(
    client: openai.OpenAI, tokenizer
) -> None:
    first = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, **GREEDY)
    second = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, **GREEDY)
    by_ids = client.completions.create(
        model="tiny", prompt=tokenizer.encode(PROMPT), max_tokens=12, **GREEDY
    )
    assert first.choices[0].text == second.choices[0].text == by_ids.choices[0].text


def test_streaming_joins_to_the_non_streamed_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, **GREEDY)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    deltas, finish = stream_text(chunks)
    assert "".join(deltas) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_multibyte_characters_split_across_tokens_stream_intact(bigram_server: Server) -> None:
    bigram = openai.OpenAI(base_url=f"{bigram_server.base_url}/v1", api_key="unused", max_retries=0)
    args = dict(model="bigram", prompt=MULTIBYTE_CHAR, max_tokens=12, **GREEDY)
    whole = bigram.completions.create(**args).choices[0].text
    deltas, _ = stream_text(bigram.completions.create(stream=True, **args))
    assert whole == MULTIBYTE_CHAR * 4
    assert "".join(deltas) == whole
    assert all("\ufffd" not in d for d in deltas), deltas


def test_stop_string_truncates_output(client: openai.OpenAI) -> None:
    text = (
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, **GREEDY)
        .choices[0]
        .text
    )
    start = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY
    )
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_seeds_differ(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed
        )
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_n_choices_use_consecutive_seeds(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=100,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    for i, choice in enumerate(out.choices):
        single = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=6,
            temperature=1.0,
            seed=100 + i,
            extra_body={"ignore_eos": True},
        )
        assert choice.text == single.choices[0].text


def test_prompt_batch_with_n(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny", prompt=["Once upon", "def add"], max_tokens=4, n=2, **GREEDY
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices of a prompt agree
    single = client.completions.create(model="tiny", prompt="def add", max_tokens=4, **GREEDY)
    assert out.choices[2].text == single.choices[0].text
    assert out.usage.completion_tokens == 16


def test_echo_prompt_logprobs_with_zero_max_tokens(client: openai.OpenAI, tokenizer) -> None:
    """lm-evaluation-harness local-completions: log-likelihood of a given text."""
    ids = tokenizer.encode(PROMPT)
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = out.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == len(lp.text_offset)
        == len(ids)
    )
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)


def test_generated_logprob_equals_prompt_logprob_of_the_same_token(
    client: openai.OpenAI, tokenizer
) -> None:
    """The logprob of a sampled token equals its prompt logprob once it is part of the prompt."""
    checked = 0
    for prompt in (PROMPT, "Once upon a time", "def add(a, b):", "Numbers: 1, 2"):
        ids = tokenizer.encode(prompt)
        gen = client.completions.create(
            model="tiny", prompt=ids, max_tokens=1, logprobs=3, **GREEDY
        ).choices[0]
        top = gen.logprobs.top_logprobs[0]
        assert gen.logprobs.token_logprobs[0] == pytest.approx(
            max(top.values()), abs=1e-5
        )  # greedy = argmax
        token_id = _unique_id_of(tokenizer, gen.logprobs.tokens[0])
        if token_id is None:
            continue
        echo = client.completions.create(
            model="tiny", prompt=ids + [token_id], max_tokens=0, echo=True, logprobs=0
        )
        assert echo.choices[0].logprobs.token_logprobs[-1] == pytest.approx(
            gen.logprobs.token_logprobs[0], abs=1e-3
        )
        checked += 1
    assert checked > 0


def _unique_id_of(tokenizer, text: str) -> int | None:
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == text]
    return ids[0] if len(ids) == 1 else None


def test_streaming_logprobs_and_echo(client: openai.OpenAI) -> None:
    args = dict(model="tiny", prompt=PROMPT, max_tokens=8, echo=True, logprobs=2, **GREEDY)
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [
        lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs
    ]
    expected = whole.logprobs.token_logprobs
    assert len(streamed) == len(expected) and streamed[0] is None and expected[0] is None
    assert streamed[1:] == pytest.approx(expected[1:], abs=1e-5)


# ---------------------------------------------------------------- chat


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=5,
        **GREEDY,
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_chat_streaming_matches_and_reports_usage(client: openai.OpenAI) -> None:
    args = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_completion_tokens=20,
        **GREEDY,
    )
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == []
    streamed, once = chunks[-1].usage, whole.usage
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == (
        once.prompt_tokens,
        once.completion_tokens,
        once.total_tokens,
    )
    # the same conversation again: what of it fills whole KV blocks comes from the cache
    # (block_size 16; never the last prompt token, which is computed to sample from)
    assert streamed.prompt_tokens_details.cached_tokens == (once.prompt_tokens - 1) // 16 * 16


def test_chat_logprobs_and_n(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=4,
        n=2,
        logprobs=True,
        top_logprobs=3,
        temperature=1.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 4
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert [t.logprob for t in entry.top_logprobs] == sorted(
                (t.logprob for t in entry.top_logprobs), reverse=True
            )
            assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_chat_without_max_tokens_stays_within_the_context(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0
    )
    assert out.usage.total_tokens <= 256
    assert out.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- load, cancellation


def test_queue_full_is_an_immediate_503_with_retry_after(bigram_server: Server) -> None:
    body = {"model": "bigram", "prompt": "a", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=bigram_server.base_url, timeout=30) as http_client:
        with http_client.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # keep a reference: a dropped iterator closes the stream
            first = next(lines)  # the only sequence slot is now taken
            assert running.status_code == 200 and first.startswith('data: {"id"'), first
            started = time.monotonic()
            refused = http_client.post(
                "/v1/completions", json={"model": "bigram", "prompt": "b", "max_tokens": 2}
            )
            assert time.monotonic() - started < 5
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "service_unavailable_error"
        assert refused.json()["error"]["code"] == "queue_full"
        assert _eventually(
            lambda: (
                http_client.post(
                    "/v1/completions", json={"prompt": "b", "max_tokens": 2}
                ).status_code
                == 200
            )
        )


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "a", "n": 2}, "n"), ({"prompt": ["a", "b", "c"]}, "prompt")],
    ids=["n", "prompts"],
)
def test_a_request_larger_than_the_server_is_a_400_not_a_503(
    bigram_server: Server, body: dict, param: str
) -> None:
    """The bigram server holds one sequence at a time (no queue): a request for more sequences
    can never be served, so retrying after a 503 would loop forever. It is a 400 naming the
    limit, and the server still serves a request that fits."""
    with httpx.Client(base_url=bigram_server.base_url, timeout=30) as http_client:
        refused = http_client.post("/v1/completions", json={"max_tokens": 2, **body})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == param and error["code"] == "too_many_sequences", error
        assert "at most 1 at once" in error["message"] and "--max-num-seqs 1" in error["message"]
        assert "retry-after" not in refused.headers
        assert http_client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).is_success


def _eventually(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _finished(http: httpx.Client) -> dict[str, float]:
    """The tiny model's finished requests by outcome."""
    prefix = 'adapterserve_requests_total{model="tiny",outcome="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in http.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    }


def test_disconnected_clients_release_their_kv_blocks(server: Server, http: httpx.Client) -> None:
    """Streaming and non-streaming clients give up early; their requests are aborted. A
    stream leaves after its first line, with ~229 tokens to go: always an abort. A non-streaming
    client times out after 0.3 s, which the tiny model's 230 tokens can beat on a fast machine:
    an abort or a whole answer, never a request left holding blocks."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 230, "ignore_eos": True}
    before = _finished(http)

    def impatient(stream: bool) -> None:
        with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=0.3) as c:
            try:
                if stream:
                    with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                        next(r.iter_lines())
                else:
                    c.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                pass

    threads = [threading.Thread(target=impatient, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _eventually(
        lambda: (
            metric(http, "adapterserve_kv_blocks_used") == 0
            and metric(http, "adapterserve_requests_running") == 0
        )
    )
    after = _finished(http)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta.get("abort", 0) >= 3 and sum(delta.values()) == 6, delta
    out = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
    assert out.status_code == 200


def test_logprob_values_are_finite_json(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 4,
        "logprobs": 5,
        "echo": True,
        "temperature": 0,
    }
    data = http.post("/v1/completions", json=body).json()
    values = [v for v in data["choices"][0]["logprobs"]["token_logprobs"] if v is not None]
    assert values and all(math.isfinite(v) for v in values)
