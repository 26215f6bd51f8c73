"""schemathesis hooks for test_schemathesis.py (loaded by the CLI through schemathesis.toml):
the few rules of the generation routes that JSON Schema cannot state, applied to positive cases.
The caps here are the ones the test's server is started with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis

MAX_N = 2
MAX_NUM_SEQS = 4
MAX_QUEUE_LEN = 4
CAPACITY = MAX_NUM_SEQS + MAX_QUEUE_LEN  # choices (prompts x n) one request may ask for
MAX_MODEL_LEN = 256
MAX_PROMPT_CHARS = 24  # keeps drawn prompts short: every byte may be a token
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
RESPONSES = "/v1/responses"
MAX_NEW_TOKENS = 4  # generated tokens per positive case: keeps the run short
MAX_MESSAGES = 3  # each message adds a few template tokens
DEFAULT_MAX_TOKENS = 16  # of /v1/completions
BEAM_REFUSES = (
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict) -> None:
    fit_into_context(case)


def fit_into_context(case: schemathesis.Case) -> None:
    """Rules the schema cannot state, applied to positive generation requests only: the prompt
    and the new tokens fit the context together; `prompt` (a list) and `messages` hold at most
    `max_prompt_chars` characters in all; prompts x `n` is at most the server's capacity;
    `best_of` equals `n`; `min_tokens` is at most the new tokens; beam search comes without
    the fields it refuses (sampling, penalties, logprobs, stop strings). Negative cases are sent as
    drawn."""
    body = case.body
    paths = (*GENERATION_PATHS, RESPONSES, "/tokenize")
    if case.operation.path not in paths or not isinstance(body, dict):
        return
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if case.operation.path == RESPONSES:
        _fit_response(body)
        return
    if case.operation.path == "/tokenize":  # the same character cap as generation prompts
        if isinstance(body.get("messages"), list):
            body["messages"] = _fit_messages(body["messages"])
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if _is_whole(body.get(key)):
            body[key] = min(int(body[key]), MAX_NEW_TOKENS)
    if "messages" in body:
        # The generic tool prompt (a template without tools: the test model's) alone holds more
        # tokens than this server's context (so does that of the deprecated functions); tools
        # and functions are tested in test_tools.py.
        for key in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"):
            body.pop(key, None)
        body["messages"] = _fit_messages(body["messages"])
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_completion_tokens"] = MAX_NEW_TOKENS  # else: the rest of the context
        new_tokens = _first_int(body.get("max_completion_tokens"), body.get("max_tokens"))
    else:
        body["prompt"] = _fit_prompt(body["prompt"], _first_int(body.get("n"), 1))
        new_tokens = _first_int(body.get("max_tokens"), DEFAULT_MAX_TOKENS)
    if _is_whole(body.get("min_tokens")):
        body["min_tokens"] = min(int(body["min_tokens"]), new_tokens)
    if _is_whole(body.get("best_of")):
        body["best_of"] = body.get("n") or 1
    if body.get("use_beam_search") is True:  # deterministic: no sampling fields, no logprobs
        for key in BEAM_REFUSES:
            body.pop(key, None)
        for key in ("max_tokens", "max_completion_tokens"):  # a beam search generates
            if _is_whole(body.get(key)) and int(body[key]) == 0:
                body[key] = 1
    _fit_constraint(body)


def _first_int(*values: Any) -> int:
    """The first whole number among `values` (JSON Schema lets 2.0 stand for 2)."""
    return next(int(v) for v in values if _is_whole(v))


def _is_whole(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _fit_prompt(prompt: Any, n: int) -> Any:
    """Token ids leave room for the default max_tokens; texts add up to the character cap
    (each is within it: the schema says so, and a byte-level token per byte fits); n choices
    of every prompt fit the server's capacity."""
    room = MAX_MODEL_LEN - DEFAULT_MAX_TOKENS
    if not isinstance(prompt, list) or not prompt:
        return prompt
    if isinstance(prompt[0], str):
        return _within_chars(prompt[: CAPACITY // n], len)
    if isinstance(prompt[0], list):
        return [ids[:room] for ids in prompt[: CAPACITY // n]]
    return prompt[:room]


def _fit_messages(messages: list[Any]) -> list[Any]:
    """At most MAX_MESSAGES (each adds a few template tokens), counted as the server counts
    them: the text parts of a message joined by newlines."""
    messages = [_fit_parts(m) if isinstance(m, dict) else m for m in messages[:MAX_MESSAGES]]
    return _within_chars(messages, lambda m: len(_text(m)) + _calls_chars(m))


def _calls_chars(message: Any) -> int:
    """The characters of an assistant message's tool calls and deprecated function_call (names
    and arguments)."""
    if not isinstance(message, dict):
        return 0
    calls = message.get("tool_calls")
    functions = [c["function"] for c in calls or () if isinstance(c, dict)]
    functions.append(message.get("function_call"))
    return sum(
        len(f["name"]) + len(f.get("arguments") or "{}") for f in functions if isinstance(f, dict)
    )


def _fit_parts(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:  # one short call: its name and arguments count too
        call = calls[0]
        if isinstance(call, dict):
            _shorten(call.get("function"))
        message["tool_calls"] = [call]
    _shorten(message.get("function_call"))
    room = MAX_PROMPT_CHARS - _calls_chars(message)  # the calls and the text share the cap
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content[:room]
    elif isinstance(content, list) and content:
        parts = _within_chars(content, lambda p: len(p["text"]) + 1, room)
        parts[0]["text"] = parts[0]["text"][:room]
        message["content"] = parts
    return message


def _shorten(function: Any) -> None:
    """A call's function (name, arguments) cut to a few characters."""
    if isinstance(function, dict):
        function["name"] = function["name"][:4]
        function["arguments"] = "{}"


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content)
    return content if isinstance(content, str) else ""


def _within_chars(
    items: list[Any], size: Callable[[Any], int], limit: int = MAX_PROMPT_CHARS
) -> list[Any]:
    """The first items whose sizes add up to at most `limit` (at least one)."""
    kept, total = [], 0
    for item in items:
        if kept and total + size(item) > limit:
            break
        kept.append(item)
        total += size(item)
    return kept


def _fit_response(body: dict[str, Any]) -> None:
    """/v1/responses: what chat's rules are in its terms. Stateless (no previous_response_id,
    store not true), no tools (the generic tool prompt overflows this context), input and
    instructions within MAX_PROMPT_CHARS, few new tokens, a text format that compiles."""
    for key in ("tools", "tool_choice", "parallel_tool_calls", "previous_response_id"):
        body.pop(key, None)
    if body.get("store") is True:
        body["store"] = False
    if _is_whole(body.get("max_output_tokens")):
        body["max_output_tokens"] = min(int(body["max_output_tokens"]), MAX_NEW_TOKENS)
    else:
        body["max_output_tokens"] = MAX_NEW_TOKENS
    budget = MAX_PROMPT_CHARS
    if isinstance(body.get("instructions"), str):
        body["instructions"] = body["instructions"][:4]
        budget -= len(body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        body["input"] = items[: max(1, budget)]
    elif isinstance(items, list):
        kept = [_fit_item(item) for item in items[:MAX_MESSAGES]]
        body["input"] = _within_chars(kept, _item_chars)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt["schema"] = {"type": "object"}
        fmt.pop("strict", None)


def _fit_item(item: Any) -> Any:
    """One input item with short text: a message's content, a call's arguments, an output."""
    if not isinstance(item, dict):
        return item
    if item.get("type") == "function_call":
        item["arguments"], item["name"] = "{}", str(item.get("name", ""))[:4]
    elif item.get("type") == "function_call_output":
        item["output"] = str(item.get("output", ""))[:4]
    elif isinstance(item.get("content"), list):
        item["content"] = _within_chars(item["content"], lambda p: len(p.get("text", "")) + 1)
    return item


def _item_chars(item: Any) -> int:
    if not isinstance(item, dict):
        return 0
    if item.get("type") == "function_call":
        return len(item.get("name", "")) + len(item.get("arguments", ""))
    if item.get("type") == "function_call_output":
        return len(item.get("output", ""))
    content = item.get("content")
    if isinstance(content, list):
        return sum(len(p.get("text", "")) + 1 for p in content if isinstance(p, dict))
    return len(content) if isinstance(content, str) else 0


COMPILABLE = {  # drawn text is rarely a grammar that compiles: one that does, per field
    "guided_json": {"type": "object"},
    "guided_regex": "[a-z]{1,4}",
    "guided_choice": ["yes", "no"],
    "guided_grammar": 'start: "a"+',
}


def _fit_constraint(body: dict[str, Any]) -> None:
    """At most one structured-output constraint, one that compiles, and none with beam search
    or min_tokens (the grammar decides the end)."""
    fmt = body.get("response_format")
    constrained = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    if (
        constrained
        and fmt.get("type") == "json_schema"
        and isinstance(fmt.get("json_schema"), dict)
    ):
        fmt["json_schema"]["schema"] = {"type": "object"}
    for key, value in COMPILABLE.items():
        if body.get(key) is None:
            continue
        if constrained or body.get("use_beam_search") is True:
            body.pop(key)
        else:
            body[key], constrained = value, True
    if constrained and body.get("use_beam_search") is True:
        body.pop("response_format", None)
    elif constrained:
        body.pop("min_tokens", None)
