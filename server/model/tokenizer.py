"""The model's own tokenizer and chat template (HF tokenizer files), behind a small interface."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()


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
        self._byte_level = type(self.hf.backend_tokenizer.decoder).__name__ == "ByteLevel"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The rendered template's tokens; `add_special_tokens` adds the tokenizer's own
        (BOS, ...) on top of those the template writes (vLLM's /tokenize option); `tools`: the
        request's tools, for a template that renders them."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        text = self.hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text, add_special_tokens=add_special_tokens)

    @property
    def chat_template(self) -> str | None:
        """The template's text (None: none, or several named ones: tools are then detected
        from none of them)."""
        template = self.hf.chat_template
        return template if isinstance(template, str) else None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: the longest vocabulary entry as the
        vocabulary writes it (byte-level 'Ġ' for a space, a byte fallback '<0x41>' for one byte:
        never shorter than the text it decodes to). A text of more than context x this many
        characters has more tokens than the context holds: it is refused untokenized."""
        return max(len(piece) for piece in self.hf.get_vocab()) or 1

    def token_text(self, token_id: int) -> str:
        """Display text of one token (logprobs); cached since the vocabulary is fixed."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.hf.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token, also for tokens that are a fragment of a UTF-8 character."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if (
            piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6
        ):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        if all(ch in _BYTE_DECODER for ch in piece) and self._byte_level:
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        return self.token_text(token_id).encode("utf-8")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)
