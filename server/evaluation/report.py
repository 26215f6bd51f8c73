"""The paper's table layout (rows = models, columns = datasets, plus Average), written as
JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any


def accuracy_table(job: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of accuracies in percent (one decimal); Average over the datasets that
    have a score; '-' where a model has no scored example on a dataset."""
    cells = {(c["model"], c["dataset"]): c for c in job["results"]}
    header = ["model", *job["datasets"], "Average"]
    rows = []
    for model in job["models"]:
        scores = [_percent(cells.get((model, d))) for d in job["datasets"]]
        known = [s for s in scores if s is not None]
        average = sum(known) / len(known) if known else None
        rows.append([model, *(_fmt(s) for s in scores), _fmt(average)])
    return header, rows


def _percent(cell: dict[str, Any] | None) -> float | None:
    return None if not cell or cell["accuracy"] is None else 100 * cell["accuracy"]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plain_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def write_reports(job: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json (the job and the table), results.csv and results.md under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = accuracy_table(job)
    paths = {kind: out_dir / f"results.{kind}" for kind in ("json", "csv", "md")}
    table = [dict(zip(header, row, strict=True)) for row in rows]
    paths["json"].write_text(json.dumps({"job": job, "table": table}, indent=2))
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    paths["csv"].write_text(buffer.getvalue())
    note = (
        f"\nAccuracy (%), protocol `{job['protocol']}`, decoding `{job.get('decoding', 'greedy')}`, "
        f"limit {job['limit'] or 'none'}. {job['note']}\n"
    )
    paths["md"].write_text(markdown(header, rows) + note)
    return paths
