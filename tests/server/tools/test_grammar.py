"""server/api/tools/grammar.py: the grammars compile with llguidance against a tiny byte-level
tokenizer built offline, accept valid call texts and reject wrong names, missing required keys,
extra keys under strict, and malformed calls once the start tag is out."""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import pytest
from tokenizers import Tokenizer

from adapterserve.server.api.tools.grammar import Tool, auto_grammar, forced_call_grammar
from adapterserve.server.api.tools.parsers import get_parser
from tests.helpers import make_tokenizer

WEATHER = Tool(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
    "Weather of a city",
)
ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string"},
        "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
    },
    "$defs": {"Zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
}
SEND = Tool(
    "send",
    {
        "type": "object",
        "properties": {"to": ADDRESS, "zip": {"$ref": "#/$defs/Zip"}},
        "$defs": {"Zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
    },
    strict=True,
)
TOOLS = [WEATHER, SEND]


class Checker:
    def __init__(self, directory: Path) -> None:
        vocab = make_tokenizer(directory)
        self.hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
        eos = self.hf.token_to_id("<|im_end|>")
        self.tokenizer = llguidance.LLTokenizer(self.hf.to_str(), n_vocab=vocab, eos_token=eos)

    def compile(self, lark: str) -> str:
        grammar = llguidance.grammar_from("grammar", lark)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer
        )
        assert not failed, messages
        return grammar

    def accepts(self, grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        matcher.consume_tokens(self.hf.encode(text).ids)
        return not matcher.is_error() and matcher.is_accepting()


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Checker:
    return Checker(tmp_path_factory.mktemp("tokenizer"))


def call_json(name: str, arguments: dict, key: str = "arguments") -> str:
    return json.dumps({"name": name, key: arguments}, ensure_ascii=False)


def hermes(*calls: str) -> str:
    return "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in calls)


WEATHER_CALL = call_json("get_weather", {"city": "Paris", "unit": "c"})
INNER = {"to": {"street": "B", "next": None}, "zip": "54321"}  # `#` recurses to the parameters
SEND_CALL = call_json("send", {"to": {"street": "Main", "next": INNER}, "zip": "12345"})
BAD_CALLS = {
    "wrong name": call_json("get_wether", {"city": "Paris"}),
    "missing required key": call_json("get_weather", {"unit": "c"}),
    "extra key under strict": call_json(
        "send", {"to": {"street": "M", "next": None}, "zip": "12345", "x": 1}
    ),
    "strict: all keys required": call_json("send", {"to": {"street": "M", "next": None}}),
    "strict nested extra key": call_json(
        "send", {"to": {"street": "M", "next": None, "y": 2}, "zip": "12345"}
    ),
    "pattern of a $defs ref": call_json("send", {"to": {"street": "M", "next": None}, "zip": "12"}),
    "wrong enum value": call_json("get_weather", {"city": "Paris", "unit": "k"}),
}


def test_forced_hermes_accepts_calls_and_rejects_invalid_ones(checker: Checker):
    single = checker.compile(forced_call_grammar(TOOLS, "hermes"))
    parallel = checker.compile(forced_call_grammar(TOOLS, "hermes", parallel=True))
    for grammar in (single, parallel):
        assert checker.accepts(grammar, hermes(WEATHER_CALL))
        assert checker.accepts(grammar, hermes(SEND_CALL) + "\n")
        assert not checker.accepts(grammar, "Sure, let me check.")
        assert not checker.accepts(grammar, "")
        for why, bad in BAD_CALLS.items():
            assert not checker.accepts(grammar, hermes(bad)), why
    assert checker.accepts(parallel, hermes(WEATHER_CALL, SEND_CALL, WEATHER_CALL))
    assert not checker.accepts(single, hermes(WEATHER_CALL, SEND_CALL))
    assert not checker.accepts(parallel, hermes(WEATHER_CALL, BAD_CALLS["wrong name"]))


def test_forced_named_function_allows_only_that_one(checker: Checker):
    grammar = checker.compile(forced_call_grammar(TOOLS, "hermes", name="send"))
    assert checker.accepts(grammar, hermes(SEND_CALL))
    assert not checker.accepts(grammar, hermes(WEATHER_CALL))
    with pytest.raises(ValueError, match="'nope', which is not among the tools"):
        forced_call_grammar(TOOLS, "hermes", name="nope")


def test_forced_llama3_json_and_mistral(checker: Checker):
    weather = call_json("get_weather", {"city": "Paris"}, "parameters")
    send = call_json("send", {"to": {"street": "M", "next": None}, "zip": "12345"}, "parameters")
    llama = checker.compile(forced_call_grammar(TOOLS, "llama3_json", parallel=True))
    assert checker.accepts(llama, f"{weather}; {send}")
    assert not checker.accepts(llama, WEATHER_CALL)  # "arguments" is not llama's key
    assert not checker.accepts(llama, "text")
    single = checker.compile(forced_call_grammar(TOOLS, "llama3_json"))
    assert checker.accepts(single, weather) and not checker.accepts(single, f"{weather}; {send}")
    mistral = checker.compile(forced_call_grammar(TOOLS, "mistral", parallel=True))
    assert checker.accepts(mistral, f"[TOOL_CALLS] [{WEATHER_CALL}, {SEND_CALL}]")
    for why, bad in BAD_CALLS.items():
        assert not checker.accepts(mistral, f"[TOOL_CALLS] [{bad}]"), why


def test_auto_hermes_free_text_or_constrained_calls(checker: Checker):
    grammar = checker.compile(auto_grammar(TOOLS, "hermes", parallel=True))
    assert checker.accepts(grammar, "")
    assert checker.accepts(grammar, "The weather is fine. {not a call}")
    assert checker.accepts(grammar, hermes(WEATHER_CALL))
    assert checker.accepts(grammar, "Let me look.\n" + hermes(WEATHER_CALL, SEND_CALL))
    assert not checker.accepts(grammar, "Let me look.\n<tool_call>\nnot json\n</tool_call>")
    for why, bad in BAD_CALLS.items():
        assert not checker.accepts(grammar, "ok " + hermes(bad)), why


def test_auto_llama3_json_and_mistral(checker: Checker):
    weather = call_json("get_weather", {"city": "Paris"}, "parameters")
    llama = checker.compile(auto_grammar(TOOLS, "llama3_json"))
    assert checker.accepts(llama, "Paris is sunny.")
    assert checker.accepts(llama, weather)
    assert not checker.accepts(llama, call_json("get_wether", {"city": "Paris"}, "parameters"))
    mistral = checker.compile(auto_grammar(TOOLS, "mistral"))
    assert checker.accepts(mistral, "No call needed.")
    assert checker.accepts(mistral, f"Checking. [TOOL_CALLS] [{WEATHER_CALL}]")
    assert not checker.accepts(mistral, f"[TOOL_CALLS] [{BAD_CALLS['wrong name']}]")


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_what_the_grammar_accepts_the_parser_reads_back(checker: Checker, fmt: str):
    """The grammar's JSON style is one the parser takes: a forced output parses to its calls."""
    key = get_parser(fmt).arguments_key
    weather = call_json("get_weather", {"city": "Paris"}, key)
    text = {
        "hermes": hermes(weather),
        "llama3_json": weather,
        "mistral": f"[TOOL_CALLS] [{weather}]",
    }[fmt]
    assert checker.accepts(checker.compile(forced_call_grammar(TOOLS, fmt)), text)
    parsed = get_parser(fmt).parse(text)
    assert [(c.name, json.loads(c.arguments_json)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_tool_from_openai_and_errors():
    tool = Tool.from_openai({"type": "function", "function": {"name": "f", "strict": True}})
    assert tool == Tool("f", {"type": "object", "properties": {}}, "", True)
    with pytest.raises(ValueError, match="no tools"):
        forced_call_grammar([], "hermes")
    with pytest.raises(ValueError, match="parser 'xml'"):
        forced_call_grammar([tool], "xml")
