"""Evaluation jobs (/v1/evaluations) and evaluation datasets (/v1/datasets)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from adapterserve.server.api import jsontext
from adapterserve.server.api.deps import caller_key, is_admin, require_admin_key
from adapterserve.server.api.errors import APIError, error_responses, invalid_request, truncate
from adapterserve.server.api.schemas.evaluations import (
    DatasetInfo,
    DatasetList,
    DatasetUpload,
    EvaluationJob,
    EvaluationList,
    EvaluationRequest,
)
from adapterserve.server.evaluation.datasets import answer_spec, validate_records
from adapterserve.server.evaluation.jobs import EvalJob, JobOptions
from adapterserve.server.evaluation.runner import EvaluationRunner

router = APIRouter(tags=["evaluations"])


def get_runner(request: Request) -> EvaluationRunner:
    return request.app.state.evaluations


def parse_jsonl(text: str) -> list[Any]:
    """One JSON value per non-blank line, under the same limits as request bodies (nesting
    depth, valid Unicode); a bad line is a 400 naming its number."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            records.append(jsontext.loads(line, f"jsonl line {number}", "jsonl"))
    return records


def _job_body(job: EvalJob) -> dict:
    return EvaluationJob.model_validate(job.to_dict()).model_dump()


@router.post(
    "/v1/evaluations",
    status_code=202,
    response_model=EvaluationJob,
    responses=error_responses(404, 429),
)
async def create_evaluation(
    body: EvaluationRequest, request: Request, runner: EvaluationRunner = Depends(get_runner)
) -> JSONResponse:
    options = JobOptions(
        models=body.models,
        datasets=body.datasets,
        limit=body.limit,
        protocol=body.protocol,
        seed=body.seed,
        temperature=body.temperature,
        max_tokens=body.max_tokens,
        decoding=body.decoding,
    )
    job = runner.submit(options, owner=caller_key(request))
    return JSONResponse(_job_body(job), status_code=202)


@router.get("/v1/evaluations", response_model=EvaluationList)
async def list_evaluations(
    request: Request, runner: EvaluationRunner = Depends(get_runner)
) -> JSONResponse:
    """The jobs this API key created (every job for the admin key)."""
    jobs = runner.list(caller_key(request), is_admin(request))
    return JSONResponse({"object": "list", "data": [_job_body(j) for j in jobs]})


@router.get(
    "/v1/evaluations/{job_id}", response_model=EvaluationJob, responses=error_responses(404)
)
async def get_evaluation(
    job_id: str, request: Request, runner: EvaluationRunner = Depends(get_runner)
) -> JSONResponse:
    """A job this API key created (any job for the admin key); 404 for another key's job."""
    return JSONResponse(_job_body(runner.get(job_id, caller_key(request), is_admin(request))))


@router.get(
    "/v1/evaluations/{job_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}, **error_responses(404)},
)
async def get_evaluation_results(
    job_id: str, request: Request, runner: EvaluationRunner = Depends(get_runner)
) -> StreamingResponse:
    """One JSON object per scored example (model, dataset, index, instruction, response,
    extracted, gold, correct), in the order they finished; for the key that created the job
    and the admin key (404 for another key)."""
    runner.get(job_id, caller_key(request), is_admin(request))
    return StreamingResponse(runner.iter_results(job_id), media_type="application/x-ndjson")


@router.delete(
    "/v1/evaluations/{job_id}", response_model=EvaluationJob, responses=error_responses(404)
)
async def cancel_evaluation(
    job_id: str, request: Request, runner: EvaluationRunner = Depends(get_runner)
) -> JSONResponse:
    """Cancel a job: allowed to the API key that created it, or to the admin key (404 for
    another key, as for reading it)."""
    job = await runner.cancel(job_id, caller_key(request), is_admin(request))
    return JSONResponse(_job_body(job))


@router.get("/v1/datasets", response_model=DatasetList)
async def list_datasets(runner: EvaluationRunner = Depends(get_runner)) -> JSONResponse:
    return JSONResponse({"object": "list", "data": runner.catalog.describe_all()})


@router.post(
    "/v1/datasets",
    status_code=201,
    response_model=DatasetInfo,
    responses=error_responses(403, 409),
    dependencies=[Depends(require_admin_key)],
)
async def register_dataset(
    body: DatasetUpload, runner: EvaluationRunner = Depends(get_runner)
) -> JSONResponse:
    """Register a dataset: `records` (JSON array) or `jsonl` (JSON Lines text) of objects with
    `instruction` and `answer`, and the answer kind (number, letter A-E, or `answer_words`)."""
    spec = answer_spec(body.answer_kind, body.answer_words)
    if (body.records is None) == (body.jsonl is None):
        raise invalid_request(
            "Send the records either as 'records' or as 'jsonl', not both.", "records"
        )
    raw = body.records if body.records is not None else parse_jsonl(body.jsonl or "")
    records = validate_records(raw, spec)
    dataset = runner.catalog.register(body.name, spec, records, replace=body.replace)
    return JSONResponse(dataset.describe(len(records)), status_code=201)


@router.delete(
    "/v1/datasets/{name}",
    response_model=DatasetInfo,
    responses=error_responses(403, 404, 409),
    dependencies=[Depends(require_admin_key)],
)
async def delete_dataset(name: str, runner: EvaluationRunner = Depends(get_runner)) -> JSONResponse:
    """Remove a registered dataset (not a built-in one), unless a queued or running job uses it."""
    if runner.uses_dataset(name):
        raise APIError(
            409,
            f"A queued or running evaluation job uses the dataset {truncate(name)}; cancel "
            "it or wait for it to finish.",
            param="name",
            code="dataset_in_use",
        )
    dataset = runner.catalog.delete(name)
    runner.metrics.forget_dataset(dataset.name)
    return JSONResponse(dataset.describe(None))
