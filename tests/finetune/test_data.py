"""Training data (server/finetune/data.py): the three formats, each refusal naming its line and
field, the paper's training prompt byte for byte, and labels (train_on_inputs, chat turns)
checked against the tokens they stand for."""

from __future__ import annotations

import json

import pytest

from adapterserve.server.finetune.data import (
    IGNORE,
    DataError,
    alpaca_prompt,
    parse_records,
    tokenize,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "weight": 0},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
INSTRUCTION = {"instruction": "Add 2 and 2.", "input": "", "output": "4", "answer": "4.0"}


def jsonl(*records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def test_three_formats_in_jsonl_and_in_a_json_array() -> None:
    records = parse_records(jsonl(CHAT, COMPLETION, INSTRUCTION) + b"\n\n")
    assert [r.kind for r in records] == ["chat", "completion", "instruction"]
    assert records[0].messages[2] == ("assistant", "4", False)  # weight 0: context only
    assert records[0].messages[4] == ("assistant", "6", True)
    assert parse_records(json.dumps([INSTRUCTION, COMPLETION]).encode())[1].completion == "4"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "no records"),
        (b"\xff\xfe", "not UTF-8"),
        (jsonl(COMPLETION) + b"\n{oops", "line 2: not a JSON object"),
        (jsonl(COMPLETION, [1, 2]), "line 2: a record is a JSON object"),
        (jsonl({"text": "x"}), "line 1: unknown record"),
        (jsonl({"prompt": "x", "completion": " "}), "line 1: `completion` is empty"),
        (jsonl({"prompt": 3, "completion": "x"}), "`prompt` must be a string"),
        (jsonl({"instruction": "x", "input": ""}), "`output` is missing"),
        (jsonl({"messages": []}), "non-empty list"),
        (jsonl({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
        (jsonl({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
        (jsonl({"messages": [{"role": "assistant", "content": "x", "weight": 2}]}), "weight"),
        (jsonl({"prompt": "x" * 1_000_001, "completion": "y"}), "characters"),
        (b"[1, 2", "not a JSON array"),
    ],
)
def test_refusals_name_the_line_and_the_field(data: bytes, words: str) -> None:
    with pytest.raises(DataError) as caught:
        parse_records(data)
    assert words in str(caught.value)


def test_the_record_cap() -> None:
    with pytest.raises(DataError, match="at most 2"):
        parse_records(jsonl(COMPLETION, COMPLETION, COMPLETION), max_records=2)


def test_the_papers_training_prompt_byte_for_byte() -> None:
    """LLM-Adapters' finetune.py generate_prompt, as its source writes it (16-space indents, a
    line of 16 spaces between sections, and the "# noqa: E501" inside the string)."""
    assert alpaca_prompt("Do X.", "", "Done.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.  # noqa: E501\n\n                ### Instruction:\n"
        "                Do X.\n                \n                ### Response:\n"
        "                Done."
    )
    with_input = alpaca_prompt("Do X.", "with Y", "Done.")
    assert with_input.startswith(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.  # noqa"
    )
    assert "### Input:\n                with Y\n                \n" in with_input


def encode(text: str) -> list[int]:
    """A character tokenizer with BOS 1 (ids are code points + 10)."""
    return [1] + [ord(c) + 10 for c in text]


def test_labels_of_instruction_and_completion_records() -> None:
    record = parse_records(jsonl(INSTRUCTION))[0]
    whole = tokenize(record, encode, eos_token_id=2, cutoff_len=10_000)
    full = alpaca_prompt("Add 2 and 2.", "", "4")
    assert whole.input_ids == encode(full) + [2] and whole.labels == whole.input_ids
    masked = tokenize(record, encode, eos_token_id=2, cutoff_len=10_000, train_on_inputs=False)
    prompt_len = len(encode(alpaca_prompt("Add 2 and 2.", "")))
    assert masked.labels[:prompt_len] == [IGNORE] * prompt_len
    assert masked.labels[prompt_len:] == masked.input_ids[prompt_len:] == [ord("4") + 10, 2]
    cut = tokenize(record, encode, eos_token_id=2, cutoff_len=20)
    assert len(cut.input_ids) == 20 and cut.input_ids[-1] != 2  # no EOS past the cutoff
    completion = tokenize(parse_records(jsonl(COMPLETION))[0], encode, 2, 100, False)
    assert [
        t for t, lab in zip(completion.input_ids, completion.labels, strict=True) if lab != IGNORE
    ] == [
        ord("4") + 10,
        2,
    ]


def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
    return text + ("<assistant>" if generation_prompt else "")


def test_chat_labels_are_the_trained_assistant_turns() -> None:
    record = parse_records(jsonl(CHAT))[0]
    example = tokenize(record, encode, None, 10_000, render_chat=render)
    assert example.input_ids == encode(
        render([dict(role=r, content=c) for r, c, _ in record.messages], False)
    )
    trained = "".join(
        chr(t - 10)
        for t, lab in zip(example.input_ids, example.labels, strict=True)
        if lab != IGNORE
    )
    assert trained == "6</>"  # the last answer and its end; not "4" (weight 0), not the prompt


def test_the_papers_math_data_parses() -> None:
    """The paper's own math training data (../shared, through the data_dir setting): 3,260
    instruction records, each a rationale ending in its answer."""
    from adapterserve.server.config import Settings

    data_dir = Settings().data_dir
    path = data_dir.parent / "llm-adapters-train" / "math_data.json" if data_dir else None
    if path is None or not path.is_file():
        pytest.skip("the shared LLM-Adapters training data (../shared/datasets) is absent")
    records = parse_records(path.read_bytes())
    assert len(records) == 3260 and all(r.kind == "instruction" for r in records)
    assert all("The answer is" in r.output for r in records[:100])
