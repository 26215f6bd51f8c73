"""A chat request's tool plan (server/api/tools/calls.py): refusals, the answer read back from
an output (whole and streamed, equal), and the prompt for templates with and without tools;
OpenAI's deprecated functions and function_call as the same plan."""

from __future__ import annotations

import json
import random

import pytest

from adapterserve.server.api.tools.calls import ToolRequestError, plan_functions, plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NATIVE_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"


def plan(choice=None, tools=(WEATHER, TIME), template=None, parallel=None):
    return plan_tools(list(tools), choice, parallel, template)


@pytest.mark.parametrize(
    ("tools", "choice", "param", "words"),
    [
        ([], "required", "tool_choice", "only allowed"),
        (None, {"type": "function", "function": {"name": "x"}}, "tool_choice", "only allowed"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "'nope'"),
        ([WEATHER, WEATHER], None, "tools", "unique"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "strict": True,
                        "parameters": {"type": "object", "patternProperties": {"a": {}}},
                    },
                }
            ],
            None,
            "tools",
            "patternProperties",
        ),
        ([TIME] * 129, None, "tools", "128"),
    ],
)
def test_refusals_name_the_field(tools, choice, param, words) -> None:
    with pytest.raises(ToolRequestError) as caught:
        plan_tools(tools, choice, None, None)
    assert caught.value.param == param and words in caught.value.message


def test_no_tools_no_plan() -> None:
    assert plan_tools(None, None, None, None) is None
    assert plan_tools([], "none", None, None) is None


def test_modes_and_grammars() -> None:
    assert plan().mode == "auto" and plan().grammar() is not None
    assert plan("none").grammar() is None
    required = plan("required")
    assert required.forced and required.parallel and "get_time" in required.grammar()
    named = plan({"type": "function", "function": {"name": "get_weather"}}, parallel=False)
    assert named.mode == "named" and named.name == "get_weather" and not named.parallel
    assert "get_time" not in named.grammar()


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("text", "choice", "reason", "content", "calls", "finish"),
    [
        (CALL, None, "stop", None, [("get_weather", {"city": "Paris"})], "tool_calls"),
        (
            "Sure. " + CALL,
            None,
            "stop",
            "Sure.",
            [("get_weather", {"city": "Paris"})],
            "tool_calls",
        ),
        (
            CALL
            + "\n"
            + CALL.replace("get_weather", "get_time").replace('{"city": "Paris"}', "{}"),
            "required",
            "stop",
            None,
            [("get_weather", {"city": "Paris"}), ("get_time", {})],
            "tool_calls",
        ),
        (
            CALL,
            {"type": "function", "function": {"name": "get_weather"}},
            "stop",
            None,
            [("get_weather", {"city": "Paris"})],
            "stop",
        ),  # OpenAI: a named call stops
        ("just text", None, "stop", "just text", [], "stop"),
        (CALL[:30], None, "length", CALL[:30], [], "length"),  # cut off: stays text
        (
            "<tool_call>\n{not json}\n</tool_call>",
            None,
            "stop",
            "<tool_call>\n{not json}\n</tool_call>",
            [],
            "stop",
        ),
        (CALL.replace("get_weather", "rm_rf"), None, "stop", None, [], "stop"),  # not offered: text
    ],
)
def test_answers_whole_and_streamed_agree(text, choice, reason, content, calls, finish) -> None:
    tool_plan = plan(choice)
    got_content, tool_calls, got_finish = tool_plan.answer(text, reason)
    if "rm_rf" in text:
        assert got_content and "rm_rf" in got_content and json.loads(got_content)["name"] == "rm_rf"
    else:
        assert got_content == content
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls
    ] == calls
    assert got_finish == finish
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in tool_calls)
    assert len({c["id"] for c in tool_calls}) == len(tool_calls)
    # streamed in random chunks: the OpenAI deltas reassemble to the same answer
    rng = random.Random(len(text))
    for _ in range(5):
        stream, pieces, i = tool_plan.stream(), [], 0
        while i < len(text):
            j = i + rng.randint(1, 7)
            pieces += stream.feed(text[i:j])
            i = j
        pieces += stream.finish()
        streamed_content = "".join(p.get("content", "") for p in pieces) or None
        assert (streamed_content is None) == (got_content is None)
        assembled: dict[int, dict] = {}
        for p in pieces:
            for d in p.get("tool_calls", ()):
                if "id" in d:  # the first delta of a call: id, type, name, "" arguments
                    assert d["type"] == "function" and d["function"]["arguments"] == ""
                    assembled[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
                else:
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                    assembled[d["index"]]["arguments"] += d["function"]["arguments"]
        assert [
            (c["name"], json.loads(c["arguments"])) for _, c in sorted(assembled.items())
        ] == calls


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]


def test_a_template_without_tools_gets_the_generic_rendering() -> None:
    messages, tools = plan().prompt_messages(HISTORY)
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert "get_weather" in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert (
        messages[3]["role"] == "user"
        and "<tool_response>\n18C\n</tool_response>" in messages[3]["content"]
    )
    no_system, _ = plan().prompt_messages(HISTORY[1:])
    assert no_system[0]["role"] == "system" and "get_weather" in no_system[0]["content"]


def test_a_template_with_tools_gets_them_as_they_came() -> None:
    tool_plan = plan(template=NATIVE_TEMPLATE)
    messages, tools = tool_plan.prompt_messages(HISTORY)
    assert tools == [WEATHER, TIME]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[3] == HISTORY[3] and messages[0] == HISTORY[0]


FUNCTIONS = [WEATHER["function"], TIME["function"]]


@pytest.mark.parametrize(
    ("functions", "function_call", "with_tools", "param", "words"),
    [
        (FUNCTIONS, None, True, "functions", "not both"),
        (None, "auto", False, "function_call", "only allowed when 'functions'"),
        ([], {"name": "get_time"}, True, "function_call", "only allowed when 'functions'"),
        (FUNCTIONS, {"name": "nope"}, False, "function_call", "'nope'"),
        ([TIME["function"]] * 2, None, False, "functions", "unique"),
    ],
)
def test_function_refusals_name_the_field(functions, function_call, with_tools, param, words):
    with pytest.raises(ToolRequestError) as caught:
        plan_functions(functions, function_call, with_tools, None)
    assert caught.value.param == param and words in caught.value.message


def test_functions_plan_as_tools_with_one_call() -> None:
    assert plan_functions(None, None, True, None) is None
    assert plan_functions([], "none", False, None) is None
    auto = plan_functions(FUNCTIONS, None, False, None)
    assert auto.mode == "auto" and auto.functions and not auto.parallel
    assert [t.name for t in auto.tools] == ["get_weather", "get_time"]
    assert plan_functions(FUNCTIONS, "none", False, None).grammar() is None
    named = plan_functions(FUNCTIONS, {"name": "get_time"}, False, NATIVE_TEMPLATE)
    assert named.mode == "named" and named.name == "get_time" and named.native
    assert named.specs == [WEATHER, TIME]  # a template's `tools=`: as tools came
    assert "get_weather" not in named.grammar()


@pytest.mark.parametrize(
    ("choice", "finish"), [(None, "function_call"), ({"name": "get_weather"}, "stop")]
)
def test_functions_answer_as_function_call_whole_and_streamed(choice, finish) -> None:
    tool_plan = plan_functions(FUNCTIONS, choice, False, None)
    content, calls, reason = tool_plan.answer(CALL, "stop")
    assert content is None and reason == finish and len(calls) == 1
    assert tool_plan.answer(CALL, "length")[2] == "length"
    stream = tool_plan.stream()
    pieces = [p for i in range(0, len(CALL), 5) for p in stream.feed(CALL[i : i + 5])]
    pieces += stream.finish()
    assert pieces[0] == {"function_call": {"name": "get_weather", "arguments": ""}}
    assert all(set(p) == {"function_call"} for p in pieces)
    assert all(set(p["function_call"]) == {"arguments"} for p in pieces[1:])
    arguments = "".join(p["function_call"]["arguments"] for p in pieces)
    assert json.loads(arguments) == json.loads(calls[0]["function"]["arguments"])
