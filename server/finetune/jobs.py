"""Fine-tuning jobs in the server: OpenAI's job objects, their folders on disk, the queue, and
the worker processes that train them (server/finetune/worker.py).

A job's folder `<jobs_dir>/<id>/` holds `job.json` (the job), `spec.json` and the data files (the
worker's input, copied at creation so that deleting a file later changes nothing),
`events.jsonl` (the worker's events), `checkpoints/step-N/` and, when done, `adapter/`, which is
committed to the adapter store under the job's `fine_tuned_model` name and served at once.

One job runs at a time by default (`--finetune-max-running`); more wait in a bounded queue
(`--finetune-max-queued`, past it 429). A worker has a thread budget (`--finetune-threads`) and
runs niced; its resident memory is watched against `--finetune-memory-mb` (the job fails past
it). When the server stops, a running worker is interrupted and its job goes back to the queue:
the next start resumes it from its last checkpoint, as after a crash of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapterserve.server.finetune.worker import (
    EVENTS_FILE,
    RESULT_FILE,
    SPEC_FILE,
    TRAIN_FILE,
    VALID_FILE,
    write_json,
)

log = logging.getLogger(__name__)

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_S = 0.5
CANCEL_GRACE_S = 20.0  # SIGTERM, then SIGKILL
MAX_EVENTS_KEPT = 100_000
# glibc keeps what training frees instead of unmapping it: a step allocates the same large
# tensors again, and fresh pages fault in zeroed (about 10% of a step on this CPU, BENCHMARKS.md);
# the worker gives the free pages back after each optimizer step (worker.release_free_memory)
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(2**34),
    "MALLOC_TRIM_THRESHOLD_": str(2**34),
    "MALLOC_TOP_PAD_": str(2**30),
}


class JobError(Exception):
    """A request the manager refuses: HTTP status, message, param and code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Job:
    id: str
    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    train: dict[str, Any]  # resolved TrainSettings
    adapter: dict[str, Any]
    suffix: str | None
    seed: int
    fine_tuned_model: str
    created_at: int
    metadata: dict[str, str] | None = None
    evaluations: dict[str, Any] | None = None
    owner: str | None = None
    status: JobStatus = "queued"
    finished_at: int | None = None
    started_at: int | None = None
    error: dict[str, Any] | None = None
    trained_tokens: int | None = None
    step: int = 0
    total_steps: int = 0
    evaluation_job_id: str | None = None
    registered: bool = False
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)
    checkpoints: list[dict[str, Any]] = field(default_factory=list, repr=False)
    last_metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    _events_offset: int = field(default=0, repr=False)

    SAVED = [
        "id",
        "model",
        "training_file",
        "validation_file",
        "hyperparameters",
        "train",
        "adapter",
        "suffix",
        "seed",
        "fine_tuned_model",
        "created_at",
        "metadata",
        "evaluations",
        "owner",
        "status",
        "finished_at",
        "started_at",
        "error",
        "trained_tokens",
        "step",
        "total_steps",
        "evaluation_job_id",
        "registered",
    ]

    def record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SAVED}

    def to_openai(self) -> dict[str, Any]:
        """The job as OpenAI's `fine_tuning.job`, with our extension fields after its own."""
        hyper = self.hyperparameters
        return {
            "object": "fine_tuning.job",
            "id": self.id,
            "model": self.model,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "fine_tuned_model": self.fine_tuned_model if self.status == "succeeded" else None,
            "organization_id": "org-adapterserve",
            "result_files": [],
            "status": self.status,
            "validation_file": self.validation_file,
            "training_file": self.training_file,
            "hyperparameters": hyper,
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "user_provided_suffix": self.suffix,
            "seed": self.seed,
            "estimated_finish": self._estimated_finish(),
            "integrations": [],
            "metadata": self.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "adapter": self.adapter,
            "training": self.train,
            "evaluations": self.evaluations,
            "evaluation_job_id": self.evaluation_job_id,
            "progress": {"step": self.step, "total_steps": self.total_steps},
        }

    def _estimated_finish(self) -> int | None:
        if self.status != "running" or not self.step or not self.started_at:
            return None
        per_step = (time.time() - self.started_at) / self.step
        return int(time.time() + per_step * (self.total_steps - self.step))


def event_object(job: Job, index: int, event: dict[str, Any]) -> dict[str, Any]:
    """A worker event as OpenAI's `fine_tuning.job.event`."""
    kind = event.get("type", "message")
    data: dict[str, Any] = {}
    if kind == "metrics":
        data = {k: v for k, v in event.items() if k not in ("type", "created_at")}
        message = (
            f"Step {event['step']}/{event['total_steps']}: training loss={event['train_loss']:.4f}"
        )
        if event.get("valid_loss") is not None:
            message += f", validation loss={event['valid_loss']:.4f}"
    elif kind == "checkpoint":
        message = f"Checkpoint written at step {event['step']}"
        data = {"step": event["step"]}
    elif kind == "resumed":
        message = f"Resumed from the checkpoint at step {event['step']}"
        data = {"step": event["step"]}
    else:
        message = str(event.get("message", kind))
    return {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{job.id.removeprefix('ftjob-')}-{index:06d}",
        "created_at": int(event.get("created_at", time.time())),
        "level": "error" if kind == "error" else "info",
        "message": message,
        "data": data,
        "type": "metrics" if kind == "metrics" else "message",
    }


class FineTuningManager:
    """The jobs of one server: create, list, cancel; the queue and the worker processes."""

    def __init__(
        self,
        jobs_dir: Path,
        base_model: str,
        spec_settings: dict[str, Any],
        register: Callable[[Path, str], None],
        threads: int,
        memory_mb: int | None,
        max_running: int = 1,
        max_queued: int = 8,
        on_succeeded: Callable[[Job], str | None] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.jobs_dir, self.base_model = jobs_dir, base_model
        self.spec_settings, self.register = spec_settings, register
        self.threads, self.memory_mb = threads, memory_mb
        self.max_running, self.max_queued = max_running, max_queued
        self.on_succeeded = on_succeeded
        self.python = python
        self.jobs: dict[str, Job] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._cancelling: set[str] = set()  # jobs asked to stop: however the worker ends
        self._stopping = False  # the server stops: running jobs resume at the next start

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Reload the jobs; a job that was running goes back to the queue (it resumes)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.jobs_dir.glob("*/job.json")):
            try:
                job = Job(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping an unreadable fine-tuning job %s (%s)", path, exc)
                continue
            self._read_events(job)
            if job.status == "running":
                job.status = "queued"
                self._save(job)
            self.jobs[job.id] = job
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        """Interrupt the running workers (their jobs resume at the next start)."""
        self._stopping = True
        for job_id, proc in list(self.procs.items()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
                await asyncio.wait_for(proc.wait(), CANCEL_GRACE_S)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            log.info("fine-tuning job %s interrupted by the server's stop", job_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ---- API ------------------------------------------------------------------------------
    def create(
        self,
        request: dict[str, Any],
        train_path: Path,
        valid_path: Path | None,
        owner: str | None = None,
    ) -> Job:
        """Queue a job; `request` is the validated API body with "auto" resolved."""
        if request["model"] != self.base_model:
            raise JobError(
                400,
                f"model must be this server's base, {self.base_model!r} (fine-tuning an adapter "
                "of an adapter is not supported)",
                "model",
                "model_not_available",
            )
        waiting = sum(j.status == "queued" for j in self.jobs.values())
        if waiting >= self.max_queued:
            raise JobError(
                429, f"{waiting} fine-tuning jobs are queued already; try again later", None
            )
        job_id = "ftjob-" + secrets.token_hex(12)
        job = Job(
            id=job_id,
            model=request["model"],
            training_file=request["training_file"],
            validation_file=request.get("validation_file"),
            hyperparameters=request["hyperparameters"],
            train=request["train"],
            adapter=request["adapter"],
            suffix=request.get("suffix"),
            seed=request["train"]["seed"],
            fine_tuned_model=fine_tuned_name(self.base_model, request.get("suffix"), job_id),
            created_at=int(time.time()),
            metadata=request.get("metadata"),
            evaluations=request.get("evaluations"),
            owner=owner,
        )
        folder = self.jobs_dir / job.id
        folder.mkdir(parents=True)
        shutil.copyfile(train_path, folder / TRAIN_FILE)
        if valid_path is not None:
            shutil.copyfile(valid_path, folder / VALID_FILE)
        write_json(
            folder / SPEC_FILE,
            {
                "settings": self.spec_settings,
                "adapter": job.adapter,
                "train": job.train,
                "threads": self.threads,
                "nice": 10,
            },
        )
        self.jobs[job.id] = job
        self._save(job)
        self._wake.set()
        return job

    def get(self, job_id: str, caller: str | None = None, admin: bool = True) -> Job:
        job = self.jobs.get(job_id)
        if job is None or not (admin or job.owner == caller):
            raise JobError(404, f"No fine-tuning job {job_id[:80]!r}", "fine_tuning_job_id")
        self._read_events(job)
        return job

    def list(self, caller: str | None = None, admin: bool = True) -> list[Job]:
        jobs = [j for j in self.jobs.values() if admin or j.owner == caller]
        return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)

    async def cancel(self, job_id: str, caller: str | None = None, admin: bool = True) -> Job:
        job = self.get(job_id, caller, admin)
        if job.status in FINAL:
            raise JobError(
                400, f"fine-tuning job {job.id} is already {job.status}", "fine_tuning_job_id"
            )
        proc = self.procs.get(job.id)
        if proc is None:
            self._finish(job, "cancelled")
            return job
        self._cancelling.add(job.id)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), CANCEL_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for _ in range(40):  # the loop records the end; wait for it
            if job.status in FINAL:
                break
            await asyncio.sleep(0.05)
        if job.status not in FINAL:
            self._finish(job, "cancelled")
        return job

    def events(self, job: Job) -> list[dict[str, Any]]:
        self._read_events(job)
        return [event_object(job, i, e) for i, e in enumerate(job.events)]

    def checkpoint_objects(self, job: Job) -> list[dict[str, Any]]:
        self._read_events(job)
        out = []
        for ckpt in job.checkpoints:
            step = ckpt["step"]
            out.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{step:06d}",
                    "created_at": int(ckpt.get("created_at", time.time())),
                    "fine_tuned_model_checkpoint": f"{job.fine_tuned_model}:ckpt-step-{step}",
                    "fine_tuning_job_id": job.id,
                    "metrics": ckpt.get("metrics", {}),
                    "step_number": step,
                }
            )
        return out

    # ---- the queue ------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            running = [j for j in self.jobs.values() if j.status == "running"]
            queued = sorted(
                (j for j in self.jobs.values() if j.status == "queued"),
                key=lambda j: (j.created_at, j.id),
            )
            for job in queued[: max(0, self.max_running - len(running))]:
                asyncio.ensure_future(self._run(job))
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _run(self, job: Job) -> None:
        folder = self.jobs_dir / job.id
        (folder / RESULT_FILE).unlink(missing_ok=True)
        job.status, job.started_at = "running", job.started_at or int(time.time())
        self._save(job)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), **MALLOC_ENV}
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-P",
                "-m",
                "adapterserve.server.finetune.worker",
                str(folder),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=(folder / "worker.log").open("ab"),
            )
        except OSError as exc:
            self._fail(job, f"the training process could not start: {exc}", "worker_failed")
            return
        self.procs[job.id] = proc
        try:
            while proc.returncode is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), POLL_S)
                self._read_events(job)
                rss = _rss_mb(proc.pid) if proc.returncode is None else None
                if self.memory_mb and rss is not None and rss > self.memory_mb:
                    proc.kill()
                    await proc.wait()
                    self._fail(
                        job,
                        f"the training process used {rss} MB, over the memory budget of "
                        f"{self.memory_mb} MB (--finetune-memory-mb)",
                        "memory_budget_exceeded",
                    )
                    return
        finally:
            self.procs.pop(job.id, None)
        self._read_events(job)
        if job.status == "running":
            await self._ended(job, proc.returncode)

    async def _ended(self, job: Job, returncode: int | None) -> None:
        folder = self.jobs_dir / job.id
        if job.id in self._cancelling:  # a worker stopped before its handler was set too
            self._cancelling.discard(job.id)
            self._finish(job, "cancelled")
            return
        try:
            result = json.loads((folder / RESULT_FILE).read_text())
        except (OSError, ValueError):
            if self._stopping:  # interrupted by the server's stop: resumes at the next start
                return
            self._fail(
                job,
                f"the training process died (exit status {returncode}) without a result",
                "worker_failed",
            )
            return
        status = result.get("status")
        if status == "interrupted":  # the server stops: resumes at its next start
            return
        if status == "cancelled":
            self._finish(job, "cancelled")
        elif status == "failed":
            self._fail(job, str(result.get("error", "training failed")), "training_failed")
        elif status == "succeeded":
            try:
                await asyncio.to_thread(self.register, folder / "adapter", job.fine_tuned_model)
            except Exception as exc:  # noqa: BLE001 - reported as the job's error
                self._fail(job, f"the trained adapter could not be served: {exc}", "register")
                return
            job.registered = True
            self._finish(job, "succeeded")
            if self.on_succeeded is not None and job.evaluations:
                try:
                    job.evaluation_job_id = self.on_succeeded(job)
                except Exception as exc:  # noqa: BLE001 - the job stays succeeded
                    job.events.append({"type": "message", "message": f"evaluation: {exc}"})
                self._save(job)
        self._wake.set()

    # ---- state ----------------------------------------------------------------------------
    def _read_events(self, job: Job) -> None:
        """New lines of the worker's events.jsonl into the job (progress, checkpoints)."""
        path = self.jobs_dir / job.id / EVENTS_FILE
        try:
            with path.open("rb") as f:
                f.seek(job._events_offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line being written waits for the next read
        job._events_offset += end
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if len(job.events) < MAX_EVENTS_KEPT:
                job.events.append(event)
            if event.get("type") == "metrics":
                job.step, job.total_steps = event["step"], event["total_steps"]
                job.trained_tokens = event.get("trained_tokens", job.trained_tokens)
                job.last_metrics = event
            elif event.get("type") == "checkpoint":
                metrics = job.last_metrics
                job.checkpoints = [c for c in job.checkpoints if c["step"] != event["step"]]
                job.checkpoints.append(
                    {
                        "step": event["step"],
                        "created_at": event.get("created_at"),
                        "metrics": {
                            "step": event["step"],
                            "train_loss": metrics.get("train_loss"),
                            "valid_loss": metrics.get("valid_loss"),
                        },
                    }
                )

    def _fail(self, job: Job, message: str, code: str) -> None:
        job.error = {"code": code, "message": message, "param": None}
        self._finish(job, "failed")

    def _finish(self, job: Job, status: JobStatus) -> None:
        job.status, job.finished_at = status, int(time.time())
        self._save(job)
        self._wake.set()

    def _save(self, job: Job) -> None:
        write_json(self.jobs_dir / job.id / "job.json", job.record())


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's `ft:<base>:<suffix>:<id>`, within the adapter store's 64 characters."""
    short = job_id.removeprefix("ftjob-")[:8]
    tail = f":{suffix}:{short}" if suffix else f"::{short}"
    room = 64 - len("ft:") - len(tail)
    safe_base = "".join(c if c.isalnum() or c in "._-" else "-" for c in base)[:room]
    return f"ft:{safe_base}{tail}"


def _rss_mb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        return None
    return None


def model_settings(settings: Any) -> dict[str, Any]:
    """What a worker needs of the server's settings to load the same base."""
    keep = ("model", "device", "dtype", "quantization", "cache_dir", "served_model_name")
    return {k: v for k, v in settings.model_dump(mode="json").items() if k in keep}


def register_adapter(registry: Any) -> Callable[[Path, str], None]:
    """Commit a trained adapter folder to the store and serve it (as an upload is)."""

    def register(folder: Path, name: str) -> None:
        store = registry.store
        if store is None:
            raise RuntimeError("this server has no adapter store")
        with store.stage() as staging:
            handles = [p.open("rb") for p in sorted(folder.iterdir()) if p.is_file()]
            try:
                store.add_files(staging, [(h.name.rsplit("/", 1)[-1], h) for h in handles])
            finally:
                for h in handles:
                    h.close()
            registry.add_upload(staging, name, True)

    return register


def build_manager(settings: Any, engine: Any, state: Any) -> FineTuningManager:
    """The manager of one app: adapters go to `state.registry`; evaluations to
    `state.evaluations` when a job asks for them."""
    cores = os.cpu_count() or 2
    memory = settings.finetune_memory_mb
    if memory is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = total // 2**20 // 2

    def evaluate(job: Job) -> str | None:
        from adapterserve.server.evaluation.jobs import JobOptions

        spec = job.evaluations or {}
        options = JobOptions(
            models=["base", job.fine_tuned_model],
            datasets=list(spec["datasets"]),
            limit=spec.get("limit"),
            decoding=spec.get("decoding", "greedy"),
            max_tokens=spec.get("max_tokens"),
        )
        return state.evaluations.submit(options, owner=job.owner).id

    return FineTuningManager(
        settings.finetune_jobs_dir,
        engine.model_id,
        model_settings(settings),
        register_adapter(state.registry),
        threads=settings.finetune_threads or max(1, cores // 2),
        memory_mb=memory,
        max_running=settings.finetune_max_running,
        max_queued=settings.finetune_max_queued,
        on_succeeded=evaluate,
    )
