"""Tool calls out of a model's text, for the formats models are trained on:

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (one block per call)
    llama3_json  <|python_tag|>{"name": "f", "parameters": {...}}; {...}   (or a bare `{` first)
    mistral      [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]

`get_parser(name).parse(text)` splits a whole output into content and calls;
`.stream()` gives a StreamParser that does the same incrementally, as OpenAI streams tool calls:
text before a start tag streams as content; a possible start tag (a prefix of it at the end of
what came) is held back until decided; a call is emitted only once its JSON is complete, as a
ToolCallStart (index, name) then one ToolCallArguments holding the whole arguments string. So a
call that turns out malformed was never partly emitted: its text (the tag included) goes out
as content. `parse` is the stream parser fed the whole text, so both always agree.

`arguments_json` is the parsed arguments re-serialized compactly,
`json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))` (a model's `arguments` given as
a JSON string holding an object is accepted too). Missing arguments are `{}`.
Whitespace that only separates content from calls is dropped (the "\\n" before a tag, the
trailing newline after the last call); everything else of the text is content.
Tool names are not checked here: the caller validates them against the request's tools.

A start tag that is one special token in a model's vocabulary (`<|python_tag|>`, `[TOOL_CALLS]`)
reaches these parsers only if the detokenizer keeps special tokens in the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # None when there is no text besides the calls
    calls: list[ParsedCall]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    text: str  # a fragment of the call's arguments JSON string


StreamEvent = ContentDelta | ToolCallStart | ToolCallArguments


@dataclass(frozen=True)
class _Scan:
    """What a format made of the text after its start tag: `calls` from `region[:consumed]`,
    or `calls=None` when it is not a call (the tag is content). None instead: need more text."""

    consumed: int
    calls: list[ParsedCall] | None


FAILED = _Scan(0, None)


class ToolParser:
    """One tool-call format. Subclasses set the class attributes and `scan`."""

    name: str = ""
    start_tag: str = ""
    bare_json_start: bool = False  # a `{` opening the whole output starts calls, without a tag
    arguments_key: str = "arguments"

    def detect(self, chat_template: str) -> bool:
        """Whether a chat template's text renders tool calls in this format."""
        return self.start_tag in chat_template

    def scan(self, region: str, final: bool) -> _Scan | None:
        """The calls at the start of `region` (the text after the start tag); None: not decided
        yet (never when `final`, the end of the output)."""
        raise NotImplementedError

    def parse(self, text: str) -> ParsedOutput:
        stream = self.stream()
        return collect(stream.feed(text) + stream.finish())

    def stream(self) -> StreamParser:
        return StreamParser(self)

    def call(self, value: Any) -> ParsedCall | None:
        """A call from a decoded JSON value, or None when it is not one."""
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        other = "parameters" if self.arguments_key == "arguments" else "arguments"
        arguments = value.get(self.arguments_key, value.get(other, {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict) or not value["name"]:
            return None
        compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        return ParsedCall(value["name"], compact)


class HermesParser(ToolParser):
    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def scan(self, region: str, final: bool) -> _Scan | None:
        found = json_value(region, 0, final)
        if found is None:
            return None
        if found is FAILED_VALUE:
            return FAILED
        end, value = found
        call = self.call(value)
        if call is None:
            return FAILED
        after = skip_whitespace(region, end)
        if region.startswith(self.end_tag, after):
            return _Scan(after + len(self.end_tag), [call])
        if self.end_tag.startswith(region[after:]):  # the end tag may still come
            return _Scan(end, [call]) if final else None  # a missing end tag at the very end
        return FAILED


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start_tag = "<|python_tag|>"
    bare_json_start = True
    arguments_key = "parameters"

    def detect(self, chat_template: str) -> bool:
        return self.start_tag in chat_template or (
            "<|start_header_id|>" in chat_template and '"parameters"' in chat_template
        )

    def scan(self, region: str, final: bool) -> _Scan | None:
        calls: list[ParsedCall] = []
        position = consumed = 0
        while True:
            found = json_value(region, position, final)
            if found is None:
                return None
            if found is FAILED_VALUE and calls and skip_whitespace(region, position) == len(region):
                return _Scan(len(region), calls)  # a trailing `;` at the very end
            call = None if found is FAILED_VALUE else self.call(found[1])
            if call is None:  # what follows the last `;` is content
                return _Scan(consumed, calls) if calls else FAILED
            calls.append(call)
            consumed = found[0]
            after = skip_whitespace(region, consumed)
            if after == len(region) and not final:
                return None  # a `;` and another call may follow
            if not region.startswith(";", after):
                return _Scan(consumed, calls)
            position = after + 1


class MistralParser(ToolParser):
    name = "mistral"
    start_tag = "[TOOL_CALLS]"

    def scan(self, region: str, final: bool) -> _Scan | None:
        found = json_value(region, 0, final)
        if found is None:
            return None
        if found is FAILED_VALUE:
            return FAILED
        end, value = found
        calls = [self.call(item) for item in (value if isinstance(value, list) else [value])]
        if not calls or None in calls:
            return FAILED
        return _Scan(end, calls)  # type: ignore[arg-type]


FAILED_VALUE = (-1, None)


def skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def json_value(text: str, position: int, final: bool) -> tuple[int, Any] | None:
    """The JSON object or array starting at `position` (after whitespace): (end, value);
    FAILED_VALUE when the text there is not one; None when it is not complete yet."""
    start = skip_whitespace(text, position)
    if start == len(text):
        return FAILED_VALUE if final else None
    if text[start] not in "{[":
        return FAILED_VALUE
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif in_string:
            escaped = char == "\\"
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                try:
                    return index + 1, json.loads(text[start : index + 1])
                except ValueError:
                    return FAILED_VALUE
    return FAILED_VALUE if final else None


class StreamParser:
    """Feed a model's text delta by delta; get content deltas and calls (module docstring)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.buffer = ""  # text not yet emitted: held content, or the region after a tag
        self.in_call = False
        self.tag_text = ""  # the start tag (and the whitespace dropped before it), if not a call
        self.at_start = True
        self.calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        self.buffer += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        events = self._drain(final=True)
        if self.buffer and (self.buffer.strip() or not self.calls):
            events.append(ContentDelta(self.buffer))
        self.buffer = ""
        return events

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while self._call_step(events, final) if self.in_call else self._content_step(events, final):
            pass
        return events

    def _call_step(self, events: list[StreamEvent], final: bool) -> bool:
        scan = self.parser.scan(self.buffer, final)
        if scan is None:
            return False
        self.in_call = False
        if scan.calls is None:  # not a call after all: its tag is content, the rest is rescanned
            events.append(ContentDelta(self.tag_text))
            return True
        for call in scan.calls:
            events += [
                ToolCallStart(self.calls, call.name),
                ToolCallArguments(self.calls, call.arguments_json),
            ]
            self.calls += 1
        self.buffer = self.buffer[scan.consumed :]
        return True

    def _content_step(self, events: list[StreamEvent], final: bool) -> bool:
        text, tag = self.buffer, self.parser.start_tag
        if self.at_start and self.parser.bare_json_start:
            stripped = text.lstrip()
            if not stripped:
                return False
            self.at_start = False
            if stripped.startswith("{"):
                return self._enter_call(text[: len(text) - len(stripped)], stripped)
        found = text.find(tag)
        if found >= 0:
            before = text[:found]
            self._emit(events, before.rstrip())
            return self._enter_call(before[len(before.rstrip()) :] + tag, text[found + len(tag) :])
        held = 0 if final else held_tag_prefix(text, tag)
        safe = len(text[: len(text) - held].rstrip())
        self._emit(events, text[:safe])
        self.buffer = text[safe:]
        return False

    def _enter_call(self, tag_text: str, region: str) -> bool:
        self.in_call, self.tag_text, self.buffer, self.at_start = True, tag_text, region, False
        return True

    def _emit(self, events: list[StreamEvent], text: str) -> None:
        if text:
            events.append(ContentDelta(text))
            self.at_start = False


def held_tag_prefix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that a start tag could still grow from."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def collect(events: list[StreamEvent]) -> ParsedOutput:
    """The whole output a list of stream events adds up to."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    names = {e.index: e.name for e in events if isinstance(e, ToolCallStart)}
    arguments = dict.fromkeys(names, "")
    for event in events:
        if isinstance(event, ToolCallArguments):
            arguments[event.index] += event.text
    calls = [ParsedCall(names[i], arguments[i]) for i in sorted(names)]
    return ParsedOutput(content or None, calls)


_PARSERS: tuple[ToolParser, ...] = (HermesParser(), Llama3JsonParser(), MistralParser())
PARSERS: tuple[str, ...] = tuple(parser.name for parser in _PARSERS)


def get_parser(name: str) -> ToolParser:
    for parser in _PARSERS:
        if parser.name == name:
            return parser
    raise ValueError(f"unknown tool-call parser {name!r}; expected one of {', '.join(PARSERS)}")


def detect_parser(chat_template: str | None) -> ToolParser | None:
    """The format a chat template renders tool calls in, or None when none is recognized."""
    if not chat_template:
        return None
    # mistral first: its templates may mention other formats' words, never the reverse
    for name in ("mistral", "hermes", "llama3_json"):
        if get_parser(name).detect(chat_template):
            return get_parser(name)
    return None
