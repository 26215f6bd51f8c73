"""Evaluation jobs: models x datasets through the shared engine, with results on disk.

One job runs at a time (others wait as `queued`); worker.ExampleWorker scores its examples,
interleaving its models, and storage.JobStore keeps it: `<jobs_dir>/<id>/job.json` and every
scored example in `<jobs_dir>/<id>/results.jsonl`. After a restart, finished jobs and their rows
are back, queued jobs run again, and a job that was running when the process died is marked
failed (its finished rows are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.errors import EngineDeadError
from adapterserve.server.evaluation.datasets import DatasetCatalog
from adapterserve.server.evaluation.errors import (
    EvaluationError,
    InvalidJobError,
    JobModelNotFoundError,
    JobNotFoundError,
    JobQueueFullError,
    quoted,
)
from adapterserve.server.evaluation.jobs import (
    FINAL_STATES,
    STATES,
    Cell,
    EvalJob,
    JobOptions,
    JobStatus,
    visible,
)
from adapterserve.server.evaluation.storage import JobStore
from adapterserve.server.evaluation.worker import ExampleWorker
from adapterserve.server.metrics import Metrics

log = logging.getLogger(__name__)

BASE_ALIAS = "base"
RETRY_QUEUED_S = 30  # seconds to wait when the job queue is full: jobs run for minutes


class EvaluationRunner:
    """Owns every evaluation job of one server: validation, the worker, persistence."""

    def __init__(
        self,
        engine: EngineClient,
        catalog: DatasetCatalog,
        jobs_dir: Path,
        max_inflight: int,
        metrics: Metrics,
        adapter_exists: Callable[[str], bool] = lambda name: False,
        max_queued: int = 16,
        max_jobs: int = 256,
    ) -> None:
        self.engine, self.catalog, self.metrics = engine, catalog, metrics
        self.adapter_exists = adapter_exists
        self.store = JobStore(jobs_dir)
        self.worker = ExampleWorker(engine, catalog, self.store, metrics, max_inflight)
        self.max_queued, self.max_jobs = max_queued, max_jobs
        self.jobs: dict[str, EvalJob] = {}
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Reload jobs from disk, requeue the queued ones, and start the worker."""
        self.store.jobs_dir.mkdir(parents=True, exist_ok=True)
        for job in sorted(self.store.load_jobs(), key=lambda j: j.created):
            self.jobs[job.id] = job
            if job.status == "queued":
                self._pending.put_nowait(job.id)
        self._prune()
        self._publish_states()
        self._worker = asyncio.ensure_future(self._work())

    async def stop(self) -> None:
        """Cancel the running job (its finished rows stay); queued jobs wait for the next start."""
        running = [j for j in self.jobs.values() if j.status == "running"]
        for job in running:
            await self._cancel_running(job, "the server shut down while the job was running")
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    # ---- API ------------------------------------------------------------------------------
    def submit(self, options: JobOptions, owner: str | None = None) -> EvalJob:
        """Validate models, datasets and protocol (JobModelNotFoundError, DatasetNotFoundError,
        InvalidJobError), then queue the job for `owner` (a fingerprint of the creating API key);
        JobQueueFullError when too many jobs wait."""
        engine_models = self._resolve_models(options.models)
        datasets = [self.catalog.get(name) for name in options.datasets]
        self._check_queue_room()
        _check_distinct([d.name for d in datasets], "datasets")
        if options.protocol == "loglikelihood":
            for dataset in datasets:
                if not dataset.spec.multiple_choice:
                    raise InvalidJobError(
                        f"The dataset {dataset.name!r} has numeric answers: it can only be "
                        "evaluated with protocol 'generate'.",
                        "protocol",
                    )
        if options.decoding == "beam" and options.protocol != "generate":
            raise InvalidJobError(
                "decoding 'beam' generates answers: it needs protocol 'generate'.", "decoding"
            )
        if options.decoding == "beam" and options.temperature != 0:
            raise InvalidJobError(
                "decoding 'beam' is deterministic (the paper's 4-beam search without sampling): "
                "temperature must be 0 or omitted.",
                "temperature",
            )
        options = JobOptions(**{**options.__dict__, "datasets": [d.name for d in datasets]})
        cells = {
            (label, d.name): Cell(
                label, d.name, _count(len(self.catalog.examples(d)), options.limit)
            )
            for d in datasets
            for label in options.models
        }
        job = EvalJob(f"eval-{uuid.uuid4().hex[:24]}", options, engine_models, cells, owner=owner)
        self.jobs[job.id] = job
        self.store.create(job)
        self._pending.put_nowait(job.id)
        self._prune()
        self._publish_states()
        return job

    def _check_queue_room(self) -> None:
        queued = sum(1 for job in self.jobs.values() if job.status == "queued")
        if queued >= self.max_queued:
            raise JobQueueFullError(
                f"{queued} evaluation jobs are already waiting to run (the limit); retry when "
                "one has started, or cancel one.",
                RETRY_QUEUED_S,
            )

    def _prune(self) -> None:
        """Keep at most `max_jobs` jobs: the oldest finished ones (and their rows) go first."""
        finished = sorted(
            (j for j in self.jobs.values() if j.status in FINAL_STATES), key=lambda j: j.created
        )
        for job in finished[: max(0, len(self.jobs) - self.max_jobs)]:
            del self.jobs[job.id]
            self.store.remove(job.id)

    def uses_dataset(self, name: str) -> bool:
        """Whether a queued or running job evaluates the dataset `name`."""
        return any(
            name in job.options.datasets
            for job in self.jobs.values()
            if job.status not in FINAL_STATES
        )

    def get(self, job_id: str, caller: str | None = None, admin: bool = True) -> EvalJob:
        """The job `job_id` if the caller may see it (see `visible`), else JobNotFoundError:
        another key's job answers as one that does not exist."""
        job = self.jobs.get(job_id)
        if job is None or not visible(job, caller, admin):
            raise JobNotFoundError(
                f"No evaluation job {quoted(job_id)}; GET /v1/evaluations lists them."
            )
        return job

    def list(self, caller: str | None = None, admin: bool = True) -> list[EvalJob]:
        """The jobs the caller may see, newest first."""
        jobs = [job for job in self.jobs.values() if visible(job, caller, admin)]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    async def cancel(self, job_id: str, caller: str | None = None, admin: bool = True) -> EvalJob:
        """Cancel a queued or running job; a finished job is returned unchanged. Only the key
        that created the job (`caller` is its fingerprint) or the admin key sees it, so only
        they may cancel it (JobNotFoundError for anyone else)."""
        job = self.get(job_id, caller, admin)
        if job.status == "queued":
            self._finish(job, "cancelled", "cancelled by a client")
        elif job.status == "running":
            await self._cancel_running(job, "cancelled by a client")
        return job

    def results_path(self, job_id: str) -> Path:
        return self.store.results_path(self.get(job_id).id)

    def iter_results(self, job_id: str) -> Iterator[bytes]:
        """Complete JSONL lines written so far (a line being written is left out)."""
        return self.store.iter_results(job_id)

    # ---- validation -----------------------------------------------------------------------
    def _resolve_models(self, labels: list[str]) -> dict[str, str | None]:
        _check_distinct(labels, "models")
        resolved: dict[str, str | None] = {}
        for label in labels:
            if label in (BASE_ALIAS, self.engine.model_id):
                resolved[label] = None
            elif self.adapter_exists(label):
                resolved[label] = label
            else:
                raise JobModelNotFoundError(
                    f"The model {quoted(label)} does not exist; GET /v1/models lists the "
                    f"served models ('{BASE_ALIAS}' selects the base model).",
                    "models",
                )
        return resolved

    # ---- one job at a time ---------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job = self.jobs.get(await self._pending.get())
            if job is None or job.status != "queued":
                continue
            job.task = asyncio.ensure_future(self._run(job))
            await asyncio.wait({job.task})  # returns when the job ends, cancelled or not

    async def _run(self, job: EvalJob) -> None:
        job.status, job.started_at = "running", time.time()
        self.store.save(job)
        self._publish_states()
        try:
            await self.worker.run(job)
        except asyncio.CancelledError:
            return  # whoever cancelled the task records the outcome
        except EvaluationError as exc:
            self._finish(job, "failed", exc.message)
        except EngineDeadError:
            self._finish(job, "failed", "the inference engine stopped")
        except Exception as exc:  # noqa: BLE001 - a job's fault must not stop the worker
            log.exception("evaluation job %s failed", job.id)
            self._finish(job, "failed", f"internal error: {type(exc).__name__}")
        else:
            self._finish(job, "succeeded", None)

    # ---- state ----------------------------------------------------------------------------
    async def _cancel_running(self, job: EvalJob, reason: str) -> None:
        self._finish(job, "cancelled", reason)
        if job.task is not None:
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task

    def _finish(self, job: EvalJob, status: JobStatus, error: str | None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        self.store.save(job)
        self._publish_states()

    def _publish_states(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for job in self.jobs.values():
            counts[job.status] += 1
        self.metrics.set_eval_jobs(counts)


def _count(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _check_distinct(names: list[str], param: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise InvalidJobError(f"'{param}' lists {quoted(sorted(seen)[0])} more than once.", param)


def build_runner(
    settings: Settings, engine: EngineClient, metrics: Metrics, state: Any
) -> EvaluationRunner:
    """The runner of one app; adapters are looked up in `state.registry` when there is one."""

    def adapter_exists(name: str) -> bool:
        registry = getattr(state, "registry", None)
        return registry is not None and bool(registry.exists(name))

    catalog = DatasetCatalog(
        settings.data_dir,
        settings.user_datasets_dir,
        settings.max_datasets,
        settings.max_dataset_bytes,
    )
    inflight = settings.eval_max_inflight or max(1, settings.max_num_seqs // 2)
    return EvaluationRunner(
        engine,
        catalog,
        settings.eval_jobs_dir,
        inflight,
        metrics,
        adapter_exists,
        settings.max_queued_evaluations,
        settings.max_evaluation_jobs,
    )
