"""Running one evaluation job's examples through the shared engine.

The job's models take turns example by example, so the engine decodes the adapters of one job
side by side in the same steps, with at most `max_inflight` engine requests in flight, so that
online traffic keeps its slots. A refusal that clients are told to retry (a full queue, a lost
replica, a restarting engine) waits and runs again; any other fails the job. Every scored
example is appended to the job's results.jsonl as it finishes (storage.JobStore).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from typing import IO

from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineFailure,
    QueueFullError,
    ReplicaLostError,
)
from adapterserve.server.engine.intake import RequestStream
from adapterserve.server.engine.output import RequestOutput
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.evaluation.datasets import DatasetCatalog
from adapterserve.server.evaluation.errors import ExampleFailedError
from adapterserve.server.evaluation.jobs import EvalJob, Work
from adapterserve.server.evaluation.prompts import generate_prompt
from adapterserve.server.evaluation.scoring import (
    candidates,
    generate_params,
    generated_row,
    likeliest_row,
    too_long_row,
)
from adapterserve.server.evaluation.storage import JobStore
from adapterserve.server.metrics import Metrics

log = logging.getLogger(__name__)

QUEUE_FULL_BACKOFF_S = (0.05, 1.0)  # first and longest wait before submitting again
# Engine refusals that pass: a full queue (online traffic), a lost replica or a restarting
# engine (EngineRestartingError is a ReplicaLostError). server/api/errors.py answers the same ones
# with Retry-After (ENGINE_ERRORS); tests/evaluation/test_errors.py keeps the two in step.
RETRYABLE_ENGINE_ERRORS = (QueueFullError, ReplicaLostError)
LOST_REPLICA_RETRIES = 3  # a request whose cluster replica died runs again this often


class ExampleWorker:
    """Scores the examples of one job at a time (`run`); the runner owns the job's state."""

    def __init__(
        self,
        engine: EngineClient,
        catalog: DatasetCatalog,
        store: JobStore,
        metrics: Metrics,
        max_inflight: int,
    ) -> None:
        self.engine, self.catalog, self.store = engine, catalog, store
        self.metrics, self.max_inflight = metrics, max_inflight

    async def run(self, job: EvalJob) -> None:
        """Score the job's examples that have no row yet; ExampleFailedError (or
        EngineDeadError) when one cannot be scored."""
        slots = asyncio.Semaphore(self.max_inflight)  # engine requests in flight
        examples = asyncio.Semaphore(self.max_inflight)  # examples being worked on
        pending: set[asyncio.Task] = set()
        with self.store.results_path(job.id).open("a", encoding="utf-8") as out:
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
        done = self.store.finished_keys(job.id)
        for name in job.options.datasets:
            dataset = self.catalog.get(name)
            examples = self.catalog.examples(dataset)[
                : job.cells[(job.options.models[0], name)].total
            ]
            for example in examples:
                for label in job.options.models:
                    if (label, name, example.index) not in done:
                        yield Work(label, dataset, example)

    async def _score(
        self, job: EvalJob, work: Work, slots: asyncio.Semaphore, out: IO[str]
    ) -> None:
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
        params = generate_params(job.options, work, len(ids), self.engine.max_model_len)
        empty = params.max_tokens == 0  # the prompt fills the context: it is not sent
        text = "" if empty else await self._generate(job, work, ids, params, slots)
        return generated_row(job, work, prompt, text, params.max_tokens)

    async def _score_loglikelihood(
        self, job: EvalJob, work: Work, slots: asyncio.Semaphore
    ) -> dict:
        context_ids, words = candidates(self.engine.tokenizer, work)
        longest = len(context_ids) + max(len(ids) for ids in words.values())
        if longest > self.engine.max_model_len:  # never sent: the engine asserts it fits
            return too_long_row(job, work, longest)
        scores: dict[str, float] = {}
        for word, word_ids in words.items():
            scores[word] = await self._loglikelihood(job, work, context_ids, word_ids, slots)
        return likeliest_row(job, work, scores)

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
            log.warning(
                "evaluation job %s: a replica was lost; running %s / %s example %d again",
                job.id,
                work.label,
                work.dataset.name,
                work.example.index,
            )
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
