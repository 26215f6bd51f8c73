"""Evaluation jobs: models x datasets through the shared engine, with results on disk.

One job runs at a time (others wait as `queued`). A job interleaves its models example by
example, so the engine decodes the adapters of one job side by side in the same steps, and it
keeps at most `max_inflight` engine requests in flight, so that online traffic keeps its slots.
Every scored example is appended to `<jobs_dir>/<id>/results.jsonl` as it finishes; the job
itself is `<jobs_dir>/<id>/job.json`. After a restart, finished jobs and their rows are back,
queued jobs run again, and a job that was running when the process died is marked failed
(its finished rows are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapterserve.server.config import Settings
from adapterserve.server.engine.engine import Engine, RequestStream
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineFailure,
    QueueFullError,
    ReplicaLostError,
)
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.evaluation.datasets import Dataset, DatasetCatalog, Example, _atomic_write
from adapterserve.server.evaluation.errors import (
    EvaluationError,
    ExampleFailedError,
    InvalidJobError,
    JobModelNotFoundError,
    JobNotFoundError,
    JobQueueFullError,
    quoted,
)
from adapterserve.server.evaluation.extract import AnswerSpec, extract, is_correct, split_response
from adapterserve.server.evaluation.prompts import generate_prompt
from adapterserve.server.metrics import Metrics

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
BASE_ALIAS = "base"
QUEUE_FULL_BACKOFF_S = (0.05, 1.0)
RETRY_QUEUED_S = 30  # seconds to wait when the job queue is full: jobs run for minutes
# Engine refusals that pass: a full queue (online traffic), a lost replica or a restarting
# engine (EngineRestartingError is a ReplicaLostError). server/errors.py answers the same ones
# with Retry-After (ENGINE_ERRORS); tests/evaluation/test_errors.py keeps the two in step.
RETRYABLE_ENGINE_ERRORS = (QueueFullError, ReplicaLostError)
LOST_REPLICA_RETRIES = 3  # a request whose cluster replica died runs again this often
PAPER_BEAMS = 4  # LLM-Adapters' evaluate.py: generate(num_beams=4), do_sample left False
PAPER_NOTE = (
    "The LLM-Adapters paper decoded with 4-beam search (generate(num_beams=4) without sampling; "
    "its temperature 0.1, top_p 0.75 and top_k 40 do not apply then); this job decodes {how}, "
    "so accuracies can differ from the published ones (decoding 'beam' runs the paper's)."
)
BEAM_NOTE = (
    "Decoded as the LLM-Adapters paper did: 4-beam search without sampling, the best beam's "
    "answer extracted{tokens}."
)
LOGLIKELIHOOD_NOTE = (
    "Protocol loglikelihood picks the answer word with the highest log-probability after the "
    "prompt; the paper generated answers with 4-beam search and extracted them, so these "
    "accuracies are not comparable with the published ones."
)
ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


@dataclass(frozen=True)
class JobOptions:
    """What a job was asked to do (validated by the router's schema)."""

    models: list[str]
    datasets: list[str]
    limit: int | None = None
    protocol: Literal["generate", "loglikelihood"] = "generate"
    seed: int | None = None
    temperature: float = 0.0
    max_tokens: int | None = None  # override of the paper's max new tokens (tests, quick runs)
    decoding: Literal["greedy", "beam"] = "greedy"  # greedy = temperature (0: greedy)


@dataclass
class Cell:
    """Progress of one model on one dataset."""

    model: str
    dataset: str
    total: int
    done: int = 0
    correct: int = 0

    def to_dict(self) -> dict[str, Any]:
        accuracy = self.correct / self.done if self.done else None
        return {
            "model": self.model,
            "dataset": self.dataset,
            "total": self.total,
            "done": self.done,
            "correct": self.correct,
            "accuracy": accuracy,
        }


@dataclass
class EvalJob:
    id: str
    options: JobOptions
    engine_models: dict[str, str | None]  # label -> engine model name (None = base model)
    cells: dict[tuple[str, str], Cell]
    created: int = field(default_factory=lambda: int(time.time()))
    status: JobStatus = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    owner: str | None = None  # fingerprint of the API key that created it (None: keys off)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.cells.values())

    @property
    def done(self) -> int:
        return sum(c.done for c in self.cells.values())

    def eta_s(self) -> float | None:
        if self.status != "running" or not self.started_at or not self.done:
            return None
        elapsed = time.time() - self.started_at
        return elapsed / self.done * (self.total - self.done)

    def to_dict(self) -> dict[str, Any]:
        how = "greedily" if self.options.temperature == 0 else "by sampling"
        note = PAPER_NOTE.format(how=how)
        if self.options.protocol == "loglikelihood":
            note = LOGLIKELIHOOD_NOTE
        elif self.options.decoding == "beam":
            tokens = "" if self.options.max_tokens is None else (
                f"; max new tokens {self.options.max_tokens} instead of the paper's"
            )  # fmt: skip
            note = BEAM_NOTE.format(tokens=tokens)
        return {
            "id": self.id,
            "object": "evaluation",
            "status": self.status,
            "created": self.created,
            "models": self.options.models,
            "datasets": self.options.datasets,
            "limit": self.options.limit,
            "protocol": self.options.protocol,
            "seed": self.options.seed,
            "temperature": self.options.temperature,
            "max_tokens": self.options.max_tokens,
            "decoding": self.options.decoding,
            "progress": {"done": self.done, "total": self.total, "eta_s": self.eta_s()},
            "results": [c.to_dict() for c in self.cells.values()],
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "note": note,
        }


@dataclass(frozen=True)
class Work:
    """One example for one model."""

    label: str
    dataset: Dataset
    example: Example


class EvaluationRunner:
    """Owns every evaluation job of one server: validation, the worker, persistence."""

    def __init__(
        self,
        engine: Engine,
        catalog: DatasetCatalog,
        jobs_dir: Path,
        max_inflight: int,
        metrics: Metrics,
        adapter_exists: Callable[[str], bool] = lambda name: False,
        max_queued: int = 16,
        max_jobs: int = 256,
    ) -> None:
        self.engine, self.catalog, self.jobs_dir = engine, catalog, jobs_dir
        self.max_inflight, self.metrics, self.adapter_exists = max_inflight, metrics, adapter_exists
        self.max_queued, self.max_jobs = max_queued, max_jobs
        self.jobs: dict[str, EvalJob] = {}
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Reload jobs from disk, requeue the queued ones, and start the worker."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for job in sorted(self._load_jobs(), key=lambda j: j.created):
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
                "temperature must be 0 or omitted.", "temperature",
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
        self._job_dir(job.id).mkdir(parents=True, exist_ok=True)
        self._save(job)
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
        finished = sorted((j for j in self.jobs.values() if j.status in FINAL_STATES),
                          key=lambda j: j.created)  # fmt: skip
        for job in finished[: max(0, len(self.jobs) - self.max_jobs)]:
            del self.jobs[job.id]
            shutil.rmtree(self._job_dir(job.id), ignore_errors=True)

    def uses_dataset(self, name: str) -> bool:
        """Whether a queued or running job evaluates the dataset `name`."""
        return any(name in job.options.datasets for job in self.jobs.values()
                   if job.status not in FINAL_STATES)  # fmt: skip

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
        return self._job_dir(self.get(job_id).id) / "results.jsonl"

    def iter_results(self, job_id: str) -> Iterator[bytes]:
        """Complete JSONL lines written so far (a line being written is left out)."""
        path = self._job_dir(job_id) / "results.jsonl"
        if not path.is_file():
            return
        with path.open("rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield line

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

    # ---- the worker -----------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job = self.jobs.get(await self._pending.get())
            if job is None or job.status != "queued":
                continue
            job.task = asyncio.ensure_future(self._run(job))
            await asyncio.wait({job.task})  # returns when the job ends, cancelled or not

    async def _run(self, job: EvalJob) -> None:
        job.status, job.started_at = "running", time.time()
        self._save(job)
        self._publish_states()
        try:
            await self._run_examples(job)
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

    async def _run_examples(self, job: EvalJob) -> None:
        slots = asyncio.Semaphore(self.max_inflight)  # engine requests in flight
        examples = asyncio.Semaphore(self.max_inflight)  # examples being worked on
        pending: set[asyncio.Task] = set()
        with self.results_path(job.id).open("a", encoding="utf-8") as out:
            try:
                for work in self._plan(job):
                    await examples.acquire()
                    task = asyncio.ensure_future(self._score(job, work, slots, out))
                    task.add_done_callback(lambda _: examples.release())
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                for task in pending:
                    task.cancel()  # a cancelled task aborts its engine request
                await asyncio.gather(*pending, return_exceptions=True)

    def _plan(self, job: EvalJob) -> Iterator[Work]:
        """Dataset by dataset, example by example, every model in turn: models share steps."""
        done = self._finished_keys(job.id)
        for name in job.options.datasets:
            dataset = self.catalog.get(name)
            examples = self.catalog.examples(dataset)[
                : job.cells[(job.options.models[0], name)].total
            ]
            for example in examples:
                for label in job.options.models:
                    if (label, name, example.index) not in done:
                        yield Work(label, dataset, example)

    async def _score(self, job: EvalJob, work: Work, slots: asyncio.Semaphore, out) -> None:
        if job.options.protocol == "loglikelihood":
            row = await self._score_loglikelihood(job, work, slots)
        else:
            row = await self._score_generate(job, work, slots)
        if job.status != "running":
            return
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        cell = job.cells[(work.label, work.dataset.name)]
        cell.done += 1
        cell.correct += int(row["correct"])
        self.metrics.on_eval_example(work.label, work.dataset.name)

    async def _score_generate(self, job: EvalJob, work: Work, slots: asyncio.Semaphore) -> dict:
        prompt = generate_prompt(work.example.instruction)
        ids = self.engine.tokenizer.encode(prompt)
        wanted = job.options.max_tokens or work.dataset.max_new_tokens
        # What the HTTP routers check, this caller fits: prompt + max_tokens within the context
        # (a prompt that fills it is not sent at all).
        max_tokens = max(0, min(wanted, self.engine.max_model_len - len(ids)))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=job.options.temperature,
            seed=None
            if job.options.seed is None
            else (job.options.seed + work.example.index) % 2**63,
        )
        if job.options.decoding == "beam":  # the paper's generate(num_beams=4), best beam
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, beam_width=PAPER_BEAMS)
        text = "" if max_tokens == 0 else await self._generate(job, work, ids, params, slots)
        response = split_response(prompt + text)
        extracted = extract(response, work.dataset.spec)
        row = _row(job, work, response, extracted)
        if max_tokens == 0:
            row["error"] = "the prompt fills the model's context; nothing was generated"
        return row

    async def _score_loglikelihood(
        self, job: EvalJob, work: Work, slots: asyncio.Semaphore
    ) -> dict:
        prompt = generate_prompt(work.example.instruction)
        # As lm-evaluation-harness does: trailing whitespace of the context moves to the
        # continuation, and context and continuation are tokenized apart, so that every
        # candidate is scored after the same context tokens.
        context = prompt.rstrip()
        context_ids = self.engine.tokenizer.encode(context)
        candidates = {
            word: self.engine.tokenizer.encode(
                prompt[len(context) :] + word, add_special_tokens=False
            )
            for word in choices(work.example.instruction, work.dataset.spec)
        }
        longest = len(context_ids) + max(len(ids) for ids in candidates.values())
        if longest > self.engine.max_model_len:  # never sent: the engine asserts it fits
            row = _row(job, work, "", None)
            row["error"] = f"prompt + answer ({longest} tokens) exceed the model's context"
            return row
        scores: dict[str, float] = {}
        for word, word_ids in candidates.items():
            scores[word] = await self._loglikelihood(job, work, context_ids, word_ids, slots)
        best = max(scores, key=scores.__getitem__)
        row = _row(job, work, best, best)
        row["scores"] = scores
        return row

    async def _generate(
        self, job, work: Work, ids: list[int], params: SamplingParams, slots
    ) -> str:
        outputs = await self._request(job, work, ids, params, slots)
        return "".join(output.text for output in outputs)

    async def _loglikelihood(
        self, job, work: Work, context: list[int], word: list[int], slots
    ) -> float:
        params = SamplingParams(max_tokens=0, prompt_logprobs=0)
        outputs = await self._request(job, work, context + word, params, slots)
        logprobs = next((o.prompt_logprobs for o in reversed(outputs) if o.prompt_logprobs), None)
        assert logprobs is not None, "a max_tokens=0 request returns its prompt logprobs"
        return sum(entry.logprob for entry in logprobs[-len(word) :] if entry is not None)

    async def _request(
        self, job, work: Work, ids: list[int], params: SamplingParams, slots
    ) -> list[RequestOutput]:
        """One engine request's outputs. A request whose cluster replica died
        (ReplicaLostError) runs again, on another replica, up to LOST_REPLICA_RETRIES times."""
        for attempt in range(LOST_REPLICA_RETRIES + 1):
            outputs = []
            async with slots:
                stream = await self._add(job, work, ids, params)
                async for output in stream:
                    outputs.append(output)
            last = outputs[-1]
            if last.finish_reason != "error":
                return outputs
            if not isinstance(last.error, ReplicaLostError) or attempt == LOST_REPLICA_RETRIES:
                raise self._request_failed(work, last.error)
            log.warning("evaluation job %s: a replica was lost; running %s / %s example %d "
                        "again", job.id, work.label, work.dataset.name, work.example.index)  # fmt: skip
        raise AssertionError("unreachable")

    def _request_failed(self, work: Work, error: EngineFailure | None) -> Exception:
        if isinstance(error, EngineDeadError):  # a fatal fault: the job cannot go on
            return error
        detail = f": {str(error)[:200]}" if error else ""
        where = f"{work.label} / {work.dataset.name}"
        return ExampleFailedError(f"the engine failed on {where}{detail}")

    async def _add(self, job: EvalJob, work: Work, ids: list[int], params) -> RequestStream:
        """Submit one engine request; a retryable refusal (RETRYABLE_ENGINE_ERRORS: a full queue
        from online traffic, a lost replica) waits and tries again, any other fails the job
        (ExampleFailedError; EngineDeadError as it is)."""
        delay, longest = QUEUE_FULL_BACKOFF_S
        request_id = (
            f"{job.id}-{job.options.models.index(work.label)}-{work.dataset.name}-"
            f"{work.example.index}-{uuid.uuid4().hex[:8]}"
        )
        model = job.engine_models[work.label]
        while True:
            try:
                if params.beam_width > 1:  # the best beam's answer only
                    [[stream]] = self.engine.add_beam_searches([(ids, params, [request_id])], model)
                    await self.engine.confirm([stream])
                    return stream
                stream = self.engine.add_request(ids, params, model, request_id)
                await self.engine.confirm([stream])  # a cluster's refusals arrive here
                return stream
            except EngineDeadError:
                raise
            except EngineError as exc:
                if not isinstance(exc, RETRYABLE_ENGINE_ERRORS):
                    where = f"{work.dataset.name} example {work.example.index}"
                    raise ExampleFailedError(f"{where}: {exc.message}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)

    # ---- state and persistence ------------------------------------------------------------
    async def _cancel_running(self, job: EvalJob, reason: str) -> None:
        self._finish(job, "cancelled", reason)
        if job.task is not None:
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task

    def _finish(self, job: EvalJob, status: JobStatus, error: str | None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        self._save(job)
        self._publish_states()

    def _publish_states(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for job in self.jobs.values():
            counts[job.status] += 1
        self.metrics.set_eval_jobs(counts)

    def _job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _save(self, job: EvalJob) -> None:
        record = job.to_dict() | {
            "engine_models": job.engine_models,
            "options": job.options.__dict__,
            "owner": job.owner,
        }
        _atomic_write(self._job_dir(job.id) / "job.json", json.dumps(record))

    def _finished_keys(self, job_id: str) -> set[tuple[str, str, int]]:
        rows = (json.loads(line) for line in self.iter_results(job_id))
        return {(r["model"], r["dataset"], r["index"]) for r in rows}

    def _load_jobs(self) -> Iterator[EvalJob]:
        for path in self.jobs_dir.glob("*/job.json"):
            try:
                yield self._load_job(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable evaluation job file: %s", path)

    def _load_job(self, record: dict[str, Any]) -> EvalJob:
        cells = {
            (c["model"], c["dataset"]): Cell(c["model"], c["dataset"], c["total"])
            for c in record["results"]
        }
        job = EvalJob(
            record["id"],
            JobOptions(**record["options"]),
            record["engine_models"],
            cells,
            record["created"],
            record["status"],
            record["started_at"],
            record["finished_at"],
            record["error"],
            record.get("owner"),
        )
        for line in self.iter_results(job.id):  # counts come from the rows, which are the truth
            row = json.loads(line)
            cell = cells[(row["model"], row["dataset"])]
            cell.done += 1
            cell.correct += int(row["correct"])
        if job.status == "running":  # the process died mid-job
            job.status, job.error = "failed", "interrupted: the server stopped while the job ran"
            job.finished_at = time.time()
            self._save(job)
        return job


def visible(job: EvalJob, caller: str | None, admin: bool) -> bool:
    """A job is seen (listed, read, its results streamed, cancelled) by the key that created it
    (`caller`: a key fingerprint) and by the admin key (every caller, with keys off). A job
    created while keys were off (no owner) is the admin's alone once keys are on."""
    return admin or (job.owner is not None and job.owner == caller)


def choices(instruction: str, spec: AnswerSpec) -> list[str]:
    """Candidate answers for log-likelihood scoring: the words of the record's own
    "Answer format: a/b/c" line when it names them, else all of the dataset's words."""
    match = ANSWER_FORMAT.search(instruction)
    if match:
        listed = [w.strip() for w in match.group(1).split("/")]
        if len(listed) >= 2 and all(w in spec.words for w in listed):
            return listed
    return list(spec.words)


def _row(job: EvalJob, work: Work, response: str, extracted: str | None) -> dict[str, Any]:
    gold = work.example.answer
    return {
        "model": work.label,
        "dataset": work.dataset.name,
        "index": work.example.index,
        "protocol": job.options.protocol,
        "instruction": work.example.instruction,
        "response": response,
        "extracted": extracted,
        "gold": gold,
        "correct": is_correct(extracted, gold, work.dataset.spec),
    }


def _count(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _check_distinct(names: list[str], param: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise InvalidJobError(f"'{param}' lists {quoted(sorted(seen)[0])} more than once.", param)


def build_runner(
    settings: Settings, engine: Engine, metrics: Metrics, state: Any
) -> EvaluationRunner:
    """The runner of one app; adapters are looked up in `state.registry` when there is one."""

    def adapter_exists(name: str) -> bool:
        registry = getattr(state, "registry", None)
        return registry is not None and bool(registry.exists(name))

    catalog = DatasetCatalog(settings.data_dir, settings.user_datasets_dir,
                             settings.max_datasets, settings.max_dataset_bytes)  # fmt: skip
    inflight = settings.eval_max_inflight or max(1, settings.max_num_seqs // 2)
    return EvaluationRunner(
        engine, catalog, settings.eval_jobs_dir, inflight, metrics, adapter_exists,
        settings.max_queued_evaluations, settings.max_evaluation_jobs,
    )  # fmt: skip
