from __future__ import annotations

import os
from pathlib import Path

# Before anything imports triton (the kernels, torch.compile's inductor): Triton kernels on CPU
# tensors run in its interpreter for the whole session, whichever test comes first.
# `TRITON_INTERPRET=0 pytest ...` runs them natively on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Before any test module: it takes the repository root off sys.path (`python -m pytest` puts the
# working directory there), where its kernels/ would shadow Hugging Face's `kernels`.
import adapterserve  # noqa: E402, F401
from tests.helpers import make_tiny_llama  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (GQA, untied) with a byte-level BPE tokenizer and a chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from GGUF once into the user cache."""
    from adapterserve.server.config import Settings
    from adapterserve.server.model.weights import ModelLoadError, resolve_model_dir

    try:
        return resolve_model_dir(None, Settings().cache_dir)
    except ModelLoadError as e:
        pytest.skip(f"default model not installed: {e}")
