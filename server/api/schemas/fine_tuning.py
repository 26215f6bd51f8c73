"""OpenAI's fine-tuning API (issue 27): POST/GET /v1/fine_tuning/jobs, GET .../{id},
POST .../{id}/cancel, GET .../{id}/events, GET .../{id}/checkpoints; OpenAI's shapes, plus our
extensions: `adapter` (the kind and its settings), `training` (the recipe's other settings) and
`evaluations` (datasets to score the base and the result on when the job succeeds)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapterserve.server.api.schemas.common import INTEGRAL, StrictRequestModel
from adapterserve.server.finetune.adapters import AdapterOptions

FILE_ID = r"^file-[0-9a-f]{24}$"


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters; "auto" is the LLM-Adapters recipe."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Annotated[int, Field(ge=1, le=50), INTEGRAL] | Literal["auto"] = Field(
        "auto", description="auto = 3"
    )
    batch_size: Annotated[int, Field(ge=1, le=256), INTEGRAL] | Literal["auto"] = Field(
        "auto", description="auto = 16"
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        "auto", description="of 3e-4 (LLM-Adapters); auto = 1"
    )


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: Supervised | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class Training(BaseModel):
    """Our extension: the rest of the recipe (LLM-Adapters' finetune.py defaults)."""

    model_config = ConfigDict(extra="forbid")
    micro_batch_size: Annotated[int, Field(ge=1, le=256), INTEGRAL] = Field(
        4, description="examples per forward; the batch accumulates micro-batches"
    )
    cutoff_len: Annotated[int, Field(ge=8, le=8192), INTEGRAL] = Field(
        256, description="tokens per example (longer ones are cut)"
    )
    warmup_steps: Annotated[int, Field(ge=0, le=100_000), INTEGRAL] | Literal["auto"] = Field(
        "auto", description="linear warm-up; auto = min(100, a tenth of the steps)"
    )
    train_on_inputs: bool = Field(True, description="the prompt's tokens in the loss too")
    checkpoint_every: Annotated[int, Field(ge=0, le=100_000), INTEGRAL] = Field(
        25, description="optimizer steps between checkpoints (0: none)"
    )
    max_steps: Annotated[int, Field(ge=1, le=10_000_000), INTEGRAL] | None = Field(
        None, description="stop after this many optimizer steps"
    )
    max_records: Annotated[int, Field(ge=1), INTEGRAL] | None = Field(
        None, description="train on the training file's first N records"
    )


class Evaluations(BaseModel):
    """Our extension: an evaluation job (base vs the result) started when the job succeeds."""

    model_config = ConfigDict(extra="forbid")
    datasets: list[str] = Field(..., min_length=1, max_length=16)
    limit: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    decoding: Literal["greedy", "beam"] = "greedy"
    max_tokens: Annotated[int, Field(ge=1, le=4096), INTEGRAL] | None = None


class FineTuningJobRequest(StrictRequestModel):
    model: str = Field(..., min_length=1, max_length=256, description="the base model's id")
    training_file: str = Field(..., pattern=FILE_ID)
    validation_file: str | None = Field(None, pattern=FILE_ID)
    suffix: str | None = Field(
        None, min_length=1, max_length=24, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    seed: Annotated[int, Field(ge=0, le=2_147_483_647), INTEGRAL] | None = None
    hyperparameters: Hyperparameters | None = Field(
        None, description="deprecated by OpenAI in favour of method; accepted"
    )
    method: Method | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    integrations: list[dict[str, Any]] | None = Field(None, max_length=0)
    adapter: AdapterOptions | None = Field(
        None, description="the adapter to train (our extension); default LoRA r 8 (the paper's)"
    )
    training: Training | None = None
    evaluations: Evaluations | None = None


class FineTuningJob(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: dict[str, Any] | None
    seed: int


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any]
    type: Literal["message", "metrics"]


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    has_more: bool


class FineTuningCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class FineTuningCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
