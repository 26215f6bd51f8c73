"""OpenAI's fine-tuning API (/v1/fine_tuning/jobs) over the FineTuningManager
(server/finetune/jobs.py): a job trains an adapter of any of our kinds on the served base, in a
worker process, and the adapter is served under the job's `fine_tuned_model` name when it
succeeds. Creating and cancelling need the admin key when one is set (a job writes an adapter,
as an upload does); a key sees only its own jobs, the admin key all."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from adapterserve.server.api.deps import caller_key, is_admin, require_admin_key
from adapterserve.server.api.errors import (
    APIError,
    error_responses,
    evaluation_error,
    file_error,
    invalid_request,
)
from adapterserve.server.api.schemas.fine_tuning import (
    FineTuningCheckpointList,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
    FineTuningJobRequest,
    Hyperparameters,
    Training,
)
from adapterserve.server.evaluation.errors import EvaluationError
from adapterserve.server.finetune.adapters import (
    AdapterOptions,
    BottleneckOptions,
    LoraOptions,
    check_options,
)
from adapterserve.server.finetune.files import FileError
from adapterserve.server.finetune.jobs import FineTuningManager, Job, JobError

router = APIRouter(tags=["fine-tuning"])
admin = [Depends(require_admin_key)]
DEFAULTS = {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 1.0}
BASE_LR = 3e-4


def get_manager(request: Request) -> FineTuningManager:
    manager = getattr(request.app.state, "fine_tuning", None)
    if manager is None:
        raise APIError(503, "fine-tuning is not available on this server", code="unavailable")
    return manager


def job_error(exc: JobError) -> APIError:
    kind = {404: "invalid_request_error", 429: "rate_limit_exceeded"}.get(exc.status)
    return APIError(exc.status, exc.message, kind or "invalid_request_error", exc.param, exc.code)


def _owner(request: Request) -> dict[str, Any]:
    return {"caller": caller_key(request), "admin": is_admin(request)}


def resolve(body: FineTuningJobRequest, request: Request, records: int) -> dict[str, Any]:
    """The job's settings with every "auto" resolved (the recipe's defaults)."""
    if body.method is not None and body.method.type != "supervised":
        raise invalid_request(
            f"method.type {body.method.type!r} is not supported: only 'supervised'", "method.type"
        )
    if body.hyperparameters is not None and body.method is not None:
        raise invalid_request(
            "give the hyperparameters in method.supervised.hyperparameters or at the top, not both",
            "hyperparameters",
        )
    given = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        given = body.method.supervised.hyperparameters
    given = given or Hyperparameters()
    hyper = {k: DEFAULTS[k] if getattr(given, k) == "auto" else getattr(given, k) for k in DEFAULTS}
    settings = request.app.state.settings
    options = body.adapter or LoraOptions(kind="lora")
    if isinstance(options, BottleneckOptions) and "bottleneck_size" not in options.model_fields_set:
        options = options.model_copy(
            update={"bottleneck_size": min(256, settings.max_adapter_rank)}
        )
    problem = check_options(options, settings.max_adapter_rank)
    if problem is not None:
        raise invalid_request(problem, problem.split(":")[0])
    training = body.training or Training()
    n = min(records, training.max_records or records)
    steps = math.ceil(n / hyper["batch_size"]) * hyper["n_epochs"]
    steps = min(steps, training.max_steps or steps)
    warmup = training.warmup_steps
    if warmup == "auto":
        warmup = min(100, steps // 10)
    train = {
        "n_epochs": hyper["n_epochs"],
        "batch_size": hyper["batch_size"],
        "micro_batch_size": min(training.micro_batch_size, hyper["batch_size"]),
        "learning_rate": BASE_LR * hyper["learning_rate_multiplier"],
        "warmup_steps": warmup,
        "cutoff_len": training.cutoff_len,
        "train_on_inputs": training.train_on_inputs,
        "seed": body.seed if body.seed is not None else 42,
        "checkpoint_every": training.checkpoint_every,
        "max_steps": training.max_steps,
        "max_records": training.max_records,
    }
    return {
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "suffix": body.suffix,
        "metadata": body.metadata,
        "hyperparameters": hyper,
        "train": train,
        "adapter": TypeAdapter(AdapterOptions).dump_python(options, mode="json"),
        "evaluations": body.evaluations.model_dump() if body.evaluations else None,
    }


def _find(request: Request, job_id: str) -> tuple[FineTuningManager, Job]:
    """The manager and the caller's job `job_id` (404 when it has none of that id)."""
    manager = get_manager(request)
    try:
        return manager, manager.get(job_id, **_owner(request))
    except JobError as exc:
        raise job_error(exc) from None


def _job(job: Job) -> dict[str, Any]:
    return job.to_openai()


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> tuple[list, bool]:
    """OpenAI's cursor paging over newest-first items: those after the one with id `after`."""
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise invalid_request(f"no item {after[:80]!r} to page after", "after")
        items = items[ids.index(after) + 1 :]
    return items[:limit], len(items) > limit


@router.post(
    "/v1/fine_tuning/jobs",
    response_model=FineTuningJob,
    responses=error_responses(403, 404, 429, 503),
    dependencies=admin,
)
async def create_job(body: FineTuningJobRequest, request: Request) -> JSONResponse:
    manager = get_manager(request)
    files = request.app.state.files
    try:
        stored = files.get(body.training_file, **_owner(request))
        train_path: Path = files.content_path(body.training_file, **_owner(request))
        valid_path = None
        if body.validation_file is not None:
            files.get(body.validation_file, **_owner(request))
            valid_path = files.content_path(body.validation_file, **_owner(request))
    except FileError as exc:
        error = file_error(exc)
        if error.param == "file_id":
            error.param = "training_file"
        raise error from None
    resolved = resolve(body, request, stored.records)
    if body.evaluations is not None:
        catalog = request.app.state.evaluations.catalog
        try:
            for name in body.evaluations.datasets:
                catalog.get(name)
        except EvaluationError as exc:
            raise evaluation_error(exc) from None
    try:
        job = manager.create(resolved, train_path, valid_path, owner=caller_key(request))
    except JobError as exc:
        raise job_error(exc) from None
    return JSONResponse(_job(job))


@router.get(
    "/v1/fine_tuning/jobs", response_model=FineTuningJobList, responses=error_responses(400, 503)
)
async def list_jobs(
    request: Request,
    after: str | None = Query(None, max_length=64),
    limit: int = Query(20, ge=1, le=100),
) -> JSONResponse:
    jobs = [_job(j) for j in get_manager(request).list(**_owner(request))]
    data, more = _page(jobs, after, limit)
    return JSONResponse({"object": "list", "data": data, "has_more": more})


@router.get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
    response_model=FineTuningJob,
    responses=error_responses(404, 503),
)
async def get_job(fine_tuning_job_id: str, request: Request) -> JSONResponse:
    return JSONResponse(_job(_find(request, fine_tuning_job_id)[1]))


@router.post(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
    response_model=FineTuningJob,
    responses=error_responses(400, 403, 404, 503),
    dependencies=admin,
)
async def cancel_job(fine_tuning_job_id: str, request: Request) -> JSONResponse:
    try:
        job = await get_manager(request).cancel(fine_tuning_job_id, **_owner(request))
    except JobError as exc:
        raise job_error(exc) from None
    return JSONResponse(_job(job))


@router.get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
    response_model=FineTuningEventList,
    responses=error_responses(400, 404, 503),
)
async def list_events(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = Query(None, max_length=64),
    limit: int = Query(20, ge=1, le=10_000),
) -> JSONResponse:
    """Newest first, as OpenAI lists them; `after` pages on to older events."""
    manager, job = _find(request, fine_tuning_job_id)
    data, more = _page(manager.events(job)[::-1], after, limit)
    return JSONResponse({"object": "list", "data": data, "has_more": more})


@router.get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    response_model=FineTuningCheckpointList,
    responses=error_responses(400, 404, 503),
)
async def list_checkpoints(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = Query(None, max_length=64),
    limit: int = Query(10, ge=1, le=100),
) -> JSONResponse:
    manager, job = _find(request, fine_tuning_job_id)
    data, more = _page(manager.checkpoint_objects(job)[::-1], after, limit)
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return JSONResponse(
        {"object": "list", "data": data, "has_more": more, "first_id": first, "last_id": last}
    )
