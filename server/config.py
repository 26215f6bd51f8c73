"""Settings: the only home of knobs. Every field is also read from `ADAPTERSERVE_<NAME>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "adapterserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERSERVE_", extra="ignore")

    # model
    model: str | None = Field(None, description="HF model dir or .gguf file; None = embedded SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="id reported by /v1/models; default = model dir name")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Field(default_factory=default_cache_dir, description="GGUF conversion cache")

    # engine
    max_num_seqs: int = Field(32, ge=1, le=4096, description="running sequences per step")
    max_model_len: int | None = Field(None, ge=16, description="context length cap; default min(model, 8192)")
    max_num_batched_tokens: int = Field(512, ge=16, description="token budget per engine step")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    kv_cache_memory_mb: int = Field(1024, ge=1, description="memory for the paged KV cache")
    num_kv_blocks: int | None = Field(None, ge=1, description="override the block count derived from memory")
    max_queue_len: int = Field(256, ge=0, description="waiting requests before 503")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    admin_api_key: str | None = None
    max_n: int = Field(16, ge=1, le=128, description="cap on `n` choices per request")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="prompt character cap, checked before tokenizing")
    max_request_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="JSON body cap")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header on 503")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="drain time for in-flight requests on SIGTERM")
    log_level: str = "info"
