"""Evaluations (issue 5): POST/GET /v1/evaluations (jobs: models x datasets) and POST/GET
/v1/datasets."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from adapterserve.server.api.schemas.common import INTEGRAL, StrictRequestModel

DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # server/evaluation/datasets.py


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
