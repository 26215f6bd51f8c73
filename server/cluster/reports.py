"""Replica reports: each engine replica writes its state (adapters by tier, Prometheus metrics,
pid) to `<cluster_state_dir>/replicas/<replica>.json` every REPORT_INTERVAL_S; the ingress reads
the fresh ones to answer /v1/models, /v1/adapters and /metrics for the whole cluster.

Files, not Ray calls: a DeploymentHandle reaches one replica of its choice, never all of them,
and a file outlives nothing (a report older than STALE_AFTER_S is a dead replica's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapterserve.server.engine.remote import AdapterState

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5
STALE_AFTER_S = 5.0


@dataclass(frozen=True)
class Report:
    replica: str
    pid: int
    time: float
    healthy: bool
    adapters: list[AdapterState]
    metrics: str  # Prometheus text of the replica's engine

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        data["adapters"] = [
            AdapterState(**{**a, "targets": tuple(a["targets"])}) for a in data["adapters"]
        ]
        return cls(**data)


def reports_dir(state_dir: Path) -> Path:
    return state_dir / "replicas"


def write_report(state_dir: Path, report: Report) -> None:
    """Atomically (write, then rename), so that a reader never sees half a report."""
    folder = reports_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{report.replica}.{os.getpid()}.tmp"
    tmp.write_text(report.to_json())
    os.replace(tmp, folder / f"{report.replica}.json")


def remove_report(state_dir: Path, replica: str) -> None:
    with contextlib.suppress(OSError):
        (reports_dir(state_dir) / f"{replica}.json").unlink()


def read_reports(state_dir: Path, now: float | None = None) -> list[Report]:
    """The fresh reports, sorted by replica; stale ones (dead replicas) are removed."""
    now = time.time() if now is None else now
    out = []
    folder = reports_dir(state_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            report = Report.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            continue  # vanished or replaced meanwhile
        if now - report.time > STALE_AFTER_S:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(report)
    return out
