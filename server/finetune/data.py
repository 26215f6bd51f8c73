"""Training data for fine-tuning jobs (issue 27): the three record formats, checked line by line
before a job starts, and each record as token ids with loss labels.

Formats (one per record, told apart by their keys):
- OpenAI's chat format: `{"messages": [{"role", "content"}, ...]}`; the loss is on the
  assistant turns (an assistant message with `"weight": 0` is context only, as OpenAI has it);
- prompt / completion: `{"prompt": ..., "completion": ...}`; the loss is on the completion;
- the LLM-Adapters / Alpaca instruction records: `{"instruction", "input" (may be empty),
  "output"}` (more keys, such as math_data.json's `answer`, are ignored), rendered with the
  paper's training prompt (`alpaca_prompt`: LLM-Adapters' finetune.py `generate_prompt`, byte for
  byte, its stray "  # noqa: E501" inside the string included), and `train_on_inputs` as the
  paper has it: true (its default) puts the prompt's tokens in the loss too.

A file is JSON Lines, or one JSON array (math_data.json). `parse_records` refuses the first bad
record with `DataError`, whose message names the line (or array index) and the field, with caps
on the file, the records and each text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

MAX_FILE_BYTES = 512 * 2**20
MAX_RECORDS = 1_000_000
MAX_TEXT_CHARS = 1_000_000  # one record's text, all fields together
MAX_MESSAGES = 1024
CHAT_ROLES = ("system", "developer", "user", "assistant")
IGNORE = -100  # a label outside the loss (torch's cross_entropy ignore_index)

# LLM-Adapters' finetune.py generate_prompt, byte for byte (its source's formatting included).
_HEAD = "Below is an instruction that describes a task"
ALPACA_WITH_INPUT = (
    _HEAD + ", paired with an input that provides further context. Write a response that "
    "appropriately completes the request.  # noqa: E501\n\n"
    "                ### Instruction:\n                {instruction}\n                \n"
    "                ### Input:\n                {input}\n                \n"
    "                ### Response:\n                {output}"
)
ALPACA_NO_INPUT = (
    _HEAD + ". Write a response that appropriately completes the request.  # noqa: E501\n\n"
    "                ### Instruction:\n                {instruction}\n                \n"
    "                ### Response:\n                {output}"
)


class DataError(ValueError):
    """A training file that cannot be used: `message` names the record and the field."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(where + message)
        self.message, self.line, self.field = where + message, line, field


@dataclass(frozen=True)
class Record:
    kind: Literal["chat", "completion", "instruction"]
    messages: tuple[tuple[str, str, bool], ...] = ()  # (role, content, trained)
    prompt: str = ""
    completion: str = ""
    instruction: str = ""
    input: str = ""
    output: str = ""


def alpaca_prompt(instruction: str, input: str = "", output: str = "") -> str:
    template = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=input, output=output)


def parse_records(data: bytes, max_records: int = MAX_RECORDS) -> list[Record]:
    """Every record of a training file (JSON Lines, or one JSON array), or DataError."""
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"the file has {len(data)} bytes; at most {MAX_FILE_BYTES} are accepted")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"the file is not UTF-8 (byte {exc.start})") from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise DataError(f"the file is not a JSON array: {exc}") from None
        numbered = list(enumerate(values, start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except ValueError as exc:
                raise DataError(f"not a JSON object: {exc}", number) from None
    if not numbered:
        raise DataError("the file holds no records")
    if len(numbered) > max_records:
        raise DataError(f"{len(numbered)} records; at most {max_records} are accepted")
    return [parse_record(value, number) for number, value in numbered]


def parse_record(value: Any, line: int | None = None) -> Record:
    """One record in one of the three formats (module docstring), or DataError."""
    if not isinstance(value, dict):
        raise DataError(f"a record is a JSON object, got {type(value).__name__}", line)
    if "messages" in value:
        record = _chat(value["messages"], line)
    elif "prompt" in value or "completion" in value:
        record = Record(
            "completion",
            prompt=_text(value, "prompt", line),
            completion=_text(value, "completion", line, empty=False),
        )
    elif "instruction" in value or "output" in value:
        record = Record(
            "instruction",
            instruction=_text(value, "instruction", line, empty=False),
            input=_text(value, "input", line, required=False),
            output=_text(value, "output", line),  # may be empty: 3 of the paper's 3,260 are
        )
    else:
        raise DataError(
            "unknown record: give `messages` (chat), `prompt` and `completion`, or "
            "`instruction`, `input` and `output`",
            line,
        )
    size = sum(len(c) for _, c, _ in record.messages) + len(record.prompt + record.completion)
    size += len(record.instruction + record.input + record.output)
    if size > MAX_TEXT_CHARS:
        raise DataError(f"the record has {size} characters; at most {MAX_TEXT_CHARS}", line)
    return record


def _text(
    value: dict, key: str, line: int | None, required: bool = True, empty: bool = True
) -> str:
    if key not in value or value[key] is None:
        if required:
            raise DataError(f"`{key}` is missing", line, key)
        return ""
    text = value[key]
    if not isinstance(text, str):
        raise DataError(f"`{key}` must be a string, got {type(text).__name__}", line, key)
    if not empty and not text.strip():
        raise DataError(f"`{key}` is empty", line, key)
    return text


def _chat(messages: Any, line: int | None) -> Record:
    if not isinstance(messages, list) or not messages:
        raise DataError("`messages` must be a non-empty list", line, "messages")
    if len(messages) > MAX_MESSAGES:
        raise DataError(f"{len(messages)} messages; at most {MAX_MESSAGES}", line, "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"`{where}` must be an object", line, where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise DataError(f"`{where}.role` must be one of {', '.join(CHAT_ROLES)}", line, where)
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"`{where}.content` must be a string", line, where)
        weight = message.get("weight", 1)
        if weight not in (0, 1):
            raise DataError(f"`{where}.weight` must be 0 or 1", line, where)
        out.append((role, content, role == "assistant" and weight == 1))
    if not any(trained for _, _, trained in out):
        raise DataError("no assistant message to learn from (weight 1)", line, "messages")
    return Record("chat", messages=tuple(out))


# ---------------------------------------------------------------- tokens and labels

Encode = Callable[[str], list[int]]  # text -> ids, the tokenizer's own BOS included
RenderChat = Callable[[list[dict[str, str]], bool], str]  # (messages, generation prompt) -> text


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where a token is not in the loss

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def tokenize(
    record: Record,
    encode: Encode,
    eos_token_id: int | None,
    cutoff_len: int,
    train_on_inputs: bool = True,
    render_chat: RenderChat | None = None,
) -> Example:
    """A record as ids and labels, cut at `cutoff_len` tokens (LLM-Adapters' `cutoff_len`), with
    EOS after the answer when it fits (as its `tokenize` adds it). The prompt's tokens are
    labelled too with `train_on_inputs` (instruction and completion records); a chat record's
    loss is its trained assistant turns, each found as the tokens its message adds to the
    rendered conversation."""
    if record.kind == "chat":
        assert render_chat is not None, "a chat record needs the model's chat template"
        return _tokenize_chat(record, encode, cutoff_len, render_chat)
    if record.kind == "instruction":
        prompt = alpaca_prompt(record.instruction, record.input)
        full = alpaca_prompt(record.instruction, record.input, record.output)
    else:
        prompt, full = record.prompt, record.prompt + record.completion
    ids = encode(full)[:cutoff_len]
    if eos_token_id is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos_token_id):
        ids.append(eos_token_id)
    labels = list(ids)
    if not train_on_inputs:
        masked = min(len(encode(prompt)), len(ids))
        labels[:masked] = [IGNORE] * masked
    return Example(ids, labels)


def _tokenize_chat(
    record: Record, encode: Encode, cutoff_len: int, render_chat: RenderChat
) -> Example:
    messages = [{"role": role, "content": content} for role, content, _ in record.messages]
    ids: list[int] = []
    labels: list[int] = []
    for i, (role, _, trained) in enumerate(record.messages):
        # the conversation's tokens through message i; the new ones are message i's
        through = encode(render_chat(messages[: i + 1], False))
        if role == "assistant":  # its generation prompt belongs to the context
            head = encode(render_chat(messages[:i], True))
            if head[: len(ids)] == ids and len(head) > len(ids):
                labels += [IGNORE] * (len(head) - len(ids))
                ids = head
        new = through[len(ids) :]  # templates render a conversation's prefix as its own prefix
        ids += new
        labels += list(new) if trained else [IGNORE] * len(new)
    return Example(ids[:cutoff_len], labels[:cutoff_len])
