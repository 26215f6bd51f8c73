"""What an engine client keeps when the engine runs elsewhere (its own process,
server/engine/process.py, or the cluster's replicas, server/cluster): the model's facts, the
grammars compiled (and checked) on this side, and a view of the adapter catalog.

- `ModelFacts`: what the routers read of the model (its dimensions, its quantization).
- `RemoteGrammars` / `GrammarText`: a client grammar is compiled in this process's sandbox
  (server/engine/constraint.py); the engine gets its text and builds the matcher, which does
  not cross processes.
- `AdapterState` / `RemoteEntry` / `RemoteRegistry`: the adapter catalog as the routers use an
  AdapterRegistry, answered from the engines' latest reports, overlaid with what this side
  changed since; uploads are staged here in the (shared, durable) store and committed there.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterserve.adapters.errors import UnknownAdapterError
from adapterserve.adapters.registry import Entry
from adapterserve.adapters.spec import AdapterKind
from adapterserve.adapters.store import AdapterStore
from adapterserve.server.engine.constraint import Grammars
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.model.llama import ModelArgs

VIEW_CACHE_S = 0.2  # the catalog view is rebuilt at most this often (every request looks it up)
RECENT_S = 10.0  # a change made here overrides the reports this long (they catch up sooner)


@dataclass(frozen=True)
class ModelFacts:
    """The base model as the routers see it (`engine.model`): its dimensions and quantization."""

    args: ModelArgs
    quantization: str


# ---------------------------------------------------------------- grammars


class RemoteGrammars:
    """Grammars compiled (and checked) here; the matcher is built by the engine, which gets
    the grammar text (a matcher does not cross processes)."""

    def __init__(self, grammars: Grammars) -> None:
        self._grammars = grammars

    def compile(self, kind: str, spec: Any) -> str:
        return self._grammars.compile(kind, spec)

    async def compile_async(self, kind: str, spec: Any) -> str:
        return await self._grammars.compile_async(kind, spec)

    def constraint(self, grammar: str) -> GrammarText:
        return GrammarText(grammar)

    def warm(self) -> None:
        """The sandbox here; the engine builds its matchers (and warms them) itself."""
        self._grammars.warm(matchers=False)

    async def constraints_async(self, grammar: str, count: int) -> list[GrammarText]:
        return [GrammarText(grammar)] * count

    def close(self) -> None:
        self._grammars.close()


@dataclass(frozen=True)
class GrammarText:
    """SamplingParams.constraint on the client side: the grammar the engine compiles."""

    grammar: str


def for_remote(
    requests: list[tuple[list[int], SamplingParams, str | None]],
) -> tuple[list[tuple[list[int], SamplingParams, str]], str | None]:
    """One call's requests as a remote engine takes them: constraints stripped (a matcher does
    not cross processes; the engine builds it from the call's one grammar text, returned
    beside them) and every request id set."""
    grammars = {
        p.constraint.grammar for _, p, _ in requests if isinstance(p.constraint, GrammarText)
    }
    assert len(grammars) <= 1, "one call carries one response format"
    plain = [
        (list(ids), dataclasses.replace(params, constraint=None), rid or uuid.uuid4().hex)
        for ids, params, rid in requests
    ]
    return plain, grammars.pop() if grammars else None


# ---------------------------------------------------------------- adapters


@dataclass(frozen=True)
class AdapterState:
    """One adapter as one engine serves it (the fields of an adapter card)."""

    name: str
    version: int
    origin: str
    created: float
    kind: str
    rank: int
    targets: tuple[str, ...]
    num_virtual_tokens: int
    size_bytes: int
    tier: str

    @classmethod
    def of(cls, entry: Entry) -> AdapterState:
        return cls(
            entry.name,
            entry.version,
            entry.origin,
            entry.created,
            entry.kind.value,
            entry.rank,
            tuple(entry.targets),
            entry.num_virtual_tokens,
            entry.size_bytes,
            entry.tier,
        )


@dataclass(eq=False)
class RemoteEntry:
    """An adapter as the engines serve it (the card fields of adapters.registry.Entry) and,
    on a cluster, its tier on each replica that reports it."""

    name: str
    version: int
    origin: str
    created: float
    kind: AdapterKind
    rank: int
    targets: tuple[str, ...]
    num_virtual_tokens: int
    size_bytes: int
    tier: str
    replicas: dict[str, str] | None = None

    @classmethod
    def of(cls, state: AdapterState, replicas: dict[str, str] | None = None) -> RemoteEntry:
        tier = _best_tier(replicas.values()) if replicas else state.tier
        return cls(
            state.name,
            state.version,
            state.origin,
            state.created,
            AdapterKind(state.kind),
            state.rank,
            state.targets,
            state.num_virtual_tokens,
            state.size_bytes,
            tier,
            replicas,
        )


def _best_tier(tiers: Any) -> str:
    tiers = set(tiers)
    return next(t for t in ("device", "host", "disk") if t in tiers or t == "disk")


class RemoteRegistry:
    """The adapters of engines elsewhere, as the routers use an AdapterRegistry.

    Reads come from `_states()` (the engines' latest reports, which subclasses define),
    overlaid with what this side changed since (`_recent`) and checked against the durable
    store (a delete shows at once). Writes go through `_admin(method, *args)` (a worker
    thread's call that returns the engine's AdapterState or raises its AdapterError)."""

    clustered = False  # the routers' cue: a cluster refuses loading by path

    def __init__(self, store: AdapterStore, roots: tuple[Path, ...] = ()) -> None:
        self.store, self.roots = store, roots
        self._recent: dict[str, tuple[float, RemoteEntry | None]] = {}
        self._cached: tuple[float, dict[str, RemoteEntry]] = (0.0, {})

    # what subclasses define
    def _states(self) -> dict[str, RemoteEntry]:
        raise NotImplementedError

    def _admin(self, method: str, *args: Any) -> AdapterState:
        raise NotImplementedError

    # reads
    def list(self) -> list[RemoteEntry]:
        entries = self._view()
        return sorted(entries.values(), key=lambda e: (e.created, e.name))

    def exists(self, name: str) -> bool:
        return name in self._view()

    def get(self, name: str) -> RemoteEntry:
        entry = self._view().get(name)
        if entry is None:
            raise UnknownAdapterError("model", f"adapter {name!r} does not exist")
        return entry

    def _view(self) -> dict[str, RemoteEntry]:
        built_at, view = self._cached
        if time.monotonic() - built_at > VIEW_CACHE_S:
            view = self._build_view()
            self._cached = (time.monotonic(), view)
        return view

    def _build_view(self) -> dict[str, RemoteEntry]:
        view = {
            name: entry
            for name, entry in self._states().items()
            if entry.origin != "upload" or self.store.exists(name)
        }
        now = time.monotonic()
        for name, (until, entry) in list(self._recent.items()):
            if now > until:
                del self._recent[name]
            elif entry is None:
                view.pop(name, None)
            elif name not in view or view[name].created < entry.created:
                view[name] = entry
        return view

    # writes (worker threads)
    def add_upload(self, staging: Path, name: str, replace: bool = False) -> RemoteEntry:
        """The engine validates and commits the staged upload."""
        entry = RemoteEntry.of(self._admin("add_upload", str(staging), name, replace))
        self._remember(name, entry)
        return entry

    def remove(self, name: str) -> RemoteEntry:
        if not self.exists(name):
            raise UnknownAdapterError("model", f"adapter {name!r} does not exist")
        entry = RemoteEntry.of(self._admin("remove", name))
        self._remember(name, None)
        return entry

    def add_path(
        self, name: str, path: Path, replace: bool = False, require_root: bool = True
    ) -> RemoteEntry:
        entry = RemoteEntry.of(self._admin("add_path", name, str(path), replace, require_root))
        self._remember(name, entry)
        return entry

    def caught_up(self) -> None:
        """A report newer than every change made here arrived: it alone is the truth."""
        self._recent.clear()
        self._cached = (0.0, {})

    def _remember(self, name: str, entry: RemoteEntry | None) -> None:
        """Until the engines' reports show it."""
        self._recent[name] = (time.monotonic() + RECENT_S, entry)
        self._cached = (0.0, {})

    def close(self) -> None:
        pass
