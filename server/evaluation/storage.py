"""Evaluation jobs on disk: `<jobs_dir>/<id>/job.json` is the job, `<id>/results.jsonl` its
scored rows, one line each, appended as they finish. Loading a job counts its progress from
the rows (they are the truth); a job that was running when the process died is marked failed."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterserve.server.evaluation.datasets import _atomic_write
from adapterserve.server.evaluation.jobs import Cell, EvalJob, JobOptions

log = logging.getLogger(__name__)


class JobStore:
    """The jobs of one server under `jobs_dir`, one folder each."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def results_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "results.jsonl"

    def create(self, job: EvalJob) -> None:
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        self.save(job)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def save(self, job: EvalJob) -> None:
        record = job.to_dict() | {
            "engine_models": job.engine_models,
            "options": job.options.__dict__,
            "owner": job.owner,
        }
        _atomic_write(self.job_dir(job.id) / "job.json", json.dumps(record))

    def finished_keys(self, job_id: str) -> set[tuple[str, str, int]]:
        """(model, dataset, example index) of every row written so far."""
        rows = (json.loads(line) for line in self.iter_results(job_id))
        return {(r["model"], r["dataset"], r["index"]) for r in rows}

    def load_jobs(self) -> Iterator[EvalJob]:
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
            self.save(job)
        return job

    def iter_results(self, job_id: str) -> Iterator[bytes]:
        """Complete JSONL lines written so far (a line being written is left out)."""
        path = self.results_path(job_id)
        if not path.is_file():
            return
        with path.open("rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield line
