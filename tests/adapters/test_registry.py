"""AdapterRegistry lease and version rules on tiny in-memory adapters (no model, no engine):
holds pin a version, acquire loads a slot from the host copy or starts a disk load, replace and
delete retire the old version while its holders keep its weights, held slots are never evicted.

Every adapter here is a rank-2 LoRA on layer 0's q whose weights are all one value, so a pool
slot's tensors say which version it holds (`slot_value`)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapterserve.adapters.errors import AdapterLoadError, UnknownAdapterError
from adapterserve.adapters.pool import AdapterPool
from adapterserve.adapters.registry import AdapterRegistry, Entry, Lease
from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.adapters.store import AdapterStore
from tests.adapters.conftest import MAX_RANK, write_adapter

RANK = 2
Q_SITE = (0, ("q", "k", "v"))  # the pool's post stacks of layer 0's fused q|k|v
V1, V2, V3 = 0.25, 0.5, 0.75


def lora_files(path: Path, value: float) -> Path:
    """A PEFT LoRA directory: r=2 on layer 0's q_proj, A and B filled with `value`."""
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": ["q_proj"]}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.full((RANK, 64), value),
        f"{prefix}.lora_B.weight": torch.full((64, RANK), value),
    }
    return write_adapter(path, config, tensors)


def slot_value(pool: AdapterPool, slot: int) -> float | None:
    """The value a slot's LoRA weights hold (None: nothing loaded there)."""
    stacks = pool.post.get(Q_SITE)
    if stacks is None or slot not in stacks.loaded:
        return None
    stack = stacks.classes[8]  # rank 2 -> the rank-8 class
    a = stack.a[0, slot, :RANK]  # (r, d_in) of target q
    b = stack.b[0, slot, :RANK, :64]  # (r, d_out)
    assert torch.all(a == a[0, 0]) and torch.all(b == a[0, 0]), "weights of two versions mixed"
    assert not stack.a[0, slot, RANK:].any()  # rows past the rank stay zero
    return a[0, 0].item()


class Recorder:
    """RegistryObserver that counts what it is told."""

    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.acquires: list[bool] = []
        self.removed: list[str] = []

    def on_adapter_load(self, source: str, seconds: float) -> None:
        self.loads[source] += 1

    def on_adapter_evict(self, tier: str) -> None:
        self.evictions[tier] += 1

    def on_adapter_tiers(self, counts: dict[str, int]) -> None:
        pass

    def on_adapter_acquire(self, hit: bool) -> None:
        self.acquires.append(hit)

    def on_adapter_removed(self, name: str) -> None:
        self.removed.append(name)


class Setup:
    def __init__(self, tmp: Path, fingerprint: BaseFingerprint, slots: int, host: int) -> None:
        self.tmp = tmp
        self.pool = AdapterPool(fingerprint, slots, MAX_RANK, "cpu", torch.float32)
        self.store = AdapterStore(tmp / "store", max_upload_bytes=1 << 24)
        self.observer = Recorder()
        self.ready = threading.Event()
        self.registry = AdapterRegistry(
            self.pool,
            max_rank=MAX_RANK,
            store=self.store,
            host_capacity=host,
            observer=self.observer,
            on_ready=self.ready.set,
        )

    def upload(self, name: str, value: float, replace: bool = False) -> Entry:
        staging = self.store.new_staging()
        lora_files(staging, value)
        return self.registry.add_upload(staging, name, replace=replace)

    def path(self, name: str, value: float, replace: bool = False) -> Entry:
        folder = lora_files(self.tmp / "dirs" / f"{name}-{value}", value)
        return self.registry.add_path(name, folder, replace=replace, require_root=False)

    def acquire_after_load(self, entry: Entry) -> Lease:
        """acquire, which starts a disk load (None), then again once on_ready says it is done."""
        self.ready.clear()
        assert self.registry.acquire(entry) is None
        assert self.ready.wait(10), "on_ready was not called"
        lease = self.registry.acquire(entry)
        assert lease is not None
        return lease


@pytest.fixture
def make(tmp_path: Path, fingerprint: BaseFingerprint):
    made: list[Setup] = []

    def build(slots: int = 2, host: int = 64) -> Setup:
        made.append(Setup(tmp_path / str(len(made)), fingerprint, slots, host))
        return made[-1]

    yield build
    for setup in made:
        setup.registry.close()


# ---- holds and leases --------------------------------------------------------------------------
def test_hold_pins_the_current_version(make):
    s = make()
    entry = s.upload("a", V1)
    assert s.registry.hold("a") is entry and entry.refs == 1
    assert s.registry.hold("a") is entry and entry.refs == 2
    s.registry.release(entry)
    assert entry.refs == 1
    with pytest.raises(UnknownAdapterError, match="'nope' does not exist"):
        s.registry.hold("nope")


def test_acquire_loads_the_host_copy_into_a_slot(make):
    s = make(slots=2)
    entry = s.upload("a", V1)
    assert entry.tier == "host"
    held = s.registry.hold("a")
    lease = s.registry.acquire(held)
    assert isinstance(lease, Lease) and lease.entry is entry and lease.name == "a"
    assert lease.slot == 0 and entry.slot == 0 and entry.tier == "device"
    assert slot_value(s.pool, 0) == V1 and s.pool.names[0] == "a"
    again = s.registry.acquire(s.registry.hold("a"))  # a second request: same slot, a hit
    assert again.slot == 0 and s.observer.acquires == [False, True]
    assert s.observer.loads == {"host": 1} and entry.refs == 2


def test_acquire_without_a_hold_is_refused(make):
    s = make()
    entry = s.upload("a", V1)
    with pytest.raises(AssertionError, match="acquire needs a hold"):
        s.registry.acquire(entry)


def test_more_releases_than_holds_assert(make):
    s = make()
    entry = s.registry.hold(s.upload("a", V1).name)
    s.registry.release(entry)
    with pytest.raises(AssertionError, match="more releases than holds"):
        s.registry.release(entry)


def test_disk_load_waits_without_blocking_then_on_ready(make):
    """host_capacity=0: nothing stays on the host, so a request starts a load from disk and
    gets None until on_ready; the wanted host copy is kept until the slot is loaded, then
    dropped (the device copy is the only one)."""
    s = make(host=0)
    entry = s.upload("a", V1)
    assert entry.tier == "disk" and entry.spec is None
    gate = threading.Event()
    parse = s.registry.parse
    s.registry.parse = lambda directory, name: (gate.wait(10), parse(directory, name))[1]
    held = s.registry.hold("a")
    s.ready.clear()
    assert s.registry.acquire(held) is None and entry.loading and entry.wanted
    assert s.registry.acquire(held) is None  # still loading: no second load
    gate.set()
    assert s.ready.wait(10)
    assert entry.tier == "host" and entry.spec is not None  # kept: a request wants it
    lease = s.registry.acquire(held)
    assert lease.slot == 0 and slot_value(s.pool, 0) == V1
    assert entry.tier == "device" and entry.spec is None and not entry.wanted
    assert s.observer.loads == {"disk": 1, "host": 1}
    assert s.registry.tier_counts() == {"device": 1, "host": 0, "disk": 0}


def test_disk_load_failure_is_reported_then_retried(make):
    s = make(host=0)
    entry = s.path("a", V1)
    (entry.path / "adapter_config.json").write_text("{not json")
    held = s.registry.hold("a")
    s.ready.clear()
    assert s.registry.acquire(held) is None
    assert s.ready.wait(10)
    with pytest.raises(AdapterLoadError, match="'a' could not be loaded"):
        s.registry.acquire(held)
    lora_files(entry.path, V1)  # fixed on disk: the next request loads it
    assert slot_value(s.pool, s.acquire_after_load(held).slot) == V1


# ---- versions: replace and delete --------------------------------------------------------------
@pytest.mark.parametrize("how", ["upload", "path"])
def test_replace_serves_old_holders_the_old_weights_and_new_holds_the_new(make, how: str):
    s = make(slots=2)
    add = s.upload if how == "upload" else s.path
    old = add("a", V1)
    old_held = s.registry.hold("a")
    new = add("a", V2, replace=True)
    assert new is not old and new.version > old.version and not old.live and new.live
    assert s.registry.get("a") is new and s.registry.hold("a") is new
    assert [e.version for e in s.registry.list()] == [new.version]
    old_lease = s.registry.acquire(old_held)
    new_lease = s.registry.acquire(new)
    assert old_lease.entry is old and new_lease.entry is new and old_lease.slot != new_lease.slot
    assert slot_value(s.pool, old_lease.slot) == V1 and slot_value(s.pool, new_lease.slot) == V2
    s.registry.release(old_held)  # the last hold of the retired version: its slot goes
    assert old.slot is None and old.spec is None
    assert slot_value(s.pool, old_lease.slot) is None and s.pool.names[old_lease.slot] is None
    assert slot_value(s.pool, new_lease.slot) == V2


def test_delete_refuses_new_holds_and_serves_accepted_ones(make):
    s = make()
    entry = s.upload("a", V1)
    held = s.registry.hold("a")
    s.registry.remove("a")
    assert not (s.store.root / "a").exists()  # its files are gone
    assert not s.registry.exists("a") and s.observer.removed == ["a"]
    with pytest.raises(UnknownAdapterError):
        s.registry.hold("a")
    with pytest.raises(UnknownAdapterError):
        s.registry.remove("a")
    lease = s.registry.acquire(held)
    assert lease.entry is entry and slot_value(s.pool, lease.slot) == V1
    s.registry.release(held)
    assert slot_value(s.pool, lease.slot) is None and entry.slot is None


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_a_held_version_only_on_disk_is_read_before_its_files_go(make, change: str):
    s = make(host=0)
    entry = s.upload("a", V1)
    held = s.registry.hold("a")
    assert entry.tier == "disk"
    if change == "replace":
        s.upload("a", V2, replace=True)
    else:
        s.registry.remove("a")
    assert not entry.live and entry.spec is not None  # read for its holder
    assert (s.store.root / "a").exists() == (change == "replace")  # version 2's files
    lease = s.registry.acquire(held)  # no disk load: the files are gone or are version 2
    assert lease is not None and slot_value(s.pool, lease.slot) == V1
    assert s.observer.loads["disk"] == 0
    s.registry.release(held)
    assert entry.spec is None and entry.slot is None


def test_a_retired_version_that_could_not_be_read_fails_its_holders(make):
    s = make(host=0)
    entry = s.path("a", V1)
    held = s.registry.hold("a")
    (entry.path / "adapter_model.safetensors").write_bytes(b"broken")
    s.path("a", V2, replace=True)  # reading the held version for its holder fails
    assert not entry.live and entry.spec is None
    with pytest.raises(AdapterLoadError, match="replaced or deleted before it could be read"):
        s.registry.acquire(held)
    assert entry.slot is None and not any(slot_value(s.pool, i) for i in range(2))


def test_unheld_retired_versions_drop_their_host_copy_at_once(make):
    s = make(host=4)
    old = s.upload("a", V1)
    s.upload("a", V2, replace=True)
    assert old.spec is None and s.registry.tier_counts() == {"device": 0, "host": 1, "disk": 0}


# ---- slots -------------------------------------------------------------------------------------
def test_held_slots_are_never_evicted_the_lru_unheld_one_is(make):
    s = make(slots=2)
    a, b, c = s.upload("a", V1), s.upload("b", V2), s.upload("c", V3)
    a_lease = s.registry.acquire(s.registry.hold("a"))
    b_held = s.registry.hold("b")
    b_lease = s.registry.acquire(b_held)
    c_held = s.registry.hold("c")
    assert s.registry.acquire(c_held) is None  # both slots held: c waits
    assert c.wanted and c.slot is None
    s.registry.release(a)  # a is unheld now (its slot cached), b still held
    c_lease = s.registry.acquire(c_held)
    assert c_lease.slot == a_lease.slot and a.slot is None and a.tier == "host"
    assert slot_value(s.pool, c_lease.slot) == V3 and slot_value(s.pool, b_lease.slot) == V2
    assert b.slot == b_lease.slot and s.observer.evictions == {"device": 1}
    # two unheld: the least recently used one goes
    s.registry.release(b_held)
    s.registry.release(c_held)
    s.registry.release(s.registry.hold("b"))  # b used after c
    a_again = s.registry.acquire(s.registry.hold("a"))
    assert a_again.slot == c_lease.slot and c.slot is None and b.slot == b_lease.slot


def test_retired_unheld_slots_are_reused_before_a_live_one_is_evicted(make):
    s = make(slots=2)
    old = s.upload("a", V1)
    held = s.registry.hold("a")
    old_slot = s.registry.acquire(held).slot
    s.registry.release(held)
    s.upload("b", V2)
    b_slot = s.registry.acquire(s.registry.hold("b")).slot  # the empty slot
    s.upload("a", V1 + 1, replace=True)  # the old version, unheld, keeps its slot until needed
    assert old.slot == old_slot and not old.live
    new_slot = s.registry.acquire(s.registry.hold("a")).slot
    assert new_slot == old_slot and old.slot is None and s.observer.evictions["device"] == 0
    assert slot_value(s.pool, new_slot) == V1 + 1 and slot_value(s.pool, b_slot) == V2


def test_host_tier_is_an_lru_of_host_capacity(make):
    s = make(host=1)
    a = s.upload("a", V1)
    b = s.upload("b", V2)
    assert a.tier == "disk" and b.tier == "host" and s.observer.evictions == {"host": 1}
    lease = s.acquire_after_load(s.registry.hold("a"))  # back from disk; b's copy makes room
    assert slot_value(s.pool, lease.slot) == V1 and b.tier == "disk"


def test_an_abandoned_wait_does_not_pin_the_host_copy(make):
    s = make(host=0)
    entry = s.upload("a", V1)
    held = s.registry.hold("a")
    s.ready.clear()
    assert s.registry.acquire(held) is None
    assert s.ready.wait(10)
    s.registry.release(held)  # the request was aborted before its adapter was admitted
    s.upload("b", V2)
    assert s.registry.tier_counts()["host"] == 0 and entry.spec is None


def test_every_hold_released_leaves_no_refs_and_live_slots_only(make):
    s = make(slots=3)
    for value in (V1, V2, V3):
        s.upload("a", value, replace=value != V1)
        s.upload("b", value, replace=value != V1)
    holds = [s.registry.hold(n) for n in ("a", "b", "a")]
    s.upload("a", 2.0, replace=True)
    leases = [s.registry.acquire(e) for e in holds]
    assert [slot_value(s.pool, lease.slot) for lease in leases] == [V3, V3, V3]
    for entry in holds:
        s.registry.release(entry)
    live = {e.name: e for e in s.registry.list()}
    assert all(e.refs == 0 for e in live.values())
    holders = [h for h in s.registry._slots if h is not None]
    assert all(h.live for h in holders) and {h.name for h in holders} == {"b"}


# ---- a store shared by several registries (cluster replicas) -----------------------------------
def test_a_registry_adopts_what_another_did_to_the_shared_store(make):
    a, b = make(slots=2), make(slots=2)
    b.registry.store = b.store = AdapterStore(a.store.root, max_upload_bytes=1 << 24)
    a.upload("x", V1)
    assert b.registry.store_changed("x") and not b.registry.exists("x")
    b.registry.sync_stored("x")
    assert not b.registry.store_changed("x")
    old_held = b.registry.hold("x")
    a.upload("x", V2, replace=True)
    assert b.registry.store_changed("x")
    b.registry.sync_stored("x")
    new_lease = b.registry.acquire(b.registry.hold("x"))
    old_lease = b.registry.acquire(old_held)  # accepted before the replace: the old weights
    assert slot_value(b.pool, new_lease.slot) == V2 and slot_value(b.pool, old_lease.slot) == V1
    a.registry.remove("x")
    b.registry.sync_store()
    assert not b.registry.exists("x") and not b.registry.store_changed("x")
    with pytest.raises(UnknownAdapterError):
        b.registry.hold("x")


def test_a_stored_folder_that_does_not_validate_is_read_once(make):
    a, b = make(slots=2), make(slots=2)
    b.registry.store = b.store = AdapterStore(a.store.root, max_upload_bytes=1 << 24)
    a.upload("x", V1)
    (a.store.root / "x" / "adapter_config.json").write_text("{not json")
    b.registry.sync_stored("x")
    assert not b.registry.exists("x") and not b.registry.store_changed("x")
