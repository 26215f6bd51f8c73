"""The training loop of a fine-tuning job: batches, AdamW with a linear warm-up and decay,
events, checkpoints and resume.

It runs where it is called (the job worker process, or `adapterserve finetune`): nothing here
knows about HTTP or the job store. A run is deterministic in its seed: the data order of epoch
e is a permutation drawn from (seed, e), so a resumed run skips exactly the batches done and
goes on with the optimizer, scheduler and random state of its last checkpoint.

The loss of an optimizer step is the mean over the trained tokens of the whole batch (every
micro-batch's summed token losses over the batch's token count), so it does not depend on how
the batch is split into micro-batches. The LLM-Adapters recipe is the default: AdamW at 3e-4,
100 warm-up steps, batch 16 in micro-batches of 4, 3 epochs, cutoff_len 256, gradient norm
clipped at 1 (transformers' Trainer default, which finetune.py used).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from adapterserve.server.finetune.adapters import (
    attach,
    load_trainable_state,
    save_adapter,
    trainable_state,
)
from adapterserve.server.finetune.data import IGNORE, Example, Record, tokenize

BASE_LEARNING_RATE = 3e-4  # LLM-Adapters' finetune.py; learning_rate_multiplier scales it
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"


class Cancelled(Exception):
    """The run was asked to stop (`should_stop`)."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on, resolved (no "auto" left)."""

    n_epochs: int = 3
    batch_size: int = 16
    micro_batch_size: int = 4
    learning_rate: float = BASE_LEARNING_RATE
    warmup_steps: int = 100
    cutoff_len: int = 256
    train_on_inputs: bool = True
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 42
    checkpoint_every: int = 50  # optimizer steps; 0: only the final adapter
    max_steps: int | None = None  # stop early (tests, quick runs)
    max_records: int | None = None  # the training file's first N records

    @property
    def accumulation(self) -> int:
        return max(1, self.batch_size // self.micro_batch_size)


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    trained_tokens: int = 0
    losses: list[float] = field(default_factory=list)


Emit = Callable[[dict[str, Any]], None]


def tokenize_all(
    records: Sequence[Record], tokenizer: Any, settings: TrainSettings
) -> list[Example]:
    """Ids and labels of every record with something left to learn after the cut."""

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    def encode_plain(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    out = []
    for record in records:
        chat = record.kind == "chat"
        example = tokenize(
            record,
            encode_plain if chat else encode,
            tokenizer.eos_token_id,
            settings.cutoff_len,
            settings.train_on_inputs,
            render if chat else None,
        )
        if any(label != IGNORE for label in example.labels[1:]):  # a next token to predict
            out.append(example)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, the attention mask and the labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the next-token losses over the labelled tokens, how many), for one micro-batch.
    The logits' last T positions are the tokens' (prompt tuning prepends its virtual ones)."""
    ids, labels = batch["input_ids"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -ids.shape[1] :].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((target != IGNORE).sum())


def epoch_batches(n: int, settings: TrainSettings, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches of example indices (the last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch))
    order = order.tolist()
    return [order[i : i + settings.batch_size] for i in range(0, n, settings.batch_size)]


def total_steps(n: int, settings: TrainSettings) -> int:
    steps = math.ceil(n / settings.batch_size) * settings.n_epochs
    return min(steps, settings.max_steps) if settings.max_steps else steps


@dataclass
class Run:
    """One training run over examples, for a model with its adapter attached."""

    model: nn.Module
    options: Any
    settings: TrainSettings
    train: list[Example]
    validation: list[Example]
    pad_id: int
    out_dir: Path  # checkpoints/ and adapter/ go here
    emit: Emit = lambda event: None  # noqa: E731
    should_stop: Callable[[], bool] = lambda: False  # noqa: E731
    progress: Progress = field(default_factory=Progress)

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the adapter has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay
        )
        self.progress.total_steps = total_steps(len(self.train), self.settings)
        warmup = min(self.settings.warmup_steps, self.progress.total_steps)
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, warmup, max(self.progress.total_steps, 1)
        )

    # ---- one optimizer step -----------------------------------------------------------
    def step(self, indices: list[int]) -> float:
        """Forward and backward over the batch's micro-batches, then one AdamW step."""
        self.model.train()
        examples = [self.train[i] for i in indices]
        micro = self.settings.micro_batch_size
        batches = [
            collate(examples[i : i + micro], self.pad_id) for i in range(0, len(examples), micro)
        ]
        count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            if self.should_stop():
                self.optimizer.zero_grad(set_to_none=True)
                raise Cancelled
            loss, _ = token_losses(self.model, batch)
            (loss / count).backward()
            total += float(loss.detach())
            self.progress.trained_tokens += int(batch["attention_mask"].sum())
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / count

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if not self.validation:
            return None
        self.model.eval()
        micro, total, count = self.settings.micro_batch_size, 0.0, 0
        for i in range(0, len(self.validation), micro):
            loss, n = token_losses(self.model, collate(self.validation[i : i + micro], self.pad_id))
            total, count = total + float(loss), count + n
        return total / max(count, 1)

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> Path:
        """Train to the end (or to `max_steps`), checkpointing; the servable adapter's folder."""
        p, s = self.progress, self.settings
        started, tokens_at_start = time.monotonic(), p.trained_tokens
        step_in_run = 0
        while p.step < p.total_steps:
            epoch, index = divmod(p.step, math.ceil(len(self.train) / s.batch_size))
            p.epoch = epoch
            batch = epoch_batches(len(self.train), s, epoch)[index]
            t0 = time.monotonic()
            loss = self.step(batch)
            p.step += 1
            step_in_run += 1
            p.losses.append(loss)
            elapsed = time.monotonic() - t0
            event = {
                "type": "metrics",
                "step": p.step,
                "total_steps": p.total_steps,
                "epoch": epoch + 1,
                "train_loss": loss,
                "learning_rate": self.scheduler.get_last_lr()[0],
                "tokens_per_second": (p.trained_tokens - tokens_at_start)
                / max(time.monotonic() - started, 1e-9),
                "step_seconds": elapsed,
                "trained_tokens": p.trained_tokens,
            }
            last = p.step == p.total_steps
            if s.checkpoint_every and (p.step % s.checkpoint_every == 0 or last) or last:
                event["valid_loss"] = self.validation_loss()
            self.emit(event)
            if s.checkpoint_every and (p.step % s.checkpoint_every == 0) and not last:
                self.checkpoint(event)
        return save_adapter(self.model, self.options, self.out_dir / "adapter")

    # ---- checkpoints ------------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, Any]) -> Path:
        """checkpoints/step-N: the servable adapter, and the state to resume from."""
        final = self.out_dir / "checkpoints" / f"step-{self.progress.step:06d}"
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.model, self.options, tmp / "adapter")
        tensors = {f"adapter.{k}": v for k, v in trainable_state(self.model).items()}
        state = self.optimizer.state_dict()
        for idx, per in state["state"].items():
            for key, value in per.items():
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / TENSORS_FILE))
        info = {
            "progress": {**asdict(self.progress)},
            "param_groups": state["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "metrics": {k: v for k, v in metrics.items() if k != "type"},
        }
        (tmp / STATE_FILE).write_text(json.dumps(info))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.emit({"type": "checkpoint", "step": self.progress.step, "path": str(final)})
        return final

    def resume(self, checkpoint: Path) -> None:
        """Adapter, optimizer, scheduler, progress and random state of a checkpoint."""
        info = json.loads((checkpoint / STATE_FILE).read_text())
        tensors = load_file(str(checkpoint / TENSORS_FILE))
        load_trainable_state(
            self.model,
            {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")},
        )
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        self.scheduler.load_state_dict(info["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        saved = info["progress"]
        self.progress = Progress(**{**saved, "total_steps": self.progress.total_steps})


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = out_dir / "checkpoints"
    done = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return done[-1] if done else None


def train(
    base: Any,
    options: Any,
    settings: TrainSettings,
    records: Sequence[Record],
    out_dir: Path,
    validation: Sequence[Record] = (),
    emit: Emit = lambda event: None,  # noqa: B008
    should_stop: Callable[[], bool] = lambda: False,  # noqa: B008
    resume: bool = True,
) -> Path:
    """Train `options`' adapter on `base` (a TrainingBase) and save it under out_dir/adapter;
    with `resume`, go on from the latest checkpoint in `out_dir`."""
    torch.manual_seed(settings.seed)
    records = list(records)[: settings.max_records]
    tokenizer = base.tokenizer
    train_examples = tokenize_all(records, tokenizer, settings)
    if not train_examples:
        raise ValueError(
            f"no training example has a token to learn within cutoff_len {settings.cutoff_len}"
        )
    valid_examples = tokenize_all(validation, tokenizer, settings)
    model = attach(base.model, options, base.model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(
        model,
        options,
        settings,
        train_examples,
        valid_examples,
        int(pad or 0),
        out_dir,
        emit,
        should_stop,
    )
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        run.resume(checkpoint)
        emit({"type": "resumed", "step": run.progress.step, "path": str(checkpoint)})
    return run.run()
