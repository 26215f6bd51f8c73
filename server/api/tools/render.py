"""Tools in the prompt for a model whose chat template does not render them.

`template_supports_tools` tells whether a template uses the `tools` variable (then the router
passes `tools=` to the template and nothing here is needed). Otherwise the router prepends
`generic_tool_system_prompt(tools, fmt)` to the system message, a description of each function
(name, description, parameters JSON schema) and the exact call format, and passes the
conversation through `tool_messages_to_text`, which turns what such a template cannot render
into plain messages:

- an assistant message with `tool_calls` -> its content followed by the calls written in the
  format (hermes by default: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`);
- `role: "tool"` messages -> one user message per run of them, each result in
  `<tool_response>\\n...\\n</tool_response>` as Hermes-trained models expect.

OpenAI's deprecated function calling (an assistant `function_call`, `role: "function"`
results) is first read as tool calling by `functions_as_tools`, for either rendering.

What the model then writes is read back with parsers.get_parser(fmt).
"""

from __future__ import annotations

import json
import re
from typing import Any

from adapterserve.server.api.tools.grammar import Tool
from adapterserve.server.api.tools.parsers import get_parser

CALL_FORMATS = {
    "hermes": '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>',
    "llama3_json": '{"name": <function-name>, "parameters": <arguments-json-object>}',
    "mistral": '[TOOL_CALLS] [{"name": <function-name>, "arguments": <arguments-json-object>}]',
}
SEVERAL = {
    "hermes": "one <tool_call></tool_call> block per call, one after the other",
    "llama3_json": 'the call objects separated by "; "',
    "mistral": "all the call objects in the one list",
}


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template's text refers to the `tools` variable."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def generic_tool_system_prompt(tools: list[Tool], fmt: str = "hermes") -> str:
    """System-message text describing `tools` and how to call them in format `fmt`."""
    get_parser(fmt)  # an unknown format fails here, with the list of known ones
    functions = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters},
            ensure_ascii=False,
        )
        for t in tools
    )
    return (
        "You may call one or more functions to help with the user's request. "
        "The functions, as JSON schemas:\n"
        f"<tools>\n{functions}\n</tools>\n\n"
        "To call a function, reply with exactly this, the arguments a JSON object valid for the "
        f"function's parameters:\n{CALL_FORMATS[fmt]}\n"
        f"For several calls, write {SEVERAL[fmt]}. "
        "Function results come back in <tool_response></tool_response> blocks."
    )


def calls_text(tool_calls: list[dict[str, Any]], fmt: str = "hermes") -> str:
    """OpenAI `tool_calls` (function name, arguments as a JSON string) written in format `fmt`."""
    key = get_parser(fmt).arguments_key
    objects = [
        json.dumps({"name": call["function"]["name"], key: _arguments(call)}, ensure_ascii=False)
        for call in tool_calls
    ]
    if fmt == "hermes":
        return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in objects)
    if fmt == "llama3_json":
        return "; ".join(objects)
    return f"[TOOL_CALLS] [{', '.join(objects)}]"


def _arguments(call: dict[str, Any]) -> Any:
    text = call["function"].get("arguments") or "{}"
    try:
        return json.loads(text)
    except ValueError:
        return text  # the client's text as it is: the model sees what it was sent


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def functions_as_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New messages with OpenAI's deprecated function calling as tool calling: an assistant
    `function_call` -> one more entry of its `tool_calls`, a `role: "function"` message -> a
    `role: "tool"` message answering the latest such call. The deprecated shapes carry no
    ids: each call's is made up from its message's position (`call_3`)."""
    result: list[dict[str, Any]] = []
    last_id = None
    for i, message in enumerate(messages):
        message = dict(message)
        call = message.pop("function_call", None)
        if call is not None:
            last_id = f"call_{i}"
            entry = {"id": last_id, "type": "function", "function": call}
            message["tool_calls"] = [*(message.get("tool_calls") or ()), entry]
        if message.get("role") == "function":
            message["role"] = "tool"
            if last_id is not None and message.get("tool_call_id") is None:
                message["tool_call_id"] = last_id
        result.append(message)
    return result


def tool_messages_to_text(
    messages: list[dict[str, Any]], fmt: str = "hermes"
) -> list[dict[str, Any]]:
    """New messages with only `role` and text `content` where tools were involved (module
    docstring); other messages are copied as they are."""
    result: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") == "tool":
            response = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            if result and result[-1].get("tool_responses"):
                result[-1]["content"] += "\n" + response
            else:
                result.append({"role": "user", "content": response, "tool_responses": True})
        elif message.get("role") == "assistant" and message.get("tool_calls"):
            parts = [_text(message.get("content")), calls_text(message["tool_calls"], fmt)]
            result.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        else:
            result.append(dict(message))
    for message in result:
        message.pop("tool_responses", None)  # a marker of this function's own
    return result
