"""The LLM-Adapters prompt and answer extraction, rule by rule, quirks included."""

from __future__ import annotations

import pytest

from adapterserve.server.evaluation.datasets import BUILTIN_SPECS
from adapterserve.server.evaluation.extract import AnswerSpec, extract, is_correct, split_response
from adapterserve.server.evaluation.prompts import generate_prompt
from adapterserve.server.evaluation.scoring import choices

NUMBER = AnswerSpec("number")
LETTER = AnswerSpec("letter")
BOOLQ = BUILTIN_SPECS["boolq"]


def test_prompt_is_the_papers_string_byte_for_byte() -> None:
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. \n\n                ### Instruction:\n                Add {1} and 2"
        "\n\n                ### Response:\n                "
    )
    assert generate_prompt("Add {1} and 2") == expected


@pytest.mark.parametrize(
    ("full", "response"),
    [
        ("prompt ### Response:\n   The answer is 5.  \n", "The answer is 5."),
        ("### Response: a ### Response: b", "a"),  # the paper takes split(...)[1]
        ("no marker at all", ""),
    ],
)
def test_split_response(full: str, response: str) -> None:
    assert split_response(full) == response


@pytest.mark.parametrize(
    ("response", "extracted", "gold", "correct"),
    [
        ("First 3 apples, then 4, so the answer is 7", "7", "7", True),  # the LAST number
        ("The answer is 7. Check: 3 + 4", "4", "7", False),  # last, even when it is wrong
        ("He paid 1,234 dollars", "1234", "1234.0", True),  # commas removed
        ("The temperature fell to -12 degrees", "-12", "-12", True),  # negatives
        ("It costs 2.5 dollars", "2.5", "2.5", True),  # decimals
        ("It costs 2.5004 dollars", "2.5004", "2.5", True),  # within 1e-3
        ("It costs 2.502 dollars", "2.502", "2.5", False),  # outside 1e-3
        ("The answer is 8.", "8.", "8.0", True),  # "8." matches -?\d+\.?\d*
        ("I do not know", None, "3", False),  # no number is wrong
        ("", None, "0", False),
        ("x-5", "-5", "-5", True),  # the minus sign binds to the digits
    ],
)
def test_number_rules(response: str, extracted: str | None, gold: str, correct: bool) -> None:
    assert extract(response, NUMBER) == extracted
    assert is_correct(extract(response, NUMBER), gold, NUMBER) is correct


@pytest.mark.parametrize(
    ("response", "extracted", "gold", "correct"),
    [
        ("The correct option is (C).", "C", "C", True),
        ("Answer: (B)", "A", "B", False),  # the "A" of "Answer" matches first: the quirk
        ("answer choice (d) or D", "D", "D", True),  # case-sensitive: "d" is skipped
        ("so E, not D", "E", "E", True),  # the FIRST capital option letter
        ("Because E", "B", "E", False),  # any capital A-E counts, also inside a word
        ("no capital option letters here", None, "A", False),
        ("Fgh", None, "A", False),
    ],
)
def test_letter_rules(response: str, extracted: str | None, gold: str, correct: bool) -> None:
    assert extract(response, LETTER) == extracted
    assert is_correct(extract(response, LETTER), gold, LETTER) is correct


@pytest.mark.parametrize(
    ("dataset", "response", "extracted", "gold", "correct"),
    [
        ("boolq", "the answer is false", "false", "false", True),
        ("boolq", "true, not false", "true", "false", False),  # the FIRST answer word
        ("boolq", "True", None, "true", False),  # exact, case-sensitive
        ("boolq", "falsehood", "false", "false", True),  # plain substring, as the paper's regex
        ("piqa", "solution2 is right", "solution2", "solution2", True),
        ("social_i_qa", "answer5", "answer5", "answer3", False),  # answer1..5, as the paper
        ("winogrande", "option1", "option1", "option1", True),
        ("ARC-Challenge", "the answer is answer4", "answer4", "answer4", True),
        ("openbookqa", "answer2 then answer1", "answer2", "answer2", True),
        ("hellaswag", "ending3", "ending3", "ending3", True),
        ("hellaswag", "ending5", None, "ending1", False),  # no match is wrong
        ("piqa", "", None, "solution1", False),
    ],
)
def test_answer_word_rules(
    dataset: str, response: str, extracted: str | None, gold: str, correct: bool
) -> None:
    spec = BUILTIN_SPECS[dataset]
    assert extract(response, spec) == extracted
    assert is_correct(extract(response, spec), gold, spec) is correct


def test_user_answer_words_are_literal_not_regex() -> None:
    spec = AnswerSpec("words", ("a.b", "c|d"))
    assert extract("axb then c|d", spec) == "c|d"


@pytest.mark.parametrize(
    ("instruction", "spec", "expected"),
    [
        (
            "Q\n\nAnswer format: answer1/answer2/answer3",
            BUILTIN_SPECS["social_i_qa"],
            ["answer1", "answer2", "answer3"],
        ),
        ("Q\n\nAnswer format: true/false", BOOLQ, ["true", "false"]),
        ("Q without a format line", BOOLQ, ["true", "false"]),
        ("Answer Choices: (A) 1 (B) 2", LETTER, ["A", "B", "C", "D", "E"]),
        ("Answer format: x/y", BOOLQ, ["true", "false"]),  # unknown words: the dataset's own
    ],
)
def test_loglikelihood_choices(instruction: str, spec: AnswerSpec, expected: list[str]) -> None:
    assert choices(instruction, spec) == expected
