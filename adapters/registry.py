"""AdapterRegistry: adapter name -> current version -> tiers (device slot, host spec, disk files).

Tiers, each an LRU:
- device: the version's weights sit in an `AdapterPool` slot; running requests hold a `Lease`
  on it (a refcount). Only slots with no lease are evicted.
- host: the parsed, validated `AdapterSpec` in memory (`host_capacity` of them), so a later
  device load is a copy, not a parse.
- disk: only the directory (the durable store for uploads, or a path under a configured root).
  A request for such an adapter starts a parse on the loader thread and waits *without*
  blocking the engine: other requests keep running, and `on_ready` wakes the engine when the
  spec is on the host.

Versions: adding a name that exists (replace) or deleting it retires the old version. A request
*holds* the version that is current when it is accepted (`hold`, before its HTTP response
starts), and is served on that version even if the adapter is replaced or deleted while it
waits for admission: a retired version keeps its parsed spec while it is held (read from disk
before its files go, when it was only on disk), and its slot is reclaimed when the last hold is
released. Requests accepted after the change get the new version, or an UnknownAdapterError
after a delete. Weights never mix: a slot is only reloaded when no hold is on it.

Threads: registration (`add_upload`, `add_path`, `remove`) runs on any thread and does its file
work (parse, commit) outside the state lock; `acquire` / `release` and therefore every pool
write run on the engine thread only, so no forward pass ever sees a slot change mid-step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adapterserve.adapters.errors import (
    AdapterError,
    AdapterExistsError,
    AdapterFormatError,
    AdapterLoadError,
    AdapterPathNotFoundError,
    InvalidPathError,
    NoAdapterRootsError,
    NoAdapterStoreError,
    PathNotAllowedError,
    UnknownAdapterError,
)
from adapterserve.adapters.formats import load_adapter
from adapterserve.adapters.kinds import kind_for
from adapterserve.adapters.pool import AdapterPool
from adapterserve.adapters.spec import MODEL_TARGETS, AdapterKind, AdapterSpec
from adapterserve.adapters.store import AdapterStore, validate_name

log = logging.getLogger(__name__)

TIERS = ("device", "host", "disk")


def _unknown(name: str) -> UnknownAdapterError:
    return UnknownAdapterError("model", f"adapter {name!r} does not exist")


def _load_error(name: str, reason: str) -> AdapterLoadError:
    return AdapterLoadError("model", f"adapter {name!r} could not be loaded: {reason}")


class RegistryObserver(Protocol):
    """Metrics sink (implemented by the server; adapters never import it)."""

    def on_adapter_load(self, source: str, seconds: float) -> None: ...

    def on_adapter_evict(self, tier: str) -> None: ...

    def on_adapter_tiers(self, counts: dict[str, int]) -> None: ...

    def on_adapter_acquire(self, hit: bool) -> None: ...

    def on_adapter_removed(self, name: str) -> None: ...


@dataclass(eq=False)
class Entry:
    """One version of a named adapter and where its weights are right now."""

    name: str
    version: int
    path: Path
    origin: str  # "upload" (durable store) | "path" (a directory the operator named)
    created: float
    kind: AdapterKind
    rank: int
    targets: tuple[str, ...]
    num_virtual_tokens: int
    size_bytes: int
    spec: AdapterSpec | None = None  # host tier (kept while held after retirement)
    slot: int | None = None  # device tier
    refs: int = 0  # holds of accepted requests (admitted or not); a held slot is never evicted
    live: bool = True  # False once replaced or deleted
    loading: bool = False
    wanted: bool = False  # a request waits for it: its host copy is not evicted meanwhile
    error: str | None = None
    last_used: float = field(default_factory=time.monotonic)
    stamp: tuple[int, ...] | None = None  # the store folder's AdapterStore.stamp (uploads)

    @property
    def tier(self) -> str:
        if self.slot is not None:
            return "device"
        return "host" if self.spec is not None else "disk"

    @property
    def uses_slot_ids(self) -> bool:
        """Whether the adapter acts through the hook points (vs. at admission)."""
        return kind_for(self.kind).uses_slot_ids


@dataclass(frozen=True, eq=False)
class Lease:
    """A held version's device slot, from admission until the request finishes."""

    entry: Entry
    slot: int

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> AdapterKind:
        return self.entry.kind


def _targets(spec: AdapterSpec) -> tuple[str, ...]:
    order = ("q", "k", "v", "o", "gate", "up", "down")
    found = {target for _, target in spec.modules}
    return tuple(t for t in order if t in found) + tuple(
        t for t in MODEL_TARGETS if t in spec.model_modules
    )


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


class AdapterRegistry:
    clustered = (
        False  # EngineClient's catalog: a cluster's (server/cluster) refuses loading by path
    )

    def __init__(
        self,
        pool: AdapterPool,
        *,
        max_rank: int,
        store: AdapterStore | None = None,
        host_capacity: int = 64,
        roots: Iterable[Path] = (),
        observer: RegistryObserver | None = None,
        on_ready: Callable[[], None] | None = None,
        reserved_names: Iterable[str] = (),
    ) -> None:
        self.pool, self.max_rank, self.store = pool, max_rank, store
        self.host_capacity = max(0, host_capacity)
        self.roots = tuple(Path(r).resolve() for r in roots)
        self.observer, self.on_ready = observer, on_ready
        self.reserved_names = frozenset(reserved_names)  # e.g. the base model's id
        self._lock = threading.RLock()  # guards the state below; never held during file IO
        self._install_lock = threading.Lock()  # one add / replace / delete at a time
        self._entries: dict[str, Entry] = {}
        self._slots: list[Entry | None] = [None] * pool.num_slots
        self._host: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, LRU first
        self._versions = itertools.count(1)
        self._refused: dict[str, tuple[int, ...]] = {}  # stored folders sync_stored could not read
        self._owner_thread = threading.get_ident()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-load")

    # ---- registration (any thread; blocking file IO) --------------------------------------
    def parse(self, directory: Path, name: str) -> AdapterSpec:
        """Validate `directory` as an adapter for this base; AdapterFormatError names the field.

        Off the thread that built the registry (the engine's), torch runs single-threaded here:
        a second thread that runs parallel CPU ops keeps its own OpenMP team, and the engine's
        steps then run slower for the rest of the process (BENCHMARKS.md, "Adapter overhead in
        one batch").
        """
        if threading.get_ident() != self._owner_thread:
            torch.set_num_threads(1)  # this thread's OpenMP setting only
        return load_adapter(
            directory, name, self.pool.fingerprint, self.max_rank, self.pool.base_weight
        )

    def add_upload(self, staging: Path, name: str, replace: bool = False) -> Entry:
        """Validate a filled store staging directory, commit it as `name`, serve it."""
        if self.store is None:
            raise NoAdapterStoreError(None, "this server has no adapter store")
        validate_name(name)
        try:
            spec = self.parse(staging, name)
        except BaseException:
            self.store.discard(staging)
            raise
        with self._install_lock:
            self._check_replace(name, replace, staging)
            self._keep_for_holders(name)
            path = self.store.commit(staging, name, replace)
            return self._install(name, path, "upload", spec, stamp=self.store.stamp(name))

    def add_path(
        self, name: str, path: Path, *, replace: bool = False, require_root: bool = True
    ) -> Entry:
        """Serve the adapter directory at `path` as `name` (not copied; read when needed).

        With `require_root` (client-supplied paths) the resolved path must lie under one of the
        configured roots; the operator's own `--adapter NAME=PATH` skips that check.
        """
        validate_name(name)
        directory = self._resolve(path, require_root)
        spec = self.parse(directory, name)
        with self._install_lock:
            self._check_replace(name, replace, None)
            self._keep_for_holders(name)
            if self.store is not None and self.store.exists(name):
                self.store.delete(name)  # replacing an upload by a path: the path wins
            return self._install(name, directory, "path", spec)

    def remove(self, name: str) -> Entry:
        """Forget `name` (and delete its stored files if uploaded); in-flight requests finish."""
        with self._install_lock:
            with self._lock:
                entry = self._entries.get(name)
            if entry is None:
                raise _unknown(name)
            self._keep_for_holders(name)
            if entry.origin == "upload" and self.store is not None:
                with contextlib.suppress(UnknownAdapterError):  # its files went meanwhile
                    self.store.delete(name)
            with self._lock:
                del self._entries[name]
                self._retire(entry)
                self._publish_tiers()
            if self.observer is not None:
                self.observer.on_adapter_removed(name)
            return entry

    def load_store(self) -> list[tuple[str, str]]:
        """Register every adapter in the durable store (at startup). Returns (name, reason) for
        the ones that no longer validate; those stay on disk, unserved, and are logged."""
        skipped: list[tuple[str, str]] = []
        if self.store is None:
            return skipped
        for stored in self.store.list():
            try:
                spec = self.parse(stored.path, stored.name)
            except (AdapterFormatError, OSError, ValueError) as e:
                skipped.append((stored.name, str(e)))
                log.warning("stored adapter %r is not served: %s", stored.name, e)
                continue
            with self._install_lock:
                self._install(
                    stored.name,
                    stored.path,
                    "upload",
                    spec,
                    created=stored.created,
                    stamp=self.store.stamp(stored.name),
                )
        return skipped

    # ---- a store shared with other processes (cluster replicas) ------------------------------
    def store_changed(self, name: str) -> bool:
        """Whether the store holds another state of `name` than this registry serves: another
        process uploaded, replaced or deleted it (one stat; any thread)."""
        if self.store is None or name in self.reserved_names:
            return False
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None and entry.origin != "upload":
            return False
        stamp = self.store.stamp(name)
        if entry is None and stamp is not None and self._refused.get(name) == stamp:
            return False  # this folder was read and refused once; a new commit changes it
        return stamp != (entry.stamp if entry is not None else None)

    def sync_stored(self, name: str) -> None:
        """Serve the store's current state of `name` (see store_changed): a new or replaced
        folder is read and installed, a vanished one forgotten (its files are gone already).
        Requests that hold the old version finish on it, as after a local replace or delete."""
        with self._install_lock:
            if not self.store_changed(name):
                return
            stamp = self.store.stamp(name)
            spec = None
            if stamp is not None:
                try:
                    spec = self.parse(self.store.path(name), name)
                except (AdapterError, OSError, ValueError) as e:
                    log.warning("stored adapter %r changed and is not served: %s", name, e)
                    self._refused[name] = stamp
            if spec is not None:
                self._refused.pop(name, None)
                self._install(name, self.store.path(name), "upload", spec, stamp=stamp)
            else:
                self._forget(name)

    def sync_store(self) -> None:
        """sync_stored for every stored name and every upload this registry serves."""
        if self.store is None:
            return
        with self._lock:
            served = [e.name for e in self._entries.values() if e.origin == "upload"]
        for name in sorted({*served, *(s.name for s in self.store.list())}):
            self.sync_stored(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return
            self._retire(entry)
            self._publish_tiers()
        if self.observer is not None:
            self.observer.on_adapter_removed(name)

    def _resolve(self, path: Path, require_root: bool) -> Path:
        raw = os.fspath(path)
        if not raw or "\x00" in raw:
            raise InvalidPathError("lora_path", "expected a directory path")
        try:
            directory = Path(raw).resolve(strict=True)
        except (OSError, RuntimeError):
            raise AdapterPathNotFoundError(
                "lora_path", "no adapter directory at that path"
            ) from None
        if require_root and not _under(directory, self.roots):
            refusal = PathNotAllowedError if self.roots else NoAdapterRootsError
            raise refusal(
                "lora_path",
                "the path is not under a configured adapter root (--adapter-dir / "
                "ADAPTERSERVE_ADAPTER_ROOTS)",
            )
        if not directory.is_dir():
            raise InvalidPathError("lora_path", "expected an adapter directory")
        return directory

    def _check_replace(self, name: str, replace: bool, staging: Path | None) -> None:
        with self._lock:
            exists = name in self._entries
        conflict = None
        if name in self.reserved_names:
            conflict = f"{name!r} is the base model's id: choose another adapter name"
        elif exists and not replace:
            conflict = f"adapter {name!r} already exists: pass replace=true"
        if conflict is not None:
            if staging is not None and self.store is not None:
                self.store.discard(staging)
            raise AdapterExistsError("name", conflict)

    def _keep_for_holders(self, name: str) -> None:
        """Before the files of `name`'s current version are replaced or deleted (install lock
        held): if accepted requests hold it and its weights are only on disk, read them now, so
        that those requests are served on the version they were accepted for."""
        with self._lock:
            entry = self._entries.get(name)
            needed = entry is not None and entry.refs > 0 and entry.spec is None
            needed = needed and entry.slot is None
        if not needed:
            return
        try:
            spec = self.parse(entry.path, entry.name)
        except Exception as e:  # noqa: BLE001 - the holders get the reason at admission
            log.warning("adapter %r held by requests could not be kept: %s", entry.name, e)
            return
        with self._lock:
            if entry.spec is None:
                entry.spec = spec

    def _install(
        self,
        name: str,
        path: Path,
        origin: str,
        spec: AdapterSpec,
        created: float | None = None,
        stamp: tuple[int, ...] | None = None,
    ) -> Entry:
        entry = Entry(
            name=name,
            version=next(self._versions),
            path=path,
            origin=origin,
            created=time.time() if created is None else created,
            kind=spec.kind,
            rank=spec.rank,
            targets=_targets(spec),
            num_virtual_tokens=spec.num_virtual_tokens,
            size_bytes=spec.size_bytes,
            stamp=stamp,
        )
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = entry
            if old is not None:
                self._retire(old)
            self._put_host(entry, spec)
            self._publish_tiers()
        return entry

    # ---- lookups (any thread) --------------------------------------------------------------
    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def get(self, name: str) -> Entry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise _unknown(name)
        return entry

    def list(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.created, e.name))

    def tier_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(TIERS, 0)
            for entry in self._entries.values():
                counts[entry.tier] += 1
            return counts

    # ---- engine thread ---------------------------------------------------------------------
    def hold(self, name: str) -> Entry:
        """Pin `name`'s current version for a request accepted now (any thread, before its
        response starts): the request is served on this version even if the adapter is
        replaced or deleted before it is admitted. UnknownAdapterError when there is none.
        Every hold is ended by exactly one `release`."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise _unknown(name)
            entry.refs += 1
            entry.last_used = time.monotonic()
            return entry

    def acquire(self, entry: Entry) -> Lease | None:
        """Engine thread: the device slot of a held version, loading it if needed; None while it
        is loading (from disk, or waiting for a slot to free up). AdapterLoadError when its
        files cannot be read back (or went away before a retired version was read)."""
        with self._lock:
            assert entry.refs > 0, "acquire needs a hold"
            entry.last_used = time.monotonic()
            hit = entry.slot is not None
            if entry.slot is None:
                entry.wanted = True
                if entry.spec is None:
                    if not entry.live:
                        raise _load_error(
                            entry.name, "it was replaced or deleted before it could be read; retry"
                        )
                    self._start_disk_load(entry)
                    return None
                slot = self._free_slot()
                if slot is None:
                    return None
                started = time.perf_counter()
                kind_for(entry.spec.kind).load(self.pool, slot, entry.spec)
                entry.slot, self._slots[slot] = slot, entry
                if self.observer is not None:
                    self.observer.on_adapter_load("host", time.perf_counter() - started)
                if self.host_capacity == 0 and entry.live:  # the device copy is the only one
                    self._host.pop(id(entry), None)
                    entry.spec = None
                self._publish_tiers()
            entry.wanted = False
            self._touch_host(entry)
            if self.observer is not None:
                self.observer.on_adapter_acquire(hit)
            return Lease(entry, entry.slot)

    def release(self, entry: Entry) -> None:
        """End one hold (the request finished, failed or was never admitted)."""
        with self._lock:
            entry.refs -= 1
            assert entry.refs >= 0, f"adapter {entry.name!r}: more releases than holds"
            if entry.refs == 0 and not entry.live:
                entry.spec = None
                self._free(entry)
            elif entry.refs == 0 and entry.wanted:
                # its waiting requests went away before the load was acquired: the copy no
                # longer outstays host_capacity
                entry.wanted = False
                self._trim_host()
                self._publish_tiers()

    def _free_slot(self) -> int | None:
        """A slot to load into: an empty one, a retired one, else the LRU unleased one."""
        best: tuple[float, int] | None = None
        for slot, holder in enumerate(self._slots):
            if holder is None:
                return slot
            if holder.refs == 0 and not holder.live:
                self._free(holder)
                return slot
            if holder.refs == 0 and (best is None or holder.last_used < best[0]):
                best = (holder.last_used, slot)
        if best is None:
            return None
        victim = self._slots[best[1]]
        assert victim is not None
        self._free(victim)
        if self.observer is not None:
            self.observer.on_adapter_evict("device")
        return best[1]

    def _free(self, entry: Entry) -> None:
        slot = entry.slot
        if slot is not None:
            self.pool.clear(slot)
            self._slots[slot] = None
            entry.slot = None
            self._publish_tiers()

    def _start_disk_load(self, entry: Entry) -> None:
        if entry.error is not None:
            error, entry.error = entry.error, None  # the next request retries
            raise _load_error(entry.name, error)
        if not entry.loading:
            entry.loading = True
            self._loader.submit(self._load_from_disk, entry)

    def _load_from_disk(self, entry: Entry) -> None:
        started = time.perf_counter()
        try:
            spec = self.parse(entry.path, entry.name)
            error = None
        except Exception as e:  # noqa: BLE001 - reported to the requests that wait for it
            spec, error = None, str(e) if isinstance(e, AdapterFormatError) else type(e).__name__
            log.warning("reloading adapter %r from disk failed: %s", entry.name, e)
        with self._lock:
            entry.loading = False
            if entry.live:
                if spec is not None:
                    self._put_host(entry, spec)
                    if self.observer is not None:
                        self.observer.on_adapter_load("disk", time.perf_counter() - started)
                else:
                    entry.error = error
                self._publish_tiers()
        if self.on_ready is not None:
            self.on_ready()

    # ---- host tier -------------------------------------------------------------------------
    def _put_host(self, entry: Entry, spec: AdapterSpec) -> None:
        """Keep `spec` on the host, evicting LRU copies beyond capacity. Copies that a waiting
        request needs (`wanted`) are kept even past capacity, so that every load makes progress."""
        if self.host_capacity == 0 and not entry.wanted:
            return
        entry.spec = spec
        self._host[id(entry)] = entry
        self._host.move_to_end(id(entry))
        self._trim_host()

    def _trim_host(self) -> None:
        """Evict LRU host copies beyond capacity, except those a waiting request needs."""
        excess = len(self._host) - self.host_capacity
        for key, victim in list(self._host.items()):
            if excess <= 0:
                break
            if victim.wanted:
                continue
            del self._host[key]
            victim.spec = None
            excess -= 1
            if self.observer is not None:
                self.observer.on_adapter_evict("host")

    def _touch_host(self, entry: Entry) -> None:
        if id(entry) in self._host:
            self._host.move_to_end(id(entry))

    def _retire(self, entry: Entry) -> None:
        entry.live = False
        self._host.pop(id(entry), None)
        if entry.refs == 0:
            entry.spec = None
        # else its holders still need it; its slot is reclaimed on the engine thread, by
        # release() or _free_slot()

    def _publish_tiers(self) -> None:
        if self.observer is not None:
            counts = dict.fromkeys(TIERS, 0)
            for entry in self._entries.values():
                counts[entry.tier] += 1
            self.observer.on_adapter_tiers(counts)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
