"""A chat request's tools, from its fields to its prompt, its grammar and its answer.

`plan_tools` reads `tools`, `tool_choice` and `parallel_tool_calls` (OpenAI's shapes) into a
`ToolPlan`, or refuses them (`ToolRequestError`, a 400 naming the field). The plan then gives:

- the prompt: `prompt_messages` renders tools with the model's own chat template when the
  template uses `tools` (they are passed to it as `tools=`, the conversation's `tool_calls` and
  `role: "tool"` messages as Hugging Face templates expect them); otherwise the generic
  rendering of render.py (a system message describing the functions and the call format, the
  calls and results as text);
- the grammar (grammar.py): `required` and a named function force calls whose arguments
  validate against the function's parameters (a named function: exactly one call, as OpenAI
  and vLLM answer it); `auto` leaves text free and constrains a call
  once its start tag is written; `none` adds nothing (the model answers in text);
- the answer: `answer` parses an output into content and OpenAI `tool_calls` (ids `call_...`),
  and `stream` turns a stream of text deltas into OpenAI's `delta.content` /
  `delta.tool_calls` pieces. A call that does not parse stays text, never an error; a call of
  a function the request did not offer also stays text (only `auto` can write one: a forced
  call is valid by construction).

`plan_functions` reads OpenAI's deprecated `functions` and `function_call` into the same plan
(a function is a tool of type function, `{"name": ...}` a named choice), with `functions` set:
one call at most, answered as the message's `function_call` (`function_call` delta pieces when
streamed) and finish_reason "function_call" instead of "tool_calls".

The call format (parsers.py) is the `--tool-call-parser` setting, or the one detected from the
chat template, or hermes for a template that knows none.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from adapterserve.server.api.tools.grammar import Tool, auto_grammar, forced_call_grammar
from adapterserve.server.api.tools.parsers import (
    ContentDelta,
    ParsedCall,
    StreamEvent,
    StreamParser,
    ToolCallArguments,
    ToolCallStart,
    ToolParser,
    detect_parser,
    get_parser,
)
from adapterserve.server.api.tools.render import (
    generic_tool_system_prompt,
    template_supports_tools,
    tool_messages_to_text,
)
from adapterserve.server.api.tools.strict import StrictSchemaError, strict_schema

DEFAULT_FORMAT = "hermes"  # for a template that names no call format of its own
MAX_TOOLS = 128  # OpenAI's limit on functions per request


class ToolRequestError(ValueError):
    """A request's tools or tool choice cannot be served: a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    tools: list[Tool]
    specs: list[dict[str, Any]]  # the request's tools as sent (for a template's `tools=`)
    mode: str  # "none" | "auto" | "required" | "named"
    name: str | None  # the function a named choice forces
    parallel: bool
    parser: ToolParser
    native: bool = False  # the chat template renders the tools itself
    functions: bool = False  # from the deprecated `functions`: answered as `function_call`

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def grammar(self) -> str | None:
        """Lark text for the grammar sandbox (kind "grammar"), or None (`none`)."""
        if self.mode == "none":
            return None
        if self.forced:
            return forced_call_grammar(self.tools, self.parser.name, self.parallel, self.name)
        return auto_grammar(self.tools, self.parser.name, self.parallel)

    def prompt_messages(
        self, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages for the chat template, its `tools=` argument or None)."""
        if self.native:
            return [_native_message(m) for m in messages], self.specs
        plain = tool_messages_to_text(messages, self.parser.name)
        preamble = generic_tool_system_prompt(self.tools, self.parser.name)
        if plain and plain[0].get("role") in ("system", "developer") and plain[0].get("content"):
            first = dict(plain[0], content=f"{plain[0]['content']}\n\n{preamble}")
            return [first, *plain[1:]], None
        return [{"role": "system", "content": preamble}, *plain], None

    def answer(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, finish_reason) of a whole output."""
        stream = ToolStream(self)
        pieces = stream.feed(text) + stream.finish()
        content = "".join(p["content"] for p in pieces if "content" in p) or None
        calls: dict[int, dict] = {}
        for piece in pieces:
            for delta in piece.get("tool_calls", ()):
                call = calls.setdefault(
                    delta["index"],
                    {
                        "id": delta.get("id"),
                        "type": "function",
                        "function": {"name": "", "arguments": ""},
                    },
                )
                call["function"]["name"] += delta.get("function", {}).get("name") or ""
                call["function"]["arguments"] += delta.get("function", {}).get("arguments") or ""
        tool_calls = [calls[i] for i in sorted(calls)]
        return content, tool_calls, self.finish_reason(bool(tool_calls), finish_reason)

    def finish_reason(self, called: bool, engine_reason: str | None) -> str | None:
        """ "tool_calls" ("function_call" for `functions`) when the model called and stopped by
        itself; OpenAI answers "stop" for a call forced by name. A call cut by the token limit
        says "length"."""
        if not called or engine_reason != "stop" or self.mode == "named":
            return engine_reason
        return "function_call" if self.functions else "tool_calls"

    def stream(self) -> ToolStream:
        """Delta pieces as the request asked for them: `function_call` ones for `functions`."""
        return ToolStream(self, as_function_call=self.functions)


@dataclass
class ToolStream:
    """Text deltas -> OpenAI chat delta pieces: `{"content": ...}` and `{"tool_calls": [...]}`,
    a call's first piece with its id, type and name (arguments ""), then its arguments; with
    `as_function_call`, `{"function_call": {"name": ..., "arguments": ""}}` then
    `{"function_call": {"arguments": ...}}` (the deprecated shape: one call, no id)."""

    plan: ToolPlan
    as_function_call: bool = False
    parser: StreamParser = field(init=False)
    called: bool = False
    _names: dict[int, str] = field(default_factory=dict)  # parser index -> function name
    _index: dict[int, int] = field(default_factory=dict)  # parser index -> OpenAI index
    _held: dict[int, str] = field(default_factory=dict)  # a call of an unknown function

    def __post_init__(self) -> None:
        self.parser = self.plan.parser.stream()
        self._known = {t.name for t in self.plan.tools}

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._pieces(self.parser.feed(text)) if text else []

    def finish(self) -> list[dict[str, Any]]:
        return self._pieces(self.parser.finish())

    def _pieces(self, events: list[StreamEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ContentDelta):
                if event.text:
                    out.append({"content": event.text})
            elif isinstance(event, ToolCallStart):
                if event.name not in self._known:
                    self._held[event.index] = event.name  # not offered: its text goes out
                    continue
                index = self._index[event.index] = len(self._index)
                self.called = True
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call_id(),
                                "type": "function",
                                "function": {"name": event.name, "arguments": ""},
                            }
                        ]
                    }
                )
            elif isinstance(event, ToolCallArguments):
                if event.index in self._held:
                    name = self._held.pop(event.index)
                    key = self.plan.parser.arguments_key
                    text = json.dumps(
                        {"name": name, key: json.loads(event.text or "{}")}, ensure_ascii=False
                    )
                    out.append({"content": text})
                    continue
                index = self._index[event.index]
                out.append(
                    {"tool_calls": [{"index": index, "function": {"arguments": event.text}}]}
                )
        return [_as_function_call(p) for p in out] if self.as_function_call else out


def _as_function_call(piece: dict[str, Any]) -> dict[str, Any]:
    """A `tool_calls` piece of the one call `functions` allow as a `function_call` piece."""
    if "tool_calls" not in piece:
        return piece
    function = piece["tool_calls"][0]["function"]
    return {"function_call": {k: v for k, v in function.items() if v is not None}}


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    chat_template: str | None,
    call_format: str | None = None,
    functions: bool = False,
) -> ToolPlan | None:
    """The request's tool plan (module docstring), None when it has no tools. `functions`:
    the tools came from the deprecated `functions` (plan_functions), and errors name it."""
    listed, choice = ("functions", "function_call") if functions else ("tools", "tool_choice")
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolRequestError(f"'{choice}' is only allowed when '{listed}' are given.", choice)
        return None
    if len(tools) > MAX_TOOLS:
        raise ToolRequestError(f"At most {MAX_TOOLS} {listed}, got {len(tools)}.", listed)
    parsed = []
    for i, spec in enumerate(tools):
        tool = Tool.from_openai(spec)
        if tool.strict:
            try:
                strict_schema(tool.parameters)
            except StrictSchemaError as exc:
                where = f"functions[{i}]" if functions else f"tools[{i}].function"
                raise ToolRequestError(f"{where}.parameters: {exc}", listed) from None
        parsed.append(tool)
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ToolRequestError(
            f"Two {listed} are named {dup!r}; function names must be unique.", listed
        )
    mode, name = _choice(tool_choice, names, listed, choice)
    if call_format:
        parser = get_parser(call_format)
    else:
        parser = detect_parser(chat_template) or get_parser(DEFAULT_FORMAT)
    return ToolPlan(
        parsed,
        [dict(t) for t in tools],
        mode,
        name,
        parallel=parallel_tool_calls is not False and mode != "named" and not functions,
        parser=parser,
        native=template_supports_tools(chat_template),
        functions=functions,
    )


def plan_functions(
    functions: list[dict[str, Any]] | None,
    function_call: str | dict[str, Any] | None,
    with_tools: bool,
    chat_template: str | None,
    call_format: str | None = None,
) -> ToolPlan | None:
    """The plan of OpenAI's deprecated `functions` and `function_call` (module docstring), None
    when it has no functions; `with_tools`: the request also has `tools` (a 400)."""
    if functions and with_tools:
        raise ToolRequestError("Give 'tools' or the deprecated 'functions', not both.", "functions")
    tools = [{"type": "function", "function": f} for f in functions or ()]
    if isinstance(function_call, dict):
        function_call = {"type": "function", "function": {"name": function_call["name"]}}
    return plan_tools(tools, function_call, False, chat_template, call_format, functions=True)


def _choice(
    tool_choice: str | dict[str, Any] | None, names: list[str], listed: str, param: str
) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        return tool_choice, None
    name = tool_choice["function"]["name"]
    if name not in names:
        raise ToolRequestError(
            f"{param} names the function {name!r}, which is not in '{listed}' "
            f"({', '.join(map(repr, names))}).",
            param,
        )
    return "named", name


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as Hugging Face chat templates take tool calls: arguments as objects."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    native = []
    for call in calls:
        function = dict(call["function"])
        with contextlib.suppress(ValueError):  # else the client's text as it is
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        native.append({**call, "function": function})
    return {**message, "tool_calls": native}


def parsed_calls(tool_calls: list[dict[str, Any]]) -> list[ParsedCall]:
    """OpenAI tool_calls back as the parser's calls (for tests and the Responses API)."""
    return [ParsedCall(c["function"]["name"], c["function"]["arguments"]) for c in tool_calls]
