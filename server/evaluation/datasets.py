"""Evaluation datasets: the LLM-Adapters test sets in a data directory (`<name>/test.json`)
and sets that users register through `POST /v1/datasets` (kept under the cache dir).

A record is `{"instruction": str, "input": "", "answer": str}`; any `output` field (a model-
written rationale in the published files) is ignored, never used as gold.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapterserve.server.evaluation.errors import (
    BuiltinDatasetError,
    DatasetExistsError,
    DatasetFileError,
    DatasetLimitError,
    DatasetNotFoundError,
    InvalidDatasetError,
    quoted,
)
from adapterserve.server.evaluation.extract import LETTERS, AnswerSpec

ARITHMETIC_SETS = ("gsm8k", "AQuA", "AddSub", "MultiArith", "SingleEq", "SVAMP")
BUILTIN_SPECS: dict[str, AnswerSpec] = {
    "gsm8k": AnswerSpec("number"),
    "AQuA": AnswerSpec("letter"),
    "AddSub": AnswerSpec("number"),
    "MultiArith": AnswerSpec("number"),
    "SingleEq": AnswerSpec("number"),
    "SVAMP": AnswerSpec("number"),
    "boolq": AnswerSpec("words", ("true", "false")),
    "piqa": AnswerSpec("words", ("solution1", "solution2")),
    "social_i_qa": AnswerSpec("words", tuple(f"answer{i}" for i in range(1, 6))),
    "hellaswag": AnswerSpec("words", tuple(f"ending{i}" for i in range(1, 5))),
    "winogrande": AnswerSpec("words", ("option1", "option2")),
    "ARC-Easy": AnswerSpec("words", tuple(f"answer{i}" for i in range(1, 6))),
    "ARC-Challenge": AnswerSpec("words", tuple(f"answer{i}" for i in range(1, 6))),
    "openbookqa": AnswerSpec("words", tuple(f"answer{i}" for i in range(1, 6))),
}
# The paper's max new tokens: 256 for the arithmetic sets, 32 for commonsense.
ARITHMETIC_MAX_TOKENS = 256
COMMONSENSE_MAX_TOKENS = 32

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_RECORDS = 100_000
MAX_INSTRUCTION_CHARS = 20_000
MAX_ANSWER_WORDS = 32
MAX_WORD_CHARS = 64

Source = Literal["builtin", "user"]


@dataclass(frozen=True)
class Example:
    index: int  # position in the test file
    instruction: str
    answer: str


@dataclass(frozen=True)
class Dataset:
    name: str
    spec: AnswerSpec
    path: Path  # its test.json
    source: Source

    @property
    def max_new_tokens(self) -> int:
        return (
            ARITHMETIC_MAX_TOKENS
            if self.spec.kind in ("number", "letter")
            else COMMONSENSE_MAX_TOKENS
        )

    @property
    def available(self) -> bool:
        return self.path.is_file()

    def describe(self, num_records: int | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "object": "dataset",
            "answer_kind": self.spec.kind,
            "answer_words": list(self.spec.words),
            "source": self.source,
            "available": self.available,
            "num_records": num_records,
            "max_new_tokens": self.max_new_tokens,
        }


def dataset_not_found(name: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"The dataset {quoted(name)} does not exist; GET /v1/datasets lists them.", "datasets"
    )


class DatasetCatalog:
    """Built-in sets from `data_dir` plus user-registered sets from `user_dir`, at most
    `max_user_sets` of them taking at most `max_user_bytes` together."""

    def __init__(
        self,
        data_dir: Path | None,
        user_dir: Path,
        max_user_sets: int = 64,
        max_user_bytes: int = 256 * 2**20,
    ) -> None:
        self.data_dir, self.user_dir = data_dir, user_dir
        self.max_user_sets, self.max_user_bytes = max_user_sets, max_user_bytes
        self._cache: dict[Path, tuple[float, list[Example]]] = {}

    def all(self) -> list[Dataset]:
        builtin = [
            Dataset(name, spec, self._builtin_path(name), "builtin")
            for name, spec in BUILTIN_SPECS.items()
        ]
        return builtin + self._user_sets()

    def get(self, name: str) -> Dataset:
        """The dataset called `name` (exact, else case-insensitive); DatasetNotFoundError if
        unknown or missing."""
        sets = self.all()
        match = next((d for d in sets if d.name == name), None)
        match = match or next((d for d in sets if d.name.lower() == name.lower()), None)
        if match is None:
            raise dataset_not_found(name)
        if not match.available:
            raise DatasetNotFoundError(
                f"The dataset {match.name!r} has no data on this server; put its test.json under "
                f"{match.name}/ in the data directory (--data-dir).",
                "datasets",
            )
        return match

    def examples(self, dataset: Dataset) -> list[Example]:
        """The test records, cached until the file changes."""
        mtime = dataset.path.stat().st_mtime
        cached = self._cache.get(dataset.path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, _read_examples(dataset))
            self._cache[dataset.path] = cached
        return cached[1]

    def describe_all(self) -> list[dict[str, Any]]:
        return [d.describe(len(self.examples(d)) if d.available else None) for d in self.all()]

    def register(
        self, name: str, spec: AnswerSpec, records: list[dict[str, str]], replace: bool = False
    ) -> Dataset:
        """Store already validated records as a user dataset (atomic writes)."""
        _check_name(name)
        if any(name.lower() == b.lower() for b in BUILTIN_SPECS):
            raise DatasetExistsError(
                f"{name!r} is a built-in dataset name; pick another name.", "name"
            )
        folder = self.user_dir / name
        if (folder / "dataset.json").is_file() and not replace:
            raise DatasetExistsError(
                f"A dataset named {name!r} exists; send replace=true to replace it.", "name"
            )
        text = json.dumps(records, ensure_ascii=False)
        self._check_room(name, len(text.encode("utf-8")))
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "test.json", text)
        meta = {
            "name": name,
            "answer_kind": spec.kind,
            "answer_words": list(spec.words),
            "created": int(time.time()),
        }
        _atomic_write(folder / "dataset.json", json.dumps(meta))
        return Dataset(name, spec, folder / "test.json", "user")

    def delete(self, name: str) -> Dataset:
        """Remove a registered dataset (a built-in one is a data file: BuiltinDatasetError)."""
        dataset = next((d for d in self._user_sets() if d.name == name), None)
        if dataset is None:
            if any(name.lower() == b.lower() for b in BUILTIN_SPECS):
                raise BuiltinDatasetError(
                    f"{name!r} is a built-in dataset; it cannot be deleted.", "name"
                )
            raise dataset_not_found(name)
        folder = dataset.path.parent
        (folder / "dataset.json").unlink()  # first: the set is gone even if the rest fails
        self._cache.pop(dataset.path, None)
        shutil.rmtree(folder, ignore_errors=True)
        return dataset

    def _check_room(self, name: str, size: int) -> None:
        """DatasetLimitError when one more set (or `size` more bytes) would pass the caps."""
        others = [d for d in self._user_sets() if d.name != name]
        used = sum(d.path.stat().st_size for d in others if d.path.is_file())
        if len(others) >= self.max_user_sets or used + size > self.max_user_bytes:
            raise DatasetLimitError(
                f"This server keeps at most {self.max_user_sets} registered datasets of "
                f"{self.max_user_bytes} bytes in all ({len(others)} use {used} bytes; this one "
                f"needs {size}); delete one with DELETE /v1/datasets/{{name}}.",
                "name",
            )

    def _builtin_path(self, name: str) -> Path:
        base = self.data_dir if self.data_dir is not None else Path("/nonexistent")
        return base / name / "test.json"

    def _user_sets(self) -> list[Dataset]:
        if not self.user_dir.is_dir():
            return []
        sets = []
        for meta_path in sorted(self.user_dir.glob("*/dataset.json")):
            meta = json.loads(meta_path.read_text())
            spec = AnswerSpec(meta["answer_kind"], tuple(meta["answer_words"]))
            sets.append(Dataset(meta["name"], spec, meta_path.parent / "test.json", "user"))
        return sets


def _read_examples(dataset: Dataset) -> list[Example]:
    records = json.loads(dataset.path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise DatasetFileError(f"The data file of {dataset.name!r} is not a JSON array.")
    return [Example(i, str(r["instruction"]), str(r["answer"])) for i, r in enumerate(records)]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- upload validation


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidDatasetError(
            f"'name' must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit; got {quoted(name)}.",
            "name",
        )


def answer_spec(kind: str, words: list[str] | None) -> AnswerSpec:
    """The declared answer kind of an upload, checked."""
    if kind in ("number", "letter"):
        if words:
            raise InvalidDatasetError(
                f"'answer_words' is only for answer_kind 'words', not {kind!r}.", "answer_words"
            )
        return AnswerSpec(kind)  # type: ignore[arg-type]
    if kind != "words":
        raise InvalidDatasetError(
            f"'answer_kind' must be number, letter or words; got {quoted(kind)}.", "answer_kind"
        )
    if not words or len(words) < 2 or len(words) > MAX_ANSWER_WORDS:
        raise InvalidDatasetError(
            f"answer_kind 'words' needs 'answer_words': 2 to {MAX_ANSWER_WORDS} strings.",
            "answer_words",
        )
    for i, word in enumerate(words):
        if not word.strip() or len(word) > MAX_WORD_CHARS or word != word.strip():
            raise InvalidDatasetError(
                f"answer_words[{i}] must be 1-{MAX_WORD_CHARS} characters without surrounding "
                f"whitespace; got {quoted(word)}.",
                f"answer_words[{i}]",
            )
    if len(set(words)) != len(words):
        raise InvalidDatasetError("'answer_words' must not repeat a word.", "answer_words")
    return AnswerSpec("words", tuple(words))


def validate_records(raw: list[Any], spec: AnswerSpec) -> list[dict[str, str]]:
    """Records as stored: instruction, empty input, gold answer; InvalidDatasetError names
    the bad field."""
    if not raw:
        raise InvalidDatasetError("The dataset has no records; send at least one.", "records")
    if len(raw) > MAX_RECORDS:
        raise InvalidDatasetError(f"At most {MAX_RECORDS} records, got {len(raw)}.", "records")
    return [_validate_record(i, record, spec) for i, record in enumerate(raw)]


def _validate_record(i: int, record: Any, spec: AnswerSpec) -> dict[str, str]:
    where = f"records[{i}]"
    if not isinstance(record, dict):
        raise InvalidDatasetError(
            f"{where} must be an object with 'instruction' and 'answer'.", where
        )
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise InvalidDatasetError(
            f"{where}.instruction must be a non-empty string.", f"{where}.instruction"
        )
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise InvalidDatasetError(
            f"{where}.instruction is longer than {MAX_INSTRUCTION_CHARS} characters.",
            f"{where}.instruction",
        )
    if record.get("input") not in (None, ""):
        raise InvalidDatasetError(
            f"{where}.input must be empty: the protocol's prompt has no input section; put it into "
            "the instruction.",
            f"{where}.input",
        )
    return {
        "instruction": instruction,
        "input": "",
        "answer": _gold(record.get("answer"), spec, where),
    }


def _gold(answer: Any, spec: AnswerSpec, where: str) -> str:
    param = f"{where}.answer"
    if spec.kind == "number" and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidDatasetError(f"{param} must be a non-empty string.", param)
    if spec.kind == "number":
        try:
            value = float(answer.replace(",", ""))
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InvalidDatasetError(
                f"{param} must be a number for answer_kind 'number'; got {quoted(answer)}.", param
            )
        return answer.replace(",", "")
    if answer not in spec.words:
        allowed = ", ".join(LETTERS if spec.kind == "letter" else spec.words)
        raise InvalidDatasetError(f"{param} must be one of {allowed}; got {quoted(answer)}.", param)
    return answer
