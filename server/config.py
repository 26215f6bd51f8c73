"""Settings: the only home of knobs. Every field is also read from `ADAPTERSERVE_<NAME>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapterserve.server.finetune.data import MAX_FILE_BYTES


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "adapterserve"


def default_data_dir() -> Path | None:
    """`../shared/datasets/llm-adapters` next to this checkout, when it exists."""
    candidate = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "llm-adapters"
    return candidate if candidate.is_dir() else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERSERVE_", extra="ignore")

    # model
    model: str | None = Field(
        None, description="HF model dir or .gguf file; None = embedded SmolLM2-135M-Instruct"
    )
    served_model_name: str | None = Field(
        None, description="id reported by /v1/models; default = model dir name"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Field(default_factory=default_cache_dir, description="GGUF conversion cache")

    # engine
    max_num_seqs: int = Field(32, ge=1, le=4096, description="running sequences per step")
    max_model_len: int | None = Field(
        None, ge=16, description="context length cap; default min(model, 8192)"
    )
    max_num_batched_tokens: int = Field(512, ge=16, description="token budget per engine step")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    kv_cache_memory_mb: int = Field(1024, ge=1, description="memory for the paged KV cache")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="override the block count derived from memory"
    )
    max_queue_len: int = Field(256, ge=0, description="waiting requests before 503")
    max_request_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the running slots (max_num_seqs) one request (its "
        "n choices, or a beam group) may hold while another request waits; past it the request "
        "yields its newest sequences (a beam group whole) to the waiter; 1 = no limit",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="reuse the KV blocks of prompt prefixes seen before (keyed by content "
        "and adapter version); false turns it off",
    )
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto",
        description="weight-only quantized base projections and LM head (adapters stay "
        "full precision): int8 per channel, int4 in groups of 32; auto = a GGUF on CPU as it "
        "ships (Q4_0 / Q4_1 -> int4 as they are, Q8_0 -> int8 per channel), otherwise none",
    )
    engine_process: bool = Field(
        True,
        description="run the engine core (scheduler, model, adapter pool) in a child "
        "process that is restarted when it dies; false = on a thread of the server's process",
    )
    engine_heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="an engine core process silent this long is killed and restarted"
    )
    engine_max_restarts: int = Field(
        5,
        ge=0,
        description="engine core deaths within 60 s past which the server stops "
        "restarting it and exits",
    )
    compile: Literal["off", "auto", "on"] = Field(
        "auto",
        description="torch.compile the decode step (CUDA: + CUDA graphs); auto = where it wins",
    )

    # adapters
    adapter_slots: int = Field(
        8, ge=1, le=4096, description="adapters resident on the device at once"
    )
    max_adapter_rank: int = Field(
        64, ge=1, le=4096, description="largest LoRA rank / bottleneck size served"
    )
    host_adapter_cache: int = Field(
        64, ge=0, description="parsed adapters kept in host memory (LRU)"
    )
    adapter_store_dir: Path | None = Field(
        None, description="durable store for uploads; default <cache_dir>/adapters"
    )
    max_upload_bytes: int = Field(512 * 2**20, ge=1024, description="cap on an adapter upload body")
    max_adapters: int = Field(1024, ge=1, description="adapters kept in the store")
    adapters: list[str] = Field(
        default_factory=list, description="NAME=PATH adapters served at start"
    )
    adapter_dirs: list[Path] = Field(
        default_factory=list, description="every subfolder served as an adapter"
    )
    adapter_roots: list[Path] = Field(
        default_factory=list, description="where load_lora_adapter may read"
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(
        None, description="API key; several keys (one per user) comma-separated"
    )
    admin_api_key: str | None = None
    ready_requires_key: bool = Field(
        False,
        description="/ready needs the API key too (default: load balancers probe it without one)",
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="seconds a client has to send a request's headers (slowloris)"
    )
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="seconds a request body may stall between two reads"
    )
    http_body_grace_s: float = Field(
        10.0, gt=0, description="seconds a request body has before --http-body-min-rate counts"
    )
    http_body_min_rate: float = Field(
        1024.0,
        gt=0,
        description="bytes/s a request body must average after the grace "
        "(each this many bytes buy one more second; slow-body trickles)",
    )
    http_body_deadline_s: float = Field(
        300.0, gt=0, description="seconds a request body (an upload too) must be complete within"
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="open HTTP connections in all; past it new ones get 503 and are closed",
    )
    max_connections_per_client: int = Field(
        256, ge=1, description="open HTTP connections from one client address"
    )
    probe_connections: int = Field(
        16,
        ge=0,
        description="connections past --max-connections kept for /health and /ready "
        "(a probe still gets through when the cap is full)",
    )
    max_n: int = Field(16, ge=1, le=128, description="cap on `n` choices per request")
    max_prompt_chars: int = Field(
        1_000_000, ge=1, description="prompt character cap, checked before tokenizing"
    )
    grammar_workers: int = Field(
        2, ge=1, le=64, description="processes that compile client grammars (the grammar sandbox)"
    )
    warm_grammars: bool = Field(
        True,
        description="start the grammar sandbox and build llguidance's tokenizer at start, so "
        "that the first structured request costs what later ones do",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto",
        description="the format of the model's tool calls (server/api/tools/parsers.py); auto: "
        "detected from the chat template, hermes for a template that names none",
    )
    grammar_timeout_s: float = Field(
        2.0, gt=0, description="seconds one client grammar may take to compile; past it a 400"
    )
    grammar_memory_mb: int = Field(
        1024,
        ge=64,
        description="memory a grammar sandbox worker may take for one compile (RLIMIT_AS)",
    )
    max_request_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="JSON body cap")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header on 503")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="drain time for in-flight requests on SIGTERM"
    )
    log_level: str = "info"

    # cluster (server/cluster, the `ray` extra): replicas > 0 serves through Ray Serve
    replicas: int = Field(
        0, ge=0, le=1024, description="engine replicas on Ray Serve; 0 = one process, no Ray"
    )
    ray_address: str | None = Field(
        None,
        description="join this Ray cluster (auto | ray://host:port); default: start a local one",
    )
    replica_num_cpus: float = Field(
        1.0, gt=0, description="CPUs per engine replica (also its torch threads)"
    )
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica")
    cluster_affinity: bool = Field(
        True,
        description="route adapter requests to replicas holding the adapter (Ray Serve model "
        "multiplexing); false = Ray's plain load balancing",
    )
    cluster_dir: Path | None = Field(
        None,
        description="state every replica shares (replica reports); default <cache_dir>/cluster",
    )

    # evaluation
    data_dir: Path | None = Field(
        default_factory=default_data_dir,
        description="evaluation data: <dataset>/test.json; default ../shared/datasets/llm-adapters",
    )
    eval_max_inflight: int | None = Field(
        None,
        ge=1,
        description="engine requests in flight per evaluation job; default max_num_seqs // 2",
    )
    max_queued_evaluations: int = Field(
        16, ge=1, description="evaluation jobs waiting to run; past it 429"
    )
    max_evaluation_jobs: int = Field(
        256,
        ge=1,
        description="evaluation jobs kept (with their results); the oldest finished go first",
    )
    max_datasets: int = Field(64, ge=0, description="datasets registered through the API")
    max_dataset_bytes: int = Field(
        256 * 2**20,
        ge=1024,
        description="bytes of all datasets registered through the API together",
    )
    # fine-tuning files (POST /v1/files)
    files_dir: Path | None = Field(
        None, description="fine-tuning files (POST /v1/files); default <cache_dir>/files"
    )
    max_file_bytes: int = Field(
        MAX_FILE_BYTES, ge=1024, le=MAX_FILE_BYTES, description="cap on one uploaded file (413)"
    )
    max_files: int = Field(1024, ge=0, description="files kept in the file store (409)")
    max_files_bytes: int = Field(
        16 * 2**30, ge=1024, description="bytes of all stored files together (409)"
    )
    # fine-tuning jobs (POST /v1/fine_tuning/jobs)
    finetune_dir: Path | None = Field(
        None,
        description="fine-tuning jobs (data, events, checkpoints, adapters); "
        "default <cache_dir>/fine_tuning",
    )
    finetune_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads of a fine-tuning job's worker process (it runs niced); "
        "default half the cores, at least 1",
    )
    finetune_memory_mb: int | None = Field(
        None,
        ge=256,
        description="resident memory a fine-tuning worker may use before its job fails; "
        "default half the machine's memory",
    )
    finetune_gpu_memory_fraction: float = Field(
        0.3, gt=0, le=1, description="share of the GPU's memory a fine-tuning worker may use"
    )
    finetune_max_running: int = Field(1, ge=1, le=64, description="fine-tuning jobs at once")
    finetune_max_queued: int = Field(
        8, ge=0, le=10_000, description="fine-tuning jobs waiting to run; past it 429"
    )

    @model_validator(mode="after")
    def _default_eval_inflight(self) -> Settings:
        if self.eval_max_inflight is None:
            self.eval_max_inflight = max(1, self.max_num_seqs // 2)
        return self

    @property
    def user_keys(self) -> tuple[str, ...]:
        """The keys of `api_key` (one, or several separated by commas)."""
        return tuple(key.strip() for key in (self.api_key or "").split(",") if key.strip())

    @property
    def adapter_store(self) -> Path:
        return self.adapter_store_dir or self.cache_dir / "adapters"

    @property
    def cluster_state_dir(self) -> Path:
        return self.cluster_dir or self.cache_dir / "cluster"

    @property
    def finetune_jobs_dir(self) -> Path:
        """Fine-tuning jobs (job.json, data, events, checkpoints, the adapter), across restarts."""
        return self.finetune_dir or self.cache_dir / "fine_tuning"

    @property
    def eval_jobs_dir(self) -> Path:
        """Evaluation jobs (job.json + results.jsonl per job), kept across restarts."""
        return self.cache_dir / "evaluations"

    @property
    def file_store_dir(self) -> Path:
        """Files uploaded to POST /v1/files (`<id>.data` + `<id>.json`), kept across restarts."""
        return self.files_dir or self.cache_dir / "files"

    @property
    def user_datasets_dir(self) -> Path:
        """Datasets registered through POST /v1/datasets."""
        return self.cache_dir / "datasets"
