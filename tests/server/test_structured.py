"""Structured outputs (response_format, vLLM's guided_* extras) on a live server with a LoRA
and a prefix-tuning adapter: 30 random JSON schemas, every output parses and validates
(jsonschema), sampled at temperature 1 (the grammar, not the model, keeps it valid), with and
without adapters, streamed and not, n > 1, constrained and free requests in the same batch;
regex, choice and grammar; refusals; `length` when the limit cuts the value."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.server.conftest import Server, start_server, stop_server

peft = pytest.importorskip("peft")
MODELS = [None, "lora", "prefix"]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.adapters.makers import save_peft

    root = tmp_path_factory.mktemp("structured")
    lora = save_peft(
        root / "lora", tiny_model_dir, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), 1
    )
    prefix = save_peft(
        root / "prefix",
        tiny_model_dir,
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        2,
    )
    srv = start_server(
        tiny_model_dir,
        root / "server.log",
        "--served-model-name",
        "tiny",
        "--adapter",
        f"lora={lora}",
        "--adapter",
        f"prefix={prefix}",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
    )
    yield srv
    status = stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
    assert status in (0, -signal.SIGTERM)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects, arrays, enums, required fields, bounded numbers and strings: bounded so
    that a complete value always fits in the token limit."""
    kinds = ["string", "integer", "number", "boolean", "enum"] + (
        ["object", "array"] if depth < 2 else []
    )
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(["id", "name", "size", "tags", "ok", "score", "kind"], rng.randint(1, 3))
        props = {n: random_schema(rng, depth + 1) for n in names}
        return {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
            "required": rng.sample(names, rng.randint(0, len(names))),
        }
    if kind == "array":
        return {
            "type": "array",
            "items": random_schema(rng, depth + 1),
            "maxItems": rng.randint(1, 3),
        }
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 300)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "up", "down"], rng.randint(1, 3))}
    return {"type": "boolean"}


SCHEMAS = [random_schema(random.Random(i)) for i in range(30)]


async def complete(client: httpx.AsyncClient, body: dict, stream: bool) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, from the whole answer or joined stream chunks."""
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        return [
            ((c["message"]["content"] if chat else c["text"]), c["finish_reason"])
            for c in response.json()["choices"]
        ]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    async with client.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
                reasons[c["index"]] = c.get("finish_reason") or reasons.get(c["index"])
    return [(texts[i], reasons[i]) for i in sorted(texts)]


def test_every_output_follows_its_schema(server: Server) -> None:
    """30 schemas x (base, lora, prefix) x (streamed or not) x (completions or chat), n = 2,
    beside unconstrained requests, all at once."""

    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            jobs, checks = [], []
            for i, schema in enumerate(SCHEMAS):
                model = MODELS[i % 3]
                fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
                body = {
                    "model": model or "tiny",
                    "max_tokens": 200,
                    "temperature": 1.0,
                    "seed": i,
                    "n": 2,
                }
                if i % 2:
                    body |= {
                        "messages": [{"role": "user", "content": f"item {i}"}],
                        "response_format": fmt,
                    }
                elif i % 4 == 0:
                    body |= {"prompt": f"item {i}:", "response_format": fmt}
                else:
                    body |= {"prompt": f"item {i}:", "guided_json": schema}
                jobs.append(complete(client, body, stream=i % 3 == 1))
                checks.append(schema)
            free = [
                complete(
                    client,
                    {
                        "model": m or "tiny",
                        "prompt": "free",
                        "max_tokens": 20,
                        "temperature": 1.0,
                        "seed": k,
                    },
                    stream=False,
                )
                for k, m in enumerate(MODELS)
            ]
            results = await asyncio.gather(*jobs, *free)
            return checks, results[: len(jobs)]

    checks, results = asyncio.run(go())
    for schema, choices in zip(checks, results, strict=True):
        assert len(choices) == 2
        for text, reason in choices:
            assert reason == "stop", (schema, text)
            jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    ("field", "spec", "check"),
    [
        ("guided_regex", r"[a-c]{2,5}x", lambda t: re.fullmatch(r"[a-c]{2,5}x", t)),
        ("guided_choice", ["yes", "no", "maybe"], lambda t: t in ("yes", "no", "maybe")),
        ("guided_grammar", 'start: "a"+ "b"', lambda t: re.fullmatch(r"a+b", t)),
        ("guided_grammar", 'root ::= ("x" | "y")+ "!"', lambda t: re.fullmatch(r"[xy]+!", t)),
        ("response_format", {"type": "json_object"}, lambda t: isinstance(json.loads(t), dict)),
    ],
)
def test_other_constraints(server: Server, field, spec, check) -> None:
    for model in MODELS:
        body = {
            "model": model or "tiny",
            "prompt": "go",
            "max_tokens": 120,
            "temperature": 1.0,
            "seed": 7,
            "n": 3,
            field: spec,
        }
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            if field == "response_format" and choice["finish_reason"] == "length":
                continue  # free-form JSON may run past the limit: then it says so
            assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


def test_a_cut_value_finishes_with_length(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 50}},
        "required": ["text"],
    }
    body = {"model": "tiny", "prompt": "x", "max_tokens": 20, "guided_json": schema}
    choice = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()[
        "choices"
    ][0]
    assert choice["finish_reason"] == "length" and choice["text"].startswith('{"text":"')
    with pytest.raises(json.JSONDecodeError):  # cut inside the value: says `length`, not `stop`
        json.loads(choice["text"])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_grammar": "start: ("}, "guided_grammar"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_regex": "a", "min_tokens": 3}, "min_tokens"),
        ({"guided_regex": "a", "use_beam_search": True, "best_of": 2}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
    ],
)
def test_refusals_name_the_field(server: Server, extra, param) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, **extra}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error["param"] or "") + error["message"], error


def test_compiled_grammars_are_cached(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The same constraint twice (keys in another order) is compiled once; a refused one is
    refused again from the cache with the same message; the cache is bounded."""
    from adapterserve.server.engine.constraint import GrammarError, Grammars, GrammarSandbox
    from adapterserve.server.model.tokenizer import Tokenizer

    grammars = Grammars(Tokenizer(tiny_model_dir).hf, 384)
    request.addfinalizer(grammars.close)
    calls: list[str] = []
    compile_ = GrammarSandbox.compile
    monkeypatch.setattr(
        GrammarSandbox,
        "compile",
        lambda self, kind, spec: calls.append(kind) or compile_(self, kind, spec),
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    first = grammars.compile("json_schema", schema)
    again = grammars.compile("json_schema", dict(reversed(list(schema.items()))))
    assert first == again and calls == ["json_schema"]
    messages = []
    for _ in range(2):
        with pytest.raises(GrammarError) as caught:
            grammars.compile("regex", "(")
        messages.append(str(caught.value))
    assert calls == ["json_schema", "regex"] and messages[0] == messages[1] and messages[0]
    grammars.COMPILED_CACHE = 3
    for i in range(5):
        grammars.compile("choice", [f"x{i}"])
    assert len(grammars._compiled) == 3
    grammars.compile("choice", ["x0"])  # evicted: compiled again
    assert calls.count("choice") == 6


def _opened(schema: dict) -> dict:
    """The schema as pydantic writes one: objects open (no additionalProperties), nothing
    required."""
    if isinstance(schema, dict):
        return {
            k: _opened(v)
            for k, v in schema.items()
            if k not in ("additionalProperties", "required")
        }
    return schema


def _closed(schema: dict) -> dict:
    """What OpenAI's strict mode makes of it: every object closed, every property required."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if isinstance(v, dict) else v for k, v in schema.items()}
    if out.get("type") == "object":
        out["additionalProperties"] = False
        out["required"] = list(out.get("properties", {}))
    return out


OBJECT_SCHEMAS = [s for s in SCHEMAS if s.get("type") == "object"][:6]


def test_a_strict_schema_closes_every_object_and_requires_every_property(server: Server) -> None:
    """`strict: true` on open schemas (as pydantic writes them): sampled at temperature 1, no
    output has a key the schema does not name, and every output has every key (OpenAI's strict
    mode). Without it the grammar lets the model add keys until the token limit."""
    assert len(OBJECT_SCHEMAS) >= 3

    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            jobs = []
            for i, schema in enumerate(OBJECT_SCHEMAS):
                spec = {"name": f"s{i}", "schema": _opened(schema), "strict": True}
                body = {
                    "model": MODELS[i % 3] or "tiny",
                    "max_tokens": 200,
                    "temperature": 1.0,
                    "seed": i,
                    "n": 4,
                    "messages": [{"role": "user", "content": f"item {i}"}],
                    "response_format": {"type": "json_schema", "json_schema": spec},
                }
                jobs.append(complete(client, body, stream=i % 2 == 1))
            return await asyncio.gather(*jobs)

    for schema, choices in zip(OBJECT_SCHEMAS, asyncio.run(go()), strict=True):
        for text, reason in choices:
            assert reason == "stop", (schema, text)
            jsonschema.validate(json.loads(text), _closed(schema))


def test_a_schema_that_is_not_strict_is_kept_as_given(server: Server) -> None:
    """`strict: false` (or absent): the schema as given, so an open object may get keys it does
    not name, and an optional property may be left out; a closed one stays closed."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    spec = {"name": "open", "schema": schema, "strict": False}
    body = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 60,
        "temperature": 1.0,
        "seed": 3,
        "n": 8,
        "response_format": {"type": "json_schema", "json_schema": spec},
    }
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    values = [
        json.loads(c["text"]) for c in response.json()["choices"] if c["finish_reason"] == "stop"
    ]
    assert values and all(isinstance(v, dict) for v in values)
    for v in values:
        jsonschema.validate(v, schema)
    assert any(set(v) != {"a"} for v in values)  # open: not every output is exactly {"a": ...}


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "additionalProperties": True}},
            },
            "additionalProperties",
        ),
        ({"type": "array", "items": {"type": "string"}}, "object"),
        ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}]}}}, "allOf"),
    ],
)
def test_a_strict_schema_strict_mode_cannot_honour_is_refused(
    server: Server, schema, named
) -> None:
    spec = {"name": "bad", "schema": schema, "strict": True}
    body = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": spec},
    }
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and named in error["message"], error


@pytest.mark.parametrize("warm", [True, False])
def test_the_grammar_machinery_is_warmed_at_start(
    tiny_model_dir: Path, tmp_path: Path, warm: bool
) -> None:
    """--warm-grammars (the default): once the server is up, a sandbox worker is running and
    llguidance's tokenizer is built, so the first constrained request pays neither; off, nothing
    is built until a request needs it."""
    import time

    from fastapi.testclient import TestClient

    from adapterserve.server.config import Settings
    from adapterserve.server.main import create_app

    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        kv_cache_memory_mb=16,
        max_model_len=256,
        cache_dir=tmp_path,
        log_level="warning",
        engine_process=False,
        warm_grammars=warm,
    )
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine
        deadline = time.monotonic() + 120
        while warm and time.monotonic() < deadline:
            grammars = engine.__dict__.get("grammars")
            if grammars is not None and grammars._tokenizer is not None and grammars._sandbox:
                break
            time.sleep(0.1)
        grammars = engine.__dict__.get("grammars")
        if warm:
            assert grammars._tokenizer is not None and grammars._sandbox._idle  # a live worker
        else:
            time.sleep(1.0)
            assert grammars is None  # built on first use only
        body = {"prompt": "x", "max_tokens": 4, "guided_regex": "[ab]+"}
        assert client.post("/v1/completions", json=body).status_code == 200
