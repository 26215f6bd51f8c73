"""Pydantic request/response models in OpenAI's shapes (plus vLLM's sampling extras).

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

from adapterserve.adapters.spec import AdapterKind

MAX_STOP_SEQUENCES = 4
UNKNOWN_FIELD = "unknown_field"  # error type; server/api/errors.py takes `param` from its ctx
MAX_FIELD_NAME_CHARS = 40  # of a client's field name quoted back
MAX_N = 128  # hard schema bound; settings.max_n caps it lower in the routers
# Key of a schema-only placeholder: {"x-server-limit": {"maximum": "max_n"}} becomes
# {"maximum": <settings.max_n>} in the served document.
SERVER_LIMIT = "x-server-limit"
# An adapter name (adapters/store.py NAME_RE plus its "no '..'" rule, without a lookahead).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
ADAPTER_NAME_CHARS = 64
DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # server/evaluation/datasets.py

# The adapter kinds the server serves, from AdapterKind (adapters/spec.py): one list
AdapterKindName = Literal[tuple(kind.value for kind in AdapterKind)]  # type: ignore[valid-type]


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
# Prompts of one request: each runs n times, and the server holds only so many at once.
PROMPT_LIST = {"minItems": 1, SERVER_LIMIT: {"maxItems": "max_prompts"}}
# A prompt has at least one token, so no request gets more new tokens than the context - 1.
NewTokens = Annotated[
    int, Field(ge=0, json_schema_extra={SERVER_LIMIT: {"maximum": "max_new_tokens"}}), INTEGRAL
]


def _null_means_default_in_schema(schema: dict[str, Any]) -> None:
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
        json_schema_extra=_null_means_default_in_schema,
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
    _null_means_default_in_schema(schema)
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


def _is_int(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: PromptChars


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: PromptChars | list[TextPart] = ""
    name: str | None = None

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


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


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
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "adapterserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    # Base model only: the dimensions a client needs to build adapters that fit it.
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    quantization: Literal["none", "int8", "int4"] | None = Field(
        None,
        description="base model only: its projections' weight-only quantization (adapters "
        "are always full precision)",
    )
    replicas: dict[str, str] | None = Field(
        None,
        description="cluster only (server/cluster): the tier of this adapter on each engine "
        "replica that reports it (device = in a slot, host, disk); absent in one process",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: str


# ---------------------------------------------------------------- evaluations (issue 5)


class EvaluationRequest(StrictRequestModel):
    """POST /v1/evaluations: models (`base` = the base model, or adapter names) x datasets."""

    # uniqueItems: a model or dataset listed twice is refused (400).
    models: list[str] = Field(
        ..., min_length=1, max_length=64, json_schema_extra={"uniqueItems": True}
    )
    datasets: list[str] = Field(
        ..., min_length=1, max_length=64, json_schema_extra={"uniqueItems": True}
    )
    limit: Annotated[int, Field(ge=1), INTEGRAL] | None = Field(
        None, description="first N records of each dataset; default all"
    )
    protocol: Literal["generate", "loglikelihood"] = "generate"
    # lt a power of two: see SamplingFields.seed
    seed: Annotated[int, Field(ge=0, lt=2**63), INTEGRAL] | None = None
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy (default)")
    max_tokens: Annotated[int, Field(ge=1, le=4096), INTEGRAL] | None = Field(
        None, description="override the paper's max new tokens (256 / 32)"
    )
    decoding: Literal["greedy", "beam"] = Field(
        "greedy",
        description="protocol generate: 'greedy' decodes by `temperature` (0: "
        "greedily); 'beam' is the paper's 4-beam search without sampling (temperature 0)",
    )


class EvaluationCell(BaseModel):
    model: str
    dataset: str
    total: int
    done: int
    correct: int
    accuracy: float | None


class EvaluationProgress(BaseModel):
    done: int
    total: int
    eta_s: float | None


class EvaluationJob(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: int
    models: list[str]
    datasets: list[str]
    limit: int | None
    protocol: Literal["generate", "loglikelihood"]
    seed: int | None
    temperature: float
    max_tokens: int | None
    decoding: Literal["greedy", "beam"]
    progress: EvaluationProgress
    results: list[EvaluationCell]
    started_at: float | None
    finished_at: float | None
    error: str | None
    note: str


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationJob]


class DatasetUpload(StrictRequestModel):
    """POST /v1/datasets: records as a JSON array (`records`) or JSON Lines text (`jsonl`)."""

    name: str = Field(
        ..., min_length=1, max_length=64, json_schema_extra={"pattern": DATASET_NAME_PATTERN}
    )
    answer_kind: Literal["number", "letter", "words"]
    answer_words: list[str] | None = Field(None, description="the answer words of kind 'words'")
    records: list[Any] | None = None
    jsonl: str | None = None
    replace: bool = False


class DatasetInfo(BaseModel):
    name: str
    object: Literal["dataset"] = "dataset"
    answer_kind: Literal["number", "letter", "words"]
    answer_words: list[str]
    source: Literal["builtin", "user"]
    available: bool
    num_records: int | None
    max_new_tokens: int


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetInfo]


# ---------------------------------------------------------------- adapters (issue 3)

# Documented only: the registry checks names with a message of its own.
AdapterName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=ADAPTER_NAME_CHARS,
        json_schema_extra={"pattern": ADAPTER_NAME_PATTERN},
    ),
]


class AdapterCard(BaseModel):
    """GET /v1/adapters/{name}: what is served under `name` (never where its files live)."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    parent: str = Field(..., description="the base model's id")
    kind: AdapterKindName
    rank: int = Field(..., description="LoRA rank or bottleneck size (0 for prefix/prompt/ia3)")
    targets: list[str] = Field(
        ..., description="base modules it acts on: q,k,v,o,gate,up,down, embed_tokens, lm_head"
    )
    num_virtual_tokens: int
    size_bytes: int
    tier: Literal["device", "host", "disk"]
    origin: Literal["upload", "path"]
    version: int
    created: int
    replicas: dict[str, str] | None = Field(
        None,
        description="cluster only (server/cluster): the tier of this adapter on each engine "
        "replica that reports it (device = in a slot, host, disk); absent in one process",
    )


class AdapterUploadCard(AdapterCard):
    """POST /v1/adapters: the card of the adapter now served, and the files left out of it."""

    ignored_files: list[str] = Field(
        default_factory=list,
        description="uploaded files (or archive members) outside the allow-list "
        "(adapter_config.json, adapter_model.safetensors, README.md): dropped, never stored",
    )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class LoadLoraAdapterRequest(StrictRequestModel):
    """vLLM's POST /v1/load_lora_adapter body; `lora_path` must lie under an adapter root."""

    lora_name: AdapterName
    lora_path: str = Field(
        ..., min_length=1, max_length=4096, json_schema_extra={"pattern": "^[^\\x00]*$"}
    )
    load_inplace: bool = Field(False, description="replace an adapter of the same name")


class UnloadLoraAdapterRequest(StrictRequestModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: AdapterName
    lora_int_id: Int | None = Field(None, description="accepted for vLLM compatibility; unused")


# ---------------------------------------------------------------- tokenizer (vLLM's shapes)


def _prompt_or_messages_in_schema(schema: dict[str, Any]) -> None:
    """Exactly one of `prompt` and `messages` (the other absent or null), said in the schema."""
    _null_means_default_in_schema(schema)
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
