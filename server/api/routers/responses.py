"""POST /v1/responses: OpenAI's Responses API, stateless, served through the chat pipeline.

A request becomes a chat completion (`instructions` -> a system message in front, `input`
items -> messages: `function_call` items -> an assistant message's tool calls,
`function_call_output` -> tool messages; `tools` flat -> chat's nested function tools, with the
Responses API's default `strict: true`; `text.format` -> `response_format`;
`max_output_tokens` -> `max_completion_tokens`) and goes through what /v1/chat/completions does
(routers/chat.py `start_chat`: checks, template, tools, grammar, the engine). The answer is a
`response` object whose `output` holds a `message` item (`output_text`) and a `function_call`
item per call; streamed, OpenAI's typed semantic events: `response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta` / `.done`, `response.function_call_arguments.delta` / `.done`,
`response.output_item.done`, then `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it); an engine failure is an `error` event. No `[DONE]`.

Nothing is kept: `store: true` and `previous_response_id` are 400s that say to send the whole
conversation as `input`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from adapterserve.server.api.deps import get_engine, get_settings
from adapterserve.server.api.errors import APIError, error_responses, invalid_request
from adapterserve.server.api.routers.chat import start_chat
from adapterserve.server.api.schemas.chat import ChatCompletionRequest
from adapterserve.server.api.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    ResponseObject,
    ResponsesRequest,
)
from adapterserve.server.api.serving import (
    STREAMED,
    ChoiceResult,
    ClientDisconnected,
    EventStreamResponse,
    collect,
    engine_error,
    event_stream,
    failed_output_error,
)
from adapterserve.server.api.tools.calls import ToolPlan, ToolStream
from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.errors import EngineError
from adapterserve.server.engine.output import RequestOutput

router = APIRouter(tags=["responses"])


def item_id(prefix: str) -> str:
    """OpenAI's ids of responses and their items: resp_..., msg_..., fc_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


# A chat field named in a refusal -> the Responses API field the client sent.
PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}


@router.post(
    "/v1/responses",
    response_model=ResponseObject,
    responses={200: {"content": STREAMED}, **error_responses(404, 503)},
)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
) -> Response:
    _refuse_state(body)
    response_id = item_id("resp")
    chat = _as_chat(body)
    try:
        started = await start_chat(chat, request, engine, settings, response_id)
    except APIError as error:
        if error.param in PARAMS:
            error.param = PARAMS[error.param]
        raise
    view = _ResponseView(body, started.tools, request.state.model, response_id)
    if body.stream:
        events = event_stream(
            started.streams, settings, view.render, view.prologue(), tuple, view.error, None
        )
        return EventStreamResponse(events)
    result = ChoiceResult(0)
    try:
        await collect(request, started.streams, [result])
    except ClientDisconnected:
        return Response(status_code=499)
    except EngineError as exc:
        raise engine_error(exc, settings.retry_after_s) from None
    failure = failed_output_error(result, settings)
    if failure is not None:
        raise failure
    return JSONResponse(view.response(result))


def _refuse_state(body: ResponsesRequest) -> None:
    if body.input == "":
        raise invalid_request("input is empty: give some text or input items.", "input")
    if body.previous_response_id is not None:
        raise invalid_request(
            "This server keeps no responses (store is always false): send the whole "
            "conversation as `input` instead of previous_response_id.",
            "previous_response_id",
        )
    if body.store:
        raise invalid_request(
            "This server keeps no responses: set store to false (or leave it out).", "store"
        )


def _as_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that serves `body` (module docstring)."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else None
    for item in body.input if items is None else ():
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append({"role": item.role, "content": item.text})
    messages += items or []
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    if body.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": True if t.strict is None else t.strict,
                },
            }
            for t in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, FunctionToolChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        chat["tool_choice"] = choice
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        spec = {"name": fmt.name, "schema": fmt.schema_ or {"type": "object"}, "strict": fmt.strict}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # what the Responses schema let through, chat refuses
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][:1])
        raise invalid_request(f"{first['msg']} ({field})", PARAMS.get(field, field)) from None


class _ResponseView:
    """Engine outputs -> the `response` object, whole or as semantic stream events."""

    def __init__(
        self, body: ResponsesRequest, tools: ToolPlan | None, model: str, response_id: str
    ) -> None:
        self.body, self.tools, self.model, self.id = body, tools, model, response_id
        self.created = int(time.time())
        self.calling = tools is not None and tools.mode != "none"
        # streaming state
        self.sequence = 0
        self.result = ChoiceResult(0)
        self.stream: ToolStream | None = self.tools.stream() if self.calling else None
        self.items: list[dict[str, Any]] = []  # output items so far (dicts as sent)
        self.open_message: dict[str, Any] | None = None
        self.open_call: dict[str, Any] | None = None

    # ---- whole

    def response(self, result: ChoiceResult) -> dict:
        items: list[dict[str, Any]] = []
        if self.calling:
            assert self.tools is not None
            content, calls, _ = self.tools.answer(result.text, result.finish_reason)
        else:
            content, calls = result.text, []
        status = "incomplete" if result.finish_reason == "length" else "completed"
        if content or not calls:
            items.append(self._message(content or "", status))
        for call in calls:
            items.append(
                self._call(
                    call["id"], call["function"]["name"], call["function"]["arguments"], "completed"
                )
            )
        return self._object(items, result, status)

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": item_id("msg"),
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    def _call(self, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": item_id("fc"),
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": status,
        }

    def _object(
        self, items: list[dict[str, Any]], result: ChoiceResult | None, status: str
    ) -> dict[str, Any]:
        body = self.body
        usage = None
        if result is not None:
            usage = {
                "input_tokens": result.num_prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": result.num_cached_tokens,
                    "cache_write_tokens": 0,
                },
                "output_tokens": result.num_output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": result.num_prompt_tokens + result.num_output_tokens,
            }
        fmt = body.text.format if body.text is not None and body.text.format else None
        text = {
            "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        }
        choice = body.tool_choice
        return ResponseObject(
            id=self.id,
            created_at=self.created,
            status=status,
            model=self.model,
            output=items,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            text=text,
            tool_choice=choice.model_dump()
            if isinstance(choice, FunctionToolChoice)
            else (choice or "auto"),
            tools=[
                t.model_dump(exclude_none=True) | {"strict": t.strict is not False}
                for t in body.tools or ()
            ],
            usage=usage,
            metadata=body.metadata or {},
            user=body.user,
        ).model_dump(mode="json")

    # ---- streamed

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def prologue(self) -> list[str]:
        started = self._object([], None, "in_progress")
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def render(self, index: int, output: RequestOutput) -> list[str]:
        self.result.add(output)
        if self.stream is not None:
            pieces = self.stream.feed(output.text)
            if output.finished:
                pieces += self.stream.finish()
        else:
            pieces = [{"content": output.text}] if output.text else []
        events: list[str] = []
        for piece in pieces:
            if "content" in piece:
                events += self._text(piece["content"])
            for delta in piece.get("tool_calls", ()):
                events += self._call_delta(delta)
        if output.finished:
            events += self._finish(output.finish_reason)
        return events

    def _text(self, text: str) -> list[str]:
        events = self._close_call()
        if self.open_message is None:
            item = self._message("", "in_progress")
            item["content"] = []
            self.open_message = item
            self.items.append(item)
            events.append(
                self._event(
                    "response.output_item.added", output_index=len(self.items) - 1, item=item
                )
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=len(self.items) - 1,
                    content_index=0,
                    part=part,
                )
            )
            item["content"].append(dict(part))
        item = self.open_message
        item["content"][0]["text"] += text
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self.items.index(item),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _close_message(self, status: str = "completed") -> list[str]:
        item, self.open_message = self.open_message, None
        if item is None:
            return []
        index, part = self.items.index(item), item["content"][0]
        item["status"] = status
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _call_delta(self, delta: dict[str, Any]) -> list[str]:
        events: list[str] = []
        if "id" in delta:  # a new call: its item first
            events += self._close_message() + self._close_call()
            item = self._call(delta["id"], delta["function"]["name"], "", "in_progress")
            self.open_call = item
            self.items.append(item)
            events.append(
                self._event(
                    "response.output_item.added", output_index=len(self.items) - 1, item=dict(item)
                )
            )
        arguments = delta.get("function", {}).get("arguments") or ""
        if arguments and self.open_call is not None:
            self.open_call["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.open_call["id"],
                    output_index=self.items.index(self.open_call),
                    delta=arguments,
                )
            )
        return events

    def _close_call(self) -> list[str]:
        item, self.open_call = self.open_call, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = "completed"
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _finish(self, reason: str | None) -> list[str]:
        status = "incomplete" if reason == "length" else "completed"
        events = self._close_message(status) + self._close_call()
        final = self._object(self.items, self.result, status)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return events + [self._event(kind, response=final)]

    def error(self, error: APIError) -> list[str]:
        return [self._event("error", code=error.code, message=error.message, param=error.param)]
