"""llguidance grammars (Lark text, compiled as kind "grammar": `llguidance.grammar_from("grammar",
text)`, server/engine/grammar_worker.py) that make a model's output tool calls in a format of
parsers.py:

- `forced_call_grammar` (tool_choice "required" or a named function): every accepted output is
  one call, or one or more when `parallel`, of the given tools (only `name` when given);
- `auto_grammar` (tool_choice "auto"): free text, or calls once the format's start tag is
  written. It uses llguidance's lazy lexemes: `head[lazy]: TEXT "<tool_call>"` ends at the first
  start tag, and a lazy lexeme wins over the greedy free-text branch as soon as it matches, so
  once the tag is out the call is constrained; without the tag the text is free (llguidance
  docs/syntax.md, "Lazy lexemes" and "Tool calling"). llama3_json has no text tag (its
  `<|python_tag|>` is a special token): its calls are a bare JSON object opening the output, so
  free text there is text that does not open with `{` (nor whitespace).

Each call's JSON is embedded with `%json {...}`: {"name": const, "arguments": the function's
parameters schema} ("parameters" for llama3_json), with OpenAI's strict rules applied first when
the tool is strict (strict.py). The parameters' `$defs`/`definitions` move up to the call's root so
that their `#/$defs/...` references still resolve; a recursive `#` reference becomes
`#/properties/arguments`. JSON is written the way chat templates render it (`tojson`): ", "
between items and ": " after keys, no other whitespace.

A start tag that is one special token of the model's vocabulary (`[TOOL_CALLS]` in Mistral's v3
tokenizers) is written here as its text; such a model needs `<[token id]>` in its place (not done).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from adapterserve.server.api.tools.parsers import get_parser
from adapterserve.server.api.tools.strict import strict_schema

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    """One function of a request's `tools`."""

    name: str
    parameters: dict[str, Any]
    description: str = ""
    strict: bool = False

    @classmethod
    def from_openai(cls, tool: dict[str, Any]) -> Tool:
        """From `{"type": "function", "function": {...}}` or the bare function object."""
        function = tool.get("function", tool)
        return cls(
            name=function["name"],
            parameters=function.get("parameters") or {"type": "object", "properties": {}},
            description=function.get("description") or "",
            strict=bool(function.get("strict")),
        )


def call_schema(tool: Tool, arguments_key: str = "arguments") -> dict[str, Any]:
    """The JSON schema of one call's object: {"name": <const>, arguments_key: <parameters>}."""
    parameters = strict_schema(tool.parameters) if tool.strict else copy.deepcopy(tool.parameters)
    hoisted = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
    _rewrite_root_refs(parameters, f"#/properties/{arguments_key}")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        **{
            key: _rewrite_root_refs(value, f"#/properties/{arguments_key}")
            for key, value in hoisted.items()
        },
        "x-guidance": JSON_STYLE,
    }


def _rewrite_root_refs(node: Any, root: str) -> Any:
    """`{"$ref": "#"}` (recursion to the parameters' root) -> `{"$ref": root}`, in place."""
    if isinstance(node, dict):
        if node.get("$ref") == "#":
            node["$ref"] = root
        for value in node.values():
            _rewrite_root_refs(value, root)
    elif isinstance(node, list):
        for value in node:
            _rewrite_root_refs(value, root)
    return node


def _choose(tools: list[Tool], name: str | None) -> list[Tool]:
    if not tools:
        raise ValueError("no tools to call")
    if name is None:
        return tools
    chosen = [tool for tool in tools if tool.name == name]
    if not chosen:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return chosen


def _call_rules(tools: list[Tool], fmt: str) -> list[str]:
    """`call: call_0 | call_1 ...` and one `%json` rule per tool."""
    key = get_parser(fmt).arguments_key
    rules = ["call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    rules += [f"call_{i}: %json {json.dumps(call_schema(t, key))}" for i, t in enumerate(tools)]
    return rules


def _calls_rules(fmt: str, parallel: bool) -> list[str]:
    """`calls`: one call (one or more when `parallel`) as written after the start tag."""
    if fmt == "hermes":
        more = ' ("\\n<tool_call>\\n" call "\\n</tool_call>")*' if parallel else ""
        return [f'calls: "\\n" call "\\n</tool_call>"{more} "\\n"?']
    if fmt == "llama3_json":
        return ["calls: call" + (' ("; " call)*' if parallel else "")]
    if fmt == "mistral":
        return ['calls: " "? "[" call' + (' (", " call)*' if parallel else "") + ' "]"']
    raise ValueError(f"no grammar for tool-call format {fmt!r}")


def forced_call_grammar(
    tools: list[Tool], fmt: str, parallel: bool = False, name: str | None = None
) -> str:
    """Lark text whose every output is a call (several if `parallel`) in format `fmt`, of
    `name` if given, else of any of `tools`, with arguments valid for that function."""
    tag = "" if fmt == "llama3_json" else json.dumps(get_parser(fmt).start_tag) + " "
    lines = [f"start: {tag}calls", *_calls_rules(fmt, parallel)]
    return "\n".join(lines + _call_rules(_choose(tools, name), fmt)) + "\n"


def auto_grammar(tools: list[Tool], fmt: str, parallel: bool = False) -> str:
    """Lark text for tool_choice "auto": free text, or text then calls once the start tag is
    written (module docstring)."""
    if fmt == "llama3_json":
        start = ["start: TEXT | calls", r"TEXT: /([^{\s](?s:.*))?/"]
    else:
        tag = json.dumps(get_parser(fmt).start_tag)
        start = ["start: TEXT | head calls", r"TEXT: /(?s:.*)/", f"head[lazy]: TEXT {tag}"]
    return (
        "\n".join(start + _calls_rules(fmt, parallel) + _call_rules(_choose(tools, None), fmt))
        + "\n"
    )
