"""POST /v1/completions: the request (BeamFields and a prompt) and the response."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from adapterserve.server.api.schemas.common import (
    INTEGRAL,
    SERVER_LIMIT,
    BeamFields,
    NewTokens,
    PromptText,
    TokenIds,
    Usage,
    now,
)

# Prompts of one request: each runs n times, and the server holds only so many at once.
PROMPT_LIST = {"minItems": 1, SERVER_LIMIT: {"maxItems": "max_prompts"}}


class CompletionRequest(BeamFields):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(json_schema_extra=PROMPT_LIST)]
        | TokenIds
        | Annotated[list[TokenIds], Field(json_schema_extra=PROMPT_LIST)]
    )
    max_tokens: NewTokens = 16
    logprobs: Annotated[int, Field(ge=0, le=5), INTEGRAL] | None = None
    echo: bool = False
    suffix: str | None = Field(
        None, max_length=0, description="not supported: only null or an empty string"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        message = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists"
        if not isinstance(value, list) or not value:
            raise ValueError(message if not isinstance(value, list) else "prompt must not be empty")
        kinds = {_prompt_item_kind(item) for item in value}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(message)
        return value

    @field_validator("suffix", mode="before")
    @classmethod
    def _refuse_suffix(cls, value: Any) -> Any:
        if value != "":
            raise ValueError("suffix is not supported; remove it or send an empty string")
        return value

    @field_validator("logprobs", mode="before")
    @classmethod
    def _check_logprobs(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("logprobs must be an integer 0..5 on /v1/completions")
        return value


def _prompt_item_kind(item: Any) -> str | None:
    if isinstance(item, str):
        return "text"
    if _is_int(item):
        return "id"
    if isinstance(item, list) and item and all(_is_int(t) for t in item):
        return "ids"
    return None


def _is_int(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- responses


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
