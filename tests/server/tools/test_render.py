"""server/api/tools/render.py: the generic tool prompt, tool messages as plain text, and what
the model writes in the prompt's format reads back with the parser."""

from __future__ import annotations

import json

import pytest

from adapterserve.server.api.tools.grammar import Tool
from adapterserve.server.api.tools.parsers import ParsedCall, get_parser
from adapterserve.server.api.tools.render import (
    calls_text,
    functions_as_tools,
    generic_tool_system_prompt,
    template_supports_tools,
    tool_messages_to_text,
)
from tests.helpers import CHAT_TEMPLATE

WEATHER = Tool(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}}},
    "Weather of a city",
)
CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    },
]


def test_template_supports_tools():
    assert not template_supports_tools(CHAT_TEMPLATE)
    assert template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_supports_tools("{{ my_tools_list }}")
    assert not template_supports_tools(None)


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_system_prompt_describes_functions_and_format(fmt: str):
    prompt = generic_tool_system_prompt([WEATHER], fmt)
    assert (
        json.dumps(
            {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": WEATHER.parameters,
            }
        )
        in prompt
    )
    assert get_parser(fmt).arguments_key in prompt
    assert generic_tool_system_prompt([WEATHER]) == generic_tool_system_prompt([WEATHER], "hermes")
    assert "<tool_call>" in generic_tool_system_prompt([WEATHER])
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        generic_tool_system_prompt([WEATHER], "xml")


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_calls_text_reads_back_with_the_parser(fmt: str):
    parsed = get_parser(fmt).parse(calls_text(CALLS, fmt))
    assert parsed.content is None
    assert parsed.calls == [
        ParsedCall("get_weather", '{"city":"Paris"}'),
        ParsedCall("get_weather", '{"city":"Oslo"}'),
    ]


def test_tool_messages_become_plain_messages():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": "Paris sunny, Oslo rain."},
    ]
    result = tool_messages_to_text(messages)
    assert result[:2] == messages[:2] and result[-1] == messages[-1]
    assert result[2] == {"role": "assistant", "content": "Checking.\n" + calls_text(CALLS)}
    assert result[3] == {
        "role": "user",
        "content": "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>",
    }
    assert len(result) == 5
    assert messages[3]["role"] == "tool"  # the input is untouched


def test_assistant_call_without_content_and_unparsable_arguments():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    result = tool_messages_to_text([{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert result == [
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
        }
    ]


def test_deprecated_function_messages_read_as_tool_calling() -> None:
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "function_call": call},
        {"role": "function", "name": "get_weather", "content": "18C"},
    ]
    messages = functions_as_tools(history)
    assert messages[0] == history[0] and "function_call" in history[1]  # a copy
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
    }
    assert messages[2] == {
        "role": "tool",
        "name": "get_weather",
        "content": "18C",
        "tool_call_id": "call_1",
    }
    text = tool_messages_to_text(messages)
    assert text[1]["content"] == calls_text(messages[1]["tool_calls"])
    assert text[2] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
