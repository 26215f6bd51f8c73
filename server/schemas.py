"""Pydantic request/response models in OpenAI's shapes (plus vLLM's sampling extras).

Requests: unknown fields are ignored (OpenAI clients send extras), `null` means "default",
floats must be finite. Checks that need the model (vocabulary, context length, `n` cap)
happen in the routers.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_N = 128  # hard schema bound; settings.max_n caps it lower in the routers

Bias = Annotated[float, Field(ge=-100, le=100)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingFields(RequestModel):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="served model id; omitted = the base model")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM extra; -1 or 0 = off")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Bias] | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extra")
    min_tokens: int = Field(0, ge=0, description="vLLM extra")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra")

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
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

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
        raise ValueError("suffix is not supported; remove it")

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
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] = ""
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


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, ge=0, description="deprecated alias of max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = Field(True, description="vLLM extra")
    # Accepted only to be refused: the model's own template is the only one ever rendered.
    chat_template: Any = Field(None, description="not supported: always 400")
    chat_template_kwargs: Any = Field(None, description="not supported: always 400")
    tools: list[Any] | None = Field(None, description="not supported: a non-empty list is a 400")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")

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

    @field_validator("response_format", mode="before")
    @classmethod
    def _check_response_format(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("type", "text") != "text":
            raise ValueError("only {'type': 'text'} is supported")
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


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
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


class EvaluationRequest(RequestModel):
    """POST /v1/evaluations: models (`base` = the base model, or adapter names) x datasets."""

    models: list[str] = Field(..., min_length=1, max_length=64)
    datasets: list[str] = Field(..., min_length=1, max_length=64)
    limit: int | None = Field(None, ge=1, description="first N records of each dataset; default all")
    protocol: Literal["generate", "loglikelihood"] = "generate"
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy (default)")
    max_tokens: int | None = Field(
        None, ge=1, le=4096, description="override the paper's max new tokens (256 / 32)"
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
    progress: EvaluationProgress
    results: list[EvaluationCell]
    started_at: float | None
    finished_at: float | None
    error: str | None
    note: str


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationJob]


class DatasetUpload(RequestModel):
    """POST /v1/datasets: records as a JSON array (`records`) or JSON Lines text (`jsonl`)."""

    name: str = Field(..., min_length=1, max_length=64)
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


class AdapterCard(BaseModel):
    """GET /v1/adapters/{name}: what is served under `name` (never where its files live)."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    parent: str = Field(..., description="the base model's id")
    kind: Literal["lora", "series", "parallel", "prefix", "prompt", "ia3"]
    rank: int = Field(..., description="LoRA rank or bottleneck size (0 for prefix/prompt/ia3)")
    targets: list[str] = Field(..., description="base linears it acts on: q,k,v,o,gate,up,down")
    num_virtual_tokens: int
    size_bytes: int
    tier: Literal["device", "host", "disk"]
    origin: Literal["upload", "path"]
    version: int
    created: int


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


class LoadLoraAdapterRequest(RequestModel):
    """vLLM's POST /v1/load_lora_adapter body; `lora_path` must lie under an adapter root."""

    lora_name: str = Field(..., min_length=1, max_length=64)
    lora_path: str = Field(..., min_length=1, max_length=4096)
    load_inplace: bool = Field(False, description="replace an adapter of the same name")


class UnloadLoraAdapterRequest(RequestModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: str = Field(..., min_length=1, max_length=64)
    lora_int_id: int | None = Field(None, description="accepted for vLLM compatibility; unused")
