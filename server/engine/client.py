"""EngineClient: the one interface the HTTP routers, server/api/serving.py, the evaluation runner
and the console's endpoints use to reach an engine, wherever it runs.

Three implementations:
- `Engine` (server/engine/engine.py): the step loop in this process, on its own thread
  (`--engine-process false`, and the unit tests that look inside the engine);
- `EngineProcessClient` (server/engine/process.py): the engine core in a child process, the
  default for `serve` — a native crash there is a restart, not the end of the server;
- `ClusterEngine` (server/cluster/proxy.py): the engine replicas of a Ray Serve cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from adapterserve.adapters.store import AdapterStore
    from adapterserve.server.engine.output import RequestOutput
    from adapterserve.server.engine.sampling import SamplingParams
    from adapterserve.server.model.llama import ModelArgs
    from adapterserve.server.model.tokenizer import Tokenizer


class OutputStreamLike(Protocol):
    """One request's outputs: an async iterator; leaving it early aborts the request."""

    request_id: str
    finished: bool

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def abort(self) -> None: ...


class ModelInfo(Protocol):
    args: ModelArgs
    quantization: str


class AdapterEntry(Protocol):
    """The card fields of an adapter (adapters.registry.Entry, or a remote engine's view)."""

    name: str
    version: int
    origin: str
    created: float
    rank: int
    targets: tuple[str, ...]
    num_virtual_tokens: int
    size_bytes: int

    @property
    def tier(self) -> str: ...


class AdapterCatalog(Protocol):
    """The adapter catalog (list, card, upload commit, load by path, delete)."""

    store: AdapterStore | None
    roots: tuple[Path, ...]
    clustered: bool

    def list(self) -> list[Any]: ...

    def exists(self, name: str) -> bool: ...

    def get(self, name: str) -> Any: ...

    def add_upload(self, staging: Path, name: str, replace: bool = False) -> Any: ...

    def add_path(
        self, name: str, path: Path, replace: bool = False, require_root: bool = True
    ) -> Any: ...

    def remove(self, name: str) -> Any: ...

    def close(self) -> None: ...


class GrammarService(Protocol):
    """Structured-output grammars: compiled (and checked) in the sandbox, made into what the
    engine's requests carry (Grammars in process, RemoteGrammars for a remote engine)."""

    def compile(self, kind: str, spec: Any) -> str: ...

    async def compile_async(self, kind: str, spec: Any) -> str: ...

    def constraint(self, grammar: str) -> Any: ...

    async def constraints_async(self, grammar: str, count: int) -> list[Any]: ...

    def warm(self) -> None: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    """Submit (a stream of outputs per request, `confirm` for the engine's acceptance),
    abort (by leaving the stream), the adapter catalog, capacity and limits, the tokenizer,
    health and readiness. Metrics are the app's Metrics, which a remote engine's client fills."""

    model_id: str
    max_model_len: int
    tokenizer: Tokenizer
    model: ModelInfo
    registry: AdapterCatalog | None
    grammars: GrammarService
    on_fatal: Callable[[BaseException], None] | None

    @property
    def vocab_size(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    @property
    def warming(self) -> bool: ...

    @property
    def restarting(self) -> bool: ...

    def token_text(self, token_id: int) -> str: ...

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str | None = None,
        request_id: str | None = None,
    ) -> Any: ...

    def add_requests(
        self, requests: list[tuple[list[int], SamplingParams, str | None]], model: str | None = None
    ) -> list[Any]: ...

    def add_beam_searches(
        self, requests: list[tuple[list[int], SamplingParams, list[str]]], model: str | None = None
    ) -> list[list[Any]]: ...

    async def confirm(self, streams: list[Any]) -> None: ...

    async def until_ready(self, poll_s: float = 0.05) -> None: ...

    async def sync_metrics(self) -> None:
        """Before /metrics renders: bring a remote engine's series up to date."""

    async def stop(self) -> None: ...
