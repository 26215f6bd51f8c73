"""POST /v1/chat/completions: the request (BeamFields and messages) and the response."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from adapterserve.server.api.schemas.common import (
    INTEGRAL,
    BeamFields,
    ChatMessage,
    NewTokens,
    Usage,
    now,
)


class ChatCompletionRequest(BeamFields):
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
    tools: Annotated[list[Any], Field(json_schema_extra={"maxItems": 0})] | None = Field(
        None, description="not supported: only null or []"
    )

    @field_validator("chat_template", "chat_template_kwargs", mode="before")
    @classmethod
    def _refuse_template(cls, value: Any) -> Any:
        raise ValueError(
            "templates from the request are not executed; the model's own chat template is used, remove this field"
        )

    @field_validator("tools", mode="before")
    @classmethod
    def _refuse_tools(cls, value: Any) -> Any:
        if value:
            raise ValueError("tool calling is not supported; remove 'tools'")
        return value

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


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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
