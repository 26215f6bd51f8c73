"""The model's own tokenizer and chat template (HF tokenizer files), behind a small interface."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


class Tokenizer:
    """Wraps a HF fast tokenizer; the chat template is the model's, never the request's."""

    def __init__(self, model_dir: Path, eos_token_ids: set[int] | None = None) -> None:
        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        ids = set(eos_token_ids or ())
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        self.vocab_size = len(self.hf)
        self._token_text: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """Display text of one token (logprobs); cached since the vocabulary is fixed."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.hf.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)
