"""`adapterserve finetune`: the fine-tuning job's training without a running server (as
`adapterserve eval` is the evaluation job's).

    adapterserve finetune --training-file math_data.json --output runs/math-lora \
        [--kind lora|dora|series|parallel|prefix|prompt|ia3] [--adapter '{"r": 16}'] \
        [--n-epochs 3] [--batch-size 16] [--learning-rate 3e-4] [--max-records 1000] ...

The base is loaded as `adapterserve serve` with the same --model / --quantization / --device
would serve it. The adapter is written to <output>/adapter (adapter_config.json +
adapter_model.safetensors), which `serve --adapter NAME=<output>/adapter` and the upload
(POST /v1/adapters) accept; checkpoints go to <output>/checkpoints, and a run started again on
the same --output resumes from the last one (--no-resume starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

ENGINE_FLAGS = ("--model", "--device", "--dtype", "--quantization", "--log-level")
KINDS = ("lora", "dora", "series", "parallel", "prefix", "prompt", "ia3")


def add_finetune_arguments(
    parser: argparse.ArgumentParser, serve_flags: dict[str, tuple[str, type]]
) -> None:
    parser.add_argument("--training-file", type=Path, required=True, help="JSONL or a JSON array")
    parser.add_argument("--validation-file", type=Path, default=None)
    parser.add_argument("--output", type=Path, required=True, help="folder of the run")
    parser.add_argument("--kind", choices=KINDS, default="lora")
    parser.add_argument(
        "--adapter",
        default=None,
        help="the adapter's settings as a JSON object (the job API's `adapter`), e.g. "
        '\'{"r": 16, "target_modules": ["q_proj", "v_proj"]}\'',
    )
    parser.add_argument("--n-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument(
        "--train-on-inputs", choices=("true", "false"), default="true", help="the paper's flag"
    )
    parser.add_argument("--max-records", type=int, default=None, help="the file's first N")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps; 0: none")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default all")
    parser.add_argument("--no-resume", action="store_true", help="ignore earlier checkpoints")
    for flag in ENGINE_FLAGS:
        field, kind = serve_flags[flag]
        parser.add_argument(flag, dest=field, type=kind, default=None)


def run_finetune(args: argparse.Namespace) -> int:
    """Train; print one line a step; 0 when the adapter is written."""
    import torch

    from adapterserve.server.config import Settings
    from adapterserve.server.finetune.adapters import AdapterOptions, check_options
    from adapterserve.server.finetune.base import load_training_base
    from adapterserve.server.finetune.data import DataError, parse_records
    from adapterserve.server.finetune.trainer import TrainSettings, train

    fields = ("model", "device", "dtype", "quantization", "log_level")
    settings = Settings(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    try:
        extra = json.loads(args.adapter) if args.adapter else {}
        if not isinstance(extra, dict):
            raise ValueError("--adapter must be a JSON object")
        options = TypeAdapter(AdapterOptions).validate_python({"kind": args.kind, **extra})
    except (ValueError, ValidationError) as exc:
        print(f"adapterserve finetune: --adapter: {exc}", file=sys.stderr)
        return 2
    problem = check_options(options, settings.max_adapter_rank)
    if problem:
        print(f"adapterserve finetune: {problem}", file=sys.stderr)
        return 2
    try:
        records = parse_records(args.training_file.read_bytes())
        validation = (
            parse_records(args.validation_file.read_bytes()) if args.validation_file else []
        )
    except (OSError, DataError) as exc:
        print(f"adapterserve finetune: {exc}", file=sys.stderr)
        return 2
    train_settings = TrainSettings(
        n_epochs=args.n_epochs,
        batch_size=args.batch_size,
        micro_batch_size=min(args.micro_batch_size, args.batch_size),
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        cutoff_len=args.cutoff_len,
        train_on_inputs=args.train_on_inputs == "true",
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps,
        max_records=args.max_records,
    )
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    began = time.monotonic()
    base = load_training_base(settings)
    n = min(len(records), args.max_records or len(records))
    print(
        f"{base.model_id} ({base.quantization}) loaded in {time.monotonic() - began:.1f} s; "
        f"{args.kind} on {n} records, "
        f"{math.ceil(n / args.batch_size) * args.n_epochs} steps at most",
        flush=True,
    )
    adapter = train(
        base,
        options,
        train_settings,
        records,
        args.output,
        validation,
        emit=_print_event,
        resume=not args.no_resume,
    )
    print(f"adapter written to {adapter}")
    return 0


def _print_event(event: dict[str, Any]) -> None:
    if event["type"] == "metrics":
        valid = event.get("valid_loss")
        tail = f" valid {valid:.4f}" if valid is not None else ""
        print(
            f"step {event['step']}/{event['total_steps']} loss {event['train_loss']:.4f}{tail} "
            f"lr {event['learning_rate']:.2e} {event['tokens_per_second']:.0f} tok/s",
            flush=True,
        )
    elif event["type"] in ("checkpoint", "resumed"):
        print(f"{event['type']} at step {event['step']}: {event['path']}", flush=True)
