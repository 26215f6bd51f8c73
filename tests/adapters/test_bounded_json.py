"""json_depth reads nesting as json.loads would, without recursing; parse_json refuses deeper."""

from __future__ import annotations

import json

import pytest

from adapterserve.adapters.formats.bounded_json import MAX_JSON_DEPTH, json_depth, parse_json
from adapterserve.adapters.spec import AdapterFormatError


def reference_depth(value: object) -> int:
    """Containers on the deepest path of a parsed value (walked iteratively)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            items = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in items)
        deepest = max(deepest, depth)
    return deepest


TEXTS = [
    "1",
    '"text"',
    "[]",
    "{}",
    '{"a": 1}',
    "[[], [[]], {}]",
    '[{"a": [{"b": []}]}]',
    r'{"a": "[[[\"]]]"}',
    r'["\\", [1]]',
    r'["\\\"[[", [[]]]',
    r'{"k\"[{": [[]]}',
    r'["\\\\\\\"", {"x": [[[]]]}]',
    '"[[["',
    '["]]]]", [["{{"]]]',
    r'{"\u005b": "\u005d"}',
    json.dumps({"s": "\\" * 7 + '"' + "[" * 9, "t": [[["]"]]]}),
]


@pytest.mark.parametrize("text", TEXTS)
def test_depth_agrees_with_the_parsed_value(text: str):
    assert json_depth(text.encode()) == reference_depth(json.loads(text))


def test_parse_json_refuses_deeper_than_the_limit_naming_it():
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert reference_depth(parse_json(at_limit.encode(), "p", "what")) == MAX_JSON_DEPTH
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        with pytest.raises(AdapterFormatError) as caught:
            parse_json(("[" * depth + "]" * depth).encode(), "p", "what")
        assert caught.value.param == "p"
        assert (
            str(caught.value) == f"what: expected JSON nested at most 64 levels deep, got {depth}"
        )


@pytest.mark.parametrize("raw", [b"{'a': 1", b"\xff\xfe", b'["unterminated', b"[1,]"])
def test_parse_json_refuses_what_is_not_json(raw: bytes):
    with pytest.raises(AdapterFormatError) as caught:
        parse_json(raw, "p", "what")
    assert str(caught.value).startswith("what: not valid JSON: ")
