"""POST /v1/responses through the openai SDK's own typed models, on a live server with a LoRA:
text, instructions, a json_schema text format, forced function calls (valid by construction),
a tool loop sent back as input items, streaming (`responses.create(stream=True)` events in
OpenAI's order, and `responses.stream` reassembling the final response), the base and the
adapter in one batch, and every refusal naming its field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.server.conftest import Server, lora_server

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("responses")
    with lora_server(tiny_model_dir, root, "--max-model-len", "2048") as srv:
        yield srv


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("model", ["tiny", "lora"])
def test_text_response_in_openai_shapes(server: Server, model: str) -> None:
    out = client(server).responses.create(
        model=model, input="Tell me a story", instructions="Be brief.", max_output_tokens=12
    )
    assert out.object == "response" and out.id.startswith("resp_") and out.model == model
    assert out.status in ("completed", "incomplete")
    assert out.output[0].type == "message" and out.output[0].role == "assistant"
    assert out.output_text == out.output[0].content[0].text
    assert out.usage.output_tokens <= 12 and out.usage.input_tokens > 0
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens"


def test_same_seed_same_text_as_chat(server: Server) -> None:
    """One pipeline: a response and a chat completion of the same conversation and seed agree."""
    c = client(server)
    response = c.responses.create(
        model="tiny",
        input="Hello",
        instructions="Answer.",
        max_output_tokens=10,
        extra_body={"seed": 3},
    )
    chat = c.chat.completions.create(
        model="tiny",
        seed=3,
        max_completion_tokens=10,
        messages=[{"role": "system", "content": "Answer."}, {"role": "user", "content": "Hello"}],
    )
    assert response.output_text == chat.choices[0].message.content


def test_json_schema_text_format(server: Server) -> None:
    schema = WEATHER["parameters"]
    out = client(server).responses.create(
        model="lora",
        input="Weather?",
        max_output_tokens=120,
        temperature=1.0,
        text={"format": {"type": "json_schema", "name": "w", "schema": schema, "strict": True}},
    )
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), schema)
    assert out.text.format.type == "json_schema"


def test_forced_calls_and_a_tool_loop(server: Server) -> None:
    c = client(server)
    first = c.responses.create(
        model="tiny",
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        temperature=1.0,
        max_output_tokens=200,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and first.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    loop = [{"role": "user", "content": "What is the weather in Paris?"}]
    loop += [call.model_dump(exclude_none=True) for call in calls]
    loop += [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C"}]
    second = c.responses.create(
        model="tiny", input=loop, tools=[WEATHER], tool_choice="none", max_output_tokens=6
    )
    assert [item.type for item in second.output] == ["message"]
    assert second.usage.input_tokens > first.usage.input_tokens
    named = c.responses.create(
        model="lora",
        input="x",
        tools=[WEATHER],
        max_output_tokens=200,
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert [item.type for item in named.output] == ["function_call"]


def test_streamed_events_in_openai_order(server: Server) -> None:
    events = list(
        client(server).responses.create(
            model="tiny", input="Tell me a story", max_output_tokens=8, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text
    assert events[-4].text == text


def test_streamed_calls_reassemble(server: Server) -> None:
    args = dict(
        model="tiny",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=200,
        extra_body={"seed": 9},
    )
    whole = client(server).responses.create(**args)
    with client(server).responses.stream(**args) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    got = [(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"]
    want = [(i.name, json.loads(i.arguments)) for i in whole.output if i.type == "function_call"]
    assert got == want and got


def test_base_and_adapter_in_one_batch(server: Server) -> None:
    async def go():
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        jobs = [
            c.responses.create(model=m, input=f"story {i}", max_output_tokens=6)
            for i, m in enumerate(["tiny", "lora"] * 3)
        ]
        return await asyncio.gather(*jobs)

    for out in asyncio.run(go()):
        assert out.output[0].type == "message"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"max_output_tokens": 5000}, "max_output_tokens"),
        ({"input": "x" * 20000}, "input"),
        (
            {
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "a",
                        "strict": True,
                        "schema": {"type": "array"},
                    }
                }
            },
            "text.format",
        ),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_refusals_name_the_field(server: Server, extra, param) -> None:
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 4} | extra
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).responses.create(**body)
    error = caught.value.body
    assert caught.value.status_code in (400, 404)
    assert param in (error.get("param") or "") + error["message"], error
