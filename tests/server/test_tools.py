"""Tool calling on /v1/chat/completions through the openai SDK, on a live server with a LoRA:
forced calls (required, a named function) validate against each function's schema by
construction, at temperature 1, over the base and the adapter, beside free requests in one
batch; streamed deltas reassemble to the whole answer; a two-turn loop with a tool message;
strict tools; `auto`; cached_tokens in usage; OpenAI's deprecated functions and function_call
(a named call whole and streamed, a two-turn loop with a function message); every refusal names
its field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import Server, lora_server

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 20},
                "top": {"type": "boolean"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
FUNCTIONS = [t["function"] for t in TOOLS]  # the deprecated `functions`
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tools")
    with lora_server(
        tiny_model_dir, root, "--max-model-len", "2048", "--max-num-seqs", "16"
    ) as srv:
        yield srv


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def check_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_required_forces_valid_calls(server: Server, model: str) -> None:
    out = client(server).chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=1,
        n=4,
        max_tokens=200,
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message.tool_calls)
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_a_named_function_is_the_one_called(server: Server) -> None:
    out = client(server).chat.completions.create(
        model="lora",
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=2,
        n=4,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "search"}},
        parallel_tool_calls=False,
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"  # OpenAI: a call forced by name stops
        check_calls(choice.message.tool_calls, names=("search",))
        assert len(choice.message.tool_calls) == 1


def test_streamed_calls_reassemble_to_the_whole_answer(server: Server) -> None:
    """Same seed, streamed and not: the same calls. The first delta of a call carries its id,
    type and name; the rest carry argument fragments only, as OpenAI streams them."""
    args = dict(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=5,
        max_tokens=200,
    )
    whole = client(server).chat.completions.create(**args).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client(server).chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                if delta.id is not None:
                    assert delta.type == "function" and delta.function.name
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" == whole.finish_reason
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
    ]


def test_the_sdk_stream_helper_gives_the_final_calls(server: Server) -> None:
    with client(server).chat.completions.stream(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=6, max_tokens=200
    ) as stream:
        final = stream.get_final_completion()
    check_calls(final.choices[0].message.tool_calls)


def test_a_two_turn_loop_with_a_tool_message(server: Server) -> None:
    c = client(server)
    first = c.chat.completions.create(
        model="lora", messages=ASK, tools=TOOLS, seed=3, tool_choice="required", max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'},
    ]
    second = c.chat.completions.create(
        model="lora", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, seed=4
    )
    assert second.choices[0].message.tool_calls is None
    assert isinstance(second.choices[0].message.content, str)
    # the history rendered: the call and its result are in the prompt (longer than the ask)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_a_strict_tool_gets_every_key_and_no_other(server: Server) -> None:
    open_schema = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}},
    }
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": open_schema, "strict": True},
    }
    out = client(server).chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[tool],
        tool_choice="required",
        temperature=1.0,
        seed=7,
        n=6,
        max_tokens=120,
    )
    for choice in out.choices:
        for call in choice.message.tool_calls:
            assert set(json.loads(call.function.arguments)) == {"a", "b"}


def test_auto_answers_text_or_valid_calls(server: Server) -> None:
    out = client(server).chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=8, n=6, max_tokens=40
    )
    for choice in out.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            check_calls(choice.message.tool_calls)
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in (
                "stop",
                "length",
            )


def test_forced_calls_beside_free_requests_in_one_batch(server: Server) -> None:
    async def go():
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        forced = [
            c.chat.completions.create(
                model=m,
                messages=ASK,
                tools=TOOLS,
                tool_choice="required",
                temperature=1.0,
                seed=i,
                max_tokens=200,
            )
            for i, m in enumerate(["tiny", "lora"] * 3)
        ]
        free = [
            c.chat.completions.create(model=m, messages=ASK, temperature=1.0, seed=i, max_tokens=30)
            for i, m in enumerate(["tiny", "lora"])
        ]
        return await asyncio.gather(*forced, *free)

    results = asyncio.run(go())
    for out in results[:6]:
        check_calls(out.choices[0].message.tool_calls)
    for out in results[6:]:
        assert out.choices[0].message.tool_calls is None


def test_a_repeated_prompt_reports_cached_tokens(server: Server) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "a long enough prompt " * 12}]
    first = c.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    again = c.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    prompt = "another prompt, long enough " * 10
    cold = c.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    warm = c.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens > 0


def test_a_named_function_call_answers_as_function_call(server: Server) -> None:
    out = client(server).chat.completions.create(
        model="lora",
        messages=ASK,
        functions=FUNCTIONS,
        function_call={"name": "search"},
        temperature=1.0,
        seed=9,
        n=4,
        max_tokens=200,
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"  # OpenAI: a call forced by name stops
        assert choice.message.tool_calls is None
        call = choice.message.function_call
        assert call.name == "search"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS["search"])


def test_a_streamed_function_call_reassembles_to_the_whole_answer(server: Server) -> None:
    """The name in the first `delta.function_call`, argument fragments after, as OpenAI
    streamed them."""
    args = dict(
        model="tiny",
        messages=ASK,
        functions=FUNCTIONS,
        function_call={"name": "get_weather"},
        temperature=1.0,
        seed=10,
        max_tokens=200,
    )
    whole = client(server).chat.completions.create(**args).choices[0]
    deltas, finish = [], None
    for chunk in client(server).chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            assert choice.delta.tool_calls is None
            if choice.delta.function_call is not None:
                deltas.append(choice.delta.function_call)
    assert deltas[0].name == "get_weather" and all(d.name is None for d in deltas[1:])
    arguments = "".join(d.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(whole.message.function_call.arguments)
    assert finish == "stop" == whole.finish_reason


def test_a_two_turn_loop_with_a_function_message(server: Server) -> None:
    c = client(server)
    first = c.chat.completions.create(
        model="lora",
        messages=ASK,
        functions=FUNCTIONS,
        function_call={"name": "get_weather"},
        seed=11,
        max_tokens=200,
    )
    call = first.choices[0].message.function_call
    history = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "function", "name": call.name, "content": '{"temperature": 18}'},
    ]
    assert "function_call" in history[1] and "tool_calls" not in history[1]
    second = c.chat.completions.create(
        model="lora",
        messages=history,
        functions=FUNCTIONS,
        function_call="none",
        max_tokens=8,
        seed=12,
    )
    assert second.choices[0].message.function_call is None
    assert isinstance(second.choices[0].message.content, str)
    # the history rendered: the call and its result are in the prompt (longer than the ask)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": FUNCTIONS, "tools": TOOLS}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"function_call": {"name": "search"}}, "function_call"),
        ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call"),
        ({"functions": [{"name": "bad name!"}]}, "functions"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"tools": TOOLS, "use_beam_search": True, "best_of": 2, "tool_choice": "required"},
            "tools",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "strict": True,
                            "parameters": {
                                "type": "object",
                                "properties": {
                                    "x": {"type": "object", "additionalProperties": True}
                                },
                            },
                        },
                    }
                ]
            },
            "tools",
        ),
    ],
)
def test_refusals_name_the_field(server: Server, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk = ("tools", "tool_choice", "response_format", "functions", "function_call")
        known = {k: v for k, v in extra.items() if k in sdk}
        body = {k: v for k, v in extra.items() if k not in known}  # vLLM's extras
        client(server).chat.completions.create(
            model="tiny", messages=ASK, max_tokens=4, **known, extra_body=body
        )
    error = caught.value.body
    assert caught.value.status_code == 400
    assert param in (error.get("param") or "") + error["message"], error


class City(BaseModel):
    name: str = Field(max_length=12)
    sunny: bool
    rank: int = Field(ge=1, le=9)


@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_the_sdk_parse_helper_with_a_pydantic_model(server: Server, model: str) -> None:
    """`chat.completions.parse`: the SDK sends the model's strict JSON schema and parses the
    answer into it; with `pydantic_function_tool`, a strict tool whose arguments it parses."""
    c = client(server)
    out = c.chat.completions.parse(
        model=model, messages=ASK, response_format=City, temperature=1.0, seed=11, max_tokens=120
    )
    assert isinstance(out.choices[0].message.parsed, City)
    called = c.chat.completions.parse(
        model=model,
        messages=ASK,
        tools=[openai.pydantic_function_tool(City)],
        tool_choice="required",
        temperature=1.0,
        seed=12,
        max_tokens=200,
    )
    calls = called.choices[0].message.tool_calls
    assert calls and all(isinstance(call.function.parsed_arguments, City) for call in calls)
