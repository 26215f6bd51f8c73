"""The process that runs one fine-tuning job: `python -P -m adapterserve.server.finetune.worker
<job_dir>`, started by the job manager (server/finetune/jobs.py).

It reads only what the manager wrote into the job's folder: `spec.json` (the server's model
settings, the adapter options, the resolved training settings, its thread budget) and the
training / validation files copied there at creation. It appends one JSON event a line to
`events.jsonl`, and ends by writing `result.json` (succeeded, failed with a message, or
cancelled). Native code in training (a crash in torch) ends only this process; the manager
sees a death without `result.json` and fails the job with the exit status.

Stopping: SIGTERM (cancel) finishes the current micro-batch and exits "cancelled" within
seconds; a parent that goes away (the server died) stops it the same way but as
"interrupted", so that the next server start resumes the job from its last checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
TRAIN_FILE = "train.data"
VALID_FILE = "validation.data"


def resident_mb() -> int | None:
    """This process's resident memory in MB (Linux), or None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 2**20


def release_free_memory() -> bool:
    """Give glibc's free pages back to the system (malloc_trim); whether it could. The worker
    runs with glibc keeping what it frees (jobs.MALLOC_ENV: a step's many large tensors reuse
    the last micro-batch's pages): between steps that memory fragments, and a job's resident
    memory grew by about 170 MB a step until it failed its memory budget. Trimmed after each
    step, a step's peak is its own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    return True


class _Stop:
    def __init__(self) -> None:
        self.reason: str | None = None
        self.parent = os.getppid()

    def __call__(self) -> bool:
        if self.reason is None and os.getppid() != self.parent:
            self.reason = "interrupted"
        return self.reason is not None


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def main(job_dir: Path) -> int:
    stop = _Stop()
    signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "reason", "cancelled"))
    signal.signal(signal.SIGUSR1, lambda *_: setattr(stop, "reason", "interrupted"))
    spec = json.loads((job_dir / SPEC_FILE).read_text())
    events = (job_dir / EVENTS_FILE).open("a", encoding="utf-8")

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps({"created_at": time.time(), **event}) + "\n")
        events.flush()
        if event.get("type") == "metrics":  # after each optimizer step
            release_free_memory()

    try:
        return _run(job_dir, spec, emit, stop)
    except BaseException as exc:  # noqa: BLE001 - the job's failure, reported in its result
        if stop.reason is not None:
            write_json(job_dir / RESULT_FILE, {"status": stop.reason})
            return 0
        message = f"{type(exc).__name__}: {exc}"[:2000]
        emit({"type": "error", "message": message, "traceback": traceback.format_exc()[-4000:]})
        write_json(job_dir / RESULT_FILE, {"status": "failed", "error": message})
        return 1
    finally:
        events.close()


def _run(job_dir: Path, spec: dict[str, Any], emit: Any, stop: _Stop) -> int:
    import torch

    threads = int(spec.get("threads") or 1)
    torch.set_num_threads(threads)
    with_nice = spec.get("nice", 0)
    if with_nice:
        os.nice(with_nice)

    from pydantic import TypeAdapter

    from adapterserve.server.config import Settings
    from adapterserve.server.finetune.adapters import AdapterOptions
    from adapterserve.server.finetune.base import load_training_base
    from adapterserve.server.finetune.data import parse_records
    from adapterserve.server.finetune.trainer import Cancelled, TrainSettings, train

    settings = Settings.model_validate(spec["settings"])
    if settings.device != "cpu" and torch.cuda.is_available() and spec.get("gpu_memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(float(spec["gpu_memory_fraction"]))
    options = TypeAdapter(AdapterOptions).validate_python(spec["adapter"])
    train_settings = TrainSettings(**spec["train"])
    records = parse_records((job_dir / TRAIN_FILE).read_bytes())
    validation = []
    if (job_dir / VALID_FILE).is_file():
        validation = parse_records((job_dir / VALID_FILE).read_bytes())
    emit({"type": "message", "message": f"loading the base ({threads} threads)"})
    started = time.monotonic()
    base = load_training_base(settings)
    emit(
        {
            "type": "message",
            "message": f"base loaded in {time.monotonic() - started:.1f} s "
            f"(quantization {base.quantization}); training "
            f"{min(len(records), train_settings.max_records or len(records))} records",
        }
    )
    try:
        adapter = train(
            base,
            options,
            train_settings,
            records,
            job_dir,
            validation,
            emit=emit,
            should_stop=stop,
        )
    except Cancelled:
        write_json(job_dir / RESULT_FILE, {"status": stop.reason or "cancelled"})
        return 0
    write_json(job_dir / RESULT_FILE, {"status": "succeeded", "adapter": str(adapter)})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
