"""POST /v1/chat/completions: the request (BeamFields and messages) and the response."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapterserve.server.api.schemas.common import (
    INTEGRAL,
    BeamFields,
    ChatMessage,
    NewTokens,
    RequestModel,
    Usage,
    now,
    null_means_default_in_schema,
)


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = Field(
        None, description="a JSON schema of the arguments (default: no arguments)"
    )
    strict: bool | None = Field(
        None, description="true: the arguments follow OpenAI's strict mode (response_format)"
    )


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


def _needs(choice: str, listed: str) -> dict[str, Any]:
    """`choice` other than null or "none" needs a non-empty `listed`."""
    return {
        "if": {
            "properties": {choice: {"not": {"anyOf": [{"type": "null"}, {"const": "none"}]}}},
            "required": [choice],
        },
        "then": {
            "required": [listed],
            "properties": {listed: {"type": "array", "minItems": 1}},
        },
    }


def _choices_need_their_lists(schema: dict[str, Any]) -> None:
    """tool_choice needs tools, function_call needs functions, and functions come without
    tools."""
    null_means_default_in_schema(schema)
    both = {
        "required": ["functions", "tools"],
        "properties": {name: {"type": "array", "minItems": 1} for name in ("functions", "tools")},
    }
    schema["allOf"] = [
        _needs("tool_choice", "tools"),
        _needs("function_call", "functions"),
        {"not": both},
    ]


class ChatCompletionRequest(BeamFields):
    model_config = ConfigDict(json_schema_extra=_choices_need_their_lists)

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NewTokens | None = Field(
        None, description="deprecated alias of max_completion_tokens"
    )
    max_completion_tokens: NewTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = Field(
        None, description="used with logprobs: true; ignored otherwise"
    )
    add_generation_prompt: bool = Field(True, description="vLLM extra")
    # Accepted only to be refused: the model's own template is the only one ever rendered.
    chat_template: None = Field(None, description="not supported: only null")
    chat_template_kwargs: None = Field(None, description="not supported: only null")
    tools: list[ToolDefinition] | None = Field(
        None, max_length=128, description="functions the model may call"
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or one named function"
    )
    parallel_tool_calls: bool | None = Field(None, description="more than one call (default true)")
    functions: list[FunctionDefinition] | None = Field(
        None, max_length=128, description="deprecated (OpenAI), instead of tools: one call at most"
    )
    function_call: Literal["none", "auto"] | FunctionName | None = Field(
        None, description="deprecated (OpenAI) tool_choice of functions: none, auto or {name}"
    )

    @field_validator("chat_template", "chat_template_kwargs", mode="before")
    @classmethod
    def _refuse_template(cls, value: Any) -> Any:
        raise ValueError(
            "templates from the request are not executed; the model's own chat template is used, remove this field"
        )

    @property
    def max_new_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


# ---------------------------------------------------------------- responses


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None
    function_call: ResponseFunctionCall | None = Field(
        None, description="the call, when the request gave the deprecated functions"
    )


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
