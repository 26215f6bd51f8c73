"""An evaluation job: what it was asked (JobOptions), its progress per model and dataset
(Cell), its state (EvalJob), who may see it (`visible`), and one unit of its work (Work)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from adapterserve.server.evaluation.datasets import Dataset, Example

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
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
            tokens = (
                ""
                if self.options.max_tokens is None
                else (f"; max new tokens {self.options.max_tokens} instead of the paper's")
            )
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


def visible(job: EvalJob, caller: str | None, admin: bool) -> bool:
    """A job is seen (listed, read, its results streamed, cancelled) by the key that created it
    (`caller`: a key fingerprint) and by the admin key (every caller, with keys off). A job
    created while keys were off (no owner) is the admin's alone once keys are on."""
    return admin or (job.owner is not None and job.owner == caller)
