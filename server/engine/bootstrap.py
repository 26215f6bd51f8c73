"""Plan, build, start: the one way an engine comes up, for the CLI, the app and the tests.

- `plan_engine(settings)`: everything decided before a weight is read (the model folder, a
  GGUF converted once, device, dtype, context length, KV blocks, the `--adapter` flags); its
  errors (EngineConfigError, ModelLoadError) are one-line reasons. The CLI plans first to fail
  fast, then hands the plan to the app, whose lifespan starts from it.
- `build_engine(settings, metrics, plan)`: load the model and tokenizer, build the adapter
  registry and the engine (and the compiled decode step when wanted). Not running.
- `start_engine` / `running_engine`: build on a dedicated thread and run the step loop there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterserve import kernels
from adapterserve.adapters.errors import AdapterError, InvalidNameError
from adapterserve.adapters.hooks import PoolHooks
from adapterserve.adapters.pool import AdapterPool
from adapterserve.adapters.registry import AdapterRegistry
from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.adapters.store import AdapterStore, validate_name
from adapterserve.server.config import Settings
from adapterserve.server.engine.engine import Engine
from adapterserve.server.metrics import Metrics
from adapterserve.server.model.llama import KVCache, ModelArgs
from adapterserve.server.model.quant import Mode
from adapterserve.server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# --compile auto: where compiling wins (BENCHMARKS.md, 'Step plan, eager vs compiled decode
# (issue 12)')
AUTO_COMPILE_DEVICES = frozenset({"cuda"})


class EngineConfigError(ValueError):
    """The settings cannot work with this model; the message says what to change."""


@dataclass(frozen=True)
class EnginePlan:
    """What the settings resolve to before any weight is loaded."""

    model_dir: Path
    config: dict
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    num_blocks: int
    model_id: str
    quantization: Mode = "none"
    gguf: Path | None = None  # the file a GGUF model came from


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def pick_quantization(setting: str, device: torch.device, gguf: Path | None) -> Mode:
    """--quantization: auto = a GGUF on CPU served as it ships (every projection Q4_0 / Q4_1 /
    Q4_K -> int4; all Q8_0 -> int8 with Q8_0's block scales), otherwise none; int8 / int4 need
    the device's bf16 weight-only kernels."""
    from adapterserve.server.model.gguf_quant import INT4_TYPES, projection_types
    from adapterserve.server.model.quant import compute_supported
    from adapterserve.server.model.weights import unreadable_gguf

    if setting == "auto":
        if gguf is None or device.type != "cpu" or not compute_supported(device):
            return "none"
        try:
            types = set(projection_types(gguf).values())
        except Exception as exc:  # a damaged or foreign file: the reader's reason, one line
            raise unreadable_gguf(gguf, exc) from None
        if types and types <= INT4_TYPES:
            return "int4"
        return "int8" if types == {"Q8_0"} else "none"
    if setting != "none" and not compute_supported(device):
        raise EngineConfigError(
            f"--quantization {setting}: this device ({device}) lacks the bfloat16 weight-only "
            "kernels (torch's _weight_int8pack_mm / _weight_int4pack_mm); use --quantization none"
        )
    return setting  # type: ignore[return-value]


def compile_wanted(setting: str, device: torch.device) -> bool:
    """--compile: on, off, or auto = where it measurably wins (BENCHMARKS.md, compiled decode)."""
    if setting == "auto":
        return device.type in AUTO_COMPILE_DEVICES
    return setting == "on"


def eos_ids(config: dict) -> set[int]:
    eos = config.get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def parse_adapter_arg(item: str) -> tuple[str, Path]:
    """`NAME=PATH` (from --adapter / ADAPTERSERVE_ADAPTERS) -> (name, path)."""
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise EngineConfigError(f"--adapter expects NAME=PATH, got {item!r}")
    return name, Path(path).expanduser()


# ---- plan -----------------------------------------------------------------------------------
def plan_engine(settings: Settings) -> EnginePlan:
    """Check the adapter flags, resolve the model (converting a GGUF once) and size the KV
    cache, without loading weights."""
    from adapterserve.server.model.weights import (
        default_model_path,
        read_config,
        resolve_model_dir,
        served_name,
    )

    check_adapter_flags(settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    source = default_model_path() if settings.model is None else Path(settings.model).expanduser()
    gguf = source if source.suffix == ".gguf" and source.is_file() else None
    quantization = pick_quantization(settings.quantization, device, gguf)
    # served quantized, a GGUF's projections are read from the file as codes (or cached codes):
    # its conversion need not hold them; served as floats, they are converted once and cached
    model_dir = resolve_model_dir(
        settings.model, settings.cache_dir, complete=quantization == "none"
    )
    config = read_config(model_dir)
    args = ModelArgs.from_hf_config(config)
    max_len = settings.max_model_len or min(args.max_position_embeddings, 8192)
    block_bytes = KVCache.bytes_per_block(args, settings.block_size, dtype)
    num_blocks = settings.num_kv_blocks or settings.kv_cache_memory_mb * 2**20 // block_bytes
    if num_blocks * settings.block_size < max_len:
        raise EngineConfigError(
            f"the KV cache ({num_blocks} blocks of {settings.block_size}) holds "
            f"{num_blocks * settings.block_size} tokens, fewer than max_model_len={max_len}; "
            "raise --kv-cache-memory-mb or lower --max-model-len"
        )
    model_id = settings.served_model_name or served_name(settings.model, model_dir)
    return EnginePlan(
        model_dir, config, device, dtype, max_len, num_blocks, model_id, quantization, gguf
    )


def check_adapter_flags(settings: Settings) -> None:
    """`--adapter NAME=PATH` and `--adapter-dir` / `--adapter-root` must name usable folders."""
    for item in settings.adapters:
        name, path = parse_adapter_arg(item)
        try:
            validate_name(name)
        except InvalidNameError as e:
            raise EngineConfigError(f"--adapter {item}: {e}") from None
        if not path.is_dir():
            raise EngineConfigError(f"--adapter {item}: {path} is not an adapter directory")
    for folder in [*settings.adapter_dirs, *settings.adapter_roots]:
        if not folder.is_dir():
            raise EngineConfigError(f"--adapter-dir / --adapter-root {folder}: not a directory")


# ---- build ----------------------------------------------------------------------------------
def build_engine(settings: Settings, metrics: Metrics, plan: EnginePlan | None = None) -> Engine:
    """Load the model and tokenizer of the plan (made here when not given), build the adapter
    registry and allocate the KV cache. The engine is not running yet."""
    from adapterserve.server.model.weights import load_model

    plan = plan or plan_engine(settings)
    model = load_model(
        plan.model_dir, plan.device, plan.dtype, plan.quantization, plan.gguf, settings.cache_dir
    )
    tokenizer = Tokenizer(plan.model_dir, eos_token_ids=eos_ids(plan.config))
    log.info(
        "serving %s on %s (%s, quantization %s): %d KV blocks of %d tokens; a decode step "
        "reads %.1f MB of weights",
        plan.model_id,
        plan.device,
        plan.dtype,
        plan.quantization,
        plan.num_blocks,
        settings.block_size,
        model.decode_weight_bytes() / 1e6,
    )
    registry = build_registry(settings, plan, metrics, model.base_weight)
    ops = kernels.ops_for(plan.device)
    model.use_ops(ops)
    model.hooks = PoolHooks(registry.pool, ops)
    engine = Engine(
        model,
        tokenizer,
        settings,
        metrics,
        plan.model_id,
        plan.max_model_len,
        plan.num_blocks,
        registry,
    )
    registry.on_ready = engine.wake
    if compile_wanted(settings.compile, plan.device):
        engine.enable_compile()
    return engine


def build_registry(
    settings: Settings,
    plan: EnginePlan,
    metrics: Metrics,
    base_weight: Callable[[int, str], torch.Tensor] | None = None,
) -> AdapterRegistry:
    """The slot pool and registry: the durable store's uploads, then `--adapter NAME=PATH` and
    every subfolder of each `--adapter-dir` (these are served, not copied into the store)."""
    fingerprint = BaseFingerprint.from_hf_config(plan.config)
    pool = AdapterPool(
        fingerprint, settings.adapter_slots, settings.max_adapter_rank, plan.device, plan.dtype
    )
    pool.base_weight = base_weight  # before the store's adapters are read: DoRA needs it
    store = AdapterStore(settings.adapter_store, settings.max_upload_bytes, settings.max_adapters)
    registry = AdapterRegistry(
        pool,
        max_rank=settings.max_adapter_rank,
        store=store,
        host_capacity=settings.host_adapter_cache,
        roots=[*settings.adapter_dirs, *settings.adapter_roots],
        observer=metrics,
        reserved_names={plan.model_id},
    )
    for name, reason in registry.load_store():
        log.warning("stored adapter %s skipped: %s", name, reason)
    named = [parse_adapter_arg(item) for item in settings.adapters]
    for folder in settings.adapter_dirs:
        if not folder.is_dir():
            raise EngineConfigError(f"--adapter-dir {folder}: not a directory")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            try:
                registry.add_path(sub.name, sub, replace=True, require_root=False)
            except AdapterError as e:
                log.warning("adapter folder %s skipped: %s", sub.name, e)
    for name, path in named:  # named ones must work: a bad one stops the start
        try:
            registry.add_path(name, path, replace=True, require_root=False)
        except AdapterError as e:
            raise EngineConfigError(f"--adapter {name}={path}: {e}") from None
    log.info(
        "adapters: %d registered, %d device slots, max rank %d",
        len(registry.list()),
        settings.adapter_slots,
        settings.max_adapter_rank,
    )
    return registry


# ---- start ----------------------------------------------------------------------------------
async def start_engine(
    settings: Settings, metrics: Metrics, plan: EnginePlan | None = None
) -> Engine:
    """Build the engine and run its step loop, both on one dedicated thread; returns once it
    is built and its loop has begun: with a compiled decode step, the loop first warms up its
    shapes, and `engine.ready` turns true (so /ready 200) only after that; requests submitted
    meanwhile wait. Stop it with `engine.stop()` (or use `running_engine`).

    All torch work stays on that one OS thread: on CPU, a second thread that has run parallel
    ops keeps an OpenMP pool alive, and MKL then ran the engine's matmuls
    slower (BENCHMARKS.md, 'Engine vs transformers (issue 2)').
    """
    loop = asyncio.get_running_loop()
    built: asyncio.Future[Engine] = loop.create_future()

    def body() -> None:
        try:
            engine = build_engine(settings, metrics, plan)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(built.set_exception, e)
            return
        engine.run(on_started=lambda: loop.call_soon_threadsafe(built.set_result, engine))

    threading.Thread(target=body, name="engine", daemon=True).start()
    return await built


@asynccontextmanager
async def running_engine(
    settings: Settings, metrics: Metrics, plan: EnginePlan | None = None
) -> AsyncIterator[Engine]:
    """A started engine (see start_engine) for the body of the block; then it stops (requests
    still running are aborted) and its adapter registry closes."""
    engine = await start_engine(settings, metrics, plan)
    try:
        yield engine
    finally:
        await engine.stop()
        if engine.registry is not None:
            engine.registry.close()
