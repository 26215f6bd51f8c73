"""POST /v1/responses: OpenAI's Responses API, stateless (`store: false`). The request and the
response objects; the router (server/api/routers/responses.py) serves a request as a chat
completion and answers in these shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from adapterserve.server.api.schemas.common import (
    INTEGRAL,
    NewTokens,
    PromptChars,
    PromptText,
    RequestModel,
)

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


# ---------------------------------------------------------------- input items


class InputTextPart(RequestModel):
    type: Literal["input_text", "output_text", "text"]
    text: PromptChars


class InputMessage(RequestModel):
    """A message of the conversation (`type` may be left out, as OpenAI's easy input)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: PromptChars | list[InputTextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionCallItem(RequestModel):
    """A call the model made earlier (sent back in a tool loop)."""

    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=256)
    arguments: PromptChars
    id: str | None = Field(None, max_length=256)


class FunctionCallOutputItem(RequestModel):
    """A call's result."""

    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: PromptChars


def _item_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type") or "message")
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


# ---------------------------------------------------------------- tools and text format


class ResponsesFunctionTool(RequestModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="the Responses API's default is true")


class FunctionToolChoice(RequestModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: PromptText | Annotated[list[InputItem], Field(min_length=1, max_length=4096)]
    instructions: PromptChars | None = Field(None, description="a system message in front")
    max_output_tokens: NewTokens | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64), INTEGRAL] | None = Field(
        None, description="extension: seeded sampling, as on chat completions"
    )
    tools: list[ResponsesFunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = Field(
        None, description="accepted as false only: responses are not kept (stateless)"
    )
    previous_response_id: str | None = Field(
        None, description="not supported: responses are not kept; send the whole input"
    )
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None


# ---------------------------------------------------------------- the response


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    parallel_tool_calls: bool
    previous_response_id: None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponsesUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
