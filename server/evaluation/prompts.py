"""The LLM-Adapters evaluation prompt: the no-input Alpaca template, byte for byte."""

from __future__ import annotations

# Exactly the paper's string, including the single space after "request." and the 16-space
# indents that its evaluation scripts inherited from a triple-quoted string.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n\n"
    "                ### Response:\n"
    "                "
)


def generate_prompt(instruction: str) -> str:
    """The prompt for one record (its `input` is always empty in the protocol)."""
    return PROMPT_TEMPLATE.format(instruction=instruction)
