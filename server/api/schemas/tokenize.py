"""vLLM's tokenizer endpoints, in its shapes: POST /tokenize, POST /detokenize,
GET /tokenizer_info."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from adapterserve.server.api.schemas.common import (
    SERVER_LIMIT,
    ChatMessage,
    PromptText,
    StrictRequestModel,
    TokenId,
    null_means_default_in_schema,
)


def _prompt_or_messages_in_schema(schema: dict[str, Any]) -> None:
    """Exactly one of `prompt` and `messages` (the other absent or null), said in the schema."""
    null_means_default_in_schema(schema)
    schema["oneOf"] = [
        {
            "required": ["prompt"],
            "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}},
        },
        {
            "required": ["messages"],
            "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
        },
    ]


class TokenizeRequest(StrictRequestModel):
    """POST /tokenize: `prompt` (a text) or `messages` (rendered with the model's own chat
    template, as /v1/chat/completions does), one of them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_prompt_or_messages_in_schema)

    model: str | None = None
    prompt: PromptText | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="default: true for a prompt, false for messages (the template has them)"
    )
    add_generation_prompt: bool = Field(True, description="messages only")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("one_of", "give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictRequestModel):
    model: str | None = None
    tokens: Annotated[
        list[TokenId], Field(json_schema_extra={SERVER_LIMIT: {"maxItems": "max_model_len"}})
    ]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: what a client needs to tokenize as the server does (lm-evaluation-
    harness's remote tokenizer reads `eos_token`, `bos_token`, `pad_token`, `chat_template`)."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    eos_token_ids: list[int]
    chat_template: str | None
