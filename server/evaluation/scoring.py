"""Scoring one example under a job's protocol, apart from the engine: how an answer is generated
(`generate_params`), which answers log-likelihood scoring compares (`candidates`), and the
result row of each (`generated_row`, `likeliest_row`), one line of results.jsonl."""

from __future__ import annotations

import re
from typing import Any, Protocol

from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.evaluation.extract import AnswerSpec, extract, is_correct, split_response
from adapterserve.server.evaluation.jobs import EvalJob, JobOptions, Work
from adapterserve.server.evaluation.prompts import generate_prompt

PAPER_BEAMS = 4  # LLM-Adapters' evaluate.py: generate(num_beams=4), do_sample left False
ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def generate_params(
    options: JobOptions, work: Work, prompt_tokens: int, max_model_len: int
) -> SamplingParams:
    """The dataset's max new tokens (the paper's) or the job's, cut so that prompt + answer fit
    the context, as the HTTP routers check (0: the prompt fills it, nothing is sent); decoding
    'beam' is the paper's generate(num_beams=4), its best beam."""
    wanted = options.max_tokens or work.dataset.max_new_tokens
    max_tokens = max(0, min(wanted, max_model_len - prompt_tokens))
    if options.decoding == "beam":
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, beam_width=PAPER_BEAMS)
    seed = None if options.seed is None else (options.seed + work.example.index) % 2**63
    return SamplingParams(max_tokens=max_tokens, temperature=options.temperature, seed=seed)


def generated_row(job: EvalJob, work: Work, prompt: str, text: str, max_tokens: int) -> dict:
    """The row of a generated answer: `text` continued `prompt`, with `max_tokens` at most."""
    response = split_response(prompt + text)
    row = result_row(job, work, response, extract(response, work.dataset.spec))
    if max_tokens == 0:
        row["error"] = "the prompt fills the model's context; nothing was generated"
    return row


def candidates(tokenizer: Encoder, work: Work) -> tuple[list[int], dict[str, list[int]]]:
    """(context ids, answer word -> continuation ids). As lm-evaluation-harness does: trailing
    whitespace of the context moves to the continuation, and context and continuation are
    tokenized apart, so that every candidate is scored after the same context tokens."""
    prompt = generate_prompt(work.example.instruction)
    context = prompt.rstrip()
    words = {
        word: tokenizer.encode(prompt[len(context) :] + word, add_special_tokens=False)
        for word in choices(work.example.instruction, work.dataset.spec)
    }
    return tokenizer.encode(context), words


def likeliest_row(job: EvalJob, work: Work, scores: dict[str, float]) -> dict:
    """The row of log-likelihood scoring: the answer word of the highest log-probability."""
    best = max(scores, key=scores.__getitem__)
    row = result_row(job, work, best, best)
    row["scores"] = scores
    return row


def too_long_row(job: EvalJob, work: Work, longest: int) -> dict:
    """The row of an example whose prompt + longest answer (`longest` tokens) is never sent."""
    row = result_row(job, work, "", None)
    row["error"] = f"prompt + answer ({longest} tokens) exceed the model's context"
    return row


def choices(instruction: str, spec: AnswerSpec) -> list[str]:
    """Candidate answers for log-likelihood scoring: the words of the record's own
    "Answer format: a/b/c" line when it names them, else all of the dataset's words."""
    match = ANSWER_FORMAT.search(instruction)
    if match:
        listed = [w.strip() for w in match.group(1).split("/")]
        if len(listed) >= 2 and all(w in spec.words for w in listed):
            return listed
    return list(spec.words)


def result_row(job: EvalJob, work: Work, response: str, extracted: str | None) -> dict[str, Any]:
    gold = work.example.answer
    return {
        "model": work.label,
        "dataset": work.dataset.name,
        "index": work.example.index,
        "protocol": job.options.protocol,
        "instruction": work.example.instruction,
        "response": response,
        "extracted": extracted,
        "gold": gold,
        "correct": is_correct(extracted, gold, work.dataset.spec),
    }
