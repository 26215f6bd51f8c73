"""What the routers' request and response models share: the request base classes and their
rules, the sampling fields of completions and chat, usage, the error shape.

Requests: `null` means "default", floats must be finite, and types are strict as the schema
says (no "5" for 5, no 1 for true; an integral float such as 2.0 is an integer, as in JSON
Schema). Unknown fields: the OpenAI-shaped requests accept them (OpenAI clients send extras)
and the routers log their names; our own endpoints refuse them (StrictRequestModel), so that
a misspelt option cannot run a job nobody asked for. Checks that need the model or the
settings (vocabulary, context length, `n` cap) happen in the routers; the schema states them
with `x-server-limit` placeholders that the served /openapi.json fills in with this server's
values (server/api/routers/openapi.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
UNKNOWN_FIELD = "unknown_field"  # error type; server/api/errors.py takes `param` from its ctx
MAX_FIELD_NAME_CHARS = 40  # of a client's field name quoted back
MAX_N = 128  # hard schema bound; settings.max_n caps it lower in the routers
# Key of a schema-only placeholder: {"x-server-limit": {"maximum": "max_n"}} becomes
# {"maximum": <settings.max_n>} in the served document.
SERVER_LIMIT = "x-server-limit"


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer; strict pydantic would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Last in an Annotated list, after the constraints: placed before them (or given to Field() on an
# optional field) it makes pydantic print `ge`/`lt` instead of `minimum`/`exclusiveMaximum`.
INTEGRAL = BeforeValidator(_integral_float_to_int)
Int = Annotated[int, INTEGRAL]
Bias = Annotated[float, Field(ge=-100, le=100)]
# Documented only: the routers check these (they need the model) with messages of their own.
TokenId = Annotated[
    int,
    Field(json_schema_extra={"minimum": 0, SERVER_LIMIT: {"maximum": "max_token_id"}}),
    INTEGRAL,
]
TokenIds = Annotated[
    list[TokenId],
    Field(json_schema_extra={"minItems": 1, SERVER_LIMIT: {"maxItems": "max_model_len"}}),
]
NonEmptyText = Annotated[str, Field(json_schema_extra={"minLength": 1})]
# The cap is on all the text of a request; no single string can exceed it either.
PromptChars = Annotated[
    str, Field(json_schema_extra={SERVER_LIMIT: {"maxLength": "max_prompt_chars"}})
]
PromptText = Annotated[
    str,
    Field(json_schema_extra={"minLength": 1, SERVER_LIMIT: {"maxLength": "max_prompt_chars"}}),
]
# A prompt has at least one token, so no request gets more new tokens than the context - 1.
NewTokens = Annotated[
    int, Field(ge=0, json_schema_extra={SERVER_LIMIT: {"maximum": "max_new_tokens"}}), INTEGRAL
]


def null_means_default_in_schema(schema: dict[str, Any]) -> None:
    """Every optional property also takes null, as `_null_means_default` does."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or _takes_null(prop):
            continue
        outer = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
        members = prop["anyOf"] if set(prop) == {"anyOf"} else [prop]
        schema["properties"][name] = {"anyOf": [*members, {"type": "null"}], **outer}


def _takes_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(m.get("type") == "null" for m in prop.get("anyOf", ()))


class RequestModel(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,
        strict=True,
        json_schema_extra=null_means_default_in_schema,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StrictRequestModel(RequestModel):
    """A request to one of our own endpoints: an unknown field is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(key for key in data if key not in cls.model_fields)
            if unknown:
                raise PydanticCustomError(
                    UNKNOWN_FIELD,
                    "Unknown field '{field}': check its spelling; this endpoint accepts {accepted}",
                    {
                        "field": unknown[0][:MAX_FIELD_NAME_CHARS],
                        "accepted": ", ".join(cls.model_fields),
                    },
                )
        return data


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaSpec(RequestModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        alias="schema",
        description="the JSON Schema every output must validate against",
    )
    strict: bool | None = Field(
        None,
        description="true: OpenAI's strict mode (every object closed, every property required); "
        "false or absent: the schema as given",
    )


def _schema_needs_json_schema(schema: dict[str, Any]) -> None:
    null_means_default_in_schema(schema)
    schema["if"] = {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]}
    schema["then"] = {
        "required": ["json_schema"],
        "properties": {"json_schema": {"type": "object"}},
    }


class ResponseFormat(RequestModel):
    model_config = ConfigDict(json_schema_extra=_schema_needs_json_schema)

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", "type 'json_schema' needs a 'json_schema' object")
        return self


class SamplingFields(RequestModel):
    """Fields shared by completions and chat completions. Unknown fields are kept aside (not
    used) so that the routers can log their names."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="served model id; omitted = the base model")
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or below 1e-5) = greedy")
    top_p: float = Field(1.0, ge=0, le=1)
    # lt: the sampler packs top_k into an int64 tensor; 2**63 crashed the engine. A top_k above
    # the vocabulary size keeps every token, like 0.
    top_k: Int = Field(0, ge=-1, lt=2**31, description="vLLM extra; -1 or 0 = off")
    n: Int = Field(1, ge=1, le=MAX_N, json_schema_extra={SERVER_LIMIT: {"maximum": "max_n"}})
    stream: bool = Field(False, description="true: text/event-stream of chunks, then [DONE]")
    stream_options: StreamOptions | None = None
    stop: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(json_schema_extra={"maxItems": MAX_STOP_SEQUENCES})]
        | None
    ) = None
    stop_token_ids: list[TokenId] | None = Field(None, description="vLLM extra")
    # Exclusive powers of two: JSON numbers are doubles, and 2**64 - 1 would be printed as
    # 2**64 in the schema, one more than the server takes.
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64), INTEGRAL] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: (
        Annotated[
            dict[str, Bias],
            Field(
                json_schema_extra={"propertyNames": {SERVER_LIMIT: {"pattern": "token_id_pattern"}}}
            ),
        ]
        | None
    ) = Field(None, description="token id (decimal) -> bias")
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extra")
    min_tokens: NewTokens = Field(0, description="vLLM extra")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra")
    # structured outputs: at most one of these (server/engine/constraint.py)
    response_format: ResponseFormat | None = Field(
        None, description="text (default), json_object, or json_schema: every output follows it"
    )
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM extra: a JSON schema")
    guided_regex: str | None = Field(None, max_length=4096, description="vLLM extra: a regex")
    guided_choice: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=1024)]],
            Field(min_length=1, max_length=256),
        ]
        | None
    ) = Field(None, description="vLLM extra: the output is one of these strings")
    guided_grammar: str | None = Field(
        None, max_length=65536, description="vLLM extra: a Lark or GBNF grammar"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}"
            )
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class BeamFields(SamplingFields):
    """SamplingFields and vLLM's beam-search extras: what completions and chat completions
    share."""

    best_of: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] | None = Field(
        None,
        description="with use_beam_search: the number of beams (default n, at least n); "
        "otherwise it must equal n (or be omitted)",
        json_schema_extra={SERVER_LIMIT: {"maximum": "max_n"}},
    )
    use_beam_search: bool = Field(
        False,
        description="vLLM extra: beam search over best_of beams "
        "(default n), the n best returned; deterministic (temperature 0 or omitted, top_p 1, "
        "top_k off), without logprobs, stop strings, penalties or logit_bias",
    )
    length_penalty: float = Field(
        1.0,
        ge=-10,
        le=10,
        description="beam search: a finished beam scores its summed "
        "log-probs / length**length_penalty (Hugging Face)",
    )
    early_stopping: bool | Literal["never"] = Field(
        False,
        description="beam search, as Hugging Face: true stops when best_of beams are "
        'finished; false stops when no running beam can do better (a heuristic); "never": '
        "only when none can (canonical beam search)",
    )


# Chat messages: what /v1/chat/completions and /tokenize take.
class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: PromptChars


class FunctionCallText(RequestModel):
    name: str = Field(max_length=256)
    arguments: PromptChars = Field("{}", description="the arguments as JSON text")


class MessageToolCall(RequestModel):
    """A call an assistant message made (the history of a tool loop)."""

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallText


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool", "function", "developer"]
    content: PromptChars | list[TextPart] = ""
    name: str | None = Field(None, description="function: the function whose result this is")
    tool_calls: list[MessageToolCall] | None = Field(
        None, max_length=128, description="assistant: the calls it made"
    )
    tool_call_id: str | None = Field(
        None, max_length=256, description="tool: the call this message answers"
    )
    function_call: FunctionCallText | None = Field(
        None, description="assistant, deprecated (OpenAI's functions): the one call it made"
    )

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
        return value

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    @property
    def num_chars(self) -> int:
        """Characters of client text it brings to the prompt (content and calls), for the
        prompt's character cap."""
        calls = [c.function for c in self.tool_calls or ()]
        if self.function_call is not None:
            calls.append(self.function_call)
        return len(self.text) + sum(len(c.name) + len(c.arguments) for c in calls)


# ---------------------------------------------------------------- responses


def now() -> int:
    """The time of a response's `created`: Unix seconds."""
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens read from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
