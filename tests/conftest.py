from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (GQA, untied) with a byte-level BPE tokenizer and a chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from GGUF once into the user cache."""
    from server.config import Settings
    from server.model.weights import ModelLoadError, resolve_model_dir

    try:
        return resolve_model_dir(None, Settings().cache_dir)
    except ModelLoadError as e:
        pytest.skip(f"default model not installed: {e}")
