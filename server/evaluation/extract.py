"""Answer extraction and scoring, exactly as the LLM-Adapters evaluation scripts do it.

- response: the text after the first "### Response:" of prompt + generation, stripped;
- number: commas removed, the LAST match of `-?\\d+\\.?\\d*`, correct if |gold - pred| <= 1e-3;
- letter (AQuA): the FIRST match of `A|B|C|D|E`, case-sensitive (the "A" of "Answer" counts);
- answer words (commonsense): the FIRST match of the dataset's words, compared exactly.
No match is wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

RESPONSE_MARKER = "### Response:"
NUMBER_PATTERN = re.compile(r"-?\d+\.?\d*")
LETTERS = ("A", "B", "C", "D", "E")
TOLERANCE = 1e-3

AnswerKind = Literal["number", "letter", "words"]


@dataclass(frozen=True)
class AnswerSpec:
    """How a dataset's answers look: a number, an option letter A-E, or one of `words`."""

    kind: AnswerKind
    words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "letter" and not self.words:
            object.__setattr__(self, "words", LETTERS)
        assert self.kind == "number" or self.words, "choice answers need their words"

    @property
    def pattern(self) -> re.Pattern[str]:
        if self.kind == "number":
            return NUMBER_PATTERN
        return re.compile("|".join(re.escape(word) for word in self.words))

    @property
    def multiple_choice(self) -> bool:
        return self.kind != "number"


def split_response(full_text: str) -> str:
    """The paper's `output.split("### Response:")[1].strip()` on prompt + generated text."""
    parts = full_text.split(RESPONSE_MARKER)
    return parts[1].strip() if len(parts) > 1 else ""


def extract_number(response: str) -> str | None:
    """The last number in the response after removing commas, as matched; None if none."""
    matches = NUMBER_PATTERN.findall(response.replace(",", ""))
    return matches[-1] if matches else None


def extract_choice(response: str, spec: AnswerSpec) -> str | None:
    """The first of the spec's letters or answer words in the response; None if none."""
    match = spec.pattern.search(response)
    return match.group(0) if match else None


def extract(response: str, spec: AnswerSpec) -> str | None:
    return extract_number(response) if spec.kind == "number" else extract_choice(response, spec)


def is_correct(extracted: str | None, gold: str, spec: AnswerSpec) -> bool:
    if extracted is None:
        return False
    if spec.kind != "number":
        return extracted == gold
    difference = abs(float(gold) - float(extracted))
    return math.isfinite(difference) and difference <= TOLERANCE
