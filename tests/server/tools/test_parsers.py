"""server/api/tools/parsers.py: whole and streamed parsing agree (char by char, random chunks),
several calls, text before a call, malformed calls come back as content, names unchecked."""

from __future__ import annotations

import json
import random

import pytest

from adapterserve.server.api.tools.parsers import (
    PARSERS,
    ContentDelta,
    ParsedCall,
    ParsedOutput,
    ToolCallArguments,
    ToolCallStart,
    collect,
    detect_parser,
    get_parser,
)

WEATHER = ParsedCall("get_weather", '{"city":"Paris \\"16e\\"","unit":"c"}')
TIME = ParsedCall("get_time", '{"zone":"日本"}')

# (format, text, expected): what the model wrote and what it means
CASES = [
    ("hermes", "Hello there.", ParsedOutput("Hello there.", [])),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"16e\\"", "unit": "c"}}\n</tool_call>',
        ParsedOutput(None, [WEATHER]),
    ),
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"16e\\"", "unit": "c"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"日本\\"}"}\n</tool_call>\n',
        ParsedOutput("Let me look.", [WEATHER, TIME]),
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_time", "arguments": {"zone": "日本"}}',  # no end tag at the end
        ParsedOutput(None, [TIME]),
    ),
    ("hermes", "a <tool_c", ParsedOutput("a <tool_c", [])),
    (
        "hermes",
        "1 < 2 <tool_call>\n{not json}\n</tool_call> ok",
        ParsedOutput("1 < 2 <tool_call>\n{not json}\n</tool_call> ok", []),
    ),
    (
        "hermes",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name: not a call
        ParsedOutput('<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "x", "arguments": {}}\ntrailing',  # no end tag, more text
        ParsedOutput('<tool_call>\n{"name": "x", "arguments": {}}\ntrailing', []),
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "nope", "arguments": {"a": [1, {"b": "}"}]}}\n</tool_call>',
        ParsedOutput(None, [ParsedCall("nope", '{"a":[1,{"b":"}"}]}')]),
    ),
    (
        "llama3_json",
        ' {"name": "get_weather", "parameters": {"city": "Paris \\"16e\\"", "unit": "c"}}; {"name": "get_time", "parameters": {"zone": "日本"}}',
        ParsedOutput(None, [WEATHER, TIME]),
    ),
    (
        "llama3_json",
        'Sure.<|python_tag|>{"name": "get_time", "parameters": {"zone": "日本"}};',
        ParsedOutput("Sure.", [TIME]),
    ),
    ("llama3_json", "The answer is {x}.", ParsedOutput("The answer is {x}.", [])),
    ("llama3_json", '{"name": "get_time"', ParsedOutput('{"name": "get_time"', [])),  # cut off
    (
        "llama3_json",
        '{"name": "get_time", "parameters": {"zone": "日本"}}; {broken',
        ParsedOutput("; {broken", [TIME]),
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris \\"16e\\"", "unit": "c"}}, {"name": "get_time", "arguments": {"zone": "日本"}}]',
        ParsedOutput(None, [WEATHER, TIME]),
    ),
    (
        "mistral",
        'Checking. [TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "日本"}}]',
        ParsedOutput("Checking.", [TIME]),
    ),
    ("mistral", "[TOOL_CALLS] [1, 2]", ParsedOutput("[TOOL_CALLS] [1, 2]", [])),
    ("mistral", "[TOOL_CALLS", ParsedOutput("[TOOL_CALLS", [])),
]


def streamed(fmt: str, chunks: list[str]) -> list:
    stream = get_parser(fmt).stream()
    events = [event for chunk in chunks for event in stream.feed(chunk)]
    return events + stream.finish()


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("fmt,text,expected", CASES)
def test_whole_parse(fmt: str, text: str, expected: ParsedOutput):
    assert get_parser(fmt).parse(text) == expected


@pytest.mark.parametrize("fmt,text,expected", CASES)
def test_streamed_char_by_char_and_in_random_chunks_equal_whole(fmt, text, expected):
    assert collect(streamed(fmt, list(text))) == expected
    rng = random.Random(text)
    for _ in range(20):
        assert collect(streamed(fmt, random_chunks(text, rng))) == expected


@pytest.mark.parametrize("fmt,text,expected", CASES)
def test_arguments_are_the_compact_json_of_what_was_parsed(fmt, text, expected):
    for call in expected.calls:
        value = json.loads(call.arguments_json)
        assert call.arguments_json == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_stream_event_order_and_held_tag_prefix():
    stream = get_parser("hermes").stream()
    assert stream.feed("Hi <tool") == [ContentDelta("Hi")]  # the possible tag is held back
    assert stream.feed("_call>\n") == []
    assert stream.feed('{"name": "f", "arguments": {"a": 1}}') == []  # held until decided
    assert stream.feed("\n</tool_call>") == [ToolCallStart(0, "f"), ToolCallArguments(0, '{"a":1}')]
    assert stream.feed("\n<tool_call>\n") == []
    assert stream.feed('{"name": "g", "arguments": {}}\n</tool_call>') == [
        ToolCallStart(1, "g"),
        ToolCallArguments(1, "{}"),
    ]
    assert stream.finish() == []


def test_stream_releases_a_false_tag_prefix_as_soon_as_it_is_decided():
    stream = get_parser("hermes").stream()
    assert stream.feed("a <tool") == [ContentDelta("a")]
    assert stream.feed("s and more") == [ContentDelta(" <tools and more")]
    assert stream.finish() == []


def test_unfinished_call_at_the_end_is_content():
    stream = get_parser("hermes").stream()
    assert stream.feed('Hi\n<tool_call>\n{"name": "f", "argu') == [ContentDelta("Hi")]
    assert collect(stream.finish()).content == '\n<tool_call>\n{"name": "f", "argu'


def test_registry_and_detection():
    assert PARSERS == ("hermes", "llama3_json", "mistral")
    assert all(get_parser(name).name == name for name in PARSERS)
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        get_parser("nope")
    qwen = "{%- if tools %}...<tool_call>\\n{{ tool_call | tojson }}\\n</tool_call>{%- endif %}"
    llama31 = "{%- if tools %}<|python_tag|>{{ call }}<|eom_id|>{%- endif %}"
    llama32 = '<|start_header_id|>Respond as {"name": function name, "parameters": {...}}'
    mistral = "{%- if message.tool_calls %}[TOOL_CALLS] [{{ calls }}]{%- endif %}"
    assert detect_parser(qwen).name == "hermes"
    assert detect_parser(llama31).name == "llama3_json"
    assert detect_parser(llama32).name == "llama3_json"
    assert detect_parser(mistral).name == "mistral"
    assert detect_parser("{{ messages }}") is None
    assert detect_parser(None) is None
